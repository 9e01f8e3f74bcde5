//! The TICK lines of the live-move guest (tests/guest/live.sh), seen from
//! outside: `ConsoleWatch` tails one or more console files (a VM's
//! `DATA_DIR/vms/W/console.log` on each node) on a thread, every ~1 ms, and
//! stamps each new TICK line with this host's monotonic clock when it first
//! sees it. The guest's own times cannot show a pause (its clock stands still
//! while the VM is paused under TCG); the gaps between the host's stamps do.
//!
//! A line: `TICK <seq> <guest uptime s> <boot_id> <pid>`. A live move shows
//! one boot id and one pid throughout and no hole in the seq numbers; a cold
//! move (a new boot) shows two boot ids and seq starting again at 0.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One TICK line as the guest printed it.
#[derive(Debug, Clone, PartialEq)]
pub struct TickLine {
    pub seq: u64,
    /// The guest's monotonic time (/proc/uptime), seconds.
    pub uptime_s: f64,
    pub boot_id: String,
    pub pid: u32,
}

/// A TICK line and when this host first saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tick {
    pub at: Instant,
    /// Which of the watched files (index into the paths given).
    pub file: usize,
    pub line: TickLine,
}

/// `None` for any line that is not a well-formed TICK line (records lines,
/// kernel messages, a line cut in two by the console).
pub fn parse_tick(line: &str) -> Option<TickLine> {
    let mut it = line.trim().split_ascii_whitespace();
    if it.next()? != "TICK" {
        return None;
    }
    let seq = it.next()?.parse().ok()?;
    let uptime_s: f64 = it.next()?.parse().ok()?;
    let boot_id = it.next()?;
    let pid = it.next()?.parse().ok()?;
    if it.next().is_some()
        || !uptime_s.is_finite()
        || boot_id.len() != 36
        || !boot_id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
    {
        return None;
    }
    Some(TickLine {
        seq,
        uptime_s,
        boot_id: boot_id.to_string(),
        pid,
    })
}

/// What a run of ticks shows.
#[derive(Debug, Clone, PartialEq)]
pub struct TickReport {
    pub ticks: usize,
    /// The largest gap between two consecutive ticks (host time), and the
    /// ticks on either side of it (file, seq).
    pub max_gap: Duration,
    pub max_gap_after: Option<(usize, u64)>,
    pub max_gap_before: Option<(usize, u64)>,
    /// The median gap: the guest's real tick period.
    pub median_period: Duration,
    pub boot_ids: BTreeSet<String>,
    pub pids: BTreeSet<u32>,
    /// Places where seq is not the previous seq + 1.
    pub seq_holes: usize,
    /// Places where exactly one tick is missing where the console moved to
    /// another file: the guest's line was cut by the move (its start in the
    /// source's console, its end in the target's), so neither file holds it
    /// whole. Not a lost tick: the serial stream is one stream that moved.
    pub lines_cut_by_a_move: usize,
    /// The first hole: the ticks (file, seq) on either side of it.
    pub first_hole: Option<((usize, u64), (usize, u64))>,
}

impl TickReport {
    /// One boot, one ticking process, no tick lost: what a live move keeps.
    pub fn one_continuous_run(&self) -> bool {
        self.boot_ids.len() == 1 && self.pids.len() == 1 && self.seq_holes == 0
    }
}

/// The report of ticks in the order they were seen.
pub fn analyse(ticks: &[Tick]) -> TickReport {
    let mut gaps: Vec<Duration> = Vec::new();
    let mut max_gap = Duration::ZERO;
    let (mut after, mut before) = (None, None);
    let mut seq_holes = 0;
    let mut lines_cut = 0;
    let mut first_hole = None;
    for w in ticks.windows(2) {
        let g = w[1].at.saturating_duration_since(w[0].at);
        if g > max_gap || after.is_none() {
            max_gap = g;
            after = Some((w[0].file, w[0].line.seq));
            before = Some((w[1].file, w[1].line.seq));
        }
        gaps.push(g);
        if w[1].line.seq != w[0].line.seq + 1 {
            if w[0].file != w[1].file && w[1].line.seq == w[0].line.seq + 2 {
                lines_cut += 1;
            } else {
                seq_holes += 1;
                first_hole.get_or_insert(((w[0].file, w[0].line.seq), (w[1].file, w[1].line.seq)));
            }
        }
    }
    gaps.sort();
    TickReport {
        ticks: ticks.len(),
        max_gap,
        max_gap_after: after,
        max_gap_before: before,
        median_period: gaps.get(gaps.len() / 2).copied().unwrap_or_default(),
        boot_ids: ticks.iter().map(|t| t.line.boot_id.clone()).collect(),
        pids: ticks.iter().map(|t| t.line.pid).collect(),
        seq_holes,
        lines_cut_by_a_move: lines_cut,
        first_hole,
    }
}

