//! The migration estimator (issue 21): observing a workload's writes before
//! its migration. An engine-level module: it reads devices and the kernel's
//! counters, and names no cluster, migration, agent or API module.
//!
//! - [`device`]: a Linux block device ferry does not serve yet —
//!   `/proc/diskstats` intervals (an upper bound on unique bytes written) and
//!   the `block:block_rq_issue` tracepoint in a tracefs instance of its own
//!   (the written blocks exactly). The parsing is ferry-core's `blockobs`.
//!
//! - [`tap`]: the [`tap::WriteTap`] every primary volume and share holds:
//!   their writes, handed to the agent's estimate thread.
//!
//! The agent's `agent/estimates.rs` runs the observations.

// Some of its accessors serve tests/estimate_device.rs only.
#[allow(dead_code)]
pub mod device;
pub mod tap;

use serde::{Deserialize, Serialize};

/// `[estimate]` in the agent's config: the estimator's limits.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EstimateSettings {
    /// How long an estimate observes when `--duration` is not given, s.
    #[serde(default = "default_duration_s")]
    pub duration_s_default: u64,
    /// The longest `--duration`, s.
    #[serde(default = "default_duration_s_max")]
    pub duration_s_max: u64,
    /// Most estimates one node keeps (observing or not).
    #[serde(default = "default_estimates_max")]
    pub estimates_max: usize,
    /// Most write events a tap holds between two ticks; more are dropped
    /// and counted (`events_dropped`: W(T) is then a lower bound).
    #[serde(default = "default_tap_events_max")]
    pub tap_events_max: usize,
    /// How often the estimate thread drains the taps, ms.
    #[serde(default = "default_tick_interval_ms")]
    pub tick_interval_ms: u64,
    /// How often a running observation is saved, ms.
    #[serde(default = "default_save_interval_ms")]
    pub save_interval_ms: u64,
    /// `ferry estimate probe`: the default and the longest measurement, s.
    #[serde(default = "default_probe_seconds")]
    pub probe_seconds_default: u64,
    #[serde(default = "default_probe_seconds_max")]
    pub probe_seconds_max: u64,
    /// Observe a block device through the `block:block_rq_issue`
    /// tracepoint where tracefs allows (false: `/proc/diskstats` only, an
    /// upper bound).
    #[serde(default = "yes")]
    pub use_tracepoint: bool,
    /// A device's tracepoint ring buffer per CPU, KiB.
    #[serde(default = "default_trace_buffer_kb")]
    pub trace_buffer_kb: u32,
    /// The cutover downtime forecast's constants (see README, "Estimate"):
    /// the leaf hashing speed, bytes/s…
    #[serde(default = "default_hash_bytes_per_s")]
    pub hash_bytes_per_s: u64,
    /// …the commit's time, ms…
    #[serde(default = "default_commit_ms")]
    pub commit_ms: u64,
    /// …the time between the last flush before the freeze and the freeze
    /// (what is written in it is drained inside the freeze, async), ms…
    #[serde(default = "default_drain_window_ms")]
    pub drain_window_ms: u64,
    /// …and the time between the prehash and the freeze (the leaves of what
    /// is written in it are hashed again inside the freeze), ms.
    #[serde(default = "default_rehash_window_ms")]
    pub rehash_window_ms: u64,
}

fn default_hash_bytes_per_s() -> u64 {
    1 << 30
}
fn default_commit_ms() -> u64 {
    30
}
fn default_drain_window_ms() -> u64 {
    200
}
fn default_rehash_window_ms() -> u64 {
    1000
}

fn yes() -> bool {
    true
}
fn default_duration_s() -> u64 {
    86_400
}
fn default_duration_s_max() -> u64 {
    30 * 86_400
}
fn default_estimates_max() -> usize {
    32
}
fn default_tap_events_max() -> usize {
    1 << 20
}
fn default_tick_interval_ms() -> u64 {
    200
}
fn default_save_interval_ms() -> u64 {
    60_000
}
fn default_probe_seconds() -> u64 {
    10
}
fn default_probe_seconds_max() -> u64 {
    300
}
fn default_trace_buffer_kb() -> u32 {
    4096
}

impl Default for EstimateSettings {
    fn default() -> Self {
        EstimateSettings {
            duration_s_default: default_duration_s(),
            duration_s_max: default_duration_s_max(),
            estimates_max: default_estimates_max(),
            tap_events_max: default_tap_events_max(),
            tick_interval_ms: default_tick_interval_ms(),
            save_interval_ms: default_save_interval_ms(),
            probe_seconds_default: default_probe_seconds(),
            probe_seconds_max: default_probe_seconds_max(),
            use_tracepoint: true,
            trace_buffer_kb: default_trace_buffer_kb(),
            hash_bytes_per_s: default_hash_bytes_per_s(),
            commit_ms: default_commit_ms(),
            drain_window_ms: default_drain_window_ms(),
            rehash_window_ms: default_rehash_window_ms(),
        }
    }
}
