//! Observing a Linux block device ferry does not serve yet: the pure
//! parsers behind `ferry estimate start NAME --device /dev/X`.
//!
//! Two sources, both text the kernel writes:
//! - `/proc/diskstats` ([`parse_diskstats`], [`DiskstatsTracker`]): counters
//!   per device — IOs and sectors read and written. It has **no addresses**, so
//!   the bytes written in an interval are an *upper bound* on the unique bytes
//!   a copy would have to send again (ten writes to one block count ten times);
//!   [`DiskstatsInterval::written_bytes_upper_bound`] says so in its name.
//! - the `block:block_rq_issue` tracepoint, read from tracefs's `trace_pipe`
//!   ([`parse_trace_line`]): each request issued to the device with its first
//!   sector and length, so the written blocks are known exactly
//!   ([`blocks_touched`]) — the input of the working-set curve W(T).
//!
//! Nothing here opens a file or reads a clock: callers pass the text and the
//! time (crates/ferry/src/estimate does the I/O). Nothing here panics on any
//! input: malformed text is an error value or a skipped line.

use std::ops::Range;

/// Bytes in a sector as the block layer counts them (`/proc/diskstats` and
/// the tracepoints), whatever the device's logical block size.
pub const SECTOR_BYTES: u64 = 512;

/// Bits of the minor number in the kernel's *internal* `dev_t`
/// (`MINORBITS` in include/linux/kdev_t.h): the `dev` field of the block
/// tracepoints is `major << 20 | minor`, unlike the userspace `st_rdev`.
pub const KERNEL_MINOR_BITS: u32 = 20;

/// A block device's number.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct DevId {
    pub major: u32,
    pub minor: u32,
}

impl DevId {
    /// From a userspace `st_rdev` (glibc's `gnu_dev_major`/`gnu_dev_minor`
    /// encoding: 12 bits of major and 20 of minor, split across the word).
    pub fn from_st_rdev(rdev: u64) -> DevId {
        let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
        let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
        DevId {
            major: major as u32,
            minor: minor as u32,
        }
    }

    /// The kernel's internal `dev_t` (`MKDEV`), as the tracepoints' `dev`
    /// field holds it and as a tracefs filter (`dev == N`) compares it.
    /// `None` if the minor does not fit in 20 bits or the major in 12.
    pub fn kernel_dev_t(self) -> Option<u32> {
        if self.minor >= 1 << KERNEL_MINOR_BITS || self.major >= 1 << (32 - KERNEL_MINOR_BITS) {
            return None;
        }
        Some(self.major << KERNEL_MINOR_BITS | self.minor)
    }
}

impl std::fmt::Display for DevId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

// ---------------------------------------------------------------- diskstats

/// One line of `/proc/diskstats` (Documentation/admin-guide/iostats.rst).
/// Fields 1-11 exist since 2.6; the discard fields since 4.18 and the flush
/// fields since 5.5 — `None` when the kernel does not print them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskStats {
    pub dev: DevId,
    pub name: String,
    pub reads_completed: u64,
    pub reads_merged: u64,
    pub sectors_read: u64,
    pub read_ms: u64,
    pub writes_completed: u64,
    pub writes_merged: u64,
    pub sectors_written: u64,
    pub write_ms: u64,
    /// A gauge, not a counter: requests in flight when the file was read.
    pub in_flight: u64,
    pub io_ms: u64,
    pub weighted_io_ms: u64,
    pub discards_completed: Option<u64>,
    pub discards_merged: Option<u64>,
    pub sectors_discarded: Option<u64>,
    pub discard_ms: Option<u64>,
    pub flushes_completed: Option<u64>,
    pub flush_ms: Option<u64>,
}

/// Why a `/proc/diskstats` line was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskstatsError {
    #[error("diskstats line has {found} fields, at least 14 expected: {line:?}")]
    TooFewFields { found: usize, line: String },
    #[error("diskstats field {index} ({value:?}) is not a number: {line:?}")]
    NotANumber {
        index: usize,
        value: String,
        line: String,
    },
}

