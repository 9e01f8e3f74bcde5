//! The statistics history on disk: one file per series,
//! `DATA_DIR/history/SCOPE/NAME/METRIC.ring`, holding the three rings of
//! [`ferry_core::history`] back to back (10 s, 1 min, 1 h) — exactly
//! [`SERIES_BYTES_MAX`] = 1,454,400 bytes, created sparse and never grown.
//!
//! Why fixed rings rather than an append log compacted by tier: a ring
//! needs no compaction (no second copy, no rewrite that a crash could
//! interrupt), its size is fixed at creation (the bound holds by
//! construction, whatever the uptime or the clock does), and a sample is
//! three 24-byte `pwrite`s in place. Every record carries its own time and
//! a CRC-32C seeded with its series and tier, so what a crash can leave —
//! a torn record, a slot of an earlier lap, a never-written hole — reads
//! as a gap, never as a sample.
//!
//! Durability: each sample is written (`pwrite`) as it is taken, so a
//! `kill -9` loses nothing the kernel has; the files written since are
//! `fdatasync`ed every `history.fsync_interval_ms`, which bounds what a
//! power loss takes. A restart resumes each tier's open point from disk.
//!
//! This module knows files and series, not the agent: the agent's sampler
//! (`agent/sampler.rs`) gives it the samples.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_core::history::{
    self as h, Answer, Point, QueryError, Recorder, SeriesName, Slots, RECORD_BYTES,
    SERIES_BYTES_MAX, TIERS,
};
use serde::Deserialize;

/// `[history]` in the agent's config.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HistorySettings {
    /// Record statistics history at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How often the sampler takes a sample of every series (the finest
    /// tier keeps one point per 10 s: faster samples are aggregated in it).
    #[serde(default = "default_sample_interval_ms")]
    pub sample_interval_ms: u64,
    /// How often written series files are `fdatasync`ed.
    #[serde(default = "default_fsync_interval_ms")]
    pub fsync_interval_ms: u64,
    /// Most series files kept (each at most 1,454,400 bytes); samples of a
    /// new series past it are dropped (and logged).
    #[serde(default = "default_series_max")]
    pub series_max: usize,
}

fn yes() -> bool {
    true
}
fn default_sample_interval_ms() -> u64 {
    10_000
}
fn default_fsync_interval_ms() -> u64 {
    60_000
}
fn default_series_max() -> usize {
    4096
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            enabled: true,
            sample_interval_ms: default_sample_interval_ms(),
            fsync_interval_ms: default_fsync_interval_ms(),
            series_max: default_series_max(),
        }
    }
}

impl HistorySettings {
    pub fn validate(&self) -> Result<(), String> {
        if !(100..=10_000).contains(&self.sample_interval_ms) {
            return Err("history.sample_interval_ms`: must be 100-10000".into());
        }
        if self.fsync_interval_ms == 0 {
            return Err("history.fsync_interval_ms`: must be at least 1".into());
        }
        if self.series_max == 0 {
            return Err("history.series_max`: must be at least 1".into());
        }
        Ok(())
    }
}

/// What went wrong with the history store.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Query(#[from] QueryError),
    #[error("no history of series {0}")]
    Unknown(String),
    #[error("{count} series already (history.series_max): {series} not recorded")]
    Full { series: String, count: usize },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> HistoryError + '_ {
    move |source| HistoryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where tier `k`'s ring starts in a series file.
fn tier_offset(k: usize) -> u64 {
    TIERS[..k].iter().map(|t| t.bytes()).sum()
}

/// What one [`HistoryStore::record`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub samples: usize,
    pub dropped: usize,
    pub synced_files: usize,
}

struct Inner {
    recorders: HashMap<SeriesName, Recorder>,
    dirty: HashSet<SeriesName>,
    last_sync: Instant,
    /// Series files on disk (counted once, then kept up to date).
    count: Option<usize>,
}

/// The series files under `DATA_DIR/history`.
pub struct HistoryStore {
    root: PathBuf,
    settings: HistorySettings,
    inner: Mutex<Inner>,
}

/// A series file's rings, read for a query or a resume.
struct FileSlots<'a> {
    file: &'a File,
    salt: u32,
    /// The ring read whole for a query (tier, bytes).
    ring: Option<(usize, Vec<u8>)>,
}

