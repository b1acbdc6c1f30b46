//! Counters shared by every replica in Redis (see [`backend`]).

mod backend;

pub use backend::RedisBackend;