/// Parses one line of `/proc/diskstats`.
pub fn parse_diskstats_line(line: &str) -> Result<DiskStats, DiskstatsError> {
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    if fields.len() < 14 {
        return Err(DiskstatsError::TooFewFields {
            found: fields.len(),
            line: clip(line),
        });
    }
    let num = |i: usize| -> Result<u64, DiskstatsError> {
        fields[i]
            .parse::<u64>()
            .map_err(|_| DiskstatsError::NotANumber {
                index: i,
                value: clip(fields[i]),
                line: clip(line),
            })
    };
    let opt = |i: usize| -> Result<Option<u64>, DiskstatsError> {
        if i < fields.len() {
            num(i).map(Some)
        } else {
            Ok(None)
        }
    };
    let major = u32::try_from(num(0)?).map_err(|_| DiskstatsError::NotANumber {
        index: 0,
        value: clip(fields[0]),
        line: clip(line),
    })?;
    let minor = u32::try_from(num(1)?).map_err(|_| DiskstatsError::NotANumber {
        index: 1,
        value: clip(fields[1]),
        line: clip(line),
    })?;
    Ok(DiskStats {
        dev: DevId { major, minor },
        name: fields[2].to_string(),
        reads_completed: num(3)?,
        reads_merged: num(4)?,
        sectors_read: num(5)?,
        read_ms: num(6)?,
        writes_completed: num(7)?,
        writes_merged: num(8)?,
        sectors_written: num(9)?,
        write_ms: num(10)?,
        in_flight: num(11)?,
        io_ms: num(12)?,
        weighted_io_ms: num(13)?,
        discards_completed: opt(14)?,
        discards_merged: opt(15)?,
        sectors_discarded: opt(16)?,
        discard_ms: opt(17)?,
        flushes_completed: opt(18)?,
        flush_ms: opt(19)?,
    })
}

/// Every line of a `/proc/diskstats` text that parses; malformed lines are
/// skipped (and counted in the second value) — one odd line must not blind
/// the observation of the others.
pub fn parse_diskstats(text: &str) -> (Vec<DiskStats>, usize) {
    let mut out = Vec::new();
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match parse_diskstats_line(line) {
            Ok(s) => out.push(s),
            Err(_) => bad += 1,
        }
    }
    (out, bad)
}

/// Which device of `/proc/diskstats` to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSelector {
    /// By number (what `stat /dev/X` gives: stable while the device exists).
    Id(DevId),
    /// By kernel name (`loop3`, `nvme0n1`, `dm-2`).
    Name(String),
}

impl DeviceSelector {
    fn matches(&self, s: &DiskStats) -> bool {
        match self {
            DeviceSelector::Id(id) => s.dev == *id,
            DeviceSelector::Name(n) => s.name == *n,
        }
    }
}

/// The selected device's line of a `/proc/diskstats` text, if present.
pub fn find_device(text: &str, which: &DeviceSelector) -> Option<DiskStats> {
    text.lines()
        .filter_map(|l| parse_diskstats_line(l).ok())
        .find(|s| which.matches(s))
}

/// How wide the kernel's diskstats counters are. IO counts are
/// `unsigned long`: 64 bits on 64-bit kernels, 32 on 32-bit ones (where they
/// do wrap); sectors are 64 bits on every kernel since 5.0 but `unsigned long`
/// before, so [`CounterWidth::Bits32`] treats every counter as 32-bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterWidth {
    Bits32,
    Bits64,
}

impl CounterWidth {
    /// The width of this build's `unsigned long` (the kernel's, as long as
    /// ferry is not a 32-bit binary on a 64-bit kernel).
    pub fn native() -> CounterWidth {
        if cfg!(target_pointer_width = "64") {
            CounterWidth::Bits64
        } else {
            CounterWidth::Bits32
        }
    }
}

/// What a counter moved by between two reads, and whether it went backwards.
/// A 64-bit counter never wraps in practice, so going backwards means the
/// device was removed and made again (a loop device detached and attached):
/// the counters restarted at zero and the new value is the whole movement.
/// A 32-bit counter going backwards is taken as one wrap — the larger
/// reading, so the upper bound stays an upper bound.
fn counter_delta(old: u64, new: u64, width: CounterWidth) -> (u64, bool) {
    if new >= old {
        return (new - old, false);
    }
    match width {
        CounterWidth::Bits64 => (new, true),
        CounterWidth::Bits32 if old <= u64::from(u32::MAX) && new <= u64::from(u32::MAX) => {
            ((1u64 << 32) - old + new, false)
        }
        CounterWidth::Bits32 => (new, true),
    }
}