impl Slots for FileSlots<'_> {
    fn get(&self, tier: usize, slot: u64) -> Option<Point> {
        let at = slot as usize * RECORD_BYTES;
        if let Some((k, ring)) = &self.ring {
            if *k == tier {
                return h::decode(tier, ring.get(at..at + RECORD_BYTES)?, self.salt);
            }
        }
        let mut b = [0u8; RECORD_BYTES];
        self.file
            .read_exact_at(&mut b, tier_offset(tier) + at as u64)
            .ok()?;
        h::decode(tier, &b, self.salt)
    }
}

impl HistoryStore {
    pub fn new(data_dir: &Path, settings: HistorySettings) -> HistoryStore {
        HistoryStore {
            root: data_dir.join("history"),
            settings,
            inner: Mutex::new(Inner {
                recorders: HashMap::new(),
                dirty: HashSet::new(),
                last_sync: Instant::now(),
                count: None,
            }),
        }
    }

    pub fn settings(&self) -> &HistorySettings {
        &self.settings
    }

    /// The file of `s` (its parts obey the name grammar: no `/`, no `..`).
    pub fn path(&self, s: &SeriesName) -> PathBuf {
        self.root
            .join(s.scope.as_str())
            .join(s.name.as_str())
            .join(format!("{}.ring", s.metric.as_str()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens (creating if needed, within `series_max`) the file of `s`.
    fn open_rw(&self, inner: &mut Inner, s: &SeriesName) -> Result<File, HistoryError> {
        let path = self.path(s);
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        let count = match inner.count {
            Some(c) => c,
            None => self.list().len(),
        };
        if count >= self.settings.series_max {
            inner.count = Some(count);
            return Err(HistoryError::Full {
                series: s.to_string(),
                count,
            });
        }
        let dir = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        // Sparse: blocks are allocated as the rings fill.
        f.set_len(SERIES_BYTES_MAX).map_err(io_err(&path))?;
        f.sync_all().map_err(io_err(&path))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        inner.count = Some(count + 1);
        Ok(f)
    }

    /// Records one sample of each series, taken at `now` (Unix s), and
    /// syncs the files written since the last sync when it is time.
    pub fn record(&self, now: u64, samples: &[(SeriesName, f64)]) -> Recorded {
        let mut inner = self.lock();
        let mut out = Recorded::default();
        for (s, v) in samples {
            match self.record_one(&mut inner, now, s, *v) {
                Ok(true) => out.samples += 1,
                Ok(false) => out.dropped += 1,
                Err(e) => {
                    out.dropped += 1;
                    tracing::warn!(series = %s, error = %e, "history.record_failed");
                }
            }
        }
        if inner.last_sync.elapsed() >= Duration::from_millis(self.settings.fsync_interval_ms) {
            out.synced_files = self.sync_locked(&mut inner);
        }
        out
    }

    fn record_one(
        &self,
        inner: &mut Inner,
        now: u64,
        s: &SeriesName,
        v: f64,
    ) -> Result<bool, HistoryError> {
        let f = self.open_rw(inner, s)?;
        let salt = h::series_salt(&s.to_string());
        let rec = inner.recorders.entry(s.clone()).or_insert_with(|| {
            Recorder::resume(
                &FileSlots {
                    file: &f,
                    salt,
                    ring: None,
                },
                now,
            )
        });
        let (outcome, writes) = rec.record(now, v);
        if outcome == h::Recorded::ClockReset {
            tracing::warn!(series = %s, now, "history.clock_went_back");
        }
        let path = self.path(s);
        for w in &writes {
            let b = h::encode(w.tier, &w.point, salt);
            f.write_all_at(&b, tier_offset(w.tier) + w.slot * RECORD_BYTES as u64)
                .map_err(io_err(&path))?;
        }
        inner.dirty.insert(s.clone());
        Ok(!writes.is_empty())
    }

    fn sync_locked(&self, inner: &mut Inner) -> usize {
        let mut n = 0;
        for s in inner.dirty.drain() {
            let path = self.path(&s);
            match File::open(&path).and_then(|f| f.sync_data()) {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "history.sync_failed")
                }
            }
        }
        inner.last_sync = Instant::now();
        n
    }

    /// `fdatasync`s every file written since the last sync (at shutdown).
    pub fn sync(&self) -> usize {
        let mut inner = self.lock();
        self.sync_locked(&mut inner)
    }

    /// The points of `s` in `[from, to]` every `step_s` (0: finest kept).
    pub fn query(
        &self,
        s: &SeriesName,
        now: u64,
        from: u64,
        to: u64,
        step_s: u64,
    ) -> Result<Answer, HistoryError> {
        let path = self.path(s);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(HistoryError::Unknown(s.to_string()))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let k = h::tier_for(now, from, step_s);
        let mut ring = vec![0u8; TIERS[k].bytes() as usize];
        let got = read_up_to(&f, &mut ring, tier_offset(k)).map_err(io_err(&path))?;
        ring.truncate(got);
        let slots = FileSlots {
            file: &f,
            salt: h::series_salt(&s.to_string()),
            ring: Some((k, ring)),
        };
        Ok(h::query(&slots, now, from, to, step_s)?)
    }

    /// Every series with a file, sorted (a file whose path is not a series
    /// name is skipped).
    pub fn list(&self) -> Vec<SeriesName> {
        let mut out = Vec::new();
        let entries = |p: &Path| -> Vec<(String, PathBuf)> {
            std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
                .collect()
        };
        for (scope, sp) in entries(&self.root) {
            for (name, np) in entries(&sp) {
                for (file, _) in entries(&np) {
                    let Some(metric) = file.strip_suffix(".ring") else {
                        continue;
                    };
                    if let Ok(s) = SeriesName::parse(&format!("{scope}/{name}/{metric}")) {
                        out.push(s);
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// Bytes the series files take on disk (allocated blocks).
    pub fn disk_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.list()
            .iter()
            .filter_map(|s| std::fs::metadata(self.path(s)).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }
}

/// Reads into `buf` from `offset` until it is full or the file ends.
fn read_up_to(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn series(s: &str) -> SeriesName {
        SeriesName::parse(s).unwrap()
    }

    #[test]
    fn records_reads_and_resumes_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let st = HistoryStore::new(dir.path(), HistorySettings::default());
        let s = series("volume/disk0/write_bytes_per_s");
        for i in 0..30 {
            st.record(T0 + i * 10, &[(s.clone(), i as f64)]);
        }
        let p = st.path(&s);
        assert_eq!(
            p,
            dir.path()
                .join("history/volume/disk0/write_bytes_per_s.ring")
        );
        assert_eq!(std::fs::metadata(&p).unwrap().len(), SERIES_BYTES_MAX);
        let a = st.query(&s, T0 + 300, T0, T0 + 299, 10).unwrap();
        assert_eq!(a.points.len(), 30);
        assert_eq!(a.points[29].mean, 29.0);
        // A new store (a restarted agent) goes on with the open minute.
        let st2 = HistoryStore::new(dir.path(), HistorySettings::default());
        st2.record(T0 + 295, &[(s.clone(), 100.0)]);
        let m = st2.query(&s, T0 + 310, T0 + 240, T0 + 299, 60).unwrap();
        assert_eq!(m.points[0].count, 7, "{:?}", m.points);
        assert_eq!(st2.list(), vec![s.clone()]);
        // A torn record on disk reads as a gap.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(
            &[0xff; 5],
            TIERS[0].slot_of(T0 + 30) * RECORD_BYTES as u64 + 2,
        )
        .unwrap();
        let a = st2.query(&s, T0 + 310, T0, T0 + 299, 10).unwrap();
        assert_eq!(a.points.len(), 29);
        assert!(a.points.iter().all(|p| p.t != T0 + 30));
    }

    #[test]
    fn series_max_bounds_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let st = HistoryStore::new(
            dir.path(),
            HistorySettings {
                series_max: 2,
                ..HistorySettings::default()
            },
        );
        let r = st.record(
            T0,
            &[
                (series("node/a/write_iops"), 1.0),
                (series("node/a/backlog_bytes"), 1.0),
                (series("node/a/link_bytes_per_s"), 1.0),
            ],
        );
        assert_eq!((r.samples, r.dropped), (2, 1));
        assert_eq!(st.list().len(), 2);
        assert!(st.disk_bytes() <= 2 * SERIES_BYTES_MAX);
        assert!(matches!(
            st.query(&series("node/a/link_bytes_per_s"), T0, T0, T0, 0),
            Err(HistoryError::Unknown(_))
        ));
    }
}
