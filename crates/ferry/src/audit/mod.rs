//! The audit log on disk: `DATA_DIR/audit/audit.log` (0600, in a 0700
//! directory), one append-only file of frames of ferry-core's
//! [`ferry_core::audit`] chain, each a JSON record (who, from where, when,
//! the request, the result; or an automatic decision) carrying the BLAKE3
//! hash of the one before.
//!
//! - **Operator actions** ([`AuditLog::append`]) are written and
//!   `fdatasync`ed before the call returns; the caller (the agent's
//!   dispatch) refuses the action if that fails.
//! - **Automatic decisions** ([`AuditLog::decide`]) go into a bounded queue
//!   (`audit.queue_max`) read by the `audit-writer` thread: the heartbeat
//!   thread never waits for the disk. A full queue drops the record and
//!   counts it; the next record written says how many were dropped — never
//!   a silent gap.
//! - **At start** a torn tail (an append a crash interrupted: an
//!   incomplete frame, or zeros) is truncated and a `torn-tail` record
//!   saying what was cut is appended. Damage that is not a torn tail is
//!   left in place for `ferry audit verify` to report.
//! - **Retention**: past `audit.log_bytes_max` the oldest records go; the
//!   file is rewritten (temp, fsync, rename, fsync of the directory) as a
//!   checkpoint (the pruned prefix's head) followed by the newest half,
//!   and a `pruned` record naming the checkpoint is appended.
//! - **Heads held for others** ([`HeldHeads`]): the chain heads a peer sent
//!   us (`DATA_DIR/audit/held/NODE.json`), a bounded history.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use ferry_core::audit::{self as chain, Head, TailKind};
use serde::Deserialize;
use serde_json::{json, Value};

/// `[audit]`: the audit log's limits, each with its unit.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// The log file is pruned (oldest records first, a checkpoint kept)
    /// once it grows past this many bytes.
    pub log_bytes_max: u64,
    /// How often this node sends its chain head to its peers and its
    /// witness.
    pub head_interval_ms: u64,
    /// Automatic decisions waiting for the writer thread; more are dropped
    /// (and counted in the next record).
    pub queue_max: usize,
    /// Recent heads a holder keeps per node (plus as many older ones,
    /// spaced out).
    pub heads_kept: usize,
    /// Failed console logins recorded per minute; more are counted and the
    /// count goes into the next one recorded (a flood of bad tokens must
    /// not push the real records out of a log pruned by size).
    pub failed_logins_per_minute_max: u32,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            log_bytes_max: 64 << 20,
            head_interval_ms: 60_000,
            queue_max: 4096,
            heads_kept: 32,
            failed_logins_per_minute_max: 20,
        }
    }
}

impl AuditSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.log_bytes_max < 64 * 1024 {
            return Err("audit.log_bytes_max must be at least 65536".into());
        }
        if self.head_interval_ms < 10 {
            return Err("audit.head_interval_ms must be at least 10".into());
        }
        if self.queue_max == 0 || self.heads_kept == 0 || self.failed_logins_per_minute_max == 0 {
            return Err("audit.queue_max, audit.heads_kept and audit.failed_logins_per_minute_max must be at least 1".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the audit log {path} cannot be written: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the audit log {path} cannot be written: {why} (free space or fix the disk; the next action tries again)")]
    Failed { path: PathBuf, why: String },
}

struct Writer {
    file: File,
    head: Head,
    bytes: u64,
    /// Decisions dropped by a full queue, not yet reported in a record.
    dropped: u64,
    /// A write failed: the next write first reopens the log from what is
    /// on disk (`recover`), so no record follows a half-written one.
    failed: Option<String>,
}

/// This node's audit log.
pub struct AuditLog {
    dir: PathBuf,
    path: PathBuf,
    node: String,
    settings: AuditSettings,
    w: Mutex<Writer>,
    tx: SyncSender<Value>,
    rx: Mutex<Option<Receiver<Value>>>,
    dropped: AtomicU64,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish()
    }
}

/// `DATA_DIR/audit`.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("audit")
}

/// `DATA_DIR/audit/audit.log`.
pub fn log_path(data_dir: &Path) -> PathBuf {
    dir(data_dir).join("audit.log")
}