/// What one device did between two `/proc/diskstats` readings.
///
/// Bytes written are an **upper bound on the unique bytes written**:
/// diskstats counts every write, not distinct addresses, so overwrites of one
/// block count each time. Only the tracepoint gives addresses (W(T) exactly).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskstatsInterval {
    pub elapsed_ms: u64,
    /// Sectors written × 512: an upper bound on unique bytes written.
    pub written_bytes_upper_bound: u64,
    pub writes_completed: u64,
    pub reads_completed: u64,
    pub read_bytes: u64,
    /// Sectors discarded × 512 (0 on kernels without discard counters).
    pub discarded_bytes: u64,
    /// The gauge at the end of the interval.
    pub in_flight: u64,
    /// The counters went backwards (device made again): the movement is
    /// counted from zero.
    pub counters_reset: bool,
}

impl DiskstatsInterval {
    fn per_second(&self, n: u64) -> f64 {
        if self.elapsed_ms == 0 {
            0.0
        } else {
            n as f64 * 1000.0 / self.elapsed_ms as f64
        }
    }
    pub fn write_iops(&self) -> f64 {
        self.per_second(self.writes_completed)
    }
    pub fn read_iops(&self) -> f64 {
        self.per_second(self.reads_completed)
    }
    /// Upper bound on unique bytes written per second.
    pub fn written_bytes_per_s_upper_bound(&self) -> f64 {
        self.per_second(self.written_bytes_upper_bound)
    }
}

/// Computes the interval between two readings of one device.
pub fn diskstats_interval(
    prev: &DiskStats,
    now: &DiskStats,
    elapsed_ms: u64,
    width: CounterWidth,
) -> DiskstatsInterval {
    let mut reset = false;
    let mut d = |a: u64, b: u64| {
        let (v, r) = counter_delta(a, b, width);
        reset |= r;
        v
    };
    let sectors_written = d(prev.sectors_written, now.sectors_written);
    let writes = d(prev.writes_completed, now.writes_completed);
    let reads = d(prev.reads_completed, now.reads_completed);
    let sectors_read = d(prev.sectors_read, now.sectors_read);
    let discarded = match (prev.sectors_discarded, now.sectors_discarded) {
        (Some(a), Some(b)) => d(a, b),
        _ => 0,
    };
    DiskstatsInterval {
        elapsed_ms,
        written_bytes_upper_bound: sectors_written.saturating_mul(SECTOR_BYTES),
        writes_completed: writes,
        reads_completed: reads,
        read_bytes: sectors_read.saturating_mul(SECTOR_BYTES),
        discarded_bytes: discarded.saturating_mul(SECTOR_BYTES),
        in_flight: now.in_flight,
        counters_reset: reset,
    }
}

/// What one reading of `/proc/diskstats` told about the followed device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskstatsObservation {
    /// First reading (or first since the device came back): a baseline, no
    /// interval yet.
    Baseline,
    /// The device's activity since the previous reading.
    Interval(DiskstatsInterval),
    /// The device is not in the file (removed). The next reading that finds
    /// it again is a [`DiskstatsObservation::Baseline`]: what it did while
    /// gone and before that reading is not known.
    Gone,
}

/// Follows one device across readings of `/proc/diskstats` (sans-IO: the
/// caller reads the file and the clock).
#[derive(Debug, Clone)]
pub struct DiskstatsTracker {
    which: DeviceSelector,
    width: CounterWidth,
    prev: Option<(u64, DiskStats)>,
}

impl DiskstatsTracker {
    pub fn new(which: DeviceSelector, width: CounterWidth) -> DiskstatsTracker {
        DiskstatsTracker {
            which,
            width,
            prev: None,
        }
    }

    /// Feeds one reading taken at `at_ms` (any monotonic millisecond clock).
    pub fn observe(&mut self, at_ms: u64, diskstats_text: &str) -> DiskstatsObservation {
        let Some(now) = find_device(diskstats_text, &self.which) else {
            self.prev = None;
            return DiskstatsObservation::Gone;
        };
        let out = match &self.prev {
            None => DiskstatsObservation::Baseline,
            Some((t, prev)) => DiskstatsObservation::Interval(diskstats_interval(
                prev,
                &now,
                at_ms.saturating_sub(*t),
                self.width,
            )),
        };
        self.prev = Some((at_ms, now));
        out
    }
}

// ------------------------------------------------------------ tracepoints

/// What a request does, from the tracepoint's `rwbs` flags
/// (`blk_fill_rwbs`: an optional leading `F` for a preflush, then the
/// operation `R`/`W`/`D` (discard; `DE` secure erase)/`F` (flush)/`N`
/// (anything else: write-zeroes, zone ops), then modifiers `F` FUA, `A`
/// readahead, `S` sync, `M` meta).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RqOp {
    Read,
    Write,
    Discard,
    Flush,
    Other,
}

