//! Statistics history: what a series keeps, for how long, and in how many
//! bytes — sans-IO. The agent's store (`crates/ferry/src/history`) keeps
//! each series tier as a fixed-size ring of [`RECORD_BYTES`]-byte records
//! and applies the [`Write`]s a [`Recorder`] returns; reads go through
//! [`query`] over the [`Slots`] the store exposes.
//!
//! Three tiers ([`TIERS`]): one point every 10 s kept 24 h, one a minute
//! kept 30 days, one an hour kept 365 days. A point keeps the mean, min,
//! max and count of the samples that fell in its interval, and each tier's
//! point aggregates the same samples as the finer tier's points of that
//! interval (mean of means weighted by count, min of mins, max of maxes).
//! Every sample updates the open point of each tier in place, so a crash
//! loses at most the sample being written; a restart resumes each tier's
//! open point from what is stored ([`Recorder::resume`]).
//!
//! A ring's slot for time `t` is `(t / step) % slots`; a record holds its
//! own `t`, and a read keeps a record only if its `t` is the one the slot
//! stands for at that moment and within the tier's retention, so slots left
//! over from an earlier lap (the agent was down: a gap) or never written
//! read as gaps, never as samples. A record's CRC-32C (seeded with its
//! series' name and tier) makes a torn or foreign record read as a gap too.
//!
//! Size: [`SERIES_BYTES_MAX`] = (8,640 + 43,200 + 8,760) × 24 B =
//! 1,454,400 B (1.39 MiB) per series, whatever the uptime.
//!
//! Series names ([`SeriesName`]): `SCOPE/NAME/METRIC`, where SCOPE is
//! `node`, `workload`, `volume` or `share`, NAME a [`Name`] and METRIC one
//! of [`Metric`]'s names that SCOPE has. Every part is checked, so a series
//! name is also a safe relative path.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::crc32c::crc32c;
use crate::name::Name;

/// One tier: a point every `step_s` seconds, kept `keep_s` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    pub step_s: u64,
    pub keep_s: u64,
}

impl Tier {
    /// Slots in its ring.
    pub const fn slots(&self) -> u64 {
        self.keep_s / self.step_s
    }

    /// The start of the interval `t` falls in.
    pub const fn bucket(&self, t: u64) -> u64 {
        t - t % self.step_s
    }

    /// The ring slot of the interval `t` falls in.
    pub const fn slot_of(&self, t: u64) -> u64 {
        (t / self.step_s) % self.slots()
    }

    /// Bytes of its ring.
    pub const fn bytes(&self) -> u64 {
        self.slots() * RECORD_BYTES as u64
    }
}

/// The tiers, finest first.
pub const TIERS: [Tier; 3] = [
    Tier {
        step_s: 10,
        keep_s: 24 * 3600,
    },
    Tier {
        step_s: 60,
        keep_s: 30 * 24 * 3600,
    },
    Tier {
        step_s: 3600,
        keep_s: 365 * 24 * 3600,
    },
];

/// Bytes of one stored point.
pub const RECORD_BYTES: usize = 24;

/// Bytes a series takes on disk at most (every ring full).
pub const SERIES_BYTES_MAX: u64 = TIERS[0].bytes() + TIERS[1].bytes() + TIERS[2].bytes();

/// A sample whose clock is behind the open point by at most this many
/// seconds is folded into the open point (a small step back of the wall
/// clock); further back, the recorder starts again at the new time.
pub const CLOCK_BACK_TOLERANCE_S: u64 = 60;

/// Most points one [`query`] answers.
pub const QUERY_POINTS_MAX: u64 = 10_000;

/// One point: the samples of one interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Start of the interval, Unix seconds.
    pub t: u64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// Samples aggregated.
    pub count: u32,
}

impl Point {
    pub fn single(t: u64, v: f64) -> Point {
        Point {
            t,
            mean: v,
            min: v,
            max: v,
            count: 1,
        }
    }

