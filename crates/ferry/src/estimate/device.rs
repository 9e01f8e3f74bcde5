//! Observing a Linux block device ferry does not serve yet: the I/O around
//! ferry-core's `blockobs` parsers.
//!
//! - [`DiskstatsReader`]: reads `/proc/diskstats` for one device (found by
//!   `stat`'s `st_rdev`); every interval is an **upper bound** on unique bytes
//!   written (no addresses in diskstats).
//! - [`TraceSession`]: the `block:block_rq_issue` tracepoint, filtered on
//!   the device in the kernel, in a tracefs instance of its own
//!   (`instances/ferry-<pid>-<n>`: its own ring buffer, so neither the global
//!   trace nor anyone else's instance is disturbed), read from the instance's
//!   `trace_pipe` on a thread that hands every write to a callback. Dropping
//!   the session disables the event and removes the instance, on every path.
//!
//! This file names nothing of `crate::` (only std, libc and ferry-core), so
//! the root test `tests/estimate_device.rs` compiles it as is.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use ferry_core::blockobs::{
    self, BlockWrite, CounterWidth, DevId, DeviceSelector, DiskstatsObservation, DiskstatsTracker,
    TraceLine,
};

/// Where the kernel shows block device counters.
pub const DISKSTATS_PATH: &str = "/proc/diskstats";

/// Why a device could not be observed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{path}: {source}")]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a block device")]
    NotABlockDevice(PathBuf),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The number of a block device node (`stat`'s `st_rdev`).
pub fn resolve_device(path: &Path) -> Result<DevId, DeviceError> {
    let md = std::fs::metadata(path).map_err(|source| DeviceError::Stat {
        path: path.to_owned(),
        source,
    })?;
    if !md.file_type().is_block_device() {
        return Err(DeviceError::NotABlockDevice(path.to_owned()));
    }
    Ok(DevId::from_st_rdev(md.rdev()))
}

/// Reads `/proc/diskstats` for one device and turns successive readings into
/// intervals (`DiskstatsObservation`), timed by a monotonic clock.
#[derive(Debug)]
pub struct DiskstatsReader {
    path: PathBuf,
    dev: DevId,
    tracker: DiskstatsTracker,
    epoch: Instant,
}

impl DiskstatsReader {
    pub fn new(dev: DevId) -> DiskstatsReader {
        DiskstatsReader::with_path(dev, PathBuf::from(DISKSTATS_PATH))
    }

    /// Reads another file in diskstats format (tests, a container's view).
    pub fn with_path(dev: DevId, path: PathBuf) -> DiskstatsReader {
        DiskstatsReader {
            path,
            dev,
            tracker: DiskstatsTracker::new(DeviceSelector::Id(dev), CounterWidth::native()),
            epoch: Instant::now(),
        }
    }

    pub fn dev(&self) -> DevId {
        self.dev
    }

    /// One reading: a baseline the first time, then the interval since the
    /// previous reading (bytes written as an upper bound), or `Gone`.
    pub fn sample(&mut self) -> Result<DiskstatsObservation, DeviceError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| DeviceError::Read {
            path: self.path.clone(),
            source,
        })?;
        let at_ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok(self.tracker.observe(at_ms, &text))
    }
}

// ------------------------------------------------------------------ tracefs

/// Why the tracepoint cannot be used. Every variant means: observe with
/// `/proc/diskstats` alone (an upper bound on unique bytes, no W(T)).
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(
        "tracefs is not mounted (no tracefs in /proc/self/mounts): write addresses are not \
         observable, falling back to /proc/diskstats (an upper bound on unique bytes written, \
         no working-set curve); mount it with `mount -t tracefs nodev /sys/kernel/tracing`"
    )]
    NotMounted,
    #[error(
        "{path} is not usable ({source}): write addresses are not observable, falling back to \
         /proc/diskstats (an upper bound on unique bytes written); the tracepoint needs root \
         (or CAP_SYS_ADMIN and write access to tracefs)"
    )]
    NotAccessible {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("this kernel has no block:block_rq_issue tracepoint ({0} missing)")]
    NoTracepoint(PathBuf),
    #[error("device {0} does not fit the kernel's 32-bit dev_t (major < 4096, minor < 2^20)")]
    DevTooLarge(DevId),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the trace reader thread: {0}")]
    Thread(std::io::Error),
}

