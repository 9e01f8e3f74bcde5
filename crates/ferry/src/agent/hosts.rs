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
        crate::api::client::ApiClient::to_peer(&self.identity, &peer)?
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
    /// link (its own protocol on the same listener) or a volume stream.
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
        crate::volume::replica::serve_stream(self, inbound)
    }
}

/// Keeps `Arc` in scope for the engines' `Arc<H>` entry points.
#[allow(dead_code)]
fn _assert_host(ctx: &Arc<AgentCtx>) -> &dyn crate::share::Host {
    ctx
}