    /// Adds `o`'s samples to this point's.
    pub fn combine(&mut self, o: &Point) {
        let n = self.count as f64 + o.count as f64;
        if n > 0.0 {
            self.mean = (self.mean * self.count as f64 + o.mean * o.count as f64) / n;
        }
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.count = self.count.saturating_add(o.count);
    }
}

/// The CRC seed of a series' records: its name.
pub fn series_salt(series: &str) -> u32 {
    crc32c(series.as_bytes())
}

const FORMAT: u8 = 1;

/// A point as stored: t (u32 LE, Unix s), mean, min, max (f32 LE), count
/// (u16), tier, format, CRC-32C of the first 20 bytes xor the series salt
/// and tier.
pub fn encode(tier: usize, p: &Point, salt: u32) -> [u8; RECORD_BYTES] {
    let mut b = [0u8; RECORD_BYTES];
    b[0..4].copy_from_slice(&(p.t.min(u32::MAX as u64) as u32).to_le_bytes());
    b[4..8].copy_from_slice(&(p.mean as f32).to_le_bytes());
    b[8..12].copy_from_slice(&(p.min as f32).to_le_bytes());
    b[12..16].copy_from_slice(&(p.max as f32).to_le_bytes());
    b[16..18].copy_from_slice(&(p.count.min(u16::MAX as u32) as u16).to_le_bytes());
    b[18] = tier as u8;
    b[19] = FORMAT;
    let crc = crc32c(&b[..20]) ^ salt ^ tier as u32;
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A stored record, if it is a whole point of this series and tier: an
/// unwritten, torn, foreign or misaligned record is `None`.
pub fn decode(tier: usize, b: &[u8], salt: u32) -> Option<Point> {
    let b: &[u8; RECORD_BYTES] = b.try_into().ok()?;
    let crc = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
    if crc != crc32c(&b[..20]) ^ salt ^ tier as u32 || b[18] as usize != tier || b[19] != FORMAT {
        return None;
    }
    let f = |i: usize| f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as f64;
    let t = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64;
    let count = u16::from_le_bytes([b[16], b[17]]) as u32;
    let p = Point {
        t,
        mean: f(4),
        min: f(8),
        max: f(12),
        count,
    };
    let ok = count > 0
        && TIERS.get(tier)?.bucket(t) == t
        && p.mean.is_finite()
        && p.min.is_finite()
        && p.max.is_finite();
    ok.then_some(p)
}

/// Where the stored points of one series are read from (the store).
pub trait Slots {
    /// The point in `slot` of `tier`'s ring, if it holds a whole one.
    fn get(&self, tier: usize, slot: u64) -> Option<Point>;
}

/// A point to store at `slot` of `tier`'s ring.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Write {
    pub tier: usize,
    pub slot: u64,
    pub point: Point,
}

/// What became of a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// In the points of its time.
    Stored,
    /// The clock stepped back a little: added to the open points.
    Late,
    /// The clock stepped back further than [`CLOCK_BACK_TOLERANCE_S`]:
    /// recording starts again at the new time.
    ClockReset,
    /// Not a finite number: dropped.
    Rejected,
}

