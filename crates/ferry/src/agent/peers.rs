//! The nodes this node trusts: `DATA_DIR/peers.json`, written atomically.
//! A peer is registered with its name, API and replication addresses, its
//! certificate (pinned by fingerprint) and the token to call its API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub api: String,
    pub replication: String,
    pub fingerprint: String,
    pub cert_pem: String,
    /// Token to call this peer's API (not shown in status output).
    #[serde(default)]
    pub token: String,
    /// The peer's heartbeat listeners (UDP).
    #[serde(default)]
    pub heartbeat: Vec<String>,
    /// Shared secret (hex) authenticating heartbeats both ways (HMAC-SHA256),
    /// made by whichever node ran `ferry node add`.
    #[serde(default)]
    pub heartbeat_key: String,
}

#[derive(Debug)]
pub struct Peers {
    path: PathBuf,
    map: RwLock<BTreeMap<String, Peer>>,
}

impl Peers {
    pub fn load(data_dir: &Path) -> Result<Peers> {
        let path = data_dir.join("peers.json");
        let map = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<Vec<Peer>>(&b)
                .with_context(|| format!("{} is damaged", path.display()))?
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        Ok(Peers {
            path,
            map: RwLock::new(map),
        })
    }

    pub fn get(&self, name: &str) -> Option<Peer> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn by_fingerprint(&self, fp: &str) -> Option<Peer> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|p| p.fingerprint == fp)
            .cloned()
    }

    pub fn list(&self) -> Vec<Peer> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn upsert(&self, peer: Peer) -> Result<()> {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.insert(peer.name.clone(), peer);
        let list: Vec<&Peer> = map.values().collect();
        let bytes = serde_json::to_vec_pretty(&list)?;
        crate::agent::write_atomic_private(&self.path, &bytes)
    }
}
