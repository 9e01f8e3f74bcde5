//! `ferry witness --listen HOST:PORT --data-dir DIR`: the third voter of a
//! two-node cluster. Holds one small record per HA workload (who is primary,
//! who is outdated, an epoch) and lends leases; no data. The decisions are
//! `ferry_core::cluster::Witness`; this is its edge: UDP datagrams of JSON,
//! and each changed record written durably (temp file, fsync, rename, fsync
//! of the directory) *before* the reply leaves.
//!
//! Request: `{"workload": W, "lease_ms": L, "drift_permille": D, "req": WitnessRequest}`;
//! reply: `{"workload": W, "reply": WitnessReply}`.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use ferry_core::cluster::{Record, Timing, Witness, WitnessReply, WitnessRequest};
use serde::{Deserialize, Serialize};

/// Largest datagram read; anything longer is refused.
pub const DATAGRAM_BYTES_MAX: usize = 8192;
/// Workloads one witness keeps records for.
pub const WORKLOADS_MAX: usize = 4096;

#[derive(Debug, Serialize, Deserialize)]
pub struct ToWitness {
    pub workload: String,
    pub lease_ms: u64,
    pub drift_permille: u64,
    pub req: WitnessRequest,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FromWitness {
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

/// The witness state: records by workload.
pub struct WitnessServer {
    dir: PathBuf,
    started: Instant,
    slots: HashMap<String, Slot>,
}

impl std::fmt::Debug for WitnessServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessServer")
            .field("dir", &self.dir)
            .field("workloads", &self.slots.len())
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

impl WitnessServer {
    /// Loads every stored record; each starts its quiet period now.
    pub fn open(data_dir: &Path) -> Result<WitnessServer> {
        let dir = data_dir.join("records");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut s = WitnessServer {
            dir,
            started: Instant::now(),
            slots: HashMap::new(),
        };
        for e in std::fs::read_dir(&s.dir)? {
            let path = e?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let stored: Stored = serde_json::from_slice(&std::fs::read(&path)?)
                .with_context(|| format!("witness record {} is corrupt", path.display()))?;
            let t = timing(stored.lease_ms, stored.drift_permille);
            tracing::info!(workload = name, record = ?stored.record, "witness.record.loaded");
            s.slots.insert(
                name.to_string(),
                Slot {
                    witness: Witness::start(stored.record, t, s.now()),
                    timing: t,
                },
            );
        }
        Ok(s)
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Answers one request (or says why it cannot be answered).
    pub fn handle(&mut self, msg: &ToWitness) -> Result<FromWitness, String> {
        crate::volume::validate_name(&msg.workload).map_err(|e| e.to_string())?;
        let t = timing(msg.lease_ms, msg.drift_permille);
        t.validate().map_err(|e| format!("bad timing: {e}"))?;
        let now = self.now();
        if !self.slots.contains_key(&msg.workload) {
            if self.slots.len() >= WORKLOADS_MAX {
                return Err(format!(
                    "this witness already holds {WORKLOADS_MAX} records (WORKLOADS_MAX)"
                ));
            }
            // A record this witness does not hold: nothing was granted for
            // it here — but its data directory may have been lost, or this
            // is a replacement witness, so the quiet period after the
            // process started still applies.
            self.slots.insert(
                msg.workload.clone(),
                Slot {
                    witness: Witness::start(Record::default(), t, 0),
                    timing: t,
                },
            );
        }
        let path = self.dir.join(format!("{}.json", msg.workload));
        let slot = self.slots.get_mut(&msg.workload).expect("inserted above");
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
                    crate::agent::write_atomic_private(&path, &bytes)
                        .map_err(|e| format!("cannot persist the record: {e:#}"))
                });
            if let Err(e) = saved {
                slot.witness = before;
                return Err(e);
            }
            if changed {
                tracing::info!(workload = %msg.workload, node = %msg.req.node, op = ?msg.req.op,
                    record = ?reply.record, "witness.record.changed");
            }
        }
        Ok(FromWitness {
            workload: msg.workload.clone(),
            reply,
        })
    }
}

/// The shared key of `--key-file` / `cluster.witness_key_file`.
pub fn load_key(path: &Path) -> Result<ring::hmac::Key> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the witness key {}", path.display()))?;
    let text = text.trim();
    if text.len() < 16 {
        anyhow::bail!(
            "the witness key in {} is shorter than 16 characters",
            path.display()
        );
    }
    Ok(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        text.as_bytes(),
    ))
}

/// `tag || body` when keyed, else `body`.
pub fn seal(key: Option<&ring::hmac::Key>, body: Vec<u8>) -> Vec<u8> {
    match key {
        Some(k) => {
            let mut d = ring::hmac::sign(k, &body).as_ref().to_vec();
            d.extend_from_slice(&body);
            d
        }
        None => body,
    }
}

/// The body of a datagram, if its tag checks (or no key is used).
pub fn open<'a>(key: Option<&ring::hmac::Key>, d: &'a [u8]) -> Option<&'a [u8]> {
    match key {
        Some(k) => {
            if d.len() < 32 {
                return None;
            }
            ring::hmac::verify(k, &d[32..], &d[..32]).ok()?;
            Some(&d[32..])
        }
        None => Some(d),
    }
}

/// Runs the witness until SIGINT/SIGTERM.
pub fn run(listen: SocketAddr, data_dir: &Path, key_file: Option<&Path>) -> Result<()> {
    let key = key_file.map(load_key).transpose()?;
    let signals = crate::signals::Signals::block()?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let mut server = WitnessServer::open(data_dir)?;
    let sock = UdpSocket::bind(listen)
        .with_context(|| format!("cannot listen for witness requests on {listen}"))?;
    let local = sock.local_addr()?;
    tracing::info!(listen = %local, records = server.slots.len(), keyed = key.is_some(), "witness.started");
    println!(
        "{}",
        serde_json::json!({ "witness": local.to_string(), "records": server.slots.len() })
    );
    crate::flush_stdout();
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
                let Some(body) = open(key.as_ref(), &buf[..n]) else {
                    tracing::warn!(%from, "witness.refused: not signed with this witness's key");
                    continue;
                };
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
                            let _ = sock.send_to(&seal(key.as_ref(), bytes), from);
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