/// One series' open points, one per tier: every sample updates them and
/// returns the writes that store them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recorder {
    open: [Option<Point>; 3],
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// A recorder that goes on with the points stored for the intervals
    /// `now` falls in (after a restart within them).
    pub fn resume(slots: &impl Slots, now: u64) -> Recorder {
        let mut r = Recorder::new();
        for (k, tier) in TIERS.iter().enumerate() {
            let b = tier.bucket(now);
            r.open[k] = slots.get(k, tier.slot_of(b)).filter(|p| p.t == b);
        }
        r
    }

    /// The open point of `tier`.
    pub fn open(&self, tier: usize) -> Option<Point> {
        self.open.get(tier).copied().flatten()
    }

    /// Records `v` sampled at `now` (Unix s).
    pub fn record(&mut self, now: u64, v: f64) -> (Recorded, Vec<Write>) {
        if !v.is_finite() {
            return (Recorded::Rejected, Vec::new());
        }
        let mut outcome = Recorded::Stored;
        if let Some(p) = self.open[0] {
            if TIERS[0].bucket(now) < p.t {
                if p.t - now <= CLOCK_BACK_TOLERANCE_S {
                    outcome = Recorded::Late;
                } else {
                    outcome = Recorded::ClockReset;
                    self.open = [None; 3];
                }
            }
        }
        let mut writes = Vec::with_capacity(TIERS.len());
        for (k, tier) in TIERS.iter().enumerate() {
            let b = tier.bucket(now);
            let p = match self.open[k] {
                Some(mut p) if p.t == b || (outcome == Recorded::Late && p.t > b) => {
                    p.combine(&Point::single(p.t, v));
                    p
                }
                _ => Point::single(b, v),
            };
            self.open[k] = Some(p);
            writes.push(Write {
                tier: k,
                slot: tier.slot_of(p.t),
                point: p,
            });
        }
        (outcome, writes)
    }
}

/// Why a query cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("from ({from}) is after to ({to})")]
    Backwards { from: u64, to: u64 },
    #[error("{points} points asked for (from {from} to {to} every {step_s} s); at most {QUERY_POINTS_MAX}: ask for a larger step")]
    TooMany {
        from: u64,
        to: u64,
        step_s: u64,
        points: u64,
    },
}

/// What a query answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The tier read.
    pub tier: usize,
    /// The step of the points, s (a multiple of the tier's).
    pub step_s: u64,
    /// The points with samples, oldest first (a missing interval is a gap).
    pub points: Vec<Point>,
}

/// The tier a query from `from` with step `step_s` reads at `now`: the
/// coarsest whose retention reaches back to `from` and whose step is not
/// coarser than asked; if none, the finest that reaches back to `from`
/// (the coarsest if none does).
pub fn tier_for(now: u64, from: u64, step_s: u64) -> usize {
    let covers = |t: &Tier| from.saturating_add(t.keep_s) > now;
    TIERS
        .iter()
        .rposition(|t| covers(t) && t.step_s <= step_s.max(TIERS[0].step_s))
        .or_else(|| TIERS.iter().position(covers))
        .unwrap_or(TIERS.len() - 1)
}

/// The points of `[from, to]` every `step_s` (0: the tier's own step), as
/// stored at `now`.
pub fn query(
    slots: &impl Slots,
    now: u64,
    from: u64,
    to: u64,
    step_s: u64,
) -> Result<Answer, QueryError> {
    if from > to {
        return Err(QueryError::Backwards { from, to });
    }
    let k = tier_for(now, from, step_s);
    let tier = TIERS[k];
    let step = step_s.max(tier.step_s).div_ceil(tier.step_s) * tier.step_s;
    let start = from - from % step;
    let points = (to - start) / step + 1;
    if points > QUERY_POINTS_MAX {
        return Err(QueryError::TooMany {
            from,
            to,
            step_s: step,
            points,
        });
    }
    let mut out: Vec<Point> = Vec::new();
    let oldest = now.saturating_sub(tier.keep_s);
    let mut t = tier.bucket(start);
    while t <= to.min(now) {
        if t >= oldest && t + tier.step_s > from {
            if let Some(p) = slots.get(k, tier.slot_of(t)).filter(|p| p.t == t) {
                let b = p.t - p.t % step;
                match out.last_mut() {
                    Some(last) if last.t == b => last.combine(&p),
                    _ => out.push(Point { t: b, ..p }),
                }
            }
        }
        t += tier.step_s;
    }
    Ok(Answer {
        tier: k,
        step_s: step,
        points: out,
    })
}

