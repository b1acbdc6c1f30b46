//! Throw-away TLS material: a CA and a server certificate for `localhost`.

use super::client::client_tls;
use super::unique_temp_dir;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

/// A throw-away CA and a server certificate for `localhost` and `127.0.0.1`, as PEM files
/// in a fresh temporary directory (removed on drop).
pub struct TestCerts {
    pub dir: PathBuf,
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestCerts {
    /// Generates the CA and the server certificate.
    pub fn new() -> TestCerts {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pacer test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).expect("CA cert");

        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");

        let dir = unique_temp_dir("certs");
        let write = |name: &str, pem: String| {
            let p = dir.join(name);
            std::fs::write(&p, pem).expect("write PEM");
            p
        };
        TestCerts {
            ca_pem: write("ca.pem", ca.pem()),
            cert_pem: write("cert.pem", cert.pem()),
            key_pem: write("key.pem", key.serialize_pem()),
            dir,
        }
    }

    /// A TLS acceptor with the server certificate, ALPN h2 and http/1.1.
    pub fn acceptor(&self) -> TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&self.cert_pem)
            .expect("server cert PEM")
            .collect::<Result<Vec<_>, _>>()
            .expect("server cert PEM");
        let key = PrivateKeyDer::from_pem_file(&self.key_pem).expect("key PEM");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server TLS config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(config))
    }

    /// A client configuration trusting only the test CA.
    pub fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        for cert in CertificateDer::pem_file_iter(&self.ca_pem).expect("CA PEM") {
            roots.add(cert.expect("CA PEM")).expect("add CA");
        }
        client_tls(roots)
    }
}

impl Default for TestCerts {
    fn default() -> Self {
        Self::new()
    }
}