/// Now, RFC 3339 (UTC), and in Unix milliseconds.
fn now() -> (String, i64) {
    let t = jiff::Timestamp::now();
    (t.to_string(), t.as_millisecond())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A random operation id (16 hex digits): ties an action's request and
/// result records together, and both nodes' records of one handover.
pub fn new_op_id() -> String {
    let mut b = [0u8; 8];
    // Without randomness the time is unique enough for an id.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        b = (now().1 as u64).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An automatic decision's record: what was decided (`failover-started`,
/// `fenced`, `promoted`, `resigned`, `split-brain-verdict`, `throttle`,
/// `auto-cutover`, `scheduled-cutover`, …), for which workload, the
/// details, and the operation id it shares with the peer's records.
pub fn decision(what: &str, workload: &str, detail: Value, op: Option<&str>) -> Value {
    json!({"kind": "decision", "decision": what, "workload": workload, "detail": detail, "op": op})
}

impl AuditLog {
    /// Opens (or creates) the log: a torn tail is truncated and recorded.
    pub fn open(
        data_dir: &Path,
        node: &str,
        settings: AuditSettings,
    ) -> Result<Arc<AuditLog>, AuditError> {
        let dir = dir(data_dir);
        let path = log_path(data_dir);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&path)(e)),
        };
        let parsed = chain::parse(&bytes);
        let mut torn = None;
        if let Some(t) = parsed.tail.as_ref().filter(|t| t.kind == TailKind::Torn) {
            tracing::warn!(path = %path.display(), offset = t.offset, bytes = t.bytes,
                "audit.torn_tail: an append a crash interrupted; truncated (a torn-tail record says so)");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            f.set_len(t.offset).map_err(io(&path))?;
            f.sync_all().map_err(io(&path))?;
            torn = Some(t.clone());
        } else if let Some(t) = &parsed.tail {
            tracing::error!(path = %path.display(), offset = t.offset, bytes = t.bytes,
                "audit.damaged: bytes that are not a record; left in place (ferry audit verify reports them)");
        }
        let head = parsed.frames.last().map(|f| f.head()).unwrap_or_default();
        let file = open_append(&path).map_err(io(&path))?;
        sync_dir(&dir).map_err(io(&dir))?;
        let len = file.metadata().map_err(io(&path))?.len();
        let (tx, rx) = sync_channel(settings.queue_max);
        let log = Arc::new(AuditLog {
            dir,
            path,
            node: node.to_string(),
            settings,
            w: Mutex::new(Writer {
                file,
                head,
                bytes: len,
                dropped: 0,
                failed: None,
            }),
            tx,
            rx: Mutex::new(Some(rx)),
            dropped: AtomicU64::new(0),
        });
        if let Some(t) = torn {
            log.append(json!({"kind": "torn-tail", "offset": t.offset, "bytes": t.bytes,
                "after_seq": head.seq,
                "why": "an append interrupted by a crash (never acknowledged: an action's record is durable before its reply)"}))?;
        }
        Ok(log)
    }

    pub fn settings(&self) -> &AuditSettings {
        &self.settings
    }

    /// The chain's head.
    pub fn head(&self) -> Head {
        self.lock().head
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.w.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `record` (a JSON object; `time` and `node` are added) and
    /// makes it durable before returning its head.
    pub fn append(&self, record: Value) -> Result<Head, AuditError> {
        let mut w = self.lock();
        let h = self.write(&mut w, vec![record])?;
        self.prune_if_due(&mut w)?;
        Ok(h)
    }

    /// Queues an automatic decision for the writer thread; never blocks.
    pub fn decide(&self, record: Value) {
        match self.tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Starts the `audit-writer` thread (once) that writes queued decisions.
    pub fn spawn_writer(self: &Arc<Self>) -> std::io::Result<()> {
        let Some(rx) = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(());
        };
        let log = self.clone();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    let mut w = log.lock();
                    let r = log
                        .write(&mut w, batch)
                        .and_then(|_| log.prune_if_due(&mut w));
                    if let Err(e) = r {
                        tracing::error!(error = %e, "audit.decision_not_recorded");
                    }
                }
            })?;
        Ok(())
    }

    /// Writes `records` and syncs once.
    fn write(&self, w: &mut Writer, records: Vec<Value>) -> Result<Head, AuditError> {
        let mut records = records;
        if let Some(why) = w.failed.clone() {
            // Try again from what is on disk: cut what the failed append
            // left half-written, take the head from the last whole record,
            // and say so in the first record written after.
            let note = self.recover(w).map_err(|e| AuditError::Failed {
                path: self.path.clone(),
                why: format!("{why}; reopening failed: {e}"),
            })?;
            records.insert(
                0,
                json!({"kind": "write-failed", "why": why, "torn_bytes_cut": note,
                    "note": "a write failed (its action was refused or its result reported as not recorded); the log was reopened"}),
            );
        }
        let mut buf = Vec::new();
        let mut head = w.head;
        let dropped = self.dropped.swap(0, Ordering::Relaxed) + w.dropped;
        if dropped > 0 {
            records.insert(
                0,
                json!({"kind": "dropped", "decisions": dropped,
                "why": "the decision queue was full (audit.queue_max)"}),
            );
        }
        let (time, ms) = now();
        for mut r in records {
            if let Value::Object(m) = &mut r {
                m.insert("time".into(), json!(time));
                m.insert("time_ms".into(), json!(ms));
                m.insert("node".into(), json!(self.node));
            }
            let payload = serde_json::to_vec(&r).unwrap_or_default();
            let (bytes, hash) = chain::encode_record(head.seq + 1, &head.hash, &payload);
            buf.extend(bytes);
            head = Head {
                seq: head.seq + 1,
                hash,
            };
        }
        let res = w.file.write_all(&buf).and_then(|()| w.file.sync_data());
        if let Err(e) = res {
            // What reached the disk is unknown: close the log (a restart
            // truncates a torn tail and says so).
            w.failed = Some(e.to_string());
            w.dropped = dropped;
            return Err(io(&self.path)(e));
        }
        w.dropped = 0;
        w.head = head;
        w.bytes += buf.len() as u64;
        Ok(head)
    }

    /// After a failed write: truncates a torn tail, takes the head from
    /// the last whole record and reopens the file. Returns the bytes cut.
    fn recover(&self, w: &mut Writer) -> std::io::Result<u64> {
        let bytes = std::fs::read(&self.path)?;
        let parsed = chain::parse(&bytes);
        let mut cut = 0;
        let mut len = bytes.len() as u64;
        if let Some(t) = parsed.tail.as_ref().filter(|t| t.kind == TailKind::Torn) {
            let f = std::fs::OpenOptions::new().write(true).open(&self.path)?;
            f.set_len(t.offset)?;
            f.sync_all()?;
            cut = t.bytes;
            len = t.offset;
        }
        w.file = open_append(&self.path)?;
        w.head = parsed.frames.last().map(|f| f.head()).unwrap_or_default();
        w.bytes = len;
        w.failed = None;
        tracing::warn!(path = %self.path.display(), cut, "audit.reopened after a failed write");
        Ok(cut)
    }

    /// Past `log_bytes_max`: keep the newest half behind a checkpoint.
    fn prune_if_due(&self, w: &mut Writer) -> Result<(), AuditError> {
        if w.bytes <= self.settings.log_bytes_max {
            return Ok(());
        }
        let bytes = std::fs::read(&self.path).map_err(io(&self.path))?;
        let parsed = chain::parse(&bytes);
        let Some(cut) = chain::prune_point(&parsed.frames, self.settings.log_bytes_max / 2) else {
            return Ok(());
        };
        let pruned = parsed.frames[cut - 1].head();
        let (time, _) = now();
        let mut out = chain::encode_checkpoint(
            pruned,
            json!({"time": time, "why": "audit.log_bytes_max"})
                .to_string()
                .as_bytes(),
        );
        let from = parsed.frames[cut].offset as usize;
        out.extend_from_slice(&bytes[from..]);
        crate::store::write_private(&self.path, &out).map_err(|e| AuditError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(format!("{e:#}")),
        })?;
        w.file = open_append(&self.path).map_err(io(&self.path))?;
        w.bytes = out.len() as u64;
        tracing::info!(pruned = %pruned, "audit.pruned");
        self.write(
            w,
            vec![json!({"kind": "pruned", "checkpoint_seq": pruned.seq,
                "checkpoint_hash": chain::hex(&pruned.hash), "log_bytes_max": self.settings.log_bytes_max})],
        )?;
        Ok(())
    }

    /// The log's bytes as they are on disk now.
    pub fn read(&self) -> Result<Vec<u8>, AuditError> {
        let _w = self.lock();
        std::fs::read(&self.path).map_err(io(&self.path))
    }

    /// Where heads held for other nodes are kept.
    pub fn held(&self) -> HeldHeads {
        HeldHeads {
            dir: self.dir.join("held"),
            recent: self.settings.heads_kept,
        }
    }
}

