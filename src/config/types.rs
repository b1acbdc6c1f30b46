//! Small typed values that configuration strings are parsed into once.

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// A duration written as a string: `"60s"`, `"1m"`, `"250ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

impl Dur {
    /// Whole seconds.
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }
}

/// An address range such as `10.0.0.0/8`; a bare address means just that address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub ipnet::IpNet);

impl Cidr {
    /// True when `ip` lies in the range (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.contains(&ip)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            return Ok(Cidr(net));
        }
        s.parse::<IpAddr>()
            .map(|ip| Cidr(ipnet::IpNet::from(ip)))
            .map_err(|_| serde::de::Error::custom(format!("invalid CIDR {s:?}")))
    }
}

/// A secret from the configuration; never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for comparison only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Who goes first when quotas are tight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Served first, may use the whole quota (IVR Data Actions).
    Critical,
    #[default]
    Normal,
    /// Uses at most `bulk_share` of any quota.
    Bulk,
}

impl Priority {
    /// All classes, highest first.
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Normal, Priority::Bulk];

    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Normal => "normal",
            Priority::Bulk => "bulk",
        }
    }

    /// Index into per-class arrays, highest first.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Parses a header value; unknown strings are `None`.
    pub fn parse(s: &str) -> Option<Priority> {
        match s.trim().to_ascii_lowercase().as_str() {
            "critical" => Some(Priority::Critical),
            "normal" => Some(Priority::Normal),
            "bulk" => Some(Priority::Bulk),
            _ => None,
        }
    }
}

/// What a limit counts separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
pub enum Scope {
    /// One counter for everything matching.
    #[serde(rename = "global")]
    Global,
    /// One counter per caller.
    #[default]
    #[serde(rename = "client")]
    Client,
    /// One counter per endpoint template.
    #[serde(rename = "endpoint")]
    Endpoint,
    /// One counter per caller and endpoint template.
    #[serde(rename = "client+endpoint")]
    ClientEndpoint,
}

/// What happens to callers that cannot be identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownClients {
    /// Limited under a key derived from a hash of their credential.
    #[default]
    Limit,
    /// Answered 401.
    Reject,
}

/// How a caller is told apart on a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// The OAuth client behind the bearer token (Genesys routes).
    OAuth,
    /// The value of a request header.
    Header(http::HeaderName),
    /// The user name of Basic credentials.
    BasicUser,
    /// A hash of the bearer token itself.
    Bearer,
    /// The peer address (after trusted proxies).
    ClientIp,
}

impl<'de> Deserialize<'de> for IdentitySource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bad = || {
            serde::de::Error::custom(format!(
                "invalid identity source {s:?}, expected oauth, header:NAME, basic-user, bearer or client-ip"
            ))
        };
        match s.as_str() {
            "oauth" => Ok(IdentitySource::OAuth),
            "basic-user" => Ok(IdentitySource::BasicUser),
            "bearer" => Ok(IdentitySource::Bearer),
            "client-ip" => Ok(IdentitySource::ClientIp),
            _ => match s.strip_prefix("header:") {
                Some(name) => http::HeaderName::from_bytes(name.trim().as_bytes())
                    .map(IdentitySource::Header)
                    .map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}
