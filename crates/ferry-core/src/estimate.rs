//! The migration estimator, sans-IO: observe a workload's writes, forecast
//! its migration.
//!
//! # Observation
//!
//! An [`Observation`] is fed by the edge with what the IO filter sees
//! (`record_write_extent`, `record_write_key`, `record_reads`) and with the
//! time (`now_ms`, never read from a clock here). It keeps:
//!
//! * the **working-set curve** W(T): for each window length T of
//!   [`LADDER_S`] (1 s … 24 h), the largest and the mean number of distinct
//!   keys (blocks at the replication granularity, or file ids for a share)
//!   written within a window of length T. A block written many times in a
//!   window counts once, as in the dirty map.
//! * per-10 s totals (bytes written, write and read IOs, distinct keys) for
//!   the last 24 h, and the distinct keys of each whole clock hour.
//!
//! Distinct counts are [`Sketch`]es: an exact sorted set of 64-bit hashes
//! up to [`SPARSE_MAX`] keys, then a HyperLogLog of [`HLL_REGISTERS`]
//! 6-bit-valued registers (one byte each, packed 8 to a `u64`), estimated
//! with Ertl's improved raw estimator (no bias table, relative standard
//! error 1.04/√m = [`HLL_RELATIVE_STD_ERROR`] over the whole range).
//! Merging is register-wise max, so the sketch of a window is the merge of
//! the sketches of the intervals it covers.
//!
//! Intervals are aligned to the clock: a sketch per second ([`LEVELS_S`]
//! level 0) is merged, when it closes, into the open 10 s one, that into
//! the minute, that into the 10 min. A ladder window of length T is built
//! from the coarsest level that splits it in at least two; windows hop by
//! about T/2 (so a burst up to T/2 long always falls inside one window), and
//! each window accumulates the interval sketches as they close and is
//! estimated once full, updating that T's max, sum and count. So only the
//! open sketches are kept, never a day of them: the memory is bounded by
//! [`MEMORY_BOUND_BYTES`] whatever the write rate and duration (see
//! [`Observation::memory_bytes`]).
//!
//! For a Linux block device ferry does not serve yet, the edge reads
//! `/proc/diskstats` and, where tracefs allows, `block:block_rq_issue`
//! events, parsed by [`crate::blockobs`] (diskstats' bytes written are an
//! upper bound on unique bytes: there are no addresses); the traced write
//! ranges feed [`Observation::record_write_extent`] like the filter's.
//!
//! # Forecast
//!
//! Pure functions over a [`Profile`] (what an observation saw) and a
//! [`Link`] (the probed bandwidth, the `--max-rate`). Every result carries a
//! [`Why`]: the formula's name and explanation and the inputs it used.
//! The central one is the copy's passes ([`time_to_ready`]). While the
//! link keeps up with the writes, ferry streams every write as it comes
//! (both modes) and the copier runs beside them at c = min(--max-rate,
//! bw − write rate) ([`streaming_passes`]): pass 0 copies the allocated
//! bytes in d₀ = allocated / c; a write re-dirties only a block in flight
//! (a batch of [`COPY_BATCH_BLOCKS`] held s = batch·block / c), so pass 1
//! re-sends W(s) blocks and each later one the share W(s)/working set of
//! the last. Beyond the link an async backlog overflows and writes only
//! mark blocks dirty: the fixed point pass n+1 = W(dₙ)·block / bw
//! ([`fixed_point`]). Ready once a pass is no longer than
//! [`READY_PASS_S`]; time to ready = Σ dₙ. (The first version used the
//! fixed point throughout; against real migrations it forecast 34.9 s for
//! a ready measured at 25.1 s: tests/estimate_accuracy.rs.)

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::link::Mode;

// ---------------------------------------------------------------------------
// Hashing and the sketch
// ---------------------------------------------------------------------------

/// HyperLogLog precision: 2^p registers.
pub const HLL_PRECISION: u32 = 12;
/// Registers of a dense sketch (one byte each: 4 KiB).
pub const HLL_REGISTERS: usize = 1 << HLL_PRECISION;
/// Relative standard error of a dense estimate: 1.04 / √m (1.625 %).
pub const HLL_RELATIVE_STD_ERROR: f64 = 1.04 / 64.0;
/// A sketch is an exact set of hashes up to this many keys (4 KiB, the size
/// of the dense form), then dense.
pub const SPARSE_MAX: usize = HLL_REGISTERS / 8;

const WORDS: usize = HLL_REGISTERS / 8;
/// Bits of the hash after the register index.
const Q: u32 = 64 - HLL_PRECISION;
const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The splitmix64 finalizer: a bijective 64-bit mix, so distinct keys stay
/// distinct and consecutive block numbers spread uniformly.
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of a file of a share: the first 8 bytes of the BLAKE3 hash of
/// its path relative to the share's root.
pub fn file_key(path: &[u8]) -> u64 {
    let h = blake3::hash(path);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// A set of keys counted exactly while small, as a HyperLogLog beyond.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SketchState", into = "SketchState")]
pub struct Sketch {
    repr: Repr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Repr {
    /// Sorted distinct hashes, at most [`SPARSE_MAX`].
    Sparse(Vec<u64>),
    /// [`HLL_REGISTERS`] registers, 8 per word, each < 128.
    Dense(Box<[u64]>),
}

impl Default for Sketch {
    fn default() -> Self {
        Sketch::new()
    }
}

impl Sketch {
    pub fn new() -> Sketch {
        Sketch {
            repr: Repr::Sparse(Vec::new()),
        }
    }

    /// Adds a key (hashed with [`mix64`]).
    pub fn insert(&mut self, key: u64) {
        self.insert_hash(mix64(key));
    }

    fn insert_hash(&mut self, h: u64) {
        match &mut self.repr {
            Repr::Sparse(v) => match v.binary_search(&h) {
                Ok(_) => {}
                Err(pos) if v.len() < SPARSE_MAX => v.insert(pos, h),
                Err(_) => {
                    let mut d = dense_from(v);
                    set_max(&mut d, h);
                    self.repr = Repr::Dense(d);
                }
            },
            Repr::Dense(d) => set_max(d, h),
        }
    }

    /// No key yet.
    pub fn is_empty(&self) -> bool {
        matches!(&self.repr, Repr::Sparse(v) if v.is_empty())
    }

    /// True while the count is exact.
    pub fn is_exact(&self) -> bool {
        matches!(self.repr, Repr::Sparse(_))
    }

    /// Adds every key of `other` (the union).
    pub fn merge(&mut self, other: &Sketch) {
        match (&mut self.repr, &other.repr) {
            (_, Repr::Sparse(b)) if b.is_empty() => {}
            (Repr::Sparse(a), Repr::Sparse(b)) => {
                let mut u = Vec::with_capacity(a.len() + b.len());
                let (mut i, mut j) = (0, 0);
                while i < a.len() && j < b.len() {
                    if a[i] < b[j] {
                        u.push(a[i]);
                        i += 1;
                    } else if b[j] < a[i] {
                        u.push(b[j]);
                        j += 1;
                    } else {
                        u.push(a[i]);
                        i += 1;
                        j += 1;
                    }
                }
                u.extend_from_slice(&a[i..]);
                u.extend_from_slice(&b[j..]);
                if u.len() <= SPARSE_MAX {
                    u.shrink_to_fit();
                    *a = u;
                } else {
                    self.repr = Repr::Dense(dense_from(&u));
                }
            }
            (Repr::Dense(d), Repr::Sparse(b)) => {
                for &h in b {
                    set_max(d, h);
                }
            }
            (Repr::Sparse(a), Repr::Dense(b)) => {
                let mut d = b.clone();
                for &h in a.iter() {
                    set_max(&mut d, h);
                }
                self.repr = Repr::Dense(d);
            }
            (Repr::Dense(a), Repr::Dense(b)) => {
                for (x, &y) in a.iter_mut().zip(b.iter()) {
                    *x = bytewise_max(*x, y);
                }
            }
        }
    }

    /// The estimated number of distinct keys (exact while sparse).
    pub fn estimate(&self) -> f64 {
        match &self.repr {
            Repr::Sparse(v) => v.len() as f64,
            Repr::Dense(d) => ertl_estimate(d),
        }
    }

    /// [`Sketch::estimate`] rounded.
    pub fn count(&self) -> u64 {
        self.estimate().round() as u64
    }

    /// Heap bytes held (the inline part is counted by its owner).
    pub fn heap_bytes(&self) -> usize {
        match &self.repr {
            Repr::Sparse(v) => v.capacity() * 8,
            Repr::Dense(d) => d.len() * 8,
        }
    }

    /// Most heap bytes a sketch ever holds.
    pub const MAX_HEAP_BYTES: usize = WORDS * 8;
}

/// A sketch as stored (checked when loaded).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum SketchState {
    Sparse(Vec<u64>),
    Dense(Vec<u64>),
}

impl From<Sketch> for SketchState {
    fn from(s: Sketch) -> SketchState {
        match s.repr {
            Repr::Sparse(v) => SketchState::Sparse(v),
            Repr::Dense(d) => SketchState::Dense(d.into_vec()),
        }
    }
}

impl TryFrom<SketchState> for Sketch {
    type Error = StateError;
    fn try_from(s: SketchState) -> Result<Sketch, StateError> {
        match s {
            SketchState::Sparse(v) => {
                if v.len() > SPARSE_MAX || v.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(StateError::Sketch("sparse set too long or not sorted"));
                }
                Ok(Sketch {
                    repr: Repr::Sparse(v),
                })
            }
            SketchState::Dense(d) => {
                let bad_register = d
                    .iter()
                    .any(|w| (0..8).any(|k| (w >> (8 * k)) & 0xff > u64::from(Q + 1)));
                if d.len() != WORDS || bad_register {
                    return Err(StateError::Sketch("dense registers of the wrong shape"));
                }
                Ok(Sketch {
                    repr: Repr::Dense(d.into_boxed_slice()),
                })
            }
        }
    }
}

/// Why a stored observation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("stored estimate sketch is damaged: {0}")]
    Sketch(&'static str),
    #[error("stored estimate is damaged or of another layout: {0}")]
    Layout(&'static str),
}

fn dense_from(hashes: &[u64]) -> Box<[u64]> {
    let mut d = vec![0u64; WORDS].into_boxed_slice();
    for &h in hashes {
        set_max(&mut d, h);
    }
    d
}

fn set_max(d: &mut [u64], h: u64) {
    let idx = (h >> Q) as usize;
    let w = h << HLL_PRECISION;
    let rank = if w == 0 { Q + 1 } else { w.leading_zeros() + 1 };
    let word = &mut d[idx / 8];
    let shift = (idx % 8) * 8;
    let cur = (*word >> shift) & 0xff;
    if u64::from(rank) > cur {
        *word = (*word & !(0xff << shift)) | (u64::from(rank) << shift);
    }
}

/// Byte-wise max of 8 registers each below 128 (SWAR): per byte,
/// `(a | 0x80) - b` keeps its high bit iff a ≥ b, without borrowing.
fn bytewise_max(a: u64, b: u64) -> u64 {
    let ge = ((a | HIGH).wrapping_sub(b & LOW7)) & HIGH;
    let mask = (ge >> 7).wrapping_mul(0xff);
    (a & mask) | (b & !mask)
}

/// Ertl (2017), "New cardinality estimation algorithms for HyperLogLog
/// sketches", improved raw estimator (algorithm 6).
fn ertl_estimate(d: &[u64]) -> f64 {
    let mut counts = [0u32; (Q + 2) as usize];
    for &w in d {
        for k in 0..8 {
            let r = ((w >> (k * 8)) & 0xff) as usize;
            counts[r.min((Q + 1) as usize)] += 1;
        }
    }
    let m = HLL_REGISTERS as f64;
    if counts[0] as usize == HLL_REGISTERS {
        return 0.0;
    }
    let mut z = m * tau(1.0 - f64::from(counts[(Q + 1) as usize]) / m);
    for k in (1..=Q as usize).rev() {
        z = 0.5 * (z + f64::from(counts[k]));
    }
    z += m * sigma(f64::from(counts[0]) / m);
    let alpha_inf = 1.0 / (2.0 * std::f64::consts::LN_2);
    alpha_inf * m * m / z
}

fn sigma(mut x: f64) -> f64 {
    if x >= 1.0 {
        return f64::INFINITY;
    }
    let mut y = 1.0;
    let mut z = x;
    loop {
        x *= x;
        let old = z;
        z += x * y;
        y += y;
        if z == old {
            return z;
        }
    }
}

fn tau(mut x: f64) -> f64 {
    if x == 0.0 || x >= 1.0 {
        return 0.0;
    }
    let mut y = 1.0;
    let mut z = 1.0 - x;
    loop {
        x = x.sqrt();
        let old = z;
        y *= 0.5;
        z -= (1.0 - x).powi(2) * y;
        if z == old {
            return z / 3.0;
        }
    }
}

// ---------------------------------------------------------------------------
// Observation
// ---------------------------------------------------------------------------

/// Interval lengths of the sketch levels, each a multiple of the previous.
pub const LEVELS_S: [u64; 4] = [1, 10, 60, 600];
/// Window lengths of the working-set curve.
pub const LADDER_S: [u64; 14] = [
    1, 5, 10, 30, 60, 300, 600, 1_800, 3_600, 7_200, 14_400, 28_800, 43_200, 86_400,
];
/// Per-interval totals are kept at this resolution (as the history store's
/// finest tier)…
pub const TOTALS_STEP_S: u64 = 10;
/// …for this many intervals (24 h).
pub const TOTALS_KEEP: usize = 8_640;
/// Clock hours whose distinct keys are kept (7 days).
pub const HOURS_KEEP: usize = 168;
/// A gap in `now_ms` longer than this (the agent was down) pauses the
/// observation: open windows are dropped instead of counted as idle.
pub const GAP_MAX_S: u64 = 86_400;
/// Open windows per ladder entry: ⌈T / hop⌉ ≤ 3 (see [`window_plan`]).
const OPEN_WINDOWS_MAX: usize = 3;

/// Upper bound of [`Observation::memory_bytes`], whatever the write rate
/// and the duration: at most 4 level sketches + 32 open window sketches
/// (Σ over the ladder of ⌈T / hop⌉, + the clock hour) of 4 KiB each, 15
/// tracks with room for 3 windows, 8,640 totals of 40 B (24 h at 10 s),
/// 168 hours of 24 B and the 416 B struct: 500,144 B on 64-bit targets
/// (computed in the tests); a close holds ≤ 12 KiB more while it runs.
/// A simulated 24 h of 600 random writes a second peaks at 471,472 B.
pub const MEMORY_BOUND_BYTES: usize = 512 * 1024;

/// The level a ladder window is built from and its hop: the coarsest level
/// that splits T in at least two (or T's own length), hop ≈ T/2 rounded
/// down to that level's interval.
pub fn window_plan(window_s: u64) -> (usize, u64) {
    let mut level = 0;
    for (i, &g) in LEVELS_S.iter().enumerate() {
        if window_s % g == 0 && window_s / g >= 2 {
            level = i;
        }
    }
    let g = LEVELS_S[level];
    let hop = ((window_s / 2) / g * g).max(g);
    (level, hop)
}

/// What the keys of an observation are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum KeyKind {
    /// Blocks of a volume at the replication granularity (the dirty map's).
    Blocks { block_bytes: u64 },
    /// Files of a share (see [`file_key`]).
    Files,
}

