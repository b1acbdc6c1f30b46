//! The `pacer` command line.

use clap::{Parser, Subcommand};
use pacer::config::Config;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "pacer",
    version,
    about = "Rate-limiting reverse proxy for the Genesys Cloud Platform API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show pacer at work: the simulator, a runaway bulk job and IVR traffic, direct vs through pacer.
    Demo {
        /// How long the whole demo runs (both phases).
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        duration: Duration,
        /// Requests per window the simulator really grants the client, below pacer's
        /// configured 300: pacer learns the smaller budget and the table shows it. At least
        /// 200, so that the IVR's 36 calls per window still fit the 20% critical reserve.
        #[arg(long, value_parser = clap::value_parser!(u64).range(200..=300))]
        sim_limit: Option<u64>,
    },
    /// Serve with a configuration file.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short, env = "PACER_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration file and list every error with its key path.
    CheckConfig {
        /// Configuration file (TOML).
        file: PathBuf,
    },
    /// Exit 0 when a running pacer's `/readyz` answers 200, non-zero otherwise (for
    /// container health checks: no curl needed).
    Healthcheck {
        /// Admin address (`host:port`) to ask; default: the configuration's
        /// `admin_listen` if `--config`/`PACER_CONFIG` is given, else 127.0.0.1:9090.
        #[arg(long)]
        admin: Option<String>,
        /// Configuration file to read `[server] admin_listen` from.
        #[arg(long, short, env = "PACER_CONFIG")]
        config: Option<PathBuf>,
        /// Longest wait for the answer.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Run the built-in Genesys-like upstream simulator.
    Simulate {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// Simulator configuration (TOML); Genesys-like defaults without it.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PACER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = |current_thread: bool| {
        let mut builder = if current_thread {
            tokio::runtime::Builder::new_current_thread()
        } else {
            tokio::runtime::Builder::new_multi_thread()
        };
        builder.enable_all().build().map_err(|e| {
            eprintln!("pacer: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
    };
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: ok ({} upstreams, {} routes, {} limits)",
                    file.display(),
                    c.upstreams.len(),
                    c.routes.len(),
                    c.limits.len()
                );
                for w in c.warnings() {
                    println!("  warning: {w}");
                }
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{}: {} error(s)", file.display(), errors.0.len());
                for e in &errors.0 {
                    eprintln!("  {e}");
                }
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            init_tracing();
            let path = config;
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!(
                        "pacer: refusing to start, {} configuration error(s):",
                        errors.0.len()
                    );
                    for e in &errors.0 {
                        eprintln!("  {e}");
                    }
                    return ExitCode::FAILURE;
                }
            };
            for w in config.warnings() {
                tracing::warn!(key = %w.path, "{}", w.message);
            }
            // One single-threaded runtime per serving thread (`[server] workers`); this one
            // is the first and also runs the shared background work.
            let runtime = match runtime(true) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match runtime.block_on(pacer::app::run(config, Some(path))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pacer: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Healthcheck {
            admin,
            config,
            timeout,
        } => {
            use pacer::healthcheck::{admin_address, check};
            let addr = match admin_address(admin, config.as_deref()) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("pacer healthcheck: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match runtime(true) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match runtime.block_on(check(&addr, timeout)) {
                Ok(body) => {
                    println!("{addr}: {body}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pacer healthcheck: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Simulate { listen, config } => {
            init_tracing();
            let config = match config {
                Some(path) => match pacer::sim::SimConfig::from_file(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("pacer: {e}");
                        return ExitCode::FAILURE;
                    }
                },
                None => pacer::sim::SimConfig::default(),
            };
            let runtime = match runtime(false) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match runtime.block_on(pacer::sim::serve(listen, config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pacer: simulator: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo {
            duration,
            sim_limit,
        } => {
            if std::env::var_os("PACER_LOG").is_some() {
                init_tracing();
            }
            let runtime = match runtime(false) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match runtime.block_on(pacer::demo::run(duration, sim_limit)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("pacer: demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