/// What a series is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Node,
    Workload,
    Volume,
    Share,
    /// An observation of the migration estimator (`ferry estimate`).
    Estimate,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::Node,
        Scope::Workload,
        Scope::Volume,
        Scope::Share,
        Scope::Estimate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Node => "node",
            Scope::Workload => "workload",
            Scope::Volume => "volume",
            Scope::Share => "share",
            Scope::Estimate => "estimate",
        }
    }

    /// The metrics a series of this scope can be.
    pub fn metrics(self) -> &'static [Metric] {
        use Metric::*;
        match self {
            Scope::Node => &[WriteBytesPerS, LinkBytesPerS, BacklogBytes, WriteIops],
            Scope::Workload => &[
                WriteBytesPerS,
                LinkBytesPerS,
                BacklogBytes,
                LagSeconds,
                LagP50Seconds,
                LagP99Seconds,
                WriteIops,
                ResyncPercent,
            ],
            Scope::Volume => &[
                WriteBytesPerS,
                LinkBytesPerS,
                BacklogBytes,
                WriteIops,
                WriteLatencyP99Ms,
                ResyncPercent,
            ],
            Scope::Share => &[WriteBytesPerS, LinkBytesPerS, BacklogBytes, LagSeconds],
            Scope::Estimate => &[WriteBytesPerS, WriteIops, ReadIops, UniqueBytes],
        }
    }
}

/// What a series measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    /// Bytes clients wrote, per second.
    WriteBytesPerS,
    /// Bytes sent on the replication link, per second.
    LinkBytesPerS,
    /// Bytes waiting to be sent (dirty + queued).
    BacklogBytes,
    /// How far the replica is behind, seconds.
    LagSeconds,
    /// The median of the lag probed ten times per sample, seconds.
    LagP50Seconds,
    /// The 99th percentile (of ten probes: their largest) of the lag
    /// probed ten times per sample, seconds.
    LagP99Seconds,
    /// Client writes per second.
    WriteIops,
    /// The 99th percentile of client write latency over the interval, ms.
    WriteLatencyP99Ms,
    /// Resync progress, percent (100: in sync).
    ResyncPercent,
    /// Client reads per second.
    ReadIops,
    /// Distinct bytes written in the sample's interval (blocks at the
    /// replication granularity, or files × mean write: what a copy then
    /// re-sends), bytes.
    UniqueBytes,
}

impl Metric {
    pub const ALL: [Metric; 11] = [
        Metric::WriteBytesPerS,
        Metric::LinkBytesPerS,
        Metric::BacklogBytes,
        Metric::LagSeconds,
        Metric::LagP50Seconds,
        Metric::LagP99Seconds,
        Metric::WriteIops,
        Metric::WriteLatencyP99Ms,
        Metric::ResyncPercent,
        Metric::ReadIops,
        Metric::UniqueBytes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::WriteBytesPerS => "write_bytes_per_s",
            Metric::LinkBytesPerS => "link_bytes_per_s",
            Metric::BacklogBytes => "backlog_bytes",
            Metric::LagSeconds => "lag_seconds",
            Metric::LagP50Seconds => "lag_p50_seconds",
            Metric::LagP99Seconds => "lag_p99_seconds",
            Metric::WriteIops => "write_iops",
            Metric::WriteLatencyP99Ms => "write_latency_p99_ms",
            Metric::ResyncPercent => "resync_percent",
            Metric::ReadIops => "read_iops",
            Metric::UniqueBytes => "unique_bytes",
        }
    }
}

/// Why a string is not a series name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid series {series:?}: {reason} (a series is SCOPE/NAME/METRIC: node|workload|volume|share|estimate, a name, and a metric of that scope, e.g. volume/disk0/write_bytes_per_s)")]
pub struct SeriesError {
    pub series: String,
    pub reason: String,
}

/// A checked series name: `SCOPE/NAME/METRIC`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeriesName {
    pub scope: Scope,
    pub name: Name,
    pub metric: Metric,
}

