//! keelson: a distributed, strongly consistent key-value store that speaks
//! the etcd v3 API. See ARCHITECTURE.md for the map of this crate.

#[macro_use]
pub mod logging;

pub mod alloc;
pub mod apply;
pub mod auth;
pub mod bbolt;
pub mod config;
pub mod error;
pub mod etcd_db;
pub mod jwt;
pub mod kv;
pub mod lease;
pub mod mailbox;
pub mod membership;
pub mod metrics;
pub mod peer;
pub mod proto;
pub mod raftcore;
pub mod restore;
pub mod server;
#[cfg(test)]
mod sim;
pub mod snapshot;
pub mod store;
pub mod tcp_gateway;
pub mod wal;
pub mod watch;

/// The etcd API version keelson reports in `Status` (clients gate features
/// on it).
pub const ETCD_VERSION: &str = "3.5.0";