/// The heads of other nodes' chains this node keeps (their peer).
#[derive(Debug, Clone)]
pub struct HeldHeads {
    dir: PathBuf,
    recent: usize,
}

#[derive(serde::Serialize, Deserialize, Default)]
struct HeldFile {
    heads: Vec<(u64, String)>,
}

impl HeldHeads {
    fn path(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.json"))
    }

    /// The heads held of `node`'s chain, oldest first.
    pub fn get(&self, node: &str) -> Vec<Head> {
        let Ok(bytes) = std::fs::read(self.path(node)) else {
            return Vec::new();
        };
        let f: HeldFile = serde_json::from_slice(&bytes).unwrap_or_default();
        f.heads
            .into_iter()
            .filter_map(|(seq, h)| {
                Some(Head {
                    seq,
                    hash: chain::parse_hex(&h)?,
                })
            })
            .collect()
    }

    /// Keeps `head` of `node`'s chain (durably); false if it is not newer
    /// than the last one held.
    pub fn put(&self, node: &str, head: Head) -> anyhow::Result<bool> {
        ferry_core::Name::parse(node)?;
        let mut heads = self.get(node);
        if !chain::keep_head(&mut heads, head, self.recent) {
            return Ok(false);
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let f = HeldFile {
            heads: heads.iter().map(|h| (h.seq, chain::hex(&h.hash))).collect(),
        };
        crate::store::write_private(&self.path(node), &serde_json::to_vec(&f)?)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AuditSettings {
        AuditSettings {
            log_bytes_max: 64 * 1024,
            ..AuditSettings::default()
        }
    }

    #[test]
    fn appends_survive_a_reopen_and_a_torn_tail_is_cut_and_recorded() {
        let d = tempfile::tempdir().unwrap();
        let log = AuditLog::open(d.path(), "a", settings()).unwrap();
        for i in 0..3 {
            log.append(json!({"kind": "action", "i": i})).unwrap();
        }
        let head = log.head();
        assert_eq!(head.seq, 3);
        drop(log);
        // A crash mid-append: half a frame at the end.
        let path = log_path(d.path());
        let (frame, _) = chain::encode_record(4, &head.hash, b"{\"kind\":\"x\"}");
        let mut f = open_append(&path).unwrap();
        f.write_all(&frame[..30]).unwrap();
        let log = AuditLog::open(d.path(), "a", settings()).unwrap();
        assert_eq!(log.head().seq, 4, "the torn-tail record follows record 3");
        let p = chain::parse(&log.read().unwrap());
        assert_eq!(p.tail, None);
        chain::verify(&p, &[]).unwrap();
        let last: Value = serde_json::from_slice(&p.frames[3].payload).unwrap();
        assert_eq!(last["kind"], "torn-tail");
        assert_eq!(last["bytes"], 30);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn the_log_is_pruned_by_size_and_still_verifies() {
        let d = tempfile::tempdir().unwrap();
        let log = AuditLog::open(d.path(), "a", settings()).unwrap();
        let mut heads = Vec::new();
        for i in 0..400 {
            let h = log
                .append(json!({"kind": "action", "i": i, "pad": "x".repeat(300)}))
                .unwrap();
            heads.push(chain::HeldHead {
                holder: "peer".into(),
                head: h,
            });
        }
        let bytes = log.read().unwrap();
        assert!(bytes.len() as u64 <= 64 * 1024 + 1024, "{}", bytes.len());
        let p = chain::parse(&bytes);
        let v = chain::verify(&p, &heads).unwrap();
        let cp = v.checkpoint.expect("pruned");
        assert!(cp.seq > 100);
        assert!(v.heads_pruned > 0 && v.heads_matched > 0);
        let last: Value = serde_json::from_slice(&p.frames.last().unwrap().payload).unwrap();
        assert_eq!(last["i"], 399);
    }

    #[test]
    fn decisions_are_written_by_the_writer_thread_and_drops_are_counted() {
        let d = tempfile::tempdir().unwrap();
        let s = AuditSettings {
            queue_max: 2,
            ..settings()
        };
        let log = AuditLog::open(d.path(), "a", s).unwrap();
        for i in 0..5 {
            log.decide(json!({"kind": "decision", "i": i}));
        }
        log.spawn_writer().unwrap();
        let t = std::time::Instant::now();
        while log.head().seq < 2 && t.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        log.append(json!({"kind": "action"})).unwrap();
        let p = chain::parse(&log.read().unwrap());
        let kinds: Vec<Value> = p
            .frames
            .iter()
            .map(|f| serde_json::from_slice::<Value>(&f.payload).unwrap())
            .collect();
        let dropped: u64 = kinds
            .iter()
            .filter(|k| k["kind"] == "dropped")
            .map(|k| k["decisions"].as_u64().unwrap())
            .sum();
        let decided = kinds.iter().filter(|k| k["kind"] == "decision").count() as u64;
        assert_eq!(decided + dropped, 5, "{kinds:?}");
        assert_eq!(dropped, 3);
    }

    #[test]
    fn held_heads_are_kept_newest_last_and_never_go_back() {
        let d = tempfile::tempdir().unwrap();
        let h = HeldHeads {
            dir: d.path().join("held"),
            recent: 4,
        };
        assert!(h
            .put(
                "b",
                Head {
                    seq: 3,
                    hash: [3; 32]
                }
            )
            .unwrap());
        assert!(!h
            .put(
                "b",
                Head {
                    seq: 2,
                    hash: [2; 32]
                }
            )
            .unwrap());
        assert!(h
            .put(
                "b",
                Head {
                    seq: 9,
                    hash: [9; 32]
                }
            )
            .unwrap());
        assert_eq!(h.get("b").iter().map(|h| h.seq).collect::<Vec<_>>(), [3, 9]);
        assert!(h.get("c").is_empty());
        assert!(h.put("../x", Head::default()).is_err());
    }
}