/// Totals of one [`TOTALS_STEP_S`] interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IntervalTotals {
    /// Interval start, seconds (the clock `now_ms` is on).
    pub start_s: u64,
    pub bytes_written: u64,
    pub write_ios: u64,
    pub read_ios: u64,
    /// Distinct keys written in the interval (estimate).
    pub keys: u64,
}

/// One clock hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HourStat {
    pub start_s: u64,
    /// Distinct keys written in the hour (estimate).
    pub keys: u64,
    pub bytes_written: u64,
}

/// W(T) for one window length.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CurvePoint {
    pub window_s: u64,
    /// Largest distinct-key count over the observed windows.
    pub max_keys: u64,
    /// Mean over the observed windows.
    pub mean_keys: f64,
    /// Windows observed.
    pub windows: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Track {
    window_s: u64,
    level: usize,
    hop_s: u64,
    open: VecDeque<(u64, Sketch)>,
    max: u64,
    sum: f64,
    count: u64,
}

impl Track {
    fn new(window_s: u64, level: usize, hop_s: u64) -> Track {
        Track {
            window_s,
            level,
            hop_s,
            open: VecDeque::with_capacity(OPEN_WINDOWS_MAX),
            max: 0,
            sum: 0.0,
            count: 0,
        }
    }

    /// Takes the closed level interval `[start, start + g)`; returns the
    /// windows it completed (start, estimate).
    fn feed(&mut self, start: u64, g: u64, s: &Sketch, first_s: u64, done: &mut Vec<(u64, u64)>) {
        if start % self.hop_s == 0 && start >= first_s && self.open.len() < OPEN_WINDOWS_MAX {
            self.open.push_back((start, Sketch::new()));
        }
        for (_, acc) in self.open.iter_mut() {
            acc.merge(s);
        }
        while let Some((ws, _)) = self.open.front() {
            if ws + self.window_s > start + g {
                break;
            }
            let Some((ws, acc)) = self.open.pop_front() else {
                break;
            };
            let n = acc.count();
            self.max = self.max.max(n);
            self.sum += n as f64;
            self.count += 1;
            done.push((ws, n));
        }
    }
}

/// A running observation of one volume's or share's writes.
///
/// It serializes (serde) so the agent can keep it across restarts; loading
/// checks every part against this build's layout and bounds, so a damaged
/// or foreign file is refused ([`StateError`]), never trusted. After a
/// restart call [`Observation::resume`]: the time the agent was down is not
/// counted as idle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "ObservationState")]
pub struct Observation {
    kind: KeyKind,
    started_ms: u64,
    first_s: u64,
    /// The open second.
    cur_s: u64,
    last_ms: u64,
    /// Time not observed (gaps, restarts), ms.
    paused_ms: u64,
    levels: [Sketch; 4],
    tracks: Vec<Track>,
    hourly: Track,
    totals: VecDeque<IntervalTotals>,
    open_totals: IntervalTotals,
    hour_bytes: u64,
    hours: VecDeque<HourStat>,
    bytes_written: u64,
    write_ios: u64,
    read_ios: u64,
    /// Tests: every full window (T, start, estimate).
    #[cfg(test)]
    #[serde(skip)]
    log: Option<Vec<(u64, u64, u64)>>,
}

#[derive(Deserialize)]
struct ObservationState {
    kind: KeyKind,
    started_ms: u64,
    first_s: u64,
    /// The open second.
    cur_s: u64,
    last_ms: u64,
    /// Time not observed (gaps, restarts), ms.
    paused_ms: u64,
    levels: [Sketch; 4],
    tracks: Vec<Track>,
    hourly: Track,
    totals: VecDeque<IntervalTotals>,
    open_totals: IntervalTotals,
    hour_bytes: u64,
    hours: VecDeque<HourStat>,
    bytes_written: u64,
    write_ios: u64,
    read_ios: u64,
}

impl TryFrom<ObservationState> for Observation {
    type Error = StateError;
    fn try_from(st: ObservationState) -> Result<Observation, StateError> {
        let layout = |what| Err(StateError::Layout(what));
        if st.tracks.len() != LADDER_S.len() {
            return layout("ladder");
        }
        for (t, &w) in st.tracks.iter().zip(LADDER_S.iter()) {
            let (level, hop) = window_plan(w);
            if (t.window_s, t.level, t.hop_s) != (w, level, hop) || t.open.len() > OPEN_WINDOWS_MAX
            {
                return layout("ladder window");
            }
        }
        let h = &st.hourly;
        if (h.window_s, h.level, h.hop_s) != (3_600, 3, 3_600) || h.open.len() > 1 {
            return layout("hourly window");
        }
        if st.totals.len() > TOTALS_KEEP || st.hours.len() > HOURS_KEEP {
            return layout("too many totals or hours");
        }
        if st.first_s > st.cur_s || st.open_totals.start_s > st.cur_s {
            return layout("times out of order");
        }
        let mut o = Observation {
            kind: st.kind,
            started_ms: st.started_ms,
            first_s: st.first_s,
            cur_s: st.cur_s,
            last_ms: st.last_ms,
            paused_ms: st.paused_ms,
            levels: st.levels,
            tracks: st.tracks,
            hourly: st.hourly,
            totals: st.totals,
            open_totals: st.open_totals,
            hour_bytes: st.hour_bytes,
            hours: st.hours,
            bytes_written: st.bytes_written,
            write_ios: st.write_ios,
            read_ios: st.read_ios,
            #[cfg(test)]
            log: None,
        };
        // Capacities as a fresh observation's, so the bound holds.
        for t in o.tracks.iter_mut().chain(std::iter::once(&mut o.hourly)) {
            t.open.shrink_to_fit();
            t.open.reserve_exact(OPEN_WINDOWS_MAX - t.open.len());
        }
        o.totals.shrink_to_fit();
        o.totals.reserve_exact(TOTALS_KEEP - o.totals.len());
        o.hours.shrink_to_fit();
        o.hours.reserve_exact(HOURS_KEEP - o.hours.len());
        Ok(o)
    }
}

impl Observation {
    /// Starts observing at `now_ms`.
    pub fn new(kind: KeyKind, now_ms: u64) -> Observation {
        let s = now_ms / 1000;
        let tracks = LADDER_S
            .iter()
            .map(|&t| {
                let (level, hop) = window_plan(t);
                Track::new(t, level, hop)
            })
            .collect();
        Observation {
            kind,
            started_ms: now_ms,
            first_s: s,
            cur_s: s,
            last_ms: now_ms,
            paused_ms: 0,
            levels: Default::default(),
            tracks,
            hourly: Track::new(3_600, 3, 3_600),
            totals: VecDeque::with_capacity(TOTALS_KEEP),
            open_totals: IntervalTotals {
                start_s: s - s % TOTALS_STEP_S,
                ..Default::default()
            },
            hour_bytes: 0,
            hours: VecDeque::with_capacity(HOURS_KEEP),
            bytes_written: 0,
            write_ios: 0,
            read_ios: 0,
            #[cfg(test)]
            log: None,
        }
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// A write of `len` bytes at `offset` of a volume: every block it
    /// touches is a key. On a [`KeyKind::Files`] observation only the
    /// totals count (use [`Observation::record_write_key`]).
    pub fn record_write_extent(&mut self, now_ms: u64, offset: u64, len: u64) {
        self.advance(now_ms);
        self.count_write(len);
        if let KeyKind::Blocks { block_bytes } = self.kind {
            if len == 0 || block_bytes == 0 {
                return;
            }
            let first = offset / block_bytes;
            let last = offset.saturating_add(len - 1) / block_bytes;
            for b in first..=last {
                self.levels[0].insert(b);
            }
        }
    }

    /// A write of `bytes` to the thing `key` names (a file: [`file_key`]).
    pub fn record_write_key(&mut self, now_ms: u64, key: u64, bytes: u64) {
        self.advance(now_ms);
        self.count_write(bytes);
        self.levels[0].insert(key);
    }

    /// Writes known only by their totals (a device's `/proc/diskstats`):
    /// `bytes` in `ios` writes, no keys (see [`Observation::record_key`]).
    pub fn record_write_totals(&mut self, now_ms: u64, bytes: u64, ios: u64) {
        self.advance(now_ms);
        let t = &mut self.open_totals;
        t.bytes_written = t.bytes_written.saturating_add(bytes);
        t.write_ios = t.write_ios.saturating_add(ios);
        self.bytes_written = self.bytes_written.saturating_add(bytes);
        self.write_ios = self.write_ios.saturating_add(ios);
    }

    /// A key written, its bytes and IO counted elsewhere
    /// ([`Observation::record_write_totals`]).
    pub fn record_key(&mut self, now_ms: u64, key: u64) {
        self.advance(now_ms);
        self.levels[0].insert(key);
    }

    /// The last closed 10 s interval's totals.
    pub fn last_totals(&self) -> Option<IntervalTotals> {
        self.totals.back().copied()
    }

    /// Bytes written, write IOs and read IOs since the start.
    pub fn counts(&self) -> (u64, u64, u64) {
        (self.bytes_written, self.write_ios, self.read_ios)
    }

    /// Observed and unobserved (gaps, restarts) time since the start, s.
    pub fn observed_unobserved_s(&self) -> (f64, f64) {
        let span = self.last_ms.saturating_sub(self.started_ms);
        (
            span.saturating_sub(self.paused_ms) as f64 / 1000.0,
            self.paused_ms.min(span) as f64 / 1000.0,
        )
    }

    /// W(T) so far (full windows only).
    pub fn working_set(&self) -> WorkingSetCurve {
        WorkingSetCurve {
            points: self
                .tracks
                .iter()
                .filter(|t| t.count > 0)
                .map(|t| CurvePoint {
                    window_s: t.window_s,
                    max_keys: t.max,
                    mean_keys: t.sum / t.count as f64,
                    windows: t.count,
                })
                .collect(),
        }
    }

    /// `ios` reads.
    pub fn record_reads(&mut self, now_ms: u64, ios: u64) {
        self.advance(now_ms);
        self.open_totals.read_ios = self.open_totals.read_ios.saturating_add(ios);
        self.read_ios = self.read_ios.saturating_add(ios);
    }

    fn count_write(&mut self, bytes: u64) {
        let t = &mut self.open_totals;
        t.bytes_written = t.bytes_written.saturating_add(bytes);
        t.write_ios = t.write_ios.saturating_add(1);
        self.bytes_written = self.bytes_written.saturating_add(bytes);
        self.write_ios = self.write_ios.saturating_add(1);
    }

    /// Closes every second before `now_ms` (call it at least once a second
    /// while nothing is written, so idle windows count). Time going
    /// backwards is taken as the open second.
    pub fn advance(&mut self, now_ms: u64) {
        let target = now_ms / 1000;
        if target > self.cur_s && target - self.cur_s > GAP_MAX_S {
            self.pause(now_ms);
            return;
        }
        self.last_ms = self.last_ms.max(now_ms);
        if target <= self.cur_s {
            return;
        }
        while self.cur_s < target {
            let s = self.cur_s;
            self.close(0, s);
            self.cur_s += 1;
        }
    }

    /// Continues after a restart at `now_ms`: the second open at the stop
    /// is closed, windows still open are dropped (what was written while
    /// the agent was down was not seen, so it must not count as idle).
    pub fn resume(&mut self, now_ms: u64) {
        if now_ms / 1000 > self.cur_s {
            self.pause(now_ms);
        } else {
            self.last_ms = self.last_ms.max(now_ms);
        }
    }

    /// A gap until `now_ms` (a later second): the open second is closed if
    /// anything was written in it (else dropped: it was hardly observed),
    /// longer intervals and windows still open are dropped, the gap is not
    /// observed time; windows start again at `now_ms`'s second.
    fn pause(&mut self, now_ms: u64) {
        let s = now_ms / 1000;
        let open = self.cur_s;
        if !self.levels[0].is_empty() {
            self.close(0, open);
        }
        self.paused_ms = self
            .paused_ms
            .saturating_add(now_ms.saturating_sub(self.last_ms));
        self.last_ms = self.last_ms.max(now_ms);
        for l in self.levels.iter_mut() {
            *l = Sketch::new();
        }
        for t in self
            .tracks
            .iter_mut()
            .chain(std::iter::once(&mut self.hourly))
        {
            t.open.clear();
        }
        let o = &self.open_totals;
        if o.write_ios > 0 || o.read_ios > 0 {
            self.push_totals();
        }
        self.open_totals = IntervalTotals {
            start_s: s - s % TOTALS_STEP_S,
            ..Default::default()
        };
        self.hour_bytes = 0;
        self.first_s = s;
        self.cur_s = s;
    }

    fn push_totals(&mut self) {
        if self.totals.len() == TOTALS_KEEP {
            self.totals.pop_front();
        }
        self.totals.push_back(self.open_totals);
        self.hour_bytes = self
            .hour_bytes
            .saturating_add(self.open_totals.bytes_written);
    }

    /// Closes level `level`'s interval starting at `start`.
    fn close(&mut self, level: usize, start: u64) {
        let g = LEVELS_S[level];
        let sketch = std::mem::take(&mut self.levels[level]);
        let mut done = Vec::new();
        for t in self.tracks.iter_mut().filter(|t| t.level == level) {
            done.clear();
            t.feed(start, g, &sketch, self.first_s, &mut done);
            #[cfg(test)]
            if let Some(log) = self.log.as_mut() {
                log.extend(done.iter().map(|&(ws, n)| (t.window_s, ws, n)));
            }
        }
        if level == 1 {
            self.open_totals.keys = sketch.count();
            self.push_totals();
            self.open_totals = IntervalTotals {
                start_s: start + g,
                ..Default::default()
            };
        }
        if level == self.hourly.level {
            done.clear();
            self.hourly.feed(start, g, &sketch, self.first_s, &mut done);
            for &(hs, keys) in &done {
                if self.hours.len() == HOURS_KEEP {
                    self.hours.pop_front();
                }
                self.hours.push_back(HourStat {
                    start_s: hs,
                    keys,
                    bytes_written: self.hour_bytes,
                });
            }
            if !done.is_empty() || (start + g) % 3_600 == 0 {
                self.hour_bytes = 0;
            }
        }
        if level + 1 < LEVELS_S.len() {
            self.levels[level + 1].merge(&sketch);
            let up = LEVELS_S[level + 1];
            if (start + g) % up == 0 {
                self.close(level + 1, start + g - up);
            }
        }
    }

    /// Bytes this observation holds (inline and heap), computed from the
    /// capacities actually allocated.
    pub fn memory_bytes(&self) -> usize {
        let mut n = std::mem::size_of::<Observation>();
        n += self.levels.iter().map(|s| s.heap_bytes()).sum::<usize>();
        for t in self.tracks.iter().chain(std::iter::once(&self.hourly)) {
            n += std::mem::size_of::<Track>();
            n += t.open.capacity() * std::mem::size_of::<(u64, Sketch)>();
            n += t.open.iter().map(|(_, s)| s.heap_bytes()).sum::<usize>();
        }
        n += self.totals.capacity() * std::mem::size_of::<IntervalTotals>();
        n += self.hours.capacity() * std::mem::size_of::<HourStat>();
        n
    }

    /// What has been observed so far (full windows only).
    pub fn profile(&self) -> Profile {
        Profile {
            kind: self.kind,
            observed_s: self
                .last_ms
                .saturating_sub(self.started_ms)
                .saturating_sub(self.paused_ms) as f64
                / 1000.0,
            bytes_written: self.bytes_written,
            write_ios: self.write_ios,
            read_ios: self.read_ios,
            curve: self.working_set(),
            totals: self.totals.iter().copied().collect(),
            hours: self.hours.iter().copied().collect(),
        }
    }
}

/// What an observation saw: the input of every forecast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub kind: KeyKind,
    pub observed_s: f64,
    pub bytes_written: u64,
    pub write_ios: u64,
    pub read_ios: u64,
    pub curve: WorkingSetCurve,
    /// Per-[`TOTALS_STEP_S`] totals, oldest first (the last 24 h).
    pub totals: Vec<IntervalTotals>,
    /// Whole clock hours, oldest first.
    pub hours: Vec<HourStat>,
}

