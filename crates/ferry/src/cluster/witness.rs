//! `ferry witness --listen HOST:PORT --key-file FILE --data-dir DIR`: the
//! third voter of two-node clusters. Holds one small record per HA workload
//! of each cluster (who is primary, who is outdated, an epoch) and lends
//! leases; no data. The decisions are `ferry_core::cluster::Witness`; this
//! is its edge: UDP datagrams of JSON signed with the shared key
//! (HMAC-SHA256, mandatory), and each changed record written durably (temp
//! file, fsync, rename, fsync of the directory) *before* the reply leaves.
//!
//! Request: `{"cluster": C, "workload": W, "lease_ms": L, "drift_permille": D, "req": WitnessRequest}`;
//! reply: `{"cluster": C, "workload": W, "reply": WitnessReply}`. Records
//! live in `DIR/records/C/W.json`: two clusters sharing a witness never
//! share a record, whatever their workloads are called.
//!
//! Records of versions before cluster ids (`DIR/records/W.json`) are kept
//! as they are and adopted by the first cluster that asks for workload W
//! and whose requesting node or its peer the record names (or any, if it
//! names nobody): copied to that cluster's directory, and the old file
//! renamed `W.json.adopted`.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
#[cfg(test)]
use std::time::Duration;
use std::time::Instant;

use anyhow::{Context, Result};
use ferry_core::cluster::{Record, Timing, Witness, WitnessReply, WitnessRequest};
use serde::{Deserialize, Serialize};

/// Largest datagram read; anything longer is refused.
pub const DATAGRAM_BYTES_MAX: usize = 8192;
/// Workloads one witness keeps records for (all clusters together).
pub const WORKLOADS_MAX: usize = 4096;

/// How to make a key, for the errors that ask for one.
pub use crate::config::MAKE_KEY;

#[derive(Debug, Serialize, Deserialize)]
pub struct ToWitness {
    /// The cluster the workload belongs to (`cluster_id`).
    pub cluster: String,
    pub workload: String,
    pub lease_ms: u64,
    pub drift_permille: u64,
    pub req: WitnessRequest,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FromWitness {
    pub cluster: String,
    pub workload: String,
    pub reply: WitnessReply,
}

/// What is kept on disk per workload.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    record: Record,
    lease_ms: u64,
    drift_permille: u64,
}

struct Slot {
    witness: Witness,
    timing: Timing,
}

/// Audit chain heads kept per node (the newest, plus as many older ones
/// spaced out): enough to reveal a rewrite of any record up to the newest.
pub const AUDIT_HEADS_KEPT: usize = 32;

/// The witness state: records by (cluster id, workload).
pub struct WitnessServer {
    dir: PathBuf,
    /// Audit chain heads by (cluster id, node), loaded when first asked.
    audit: HashMap<(String, String), Vec<ferry_core::audit::Head>>,
    started: Instant,
    slots: HashMap<(String, String), Slot>,
    /// Records of the format before cluster ids, by workload, not yet
    /// adopted by a cluster.
    legacy: HashMap<String, Stored>,
    /// Picked at random at each start: the nonces requests must echo.
    nonce_key: u64,
}

impl std::fmt::Debug for WitnessServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessServer")
            .field("dir", &self.dir)
            .field("workloads", &self.slots.len())
            .field("legacy", &self.legacy.len())
            .finish()
    }
}

/// The witness needs only the lease and the drift bound (heartbeats are the
/// nodes' business).
fn timing(lease_ms: u64, drift_permille: u64) -> Timing {
    Timing {
        heartbeat_interval_ms: 1,
        failure_timeout_ms: lease_ms.max(2),
        lease_ms,
        drift_permille,
    }
}

/// Whether `id` is a cluster id: 32 lowercase hex digits.
pub fn valid_cluster_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `DIR/NAME.json` files as (NAME, record).
fn read_records(dir: &Path) -> Result<Vec<(String, Stored)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = e?.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        if !path.is_file() {
            continue;
        }
        let stored: Stored = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| format!("witness record {} is corrupt", path.display()))?;
        v.push((name.to_string(), stored));
    }
    Ok(v)
}

