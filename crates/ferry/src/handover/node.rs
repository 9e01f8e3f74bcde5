//! What the modules that hand workloads over (the cluster manager and
//! migrations) see of the node they run on. The agent implements these
//! traits; below it nobody sees `AgentCtx`.

use std::sync::Arc;

use anyhow::Result;

use crate::config::AgentConfig;
use crate::store::damaged::Damaged;
use crate::transport::identity::Identity;
use crate::transport::peers::Peers;
use crate::volume::primary::PrimaryVolume;
use crate::volume::VolumeStore;

/// The node, as the cluster manager and migrations see it: its settings and
/// identity, the paired nodes, its volumes and shares (through the engines'
/// own host traits), and the node-wide steps that change a volume's role.
pub trait Node: crate::share::Host + crate::volume::replica::Host {
    fn cfg(&self) -> &AgentConfig;
    fn identity(&self) -> &Arc<Identity>;
    fn peers(&self) -> &Arc<Peers>;
    fn store(&self) -> &VolumeStore;
    /// Records found damaged and set aside.
    fn damaged(&self) -> &Damaged;
    /// The audit log (decisions go through [`crate::audit::AuditLog::decide`]).
    fn audit(&self) -> &Arc<crate::audit::AuditLog>;
    /// The primary of `name` on this node.
    fn primary(&self, name: &str) -> Option<Arc<PrimaryVolume>>;
    /// What a workload's hooks need of this node.
    fn hook_env(&self) -> crate::workload::HookEnv<'_>;
    /// Demotes primary `name` to `new_primary`'s replica (a cutover).
    fn demote_volume(self: Arc<Self>, name: &str, new_primary: &str) -> Result<()>;
}

impl<T: Node + ?Sized> Node for Arc<T> {
    crate::sys::forward_to_arc! {
        cfg(&self) -> &AgentConfig;
        identity(&self) -> &Arc<Identity>;
        peers(&self) -> &Arc<Peers>;
        store(&self) -> &VolumeStore;
        damaged(&self) -> &Damaged;
        audit(&self) -> &Arc<crate::audit::AuditLog>;
        primary(&self, name: &str) -> Option<Arc<PrimaryVolume>>;
        hook_env(&self) -> crate::workload::HookEnv<'_>;
    }
    fn demote_volume(self: Arc<Self>, name: &str, new_primary: &str) -> Result<()> {
        T::demote_volume((*self).clone(), name, new_primary)
    }
}