impl RqOp {
    pub fn from_rwbs(rwbs: &str) -> RqOp {
        if rwbs.contains('W') {
            RqOp::Write
        } else if rwbs.contains('D') {
            RqOp::Discard
        } else if rwbs.contains('R') {
            RqOp::Read
        } else if rwbs.contains('N') {
            RqOp::Other
        } else if rwbs.starts_with('F') {
            RqOp::Flush
        } else {
            RqOp::Other
        }
    }
}

/// One `block_rq_issue` event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RqIssue {
    /// The trace clock's time, in nanoseconds (the default `local` clock
    /// prints microseconds).
    pub ts_ns: u64,
    pub dev: DevId,
    pub rwbs: String,
    pub op: RqOp,
    pub bytes: u64,
    pub sector: u64,
    pub nr_sectors: u64,
}

/// What a written request covers, for the working-set curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockWrite {
    pub ts_ns: u64,
    pub dev: DevId,
    pub sector: u64,
    pub nr_sectors: u64,
}

impl RqIssue {
    /// The request as a data write: `W` in its flags and at least one
    /// sector. Reads, flushes (with no data), discards and other operations
    /// are `None` — a discard changes contents too, but carries no payload
    /// for a copy to send, so W(T) (what a copy must send again) leaves it
    /// out; [`RqIssue::op`] still tells a caller who wants to count them.
    pub fn as_write(&self) -> Option<BlockWrite> {
        (self.op == RqOp::Write && self.nr_sectors > 0).then_some(BlockWrite {
            ts_ns: self.ts_ns,
            dev: self.dev,
            sector: self.sector,
            nr_sectors: self.nr_sectors,
        })
    }
}

/// One line of `trace_pipe`, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceLine {
    RqIssue(RqIssue),
    /// `CPU:N [LOST M EVENTS]`: the ring buffer overflowed, M events are
    /// missing — the exact block set is no longer exact from here on.
    Lost {
        cpu: Option<u32>,
        events: u64,
    },
    /// Another event (this parser only reads `block_rq_issue`).
    Other,
}

/// Why a trace line was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceLineError {
    #[error("block_rq_issue line without a timestamp: {0:?}")]
    NoTimestamp(String),
    #[error("block_rq_issue line with a malformed {field}: {line:?}")]
    Malformed { field: &'static str, line: String },
}

/// Text kept of a malformed line in an error (a peer could make it huge).
const ERROR_LINE_CHARS: usize = 200;

fn clip(s: &str) -> String {
    s.chars().take(ERROR_LINE_CHARS).collect()
}

/// `123.456789` (seconds, up to 9 decimals) or `123456` (a counter clock)
/// → nanoseconds.
fn parse_timestamp_ns(s: &str) -> Option<u64> {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = int.parse().ok()?;
    let mut ns: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    for _ in frac.len()..9 {
        ns *= 10;
    }
    secs.checked_mul(1_000_000_000)?.checked_add(ns)
}