impl WitnessServer {
    /// Loads every stored record; each starts its quiet period now.
    pub fn open(data_dir: &Path) -> Result<WitnessServer> {
        let dir = data_dir.join("records");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut s = WitnessServer {
            dir,
            audit: HashMap::new(),
            started: Instant::now(),
            slots: HashMap::new(),
            legacy: HashMap::new(),
            nonce_key: crate::transport::identity::random_u64(),
        };
        for (name, stored) in read_records(&s.dir)? {
            tracing::warn!(workload = %name, record = ?stored.record, "witness.record.legacy: kept for the first cluster that asks for it");
            s.legacy.insert(name, stored);
        }
        for e in std::fs::read_dir(&s.dir)? {
            let path = e?.path();
            let Some(cluster) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !path.is_dir() || !valid_cluster_id(cluster) {
                continue;
            }
            for (name, stored) in read_records(&path)? {
                let t = timing(stored.lease_ms, stored.drift_permille);
                tracing::info!(cluster, workload = %name, record = ?stored.record, "witness.record.loaded");
                s.slots.insert(
                    (cluster.to_string(), name),
                    Slot {
                        witness: Witness::start(stored.record, t, 0, s.nonce_key),
                        timing: t,
                    },
                );
            }
        }
        Ok(s)
    }

    /// How many records this witness holds.
    pub fn records(&self) -> usize {
        self.slots.len() + self.legacy.len()
    }

    /// The record of an earlier format for `msg`'s workload, if it names
    /// the requesting node or its peer (or nobody): moved to `msg`'s
    /// cluster, durably, before it is used.
    fn adopt_legacy(&mut self, msg: &ToWitness, path: &Path) -> Result<Option<Stored>, String> {
        let Some(stored) = self.legacy.get(&msg.workload) else {
            return Ok(None);
        };
        let r = &stored.record;
        let names = [r.primary.as_deref(), r.outdated.as_deref()];
        let ours = names.iter().all(Option::is_none)
            || names
                .iter()
                .flatten()
                .any(|n| *n == msg.req.node || *n == msg.req.peer);
        if !ours {
            return Ok(None);
        }
        let bytes = serde_json::to_vec_pretty(stored).map_err(|e| e.to_string())?;
        crate::store::write_private(path, &bytes)
            .map_err(|e| format!("cannot persist the adopted record: {e:#}"))?;
        let old = self.dir.join(format!("{}.json", msg.workload));
        if let Err(e) = std::fs::rename(&old, old.with_extension("json.adopted")) {
            tracing::warn!(path = %old.display(), error = %e, "witness.record.adopted_not_renamed: remove it by hand, or another cluster may adopt it after a restart");
        }
        tracing::warn!(cluster = %msg.cluster, workload = %msg.workload, record = ?r, "witness.record.adopted: an earlier version's record now belongs to this cluster");
        Ok(self.legacy.remove(&msg.workload))
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Answers one request (or says why it cannot be answered).
    pub fn handle(&mut self, msg: &ToWitness) -> Result<FromWitness, String> {
        crate::volume::validate_name(&msg.workload).map_err(|e| e.to_string())?;
        if !valid_cluster_id(&msg.cluster) {
            return Err(format!("{:?} is not a cluster id", msg.cluster));
        }
        let t = timing(msg.lease_ms, msg.drift_permille);
        t.validate().map_err(|e| format!("bad timing: {e}"))?;
        let now = self.now();
        let key = (msg.cluster.clone(), msg.workload.clone());
        let cluster_dir = self.dir.join(&msg.cluster);
        let path = cluster_dir.join(format!("{}.json", msg.workload));
        if !self.slots.contains_key(&key) {
            if self.slots.len() >= WORKLOADS_MAX {
                return Err(format!(
                    "this witness already holds {WORKLOADS_MAX} records (WORKLOADS_MAX)"
                ));
            }
            std::fs::create_dir_all(&cluster_dir)
                .map_err(|e| format!("cannot create {}: {e}", cluster_dir.display()))?;
            // A record this witness does not hold: nothing was granted for
            // it here — but its data directory may have been lost, or this
            // is a replacement witness, so the quiet period after the
            // process started still applies (as for an adopted one).
            let record = self
                .adopt_legacy(msg, &path)?
                .map(|s| s.record)
                .unwrap_or_default();
            self.slots.insert(
                key.clone(),
                Slot {
                    witness: Witness::start(record, t, 0, self.nonce_key),
                    timing: t,
                },
            );
        }
        let slot = self.slots.get_mut(&key).expect("inserted above");
        let mut retimed = false;
        if slot.timing != t {
            // The nodes' lease settings changed: keep the longer for safety
            // of leases already granted, use the new ones from now on.
            slot.witness.set_timing(t);
            slot.timing = t;
            retimed = true;
        }
        // Applied to a copy, kept only once on disk: a grant the disk never
        // saw must not survive in memory either (after a restart the disk
        // would say otherwise).
        let before = slot.witness.clone();
        let (reply, changed) = slot.witness.handle(now, &msg.req);
        if changed || retimed {
            let stored = Stored {
                record: slot.witness.record.clone(),
                lease_ms: t.lease_ms,
                drift_permille: t.drift_permille,
            };
            let saved = serde_json::to_vec_pretty(&stored)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    crate::store::write_private(&path, &bytes)
                        .map_err(|e| format!("cannot persist the record: {e:#}"))
                });
            if let Err(e) = saved {
                slot.witness = before;
                return Err(e);
            }
            if changed {
                tracing::info!(cluster = %msg.cluster, workload = %msg.workload, node = %msg.req.node, op = ?msg.req.op,
                    record = ?reply.record, "witness.record.changed");
            }
        }
        Ok(FromWitness {
            cluster: msg.cluster.clone(),
            workload: msg.workload.clone(),
            reply,
        })
    }
}

