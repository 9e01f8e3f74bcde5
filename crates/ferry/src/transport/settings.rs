//! Limits of replication links, volumes' and shares' alike (`[replication]`
//! in the agent's configuration).

use serde::Deserialize;

/// Limits of replication links, each with its unit in its name.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationSettings {
    /// Dirty-map block size (power of two, 4 KiB to 64 MiB).
    pub granularity_bytes: u64,
    /// Async mode: bytes sent but not yet acknowledged before the link falls behind.
    pub backlog_bytes_max: u64,
    /// A peer silent this long while acknowledgements are due is failed.
    pub peer_ack_timeout_ms: u64,
    /// Largest frame payload accepted from a peer.
    pub frame_bytes_max: u32,
    /// Blocks the background copier has in flight at once.
    pub copies_in_flight_max: usize,
    /// Reconnect backoff grows up to this.
    pub reconnect_backoff_max_ms: u64,
    /// Activity-log extents (4 MiB each) kept hot; bounds resync after a crash.
    pub al_extents_max: usize,
    /// The primary asks the replica to make the stream durable at least this
    /// often, and after this many bytes: a crash of the replica re-sends at most
    /// that much. Each is an `fdatasync` on the replica.
    pub link_flush_interval_ms: u64,
    pub link_flush_bytes: u64,
    /// The replica starts writeback (`sync_file_range`, not a flush) of the
    /// writes it applied every this many bytes, and at most this long after
    /// one was applied, so a cutover's or switchover's final link flush
    /// finds little to write inside the downtime whatever
    /// `link_flush_interval_ms` is. 0 bytes = off (then up to
    /// `link_flush_interval_ms` of writes are written back inside it);
    /// 0 ms = by bytes only.
    pub replica_writeback_bytes: u64,
    pub replica_writeback_interval_ms: u64,
    /// Distinct blocks (of `granularity_bytes`) written and not yet confirmed
    /// durable on the replica that the primary keeps track of; at half of it
    /// a link flush is sent. Bounds the link's memory (~50 B per block).
    pub link_unconfirmed_blocks_max: usize,
    /// Background re-hashing of written blocks (Merkle leaves), so a cutover
    /// re-reads only what was written since; 0 leaves it all to the cutover.
    pub leaf_refresh_bytes_per_s: u64,
    /// Background read-back of clean leaves (catches changes made behind
    /// ferry's back before a cutover trusts the leaves); 0 = off.
    pub leaf_scrub_bytes_per_s: u64,
    /// Inbound connections to the replication listener at once (links of
    /// registered peers and handshakes in progress).
    pub connections_max: usize,
    /// Of those, handshakes not yet authenticated (TLS with a registered
    /// peer's certificate); when full the oldest is closed for the new one,
    /// so a flood of idle connections cannot keep a peer out.
    pub handshakes_max: usize,
    /// The whole handshake (TCP accepted → TLS done → peer recognised) must
    /// finish within this.
    pub handshake_timeout_ms: u64,
}

impl Default for ReplicationSettings {
    fn default() -> Self {
        ReplicationSettings {
            granularity_bytes: ferry_core::dirty::DEFAULT_GRANULARITY_BYTES,
            backlog_bytes_max: 64 * 1024 * 1024,
            peer_ack_timeout_ms: 5_000,
            frame_bytes_max: 8 * 1024 * 1024,
            copies_in_flight_max: 32,
            reconnect_backoff_max_ms: 5_000,
            al_extents_max: 256,
            link_flush_interval_ms: 30_000,
            link_flush_bytes: 4 * 1024 * 1024 * 1024,
            replica_writeback_bytes: 4 * 1024 * 1024,
            replica_writeback_interval_ms: 500,
            link_unconfirmed_blocks_max: 131_072,
            leaf_refresh_bytes_per_s: 1024 * 1024 * 1024,
            leaf_scrub_bytes_per_s: 32 * 1024 * 1024,
            connections_max: 256,
            handshakes_max: 16,
            handshake_timeout_ms: 10_000,
        }
    }
}