/// Parses one line of `trace_pipe` (or `trace`). Understands
/// `block_rq_issue` as printed by kernels before 6.10
/// (`7,0 WS 4096 () 2048 + 8 [fio]`) and since (an ioprio before the comm:
/// `7,0 WS 4096 () 2048 + 8 none,0,0 [fio]`), the `[LOST N EVENTS]` lines,
/// and says [`TraceLine::Other`] for anything else that has no
/// `block_rq_issue:` in it. Never panics.
pub fn parse_trace_line(line: &str) -> Result<TraceLine, TraceLineError> {
    const TAG: &str = ": block_rq_issue: ";
    let line = line.trim_end_matches(['\n', '\r']);
    let Some(at) = line.find(TAG) else {
        if let Some(lost) = parse_lost(line) {
            return Ok(lost);
        }
        return Ok(TraceLine::Other);
    };
    let malformed = |field: &'static str| TraceLineError::Malformed {
        field,
        line: clip(line),
    };
    // The header is `COMM-PID [CPU] FLAGS TIMESTAMP`; COMM may hold spaces,
    // so the timestamp is the last word before the tag.
    let head = &line[..at];
    let ts = head
        .rsplit(' ')
        .next()
        .and_then(parse_timestamp_ns)
        .ok_or_else(|| TraceLineError::NoTimestamp(clip(line)))?;
    let body = &line[at + TAG.len()..];

    // `MAJ,MIN RWBS BYTES (CMD) SECTOR + NR ...`; CMD (hex bytes of a
    // passthrough command) may hold spaces, so split around the parentheses.
    let open = body.find('(').ok_or_else(|| malformed("command"))?;
    let close = open + body[open..].find(')').ok_or_else(|| malformed("command"))?;
    let mut pre = body[..open].split_ascii_whitespace();
    let devs = pre.next().ok_or_else(|| malformed("device"))?;
    let rwbs = pre.next().ok_or_else(|| malformed("rwbs"))?;
    let bytes = pre
        .next()
        .and_then(|b| b.parse::<u64>().ok())
        .ok_or_else(|| malformed("bytes"))?;
    if pre.next().is_some() {
        return Err(malformed("fields before the command"));
    }
    let (maj, min) = devs.split_once(',').ok_or_else(|| malformed("device"))?;
    let dev = DevId {
        major: maj.parse().map_err(|_| malformed("device"))?,
        minor: min.parse().map_err(|_| malformed("device"))?,
    };
    if rwbs.is_empty() || rwbs.len() > 9 || !rwbs.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(malformed("rwbs"));
    }
    let mut post = body[close + 1..].split_ascii_whitespace();
    let sector = post
        .next()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| malformed("sector"))?;
    if post.next() != Some("+") {
        return Err(malformed("sector"));
    }
    let nr_sectors = post
        .next()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| malformed("nr_sector"))?;
    Ok(TraceLine::RqIssue(RqIssue {
        ts_ns: ts,
        dev,
        rwbs: rwbs.to_string(),
        op: RqOp::from_rwbs(rwbs),
        bytes,
        sector,
        nr_sectors,
    }))
}

/// `CPU:3 [LOST 1234 EVENTS]` (trace_pipe) or `##### CPU 3 buffer started
/// ####` (not a loss: `Other`).
fn parse_lost(line: &str) -> Option<TraceLine> {
    let i = line.find("[LOST ")?;
    let rest = &line[i + "[LOST ".len()..];
    let n = rest.split(' ').next()?.parse::<u64>().ok()?;
    if !rest.contains("EVENTS]") {
        return None;
    }
    let cpu = line[..i]
        .trim()
        .strip_prefix("CPU:")
        .and_then(|c| c.parse::<u32>().ok());
    Some(TraceLine::Lost { cpu, events: n })
}

/// Why a write could not be mapped to blocks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockMapError {
    #[error("block size must be at least one byte")]
    ZeroBlockSize,
    #[error("sector {sector} + {nr_sectors} overflows a 64-bit byte offset")]
    Overflow { sector: u64, nr_sectors: u64 },
}

