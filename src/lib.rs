//! pacer: a rate-limiting reverse proxy for the Genesys Cloud Platform API.
//!
//! The request path reads top to bottom in one function, [`pipeline::Pipeline`]'s `run`:
//! guard → route → access → buffer → identify → broker → admit (classify, quotas, queue) →
//! forward → learn, each phase handing the next a typed request.
//!
//! Public: what the binary, the tests, the benches and the fuzz targets use (starting an
//! instance, configuration, the simulator and demo, and the pieces they exercise directly);
//! the rest is the crate's own.

pub mod access_log;
mod adaptive;
mod admin;
pub mod admit;
pub mod answer;
pub mod app;
pub mod broker;
mod buffer;
pub mod cache;
pub mod config;
pub mod credential;
mod deadline;
pub mod demo;
pub mod discover;
mod edge;
mod egress;
pub mod endpoint;
mod error;
pub mod feedback;
pub mod forward;
mod guard;
pub mod healthcheck;
pub mod identity;
pub mod jobs;
pub mod limit;
pub mod metrics;
pub mod path;
mod pipeline;
pub mod proxy;
pub mod queue;
mod recent;
mod reload;
mod reserve;
mod route;
mod server;
pub mod shadow;
pub mod sim;
pub mod state;
mod status;
pub mod usage;