impl WitnessServer {
    fn audit_path(&self, cluster: &str, node: &str) -> PathBuf {
        self.dir
            .parent()
            .unwrap_or(&self.dir)
            .join("audit")
            .join(cluster)
            .join(format!("{node}.json"))
    }

    /// A node's audit head exchange: keep `put` if it is newer than the
    /// last head held (durably, before the answer), answer every head
    /// held of that node's chain. Heads are kept in
    /// `DIR/audit/CLUSTER/NODE.json`.
    pub fn handle_audit(
        &mut self,
        ask: &ferry_core::audit::wire::Ask,
    ) -> Result<ferry_core::audit::wire::FromWitness, String> {
        use ferry_core::audit::{self as chain, wire, Head};
        crate::volume::validate_name(&ask.node).map_err(|e| e.to_string())?;
        if !valid_cluster_id(&ask.cluster) {
            return Err(format!("{:?} is not a cluster id", ask.cluster));
        }
        let key = (ask.cluster.clone(), ask.node.clone());
        let path = self.audit_path(&ask.cluster, &ask.node);
        if !self.audit.contains_key(&key) {
            if self.audit.len() >= WORKLOADS_MAX {
                return Err(format!(
                    "this witness already holds audit heads of {WORKLOADS_MAX} nodes (WORKLOADS_MAX)"
                ));
            }
            let heads: Vec<wire::WireHead> = match std::fs::read(&path) {
                Ok(b) => serde_json::from_slice(&b)
                    .map_err(|e| format!("{} is damaged: {e}", path.display()))?,
                Err(_) => Vec::new(),
            };
            let heads = heads
                .iter()
                .filter_map(|h| {
                    Some(Head {
                        seq: h.seq,
                        hash: chain::parse_hex(&h.hash)?,
                    })
                })
                .collect();
            self.audit.insert(key.clone(), heads);
        }
        let heads = self.audit.get_mut(&key).expect("inserted above");
        let mut kept = None;
        if let Some(p) = &ask.put {
            let head = Head {
                seq: p.seq,
                hash: chain::parse_hex(&p.hash).ok_or("hash: 64 hex digits")?,
            };
            let mut next = heads.clone();
            let took = chain::keep_head(&mut next, head, AUDIT_HEADS_KEPT);
            if took {
                let wire: Vec<wire::WireHead> = next
                    .iter()
                    .map(|h| wire::WireHead {
                        seq: h.seq,
                        hash: chain::hex(&h.hash),
                    })
                    .collect();
                if let Some(d) = path.parent() {
                    std::fs::create_dir_all(d)
                        .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
                }
                let bytes = serde_json::to_vec(&wire).map_err(|e| e.to_string())?;
                crate::store::write_private(&path, &bytes)
                    .map_err(|e| format!("cannot persist the audit heads: {e:#}"))?;
                *heads = next;
            } else if heads
                .last()
                .is_some_and(|l| l.seq == head.seq && l.hash != head.hash)
            {
                tracing::error!(cluster = %ask.cluster, node = %ask.node, head = %head,
                    "witness.audit_head_conflict: another hash for a head held here: that node's chain was rewritten");
            } else if heads.last() != Some(&head) {
                tracing::warn!(cluster = %ask.cluster, node = %ask.node, head = %head,
                    "witness.audit_head_not_newer: kept the heads held");
            }
            kept = Some(took);
        }
        Ok(wire::FromWitness {
            audit_heads: wire::Held {
                cluster: ask.cluster.clone(),
                node: ask.node.clone(),
                nonce: ask.nonce,
                kept,
                heads: heads
                    .iter()
                    .map(|h| wire::WireHead {
                        seq: h.seq,
                        hash: chain::hex(&h.hash),
                    })
                    .collect(),
            },
        })
    }
}