/// The replication blocks (of `block_bytes` each, numbered from 0 at byte
/// 0) a write of `nr_sectors` sectors at `sector` touches: every block any
/// of its bytes falls in, as the dirty map marks them. Empty for zero
/// sectors.
pub fn blocks_touched(
    sector: u64,
    nr_sectors: u64,
    block_bytes: u64,
) -> Result<Range<u64>, BlockMapError> {
    if block_bytes == 0 {
        return Err(BlockMapError::ZeroBlockSize);
    }
    let overflow = BlockMapError::Overflow { sector, nr_sectors };
    let start = sector.checked_mul(SECTOR_BYTES).ok_or(overflow.clone())?;
    let len = nr_sectors
        .checked_mul(SECTOR_BYTES)
        .ok_or(overflow.clone())?;
    let end = start.checked_add(len).ok_or(overflow)?;
    if len == 0 {
        let b = start / block_bytes;
        return Ok(b..b);
    }
    Ok(start / block_bytes..(end - 1) / block_bytes + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded on this project's test machine (kernel 6.18, 64-bit):
    // 17 fields on 5.5+ kernels (with discards and flushes).
    const DISKSTATS: &str = "\
   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 254       0 vda 5388188 107043 549504538 9667548 58983529 5390073 2437481472 41827192 0 3439936 52892809 3732248 309 1732017856 522916 9641084 875151
 253       0 zram0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
";

    #[test]
    fn parses_a_recorded_diskstats() {
        let (all, bad) = parse_diskstats(DISKSTATS);
        assert_eq!((all.len(), bad), (3, 0));
        let vda = &all[1];
        assert_eq!(
            vda.dev,
            DevId {
                major: 254,
                minor: 0
            }
        );
        assert_eq!(vda.name, "vda");
        assert_eq!(vda.reads_completed, 5388188);
        assert_eq!(vda.sectors_read, 549504538);
        assert_eq!(vda.writes_completed, 58983529);
        assert_eq!(vda.sectors_written, 2437481472);
        assert_eq!(vda.in_flight, 0);
        assert_eq!(vda.sectors_discarded, Some(1732017856));
        assert_eq!(vda.flush_ms, Some(875151));
    }

    #[test]
    fn old_kernels_without_discard_fields_and_bad_lines() {
        // 14 fields (before 4.18), a short line, a non-number, an empty line.
        let text = "   8 0 sda 1 2 3 4 5 6 7 8 9 10 11\n8 1 sda1 1 2\n8 2 sda2 x 2 3 4 5 6 7 8 9 10 11\n\n";
        let (all, bad) = parse_diskstats(text);
        assert_eq!((all.len(), bad), (1, 2));
        assert_eq!(all[0].sectors_written, 7);
        assert_eq!(all[0].discards_completed, None);
        assert!(matches!(
            parse_diskstats_line("8 2 sda2 x 2 3 4 5 6 7 8 9 10 11"),
            Err(DiskstatsError::NotANumber { index: 3, .. })
        ));
        assert!(parse_diskstats_line("99999999999 0 sda 1 2 3 4 5 6 7 8 9 10 11").is_err());
    }

    fn line(name: &str, writes: u64, sectors_w: u64, reads: u64) -> String {
        let minor = u32::from(name == "loop1");
        format!(
            "   7       {minor} {name} {reads} 0 {} 0 {writes} 0 {sectors_w} 0 0 0 0 0 0 0 0 0 0\n",
            reads * 8
        )
    }

    #[test]
    fn tracker_intervals_reset_and_gone() {
        let mut t = DiskstatsTracker::new(
            DeviceSelector::Id(DevId { major: 7, minor: 0 }),
            CounterWidth::Bits64,
        );
        assert_eq!(
            t.observe(0, &line("loop0", 10, 80, 1)),
            DiskstatsObservation::Baseline
        );
        let DiskstatsObservation::Interval(i) = t.observe(2000, &line("loop0", 30, 240, 5)) else {
            panic!("no interval")
        };
        assert_eq!(i.written_bytes_upper_bound, 160 * 512);
        assert_eq!(i.writes_completed, 20);
        assert_eq!(i.reads_completed, 4);
        assert_eq!(i.read_bytes, 32 * 512);
        assert!(!i.counters_reset);
        assert_eq!(i.write_iops(), 10.0);
        assert_eq!(i.read_iops(), 2.0);
        // Counters went backwards: the device was made again; from zero.
        let DiskstatsObservation::Interval(i) = t.observe(3000, &line("loop0", 3, 24, 0)) else {
            panic!("no interval")
        };
        assert!(i.counters_reset);
        assert_eq!(i.written_bytes_upper_bound, 24 * 512);
        // Gone, then back: a fresh baseline.
        assert_eq!(
            t.observe(4000, &line("loop1", 3, 24, 0)),
            DiskstatsObservation::Gone
        );
        assert_eq!(t.observe(5000, "garbage\n"), DiskstatsObservation::Gone);
        assert_eq!(
            t.observe(6000, &line("loop0", 9, 72, 0)),
            DiskstatsObservation::Baseline
        );
        // By name.
        let mut t =
            DiskstatsTracker::new(DeviceSelector::Name("loop0".into()), CounterWidth::Bits64);
        assert_eq!(t.observe(0, DISKSTATS), DiskstatsObservation::Baseline);
        assert!(
            matches!(t.observe(0, DISKSTATS), DiskstatsObservation::Interval(i) if i.elapsed_ms == 0 && i.write_iops() == 0.0)
        );
    }

    #[test]
    fn thirty_two_bit_counters_wrap() {
        let mut t =
            DiskstatsTracker::new(DeviceSelector::Name("loop0".into()), CounterWidth::Bits32);
        t.observe(
            0,
            &line("loop0", u64::from(u32::MAX) - 1, u64::from(u32::MAX) - 7, 0),
        );
        let DiskstatsObservation::Interval(i) = t.observe(1000, &line("loop0", 2, 8, 0)) else {
            panic!("no interval")
        };
        assert!(!i.counters_reset);
        assert_eq!(i.writes_completed, 4);
        assert_eq!(i.written_bytes_upper_bound, 16 * 512);
    }

    #[test]
    fn dev_t_encodings() {
        // makedev(7, 3) in glibc, and a large minor: makedev(259, 1048575).
        assert_eq!(DevId::from_st_rdev(0x703), DevId { major: 7, minor: 3 });
        let rdev = (259u64 & 0xfff) << 8 | (1048575u64 & 0xff) | (1048575u64 & !0xff) << 12;
        assert_eq!(
            DevId::from_st_rdev(rdev),
            DevId {
                major: 259,
                minor: 1048575
            }
        );
        assert_eq!(
            DevId { major: 7, minor: 3 }.kernel_dev_t(),
            Some(7 << 20 | 3)
        );
        assert_eq!(
            DevId {
                major: 7,
                minor: 1 << 20
            }
            .kernel_dev_t(),
            None
        );
        assert_eq!(
            DevId {
                major: 4096,
                minor: 0
            }
            .kernel_dev_t(),
            None
        );
    }

    // Lines as trace_pipe prints them: before 6.10 (no ioprio) and on this
    // machine's 6.18 (`none,0,0` before the comm), a comm with spaces, a
    // passthrough command with spaces in its parentheses.
    #[test]
    fn parses_block_rq_issue_lines() {
        let old = "             fio-1234    [001] .....   123.456789: block_rq_issue: 7,0 WS 4096 () 2048 + 8 [fio]";
        let TraceLine::RqIssue(r) = parse_trace_line(old).unwrap() else {
            panic!()
        };
        assert_eq!(r.ts_ns, 123_456_789_000);
        assert_eq!(r.dev, DevId { major: 7, minor: 0 });
        assert_eq!(
            (r.op, r.bytes, r.sector, r.nr_sectors),
            (RqOp::Write, 4096, 2048, 8)
        );
        assert_eq!(
            r.as_write(),
            Some(BlockWrite {
                ts_ns: 123_456_789_000,
                dev: r.dev,
                sector: 2048,
                nr_sectors: 8
            })
        );
        let new = "Web Content-77 [000] d..1. 5.000001: block_rq_issue: 259,1 FWFS 8192 () 16 + 16 none,0,0 [Web Content]\n";
        let TraceLine::RqIssue(r) = parse_trace_line(new).unwrap() else {
            panic!()
        };
        assert_eq!(
            (r.dev.major, r.dev.minor, r.op, r.sector, r.nr_sectors),
            (259, 1, RqOp::Write, 16, 16)
        );
        assert_eq!(r.ts_ns, 5_000_001_000);
        let pt = "<...>-9 [003] ..... 7.5: block_rq_issue: 8,0 R 0 (12 00 00 00 24 00) 0 + 0 be,0,4 [sg_inq]";
        let TraceLine::RqIssue(r) = parse_trace_line(pt).unwrap() else {
            panic!()
        };
        assert_eq!((r.op, r.as_write()), (RqOp::Read, None));
        for (rwbs, op) in [
            ("R", RqOp::Read),
            ("RA", RqOp::Read),
            ("W", RqOp::Write),
            ("FWS", RqOp::Write),
            ("WFS", RqOp::Write),
            ("D", RqOp::Discard),
            ("DE", RqOp::Discard),
            ("F", RqOp::Flush),
            ("FF", RqOp::Flush),
            ("FN", RqOp::Other),
            ("N", RqOp::Other),
        ] {
            assert_eq!(RqOp::from_rwbs(rwbs), op, "{rwbs}");
        }
        // A flush: no data, not a write; a discard: not a write either.
        let flush = "kworker/1:1H-90 [001] ..... 9.0: block_rq_issue: 7,0 FF 0 () 0 + 0 none,0,0 [kworker/1:1H]";
        let TraceLine::RqIssue(r) = parse_trace_line(flush).unwrap() else {
            panic!()
        };
        assert_eq!((r.op, r.as_write()), (RqOp::Flush, None));
        let discard =
            "fstrim-5 [000] ..... 9.0: block_rq_issue: 7,0 D 1048576 () 0 + 2048 none,0,0 [fstrim]";
        let TraceLine::RqIssue(r) = parse_trace_line(discard).unwrap() else {
            panic!()
        };
        assert_eq!((r.op, r.as_write()), (RqOp::Discard, None));
    }

    #[test]
    fn lost_events_and_other_lines() {
        assert_eq!(
            parse_trace_line("CPU:1 [LOST 1234 EVENTS]").unwrap(),
            TraceLine::Lost {
                cpu: Some(1),
                events: 1234
            }
        );
        assert_eq!(
            parse_trace_line("##### CPU 2 buffer started ####").unwrap(),
            TraceLine::Other
        );
        assert_eq!(
            parse_trace_line("fio-1 [000] ..... 1.0: block_rq_complete: 7,0 W () 8 + 8 [0]")
                .unwrap(),
            TraceLine::Other
        );
        assert_eq!(parse_trace_line("").unwrap(), TraceLine::Other);
    }

    #[test]
    fn malformed_lines_are_errors_never_panics() {
        let bad = [
            ": block_rq_issue: 7,0 W 4096 () 0 + 8 [x]",
            "x 1.x: block_rq_issue: 7,0 W 4096 () 0 + 8 [x]",
            "x 1.0000000001: block_rq_issue: 7,0 W 4096 () 0 + 8 [x]",
            "x 99999999999999999999.0: block_rq_issue: 7,0 W 4096 () 0 + 8 [x]",
            "x 1.0: block_rq_issue: ",
            "x 1.0: block_rq_issue: 7,0 W 4096 ( 0 + 8",
            "x 1.0: block_rq_issue: 7;0 W 4096 () 0 + 8 [x]",
            "x 1.0: block_rq_issue: 7,0 w 4096 () 0 + 8 [x]",
            "x 1.0: block_rq_issue: 7,0 W x () 0 + 8 [x]",
            "x 1.0: block_rq_issue: 7,0 W 4096 5 () 0 + 8 [x]",
            "x 1.0: block_rq_issue: 7,0 W 4096 () 0 - 8 [x]",
            "x 1.0: block_rq_issue: 7,0 W 4096 () 0 + [x]",
            "x 1.0: block_rq_issue: 7,0 W 4096 () -1 + 8",
            "x 1.0: block_rq_issue: 7,99999999999 W 4096 () 0 + 8",
            "x 1.0: block_rq_issue: 7,0 WWWWWWWWWW 4096 () 0 + 8",
        ];
        for l in bad {
            assert!(parse_trace_line(l).is_err(), "{l}");
        }
        // Every prefix and every byte-mutation of a real line: no panic.
        let good = "fio-1234 [001] ..... 123.456789: block_rq_issue: 7,0 WS 4096 () 2048 + 8 none,0,0 [fio]";
        for i in 0..=good.len() {
            if good.is_char_boundary(i) {
                let _ = parse_trace_line(&good[..i]);
                let _ = parse_diskstats_line(&good[..i]);
            }
        }
        for i in 0..good.len() {
            for c in ['(', ')', ' ', ',', '+', '.', ':', 'é'] {
                let mut s = good.to_string();
                s.replace_range(i..i + 1, &c.to_string());
                let _ = parse_trace_line(&s);
            }
        }
        let huge = format!("x 1.0: block_rq_issue: {}", "9".repeat(10_000));
        match parse_trace_line(&huge) {
            Err(TraceLineError::Malformed { line, .. }) => assert!(line.len() <= ERROR_LINE_CHARS),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn blocks_touched_by_writes() {
        // 4 KiB at byte 1 MiB: block 256 of 4 KiB blocks, block 16 of 64 KiB.
        assert_eq!(blocks_touched(2048, 8, 4096).unwrap(), 256..257);
        assert_eq!(blocks_touched(2048, 8, 65536).unwrap(), 16..17);
        // Unaligned: 512 B straddling nothing, 1 KiB straddling two blocks.
        assert_eq!(blocks_touched(7, 1, 4096).unwrap(), 0..1);
        assert_eq!(blocks_touched(7, 2, 4096).unwrap(), 0..2);
        // Zero sectors touch nothing; a block size not a power of two works.
        assert!(blocks_touched(8, 0, 4096).unwrap().is_empty());
        assert_eq!(blocks_touched(3, 3, 1000).unwrap(), 1..4);
        assert_eq!(blocks_touched(0, 1, 0), Err(BlockMapError::ZeroBlockSize));
        assert!(matches!(
            blocks_touched(u64::MAX / 256, 1, 4096),
            Err(BlockMapError::Overflow { .. })
        ));
        assert!(matches!(
            blocks_touched(1, u64::MAX / 256, 4096),
            Err(BlockMapError::Overflow { .. })
        ));
        assert!(matches!(
            blocks_touched(u64::MAX / 600, u64::MAX / 600, 4096),
            Err(BlockMapError::Overflow { .. })
        ));
    }
}