/// A tracefs mount this process made, unmounted when the last user is gone.
#[derive(Debug)]
struct OwnedMount(PathBuf);

impl Drop for OwnedMount {
    fn drop(&mut self) {
        if let Ok(c) = CString::new(self.0.as_os_str().as_bytes()) {
            // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Where tracefs is.
#[derive(Debug, Clone)]
pub struct Tracefs {
    root: PathBuf,
    _mount: Option<Arc<OwnedMount>>,
}

impl Tracefs {
    /// Finds a mounted tracefs in `/proc/self/mounts` (preferring
    /// `/sys/kernel/tracing`), or says it is not mounted. Does not mount it:
    /// mounting is the operator's choice (or [`Tracefs::mount_at`]'s).
    pub fn locate() -> Result<Tracefs, TraceError> {
        let mounts =
            std::fs::read_to_string("/proc/self/mounts").map_err(|source| TraceError::Io {
                op: "reading",
                path: "/proc/self/mounts".into(),
                source,
            })?;
        let found: Vec<PathBuf> = mounts
            .lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                let _src = f.next()?;
                let dir = f.next()?;
                (f.next()? == "tracefs").then(|| PathBuf::from(unescape_mount_path(dir)))
            })
            .collect();
        let root = found
            .iter()
            .find(|p| p.as_path() == Path::new("/sys/kernel/tracing"))
            .or(found.first())
            .ok_or(TraceError::NotMounted)?;
        Ok(Tracefs {
            root: root.clone(),
            _mount: None,
        })
    }

    /// Mounts tracefs at `dir` (an existing empty directory; root only) for
    /// as long as this value or a session made from it lives. tracefs has
    /// one superblock: this shows the same tracepoints as any other mount.
    pub fn mount_at(dir: &Path) -> Result<Tracefs, TraceError> {
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| TraceError::Io {
            op: "mounting tracefs at",
            path: dir.to_owned(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
        let fstype = c"tracefs";
        let source = c"nodev";
        // SAFETY: all pointers are valid NUL-terminated strings for the
        // call's duration; no mount data is passed.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                c.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(TraceError::Io {
                op: "mounting tracefs at",
                path: dir.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Tracefs {
            root: dir.to_owned(),
            _mount: Some(Arc::new(OwnedMount(dir.to_owned()))),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// `/proc/self/mounts` escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Limits of a trace session, each with its unit.
#[derive(Debug, Clone, Copy)]
pub struct TraceConfig {
    /// The instance's ring buffer per CPU: larger loses fewer events under
    /// bursts (a 4 KiB write's event is ~100 B of buffer).
    pub buffer_size_kb: u32,
    /// How long the reader waits for events before checking whether the
    /// session is stopping.
    pub poll_interval_ms: u32,
}

impl Default for TraceConfig {
    fn default() -> TraceConfig {
        TraceConfig {
            buffer_size_kb: 4096,
            poll_interval_ms: 100,
        }
    }
}

/// What the reader thread hands over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceEvent {
    /// A data write to the device (reads, flushes and discards are not sent).
    Write(BlockWrite),
    /// The ring buffer overflowed: this many events are missing, the block
    /// set is no longer exact.
    Lost(u64),
}

/// Counters of a session, readable while it runs.
#[derive(Debug, Default)]
pub struct TraceStats {
    pub lines: AtomicU64,
    pub writes: AtomicU64,
    pub lost_events: AtomicU64,
    pub malformed_lines: AtomicU64,
    /// Events of another device (should be 0: the kernel filters).
    pub other_device: AtomicU64,
    /// The reader's fatal read error, if it stopped on one.
    pub read_failed: AtomicBool,
}

static INSTANCE_SEQ: AtomicU64 = AtomicU64::new(0);

/// A running `block_rq_issue` trace of one device in its own tracefs
/// instance. Drop (or [`TraceSession::stop`]) disables the event, drains
/// and joins the reader, and removes the instance.
#[derive(Debug)]
pub struct TraceSession {
    instance: PathBuf,
    dev: DevId,
    filter: String,
    stop: Arc<AtomicBool>,
    stats: Arc<TraceStats>,
    reader: Option<JoinHandle<()>>,
    _tracefs: Tracefs,
}

fn write_file(path: &Path, text: &str) -> Result<(), TraceError> {
    std::fs::write(path, text).map_err(|source| TraceError::Io {
        op: "writing",
        path: path.to_owned(),
        source,
    })
}

impl TraceSession {
    /// Starts tracing writes to `dev`; `sink` is called on the reader thread
    /// for every write (and every loss) in the order the kernel gives them.
    pub fn start(
        tracefs: &Tracefs,
        dev: DevId,
        config: TraceConfig,
        sink: impl FnMut(TraceEvent) + Send + 'static,
    ) -> Result<TraceSession, TraceError> {
        let dev_t = dev.kernel_dev_t().ok_or(TraceError::DevTooLarge(dev))?;
        let root = tracefs.root();
        let instances = root.join("instances");
        if let Err(source) = std::fs::read_dir(&instances) {
            return Err(TraceError::NotAccessible {
                path: instances,
                source,
            });
        }
        let event_rel = Path::new("events/block/block_rq_issue");
        if !root.join(event_rel).join("format").exists() {
            return Err(TraceError::NoTracepoint(root.join(event_rel)));
        }
        remove_stale_instances(&instances);
        let name = format!(
            "ferry-{}-{}",
            std::process::id(),
            INSTANCE_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let instance = instances.join(&name);
        if let Err(source) = std::fs::create_dir(&instance) {
            return Err(match source.kind() {
                std::io::ErrorKind::PermissionDenied => TraceError::NotAccessible {
                    path: instance,
                    source,
                },
                _ => TraceError::Io {
                    op: "creating tracefs instance",
                    path: instance,
                    source,
                },
            });
        }
        // From here the session owns the instance: any error drops it, which
        // removes the instance.
        let mut session = TraceSession {
            instance: instance.clone(),
            dev,
            filter: String::new(),
            stop: Arc::new(AtomicBool::new(false)),
            stats: Arc::new(TraceStats::default()),
            reader: None,
            _tracefs: tracefs.clone(),
        };
        write_file(
            &instance.join("buffer_size_kb"),
            &config.buffer_size_kb.to_string(),
        )?;
        let event = instance.join(event_rel);
        // Writes and discards only, in the kernel (fewer events to lose);
        // kernels whose filters lack globs on strings take the device alone.
        let narrow = format!("dev == {dev_t} && (rwbs ~ \"*W*\" || rwbs ~ \"*D*\")");
        let wide = format!("dev == {dev_t}");
        session.filter = if write_file(&event.join("filter"), &narrow).is_ok() {
            narrow
        } else {
            write_file(&event.join("filter"), &wide)?;
            wide
        };
        // Open the pipe before enabling: nothing is missed in between.
        let pipe_path = instance.join("trace_pipe");
        let pipe = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&pipe_path)
            .map_err(|source| TraceError::Io {
                op: "opening",
                path: pipe_path.clone(),
                source,
            })?;
        write_file(&event.join("enable"), "1")?;
        let stop = session.stop.clone();
        let stats = session.stats.clone();
        let handle = std::thread::Builder::new()
            .name(format!("trace-{name}"))
            .spawn(move || read_pipe(pipe, dev, config, stop, stats, sink))
            .map_err(TraceError::Thread)?;
        session.reader = Some(handle);
        Ok(session)
    }

    pub fn instance(&self) -> &Path {
        &self.instance
    }

    pub fn dev(&self) -> DevId {
        self.dev
    }

    /// The filter the kernel applies (`dev == N ...`, N = major<<20|minor).
    pub fn filter(&self) -> &str {
        &self.filter
    }

    pub fn stats(&self) -> &TraceStats {
        &self.stats
    }

    /// Disables the event, lets the reader drain what the kernel has, joins
    /// it, and removes the instance. Errors of the removal are returned
    /// (drop ignores them).
    pub fn stop(mut self) -> Result<(), TraceError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), TraceError> {
        let event = self.instance.join("events/block/block_rq_issue");
        let disabled = write_file(&event.join("enable"), "0");
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.reader.take() {
            // A panicking sink ends the thread; the instance goes anyway.
            let _ = h.join();
        }
        let _ = write_file(&event.join("filter"), "0");
        // The pipe is closed (the thread owned it): the instance is idle.
        let removed = std::fs::remove_dir(&self.instance).map_err(|source| TraceError::Io {
            op: "removing tracefs instance",
            path: self.instance.clone(),
            source,
        });
        disabled.and(removed)
    }
}

impl Drop for TraceSession {
    fn drop(&mut self) {
        if self.reader.is_some() || self.instance.exists() {
            let _ = self.teardown();
        }
    }
}

/// Removes the instances of ferry processes that are gone (killed before
/// their drop ran): `ferry-<pid>-<n>` whose pid is not running. An
/// instance whose pid was reused by another process stays (harmless: it
/// only holds a disabled buffer). Best effort: errors are ignored.
fn remove_stale_instances(instances: &Path) {
    let Ok(dir) = std::fs::read_dir(instances) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("ferry-"))
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, n)| n.parse::<u64>().ok().and(pid.parse::<u32>().ok()))
        else {
            continue;
        };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let _ = std::fs::write(e.path().join("events/block/block_rq_issue/enable"), "0");
        let _ = std::fs::remove_dir(e.path());
    }
}