impl SeriesName {
    pub fn new(scope: Scope, name: Name, metric: Metric) -> Result<SeriesName, SeriesError> {
        let s = SeriesName {
            scope,
            name,
            metric,
        };
        if !scope.metrics().contains(&metric) {
            return Err(SeriesError {
                series: s.to_string(),
                reason: format!(
                    "a {} series is one of {}",
                    scope.as_str(),
                    scope
                        .metrics()
                        .iter()
                        .map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        Ok(s)
    }

    pub fn parse(s: &str) -> Result<SeriesName, SeriesError> {
        let bad = |reason: String| SeriesError {
            series: s.chars().take(200).collect(),
            reason,
        };
        let mut parts = s.split('/');
        let (Some(scope), Some(name), Some(metric), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("it is not three parts separated by /".into()));
        };
        let scope = Scope::ALL
            .into_iter()
            .find(|x| x.as_str() == scope)
            .ok_or_else(|| bad(format!("no scope {scope:?}")))?;
        let name = Name::parse(name).map_err(|e| bad(e.to_string()))?;
        let metric = Metric::ALL
            .into_iter()
            .find(|x| x.as_str() == metric)
            .ok_or_else(|| bad(format!("no metric {metric:?}")))?;
        SeriesName::new(scope, name, metric)
    }
}

impl fmt::Display for SeriesName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.scope.as_str(),
            self.name.as_str(),
            self.metric.as_str()
        )
    }
}

impl std::str::FromStr for SeriesName {
    type Err = SeriesError;
    fn from_str(s: &str) -> Result<SeriesName, SeriesError> {
        SeriesName::parse(s)
    }
}

impl Serialize for SeriesName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SeriesName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SeriesName, D::Error> {
        let s = String::deserialize(d)?;
        SeriesName::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A series' rings in memory: the store's model in tests (and a cache).
#[derive(Debug, Clone)]
pub struct MemSlots {
    salt: u32,
    rings: [Vec<[u8; RECORD_BYTES]>; 3],
}

impl MemSlots {
    pub fn new(series: &str) -> MemSlots {
        MemSlots {
            salt: series_salt(series),
            rings: [0, 1, 2].map(|k| vec![[0u8; RECORD_BYTES]; TIERS[k].slots() as usize]),
        }
    }

    pub fn apply(&mut self, writes: &[Write]) {
        for w in writes {
            self.rings[w.tier][w.slot as usize] = encode(w.tier, &w.point, self.salt);
        }
    }

    /// The raw record in a slot (tests tear it).
    pub fn raw_mut(&mut self, tier: usize, slot: u64) -> &mut [u8; RECORD_BYTES] {
        &mut self.rings[tier][slot as usize]
    }

