//! The share engine's settings (`[shares]` in the agent's configuration).

use serde::Deserialize;

/// Async shares' watcher, each setting with its unit in its name.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShareSettings {
    /// Changes seen are gathered this long after the first before they go.
    pub watch_batch_delay_ms: u64,
    /// Changed paths held in one batch; more collapse into a rescan of the
    /// tree (files by content where their ctime is recent).
    pub watch_pending_paths_max: usize,
    /// Directories inotify cannot watch (fs.inotify.max_user_watches) are
    /// rescanned this often.
    pub watch_rescan_interval_ms: u64,
    /// Sync shares: a write that would leave the replica's filesystem with
    /// less free space than this fails here with ENOSPC (the replica
    /// reports its free space several times a second), rather than the
    /// replica failing it and falling behind.
    pub replica_free_bytes_min: u64,
    /// Sync shares: a read-only open of a file nobody may write (no write
    /// permission bit) is passed through to the backing file by the kernel
    /// (reads skip the daemon). While such a handle is open the kernel
    /// would pass writes through too, unreplicated, so a writable open of
    /// that file fails with ETXTBSY until the readers close it.
    pub passthrough_read_only_files: bool,
    /// Files whose content hash a share keeps between digests (a cutover
    /// or switchover then re-reads only files changed since its warm-up
    /// digest); about 80 bytes each.
    pub digest_cache_files_max: usize,
    /// A replica acknowledges what it received before applying it (on a
    /// second thread); this many bytes of received frames wait to be
    /// applied at most (then it stops reading the link).
    pub replica_apply_queue_bytes_max: u64,
    /// Promoting a replica waits this long for what it received to be
    /// applied; refused after.
    pub promote_apply_wait_ms: u64,
}

impl Default for ShareSettings {
    fn default() -> Self {
        ShareSettings {
            watch_batch_delay_ms: 20,
            watch_pending_paths_max: 65_536,
            watch_rescan_interval_ms: 5_000,
            replica_free_bytes_min: 64 << 20,
            passthrough_read_only_files: true,
            digest_cache_files_max: 1_000_000,
            replica_apply_queue_bytes_max: 16 << 20,
            promote_apply_wait_ms: 30_000,
        }
    }
}
