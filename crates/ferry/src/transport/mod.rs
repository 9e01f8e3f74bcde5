//! How nodes reach each other: node identities and pinned certificates,
//! mutual TLS, the paired-peer list, connection caps of the listeners, and the
//! shared TLS stream both replication links use.
//!
//! Below the engines: `volume` and `share` dial and accept through this, and
//! nothing here knows about volumes, shares, clusters or migrations.

pub mod client;
pub mod conns;
pub mod dial;
pub mod identity;
pub mod inbound;
pub mod peers;
pub mod probe;
pub mod settings;
pub mod tls;
pub mod tls_io;
pub mod vmstream;
