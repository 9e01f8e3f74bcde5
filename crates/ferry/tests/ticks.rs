//! The live-move guest's TICK lines (tests/guest/live.sh) and the watcher
//! that stamps them from outside (tests/common/ticks.rs): the parser, the
//! report, the watcher on files written by a thread, and the guest itself
//! booted under QEMU.

mod common;

use common::ticks::{analyse, parse_tick, ConsoleWatch, Tick, TickLine};
use std::io::Write;
use std::time::{Duration, Instant};

/// The QEMU this test started: killed (by its PID) and reaped on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const BOOT: &str = "4a68ce98-a863-47b3-91b6-ae5cc4f867e9";

#[test]
fn parses_tick_lines_and_nothing_else() {
    assert_eq!(
        parse_tick(&format!("TICK 42 617.43 {BOOT} 89\r\n")),
        Some(TickLine {
            seq: 42,
            uptime_s: 617.43,
            boot_id: BOOT.to_string(),
            pid: 89
        })
    );
    for bad in [
        "WROTE 12".to_string(),
        "VERIFIED 0".to_string(),
        String::new(),
        "TICK".to_string(),
        format!("TICK 42 617.43 {BOOT}"),          // cut short
        format!("TICK 42 617.43 {BOOT} 89 extra"), // two lines run together
        format!("TICK x 617.43 {BOOT} 89"),        // seq not a number
        format!("TICK -1 617.43 {BOOT} 89"),       // negative seq
        format!("TICK 42 nan {BOOT} 89"),          // no time
        "TICK 42 617.43 4a68ce98-a863-47b3 89".to_string(), // boot id cut
        format!("TICK 42 617.43 {BOOT} 89x"),
        format!("[    2.5] TICK 42 617.43 {BOOT} 89"), // not at the start
    ] {
        assert_eq!(parse_tick(&bad), None, "{bad:?}");
    }
}

fn tick(at: Instant, file: usize, seq: u64, boot: &str, pid: u32) -> Tick {
    Tick {
        at,
        file,
        line: TickLine {
            seq,
            uptime_s: seq as f64 / 100.0,
            boot_id: boot.to_string(),
            pid,
        },
    }
}

#[test]
fn the_report_finds_the_pause_and_a_new_boot() {
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    // A live move: file 0 ticks 0..5 every 10 ms, a 150 ms pause, file 1 goes on.
    let mut live: Vec<Tick> = (0..5).map(|s| tick(ms(s * 10), 0, s, BOOT, 89)).collect();
    live.extend((5..10).map(|s| tick(ms(190 + s * 10), 1, s, BOOT, 89)));
    let r = analyse(&live);
    assert_eq!(r.ticks, 10);
    assert_eq!(r.max_gap, Duration::from_millis(200)); // 240 - 40
    assert_eq!(r.max_gap_after, Some((0, 4)));
    assert_eq!(r.max_gap_before, Some((1, 5)));
    assert_eq!(r.median_period, Duration::from_millis(10));
    assert!(r.one_continuous_run(), "{r:?}");

    // A live move that cut the guest's line in two: tick 5 is whole in
    // neither console; not a lost tick.
    let mut cut: Vec<Tick> = (0..5).map(|s| tick(ms(s * 10), 0, s, BOOT, 89)).collect();
    cut.extend((6..10).map(|s| tick(ms(190 + s * 10), 1, s, BOOT, 89)));
    let r = analyse(&cut);
    assert_eq!((r.seq_holes, r.lines_cut_by_a_move), (0, 1), "{r:?}");
    assert!(r.one_continuous_run(), "{r:?}");
    // Two missing across a move are lost ticks.
    let mut lost2: Vec<Tick> = (0..5).map(|s| tick(ms(s * 10), 0, s, BOOT, 89)).collect();
    lost2.extend((7..10).map(|s| tick(ms(190 + s * 10), 1, s, BOOT, 89)));
    assert_eq!(analyse(&lost2).seq_holes, 1);

    // A cold move: the target boots again (another boot id, seq from 0).
    let mut cold: Vec<Tick> = (0..5).map(|s| tick(ms(s * 10), 0, s, BOOT, 89)).collect();
    let other = "0b7ab5a8-2b8e-4c39-8a3d-0c7f4a8a2f11";
    cold.extend((0..5).map(|s| tick(ms(3000 + s * 10), 1, s, other, 90)));
    let r = analyse(&cold);
    assert_eq!(r.max_gap, Duration::from_millis(2960));
    assert_eq!(r.boot_ids.len(), 2);
    assert_eq!(r.pids.len(), 2);
    assert_eq!(r.seq_holes, 1);
    assert!(!r.one_continuous_run());

    // A lost tick is a hole even with one boot and one pid.
    let mut lost: Vec<Tick> = (0..3).map(|s| tick(ms(s * 10), 0, s, BOOT, 89)).collect();
    lost.push(tick(ms(40), 0, 4, BOOT, 89));
    assert_eq!(analyse(&lost).seq_holes, 1);
    assert!(!analyse(&lost).one_continuous_run());
    assert_eq!(analyse(&[]).ticks, 0);
}