/// The reader thread: waits (poll) for the pipe, reads what is there, parses
/// whole lines, hands writes to the sink. Once asked to stop it reads until
/// the pipe is empty, then returns (closing the pipe).
fn read_pipe(
    mut pipe: std::fs::File,
    dev: DevId,
    config: TraceConfig,
    stop: Arc<AtomicBool>,
    stats: Arc<TraceStats>,
    mut sink: impl FnMut(TraceEvent),
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut partial: Vec<u8> = Vec::new();
    // A line longer than this is garbage: dropped, not buffered forever.
    const MAX_LINE_BYTES: usize = 4096;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let mut fds = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout = if stopping {
            0
        } else {
            i32::try_from(config.poll_interval_ms).unwrap_or(i32::MAX)
        };
        // SAFETY: `fds` is one valid pollfd for the call's duration.
        unsafe { libc::poll(&mut fds, 1, timeout) };
        let mut got_any = false;
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    got_any = true;
                    partial.extend_from_slice(&buf[..n]);
                    while let Some(nl) = partial.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = partial.drain(..=nl).collect();
                        handle_line(&String::from_utf8_lossy(&line), dev, &stats, &mut sink);
                    }
                    if partial.len() > MAX_LINE_BYTES {
                        stats.malformed_lines.fetch_add(1, Ordering::Relaxed);
                        partial.clear();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    stats.read_failed.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
        if stopping && !got_any {
            if !partial.is_empty() {
                handle_line(&String::from_utf8_lossy(&partial), dev, &stats, &mut sink);
            }
            return;
        }
    }
}

