//! A Genesys-like upstream simulator.
//!
//! A real HTTP/1.1 + HTTP/2 server that issues client-credentials tokens and enforces
//! Genesys Cloud's layered limits (per client, per org, per endpoint template, token
//! issuance, concurrency) with an exact sliding count, so tests and `pacer demo` can show
//! what pacer keeps upstream from ever seeing. `/sim/stats` reports what arrived.

mod config;
mod count;
mod jobs;
mod server;
mod state;
mod stats;

pub use crate::endpoint::Template;
pub use config::{Scope, SimClient, SimConfig, SimConfigError, SimEndpoint};
pub use server::{serve, Simulator};
pub use stats::{ClientStats, SimStats};
