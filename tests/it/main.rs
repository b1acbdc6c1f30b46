//! pacer's black-box tests, one module a theme, in one test binary. Helpers live in
//! [`support`], one job a module. Tests that load the machine, measure time or start
//! child processes hold a [`support::slot`] sized by their [`support::Load`] for their
//! whole run (waiting ones share the machine, floods and memory measurements run alone);
//! light tests run beside anything.

mod support;

mod access_log;
mod apps;
mod broker;
mod cache;
mod cli;
mod config_watch;
mod credential;
mod deps;
mod discover;
mod egress;
mod fuzz_replay;
mod h2_abuse;
mod health;
mod hostile;
mod jobs;
mod kubernetes;
mod limits;
mod live_page;
mod max_wait;
mod observability;
mod proxy;
mod redis;
mod redis_faults;
mod redis_topologies;
mod sdk;
mod secrets;
mod shadow;
mod sim;
mod slow_peers;
mod smuggling;
mod soak;
mod usage;
mod workers;