    /// Bytes the rings hold.
    pub fn bytes(&self) -> u64 {
        self.rings
            .iter()
            .map(|r| (r.len() * RECORD_BYTES) as u64)
            .sum()
    }
}

impl Slots for MemSlots {
    fn get(&self, tier: usize, slot: u64) -> Option<Point> {
        decode(tier, self.rings.get(tier)?.get(slot as usize)?, self.salt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000; // a fake clock's start (2027), a multiple of 3600.

    struct Fake {
        now: u64,
        rec: Recorder,
        slots: MemSlots,
    }

    impl Fake {
        fn new() -> Fake {
            Fake {
                now: T0,
                rec: Recorder::new(),
                slots: MemSlots::new("volume/v/write_bytes_per_s"),
            }
        }
        fn sample(&mut self, v: f64) -> Recorded {
            let (r, w) = self.rec.record(self.now, v);
            self.slots.apply(&w);
            r
        }
        /// Samples `f(i)` every 10 s, `n` times.
        fn run(&mut self, n: u64, f: impl Fn(u64) -> f64) {
            for i in 0..n {
                self.sample(f(i));
                self.now += 10;
            }
        }
        fn q(&self, from: u64, to: u64, step: u64) -> Answer {
            query(&self.slots, self.now, from, to, step).unwrap()
        }
    }

    #[test]
    fn the_size_bound_is_what_the_docs_say() {
        assert_eq!(TIERS.map(|t| t.slots()), [8_640, 43_200, 8_760]);
        assert_eq!(SERIES_BYTES_MAX, 1_454_400);
        assert_eq!(MemSlots::new("x").bytes(), SERIES_BYTES_MAX);
        // A year and a day of samples, every 10 s, lands in the same rings:
        // every write's slot is inside its ring.
        let mut r = Recorder::new();
        let mut now = T0;
        let mut max_slot = [0u64; 3];
        while now < T0 + 366 * 86_400 {
            for w in r.record(now, 1.0).1 {
                max_slot[w.tier] = max_slot[w.tier].max(w.slot);
            }
            now += 10;
        }
        for k in 0..3 {
            assert_eq!(max_slot[k], TIERS[k].slots() - 1);
        }
    }

    #[test]
    fn coarser_tiers_aggregate_the_finer_ones() {
        let mut f = Fake::new();
        // Two hours of a ramp 0, 1, 2, … every 10 s.
        f.run(720, |i| i as f64);
        let fine = f.q(T0, T0 + 3599, 10);
        assert_eq!(fine.tier, 0);
        assert_eq!(fine.points.len(), 360);
        assert_eq!(fine.points[5], Point::single(T0 + 50, 5.0));
        let minutes = f.q(T0, T0 + 3599, 60);
        assert_eq!(minutes.tier, 1);
        assert_eq!(minutes.points.len(), 60);
        let m1 = minutes.points[1];
        assert_eq!(
            (m1.t, m1.min, m1.max, m1.mean, m1.count),
            (T0 + 60, 6.0, 11.0, 8.5, 6)
        );
        // The stored minute agrees with its six 10 s points.
        let mut agg = fine.points[6];
        for p in &fine.points[7..12] {
            agg.combine(p);
        }
        assert_eq!(agg, m1);
        // 10 s points re-aggregated to a step of 20 s.
        let twenty = f.q(T0, T0 + 599, 20);
        assert_eq!((twenty.tier, twenty.points.len()), (0, 30));
        assert_eq!(twenty.points[1].mean, 2.5);
        let hour = f.slots.get(2, TIERS[2].slot_of(T0)).unwrap();
        assert_eq!((hour.min, hour.max, hour.count), (0.0, 359.0, 360));
        assert!((hour.mean - 179.5).abs() < 1e-3);
        // An hourly query reads the hour tier when asked for hours.
        let h = f.q(T0, T0 + 7199, 3600);
        assert_eq!(h.tier, 2);
        assert_eq!(h.points.len(), 2);
        assert_eq!(h.points[1].count, 360);
    }

    #[test]
    fn retention_per_tier() {
        let mut f = Fake::new();
        // 25 hours of samples.
        f.run(25 * 360, |_| 7.0);
        // The first hour is gone from the 10 s tier…
        let t0 = TIERS[0];
        assert!(f.slots.get(0, t0.slot_of(T0)).is_some_and(|p| p.t != T0));
        // …a query that reaches back that far reads the minute tier instead.
        let a = f.q(T0, T0 + 3599, 10);
        assert_eq!(a.tier, 1);
        assert_eq!(a.step_s, 60);
        assert_eq!(a.points.len(), 60);
        // The last 24 h still at 10 s.
        let a = f.q(f.now - 3600, f.now, 10);
        assert_eq!((a.tier, a.step_s), (0, 10));
        // After 31 days only hours are left of the first day.
        let mut f = Fake::new();
        let mut r = f.rec.clone();
        for i in 0..(31 * 8640) {
            let w = r.record(T0 + i * 10, i as f64).1;
            f.slots.apply(&w);
        }
        f.now = T0 + 31 * 86_400;
        let a = f.q(T0, T0 + 86_399, 60);
        assert_eq!(a.tier, 2);
        assert_eq!(a.points.len(), 24);
        assert_eq!(a.points[0].count, 360);
        // A year and more: the first hours are gone too.
        f.now = T0 + 366 * 86_400;
        assert!(f.q(T0, T0 + 86_399, 3600).points.is_empty());
    }

    #[test]
    fn gaps_read_as_gaps_not_as_old_samples() {
        let mut f = Fake::new();
        f.run(60, |_| 1.0); // 10 minutes
                            // The agent is down 23 h 55 min: the slots after these were written a
                            // lap ago (never, here) — and the first lap's slots stay in the ring.
        f.now += 23 * 3600 + 55 * 60;
        f.run(60, |_| 2.0);
        let a = f.q(f.now - 3600, f.now, 10);
        assert_eq!(a.tier, 0);
        assert_eq!(a.points.len(), 60);
        assert!(a.points.iter().all(|p| p.mean == 2.0));
        // Over the whole day: the minutes before and after, nothing between.
        let a = f.q(T0, f.now, 60);
        assert_eq!(a.tier, 1);
        assert_eq!(a.points.len(), 20);
        let gap = a.points[10].t - a.points[9].t;
        assert_eq!(gap, 23 * 3600 + 56 * 60);
        // Down more than a day: the 10 s slots of the day before are stale,
        // the same slot numbers now stand for other times, and read as gaps.
        let mut f = Fake::new();
        f.run(360, |_| 3.0);
        f.now += 86_400 - 3600 + 600; // a lap and 10 minutes later
        let a = f.q(f.now - 600, f.now, 10);
        assert!(a.points.is_empty(), "{:?}", a.points.first());
    }

    #[test]
    fn torn_and_foreign_records_read_as_gaps() {
        let mut f = Fake::new();
        f.run(10, |i| i as f64);
        let slot = TIERS[0].slot_of(T0 + 30);
        f.slots.raw_mut(0, slot)[6] ^= 0x40;
        let a = f.q(T0, T0 + 99, 10);
        assert_eq!(a.points.len(), 9);
        assert!(a.points.iter().all(|p| p.t != T0 + 30));
        // Half a record (the tail never written) is no point either.
        let slot = TIERS[0].slot_of(T0 + 40);
        f.slots.raw_mut(0, slot)[12..].fill(0);
        assert!(f.slots.get(0, slot).is_none());
        // Another series' record, or another tier's, does not pass.
        let p = Point::single(T0, 1.0);
        let b = encode(0, &p, series_salt("volume/w/write_bytes_per_s"));
        assert_eq!(
            decode(0, &b, series_salt("volume/w/write_bytes_per_s")),
            Some(p)
        );
        assert_eq!(
            decode(0, &b, series_salt("volume/v/write_bytes_per_s")),
            None
        );
        assert_eq!(
            decode(1, &b, series_salt("volume/w/write_bytes_per_s")),
            None
        );
        assert_eq!(decode(0, &[0u8; RECORD_BYTES], 0), None);
        assert_eq!(decode(0, &[0u8; 3], 0), None);
    }

    #[test]
    fn clock_going_backwards() {
        let mut f = Fake::new();
        f.run(30, |_| 1.0); // 5 min; now = T0 + 300
                            // A small step back: folded into the open points, nothing rewritten.
        f.now -= 40;
        assert_eq!(f.sample(5.0), Recorded::Late);
        let open = f.rec.open(0).unwrap();
        assert_eq!((open.t, open.count, open.max), (T0 + 290, 2, 5.0));
        assert_eq!(
            f.slots.get(0, TIERS[0].slot_of(T0 + 260)).unwrap().mean,
            1.0
        );
        // Then forward again.
        f.now += 50;
        assert_eq!(f.sample(1.0), Recorded::Stored);
        // A step back of two hours: recording starts again at the new time;
        // the minute and hour points there are this timeline's.
        f.now -= 2 * 3600;
        assert_eq!(f.sample(9.0), Recorded::ClockReset);
        let back = f.now;
        assert_eq!(
            f.rec.open(0).unwrap(),
            Point::single(TIERS[0].bucket(back), 9.0)
        );
        assert_eq!(
            f.rec.open(2).unwrap(),
            Point::single(TIERS[2].bucket(back), 9.0)
        );
        // No garbage: every point read is one of the values recorded.
        let a = query(&f.slots, T0 + 3600, T0 - 3 * 3600, T0 + 3600, 10).unwrap();
        assert!(a
            .points
            .iter()
            .all(|p| [1.0, 9.0].contains(&p.mean) || p.max == 5.0));
        // Non-finite samples are dropped.
        assert_eq!(f.sample(f64::NAN), Recorded::Rejected);
        assert_eq!(f.sample(f64::INFINITY), Recorded::Rejected);
    }

    #[test]
    fn a_restart_resumes_the_open_points() {
        let mut f = Fake::new();
        f.run(3, |_| 4.0); // now = T0 + 30
                           // Killed; restarted 5 s later with a fresh recorder.
        f.now += 5;
        f.rec = Recorder::resume(&f.slots, f.now);
        assert_eq!(f.rec.open(1).unwrap().count, 3);
        assert_eq!(
            f.rec.open(0),
            None,
            "the 10 s interval of now has no point yet"
        );
        f.sample(8.0);
        let m = f.slots.get(1, TIERS[1].slot_of(T0)).unwrap();
        assert_eq!((m.count, m.mean, m.max), (4, 5.0, 8.0));
        // A restart a day later resumes nothing stale.
        f.now += 86_400;
        assert_eq!(Recorder::resume(&f.slots, f.now), Recorder::new());
    }

    #[test]
    fn queries_are_bounded_and_checked() {
        let f = Fake::new();
        assert!(matches!(
            query(&f.slots, T0, T0 + 1, T0, 10),
            Err(QueryError::Backwards { .. })
        ));
        assert!(matches!(
            query(&f.slots, T0 + 29 * 86_400, T0, T0 + 29 * 86_400, 1),
            Err(QueryError::TooMany { points: 41_761, .. })
        ));
        // A step that is not a multiple of the tier's is rounded up to one.
        assert_eq!(query(&f.slots, T0, T0, T0 + 600, 15).unwrap().step_s, 20);
        assert_eq!(tier_for(T0, T0 - 10, 0), 0);
        assert_eq!(tier_for(T0, T0 - 2 * 86_400, 0), 1);
        assert_eq!(tier_for(T0, T0 - 40 * 86_400, 10), 2);
        assert_eq!(tier_for(T0, 0, 10), 2);
    }

    #[test]
    fn series_names() {
        let s = SeriesName::parse("volume/disk0/write_bytes_per_s").unwrap();
        assert_eq!((s.scope, s.metric), (Scope::Volume, Metric::WriteBytesPerS));
        assert_eq!(s.to_string(), "volume/disk0/write_bytes_per_s");
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            "\"volume/disk0/write_bytes_per_s\""
        );
        for bad in [
            "",
            "volume/disk0",
            "volume/disk0/write_bytes_per_s/x",
            "volume/../write_bytes_per_s",
            "volume/./write_bytes_per_s",
            "volume//write_bytes_per_s",
            "disk/d/write_bytes_per_s",
            "volume/d/iops",
            "node/a/write_latency_p99_ms",
            "volume/D/write_iops",
            "/etc/passwd",
        ] {
            assert!(SeriesName::parse(bad).is_err(), "{bad}");
            assert!(serde_json::from_str::<SeriesName>(&format!("{bad:?}")).is_err());
        }
        for scope in Scope::ALL {
            for m in scope.metrics() {
                let s = format!("{}/n/{}", scope.as_str(), m.as_str());
                assert_eq!(SeriesName::parse(&s).unwrap().to_string(), s);
            }
        }
    }
}
