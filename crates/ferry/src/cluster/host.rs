//! What the cluster manager needs of the node beyond [`Node`]: its view of
//! the cluster, and the node-wide steps of a failover.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use ferry_core::link::Mode;

use crate::handover::Node;

pub trait Host: Node {
    /// The cluster manager's view, for `ferry cluster status`.
    fn cluster(&self) -> &super::ClusterView;
    /// Workloads an operator promoted with `--force`.
    fn forced_promotions(&self) -> &Mutex<HashSet<String>>;
    /// Takes `workload` over here: its volumes and shares become primary
    /// (durably), replicating back to `reverse_to`.
    fn commit_takeover(
        self: Arc<Self>,
        workload: &str,
        volumes: &[String],
        shares: &[String],
        reverse_to: Option<&str>,
        mode: Mode,
    ) -> Result<Vec<(String, u64)>>;
    /// After a failover elsewhere: primary `name` becomes `new_primary`'s
    /// replica (`proven_equal`: nothing here is suspect).
    fn demote_after_failover(
        self: Arc<Self>,
        name: &str,
        new_primary: &str,
        proven_equal: bool,
    ) -> Result<()>;
}

impl<T: Host + ?Sized> Host for Arc<T> {
    crate::sys::forward_to_arc! {
        cluster(&self) -> &super::ClusterView;
        forced_promotions(&self) -> &Mutex<HashSet<String>>;
    }
    fn commit_takeover(
        self: Arc<Self>,
        workload: &str,
        volumes: &[String],
        shares: &[String],
        reverse_to: Option<&str>,
        mode: Mode,
    ) -> Result<Vec<(String, u64)>> {
        T::commit_takeover((*self).clone(), workload, volumes, shares, reverse_to, mode)
    }
    fn demote_after_failover(
        self: Arc<Self>,
        name: &str,
        new_primary: &str,
        proven_equal: bool,
    ) -> Result<()> {
        T::demote_after_failover((*self).clone(), name, new_primary, proven_equal)
    }
}