/// Tails console files on a thread; see the module doc.
pub struct ConsoleWatch {
    stop: Arc<AtomicBool>,
    ticks: Arc<Mutex<Vec<Tick>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the watcher looks at the files.
pub const CONSOLE_WATCH_POLL: Duration = Duration::from_millis(1);

impl ConsoleWatch {
    /// Starts watching `paths` (each may not exist yet) from their current
    /// end: only lines written from now on are stamped.
    pub fn start(paths: &[PathBuf]) -> ConsoleWatch {
        ConsoleWatch::start_at(paths, false)
    }

    /// As `start`, but lines already in the files count too (stamped when
    /// first read: their gaps mean nothing).
    pub fn start_from_beginning(paths: &[PathBuf]) -> ConsoleWatch {
        ConsoleWatch::start_at(paths, true)
    }

    fn start_at(paths: &[PathBuf], from_beginning: bool) -> ConsoleWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let ticks = Arc::new(Mutex::new(Vec::new()));
        let (s, t) = (stop.clone(), ticks.clone());
        let paths = paths.to_vec();
        let start_at: Vec<u64> = paths
            .iter()
            .map(|p| match from_beginning {
                true => 0,
                false => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
            })
            .collect();
        let thread = std::thread::spawn(move || {
            let mut files: Vec<Option<std::fs::File>> = paths.iter().map(|_| None).collect();
            let mut partial: Vec<Vec<u8>> = paths.iter().map(|_| Vec::new()).collect();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let stopping = s.load(Ordering::SeqCst);
                for (i, p) in paths.iter().enumerate() {
                    if files[i].is_none() {
                        let Ok(mut f) = std::fs::File::open(p) else {
                            continue;
                        };
                        use std::io::Seek;
                        if f.seek(std::io::SeekFrom::Start(start_at[i])).is_err() {
                            continue;
                        }
                        files[i] = Some(f);
                    }
                    let f = files[i].as_mut().unwrap();
                    loop {
                        let n = match f.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let at = Instant::now();
                        partial[i].extend_from_slice(&buf[..n]);
                        let mut found = Vec::new();
                        while let Some(pos) = partial[i].iter().position(|&b| b == b'\n') {
                            let raw: Vec<u8> = partial[i].drain(..=pos).collect();
                            if let Some(line) = parse_tick(&String::from_utf8_lossy(&raw)) {
                                found.push(Tick { at, file: i, line });
                            }
                        }
                        t.lock().unwrap().extend(found);
                    }
                }
                if stopping {
                    break;
                }
                std::thread::sleep(CONSOLE_WATCH_POLL);
            }
        });
        ConsoleWatch {
            stop,
            ticks,
            thread: Some(thread),
        }
    }

    /// The ticks seen so far, in the order seen.
    pub fn ticks(&self) -> Vec<Tick> {
        self.ticks.lock().unwrap().clone()
    }

    /// How many ticks so far (of file `file`, or of all).
    pub fn count(&self, file: Option<usize>) -> usize {
        let t = self.ticks.lock().unwrap();
        t.iter()
            .filter(|x| file.is_none_or(|f| x.file == f))
            .count()
    }

    /// Reads what is left, stops, and reports.
    pub fn finish(mut self) -> (Vec<Tick>, TickReport) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let ticks = self.ticks();
        let report = analyse(&ticks);
        (ticks, report)
    }
}

impl Drop for ConsoleWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the ticks of a live move show: one boot id and one pid ticked with
/// no seq missing (asserted); the longest gap between two ticks (ms) and
/// how many ticks there were.
#[allow(dead_code)]
pub fn one_life(watch: ConsoleWatch) -> (f64, usize) {
    let (ticks, r) = watch.finish();
    assert!(ticks.len() > 10, "too few ticks: {}", ticks.len());
    assert_eq!(
        r.boot_ids.len(),
        1,
        "the guest rebooted: boot ids {:?}",
        r.boot_ids
    );
    assert_eq!(r.pids.len(), 1, "the ticking process changed: {:?}", r.pids);
    assert_eq!(r.seq_holes, 0, "ticks lost or repeated: {r:?}");
    eprintln!(
        "ticks: {}, median period {:?}, largest gap {:?} between {:?} and {:?}",
        r.ticks, r.median_period, r.max_gap, r.max_gap_after, r.max_gap_before
    );
    (r.max_gap.as_secs_f64() * 1000.0, r.ticks)
}