impl Profile {
    /// Bytes a key stands for (a block; for files, the mean bytes written
    /// per write, at least 1).
    pub fn key_bytes(&self) -> f64 {
        match self.kind {
            KeyKind::Blocks { block_bytes } => block_bytes as f64,
            KeyKind::Files => {
                if self.write_ios == 0 {
                    1.0
                } else {
                    (self.bytes_written as f64 / self.write_ios as f64).max(1.0)
                }
            }
        }
    }

    /// Mean bytes written per second over the observation.
    pub fn write_rate(&self) -> f64 {
        if self.observed_s > 0.0 {
            self.bytes_written as f64 / self.observed_s
        } else {
            0.0
        }
    }
}

/// Which statistic of W(T) a forecast uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stat {
    /// The worst window observed (the default: a forecast one can rely on).
    Max,
    Mean,
}

/// W(T) at the ladder's window lengths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WorkingSetCurve {
    pub points: Vec<CurvePoint>,
}

impl WorkingSetCurve {
    /// W(t) for any `t` ≥ 0: linear from 0 to the first point, linear
    /// between points (made non-decreasing), and past the last point
    /// W(t_last)·t / t_last (W is subadditive: a window of k·T is covered
    /// by k windows of T); at most `cap_keys`.
    pub fn at(&self, t_s: f64, stat: Stat, cap_keys: f64) -> f64 {
        if self.points.is_empty() || t_s <= 0.0 || t_s.is_nan() {
            return 0.0;
        }
        let mut pts = Vec::with_capacity(self.points.len());
        let mut run = 0.0f64;
        for p in &self.points {
            let v = match stat {
                Stat::Max => p.max_keys as f64,
                Stat::Mean => p.mean_keys,
            };
            run = run.max(v);
            pts.push((p.window_s as f64, run));
        }
        let (t0, v0) = pts[0];
        let w = if t_s <= t0 {
            v0 * t_s / t0
        } else if let Some(i) = pts.iter().position(|&(t, _)| t >= t_s) {
            let (ta, va) = pts[i - 1];
            let (tb, vb) = pts[i];
            va + (vb - va) * (t_s - ta) / (tb - ta)
        } else {
            let (tl, vl) = pts[pts.len() - 1];
            vl * t_s / tl
        };
        w.min(cap_keys)
    }

    /// The longest window observed.
    pub fn longest_s(&self) -> u64 {
        self.points.last().map_or(0, |p| p.window_s)
    }
}

// ---------------------------------------------------------------------------
// Forecast
// ---------------------------------------------------------------------------

/// A pass of the copy this short (or shorter) means ready.
pub const READY_PASS_S: f64 = 1.0;
/// Most passes the fixed point iterates before calling it stalled.
pub const MAX_PASSES: usize = 10_000;

/// Why a forecast could not be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ForecastError {
    #[error("nothing observed yet: no full 1 s window")]
    NotObserved,
    #[error("{name} must be a positive finite number, got {value}")]
    BadInput { name: &'static str, value: f64 },
}

fn positive(name: &'static str, value: f64) -> Result<f64, ForecastError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(ForecastError::BadInput { name, value })
    }
}

fn non_negative(name: &'static str, value: f64) -> Result<f64, ForecastError> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(ForecastError::BadInput { name, value })
    }
}

/// One input of a figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Input {
    pub name: String,
    pub value: f64,
    pub unit: String,
}

/// The formula of a figure and the inputs it used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Why {
    /// Short name (`initial-sync`, `fixed-point`, …).
    pub formula: String,
    /// The formula in words.
    pub explanation: String,
    pub inputs: Vec<Input>,
}

impl Why {
    fn new(formula: &str, explanation: &str) -> Why {
        Why {
            formula: formula.to_string(),
            explanation: explanation.to_string(),
            inputs: Vec::new(),
        }
    }

    fn input(mut self, name: &str, value: f64, unit: &str) -> Why {
        self.inputs.push(Input {
            name: name.to_string(),
            value,
            unit: unit.to_string(),
        });
        self
    }
}

/// The link a migration would use.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Probed throughput (under the workload's load), bytes/s.
    pub bandwidth_bytes_per_s: f64,
    /// The migration's `--max-rate`, bytes/s.
    pub max_rate_bytes_per_s: Option<f64>,
}

impl Link {
    /// What a migration gets: the bandwidth, capped by `--max-rate`.
    pub fn effective(&self) -> Result<f64, ForecastError> {
        let bw = positive("bandwidth_bytes_per_s", self.bandwidth_bytes_per_s)?;
        match self.max_rate_bytes_per_s {
            Some(r) => Ok(bw.min(positive("max_rate_bytes_per_s", r)?)),
            None => Ok(bw),
        }
    }
}

/// The volume or share being forecast.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// Allocated bytes (holes are skipped by the initial copy).
    pub allocated_bytes: u64,
    /// Size: no window dirties more keys than this holds.
    pub size_bytes: u64,
}

impl Target {
    fn cap_keys(&self, p: &Profile) -> f64 {
        (self.size_bytes as f64 / p.key_bytes()).ceil().max(1.0)
    }
}

/// A duration figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Seconds {
    pub seconds: f64,
    pub why: Why,
}

/// The copier's batch: up to this many contiguous dirty blocks are read at
/// once and held "in flight" (re-dirtied by any write landing on them) for
/// the batch's time at the copy rate (ferry's copier,
/// `crates/ferry/src/volume/primary.rs` `COPY_BATCH_BLOCKS`, bounded by
/// `replication.copies_in_flight_max`, 32 by default).
pub const COPY_BATCH_BLOCKS: f64 = 16.0;

/// What the copier gets: writes are streamed as they come (sync, and async
/// while its backlog holds them) and take their share of the link first;
/// the copy gets the rest, capped by `--max-rate` (which limits the copier
/// only). Writes at or above the link leave the copy the whole (capped)
/// link: async falls behind and writes only mark blocks dirty; sync slows
/// the writers.
pub fn copy_rate(p: &Profile, link: &Link, keep: f64) -> Result<f64, ForecastError> {
    let bw = positive("bandwidth_bytes_per_s", link.bandwidth_bytes_per_s)?;
    let cap = match link.max_rate_bytes_per_s {
        Some(r) => positive("max_rate_bytes_per_s", r)?,
        None => f64::INFINITY,
    };
    let wr = p.write_rate() * keep;
    Ok(if wr < bw {
        cap.min(bw - wr)
    } else {
        cap.min(bw)
    })
}

/// Initial sync: allocated bytes / the copy rate ([`copy_rate`]; holes
/// skipped): the copier's first pass over the volume.
pub fn initial_sync(p: &Profile, target: &Target, link: &Link) -> Result<Seconds, ForecastError> {
    if p.kind == KeyKind::Files {
        // A share's resync sends every file over the whole link; the
        // changes made meanwhile are noted (paths) and sent after it.
        let bw = link.effective()?;
        return Ok(Seconds {
            seconds: target.allocated_bytes as f64 / bw,
            why: Why::new(
                "initial-sync",
                "a share: allocated bytes / bandwidth (its resync sends every file over the \
                 whole link; what changes meanwhile is sent after it)",
            )
            .input("allocated_bytes", target.allocated_bytes as f64, "B")
            .input("bandwidth", bw, "B/s"),
        });
    }
    let c = copy_rate(p, link, 1.0)?;
    Ok(Seconds {
        seconds: target.allocated_bytes as f64 / c,
        why: Why::new(
            "initial-sync",
            "allocated bytes / copy rate (holes are not sent); copy rate = min(--max-rate, \
             bandwidth - write rate): streamed writes take their share of the link first",
        )
        .input("allocated_bytes", target.allocated_bytes as f64, "B")
        .input("bandwidth", link.bandwidth_bytes_per_s, "B/s")
        .input("write_rate", p.write_rate(), "B/s")
        .input("copy_rate", c, "B/s"),
    })
}

