//! What migrations need of the node beyond [`Node`]: the records of the
//! migrations it is the source of, its test instances, its NBD server, and
//! starting and stopping a volume's replication.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::Result;
use ferry_core::link::Mode;

use crate::handover::Node;

pub trait Host: Node {
    /// Migrations this node is the source of, by workload.
    fn migrations(&self) -> MutexGuard<'_, HashMap<String, super::MigrationRecord>>;
    /// Test instances (`ferry migrate test`) running here, by workload.
    fn tests(&self) -> MutexGuard<'_, HashMap<String, super::TestRun>>;
    /// One cutover at a time on this node.
    fn cutover_lock(&self) -> &Mutex<()>;
    fn nbd(&self) -> &ferry_nbd::Server;
    /// Where this node's NBD exports are (`nbd+unix://` URIs).
    fn nbd_uri_base(&self) -> &ferry_nbd::ListenAddr;
    /// When the agent started.
    fn started(&self) -> Instant;
    /// Starts replicating primary `name` to node `to`.
    fn start_replication(
        self: Arc<Self>,
        name: &str,
        to: &str,
        mode: Mode,
        max_rate: Option<u64>,
        baseline: &crate::volume::Baseline,
    ) -> Result<()>;
    fn stop_replication(&self, name: &str) -> Result<()>;
}

impl<T: Host + ?Sized> Host for Arc<T> {
    crate::sys::forward_to_arc! {
        migrations(&self) -> MutexGuard<'_, HashMap<String, super::MigrationRecord>>;
        tests(&self) -> MutexGuard<'_, HashMap<String, super::TestRun>>;
        cutover_lock(&self) -> &Mutex<()>;
        nbd(&self) -> &ferry_nbd::Server;
        nbd_uri_base(&self) -> &ferry_nbd::ListenAddr;
        started(&self) -> Instant;
        stop_replication(&self, name: &str) -> Result<()>;
    }
    fn start_replication(
        self: Arc<Self>,
        name: &str,
        to: &str,
        mode: Mode,
        max_rate: Option<u64>,
        baseline: &crate::volume::Baseline,
    ) -> Result<()> {
        T::start_replication((*self).clone(), name, to, mode, max_rate, baseline)
    }
}
