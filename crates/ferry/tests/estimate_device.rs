//! Observing a block device ferry does not serve (issue 21, `ferry estimate
//! start NAME --device /dev/X`): a file-backed loop device written by fio
//! (4 KiB random writes, fixed seed, with overwrites), watched at once by
//! `/proc/diskstats` and by the `block:block_rq_issue` tracepoint in a
//! tracefs instance of its own. fio's own I/O log (`--write_iolog`: every
//! write's offset and length as fio submitted it) is the exact reference.
//!
//! Needs root, losetup, fio and tracefs (mounted here for the test if the
//! machine has it unmounted). The binary crate has no library target, so
//! this file compiles `src/estimate/device.rs` itself (it names nothing of
//! `crate::`).

mod common;

#[path = "../src/estimate/device.rs"]
#[allow(dead_code)]
mod device;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;

use device::{DiskstatsReader, TraceConfig, TraceEvent, TraceSession, Tracefs};
use ferry_core::blockobs::{blocks_touched, DiskstatsObservation};

const BLOCK_BYTES: u64 = 4096;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A loop device over a sparse file; detached on drop (every path).
struct LoopDevice {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    fn new(size_bytes: u64) -> LoopDevice {
        let dir = tempfile::Builder::new()
            .prefix("ferry-estdev-")
            .tempdir()
            .unwrap();
        let file = dir.path().join("backing.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(size_bytes)
            .unwrap();
        let out = Command::new(common::require("losetup"))
            .args(["-f", "--show"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice {
            path: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
            _dir: dir,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// tracefs: the machine's mount at /sys/kernel/tracing, or one made for
/// this test (unmounted when the last `Tracefs` clone goes). Not another
/// mount `locate` may find: a concurrent test's own mount goes when it ends.
fn tracefs(dir: &Path) -> Tracefs {
    match Tracefs::locate() {
        Ok(t) if t.root() == Path::new("/sys/kernel/tracing") => t,
        other => {
            if let Err(e) = other {
                eprintln!("{e}");
            }
            let at = dir.join("tracefs");
            eprintln!("(the test mounts tracefs at {})", at.display());
            std::fs::create_dir_all(&at).unwrap();
            Tracefs::mount_at(&at).expect("mounting tracefs")
        }
    }
}

/// (offset, length) of every write in a fio I/O log (versions 2 and 3: an
/// optional timestamp, then `file write offset length`).
fn iolog_writes(log: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "write")?;
            Some((f.get(i + 1)?.parse().ok()?, f.get(i + 2)?.parse().ok()?))
        })
        .collect()
}

#[test]
fn diskstats_bounds_and_the_tracepoint_gives_the_exact_blocks_fio_wrote() {
    assert!(is_root(), "this test needs root (loop devices, tracefs)");
    let fio = common::require("fio");
    let work = tempfile::Builder::new()
        .prefix("ferry-estdev-work-")
        .tempdir()
        .unwrap();
    let lo = LoopDevice::new(80 << 20);
    let dev = device::resolve_device(&lo.path).unwrap();
    let tfs = tracefs(work.path());

    let (tx, rx) = mpsc::channel();
    let session = TraceSession::start(&tfs, dev, TraceConfig::default(), move |e| {
        let _ = tx.send(e);
    })
    .expect("tracing block_rq_issue");
    let instance = session.instance().to_owned();
    assert!(instance.is_dir());
    assert!(instance
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with(&format!("ferry-{}-", std::process::id())));
    let enable = |root: &Path| {
        std::fs::read_to_string(root.join("events/block/block_rq_issue/enable")).unwrap()
    };
    assert_eq!(enable(&instance).trim(), "1");
    eprintln!(
        "{} = {dev}, filter: {}",
        lo.path.display(),
        session.filter()
    );

    let mut stats = DiskstatsReader::new(dev);
    assert_eq!(stats.sample().unwrap(), DiskstatsObservation::Baseline);

    // 4096 random 4 KiB writes over 64 MiB (16384 blocks), no random map:
    // some blocks are written more than once, so unique < written.
    let iolog = work.path().join("writes.iolog");
    let out = Command::new(&fio)
        .args([
            "--name=estimate",
            "--rw=randwrite",
            "--bs=4k",
            "--size=64M",
            "--io_size=16M",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=8",
            "--randseed=21",
            "--norandommap",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", lo.path.display()))
        .arg(format!("--write_iolog={}", iolog.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fio_bytes = report["jobs"][0]["write"]["io_bytes"].as_u64().unwrap();

    let DiskstatsObservation::Interval(iv) = stats.sample().unwrap() else {
        panic!("no diskstats interval for {dev}")
    };
    session.stop().expect("stopping the trace session");
    assert!(!instance.exists(), "the tracefs instance is left behind");

    let writes = iolog_writes(&std::fs::read_to_string(&iolog).unwrap());
    let logged_bytes: u64 = writes.iter().map(|w| w.1).sum();
    assert_eq!(writes.len(), 4096);
    assert_eq!(logged_bytes, fio_bytes);
    let mut fio_blocks = BTreeSet::new();
    for (off, len) in &writes {
        fio_blocks.extend(off / BLOCK_BYTES..(off + len - 1) / BLOCK_BYTES + 1);
    }

    let (mut traced_bytes, mut lost) = (0u64, 0u64);
    let mut traced_blocks = BTreeSet::new();
    let mut traced_requests = 0u64;
    for e in rx.try_iter() {
        match e {
            TraceEvent::Write(w) => {
                assert_eq!(w.dev, dev);
                traced_requests += 1;
                traced_bytes += w.nr_sectors * 512;
                traced_blocks.extend(blocks_touched(w.sector, w.nr_sectors, BLOCK_BYTES).unwrap());
            }
            TraceEvent::Lost(n) => lost += n,
        }
    }
    let unique_bytes = fio_blocks.len() as u64 * BLOCK_BYTES;
    eprintln!(
        "fio wrote {fio_bytes} B in {} IOs ({} unique 4 KiB blocks = {unique_bytes} B); \
         diskstats: {} B written (upper bound) in {} writes, {:.0} write IOPS over {} ms; \
         trace: {traced_bytes} B in {traced_requests} requests, {} blocks, {lost} events lost",
        writes.len(),
        fio_blocks.len(),
        iv.written_bytes_upper_bound,
        iv.writes_completed,
        iv.write_iops(),
        iv.elapsed_ms,
        traced_blocks.len(),
    );
    // diskstats: an upper bound on unique bytes, and on what fio wrote, and
    // close to the latter (nothing else writes to this device).
    assert!(fio_bytes > unique_bytes, "the workload has no overwrites");
    assert!(iv.written_bytes_upper_bound >= fio_bytes);
    assert!(
        iv.written_bytes_upper_bound <= fio_bytes + fio_bytes / 100,
        "diskstats counted {} B for {fio_bytes} B written",
        iv.written_bytes_upper_bound
    );
    assert!(!iv.counters_reset);
    // The trace: exactly fio's blocks (the kernel may merge adjacent
    // requests, which changes the request count, not the blocks) — unless
    // the ring buffer overflowed, then a subset and a loss reported.
    if lost == 0 {
        assert_eq!(traced_bytes, fio_bytes);
        assert_eq!(traced_blocks, fio_blocks);
    } else {
        assert!(traced_blocks.is_subset(&fio_blocks));
    }
    assert_eq!(lost, 0, "the trace lost {lost} events at 4 MiB per CPU");
}

/// A session dropped while a panic unwinds (here: the test's own) still
/// disables the event and removes its instance.
#[test]
fn a_trace_session_is_removed_on_a_panic() {
    assert!(is_root(), "this test needs root");
    let work = tempfile::Builder::new()
        .prefix("ferry-estdev-work-")
        .tempdir()
        .unwrap();
    let lo = LoopDevice::new(8 << 20);
    let dev = device::resolve_device(&lo.path).unwrap();
    let tfs = tracefs(work.path());
    let (tx, rx) = mpsc::channel();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let s = TraceSession::start(&tfs, dev, TraceConfig::default(), |_| {}).unwrap();
        tx.send(s.instance().to_owned()).unwrap();
        panic!("failure while observing");
    }));
    assert!(r.is_err());
    let instance = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the session did not start");
    assert!(
        !instance.exists(),
        "{} is left behind after a panic",
        instance.display()
    );
}

/// The instance of a ferry process killed before its drop ran is removed
/// by the next session; another program's instance is left alone.
#[test]
fn a_dead_process_instance_is_removed_by_the_next_session() {
    assert!(is_root(), "this test needs root");
    let work = tempfile::Builder::new()
        .prefix("ferry-estdev-work-")
        .tempdir()
        .unwrap();
    let lo = LoopDevice::new(8 << 20);
    let dev = device::resolve_device(&lo.path).unwrap();
    let tfs = tracefs(work.path());
    // A pid above pid_max is never running.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stale = tfs
        .root()
        .join(format!("instances/ferry-{}-0", pid_max + 1));
    let foreign = tfs.root().join("instances/ferry-test-other");
    std::fs::create_dir(&stale).unwrap();
    std::fs::create_dir(&foreign).unwrap();
    let s = TraceSession::start(&tfs, dev, TraceConfig::default(), |_| {}).unwrap();
    let (stale_left, foreign_left) = (stale.exists(), foreign.exists());
    drop(s);
    let _ = std::fs::remove_dir(&stale);
    let _ = std::fs::remove_dir(&foreign);
    assert!(!stale_left, "{} was not removed", stale.display());
    assert!(foreign_left, "{} was removed", foreign.display());
}

/// `ferry estimate start --device` on a real agent: from the tracepoint
/// the blocks fio wrote exactly (overwrites coalesce); with the tracepoint
/// turned off, from /proc/diskstats: at least as much, flagged an upper
/// bound.
#[test]
fn an_agent_estimates_a_device_by_its_tracepoint_or_else_from_diskstats() {
    assert!(is_root(), "this test needs root (loop devices, tracefs)");
    let fio = common::require("fio");
    let root = tempfile::Builder::new()
        .prefix("ferry-estdev-agent-")
        .tempdir()
        .unwrap();
    let lo = LoopDevice::new(64 << 20);
    for (name, cfg, method) in [
        ("a", "", "tracepoint"),
        ("b", "\n[estimate]\nuse_tracepoint = false\n", "diskstats"),
    ] {
        let mut a = common::agent::Agent::start(root.path(), name, cfg);
        let dev = lo.path.to_str().unwrap();
        let st = a.json(&[
            "estimate",
            "start",
            "d",
            "--device",
            dev,
            "--duration",
            "1h",
        ]);
        assert_eq!(st["source"]["kind"], "device", "{st}");
        // A 10 s window holds the writes whole from 6 s on (see estimate.rs).
        std::thread::sleep(std::time::Duration::from_secs(6));
        // 4 MiB written twice, 64 KiB at a time, bypassing the page cache:
        // 128 writes, 8 MiB, 64 distinct 64 KiB blocks.
        let out = Command::new(&fio)
            .args([
                "--name=w",
                "--rw=write",
                "--bs=64k",
                "--size=4M",
                "--loops=2",
                "--direct=1",
                "--ioengine=psync",
            ])
            .arg(format!("--filename={dev}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let w10 = |st: &serde_json::Value| {
            st["working_set"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["window_s"] == 10)
                .map(|p| p["max_keys"].as_u64().unwrap())
        };
        common::agent::wait_until(30, "a full 10 s window with the writes", || {
            w10(&a.json(&["estimate", "status", "d"])).is_some_and(|n| n > 0)
        });
        // diskstats is read once a second: let it see the last writes.
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let st = a.json(&["estimate", "status", "d"]);
        assert_eq!(st["method"], method, "{st}");
        assert_eq!(st["size_bytes"], 64u64 << 20, "{st}");
        let written = st["bytes_written"].as_u64().unwrap();
        if method == "tracepoint" {
            assert_eq!(st["unique_bytes_upper_bound"], false, "{st}");
            assert_eq!(written, 8 << 20, "{st}");
            assert_eq!(w10(&st), Some(64), "{st}");
        } else {
            assert_eq!(st["unique_bytes_upper_bound"], true, "{st}");
            assert!(written >= 8 << 20, "{st}");
            // Every write counted as new blocks: at least the 128 writes.
            assert!(w10(&st).unwrap() >= 128, "{st}");
            let rep = a.json(&["estimate", "report", "d", "--bandwidth", "10MiB/s"]);
            assert!(rep["warnings"].to_string().contains("upper bound"), "{rep}");
        }
        a.ok(&["estimate", "delete", "d"]);
        a.stop();
    }
    // The agent's tracefs instances are gone with its sessions.
    if let Ok(t) = Tracefs::locate() {
        let left: Vec<_> = std::fs::read_dir(t.root().join("instances"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ferry-"))
            .collect();
        assert!(left.is_empty(), "instances left: {left:?}");
    }
}
