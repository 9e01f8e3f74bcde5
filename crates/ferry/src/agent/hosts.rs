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

/// Keeps `Arc` in scope for the engines' `Arc<H>` entry points.
#[allow(dead_code)]
fn _assert_host(ctx: &Arc<AgentCtx>) -> &dyn crate::share::Host {
    ctx
}
