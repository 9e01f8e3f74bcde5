//! Archives of live volumes (issue 22): taken at one flush barrier while
//! writes go on, restored through the agent, and offline seeding of a
//! migration from a restored archive.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::agent::{two_agents, wait_until, Agent};
use common::{qemu_io, require, run_ok};

const MIB: u64 = 1 << 20;

/// `len` bytes of xorshift noise (incompressible: zstd has to work).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Writes `data` at `offset` of the agent's volume through NBD (qemu-io
/// reads it from a file).
fn write_file_at(a: &Agent, vol: &str, dir: &Path, data: &[u8], offset: u64) {
    let f = dir.join(format!("w-{offset}.bin"));
    std::fs::write(&f, data).unwrap();
    qemu_io(
        &a.uri(vol),
        &[&format!("write -s {} {offset} {}", f.display(), data.len())],
    );
    std::fs::remove_file(f).unwrap();
}

fn jobs(a: &Agent) -> Vec<serde_json::Value> {
    a.json(&["archive", "jobs"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A record (4 KiB, every byte `i % 200 + 1`) is whole or absent.
fn record_state(img: &[u8], i: u64) -> Option<bool> {
    let r = &img[(i * 4096) as usize..(i * 4096 + 4096) as usize];
    let want = (i % 200 + 1) as u8;
    if r.iter().all(|&b| b == want) {
        Some(true)
    } else if r.iter().all(|&b| b == 0) {
        Some(false)
    } else {
        None
    }
}

/// The archive holds the volume as of its barrier: every record a writer
/// had acknowledged before it and none after, nothing torn, and none of an
/// overwrite made while the archive was still reading (copy-before-write),
/// while the live volume has it all. Restored through the agent into a new
/// volume, checked against its Merkle root.
#[test]
fn a_live_volume_is_archived_at_a_barrier_while_writes_go_on() {
    require("qemu-io");
    let root = tempfile::Builder::new()
        .prefix("ferry-archive-live")
        .tempdir()
        .unwrap();
    // Slow archiving (level 19 on noise, one thread): the overwrite below
    // lands while the archive still reads.
    let a = Agent::start(
        root.path(),
        "a",
        "\n[archive]\nzstd_level = 19\nthreads = 1\n",
    );
    a.ok(&["volume", "create", "v", "--size", "128MiB"]);
    let before = noise(7, (48 * MIB) as usize);
    write_file_at(&a, "v", root.path(), &before, 0);
    // The record writer: records from 64 MiB on.
    let first = 64 * MIB / 4096;
    let writer = common::records::Writer::start(a.uri("v"), first);
    wait_until(30, "a few records", || writer.acked() >= 5);
    let store = root.path().join("store");
    let acked_before = writer.acked();
    let mut create = a.cli();
    create.args([
        "archive",
        "create",
        "volume/v",
        "--to",
        store.to_str().unwrap(),
        "--name",
        "live1",
        "--json",
    ]);
    let child = create
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The barrier is taken when the job appears; overwrite at once.
    wait_until(30, "the archive job", || {
        jobs(&a).iter().any(|j| j["name"] == "live1")
    });
    qemu_io(&a.uri("v"), &["write -P 0xbb 16M 32M"]);
    let still_running = jobs(&a)
        .iter()
        .any(|j| j["name"] == "live1" && j["state"] == "running");
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "archive create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let acked = writer.finish();
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["consistency"], "flush-barrier", "{job}");
    assert!(
        job["disks"][0]["generation"].is_string(),
        "the barrier minted a generation: {job}"
    );
    assert!(
        still_running,
        "the overwrite must land while the archive still reads (make it slower)"
    );

    // Restored into a new volume through the agent.
    a.ok(&[
        "archive",
        "restore",
        "live1",
        "--store",
        store.to_str().unwrap(),
        "--volume",
        "r",
    ]);
    let img = std::fs::read(a.image("r")).unwrap();
    assert_eq!(img.len() as u64, 128 * MIB);
    assert!(
        img[..(48 * MIB) as usize] == before[..],
        "the overwrite made after the barrier is not in the archive"
    );
    let live = std::fs::read(a.image("v")).unwrap();
    assert!(
        live[(16 * MIB) as usize..(48 * MIB) as usize]
            .iter()
            .all(|&b| b == 0xbb),
        "the live volume has it"
    );
    // Records: a prefix, whole, and it holds every record acknowledged
    // before the create was asked for.
    let mut n = 0u64;
    for (k, &i) in acked.iter().enumerate() {
        match record_state(&img, i) {
            Some(true) => {
                assert_eq!(
                    n, k as u64,
                    "record {i} present after an absent one: not a prefix"
                );
                n += 1;
            }
            Some(false) => {}
            None => panic!("record {i} is torn in the archive"),
        }
    }
    assert!(
        n as usize >= acked_before,
        "{n} records archived, {acked_before} were acknowledged before the create"
    );
    assert!(
        (n as usize) < acked.len(),
        "the writer went on after the barrier ({} records)",
        acked.len()
    );
    assert_eq!(
        record_state(&img, first + acked.len() as u64 + 1),
        Some(false)
    );
    // (The restore checked the volume against the archive's Merkle root.)
    let jobs = jobs(&a);
    assert!(
        jobs.iter()
            .any(|j| j["name"] == "restore-r" && j["state"] == "done"),
        "{jobs:?}"
    );
    a.ok(&["archive", "verify", "--store", store.to_str().unwrap()]);
}

/// Offline seeding: a volume archived at a barrier, 2% of it written
/// afterwards, the archive restored at B as the replica, and a migration
/// that sends only what changed; a wrong or unknown archive is refused.
#[test]
fn a_migration_seeded_from_an_archive_sends_only_what_changed() {
    require("qemu-io");
    let (root, a, b) = two_agents("ferry-archive-seed", "");
    let size = 256 * MIB;
    a.ok(&["volume", "create", "v", "--size", "256MiB"]);
    a.ok(&["workload", "create", "w", "--volume", "v"]);
    for i in 0..4u64 {
        write_file_at(
            &a,
            "v",
            root.path(),
            &noise(i + 1, (64 * MIB) as usize),
            i * 64 * MIB,
        );
    }
    let store = root.path().join("store");
    let s = store.to_str().unwrap();
    a.ok(&["archive", "create", "volume/v", "--to", s, "--name", "old"]);
    a.ok(&[
        "archive", "create", "volume/v", "--to", s, "--name", "seed1",
    ]);
    // 2% of the volume afterwards: five 1 MiB pieces.
    let changed = 5 * MIB + 256 * 1024;
    for (k, off) in [3u64, 40, 77, 150, 201].iter().enumerate() {
        write_file_at(
            &a,
            "v",
            root.path(),
            &noise(100 + k as u64, MIB as usize),
            off * MIB,
        );
    }
    write_file_at(&a, "v", root.path(), &noise(200, 256 * 1024), 230 * MIB);

    // An archive B does not hold, and one A never took, are refused.
    b.ok(&[
        "archive",
        "restore",
        "old",
        "--store",
        s,
        "--volume",
        "v",
        "--replica-of",
        "a",
    ]);
    let e = a.fails(&["migrate", "start", "w", "--to", "b", "--seed", "seed1"]);
    assert!(e.contains("not at archive") && e.contains("seed1"), "{e}");
    let e = a.fails(&["migrate", "start", "w", "--to", "b", "--seed", "nosuch"]);
    assert!(
        e.contains("no seed for archive") && e.contains("--checksum"),
        "{e}"
    );

    // The right one: only what changed crosses.
    b.ok(&["volume", "delete", "v", "--yes"]);
    b.ok(&[
        "archive",
        "restore",
        "seed1",
        "--store",
        s,
        "--volume",
        "v",
        "--replica-of",
        "a",
    ]);
    a.ok(&["migrate", "start", "w", "--to", "b", "--seed", "seed1"]);
    wait_until(120, "the seeded migration to be ready", || {
        a.json(&["migrate", "status", "w"])["phase"] == "ready"
    });
    let st = a.status("v");
    let sent =
        st["copy_bytes_sent"].as_u64().unwrap() + st["write_bytes_sent"].as_u64().unwrap_or(0);
    assert!(
        sent as f64 <= 1.2 * changed as f64,
        "sent {sent} bytes for {changed} changed (of {size}): {st}"
    );
    let v = a.json(&["volume", "verify", "v"]);
    assert_eq!(v["equal"], true, "{v}");
    run_ok(Command::new("cmp").arg(a.image("v")).arg(b.image("v")));
    let _ = Duration::ZERO;
}

use common::records::guest_console as console;

/// I2V with a real guest: a QEMU VM writing records is archived live
/// (`workload/vm`, one barrier), and `workload create --from-archive … --run`
/// on another node restores its disk and definition and boots it: the guest
/// finds every record it had acknowledged before the archive, none torn.
#[test]
fn a_running_vm_is_archived_and_booted_elsewhere_from_the_archive() {
    require("qemu-system-x86_64");
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let guest_dir = ws.join("target/guest");
    run_ok(
        Command::new(ws.join("scripts/build-guest"))
            .arg(ws.join("crates/ferry/tests/guest/records.sh"))
            .arg(&guest_dir),
    );
    let (root, a, b) = two_agents("ferry-archive-i2v", "");
    a.ok(&["volume", "create", "disk", "--size", "16MiB"]);
    let kernel = guest_dir.join("vmlinuz");
    let initrd = guest_dir.join("initramfs.cpio.gz");
    a.ok(&[
        "workload",
        "create",
        "vm",
        "--volume",
        "disk",
        "--vm-kernel",
        kernel.to_str().unwrap(),
        "--vm-initrd",
        initrd.to_str().unwrap(),
        "--vm-memory",
        "256MiB",
        "--vm-append",
        "console=ttyS0 panic=-1 quiet",
        "--hook-timeout",
        "20s",
    ]);
    a.ok(&["workload", "start", "vm"]);
    let con_a = a.dir.join("vms/vm/console.log");
    wait_until(120, "the guest writes at a", || {
        console(&con_a).0.is_some_and(|n| n >= 20)
    });
    let store = root.path().join("store");
    let acked_before = console(&con_a).0.unwrap();
    a.ok(&[
        "archive",
        "create",
        "workload/vm",
        "--to",
        store.to_str().unwrap(),
        "--name",
        "vm1",
    ]);
    let acked_after = console(&con_a).0.unwrap();
    a.ok(&["workload", "stop", "vm"]);
    // At b: the disk and the definition (its VM) from the archive, booted.
    let out = b.json(&[
        "workload",
        "create",
        "vm",
        "--from-archive",
        "vm1",
        "--store",
        store.to_str().unwrap(),
        "--run",
    ]);
    assert_eq!(out["workload"]["vm"]["memory_mib"], 256, "{out}");
    let con_b = b.dir.join("vms/vm/console.log");
    wait_until(120, "the guest verifies its disk at b", || {
        console(&con_b).1.is_some()
    });
    let text = std::fs::read_to_string(&con_b).unwrap();
    assert!(!text.contains("CORRUPT"), "{text}");
    let verified = console(&con_b).1.unwrap();
    // Records 0..=acked_before were acknowledged before the create was asked
    // for: all there; at most what was acknowledged by its end.
    assert!(
        verified > acked_before && verified <= acked_after + 1,
        "acknowledged before the archive: 0..={acked_before}, by its end: {acked_after}; found at b: {verified}"
    );
    wait_until(60, "the guest writes at b", || {
        console(&con_b).0.is_some_and(|n| n > verified)
    });
    b.ok(&["workload", "stop", "vm"]);
}
