//! pacer: a rate-limiting reverse proxy for the Genesys Cloud Platform API.
//!
//! The request path reads top to bottom in one function, [`pipeline::Pipeline`]'s `run`:
//! guard → route → access → buffer → identify → broker → admit (classify, quotas, queue) →
//! forward → learn, each phase handing the next a typed request.

pub mod adaptive;
pub mod admin;
pub mod admit;
pub mod answer;
pub mod app;
pub mod broker;
pub mod buffer;
pub mod config;
pub mod demo;
pub mod endpoint;
pub mod error;
pub mod feedback;
pub mod forward;
pub mod guard;
pub mod identity;
pub mod limit;
pub mod metrics;
pub mod path;
pub mod pipeline;
pub mod proxy;
pub mod queue;
pub mod reserve;
pub mod route;
pub mod server;
pub mod sim;
pub mod state;
pub mod status;