/// The shared key of `--key-file` / `cluster.witness_key_file`: at least
/// 16 characters, in a file no one but its owner may read or write.
pub fn load_key(path: &Path) -> Result<ring::hmac::Key> {
    let text = crate::transport::identity::read_secret(path)
        .with_context(|| format!("the witness key {}; {MAKE_KEY}", path.display()))?;
    let text = text.trim();
    if text.len() < 16 {
        anyhow::bail!(
            "the witness key in {} is shorter than 16 characters; {MAKE_KEY}",
            path.display()
        );
    }
    Ok(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        text.as_bytes(),
    ))
}

/// `tag || body`.
pub fn seal(key: &ring::hmac::Key, body: Vec<u8>) -> Vec<u8> {
    let mut d = ring::hmac::sign(key, &body).as_ref().to_vec();
    d.extend_from_slice(&body);
    d
}

/// The body of a datagram, if its tag checks.
pub fn open<'a>(key: &ring::hmac::Key, d: &'a [u8]) -> Option<&'a [u8]> {
    if d.len() < 32 {
        return None;
    }
    ring::hmac::verify(key, &d[32..], &d[..32]).ok()?;
    Some(&d[32..])
}

/// Runs the witness until SIGINT/SIGTERM. The key is mandatory.
pub fn run(listen: SocketAddr, data_dir: &Path, key_file: Option<&Path>) -> Result<()> {
    let key_file = key_file.ok_or_else(|| {
        anyhow::anyhow!("`ferry witness` needs --key-file FILE: every request and reply is signed with that shared key; {MAKE_KEY}")
    })?;
    let key = load_key(key_file)?;
    let signals = crate::sys::signals::Signals::block()?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let mut server = WitnessServer::open(data_dir)?;
    let sock = UdpSocket::bind(listen)
        .with_context(|| format!("cannot listen for witness requests on {listen}"))?;
    let local = sock.local_addr()?;
    tracing::info!(listen = %local, records = server.records(), "witness.started");
    println!(
        "{}",
        serde_json::json!({ "witness": local.to_string(), "records": server.records() })
    );
    crate::sys::out::flush_stdout();
    std::thread::Builder::new()
        .name("witness".into())
        .spawn(move || {
            let mut buf = vec![0u8; DATAGRAM_BYTES_MAX + 1];
            loop {
                let (n, from) = match sock.recv_from(&mut buf) {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "witness.recv_failed");
                        continue;
                    }
                };
                if n > DATAGRAM_BYTES_MAX {
                    tracing::warn!(%from, "witness.refused: datagram longer than DATAGRAM_BYTES_MAX");
                    continue;
                }
                let Some(body) = open(&key, &buf[..n]) else {
                    tracing::warn!(%from, "witness.refused: not signed with this witness's key");
                    continue;
                };
                // An audit head exchange (a message of its own: a witness
                // of an earlier release refuses it and answers nothing).
                if let Ok(a) = serde_json::from_slice::<ferry_core::audit::wire::ToWitness>(body) {
                    match server.handle_audit(&a.audit) {
                        Ok(reply) => {
                            if let Ok(bytes) = serde_json::to_vec(&reply) {
                                let _ = sock.send_to(&seal(&key, bytes), from);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%from, node = %a.audit.node, error = %e, "witness.audit_refused")
                        }
                    }
                    continue;
                }
                let msg: ToWitness = match serde_json::from_slice(body) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(%from, error = %e, "witness.refused: not a witness request");
                        continue;
                    }
                };
                match server.handle(&msg) {
                    Ok(reply) => {
                        if let Ok(bytes) = serde_json::to_vec(&reply) {
                            let _ = sock.send_to(&seal(&key, bytes), from);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%from, workload = %msg.workload, error = %e, "witness.refused")
                    }
                }
            }
        })?;
    let sig = signals.wait()?;
    tracing::info!(signal = sig, "witness.stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::cluster::{Refusal, WitnessOp};

    const LEASE_MS: u64 = 20;

    fn msg(cluster: &str, node: &str, op: WitnessOp, sent_at: u64, nonce: u64) -> ToWitness {
        ToWitness {
            cluster: cluster.into(),
            workload: "web".into(),
            lease_ms: LEASE_MS,
            drift_permille: 50,
            req: WitnessRequest {
                node: node.into(),
                peer: if node == "a" { "b" } else { "a" }.into(),
                op,
                sent_at,
                incarnation: 1,
                nonce,
                expect_epoch: 0,
            },
        }
    }

    /// Asks as a node does: a first request with no nonce learns it.
    fn ask(
        w: &mut WitnessServer,
        cluster: &str,
        node: &str,
        op: WitnessOp,
        at: u64,
    ) -> WitnessReply {
        let r = w.handle(&msg(cluster, node, op, at, 0)).unwrap().reply;
        assert_eq!(r.refused, Some(Refusal::Nonce));
        let r = w.handle(&msg(cluster, node, op, at + 1, r.nonce)).unwrap();
        assert_eq!(r.cluster, cluster);
        r.reply
    }

    /// Past the quiet period a (re)started witness keeps.
    fn after_quiet() {
        std::thread::sleep(Duration::from_millis(3 * LEASE_MS));
    }

    #[test]
    fn two_clusters_with_the_same_workload_and_node_names_have_separate_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WitnessServer::open(dir.path()).unwrap();
        let (x, y) = ("0".repeat(32), "f".repeat(32));
        after_quiet();
        // In cluster x, a claims the empty record; in cluster y, b does.
        let r = ask(&mut w, &x, "a", WitnessOp::Renew, 10);
        assert_eq!(r.refused, None);
        assert_eq!(r.record.primary.as_deref(), Some("a"));
        let r = ask(&mut w, &y, "b", WitnessOp::Renew, 10);
        assert_eq!(r.refused, None, "cluster y saw cluster x's record");
        assert_eq!(r.record.primary.as_deref(), Some("b"));
        // A promotion in y moves nothing in x.
        let r = ask(&mut w, &x, "a", WitnessOp::Renew, 20);
        assert_eq!(r.refused, None);
        assert_eq!(r.record.primary.as_deref(), Some("a"));
        for (c, primary) in [(&x, "a"), (&y, "b")] {
            let path = dir.path().join(format!("records/{c}/web.json"));
            let stored: Stored = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            assert_eq!(stored.record.primary.as_deref(), Some(primary));
        }
        // Records come back keyed the same way after a restart.
        let w = WitnessServer::open(dir.path()).unwrap();
        assert_eq!(w.records(), 2);
    }

    #[test]
    fn a_record_of_the_format_before_cluster_ids_is_adopted_by_the_cluster_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let records = dir.path().join("records");
        std::fs::create_dir_all(&records).unwrap();
        let old = Stored {
            record: Record {
                epoch: 7,
                primary: Some("a".into()),
                outdated: Some("b".into()),
            },
            lease_ms: LEASE_MS,
            drift_permille: 50,
        };
        std::fs::write(records.join("web.json"), serde_json::to_vec(&old).unwrap()).unwrap();
        let mut w = WitnessServer::open(dir.path()).unwrap();
        let (x, y) = ("1".repeat(32), "2".repeat(32));
        after_quiet();
        // Cluster y's nodes are not named in it: a record of its own.
        let mut m = msg(&y, "c", WitnessOp::Renew, 1, 0);
        m.req.peer = "d".into();
        let nonce = w.handle(&m).unwrap().reply.nonce;
        m.req.sent_at = 2;
        m.req.nonce = nonce;
        let r = w.handle(&m).unwrap().reply;
        assert_eq!(r.record.primary.as_deref(), Some("c"));
        // Cluster x's b is: x adopts it, outdated b included.
        let r = ask(&mut w, &x, "b", WitnessOp::Promote, 10);
        assert_eq!(r.refused, Some(Refusal::Outdated));
        assert_eq!(r.record.epoch, 7);
        assert!(records.join(format!("{x}/web.json")).exists());
        assert!(records.join("web.json.adopted").exists());
        assert!(!records.join("web.json").exists());
    }

    #[test]
    fn replays_and_duplicates_of_a_request_do_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WitnessServer::open(dir.path()).unwrap();
        let x = "3".repeat(32);
        after_quiet();
        let r = ask(&mut w, &x, "a", WitnessOp::Renew, 10);
        assert_eq!(r.refused, None);
        let renew = msg(&x, "a", WitnessOp::Renew, 11, r.nonce);
        let r = w.handle(&renew).unwrap().reply;
        assert_eq!(r.refused, Some(Refusal::Stale), "an exact duplicate");
        // A restarted witness has other nonces: an old request is refused.
        let mut w = WitnessServer::open(dir.path()).unwrap();
        let r = w.handle(&renew).unwrap().reply;
        assert_eq!(r.refused, Some(Refusal::Nonce), "a replay after a restart");
    }

    #[test]
    fn audit_heads_are_kept_durably_and_never_go_back() {
        use ferry_core::audit::wire::{Ask, WireHead};
        let dir = tempfile::tempdir().unwrap();
        let mut w = WitnessServer::open(dir.path()).unwrap();
        let x = "4".repeat(32);
        let ask = |seq: Option<u64>| Ask {
            cluster: x.clone(),
            node: "a".into(),
            put: seq.map(|seq| WireHead {
                seq,
                hash: "ab".repeat(32),
            }),
            nonce: 7,
        };
        let r = w.handle_audit(&ask(Some(5))).unwrap().audit_heads;
        assert_eq!((r.kept, r.nonce, r.heads.len()), (Some(true), 7, 1));
        let r = w.handle_audit(&ask(Some(3))).unwrap().audit_heads;
        assert_eq!(r.kept, Some(false), "a head that goes back is not kept");
        // After a restart the heads are still there.
        let mut w = WitnessServer::open(dir.path()).unwrap();
        let r = w.handle_audit(&ask(None)).unwrap().audit_heads;
        assert_eq!(r.heads.iter().map(|h| h.seq).collect::<Vec<_>>(), [5]);
        assert!(w
            .handle_audit(&Ask {
                node: "../x".into(),
                ..ask(None)
            })
            .is_err());
    }

    #[test]
    fn the_key_must_be_private_and_present() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.key");
        std::fs::write(&path, "0123456789abcdef-key\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", load_key(&path).unwrap_err());
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        load_key(&path).unwrap();
        let e = format!(
            "{:#}",
            run("127.0.0.1:0".parse().unwrap(), dir.path(), None).unwrap_err()
        );
        assert!(e.contains("--key-file") && e.contains("urandom"), "{e}");
    }
}
