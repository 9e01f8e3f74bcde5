//! What the agent gives the engines: the traits they define, implemented
//! here, so no engine sees `AgentCtx`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};

use super::AgentCtx;
use crate::share::settings::ShareSettings;
use crate::transport::dial::Dialer;
use crate::transport::settings::ReplicationSettings;

impl AgentCtx {
    /// What a workload's hooks need of this node.
    pub fn hook_env(&self) -> crate::workload::HookEnv<'_> {
        crate::workload::HookEnv {
            node_name: &self.identity.node_name,
            data_dir: &self.cfg.data_dir,
            nbd_uri_base: &self.nbd_uri_base,
            vms: &self.vms,
            vm_settings: &self.cfg.vm,
        }
    }

    /// GET `path` from paired node `peer`'s API, as this node (its
    /// certificate), giving up after `timeout`.
    pub fn peer_get_json(
        &self,
        peer: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let peer = self
            .peers
            .get(peer)
            .ok_or_else(|| anyhow!("peer {peer} is not registered"))?;
        crate::transport::client::ApiClient::to_peer(&self.identity, &peer)?
            .with_timeout(timeout)
            .get(path)
    }
}

impl AgentCtx {
    /// `ferry volume verify`: drains the link of primary `name`, then
    /// compares both sides' hashes, read whole.
    pub fn verify_volume(
        &self,
        name: &str,
        timeout: Duration,
        start: std::time::Instant,
    ) -> Result<serde_json::Value> {
        let vol = self.primary(name).ok_or_else(|| {
            anyhow!("volume {name:?} is not a primary on this node; run verify on the primary")
        })?;
        crate::volume::verify::verify(
            &vol,
            self.cfg.replication.granularity_bytes,
            &|peer, path| self.peer_get_json(peer, path, Duration::from_secs(120)),
            timeout,
            start,
        )
    }
}

impl crate::share::Host for AgentCtx {
    fn node_name(&self) -> &str {
        &self.identity.node_name
    }
    fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }
    fn share_settings(&self) -> &ShareSettings {
        &self.cfg.shares
    }
    fn link_settings(&self) -> &ReplicationSettings {
        &self.cfg.replication
    }
    fn shares(&self) -> &crate::share::Shares {
        &self.shares
    }
    fn dialer(&self) -> Dialer {
        AgentCtx::dialer(self)
    }
    fn peer_get(&self, peer: &str, path: &str, timeout: Duration) -> Result<serde_json::Value> {
        self.peer_get_json(peer, path, timeout)
    }
}

impl crate::volume::replica::Host for AgentCtx {
    fn node_name(&self) -> &str {
        &self.identity.node_name
    }
    fn link_settings(&self) -> &ReplicationSettings {
        &self.cfg.replication
    }
    fn replica(&self, volume: &str) -> Option<Arc<crate::volume::replica::ReplicaVolume>> {
        AgentCtx::replica(self, volume)
    }
    fn refuse_link(&self, volume: &str) -> Option<String> {
        self.cluster.is_candidate_volume(volume).then(|| {
            format!(
                "node {} asked the witness to take over the workload of {volume:?}: its copy must not change until it answers; retrying",
                self.identity.node_name
            )
        })
    }
}