fn handle_line(line: &str, dev: DevId, stats: &TraceStats, sink: &mut impl FnMut(TraceEvent)) {
    stats.lines.fetch_add(1, Ordering::Relaxed);
    match blockobs::parse_trace_line(line) {
        Ok(TraceLine::RqIssue(rq)) if rq.dev != dev => {
            stats.other_device.fetch_add(1, Ordering::Relaxed);
        }
        Ok(TraceLine::RqIssue(rq)) => {
            if let Some(w) = rq.as_write() {
                stats.writes.fetch_add(1, Ordering::Relaxed);
                sink(TraceEvent::Write(w));
            }
        }
        Ok(TraceLine::Lost { events, .. }) => {
            stats.lost_events.fetch_add(events, Ordering::Relaxed);
            sink(TraceEvent::Lost(events));
        }
        Ok(TraceLine::Other) => {}
        Err(_) => {
            stats.malformed_lines.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mount_path("/x\\04"), "/x\\04");
        assert_eq!(
            unescape_mount_path("/sys/kernel/tracing"),
            "/sys/kernel/tracing"
        );
    }

    #[test]
    fn a_character_device_is_refused() {
        assert!(matches!(
            resolve_device(Path::new("/dev/null")),
            Err(DeviceError::NotABlockDevice(_))
        ));
        assert!(matches!(
            resolve_device(Path::new("/nonexistent-ferry")),
            Err(DeviceError::Stat { .. })
        ));
    }
}