/// The copy's passes while writes are streamed as they come (ferry's
/// replication in both modes while the link keeps up): a write does not
/// dirty a block for the copier unless the block is in flight (read, held
/// for its batch's time at the copy rate `c`, sent). The in-flight window
/// is `s = COPY_BATCH_BLOCKS x key / c`; over the first pass (d0 =
/// first_bytes / c) the writes re-dirty about W(s) keys (each batch of the
/// hot set loses the share of it written within `s`); each later pass
/// re-dirties the share q = W(s) / H of what it copies (H: the working set
/// over the whole observation). It stalls when q >= 1 - `CONVERGING_SHRINK`
/// (the backlog shrinks by less than 10 % of the copy rate: what the
/// migration reports as `not_converging`); else ready once a pass takes <=
/// [`READY_PASS_S`]. `keep` is a throttle's kept share of the writes
/// (W_keep(T) = W(keep T)).
pub fn streaming_passes(
    p: &Profile,
    stat: Stat,
    cap_keys: f64,
    first_bytes: f64,
    c: f64,
    keep: f64,
) -> (Verdict, Vec<f64>, f64) {
    let key = p.key_bytes();
    let d0 = first_bytes / c;
    let s = (COPY_BATCH_BLOCKS * key / c).min(d0.max(f64::MIN_POSITIVE));
    let w_s = p.curve.at(keep * s, stat, cap_keys);
    let longest = p.curve.longest_s() as f64;
    let hot = p.curve.at(longest, stat, cap_keys).max(w_s).max(1.0);
    let q = (w_s / hot).min(1.0);
    let mut d = d0;
    let mut total = d0;
    let mut passes = vec![d0];
    for n in 1..=MAX_PASSES {
        if d <= READY_PASS_S {
            return (
                Verdict::Converges {
                    seconds: total,
                    passes: n,
                },
                passes,
                q,
            );
        }
        if n > 1 && q >= 1.0 - crate::migration::CONVERGING_SHRINK {
            return (Verdict::Stalls { pass_s: d }, passes, q);
        }
        let next = if n == 1 {
            (w_s * key / c).min(d)
        } else {
            d * q
        };
        total += next;
        if passes.len() < 32 {
            passes.push(next);
        }
        d = next;
    }
    (Verdict::Stalls { pass_s: d }, passes, q)
}

/// The outcome of the copy's fixed point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "verdict")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Verdict {
    /// Ready after `seconds`, in `passes` passes.
    Converges { seconds: f64, passes: usize },
    /// A pass of `pass_s` dirties at least as much as it sends: writes
    /// outrun the link (`dirty_rate` ≥ `bandwidth`, B/s).
    Diverges {
        pass_s: f64,
        dirty_rate: f64,
        bandwidth: f64,
    },
    /// The passes shrink ever more slowly towards `pass_s` (a fixed point
    /// of pass ↦ W(pass)·key/bw above [`READY_PASS_S`]): never ready.
    Stalls { pass_s: f64 },
}

impl Verdict {
    pub fn converges(&self) -> bool {
        matches!(self, Verdict::Converges { .. })
    }
}

/// Time to `ready` in one mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ReadyForecast {
    pub mode: String,
    pub verdict: Verdict,
    /// Pass durations (async; the first ones), seconds.
    pub passes_s: Vec<f64>,
    pub why: Why,
}

impl ReadyForecast {
    /// Seconds to ready, if it converges.
    pub fn seconds(&self) -> Option<f64> {
        match self.verdict {
            Verdict::Converges { seconds, .. } => Some(seconds),
            _ => None,
        }
    }
}

/// The fixed point: `d0 = first_bytes / bw`, `d(n+1) = W(keep·dn)·key / bw`
/// (a throttle that keeps the fraction `keep` of the writes stretches the
/// workload: W_keep(T) = W(keep·T)); ready once dn ≤ [`READY_PASS_S`].
pub fn fixed_point(
    p: &Profile,
    stat: Stat,
    cap_keys: f64,
    first_bytes: f64,
    bw: f64,
    keep: f64,
) -> (Verdict, Vec<f64>) {
    let key = p.key_bytes();
    let mut d = first_bytes / bw;
    let mut total = d;
    let mut passes = vec![d];
    for n in 1..=MAX_PASSES {
        if d <= READY_PASS_S {
            return (
                Verdict::Converges {
                    seconds: total,
                    passes: n,
                },
                passes,
            );
        }
        let next = p.curve.at(keep * d, stat, cap_keys) * key / bw;
        // W is non-decreasing, so the passes are monotone: they grow from
        // the first (writes outrun the link) or shrink for ever after.
        if next >= d && n > 1 {
            return (Verdict::Stalls { pass_s: d }, passes);
        }
        if next >= d {
            return (
                Verdict::Diverges {
                    pass_s: d,
                    dirty_rate: next * bw / d,
                    bandwidth: bw,
                },
                passes,
            );
        }
        total += next;
        if passes.len() < 32 {
            passes.push(next);
        }
        d = next;
    }
    (Verdict::Stalls { pass_s: d }, passes)
}

/// Time to `ready`.
///
/// While the link keeps up with the writes (write rate < bandwidth) both
/// modes stream every write as it comes and the copier runs beside them at
/// [`copy_rate`]: [`streaming_passes`]. Beyond the link:
///
/// * `async`: the backlog overflows, the link falls behind and writes only
///   mark blocks dirty (coalesced): the copy's fixed point of
///   [`fixed_point`] at the (capped) link, d(n+1) = W(dn) x key / bw;
/// * `sync`: the writers are slowed to the link's pace: it does not
///   converge.
pub fn time_to_ready(
    p: &Profile,
    target: &Target,
    link: &Link,
    mode: Mode,
    stat: Stat,
) -> Result<ReadyForecast, ForecastError> {
    ready_with(p, target, link, mode, stat, 1.0)
}

/// [`time_to_ready`] with a throttle keeping the share `keep` of the writes.
fn ready_with(
    p: &Profile,
    target: &Target,
    link: &Link,
    mode: Mode,
    stat: Stat,
    keep: f64,
) -> Result<ReadyForecast, ForecastError> {
    if p.curve.points.is_empty() {
        return Err(ForecastError::NotObserved);
    }
    let bw = link.effective()?;
    let c = copy_rate(p, link, keep)?;
    let wr = p.write_rate() * keep;
    let allocated = target.allocated_bytes as f64;
    let cap = target.cap_keys(p);
    let mode_s = match mode {
        Mode::Async => "async",
        Mode::Sync => "sync",
    };
    // An async share does not stream what changes during a pass: its
    // watcher notes the paths and the next pass sends the files again.
    let journaled = p.kind == KeyKind::Files && mode == Mode::Async;
    if wr < link.bandwidth_bytes_per_s && !journaled {
        let (verdict, passes_s, q) = streaming_passes(p, stat, cap, allocated, c, keep);
        let s = (COPY_BATCH_BLOCKS * p.key_bytes() / c).min(allocated / c);
        return Ok(ReadyForecast {
            mode: mode_s.into(),
            verdict,
            passes_s,
            why: Why::new(
                "streaming-copy",
                "writes are streamed as they come (the link keeps up) and the copier sends \
                 the allocated bytes beside them at copy rate c = min(--max-rate, bw - write \
                 rate): d0 = allocated / c; a write re-dirties only a block in flight (a batch \
                 held s = batch x key / c): pass 1 re-sends W(s) keys, each later pass the \
                 share q = W(s) / working set of the last; ready once a pass takes <= \
                 ready_pass_s; stalls (not_converging) when q >= 0.9",
            )
            .input("allocated_bytes", allocated, "B")
            .input("bandwidth", link.bandwidth_bytes_per_s, "B/s")
            .input("write_rate", wr, "B/s")
            .input("copy_rate", c, "B/s")
            .input("key_bytes", p.key_bytes(), "B")
            .input("batch_keys", COPY_BATCH_BLOCKS, "keys")
            .input("in_flight_s", s, "s")
            .input("w_of_in_flight", p.curve.at(keep * s, stat, cap), "keys")
            .input("redirtied_share", q, "")
            .input("ready_pass_s", READY_PASS_S, "s"),
        });
    }
    match mode {
        Mode::Async => {
            let (verdict, passes_s) = fixed_point(p, stat, cap, allocated, bw, keep);
            let d0 = allocated / bw;
            let w_d0 = p.curve.at(keep * d0, stat, cap);
            Ok(ReadyForecast {
                mode: "async".into(),
                verdict,
                passes_s,
                why: Why::new(
                    "fixed-point",
                    if journaled {
                        "an async share: what changes during a pass is noted (paths) and sent \
                         after it, file by file; pass 0 sends the allocated bytes in d0 = \
                         allocated / bw; pass n+1 re-sends the files changed during pass n, \
                         d(n+1) = W(dn) x key / bw; ready once a pass takes <= ready_pass_s; \
                         time to ready = sum of the passes; diverges when a pass changes as much \
                         as it sends"
                    } else {
                        "writes outrun the link: the async backlog overflows and writes only mark \
                         blocks dirty; pass 0 copies the allocated bytes in d0 = allocated / bw; \
                         pass n+1 re-sends what was dirtied during pass n, d(n+1) = W(dn) x key / \
                         bw; ready once a pass takes <= ready_pass_s; time to ready = sum of the \
                         passes; diverges when a pass dirties as much as it sends"
                    },
                )
                .input("allocated_bytes", allocated, "B")
                .input("bandwidth", bw, "B/s")
                .input("write_rate", wr, "B/s")
                .input("key_bytes", p.key_bytes(), "B")
                .input("ready_pass_s", READY_PASS_S, "s")
                .input("first_pass_s", d0, "s")
                .input("w_of_first_pass", w_d0, "keys"),
            })
        }
        Mode::Sync => Ok(ReadyForecast {
            mode: "sync".into(),
            verdict: Verdict::Diverges {
                pass_s: allocated / bw,
                dirty_rate: wr,
                bandwidth: link.bandwidth_bytes_per_s,
            },
            passes_s: Vec::new(),
            why: Why::new(
                "sync-outrun",
                "every write waits for the link: writes at or above the bandwidth are slowed \
                 to its pace and the copy never gets a share",
            )
            .input("allocated_bytes", allocated, "B")
            .input("bandwidth", link.bandwidth_bytes_per_s, "B/s")
            .input("write_rate", wr, "B/s"),
        }),
    }
}

/// The throttle at which a migration converges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ThrottleForecast {
    pub mode: String,
    /// Smallest throttle percent (writes held back) that converges: 0 when
    /// it converges unthrottled, `None` when even 99 % does not.
    pub throttle_pct: Option<u8>,
    /// The write rate it must be cut to (observed rate × (100 − pct) %), B/s.
    pub write_rate_bytes_per_s: Option<f64>,
    /// Whether auto-converge reaches it (pct ≤ `throttle_pct_max`).
    pub within_auto_converge: bool,
    pub why: Why,
}

/// The throttle (auto-converge's percentage, or the write rate a `--max-rate`
/// user must cut the workload to) at which the migration converges.
pub fn converging_throttle(
    p: &Profile,
    target: &Target,
    link: &Link,
    mode: Mode,
    stat: Stat,
    throttle_pct_max: u8,
) -> Result<ThrottleForecast, ForecastError> {
    if p.curve.points.is_empty() {
        return Err(ForecastError::NotObserved);
    }
    let bw = link.effective()?;
    let wr = p.write_rate();
    let converges = |pct: u8| -> bool {
        let keep = f64::from(100 - pct) / 100.0;
        ready_with(p, target, link, mode, stat, keep).is_ok_and(|r| r.verdict.converges())
    };
    // Converging is monotone in the throttle (W is non-decreasing).
    let pct = if converges(0) {
        Some(0)
    } else if !converges(99) {
        None
    } else {
        let (mut lo, mut hi) = (0u8, 99u8); // lo fails, hi converges
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if converges(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    };
    Ok(ThrottleForecast {
        mode: match mode {
            Mode::Sync => "sync",
            Mode::Async => "async",
        }
        .into(),
        throttle_pct: pct,
        write_rate_bytes_per_s: pct.map(|x| wr * f64::from(100 - x) / 100.0),
        within_auto_converge: pct.is_some_and(|x| x <= throttle_pct_max),
        why: Why::new(
            "converging-throttle",
            "smallest throttle pct for which the time-to-ready forecast converges, a throttle \
             keeping the fraction k of the writes stretching the workload: W_k(T) = W(k T)",
        )
        .input("bandwidth", bw, "B/s")
        .input("write_rate", wr, "B/s")
        .input("throttle_pct_max", f64::from(throttle_pct_max), "%"),
    })
}

/// Steady replication lag in async mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LagForecast {
    pub max_backlog_bytes: f64,
    pub max_lag_s: f64,
    pub mean_lag_s: f64,
    /// Intervals that ended with a backlog above `backlog_bytes_max` (the
    /// link falls behind: a dirty-map resync).
    pub overflows: u64,
    /// The mean write rate reaches the bandwidth: the lag grows without end.
    pub unbounded: bool,
    pub why: Why,
}

