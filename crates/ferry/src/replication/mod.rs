//! Continuous block replication between two nodes.
//!
//! - [`primary`]: the replicated `BlockDevice` the NBD export serves, and its copier;
//! - [`link`]: the primary's network side (TLS, frames out, acks in, reconnect);
//! - [`secondary`]: the replica's side (accept, apply in order, acknowledge);
//! - [`meta`]: per-volume metadata (role, generations, activity log) and the saved dirty map.

pub mod link;
pub mod meta;
pub mod primary;
pub mod secondary;
pub mod snapshot;
pub mod tls_io;
pub mod verify;