#[test]
fn the_watcher_stamps_lines_as_they_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    std::fs::write(
        &a,
        format!("TICK 0 1.00 {BOOT} 89\nold lines before the watch\n"),
    )
    .unwrap();
    // b does not exist yet: the target's console appears during the move.
    let watch = ConsoleWatch::start(&[a.clone(), b.clone()]);
    let mut fa = std::fs::OpenOptions::new().append(true).open(&a).unwrap();
    for s in 1..20 {
        writeln!(fa, "TICK {s} 1.{s:02} {BOOT} 89").unwrap();
        if s % 5 == 0 {
            writeln!(fa, "WROTE {s}").unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // A line in two writes: stamped once, whole.
    write!(fa, "TICK 20 1.20 {}", &BOOT[..10]).unwrap();
    fa.flush().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    writeln!(fa, "{} 89", &BOOT[10..]).unwrap();
    let paused = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let mut fb = std::fs::File::create(&b).unwrap();
    for s in 21..40 {
        writeln!(fb, "TICK {s} 1.{s:02} {BOOT} 89").unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(watch.count(Some(1)), 19);
    let (ticks, r) = watch.finish();
    assert_eq!(
        ticks.first().unwrap().line.seq,
        1,
        "lines before the watch are not counted"
    );
    assert_eq!(r.ticks, 39);
    assert_eq!(r.seq_holes, 0, "{ticks:?}");
    assert!(r.one_continuous_run(), "{r:?}");
    // The watcher may stamp the tick before the pause a little late (it
    // polls every ~1 ms, on a loaded machine later): a smaller gap.
    assert!(
        r.max_gap >= Duration::from_millis(250) && r.max_gap <= paused.elapsed(),
        "{r:?}"
    );
    assert_eq!(r.max_gap_after, Some((0, 20)));
    assert_eq!(r.max_gap_before, Some((1, 21)));
    assert!(
        r.median_period >= Duration::from_millis(9) && r.median_period < Duration::from_millis(40),
        "{r:?}"
    );
}

/// The guest itself: under TCG it verifies its disk, writes records, and
/// ticks about every 10 ms with one boot id and one pid; with `ferry.busy=1`
/// its busy writer runs too.
#[test]
fn the_live_guest_ticks_and_writes_records() {
    common::require("qemu-system-x86_64");
    let ws = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let guest = ws.join("target/guest-live");
    common::run_ok(
        std::process::Command::new(ws.join("scripts/build-guest"))
            .arg(ws.join("crates/ferry/tests/guest/live.sh"))
            .arg(&guest),
    );
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let con = dir.path().join("console.log");
    let log = std::fs::File::create(&con).unwrap();
    let watch = ConsoleWatch::start(std::slice::from_ref(&con));
    let child = std::process::Command::new("qemu-system-x86_64")
        .args(["-nographic", "-no-reboot", "-accel", "tcg", "-m", "256"])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initramfs.cpio.gz"))
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet ferry.busy=1 ferry.busy_mib=16",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,cache=none",
            disk.display()
        ))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let _qemu = KillOnDrop(child);
    common::agent::wait_until(120, "300 ticks, records and the busy writer", || {
        let text = std::fs::read_to_string(&con).unwrap_or_default();
        watch.count(None) >= 300 && text.contains("BUSY 16 MiB") && text.contains("WROTE 5")
    });
    let (_, r) = watch.finish();
    let text = std::fs::read_to_string(&con).unwrap();
    assert!(
        !text.contains("CORRUPT") && !text.contains("WRITEFAIL"),
        "{text}"
    );
    assert_eq!(
        common::records::guest_console(&con).1,
        Some(0),
        "a fresh disk"
    );
    assert!(r.one_continuous_run(), "{r:?}");
    assert!(
        r.median_period >= Duration::from_millis(5) && r.median_period <= Duration::from_millis(50),
        "{r:?}"
    );
    eprintln!("live guest: {r:?}");
}