/// The async backlog replayed over the observed 10 s totals: b ← max(0,
/// b + written − bw·10 s); lag = b / bw.
pub fn steady_lag(
    p: &Profile,
    link: &Link,
    backlog_bytes_max: u64,
) -> Result<LagForecast, ForecastError> {
    let bw = link.effective()?;
    if p.totals.is_empty() {
        return Err(ForecastError::NotObserved);
    }
    let step = TOTALS_STEP_S as f64;
    let (mut b, mut max_b, mut sum_lag, mut overflows) = (0.0f64, 0.0f64, 0.0, 0u64);
    let mut prev: Option<u64> = None;
    for t in &p.totals {
        if prev.is_some_and(|s| t.start_s != s + TOTALS_STEP_S) {
            b = 0.0; // a gap in the observation: start again
        }
        prev = Some(t.start_s);
        b = (b + t.bytes_written as f64 - bw * step).max(0.0);
        max_b = max_b.max(b);
        sum_lag += b / bw;
        if b > backlog_bytes_max as f64 {
            overflows += 1;
        }
    }
    let written: f64 = p.totals.iter().map(|t| t.bytes_written as f64).sum();
    let unbounded = written / (p.totals.len() as f64 * step) >= bw;
    Ok(LagForecast {
        max_backlog_bytes: max_b,
        max_lag_s: max_b / bw,
        mean_lag_s: sum_lag / p.totals.len() as f64,
        overflows,
        unbounded,
        why: Why::new(
            "async-backlog",
            "backlog replayed over the observed 10 s totals: b = max(0, b + written - bw x 10 s), \
             lag = b / bw",
        )
        .input("bandwidth", bw, "B/s")
        .input("write_rate", p.write_rate(), "B/s")
        .input("backlog_bytes_max", backlog_bytes_max as f64, "B"),
    })
}

/// Inputs of the cutover downtime.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CutoverInputs {
    pub mode: Mode,
    /// Time between the last pre-freeze flush and the freeze, seconds: what
    /// is written in it must be drained inside the freeze (async).
    pub drain_window_s: f64,
    /// Time since the prehash step: the leaves of what is written in it are
    /// re-hashed inside the freeze, seconds.
    pub rehash_window_s: f64,
    /// Leaf hashing speed, bytes/s.
    pub hash_bytes_per_s: f64,
    /// The commit's time, seconds.
    pub commit_s: f64,
    /// The start hook's time from the last test cutover, if any.
    pub start_hook_s: Option<f64>,
}

/// Expected cutover downtime, with its parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CutoverForecast {
    pub seconds: f64,
    pub drain_bytes: f64,
    pub drain_s: f64,
    pub rehash_bytes: f64,
    pub rehash_s: f64,
    pub commit_s: f64,
    pub start_hook_s: f64,
    pub why: Why,
}

/// Downtime = dirty bytes at the freeze / bw + re-hash of the recently
/// written blocks / hash rate + commit + start hook. In sync mode the
/// replica already has every write: nothing to drain.
pub fn cutover_downtime(
    p: &Profile,
    target: &Target,
    link: &Link,
    c: &CutoverInputs,
    stat: Stat,
) -> Result<CutoverForecast, ForecastError> {
    if p.curve.points.is_empty() {
        return Err(ForecastError::NotObserved);
    }
    let bw = link.effective()?;
    let hash = positive("hash_bytes_per_s", c.hash_bytes_per_s)?;
    let drain_w = non_negative("drain_window_s", c.drain_window_s)?;
    let rehash_w = non_negative("rehash_window_s", c.rehash_window_s)?;
    let commit = non_negative("commit_s", c.commit_s)?;
    let hook = non_negative("start_hook_s", c.start_hook_s.unwrap_or(0.0))?;
    let cap = target.cap_keys(p);
    let key = p.key_bytes();
    let drain_bytes = match c.mode {
        Mode::Sync => 0.0,
        Mode::Async => p.curve.at(drain_w, stat, cap) * key,
    };
    let rehash_bytes = p.curve.at(rehash_w, stat, cap) * key;
    let drain_s = drain_bytes / bw;
    let rehash_s = rehash_bytes / hash;
    Ok(CutoverForecast {
        seconds: drain_s + rehash_s + commit + hook,
        drain_bytes,
        drain_s,
        rehash_bytes,
        rehash_s,
        commit_s: commit,
        start_hook_s: hook,
        why: Why::new(
            "cutover-downtime",
            "W(drain window) x key / bw (async; sync has nothing to drain) + W(rehash window) x \
             key / hash rate + commit + start hook",
        )
        .input("drain_window_s", drain_w, "s")
        .input("rehash_window_s", rehash_w, "s")
        .input("bandwidth", bw, "B/s")
        .input("hash_bytes_per_s", hash, "B/s")
        .input("key_bytes", key, "B")
        .input("commit_s", commit, "s")
        .input("start_hook_s", hook, "s"),
    })
}

/// The best hours for a cutover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CutoverWindows {
    /// Up to `n` whole clock hours, fewest distinct keys written first.
    pub hours: Vec<HourStat>,
    pub why: Why,
}

/// The `n` observed hours with the lowest W (ties: the earlier first).
pub fn best_cutover_hours(p: &Profile, n: usize) -> CutoverWindows {
    let mut hours = p.hours.clone();
    hours.sort_by_key(|h| (h.keys, h.start_s));
    hours.truncate(n);
    CutoverWindows {
        hours,
        why: Why::new(
            "best-cutover-hours",
            "whole clock hours of the observation sorted by distinct keys written in the hour",
        )
        .input("hours_observed", p.hours.len() as f64, "h"),
    }
}

/// Which seeding finishes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Seeding {
    Network,
    Shipment,
    /// Neither converges.
    Neither,
}

/// Offline seeding (ship a disk) against an initial sync over the link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SeedingComparison {
    /// Time to ready over the link (async).
    pub network: ReadyForecast,
    pub ship_s: f64,
    /// Bytes dirtied during the shipment: W(ship) x key, at most the size.
    pub catch_up_bytes: f64,
    /// The catch-up after the shipment, to ready (its first pass sends the
    /// catch-up bytes).
    pub catch_up: Verdict,
    /// ship + catch-up, if it converges.
    pub shipment_total_s: Option<f64>,
    pub faster: Seeding,
    pub why: Why,
}

/// Ship a disk in `ship_days` then catch up over the link, or send it all.
pub fn offline_seeding(
    p: &Profile,
    target: &Target,
    link: &Link,
    ship_days: f64,
    stat: Stat,
) -> Result<SeedingComparison, ForecastError> {
    let ship_s = non_negative("ship_days", ship_days)? * 86_400.0;
    let network = time_to_ready(p, target, link, Mode::Async, stat)?;
    let bw = link.effective()?;
    let cap = target.cap_keys(p);
    let catch_up_bytes = p.curve.at(ship_s, stat, cap) * p.key_bytes();
    // The catch-up is a resync like any other: writes streamed beside it
    // while the link keeps up, else only marking blocks dirty.
    let (catch_up, _) = if p.write_rate() < link.bandwidth_bytes_per_s {
        let c = copy_rate(p, link, 1.0)?;
        let (v, passes, _) = streaming_passes(p, stat, cap, catch_up_bytes, c, 1.0);
        (v, passes)
    } else {
        fixed_point(p, stat, cap, catch_up_bytes, bw, 1.0)
    };
    let shipment_total_s = match catch_up {
        Verdict::Converges { seconds, .. } => Some(ship_s + seconds),
        _ => None,
    };
    let net_s = match network.verdict {
        Verdict::Converges { seconds, .. } => Some(seconds),
        _ => None,
    };
    let faster = match (net_s, shipment_total_s) {
        (Some(n), Some(s)) if s < n => Seeding::Shipment,
        (Some(_), _) => Seeding::Network,
        (None, Some(_)) => Seeding::Shipment,
        (None, None) => Seeding::Neither,
    };
    Ok(SeedingComparison {
        network,
        ship_s,
        catch_up_bytes,
        catch_up,
        shipment_total_s,
        faster,
        why: Why::new(
            "offline-seeding",
            "shipment = ship time + fixed point starting from W(ship time) x key (what the \
             workload dirtied meanwhile, W extrapolated subadditively past the longest window \
             observed, at most the size); network = time to ready (async)",
        )
        .input("ship_s", ship_s, "s")
        .input("bandwidth", bw, "B/s")
        .input("longest_window_observed_s", p.curve.longest_s() as f64, "s"),
    })
}

/// One migration sharing a link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub name: String,
    /// Its time to ready alone on the whole link, `None` if it never is.
    pub alone_s: Option<f64>,
}

/// Migrations sharing one link, run one after the other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SharedLinkPlan {
    /// Shortest first; those that never converge last, in input order.
    pub order: Vec<String>,
    /// Completion time of each, in `order`, seconds (`None` from the first
    /// that never converges on).
    pub completions_s: Vec<Option<f64>>,
    /// When the last is ready (the same in any order), if all converge.
    pub total_s: Option<f64>,
    /// Σ completion times: the least of any order (shortest first).
    pub sum_completion_s: Option<f64>,
    pub why: Why,
}

/// The order that gets migrations ready soonest on a shared link.
///
/// Model: one migration at a time on the whole link, each cut over (and
/// off the link) once ready, so job i takes its `alone_s` whatever runs
/// before it. The total is then Σ alone_s in any order, and shortest first
/// minimises Σ completion times (so the mean wait): swapping two adjacent
/// jobs a, b with a > b changes only their two completions, from
/// (s + a) + (s + a + b) to (s + b) + (s + a + b), which is smaller; any
/// order with an inversion is improved by removing it.
pub fn shared_link(jobs: &[Job]) -> SharedLinkPlan {
    let mut ok: Vec<(&str, f64)> = Vec::new();
    let mut never: Vec<&str> = Vec::new();
    for j in jobs {
        match j.alone_s {
            Some(s) if s.is_finite() && s >= 0.0 => ok.push((&j.name, s)),
            _ => never.push(&j.name),
        }
    }
    ok.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut t = 0.0;
    let mut sum = 0.0;
    let mut completions_s = Vec::new();
    let mut order = Vec::new();
    for (n, s) in &ok {
        t += s;
        sum += t;
        completions_s.push(Some(t));
        order.push(n.to_string());
    }
    for n in &never {
        order.push(n.to_string());
        completions_s.push(None);
    }
    let all = never.is_empty();
    SharedLinkPlan {
        order,
        completions_s,
        total_s: all.then_some(t),
        sum_completion_s: all.then_some(sum),
        why: Why::new(
            "shortest-first",
            "one migration at a time on the whole link, each off the link once ready: total = \
             sum of the times alone (any order); shortest first minimises the sum of completion \
             times",
        )
        .input("migrations", jobs.len() as f64, ""),
    }
}

/// Everything a forecast needs besides the profile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForecastInputs {
    pub target: Target,
    pub link: Link,
    /// The mode the migration would run in (cutover downtime).
    pub cutover: CutoverInputs,
    /// Async: most bytes sent but not acknowledged (`backlog_bytes_max`).
    pub backlog_bytes_max: u64,
    /// Auto-converge's largest throttle (`throttle_pct_max`).
    pub throttle_pct_max: u8,
    /// Offline seeding: days a shipped disk takes, if asked.
    pub ship_days: Option<f64>,
    /// How many best cutover hours to list.
    pub best_hours: usize,
    pub stat: Stat,
}

/// Every figure of a forecast, each with its [`Why`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Report {
    pub initial_sync: Seconds,
    pub ready_async: ReadyForecast,
    pub ready_sync: ReadyForecast,
    pub throttle_async: ThrottleForecast,
    pub throttle_sync: ThrottleForecast,
    /// `None` before the first 10 s interval closed.
    pub lag: Option<LagForecast>,
    pub cutover: CutoverForecast,
    pub best_hours: CutoverWindows,
    pub seeding: Option<SeedingComparison>,
    /// The working-set curve the figures were read from.
    pub curve: WorkingSetCurve,
}

