//! The migration estimator (issue 21): observing a workload's writes before
//! its migration. An engine-level module: it reads devices and the kernel's
//! counters, and names no cluster, migration, agent or API module.
//!
//! - [`device`]: a Linux block device ferry does not serve yet —
//!   `/proc/diskstats` intervals (an upper bound on unique bytes written) and
//!   the `block:block_rq_issue` tracepoint in a tracefs instance of its own
//!   (the written blocks exactly). The parsing is ferry-core's `blockobs`.
//!
//! Not wired to the agent or the CLI yet (`ferry estimate start --device`):
//! the items are unused in the binary until then.

#[allow(dead_code)]
pub mod device;
