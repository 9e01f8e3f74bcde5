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
    /// Read from peer records of earlier versions and dropped: a peer is
    /// now called with mutual TLS, authenticated by its certificate.
    #[serde(default, skip_serializing)]
    pub token: String,
    /// The certificate this peer had before `ferry node rekey`, accepted
    /// too until the peer says it uses the new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_fingerprint: Option<String>,
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
    /// Loads `peers.json` (it holds secrets: refused if others can read
    /// it). Each peer is read on its own: a damaged entry, or a damaged
    /// file, is reported in the second value and the rest is used; the
    /// damaged file is first copied to `peers.json.damaged` (the next
    /// registration rewrites `peers.json` without what could not be read).
    pub fn load(data_dir: &Path) -> Result<(Peers, Vec<String>)> {
        let path = data_dir.join("peers.json");
        let mut damaged = Vec::new();
        let map = match path.try_exists() {
            Ok(false) => BTreeMap::new(),
            _ => {
                let text = super::identity::read_secret(&path)?;
                let mut upgraded = false;
                let entries = match crate::store::decode::<PeerList>(&path, text.as_bytes()) {
                    Ok(d) => {
                        upgraded = d.upgraded_from.is_some();
                        d.record.0
                    }
                    Err(e) => {
                        damaged.push(format!("{e}"));
                        Vec::new()
                    }
                };
                let mut map = BTreeMap::new();
                for (i, v) in entries.into_iter().enumerate() {
                    match serde_json::from_value::<Peer>(v) {
                        Ok(p) => {
                            map.insert(p.name.clone(), p);
                        }
                        Err(e) => damaged.push(format!("peer #{i} of {}: {e}", path.display())),
                    }
                }
                if !damaged.is_empty() {
                    let aside = data_dir.join("peers.json.damaged");
                    crate::store::write_private(&aside, text.as_bytes())
                        .with_context(|| format!("cannot keep {} aside", path.display()))?;
                } else if upgraded {
                    // Written before issue 19: in the envelope from now on.
                    let list: Vec<&Peer> = map.values().collect();
                    crate::store::save(&path, &PeerList::of(&list)?)?;
                    tracing::info!(path = %path.display(), "store.upgraded");
                }
                map
            }
        };
        Ok((
            Peers {
                path,
                map: RwLock::new(map),
            },
            damaged,
        ))
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
            .find(|p| p.fingerprint == fp || p.previous_fingerprint.as_deref() == Some(fp))
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
        Ok(crate::store::save(&self.path, &PeerList::of(&list)?)?)
    }
}

/// `peers.json` as stored: its entries read one by one (a damaged entry
/// does not hide the others).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
struct PeerList(Vec<serde_json::Value>);

impl PeerList {
    fn of(list: &[&Peer]) -> Result<PeerList> {
        Ok(PeerList(
            list.iter()
                .map(serde_json::to_value)
                .collect::<Result<_, _>>()?,
        ))
    }
}

impl crate::store::Record for PeerList {
    const KIND: &'static str = "peers";
}