/// All the figures at once (what `ferry estimate report` shows).
pub fn report(p: &Profile, i: &ForecastInputs) -> Result<Report, ForecastError> {
    let (t, l, st) = (&i.target, &i.link, i.stat);
    Ok(Report {
        initial_sync: initial_sync(p, t, l)?,
        ready_async: time_to_ready(p, t, l, Mode::Async, st)?,
        ready_sync: time_to_ready(p, t, l, Mode::Sync, st)?,
        throttle_async: converging_throttle(p, t, l, Mode::Async, st, i.throttle_pct_max)?,
        throttle_sync: converging_throttle(p, t, l, Mode::Sync, st, i.throttle_pct_max)?,
        lag: match steady_lag(p, l, i.backlog_bytes_max) {
            Ok(x) => Some(x),
            Err(ForecastError::NotObserved) => None,
            Err(e) => return Err(e),
        },
        cutover: cutover_downtime(p, t, l, &i.cutover, st)?,
        best_hours: best_cutover_hours(p, i.best_hours),
        seeding: match i.ship_days {
            Some(d) => Some(offline_seeding(p, t, l, d, st)?),
            None => None,
        },
        curve: p.curve.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const SIGMA: f64 = HLL_RELATIVE_STD_ERROR;
    const BLOCK: u64 = 64 * 1024;

    /// A deterministic generator (splitmix64 stream).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(1);
            mix64(self.0.wrapping_mul(0x2545_f491_4f6c_dd1d))
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn rel(est: f64, exact: f64) -> f64 {
        (est - exact).abs() / exact.max(1.0)
    }

    #[test]
    fn sketch_is_exact_while_sparse() {
        let mut s = Sketch::new();
        for k in 0..SPARSE_MAX as u64 {
            s.insert(k * 7);
            s.insert(k * 7); // a block written twice counts once
        }
        assert!(s.is_exact());
        assert_eq!(s.count(), SPARSE_MAX as u64);
        assert!(s.heap_bytes() <= Sketch::MAX_HEAP_BYTES);
        s.insert(u64::MAX);
        assert!(!s.is_exact(), "one more key goes dense");
        assert!(rel(s.estimate(), SPARSE_MAX as f64 + 1.0) < 3.0 * SIGMA);
        assert_eq!(s.heap_bytes(), Sketch::MAX_HEAP_BYTES);
    }

    #[test]
    fn hll_estimate_within_three_sigma() {
        let mut rng = Rng(42);
        for &n in &[600u64, 2_000, 5_000, 20_000, 100_000, 1_000_000] {
            let mut s = Sketch::new();
            let base = rng.next();
            for k in 0..n {
                s.insert(base.wrapping_add(k));
            }
            let e = rel(s.estimate(), n as f64);
            assert!(e <= 3.0 * SIGMA, "n={n}: error {e:.4} > 3 sigma");
        }
        assert_eq!(Sketch::new().estimate(), 0.0);
    }

    #[test]
    fn swar_max_is_bytewise_max() {
        let mut rng = Rng(7);
        for _ in 0..10_000 {
            let a = rng.next() & LOW7;
            let b = rng.next() & LOW7;
            let m = bytewise_max(a, b);
            for k in 0..8 {
                let x = (a >> (8 * k)) & 0xff;
                let y = (b >> (8 * k)) & 0xff;
                assert_eq!((m >> (8 * k)) & 0xff, x.max(y));
            }
        }
    }

    #[test]
    fn merge_is_the_sketch_of_the_union() {
        // Every pair of forms: sparse+sparse (staying sparse or going dense),
        // sparse+dense, dense+sparse, dense+dense.
        for &(a, b) in &[
            (100u64, 100u64),
            (400, 400),
            (100, 5_000),
            (5_000, 100),
            (9_000, 20_000),
        ] {
            let mut x = Sketch::new();
            let mut y = Sketch::new();
            let mut u = Sketch::new();
            for k in 0..a {
                x.insert(k);
                u.insert(k);
            }
            // Overlapping by half.
            for k in a / 2..a / 2 + b {
                y.insert(k);
                u.insert(k);
            }
            let mut m = x.clone();
            m.merge(&y);
            assert_eq!(m, u, "merge of {a} and {b} keys");
            let mut m2 = y.clone();
            m2.merge(&x);
            assert_eq!(m2, u, "merge is commutative ({a}, {b})");
        }
    }

    /// Runs `trace` (ms, block) through an observation and compares every
    /// full window with the exact distinct count of the same window.
    fn check_trace(name: &str, start_ms: u64, end_ms: u64, trace: &[(u64, u64)]) {
        let mut o = Observation::new(KeyKind::Blocks { block_bytes: BLOCK }, start_ms);
        o.log = Some(Vec::new());
        for &(ms, b) in trace {
            o.record_write_extent(ms, b * BLOCK, BLOCK);
        }
        o.advance(end_ms);
        let first_s = start_ms / 1000;
        let secs = (end_ms / 1000 - first_s) as usize;
        let mut by_s: Vec<Vec<u64>> = vec![Vec::new(); secs + 1];
        for &(ms, b) in trace {
            by_s[(ms / 1000 - first_s) as usize].push(b);
        }
        let log = o.log.take().unwrap();
        let mut windows = 0usize;
        let mut beyond_3 = 0usize;
        let profile = o.profile();
        for &t in LADDER_S.iter() {
            let (_, hop) = window_plan(t);
            let mut exact_max = 0u64;
            let mut exact_sum = 0u64;
            let mut n = 0u64;
            let mut ws = first_s.div_ceil(hop) * hop;
            while ws + t <= end_ms / 1000 {
                let mut set = HashSet::new();
                for s in ws..ws + t {
                    set.extend(by_s[(s - first_s) as usize].iter().copied());
                }
                let exact = set.len() as u64;
                let got = log
                    .iter()
                    .find(|&&(lt, lws, _)| lt == t && lws == ws)
                    .unwrap_or_else(|| panic!("{name}: window T={t} at {ws} missing"))
                    .2;
                if exact <= SPARSE_MAX as u64 {
                    assert_eq!(got, exact, "{name}: T={t} at {ws}: a small set is exact");
                }
                let e = rel(got as f64, exact as f64);
                assert!(e <= 5.0 * SIGMA, "{name}: T={t} at {ws}: {got} vs {exact}");
                if e > 3.0 * SIGMA {
                    beyond_3 += 1;
                }
                windows += 1;
                exact_max = exact_max.max(exact);
                exact_sum += exact;
                n += 1;
                ws += hop;
            }
            let logged = log.iter().filter(|w| w.0 == t).count() as u64;
            assert_eq!(logged, n, "{name}: T={t}: as many windows as expected");
            if n == 0 {
                assert!(profile.curve.points.iter().all(|p| p.window_s != t));
                continue;
            }
            let p = profile
                .curve
                .points
                .iter()
                .find(|p| p.window_s == t)
                .unwrap();
            assert_eq!(p.windows, n);
            // The max of n estimates picks up their noise: within
            // sqrt(2 ln n) + 3 sigma; the mean averages it out: 3 sigma.
            let max_tol = ((2.0 * (n as f64).ln()).sqrt() + 3.0) * SIGMA;
            let em = rel(p.max_keys as f64, exact_max as f64);
            assert!(
                em <= max_tol,
                "{name}: T={t}: max {} vs {exact_max}",
                p.max_keys
            );
            let mean = exact_sum as f64 / n as f64;
            assert!(
                rel(p.mean_keys, mean) <= 3.0 * SIGMA,
                "{name}: T={t}: mean {} vs {mean}",
                p.mean_keys
            );
            eprintln!(
                "{name}: T={t:>5} s windows={n:>5} W max {:>8} exact {exact_max:>8} ({:+.2} %), mean {:>10.1} exact {mean:>10.1} ({:+.2} %)",
                p.max_keys,
                100.0 * (p.max_keys as f64 - exact_max as f64) / exact_max.max(1) as f64,
                p.mean_keys,
                100.0 * (p.mean_keys - mean) / mean.max(1.0)
            );
        }
        // 99.73 % of normal errors fall within 3 sigma; allow 1 %.
        assert!(
            beyond_3 * 100 <= windows,
            "{name}: {beyond_3} of {windows} windows beyond 3 sigma"
        );
    }

    const TRACE_S: u64 = 1_900;

    #[test]
    fn working_set_matches_exact_count_uniform() {
        let mut rng = Rng(1);
        let start = 1_700_000_000_250; // not aligned to anything
        let mut trace = Vec::new();
        for s in 0..TRACE_S {
            for i in 0..200 {
                trace.push((start + s * 1000 + i * 5, rng.below(200_000)));
            }
        }
        check_trace("uniform", start, start + TRACE_S * 1000 + 1, &trace);
    }

    #[test]
    fn working_set_matches_exact_count_hot_and_cold() {
        let mut rng = Rng(2);
        let mut trace = Vec::new();
        for s in 0..TRACE_S {
            for i in 0..200 {
                let b = if rng.below(10) < 9 {
                    rng.below(1_000)
                } else {
                    1_000 + rng.below(10_000_000)
                };
                trace.push((s * 1000 + i * 5, b));
            }
        }
        check_trace("hot-cold", 0, TRACE_S * 1000, &trace);
    }

    #[test]
    fn working_set_matches_exact_count_sequential() {
        let mut trace = Vec::new();
        let mut b = 0u64;
        for s in 0..TRACE_S {
            for i in 0..150 {
                trace.push((s * 1000 + i * 6, b));
                b = (b + 1) % 100_000; // wraps: long windows saturate
            }
        }
        check_trace("sequential", 0, TRACE_S * 1000, &trace);
    }

    #[test]
    fn a_burst_across_a_window_boundary_is_seen_whole() {
        // 400 distinct blocks (exact) in each of seconds 8..12, nothing
        // else: tumbling 10 s windows would see at most 800; hopping by
        // 5 s, the window [5, 15) holds all 1,600.
        let mut o = Observation::new(KeyKind::Blocks { block_bytes: BLOCK }, 0);
        let mut b = 0;
        for s in 8..12u64 {
            for i in 0..400 {
                o.record_write_extent(s * 1000 + i, b * BLOCK, BLOCK);
                b += 1;
            }
        }
        o.advance(30_000);
        let p = o.profile();
        let w10 = p.curve.points.iter().find(|p| p.window_s == 10).unwrap();
        assert!(
            rel(w10.max_keys as f64, 1_600.0) <= 3.0 * SIGMA,
            "{}",
            w10.max_keys
        );
        let w5 = p.curve.points.iter().find(|p| p.window_s == 5).unwrap();
        // Windows of 5 s hop by 2 s: [8, 13) holds it too.
        assert!(
            rel(w5.max_keys as f64, 1_600.0) <= 3.0 * SIGMA,
            "{}",
            w5.max_keys
        );
        let w1 = p.curve.points.iter().find(|p| p.window_s == 1).unwrap();
        assert_eq!(
            (w1.max_keys, w1.windows),
            (400, 30),
            "a second of 400 is exact"
        );
    }

    #[test]
    fn memory_stays_under_the_bound_over_24_hours_of_heavy_writes() {
        // 600 random 64 KiB writes a second (37.5 MiB/s) over a 1 TiB
        // volume for 24 h: every interval sketch is dense.
        let mut rng = Rng(3);
        let mut o = Observation::new(KeyKind::Blocks { block_bytes: BLOCK }, 0);
        let mut peak = 0;
        for s in 0..86_400u64 {
            for i in 0..600 {
                o.record_write_extent(s * 1000 + i, rng.below(1 << 24) * BLOCK, BLOCK);
            }
            if s % 10 == 0 {
                peak = peak.max(o.memory_bytes());
            }
        }
        o.advance(86_400_000);
        peak = peak.max(o.memory_bytes());
        eprintln!("memory peak {peak} B, bound {MEMORY_BOUND_BYTES} B");
        assert!(
            peak <= MEMORY_BOUND_BYTES,
            "{peak} B > {MEMORY_BOUND_BYTES} B"
        );
        let p = o.profile();
        assert_eq!(
            p.curve.points.len(),
            LADDER_S.len(),
            "every window length seen, 24 h included"
        );
        assert_eq!(p.totals.len(), TOTALS_KEEP);
        assert_eq!(p.hours.len(), 24);
        assert_eq!(p.bytes_written, 86_400 * 600 * BLOCK);
        // The day's working set: 51.84 M writes over 16.78 M blocks.
        let n = 86_400.0 * 600.0;
        let m = (1u64 << 24) as f64;
        let expect = m * (1.0 - (-n / m).exp());
        let day = p.curve.points.last().unwrap();
        assert!(
            rel(day.max_keys as f64, expect) <= 3.0 * SIGMA,
            "{} vs {expect}",
            day.max_keys
        );
    }

    #[test]
    fn the_stated_bound_covers_the_worst_case() {
        use std::mem::size_of;
        let open: usize = LADDER_S
            .iter()
            .map(|&t| t.div_ceil(window_plan(t).1) as usize)
            .sum::<usize>()
            + 1;
        assert_eq!(open, 32);
        let worst = size_of::<Observation>()
            + (LEVELS_S.len() + open) * Sketch::MAX_HEAP_BYTES
            + (LADDER_S.len() + 1)
                * (size_of::<Track>() + OPEN_WINDOWS_MAX * size_of::<(u64, Sketch)>())
            + TOTALS_KEEP * size_of::<IntervalTotals>()
            + HOURS_KEEP * size_of::<HourStat>();
        eprintln!(
            "worst {worst} B: observation {} B, sketch {} B, track {} B, window {} B, totals {} B, hour {} B",
            size_of::<Observation>(),
            Sketch::MAX_HEAP_BYTES,
            size_of::<Track>(),
            size_of::<(u64, Sketch)>(),
            size_of::<IntervalTotals>(),
            size_of::<HourStat>()
        );
        assert!(worst <= MEMORY_BOUND_BYTES, "{worst}");
    }

    #[test]
    fn totals_hours_and_files() {
        let mut o = Observation::new(KeyKind::Files, 0);
        // Hour 0: 300 files; hour 1: nothing; hour 2: 20 files; hour 3: 100.
        for s in 0..4 * 3_600u64 {
            let hour = s / 3_600;
            let files = [300u64, 0, 20, 100][hour as usize];
            if files > 0 {
                let f = s % files;
                o.record_write_key(s * 1000, file_key(format!("dir/f{f}").as_bytes()), 1_000);
            }
            o.record_reads(s * 1000 + 500, 2);
        }
        o.advance(4 * 3_600_000);
        let p = o.profile();
        assert_eq!(p.kind, KeyKind::Files);
        let keys: Vec<u64> = p.hours.iter().map(|h| h.keys).collect();
        assert_eq!(keys, vec![300, 0, 20, 100]);
        let bytes: Vec<u64> = p.hours.iter().map(|h| h.bytes_written).collect();
        assert_eq!(bytes, vec![3_600_000, 0, 3_600_000, 3_600_000]);
        assert_eq!(p.totals.len(), 4 * 360);
        let t = p.totals[0];
        assert_eq!(
            (t.start_s, t.bytes_written, t.write_ios, t.read_ios, t.keys),
            (0, 10_000, 10, 20, 10)
        );
        assert_eq!(p.curve.points[0].max_keys, 1, "one file a second");
        let best = best_cutover_hours(&p, 2);
        assert_eq!(
            best.hours.iter().map(|h| h.start_s).collect::<Vec<_>>(),
            vec![3_600, 7_200]
        );
        assert_eq!(p.key_bytes(), 1_000.0);
    }

    #[test]
    fn gaps_and_clock_steps_do_not_break_it() {
        let mut o = Observation::new(KeyKind::Blocks { block_bytes: BLOCK }, 10_000);
        o.record_write_extent(12_000, 0, 3 * BLOCK + 1); // 4 blocks
        o.record_write_extent(11_000, 0, 0); // backwards, empty
        o.record_write_extent(u64::MAX / 2, u64::MAX - 10, 100); // a huge jump, the last block
        o.advance(u64::MAX / 2 + 5_000);
        let p = o.profile();
        assert_eq!(p.write_ios, 3);
        assert_eq!(p.curve.points[0].max_keys, 4);
        assert!(o.memory_bytes() <= MEMORY_BOUND_BYTES);
    }

    #[test]
    fn survives_a_restart_through_serde() {
        let mut rng = Rng(9);
        let mut o = Observation::new(KeyKind::Blocks { block_bytes: BLOCK }, 0);
        let feed = |o: &mut Observation, from: u64, to: u64, rng: &mut Rng| {
            for s in from..to {
                for i in 0..300 {
                    o.record_write_extent(s * 1000 + i, rng.below(1 << 20) * BLOCK, 4096);
                }
                o.record_reads(s * 1000 + 999, 3);
            }
        };
        feed(&mut o, 0, 700, &mut rng);
        let json = serde_json::to_string(&o).unwrap();
        let mut back: Observation = serde_json::from_str(&json).unwrap();
        assert!(back.memory_bytes() <= MEMORY_BOUND_BYTES);
        // Fed the same, the restored one says exactly what the original does.
        let mut rng2 = Rng(rng.0);
        feed(&mut o, 700, 1_300, &mut rng);
        feed(&mut back, 700, 1_300, &mut rng2);
        o.advance(1_300_000);
        back.advance(1_300_000);
        assert_eq!(o.profile(), back.profile());
        assert!(back
            .profile()
            .curve
            .points
            .iter()
            .any(|p| p.window_s == 600));

        // Damage is refused, not trusted.
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let mut bad = v.clone();
        bad["tracks"].as_array_mut().unwrap().pop();
        assert!(serde_json::from_value::<Observation>(bad).is_err());
        let mut bad = v.clone();
        bad["levels"][1] = serde_json::json!({ "dense": [1, 2, 3] });
        let e = serde_json::from_value::<Observation>(bad).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        let mut bad = v.clone();
        bad["levels"][1] = serde_json::json!({ "sparse": [5, 4] });
        assert!(serde_json::from_value::<Observation>(bad).is_err());
        let mut bad = v;
        bad["totals"] = serde_json::json!(vec![IntervalTotals::default(); TOTALS_KEEP + 1]);
        assert!(serde_json::from_value::<Observation>(bad).is_err());
    }

    #[test]
    fn resume_does_not_count_the_downtime_as_idle() {
        let mut o = Observation::new(KeyKind::Blocks { block_bytes: BLOCK }, 0);
        for s in 0..100u64 {
            o.record_write_extent(s * 1000, s * BLOCK, BLOCK);
        }
        o.advance(100_000);
        let before = o.profile();
        let ones = |p: &Profile| p.curve.points[0].windows;
        assert_eq!(ones(&before), 100);
        // Down from 100 s to 1,000 s.
        o.resume(1_000_000);
        o.advance(1_010_000);
        let after = o.profile();
        assert_eq!(
            ones(&after),
            110,
            "only the 10 s after the restart are new windows"
        );
        assert_eq!(after.observed_s, 110.0);
        assert_eq!(after.curve.points[0].mean_keys, 100.0 / 110.0);
    }

    // ---- forecasts on hand-computed cases ----

    /// W(T) = keys_per_s · T, block `block` bytes, writing `write_rate` B/s
    /// for a day.
    fn linear(block: u64, keys_per_s: f64, write_rate: f64) -> Profile {
        Profile {
            kind: KeyKind::Blocks { block_bytes: block },
            observed_s: 86_400.0,
            bytes_written: (write_rate * 86_400.0) as u64,
            write_ios: 1,
            read_ios: 0,
            curve: WorkingSetCurve {
                points: vec![
                    CurvePoint {
                        window_s: 1,
                        max_keys: keys_per_s as u64,
                        mean_keys: keys_per_s,
                        windows: 1,
                    },
                    CurvePoint {
                        window_s: 86_400,
                        max_keys: (keys_per_s * 86_400.0) as u64,
                        mean_keys: keys_per_s * 86_400.0,
                        windows: 1,
                    },
                ],
            },
            totals: Vec::new(),
            hours: Vec::new(),
        }
    }

    const MIB: u64 = 1 << 20;

    fn link(bw: f64) -> Link {
        Link {
            bandwidth_bytes_per_s: bw,
            max_rate_bytes_per_s: None,
        }
    }

    #[test]
    fn fixed_point_converges_halving_each_pass() {
        // Writes only marking blocks dirty (an async link fallen behind): 8
        // MiB/s of distinct blocks against 16 MiB/s, each pass half the last.
        let p = linear(MIB, 8.0, 8.0 * MIB as f64);
        let t = Target {
            allocated_bytes: 1024 * 16 * MIB,
            size_bytes: 1 << 50,
        };
        let bw = 16.0 * MIB as f64;
        let (v, passes) = fixed_point(&p, Stat::Max, t.cap_keys(&p), 16384.0 * MIB as f64, bw, 1.0);
        // 1024 + 512 + … + 1 = 2047 s in 11 passes.
        assert_eq!(
            v,
            Verdict::Converges {
                seconds: 2047.0,
                passes: 11
            }
        );
        assert_eq!(passes[..3], [1024.0, 512.0, 256.0]);
        // At 8 MiB/s the writes equal the link.
        let (v, _) = fixed_point(
            &p,
            Stat::Max,
            t.cap_keys(&p),
            16384.0 * MIB as f64,
            bw / 2.0,
            1.0,
        );
        assert!(
            matches!(v, Verdict::Diverges { pass_s, .. } if pass_s == 2048.0),
            "{v:?}"
        );
    }

    /// A 32 MiB hot set of 64 KiB blocks rewritten at 2 MiB/s: 32 distinct
    /// blocks a second, all 512 within 30 s.
    fn hot_set(keys_per_s: f64, hot_keys: u64, write_rate: f64) -> Profile {
        let mut p = linear(65_536, keys_per_s, write_rate);
        p.observed_s = 60.0;
        p.bytes_written = (write_rate * 60.0) as u64;
        p.curve.points = [1u64, 10, 30]
            .iter()
            .map(|&w| CurvePoint {
                window_s: w,
                max_keys: ((keys_per_s * w as f64) as u64).min(hot_keys),
                mean_keys: (keys_per_s * w as f64).min(hot_keys as f64),
                windows: 1,
            })
            .collect();
        p
    }

    #[test]
    fn an_async_share_sends_what_changed_during_a_pass_after_it() {
        // tests/estimate_accuracy.rs: 40 MiB of files over a 4 MiB/s link
        // while 16 files of 64 KiB are rewritten 8 a second. The resync
        // gets the whole link (changes are noted, not streamed): 10 s; the
        // next pass sends the 16 files changed meanwhile: 0.25 s.
        let mut p = hot_set(8.0, 16, 0.5 * MIB as f64);
        p.kind = KeyKind::Files;
        p.write_ios = p.bytes_written / 65_536;
        assert_eq!(p.key_bytes(), 65_536.0);
        let t = Target {
            allocated_bytes: 40 * MIB,
            size_bytes: 40 * MIB,
        };
        let l = Link {
            bandwidth_bytes_per_s: 4.0 * MIB as f64,
            max_rate_bytes_per_s: None,
        };
        assert_eq!(initial_sync(&p, &t, &l).unwrap().seconds, 10.0);
        let r = time_to_ready(&p, &t, &l, Mode::Async, Stat::Max).unwrap();
        assert_eq!(r.why.formula, "fixed-point");
        assert!(r.why.explanation.starts_with("an async share"), "{r:?}");
        assert_eq!(
            r.verdict,
            Verdict::Converges {
                seconds: 10.25,
                passes: 2
            },
            "{r:?}"
        );
        // A sync share's writes are streamed as they come (its FUSE mount).
        let r = time_to_ready(&p, &t, &l, Mode::Sync, Stat::Max).unwrap();
        assert_eq!(r.why.formula, "streaming-copy");
    }

    #[test]
    fn streamed_writes_redirty_only_the_blocks_in_flight() {
        // What ferry's migration does (tests/estimate_accuracy.rs measured
        // ready at 25.1 s where the pass-by-pass W(pass) model said 34.9 s):
        // writes are streamed as they come, --max-rate caps the copier only;
        // the copier holds a batch of 16 blocks (1 MiB) for 0.25 s at 4 MiB/s
        // and only writes landing on it then re-dirty it: W(0.25 s) = 8 keys.
        let p = hot_set(32.0, 512, 2.0 * MIB as f64);
        let t = Target {
            allocated_bytes: 96 * MIB,
            size_bytes: 256 * MIB,
        };
        let l = Link {
            bandwidth_bytes_per_s: 1e9,
            max_rate_bytes_per_s: Some(4.0 * MIB as f64),
        };
        assert_eq!(initial_sync(&p, &t, &l).unwrap().seconds, 24.0);
        for mode in [Mode::Async, Mode::Sync] {
            let r = time_to_ready(&p, &t, &l, mode, Stat::Max).unwrap();
            assert_eq!(r.why.formula, "streaming-copy");
            assert_eq!(
                r.verdict,
                Verdict::Converges {
                    seconds: 24.125,
                    passes: 2
                },
                "{r:?}"
            );
        }
        // Streamed writes take their share of the link first: on a 6 MiB/s
        // link the copy gets 4 MiB/s, on a 5 MiB/s link 3 MiB/s.
        let l5 = Link {
            bandwidth_bytes_per_s: 5.0 * MIB as f64,
            ..l
        };
        assert_eq!(initial_sync(&p, &t, &l5).unwrap().seconds, 32.0);
        // A 8 MiB hot set rewritten 4 KiB at a time faster than a 1 MiB/s
        // copy can hold a batch unwritten: every block in flight is
        // re-dirtied, the migration reports not_converging.
        let p = hot_set(128.0, 128, 2.0 * MIB as f64);
        let l = Link {
            bandwidth_bytes_per_s: 1e9,
            max_rate_bytes_per_s: Some(MIB as f64),
        };
        let t = Target {
            allocated_bytes: 8 * MIB,
            size_bytes: 64 * MIB,
        };
        let r = time_to_ready(&p, &t, &l, Mode::Async, Stat::Max).unwrap();
        assert!(matches!(r.verdict, Verdict::Stalls { .. }), "{r:?}");
        // Beyond the link the async backlog overflows and writes only dirty
        // blocks: the pass-by-pass fixed point.
        let l = Link {
            bandwidth_bytes_per_s: 1.5 * MIB as f64,
            max_rate_bytes_per_s: None,
        };
        let r = time_to_ready(&p, &t, &l, Mode::Async, Stat::Max).unwrap();
        assert_eq!(r.why.formula, "fixed-point");
        assert!(!r.verdict.converges(), "{r:?}");
        let r = time_to_ready(&p, &t, &l, Mode::Sync, Stat::Max).unwrap();
        assert!(matches!(r.verdict, Verdict::Diverges { .. }), "{r:?}");
    }

    #[test]
    fn fixed_point_diverges_when_writes_outrun_the_link() {
        let p = linear(MIB, 8.0, 8.0 * MIB as f64);
        let t = Target {
            allocated_bytes: 1024 * MIB,
            size_bytes: 1 << 50,
        };
        let r = time_to_ready(&p, &t, &link(4.0 * MIB as f64), Mode::Async, Stat::Max).unwrap();
        assert_eq!(
            r.verdict,
            Verdict::Diverges {
                pass_s: 256.0,
                dirty_rate: 8.0 * MIB as f64,
                bandwidth: 4.0 * MIB as f64
            }
        );
    }

    #[test]
    fn fixed_point_stalls_above_the_ready_pass() {
        // W(T) = 80 + 8 T blocks of 1 MiB at 16 MiB/s: d' = 5 + d/2, fixed
        // point 10 s > READY_PASS_S: never ready.
        let mut p = linear(MIB, 8.0, 0.0);
        p.curve.points = vec![
            CurvePoint {
                window_s: 1,
                max_keys: 88,
                mean_keys: 88.0,
                windows: 1,
            },
            CurvePoint {
                window_s: 86_400,
                max_keys: 80 + 8 * 86_400,
                mean_keys: 0.0,
                windows: 1,
            },
        ];
        let t = Target {
            allocated_bytes: 1024 * 16 * MIB,
            size_bytes: 1 << 50,
        };
        let (v, _) = fixed_point(
            &p,
            Stat::Max,
            t.cap_keys(&p),
            t.allocated_bytes as f64,
            16.0 * MIB as f64,
            1.0,
        );
        match v {
            Verdict::Stalls { pass_s } => assert!((pass_s - 10.0).abs() < 1e-6, "{pass_s}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn sync_mode_shares_the_link_with_the_writes() {
        let p = linear(MIB, 8.0, 50e6);
        let t = Target {
            allocated_bytes: 1_000_000_000,
            size_bytes: 1 << 40,
        };
        // The copy gets 50e6 B/s: 20 s, then the 1 MiB blocks written while
        // a batch of 16 was in flight (16 MiB / 50e6 B/s at 8 a second).
        let r = time_to_ready(&p, &t, &link(100e6), Mode::Sync, Stat::Max).unwrap();
        let s = 16.0 * MIB as f64 / 50e6;
        assert_eq!(
            r.verdict,
            Verdict::Converges {
                seconds: 20.0 + 8.0 * s * MIB as f64 / 50e6,
                passes: 2
            }
        );
        let p = linear(MIB, 8.0, 150e6);
        let r = time_to_ready(&p, &t, &link(100e6), Mode::Sync, Stat::Max).unwrap();
        assert!(!r.verdict.converges());
    }

    #[test]
    fn converging_throttle_cuts_writes_below_the_link() {
        // Distinct blocks at 3x the link: a throttle keeping k of the writes
        // converges iff 3k < 1: 67 % (k = 0.33), not 66 % (k = 0.34).
        let p = linear(MIB, 48.0, 60e6);
        let t = Target {
            allocated_bytes: 1 << 30,
            size_bytes: 1 << 50,
        };
        let l = link(16.0 * MIB as f64);
        let a = converging_throttle(&p, &t, &l, Mode::Async, Stat::Max, 90).unwrap();
        assert_eq!(a.throttle_pct, Some(67));
        assert!((a.write_rate_bytes_per_s.unwrap() - 60e6 * 0.33).abs() < 1.0);
        assert!(a.within_auto_converge);
        let a = converging_throttle(&p, &t, &l, Mode::Async, Stat::Max, 60).unwrap();
        assert!(!a.within_auto_converge);
        // Sync: 60e6 B/s of writes on 16 MiB/s: k < 0.2796 → 73 %.
        let s = converging_throttle(&p, &t, &l, Mode::Sync, Stat::Max, 90).unwrap();
        assert_eq!(s.throttle_pct, Some(73));
        // Already converging: 0 %.
        let s = converging_throttle(&p, &t, &link(1e9), Mode::Async, Stat::Max, 90).unwrap();
        assert_eq!(s.throttle_pct, Some(0));
    }

    #[test]
    fn steady_lag_replays_the_backlog() {
        let mut p = linear(MIB, 1.0, 0.0);
        p.totals = [20e6, 0.0, 5e6, 30e6]
            .iter()
            .enumerate()
            .map(|(i, &b)| IntervalTotals {
                start_s: i as u64 * 10,
                bytes_written: b as u64,
                ..Default::default()
            })
            .collect();
        // 1 MB/s drains 10 MB per interval: backlog 10, 0, 0, 20 MB.
        let l = steady_lag(&p, &link(1e6), 15_000_000).unwrap();
        assert_eq!(l.max_backlog_bytes, 20e6);
        assert_eq!(l.max_lag_s, 20.0);
        assert_eq!(l.mean_lag_s, 7.5);
        assert_eq!(l.overflows, 1);
        assert!(l.unbounded, "55 MB in 40 s > 1 MB/s");
        assert!(!steady_lag(&p, &link(2e6), 15_000_000).unwrap().unbounded);
        // A gap in the observation (a restart) starts the backlog again.
        p.totals[1].start_s = 500;
        p.totals[2].start_s = 510;
        p.totals[3].start_s = 520;
        let l = steady_lag(&p, &link(1e6), 15_000_000).unwrap();
        assert_eq!(l.max_backlog_bytes, 20e6);
        assert_eq!(l.mean_lag_s, 7.5, "10, 0 (restart), 0, 20 MB");
        p.totals[0].bytes_written = 40_000_000;
        let l = steady_lag(&p, &link(1e6), 15_000_000).unwrap();
        assert_eq!(
            l.mean_lag_s, 12.5,
            "30, 0 (the 30 MB backlog does not carry over), 0, 20 MB"
        );
    }

    #[test]
    fn cutover_downtime_adds_its_parts() {
        // 100 blocks/s of 64 KiB, link 100 blocks/s: a 2 s drain window is
        // 2 s; 3 s of writes re-hashed at 3000 blocks/s: 0.1 s; + 0.5 + 1.5.
        let p = linear(BLOCK, 100.0, 0.0);
        let t = Target {
            allocated_bytes: 1 << 30,
            size_bytes: 1 << 40,
        };
        let mut c = CutoverInputs {
            mode: Mode::Async,
            drain_window_s: 2.0,
            rehash_window_s: 3.0,
            hash_bytes_per_s: 3000.0 * BLOCK as f64,
            commit_s: 0.5,
            start_hook_s: Some(1.5),
        };
        let l = link(100.0 * BLOCK as f64);
        let f = cutover_downtime(&p, &t, &l, &c, Stat::Max).unwrap();
        assert_eq!(f.drain_bytes, 200.0 * BLOCK as f64);
        assert_eq!(f.drain_s, 2.0);
        assert!((f.rehash_s - 0.1).abs() < 1e-12);
        assert!((f.seconds - 4.1).abs() < 1e-12, "{}", f.seconds);
        c.mode = Mode::Sync;
        c.start_hook_s = None;
        let f = cutover_downtime(&p, &t, &l, &c, Stat::Max).unwrap();
        assert!((f.seconds - 0.6).abs() < 1e-12, "{}", f.seconds);
        // The drain is capped by the size.
        let small = Target {
            allocated_bytes: BLOCK,
            size_bytes: 10 * BLOCK,
        };
        c.mode = Mode::Async;
        let f = cutover_downtime(&p, &small, &l, &c, Stat::Max).unwrap();
        assert_eq!(f.drain_bytes, 10.0 * BLOCK as f64);
    }

    #[test]
    fn offline_seeding_ships_a_big_disk() {
        // 8 MiB/s distinct, link 16 MiB/s; 8 TiB allocated: 2^19 s first
        // pass, then the 8 blocks written while a 1 s batch was in flight
        // (0.5 s). Ship 2 days: 1,382,400 MiB dirtied, catch-up 86,400 s
        // + 0.5 s.
        let p = linear(MIB, 8.0, 0.0);
        let t = Target {
            allocated_bytes: 8 << 40,
            size_bytes: 16 << 40,
        };
        let l = link(16.0 * MIB as f64);
        let c = offline_seeding(&p, &t, &l, 2.0, Stat::Max).unwrap();
        assert_eq!(
            c.network.verdict,
            Verdict::Converges {
                seconds: 524_288.5,
                passes: 2
            }
        );
        assert_eq!(c.catch_up_bytes, 1_382_400.0 * MIB as f64);
        assert_eq!(
            c.catch_up,
            Verdict::Converges {
                seconds: 86_400.5,
                passes: 2
            }
        );
        assert_eq!(c.shipment_total_s, Some(172_800.0 + 86_400.5));
        assert_eq!(c.faster, Seeding::Shipment);
        // A small disk: the network wins; the catch-up is capped at the size.
        let t = Target {
            allocated_bytes: 16 << 30,
            size_bytes: 64 << 30,
        };
        let c = offline_seeding(&p, &t, &l, 1.0, Stat::Max).unwrap();
        assert_eq!(c.catch_up_bytes, (64u64 << 30) as f64);
        assert_eq!(c.faster, Seeding::Network);
    }

    #[test]
    fn report_gathers_every_figure_and_serializes() {
        let mut o = Observation::new(KeyKind::Blocks { block_bytes: BLOCK }, 0);
        let mut rng = Rng(5);
        for s in 0..7_300u64 {
            for i in 0..50 {
                o.record_write_extent(s * 1000 + i, rng.below(100_000) * BLOCK, BLOCK);
            }
        }
        o.advance(7_300_000);
        let p = o.profile();
        let inputs = ForecastInputs {
            target: Target {
                allocated_bytes: 4 << 30,
                size_bytes: 100_000 * BLOCK,
            },
            link: link(100e6),
            cutover: CutoverInputs {
                mode: Mode::Async,
                drain_window_s: 1.0,
                rehash_window_s: 1.0,
                hash_bytes_per_s: 1e9,
                commit_s: 0.2,
                start_hook_s: None,
            },
            backlog_bytes_max: 64 << 20,
            throttle_pct_max: 90,
            ship_days: Some(3.0),
            best_hours: 3,
            stat: Stat::Max,
        };
        let r = report(&p, &inputs).unwrap();
        // 3.28 MB/s of writes on 100 MB/s: both modes converge, unthrottled.
        assert!(r.ready_async.verdict.converges() && r.ready_sync.verdict.converges());
        assert_eq!(r.throttle_async.throttle_pct, Some(0));
        // The copy gets what the streamed writes leave of the link.
        assert_eq!(
            r.initial_sync.seconds,
            (4u64 << 30) as f64 / (100e6 - p.write_rate())
        );
        assert_eq!(r.best_hours.hours.len(), 2);
        assert_eq!(r.seeding.as_ref().unwrap().faster, Seeding::Network);
        assert!(!r.lag.as_ref().unwrap().unbounded);
        // 50 blocks a second: the drain of 1 s is 50 blocks (exact while sparse).
        assert_eq!(r.cutover.drain_bytes, 50.0 * BLOCK as f64);
        let json = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert!(json.contains("\"formula\":\"streaming-copy\""));
    }

    fn permutations(v: &[f64]) -> Vec<Vec<f64>> {
        if v.len() <= 1 {
            return vec![v.to_vec()];
        }
        let mut out = Vec::new();
        for i in 0..v.len() {
            let mut rest = v.to_vec();
            let x = rest.remove(i);
            for mut p in permutations(&rest) {
                p.insert(0, x);
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn shared_link_shortest_first_minimises_the_sum_of_completions() {
        let times = [300.0, 20.0, 4_000.0, 75.0, 75.0, 1.0];
        let jobs: Vec<Job> = times
            .iter()
            .enumerate()
            .map(|(i, &s)| Job {
                name: format!("w{i}"),
                alone_s: Some(s),
            })
            .collect();
        let plan = shared_link(&jobs);
        assert_eq!(plan.order, ["w5", "w1", "w3", "w4", "w0", "w2"]);
        assert_eq!(plan.total_s, Some(times.iter().sum()));
        let best = permutations(&times)
            .iter()
            .map(|p| {
                p.iter()
                    .scan(0.0, |t, x| {
                        *t += x;
                        Some(*t)
                    })
                    .sum::<f64>()
            })
            .fold(f64::INFINITY, f64::min);
        assert_eq!(plan.sum_completion_s, Some(best));
        assert_eq!(plan.completions_s[0], Some(1.0));
        // One that never converges goes last and leaves no total.
        let mut jobs = jobs;
        jobs.insert(
            0,
            Job {
                name: "hot".into(),
                alone_s: None,
            },
        );
        let plan = shared_link(&jobs);
        assert_eq!(plan.order.last().unwrap(), "hot");
        assert_eq!(plan.completions_s.last().unwrap(), &None);
        assert_eq!(plan.total_s, None);
    }

    #[test]
    fn forecasts_refuse_bad_inputs() {
        let p = linear(MIB, 8.0, 0.0);
        let t = Target {
            allocated_bytes: 1,
            size_bytes: 1,
        };
        assert!(matches!(
            initial_sync(&p, &t, &link(0.0)),
            Err(ForecastError::BadInput { .. })
        ));
        assert!(matches!(
            initial_sync(&p, &t, &link(f64::NAN)),
            Err(ForecastError::BadInput { .. })
        ));
        let mut empty = p.clone();
        empty.curve.points.clear();
        assert_eq!(
            time_to_ready(&empty, &t, &link(1.0), Mode::Async, Stat::Max),
            Err(ForecastError::NotObserved)
        );
        assert_eq!(
            steady_lag(&p, &link(1.0), 0),
            Err(ForecastError::NotObserved)
        );
    }

    #[test]
    fn curve_interpolates_and_extrapolates() {
        let c = WorkingSetCurve {
            points: vec![
                CurvePoint {
                    window_s: 10,
                    max_keys: 100,
                    mean_keys: 50.0,
                    windows: 1,
                },
                CurvePoint {
                    window_s: 60,
                    max_keys: 90,
                    mean_keys: 60.0,
                    windows: 1,
                }, // noise: made monotone
                CurvePoint {
                    window_s: 600,
                    max_keys: 1_000,
                    mean_keys: 500.0,
                    windows: 1,
                },
            ],
        };
        assert_eq!(c.at(5.0, Stat::Max, 1e9), 50.0);
        assert_eq!(c.at(35.0, Stat::Max, 1e9), 100.0);
        assert_eq!(c.at(330.0, Stat::Max, 1e9), 550.0);
        assert_eq!(c.at(1_200.0, Stat::Max, 1e9), 2_000.0);
        assert_eq!(c.at(1_200.0, Stat::Max, 1_500.0), 1_500.0);
        assert_eq!(c.at(600.0, Stat::Mean, 1e9), 500.0);
        assert_eq!(c.at(0.0, Stat::Max, 1e9), 0.0);
    }
}