impl AgentCtx {
    /// Routes an inbound replication link by its first frame: a share's
    /// link (its own protocol on the same listener), a link probe, or a
    /// volume stream.
    pub fn route_inbound(&self, inbound: crate::transport::inbound::Inbound) -> Result<()> {
        use ferry_wire::Kind;
        if inbound.first.kind == Kind::ShareHello {
            let hello = ferry_wire::ShareHello::from_bytes(
                &inbound.first_body[..inbound.first.len as usize],
            )?;
            if !inbound.reader.buffer().is_empty() {
                anyhow::bail!("share link sent frames before the handshake reply");
            }
            let tls = inbound.reader.into_inner();
            return crate::share::link::serve_replica(
                self,
                &inbound.peer.name,
                hello,
                tls,
                inbound.control,
            );
        }
        if inbound.first.kind == Kind::Probe {
            // `ferry estimate probe` from the peer: data to discard. A
            // second probe from the same peer is refused while one runs.
            let limits = crate::transport::probe::ServeLimits {
                frame_bytes_max: self.cfg.replication.frame_bytes_max,
                duration_max: Duration::from_secs(
                    self.cfg.estimate.probe_seconds_max.saturating_mul(2) + 60,
                ),
            };
            return crate::transport::probe::serve(inbound, limits).map(|_| ());
        }
        if inbound.first.kind == Kind::VmStream {
            // A VM's live-migration stream from the source node, tunnelled
            // to the local socket of the session it names.
            let limits = crate::transport::vmstream::TunnelLimits {
                frame_bytes_max: self.cfg.replication.frame_bytes_max,
                connect_timeout_ms: self.cfg.vm.incoming_timeout_ms,
                idle_timeout_ms: self.cfg.vm.stream_idle_timeout_ms,
                ..Default::default()
            };
            let from = inbound.peer.name.clone();
            return crate::transport::vmstream::serve(
                inbound,
                |h| self.incoming_vm_socket(&h.workload, &h.token, &from),
                limits,
            )
            .map(|_| ())
            .map_err(Into::into);
        }
        crate::volume::replica::serve_stream(self, inbound)
    }
}

impl crate::handover::Node for AgentCtx {
    fn audit(&self) -> &Arc<crate::audit::AuditLog> {
        &self.audit
    }
    fn cfg(&self) -> &crate::config::AgentConfig {
        &self.cfg
    }
    fn identity(&self) -> &Arc<crate::transport::identity::Identity> {
        &self.identity
    }
    fn peers(&self) -> &Arc<crate::transport::peers::Peers> {
        &self.peers
    }
    fn store(&self) -> &crate::volume::VolumeStore {
        &self.store
    }
    fn damaged(&self) -> &crate::store::damaged::Damaged {
        &self.damaged
    }
    fn primary(&self, name: &str) -> Option<Arc<crate::volume::primary::PrimaryVolume>> {
        AgentCtx::primary(self, name)
    }
    fn hook_env(&self) -> crate::workload::HookEnv<'_> {
        AgentCtx::hook_env(self)
    }
    fn demote_volume(self: Arc<Self>, name: &str, new_primary: &str) -> Result<()> {
        AgentCtx::demote_volume(&self, name, new_primary)
    }
}

impl crate::cluster::Host for AgentCtx {
    fn cluster(&self) -> &crate::cluster::ClusterView {
        &self.cluster
    }
    fn forced_promotions(&self) -> &std::sync::Mutex<std::collections::HashSet<String>> {
        &self.forced_promotions
    }
    fn commit_takeover(
        self: Arc<Self>,
        workload: &str,
        volumes: &[String],
        shares: &[String],
        reverse_to: Option<&str>,
        mode: ferry_core::link::Mode,
    ) -> Result<Vec<(String, u64)>> {
        AgentCtx::commit_takeover(&self, workload, volumes, shares, reverse_to, mode)
    }
    fn demote_after_failover(
        self: Arc<Self>,
        name: &str,
        new_primary: &str,
        proven_equal: bool,
    ) -> Result<()> {
        AgentCtx::demote_after_failover(&self, name, new_primary, proven_equal)
    }
}

impl crate::migration::Host for AgentCtx {
    fn migrations(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<String, crate::migration::MigrationRecord>,
    > {
        AgentCtx::migrations(self)
    }
    fn tests(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, crate::migration::TestRun>>
    {
        AgentCtx::tests(self)
    }
    fn cutover_lock(&self) -> &std::sync::Mutex<()> {
        &self.cutover_lock
    }
    fn nbd(&self) -> &ferry_nbd::Server {
        &self.nbd
    }
    fn nbd_uri_base(&self) -> &ferry_nbd::ListenAddr {
        &self.nbd_uri_base
    }
    fn started(&self) -> std::time::Instant {
        self.started
    }
    fn start_replication(
        self: Arc<Self>,
        name: &str,
        to: &str,
        mode: ferry_core::link::Mode,
        max_rate: Option<u64>,
        baseline: &crate::volume::Baseline,
    ) -> Result<()> {
        AgentCtx::start_replication(&self, name, to, mode, max_rate, baseline)
    }
    fn stop_replication(&self, name: &str) -> Result<()> {
        AgentCtx::stop_replication(self, name)
    }
}
