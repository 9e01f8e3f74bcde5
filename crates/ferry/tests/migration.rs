//! Live migration of a workload between two agents on 127.0.0.1: phases,
//! hooks, a verified cutover under live writes, and a cutover that aborts
//! because the target died.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::agent::{pair, wait_until, Agent};
use common::*;

fn two_agents(extra: &str) -> (tempfile::TempDir, Agent, Agent) {
    common::agent::two_agents("ferry-migr-", extra)
}

/// `migrate start W --to b` at `a`, then waits until the migration is ready.
fn migrate_until_ready(a: &Agent, w: &str) {
    a.ok(&["migrate", "start", w, "--to", "b"]);
    wait_until(60, "migration ready", || phase(a, w) == "ready");
}

/// Once the way back is ready at `b` (within `secs`), `migrate rollback W`
/// asked at `a`: the report says b → a.
fn roll_back_to_a(a: &Agent, b: &Agent, w: &str, secs: u64) {
    wait_until(secs, "the way back is ready", || {
        b.json(&["migrate", "status", w])["phase"] == "ready"
    });
    let back = a.json(&["migrate", "rollback", w]);
    assert_eq!(
        (&back["from"], &back["to"]),
        (&"b".into(), &"a".into()),
        "{back}"
    );
}

/// `migrate cutover W`, asked again while it is refused as not ready: an
/// async share whose application keeps writing goes from ready to syncing
/// and back as its watcher's batches come and go.
fn cut_over_while_writing(a: &Agent, w: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = a
            .cli()
            .args(["--json", "migrate", "cutover", w])
            .output()
            .unwrap();
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("not ready") && std::time::Instant::now() < deadline,
            "cutover of {w} failed: {err}"
        );
        wait_until(60, "migration ready", || phase(a, w) == "ready");
    }
}

fn phase(a: &Agent, w: &str) -> String {
    a.json(&["migrate", "status", w])["phase"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn verified_cutover_under_live_writes_moves_the_workload() {
    require("qemu-io");
    let (root, a, b) = two_agents("");
    let hooks = root.path().join("hooks.log");
    let h = hooks.display();
    a.ok(&["volume", "create", "app", "--size", "64MiB"]);
    qemu_io(&a.uri("app"), &["write -P 0x77 32M 8M"]);
    a.ok(&[
        "workload",
        "create",
        "web",
        "--volume",
        "app",
        "--start",
        &format!("echo start $FERRY_NODE $FERRY_ROLE $FERRY_WORKLOAD >> {h}"),
        "--stop",
        &format!("echo stop $FERRY_NODE $FERRY_ROLE >> {h}"),
        "--check",
        &format!("grep -q 'start b' {h}"),
        "--hook-timeout",
        "10s",
    ]);
    // Cutover is refused before a migration exists, and before it is ready.
    let out = a
        .cli()
        .args(["migrate", "cutover", "web"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let writer = records::Writer::start(a.uri("app"), 0);
    let st = a.json(&["migrate", "start", "web", "--to", "b"]);
    assert!(
        ["seeding", "syncing", "ready"].contains(&st["phase"].as_str().unwrap()),
        "{st}"
    );
    assert!(
        st["bytes_remaining"].is_u64() && st.get("eta_seconds").is_some(),
        "{st}"
    );
    wait_until(60, "migration ready", || phase(&a, "web") == "ready");
    wait_until(30, "writes during the migration", || writer.acked() >= 20);
    // Cut over while the writer keeps writing: its writes wait during the
    // freeze and fail once the volume belongs to b.
    let report = a.json(&["migrate", "cutover", "web"]);
    let acked = writer.finish();
    assert_eq!(report["to"], "b", "{report}");
    let downtime = report["downtime_ms"].as_f64().unwrap();
    assert!(downtime > 0.0 && downtime < 10_000.0, "{report}");
    assert!(
        report["outage_ms"].as_f64().unwrap() >= downtime,
        "{report}"
    );
    assert_eq!(report["target_healthy"], true, "{report}");
    assert_eq!(phase(&a, "web"), "completed");
    // Hooks ran where and in the order they should, with their environment.
    let log = std::fs::read_to_string(&hooks).unwrap();
    assert_eq!(log, "stop a source\nstart b target web\n", "{log}");
    // b serves the volume now, with every acknowledged record and the old data.
    assert!(acked.len() >= 20);
    records::verify(&b.uri("app"), &acked);
    qemu_io(&b.uri("app"), &["read -P 0x77 32M 8M"]);
    assert_eq!(b.status("app")["role"], "primary");
    // a holds the replica; replication runs b → a and b's writes reach a.
    assert_eq!(a.status("app")["role"], "secondary");
    qemu_io(&b.uri("app"), &["write -P 0x42 60M 1M"]);
    b.ok(&["replicate", "wait", "app", "--timeout", "30s"]);
    let out = b.json(&["volume", "verify", "app"]);
    assert_eq!(out["equal"], true, "{out}");
    assert!(
        qemu_io_fails(&a.uri("app")),
        "the old primary must not serve the volume any more"
    );
    // Roll back (asked at a, run by b): the same verified cutover, b → a.
    roll_back_to_a(&a, &b, "web", 30);
    assert_eq!(a.status("app")["role"], "primary");
    assert_eq!(b.status("app")["role"], "secondary");
    qemu_io(
        &a.uri("app"),
        &["read -P 0x42 60M 1M", "read -P 0x77 32M 8M"],
    );
    records::verify(&a.uri("app"), &acked);
    let log = std::fs::read_to_string(&hooks).unwrap();
    assert!(
        log.ends_with("start b target web\nstop b source\nstart a target web\n"),
        "{log}"
    );
    // Finalize: a stops replicating to b; b's copy stays; no rollback after it.
    let fin = a.json(&["migrate", "finalize", "web"]);
    assert_eq!(fin["finalized"], true, "{fin}");
    assert!(a.status("app")["peer"].is_null(), "{}", a.status("app"));
    let out = a
        .cli()
        .args(["migrate", "rollback", "web"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "no rollback after finalize");
}

fn qemu_io_fails(uri: &str) -> bool {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k", uri])
        .output()
        .unwrap();
    !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("wrote")
}

#[test]
fn cutover_aborts_before_the_commit_point_when_the_target_dies() {
    require("qemu-io");
    let (root, a, mut b) = two_agents("\n[migration]\ncutover_drain_timeout_ms = 2000\n");
    let hooks = root.path().join("hooks.log");
    let h = hooks.display();
    a.ok(&["volume", "create", "db", "--size", "32MiB"]);
    // The stop hook kills b (once: a flag file arms it), so the target dies
    // after the cutover has begun.
    let armed = root.path().join("armed");
    std::fs::write(&armed, "").unwrap();
    let f = armed.display();
    a.ok(&[
        "workload",
        "create",
        "pg",
        "--volume",
        "db",
        "--start",
        &format!("echo start $FERRY_NODE >> {h}"),
        "--stop",
        &format!(
            "if rm {f} 2>/dev/null; then kill -9 {}; fi; echo stop $FERRY_NODE >> {h}",
            b.pid()
        ),
    ]);
    migrate_until_ready(&a, "pg");
    let out = a.cli().args(["migrate", "cutover", "pg"]).output().unwrap();
    b.kill9();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "cutover to a dead node must fail");
    assert!(err.contains("aborted before its commit point"), "{err}");
    assert_eq!(phase(&a, "pg"), "rolled-back");
    // a serves again: the start hook ran again, writes work.
    let log = std::fs::read_to_string(&hooks).unwrap();
    assert_eq!(log, "stop a\nstart a\n", "{log}");
    qemu_io(&a.uri("db"), &["write -P 9 0 64k", "read -P 9 0 64k"]);
    // b returns: the migration becomes ready again and can be retried.
    b.spawn();
    wait_until(60, "ready again", || phase(&a, "pg") == "ready");
    let report = a.json(&["migrate", "cutover", "pg"]);
    assert_eq!(report["to"], "b");
    qemu_io(&b.uri("db"), &["read -P 9 0 64k"]);
    std::thread::sleep(Duration::from_millis(10));
}

use common::records::guest_console as console;

/// Waits until the guest on `con` has verified its disk; how many records it found.
fn verified_by_guest(con: &std::path::Path, what: &str) -> u64 {
    wait_until(120, what, || console(con).1.is_some());
    let text = std::fs::read_to_string(con).unwrap();
    assert!(!text.contains("CORRUPT"), "{text}");
    console(con).1.unwrap()
}

#[test]
fn a_qemu_guest_keeps_every_record_across_a_test_cutover_and_a_cutover() {
    require("qemu-system-x86_64");
    // The guest: a Debian kernel and a busybox initramfs running records.sh.
    let ws = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let guest_dir = ws.join("target/guest");
    run_ok(
        Command::new(ws.join("scripts/build-guest"))
            .arg(ws.join("crates/ferry/tests/guest/records.sh"))
            .arg(&guest_dir),
    );
    let (_root, a, b) = two_agents("");
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
    let con_b = b.dir.join("vms/vm/console.log");
    wait_until(120, "the guest writes at a", || {
        console(&con_a).0.is_some_and(|n| n >= 20)
    });
    assert_eq!(console(&con_a).1, Some(0), "a fresh disk holds no record");
    migrate_until_ready(&a, "vm");
    // The guest keeps writing during the migration.
    let before = console(&con_a).0.unwrap();
    wait_until(60, "writes during the migration", || {
        console(&con_a).0.is_some_and(|n| n >= before + 10)
    });
    // A test cutover first: a disposable guest boots at b on a snapshot of
    // the replica, finds every record acknowledged before the test began
    // (consistent image), and writes into its overlay, while the guest at a
    // keeps writing.
    let acked_before_test = console(&con_a).0.unwrap();
    let t = a.json(&["migrate", "test", "vm"]);
    assert_eq!(t["check_ok"], true, "{t}");
    let con_test = b.dir.join("vms/vm@test/console.log");
    let in_snapshot = verified_by_guest(&con_test, "the test guest verifies the snapshot at b");
    assert!(
        in_snapshot > acked_before_test,
        "records acknowledged before the test: 0..={acked_before_test}, in the snapshot: {in_snapshot}"
    );
    wait_until(60, "the test guest writes its overlay", || {
        console(&con_test).0.is_some()
    });
    let during = console(&con_a).0.unwrap();
    wait_until(60, "production writes during the test", || {
        console(&con_a).0.is_some_and(|n| n >= during + 5)
    });
    let end = a.json(&["migrate", "test", "vm", "--end"]);
    assert!(
        end["overlay_bytes_discarded"].as_u64().unwrap() > 0,
        "{end}"
    );
    // The stop-and-boot (a running VM would move live: migration_live.rs).
    let report = a.json(&["migrate", "cutover", "vm", "--cold"]);
    assert_eq!(report["target_healthy"], true, "{report}");
    assert_eq!(report["vm"]["mode"], "cold", "{report}");
    // Stopped at a: its last acknowledged record is final there.
    let last_a = console(&con_a).0.unwrap();
    // At b the guest finds every record written at a, then appends.
    let verified = verified_by_guest(&con_b, "the guest verifies its disk at b");
    assert!(
        verified > last_a,
        "records acknowledged at a: 0..={last_a}, found at b: {verified}"
    );
    wait_until(60, "the guest writes at b", || {
        console(&con_b).0.is_some_and(|n| n > verified)
    });
    b.ok(&["workload", "stop", "vm"]);
    assert_eq!(phase(&a, "vm"), "completed");
}

#[test]
fn two_workloads_cut_over_one_by_one() {
    require("qemu-io");
    let (root, a, b) = two_agents("");
    let hooks = root.path().join("hooks.log");
    let h = hooks.display();
    for (w, v) in [("w1", "v1"), ("w2", "v2")] {
        a.ok(&["volume", "create", v, "--size", "32MiB"]);
        qemu_io(
            &a.uri(v),
            &[&format!("write -P {} 0 4M", if w == "w1" { 1 } else { 2 })],
        );
        a.ok(&[
            "workload",
            "create",
            w,
            "--volume",
            v,
            "--start",
            &format!("echo start $FERRY_WORKLOAD $FERRY_NODE >> {h}"),
            "--stop",
            &format!("echo stop $FERRY_WORKLOAD $FERRY_NODE >> {h}"),
            "--check",
            &format!("echo check $FERRY_WORKLOAD $FERRY_NODE >> {h}"),
        ]);
        a.ok(&["migrate", "start", w, "--to", "b"]);
    }
    // The rate limit changes live, for every volume of the workload.
    a.ok(&["migrate", "set", "w1", "--max-rate", "100MiB/s"]);
    assert_eq!(a.status("v1")["max_rate_bytes_per_s"], 100 << 20);
    a.ok(&["migrate", "set", "w1", "--max-rate", "0"]);
    let all = a.json(&["migrate", "status"]);
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    wait_until(60, "both ready", || {
        phase(&a, "w1") == "ready" && phase(&a, "w2") == "ready"
    });
    let out = a.json(&["migrate", "cutover", "--all", "--one-by-one"]);
    let reports = out.as_array().unwrap();
    assert_eq!(reports.len(), 2, "{out}");
    assert!(reports.iter().all(|r| r["target_healthy"] == true), "{out}");
    // Strictly one after the other: w2 stops only after w1 passed its check at b.
    let log = std::fs::read_to_string(&hooks).unwrap();
    assert_eq!(
        log, "stop w1 a\nstart w1 b\ncheck w1 b\nstop w2 a\nstart w2 b\ncheck w2 b\n",
        "{log}"
    );
    qemu_io(&b.uri("v1"), &["read -P 1 0 4M"]);
    qemu_io(&b.uri("v2"), &["read -P 2 0 4M"]);
    assert_eq!(phase(&a, "w1"), "completed");
    assert_eq!(phase(&a, "w2"), "completed");
}

#[test]
fn the_target_dying_after_the_commit_point_keeps_it_primary() {
    require("qemu-io");
    let (root, a, mut b) = two_agents("");
    let armed = root.path().join("armed");
    std::fs::write(&armed, "").unwrap();
    a.ok(&["volume", "create", "db", "--size", "32MiB"]);
    qemu_io(&a.uri("db"), &["write -P 5 0 8M"]);
    // b's start hook kills b's own agent (once): the target dies just after
    // it durably became primary.
    a.ok(&[
        "workload",
        "create",
        "pg",
        "--volume",
        "db",
        "--start",
        &format!(
            "if rm {} 2>/dev/null; then kill -9 $PPID; sleep 5; fi",
            armed.display()
        ),
    ]);
    migrate_until_ready(&a, "pg");
    let out = a
        .cli()
        .args(["--json", "migrate", "cutover", "pg"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(
        report["target_healthy"],
        false,
        "{report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.kill9();
    // Past the commit point a stays a replica and does not serve the volume.
    assert_eq!(phase(&a, "pg"), "failed");
    assert_eq!(a.status("db")["role"], "secondary");
    assert!(qemu_io_fails(&a.uri("db")));
    // b comes back as the primary with everything, and replicates to a again.
    b.spawn();
    assert_eq!(b.status("db")["role"], "primary");
    qemu_io(&b.uri("db"), &["read -P 5 0 8M", "write -P 6 8M 1M"]);
    b.ok(&["replicate", "wait", "db", "--timeout", "30s"]);
    let v = b.json(&["volume", "verify", "db"]);
    assert_eq!(v["equal"], true, "{v}");
}

#[test]
fn a_target_without_room_is_refused_before_anything_starts() {
    require("qemu-io");
    let root = tempfile::Builder::new()
        .prefix("ferry-room-")
        .tempdir()
        .unwrap();
    let _m = Mount::tmpfs(&root.path().join("b"), "24m");
    let a = Agent::start(root.path(), "a", "");
    let b = Agent::start(root.path(), "b", "");
    pair(&a, &b);
    a.ok(&["volume", "create", "big", "--size", "64MiB"]);
    qemu_io(&a.uri("big"), &["write -P 3 0 48M"]);
    a.ok(&["workload", "create", "big", "--volume", "big"]);
    let out = a
        .cli()
        .args(["migrate", "start", "big", "--to", "b"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("free") && err.contains("refusing to start"),
        "{err}"
    );
    assert!(a.status("big")["peer"].is_null(), "nothing started");
    let reps = b.json(&["replicate", "status"]);
    assert_eq!(reps.as_array().map(Vec::len), Some(0), "{reps}");
}

#[test]
fn a_merkle_mismatch_aborts_the_cutover_and_resends_the_differing_blocks() {
    require("qemu-io");
    let (_root, a, b) = two_agents("");
    a.ok(&["volume", "create", "img", "--size", "32MiB"]);
    qemu_io(&a.uri("img"), &["write -P 0x33 0 32M"]);
    a.ok(&["workload", "create", "m", "--volume", "img"]);
    migrate_until_ready(&a, "m");
    // b's leaves are hashed before the damage (else they hash the damage).
    wait_until(30, "b's leaves current", || {
        b.status("img")["merkle_stale_blocks"] == 0
    });
    // Damage b's copy behind ferry's back (as bit rot would): the background
    // read-back of the leaves notices it, so the cutover's comparison does.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(b.image("img"))
            .unwrap();
        f.write_all_at(&[0xee; 4096], 5 << 20).unwrap();
        f.sync_all().unwrap();
    }
    wait_until(30, "the read-back finds it", || {
        b.log_text().contains("merkle.scrub.changed")
    });
    let out = a.cli().args(["migrate", "cutover", "m"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a cutover onto a damaged copy must not commit"
    );
    assert!(
        err.contains("differ in 1 blocks") && err.contains("resent"),
        "{err}"
    );
    assert_eq!(a.status("img")["role"], "primary");
    // The block is resent; once ready again the cutover goes through.
    wait_until(60, "ready again", || phase(&a, "m") == "ready");
    let report = a.json(&["migrate", "cutover", "m"]);
    assert_eq!(report["to"], "b", "{report}");
    qemu_io(&b.uri("img"), &["read -P 0x33 0 32M"]);
}

#[test]
fn a_workload_that_fails_to_start_at_the_target_is_returned_by_a_reverse_cutover() {
    require("qemu-io");
    let (root, a, b) = two_agents("");
    let hooks = root.path().join("hooks.log");
    let h = hooks.display();
    a.ok(&["volume", "create", "app", "--size", "32MiB"]);
    qemu_io(&a.uri("app"), &["write -P 8 0 4M"]);
    // The application cannot start on b.
    a.ok(&[
        "workload",
        "create",
        "w",
        "--volume",
        "app",
        "--start",
        &format!("echo start $FERRY_NODE >> {h}; test $FERRY_NODE != b"),
        "--stop",
        &format!("echo stop $FERRY_NODE >> {h}"),
    ]);
    migrate_until_ready(&a, "w");
    let report = a.json(&["migrate", "cutover", "w"]);
    assert_eq!(report["target_healthy"], false, "{report}");
    assert_eq!(report["reverse_cutover"]["to"], "a", "{report}");
    assert_eq!(phase(&a, "w"), "rolled-back");
    assert_eq!(a.status("app")["role"], "primary");
    assert_eq!(b.status("app")["role"], "secondary");
    qemu_io(&a.uri("app"), &["read -P 8 0 4M", "write -P 9 4M 1M"]);
    let log = std::fs::read_to_string(&hooks).unwrap();
    assert_eq!(log, "stop a\nstart b\nstop b\nstart a\n", "{log}");
    // Replication a → b runs again: the migration can be retried.
    wait_until(60, "ready again", || phase(&a, "w") == "ready");
}

#[test]
fn a_failing_stop_hook_aborts_the_cutover_and_starts_the_source_again() {
    require("qemu-io");
    let (root, a, b) = two_agents("");
    let hooks = root.path().join("hooks.log");
    let h = hooks.display();
    a.ok(&["volume", "create", "app", "--size", "32MiB"]);
    qemu_io(&a.uri("app"), &["write -P 8 0 4M"]);
    // The application refuses to stop on a.
    a.ok(&[
        "workload",
        "create",
        "w",
        "--volume",
        "app",
        "--start",
        &format!("echo start $FERRY_NODE >> {h}"),
        "--stop",
        &format!("echo stop $FERRY_NODE >> {h}; exit 3"),
    ]);
    migrate_until_ready(&a, "w");
    let out = a.cli().args(["migrate", "cutover", "w"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("aborted before its commit point")
            && err.contains("stop hook failed (exit Some(3)"),
        "{err}"
    );
    assert_eq!(phase(&a, "w"), "rolled-back");
    // Nothing was frozen: a serves and takes writes; its application was
    // started again; b never started it.
    assert_eq!(a.status("app")["role"], "primary");
    assert_eq!(b.status("app")["role"], "secondary");
    qemu_io(&a.uri("app"), &["read -P 8 0 4M", "write -P 9 4M 1M"]);
    let log = std::fs::read_to_string(&hooks).unwrap();
    assert_eq!(log, "stop a\nstart a\n", "{log}");
    wait_until(60, "ready again", || phase(&a, "w") == "ready");
}

/// Reads a whole export into memory with nbdcopy.
fn read_export(uri: &str, dir: &std::path::Path) -> Vec<u8> {
    let out = dir.join("export-copy.raw");
    let _ = std::fs::remove_file(&out);
    run_ok(Command::new("nbdcopy").arg(uri).arg(&out));
    std::fs::read(&out).unwrap()
}

#[test]
fn a_test_cutover_runs_on_a_snapshot_while_production_keeps_writing() {
    require("qemu-io");
    require("nbdcopy");
    let (root, a, b) = two_agents("");
    let hooks = root.path().join("hooks.log");
    let h = hooks.display();
    a.ok(&["volume", "create", "app", "--size", "32MiB"]);
    // The test instance writes into its overlay; its check reads it back.
    a.ok(&[
        "workload",
        "create",
        "web",
        "--volume",
        "app",
        "--start",
        &format!(
            "echo start $FERRY_NODE $FERRY_ROLE >> {h}; [ $FERRY_ROLE != test ] || qemu-io -f raw -c 'write -P 0xee 30M 64k' $FERRY_VOLUME_URIS"
        ),
        "--stop",
        &format!("echo stop $FERRY_NODE $FERRY_ROLE >> {h}"),
        "--check",
        "[ $FERRY_ROLE != test ] && exit 0; out=$(qemu-io -f raw -c 'read -P 0xee 30M 64k' $FERRY_VOLUME_URIS 2>&1); echo \"$out\"; echo \"$out\" | grep -q 'read 65536/65536' && ! echo \"$out\" | grep -q 'verification failed'",
        "--hook-timeout",
        "20s",
    ]);
    let out = a.cli().args(["migrate", "test", "web"]).output().unwrap();
    assert!(!out.status.success(), "no test without a migration");
    let writer = records::Writer::start(a.uri("app"), 0);
    migrate_until_ready(&a, "web");
    wait_until(30, "writes during the migration", || writer.acked() >= 20);
    let before = writer.acked() as u64;
    let t = a.json(&["migrate", "test", "web"]);
    assert_eq!(t["check_ok"], true, "{t}");
    assert_eq!(t["node"], "b", "{t}");
    assert!(
        t["source_frozen_us"].as_u64().unwrap() < 2_000_000,
        "the source pauses only for the barrier: {t}"
    );
    let test_uri = b.uri("app@test");
    assert_eq!(t["exports"][0].as_str(), Some(test_uri.as_str()), "{t}");
    assert!(!a.json(&["migrate", "status", "web"])["test"].is_null());
    // Production keeps writing and replicating during the test.
    wait_until(60, "writes after the snapshot", || {
        writer.acked() as u64 >= before + 30
    });
    let out = a
        .cli()
        .args(["migrate", "cutover", "web"])
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("test instance"),
        "no cutover while a test runs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = a.cli().args(["migrate", "test", "web"]).output().unwrap();
    assert!(!out.status.success(), "one test at a time");
    let acked = writer.finish();
    assert!(acked.len() as u64 >= before + 30);

    // The snapshot is one flush barrier of the stream: a prefix of the
    // acknowledged records, holding everything acknowledged before the test
    // began and none of the records written after it (copy-before-write kept
    // them out), with the instance's own write on top.
    let img = read_export(&test_uri, root.path());
    let rec = |i: u64| &img[(i * 4096) as usize..(i * 4096 + 4096) as usize];
    let present = |i: u64| rec(i).iter().all(|&x| x as u64 == i % 200 + 1);
    let absent = |i: u64| rec(i).iter().all(|&x| x == 0);
    let k = (0..acked.len() as u64)
        .find(|&i| !present(i))
        .expect("records written after the test began leaked into the snapshot");
    assert!(
        k >= before,
        "records acknowledged before the test are in it: {k} < {before}"
    );
    assert!(
        k < acked.len() as u64,
        "later records are not in the snapshot"
    );
    for i in k..acked.len() as u64 {
        assert!(
            absent(i),
            "record {i} after the barrier {k} leaked into the snapshot"
        );
    }
    assert!(img[30 << 20..(30 << 20) + 65536].iter().all(|&x| x == 0xee));
    // Nothing of the test reaches production or the replica.
    qemu_io(&a.uri("app"), &["read -P 0 30M 64k"]);

    let e = a.json(&["migrate", "test", "web", "--end"]);
    assert!(
        e["overlay_bytes_discarded"].as_u64().unwrap() >= 65536,
        "{e}"
    );
    assert!(e["snapshot_bytes_saved"].as_u64().unwrap() > 0, "{e}");
    assert!(qemu_io_fails(&test_uri), "the test export is gone");
    let vdir = b.image("app").parent().unwrap().to_path_buf();
    assert!(!vdir.join("snapshot.cow").exists() && !vdir.join("test-overlay.raw").exists());
    assert!(a.json(&["migrate", "status", "web"])["test"].is_null());
    let log = std::fs::read_to_string(&hooks).unwrap();
    assert!(
        log.contains("start b test") && log.contains("stop b test"),
        "{log}"
    );
    assert!(
        !log.contains("stop a"),
        "production was never stopped: {log}"
    );

    // Replication went on underneath: the real cutover carries every record.
    let report = a.json(&["migrate", "cutover", "web"]);
    assert_eq!(report["to"], "b", "{report}");
    records::verify(&b.uri("app"), &acked);
    qemu_io(&b.uri("app"), &["read -P 0 30M 64k"]);
}

#[test]
fn a_workloads_volumes_replicate_as_one_ordered_stream() {
    require("nbdsh");
    const RECORDS: usize = 32768;
    let (_root, mut a, b) = two_agents("");
    for v in ["wal", "data"] {
        a.ok(&["volume", "create", v, "--size", "64MiB"]);
    }
    a.ok(&[
        "workload", "create", "db", "--volume", "wal", "--volume", "data",
    ]);
    a.json(&["migrate", "start", "db", "--to", "b", "--mode", "async"]);
    wait_until(60, "migration ready", || phase(&a, "db") == "ready");
    let one_stream = |a: &Agent| {
        ["wal", "data"].iter().all(|v| {
            let st = a.status(v);
            st["stream"] == "db" && st["link"] == "connected"
        })
    };
    wait_until(30, "one stream for both volumes", || one_stream(&a));
    // Record i goes to wal (even i) or data (odd i), each write acknowledged
    // before the next: one order across both volumes. The primary dies while
    // the async stream still carries some of them; the replica must hold a
    // prefix of that order, never a record whose predecessor is missing.
    let script = format!(
        "hs = []\n\
         for u in ['{}', '{}']:\n    h = nbd.NBD(); h.connect_uri(u); hs.append(h)\n\
         i = 0\n\
         while i < {RECORDS}:\n    hs[i % 2].pwrite(bytes([i % 250 + 1]) * 4096, (i // 2) * 4096); i += 1\n",
        a.uri("wal"),
        a.uri("data")
    );
    let mut writer = debian_tool("nbdsh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    a.kill9();
    let _ = writer.wait();
    // B applies whatever it received; give it a moment, then read its images.
    std::thread::sleep(Duration::from_millis(1000));
    let wal = std::fs::read(b.image("wal")).unwrap();
    let data = std::fs::read(b.image("data")).unwrap();
    let rec = |i: usize| {
        let img = if i % 2 == 0 { &wal } else { &data };
        &img[(i / 2) * 4096..(i / 2) * 4096 + 4096]
    };
    let present = |i: usize| rec(i).iter().all(|&x| usize::from(x) == i % 250 + 1);
    let k = (0..RECORDS).find(|&i| !present(i)).unwrap_or(RECORDS);
    assert!(
        k > 0 && k < RECORDS,
        "the primary died while writing: {k} of {RECORDS} records replicated"
    );
    for i in k..RECORDS {
        assert!(
            rec(i).iter().all(|&x| x == 0),
            "record {i} is on the replica but record {k} (on {}) is not: the volumes were not applied in one order",
            if k % 2 == 0 { "wal" } else { "data" }
        );
    }

    // The restarted primary forms the stream again, catches the replica up
    // from its activity log, and the workload cuts over with both volumes.
    a.spawn();
    wait_until(60, "one stream again after the restart", || one_stream(&a));
    wait_until(60, "migration ready again", || phase(&a, "db") == "ready");
    let report = a.json(&["migrate", "cutover", "db"]);
    assert_eq!(report["to"], "b", "{report}");
    let copy = |agent: &Agent, v: &str| {
        let out = _root.path().join(format!("{v}.copy"));
        run_ok(Command::new("nbdcopy").arg(agent.uri(v)).arg(&out));
        std::fs::read(&out).unwrap()
    };
    assert_eq!(copy(&b, "wal"), std::fs::read(a.image("wal")).unwrap());
    assert_eq!(copy(&b, "data"), std::fs::read(a.image("data")).unwrap());
    wait_until(30, "the stream runs back b → a", || {
        ["wal", "data"]
            .iter()
            .all(|v| b.status(v)["stream"] == "db" && b.status(v)["link"] == "connected")
    });
}

#[test]
fn auto_cutover_moves_the_workload_once_ready() {
    require("qemu-io");
    let (_root, a, b) = two_agents("");
    a.ok(&["volume", "create", "app", "--size", "16MiB"]);
    qemu_io(&a.uri("app"), &["write -P 0x5a 0 4M"]);
    a.ok(&["workload", "create", "web", "--volume", "app"]);
    let st = a.json(&["migrate", "start", "web", "--to", "b", "--auto-cutover"]);
    assert_eq!(st["auto_cutover"], true, "{st}");
    wait_until(60, "the automatic cutover", || {
        phase(&a, "web") == "completed"
    });
    let st = a.json(&["migrate", "status", "web"]);
    assert_eq!(st["last_cutover"]["to"], "b", "{st}");
    assert!(
        st["backlog_bytes"].is_u64() && st["merkle_stale_bytes"].is_u64(),
        "{st}"
    );
    assert_eq!(st["auto_cutover_attempts"], 1, "{st}");
    qemu_io(&b.uri("app"), &["read -P 0x5a 0 4M"]);
    // The decision and its outcome are in a's audit log, and b recorded
    // the takeover under the same operation id.
    let audit = |n: &Agent| -> Vec<serde_json::Value> {
        n.json(&["audit", "list"])["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["record"].clone())
            .collect()
    };
    let mut decided = None;
    wait_until(10, "the auto-cutover's result in a's audit log", || {
        let recs = audit(&a);
        let d = recs
            .iter()
            .find(|r| r["decision"] == "auto-cutover")
            .cloned();
        let done = recs
            .iter()
            .any(|r| r["decision"] == "auto-cutover-result" && r["detail"]["ok"] == true);
        decided = d;
        done
    });
    let op = decided.expect("the auto-cutover decision")["op"].clone();
    assert!(op.is_string());
    let at_b = audit(&b);
    assert!(
        at_b.iter()
            .any(|r| r["action"] == "Takeover" && r["op"] == op && r["peer"] == "a"),
        "{at_b:#?}"
    );
}

#[test]
fn a_workload_definition_changes_through_either_node() {
    let (_root, a, b) = two_agents("");
    a.ok(&["volume", "create", "app", "--size", "8MiB"]);
    a.ok(&[
        "workload",
        "create",
        "web",
        "--volume",
        "app",
        "--vip",
        "198.18.0.10/24",
        "--vip-interface",
        "eth0",
    ]);
    let out = a
        .cli()
        .args([
            "workload",
            "create",
            "bad",
            "--volume",
            "app",
            "--vip",
            "198.18.0.300/24",
            "--vip-interface",
            "eth0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an IP address"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.json(&["migrate", "start", "web", "--to", "b"]);
    // Changed at the target, seen at the source, and the other way round.
    let v = b.json(&[
        "workload",
        "update",
        "web",
        "--check",
        "true",
        "--vip",
        "198.18.0.11/24",
    ]);
    assert_eq!(v["updated_on"], serde_json::json!(["b", "a"]), "{v}");
    let w = a.json(&["workload", "show", "web"]);
    assert_eq!(w["vip"], "198.18.0.11/24", "{w}");
    assert_eq!(w["check"], "true", "{w}");
    a.ok(&["workload", "update", "web", "--no-vip", "--check", ""]);
    let w = b.json(&["workload", "show", "web"]);
    assert!(w["vip"].is_null() && w["check"].is_null(), "{w}");
    let out = b
        .cli()
        .args(["workload", "update", "web", "--vip", "198.18.0.12/33"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a bad prefix is refused");
    assert!(a.json(&["workload", "show", "web"])["vip"].is_null());
}

#[test]
fn a_takeover_committed_before_a_crash_is_finished_when_the_target_restarts() {
    require("qemu-io");
    let (_root, mut a, mut b) = two_agents("");
    for v in ["wal", "data"] {
        a.ok(&["volume", "create", v, "--size", "8MiB"]);
        qemu_io(&a.uri(v), &["write -P 0x42 0 1M"]);
    }
    a.ok(&[
        "workload", "create", "db", "--volume", "wal", "--volume", "data",
    ]);
    migrate_until_ready(&a, "db");
    // The target crashed right after writing its commit record: the source
    // stays down (as it would, frozen past the commit point).
    a.stop();
    b.kill9();
    let commits = b.dir.join("commits");
    std::fs::create_dir_all(&commits).unwrap();
    std::fs::write(
        commits.join("db.json"),
        r#"{"workload":"db","volumes":["wal","data"],"reverse_to":"a","mode":"sync"}"#,
    )
    .unwrap();
    b.spawn();
    for v in ["wal", "data"] {
        wait_until(30, "the volume promoted at start-up", || {
            b.status(v)["role"] == "primary"
        });
        qemu_io(&b.uri(v), &["read -P 0x42 0 1M"]);
    }
    assert!(
        !commits.join("db.json").exists(),
        "the record is removed once done"
    );
}

#[test]
fn stopping_one_volume_of_a_stream_leaves_the_others_replicating() {
    require("qemu-io");
    let (_root, a, b) = two_agents("");
    for v in ["wal", "data"] {
        a.ok(&["volume", "create", v, "--size", "8MiB"]);
    }
    a.ok(&[
        "workload", "create", "db", "--volume", "wal", "--volume", "data",
    ]);
    a.json(&["migrate", "start", "db", "--to", "b"]);
    wait_until(30, "one stream for both volumes", || {
        ["wal", "data"]
            .iter()
            .all(|v| a.status(v)["stream"] == "db" && a.status(v)["state"] == "up-to-date")
    });
    a.ok(&["replicate", "stop", "data"]);
    wait_until(30, "wal streams on alone", || {
        let st = a.status("wal");
        st["stream"] == "wal" && st["link"] == "connected"
    });
    assert!(a.status("data")["peer"].is_null());
    qemu_io(&a.uri("wal"), &["write -P 0x21 0 1M"]);
    qemu_io(&a.uri("data"), &["write -P 0x22 0 1M"]);
    a.ok(&["volume", "verify", "wal"]);
    wait_until(30, "the write reaches the replica of wal", || {
        b.status("wal")["bytes_applied"].as_u64().unwrap_or(0) >= 1 << 20
    });
    // Starting it again rejoins the stream, and only what changed moves.
    a.ok(&["replicate", "start", "data", "--to", "b"]);
    wait_until(30, "one stream again", || {
        ["wal", "data"]
            .iter()
            .all(|v| a.status(v)["stream"] == "db" && a.status(v)["state"] == "up-to-date")
    });
    a.ok(&["volume", "verify", "data"]);
}

/// Runs `script` with bash in `agent`'s mount namespace (where it mounts
/// its sync shares); returns stdout.
fn in_mounts(agent: &Agent, script: &str) -> String {
    run_ok(Command::new("nsenter").args([
        "-m",
        "-t",
        &agent.pid().to_string(),
        "bash",
        "-ec",
        script,
    ]))
}

/// Creates numbered files `DIR/w/i` ("record i") through `agent`'s mount
/// of a share, one after another, until one fails; every number printed
/// is a file whose creation and write the share answered.
struct FileWriter {
    child: Option<std::process::Child>,
    acked: Arc<Mutex<Vec<u64>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl FileWriter {
    fn start(agent: &Agent, dir: &std::path::Path) -> FileWriter {
        let d = dir.display();
        let mut child = Command::new("nsenter")
            .args(["-m", "-t", &agent.pid().to_string(), "bash", "-c"])
            .arg(format!(
                "mkdir -p {d}/w; i=0; while echo \"record $i\" > {d}/w/$i; do echo $i; i=$((i+1)); done"
            ))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let a = acked.clone();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(i) = line.trim().parse() {
                    a.lock().unwrap().push(i);
                }
            }
        });
        FileWriter {
            child: Some(child),
            acked,
            reader: Some(reader),
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits for the writer to stop on its own (its share went away).
    fn finish(mut self) -> Vec<u64> {
        let mut child = self.child.take().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the writer went on writing after the cutover");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.reader.take().unwrap().join().unwrap();
        self.acked.lock().unwrap().clone()
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_workload_with_a_sync_share_migrates_verified_and_back() {
    require("nsenter");
    require("unshare");
    let root = tempfile::Builder::new()
        .prefix("ferry-migr-share-")
        .tempdir()
        .unwrap();
    // Each agent mounts the share in a mount namespace of its own, at the
    // same path: as on two hosts.
    let private = ["unshare", "-m", "--propagation", "private"];
    let a = Agent::start_wrapped(root.path(), "a", "", &private);
    let b = Agent::start_wrapped(root.path(), "b", "", &private);
    pair(&a, &b);
    let mnt = root.path().join("srv");
    std::fs::create_dir_all(&mnt).unwrap();
    let m = mnt.to_str().unwrap();
    // The share replicates to no node yet: the migration starts it.
    a.ok(&["share", "create", "files", "--path", m, "--mode", "sync"]);
    in_mounts(
        &a,
        &format!(
            "cd {m}; mkdir seed; for i in $(seq 1 100); do head -c $((i * 97)) /dev/urandom > seed/file-$i; done
             ln seed/file-1 seed/hard; ln -s file-2 seed/sym; chmod 640 seed/file-3
             truncate -s 64M seed/sparse; printf x | dd of=seed/sparse bs=1 seek=50331648 conv=notrunc status=none"
        ),
    );
    a.ok(&["volume", "create", "app", "--size", "16MiB"]);
    qemu_io(&a.uri("app"), &["write -P 0x5a 0 1M"]);
    let hooks = root.path().join("hooks.log");
    let h = hooks.display();
    a.ok(&[
        "workload",
        "create",
        "web",
        "--volume",
        "app",
        "--share",
        "files",
        "--start",
        &format!("echo start $FERRY_NODE $FERRY_ROLE $FERRY_SHARE_PATHS >> {h}"),
        "--stop",
        &format!("echo stop $FERRY_NODE >> {h}"),
        // Runs in the target agent's mount namespace: its mount serves.
        "--check",
        "test -s $FERRY_SHARE_PATHS/seed/file-100",
        "--hook-timeout",
        "10s",
    ]);
    // A test cutover has no snapshot of a share to run on.
    let out = a.cli().args(["migrate", "test", "web"]).output().unwrap();
    assert!(!out.status.success());
    let writer = FileWriter::start(&a, &mnt);
    let st = a.json(&["migrate", "start", "web", "--to", "b"]);
    assert!(
        ["seeding", "syncing", "ready"].contains(&st["phase"].as_str().unwrap()),
        "{st}"
    );
    assert_eq!(a.json(&["share", "status", "files"])["peer"], "b");
    wait_until(60, "migration ready", || phase(&a, "web") == "ready");
    let st = a.json(&["migrate", "status", "web"]);
    assert_eq!(st["shares"][0]["share"], "files", "{st}");
    assert_eq!(st["shares"][0]["state"], "up-to-date", "{st}");
    wait_until(30, "files written during the migration", || {
        writer.acked() >= 20
    });
    // A file of b's copy damaged behind ferry's back (same size and mtime):
    // the digests differ, the cutover aborts before its commit point, and
    // the whole tree is compared again by content.
    let b_data = b.dir.join("shares/files/data");
    let victim = b_data.join("seed/file-50");
    run_ok(Command::new("bash").arg("-ec").arg(format!(
        "f={}; cp -p $f $f.keep; printf 'XXXX' | dd of=$f conv=notrunc status=none; touch -r $f.keep $f; rm $f.keep",
        victim.display()
    )));
    let out = a
        .cli()
        .args(["migrate", "cutover", "web"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("differs"), "{err}");
    assert_eq!(a.json(&["share", "status", "files"])["role"], "primary");
    wait_until(60, "migration ready again", || phase(&a, "web") == "ready");
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        std::fs::read(a.dir.join("shares/files/data/seed/file-50")).unwrap(),
        "the damaged file was sent again"
    );
    // Cut over while the writer keeps writing: its calls wait during the
    // freeze and fail once the share belongs to b.
    let report = a.json(&["migrate", "cutover", "web"]);
    let acked = writer.finish();
    assert_eq!(report["to"], "b", "{report}");
    assert_eq!(report["target_healthy"], true, "{report}");
    assert_eq!(phase(&a, "web"), "completed");
    // The aborted cutover ran a's start hook again.
    let log = std::fs::read_to_string(&hooks).unwrap();
    assert_eq!(
        log,
        format!("stop a\nstart a source {m}\nstop a\nstart b target {m}\n"),
        "{log}"
    );
    // b serves the share (mounted in its namespace) with every file the
    // writer saw written; a holds the replica.
    let bs = b.json(&["share", "status", "files"]);
    assert_eq!(bs["role"], "primary", "{bs}");
    assert_eq!(a.json(&["share", "status", "files"])["role"], "replica");
    assert!(acked.len() >= 20);
    let listing = in_mounts(&b, &format!("ls {m}/w | wc -l"));
    assert!(
        listing.trim().parse::<usize>().unwrap() >= acked.len(),
        "{listing}"
    );
    for i in &acked {
        let got = std::fs::read_to_string(b_data.join(format!("w/{i}"))).unwrap_or_default();
        assert_eq!(got, format!("record {i}\n"), "file w/{i} on b");
    }
    assert_eq!(b.status("app")["role"], "primary");
    // Replication runs b → a; the handover was verified, so the way back
    // compares metadata only and sends no file again.
    b.ok(&["share", "wait", "files", "--timeout", "60s"]);
    let bs = b.json(&["share", "status", "files"]);
    assert_eq!(bs["resync_bytes"], 0, "{bs}");
    let a_data = a.dir.join("shares/files/data");
    assert_trees_equal(&b_data, &a_data);
    in_mounts(&b, &format!("echo after > {m}/after-b; sync {m}/after-b"));
    // Roll back (asked at a, run by b): the same verified cutover, b → a.
    roll_back_to_a(&a, &b, "web", 60);
    assert_eq!(a.json(&["share", "status", "files"])["role"], "primary");
    assert_eq!(b.json(&["share", "status", "files"])["role"], "replica");
    assert_eq!(in_mounts(&a, &format!("cat {m}/after-b")), "after\n");
    a.ok(&["share", "wait", "files", "--timeout", "60s"]);
    assert_trees_equal(&a_data, &b_data);
    // Finalize: a stops replicating to b; b's copy stays.
    let fin = a.json(&["migrate", "finalize", "web"]);
    assert_eq!(fin["finalized"], true, "{fin}");
    let st = a.json(&["share", "status", "files"]);
    assert!(st["peer"].is_null(), "{st}");
    assert!(b_data.join("after-b").exists());
}

#[test]
fn a_workload_with_an_async_share_migrates_with_every_change_its_stop_hook_waited_for() {
    use std::os::unix::fs::PermissionsExt;
    require("nsenter");
    require("unshare");
    require("setpriv");
    let root = tempfile::Builder::new()
        .prefix("ferry-migr-async-")
        .tempdir()
        .unwrap();
    // Other users may reach the share's path (an application not run as root).
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Each agent in a mount namespace of its own: the promoted copy is
    // bind-mounted at the share's path, as on two hosts.
    let private = ["unshare", "-m", "--propagation", "private"];
    let a = Agent::start_wrapped(root.path(), "a", "", &private);
    let b = Agent::start_wrapped(root.path(), "b", "", &private);
    pair(&a, &b);
    // Used in place on a; the application writes it directly.
    let src = root.path().join("app");
    std::fs::create_dir_all(src.join("old")).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o777)).unwrap();
    for i in 0..50 {
        std::fs::write(src.join(format!("old/{i}")), vec![i as u8; 10_000]).unwrap();
    }
    let s = src.to_str().unwrap();
    a.ok(&["share", "create", "data", "--path", s, "--mode", "async"]);
    // The application: writes numbered files until told to stop; its stop
    // hook waits until it has (the last file it wrote is then on disk).
    let flag = root.path().join("stop");
    let done = root.path().join("done");
    let (f, d) = (flag.display(), done.display());
    let mut app = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "i=0; while [ ! -e {f} ]; do echo \"change $i\" > {s}/n$i; i=$((i+1)); sleep 0.005; done; echo $i > {d}"
        ))
        .spawn()
        .unwrap();
    let hooks = root.path().join("hooks.log");
    let h = hooks.display();
    a.ok(&[
        "workload",
        "create",
        "files",
        "--share",
        "data",
        "--stop",
        // Its last change lands just before it returns.
        &format!("touch {f}; while [ ! -e {d} ]; do sleep 0.01; done; echo bye > {s}/stopped"),
        "--start",
        &format!("echo start $FERRY_NODE $FERRY_SHARE_PATHS >> {h}"),
    ]);
    migrate_until_ready(&a, "files");
    // Ready stays ready while files keep changing as fast as a shell can
    // write them: they reach b within `async_share_ready_lag_ms`, though
    // some are always pending. The cutover right after still waits for
    // every change seen before its freeze (b's tree compared equal).
    let mut burst = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "mkdir -p {s}/burst; i=0; end=$((SECONDS+2)); \
             while [ $SECONDS -lt $end ]; do echo $i > {s}/burst/$((i%200)); i=$((i+1)); done"
        ))
        .spawn()
        .unwrap();
    let mut phases = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        phases.push(phase(&a, "files"));
    }
    assert!(burst.wait().unwrap().success());
    assert!(
        phases.iter().all(|p| p == "ready"),
        "readiness flapped while files changed: {phases:?}"
    );
    let report = cut_over_while_writing(&a, "files");
    assert_eq!(report["to"], "b", "{report}");
    assert!(app.wait().unwrap().success());
    let written: u64 = std::fs::read_to_string(&done)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(written > 0);
    // b serves the share from its copy, with every change the application
    // made before its stop hook returned.
    let bs = b.json(&["share", "status", "data"]);
    assert_eq!(bs["role"], "primary", "{bs}");
    let b_data = b.dir.join("shares/data/data");
    // Served at the share's path (its copy under the root-only data dir
    // bind-mounted there, nosuid and nodev).
    assert_eq!(bs["path"], s, "{bs}");
    for i in 0..written {
        let got = std::fs::read_to_string(b_data.join(format!("n{i}"))).unwrap_or_default();
        assert_eq!(got, format!("change {i}\n"), "n{i} on b");
    }
    assert_eq!(std::fs::read(b_data.join("stopped")).unwrap(), b"bye\n");
    assert_trees_equal(&src, &b_data);
    let log = std::fs::read_to_string(&hooks).unwrap();
    assert_eq!(log, format!("start b {s}\n"), "{log}");
    let opts = in_mounts(&b, &format!("findmnt -n -o OPTIONS --target {s}"));
    assert!(
        opts.contains("nosuid") && opts.contains("nodev"),
        "b's bind mount at {s}: {opts}"
    );
    // A user other than root uses the share at its path on b (the data dir
    // is root's alone), and b's changes reach a's copy.
    assert_eq!(
        std::fs::metadata(&b.dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    run_ok(Command::new("nsenter").args([
        "-m",
        "-t",
        &b.pid().to_string(),
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        "bash",
        "-ec",
        &format!("cat {s}/n0 > /dev/null; echo nobody > {s}/from-nobody"),
    ]));
    assert_eq!(
        std::fs::read(b_data.join("from-nobody")).unwrap(),
        b"nobody\n"
    );
    std::fs::write(b_data.join("from-b"), b"b").unwrap();
    wait_until(30, "b's changes on a", || {
        std::fs::read(a.dir.join("shares/data/data/from-b")).is_ok_and(|c| c == b"b")
            && std::fs::read(a.dir.join("shares/data/data/from-nobody"))
                .is_ok_and(|c| c == b"nobody\n")
    });
    assert_eq!(a.json(&["share", "status", "data"])["role"], "replica");
    // Back to a: b lets go of its bind mount; a serves its copy at the path.
    roll_back_to_a(&a, &b, "files", 60);
    let b_mounts = in_mounts(&b, "cat /proc/self/mountinfo");
    assert!(
        !b_mounts.contains(&format!(" {s} ")),
        "b still mounts {s}: {b_mounts}"
    );
    assert_eq!(in_mounts(&a, &format!("cat {s}/from-nobody")), "nobody\n");
}

/// Unix seconds now.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Unix seconds as RFC 3339 UTC, by `date` (another implementation than
/// the agent's).
fn rfc3339(secs: i64) -> String {
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Polls until the migration of `w` at `a` is completed; returns the Unix
/// time (fractional) it was first seen so.
fn completed_at(a: &Agent, w: &str, secs: u64) -> f64 {
    let mut seen = 0.0;
    wait_until(secs, &format!("the scheduled cutover of {w}"), || {
        let done = phase(a, w) == "completed";
        if done {
            seen = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
        }
        done
    });
    seen
}

#[test]
fn a_scheduled_cutover_happens_at_its_time_and_survives_a_restart() {
    require("qemu-io");
    let (_root, mut a, b) = two_agents("");
    for (v, w) in [("app", "web"), ("data", "db")] {
        a.ok(&["volume", "create", v, "--size", "16MiB"]);
        qemu_io(&a.uri(v), &["write -P 0x5a 0 4M"]);
        a.ok(&["workload", "create", w, "--volume", v]);
        migrate_until_ready(&a, w);
    }
    // Bad times are refused with what to write instead; nothing is scheduled.
    for (args, says) in [
        (vec!["--at", "2026-12-24T02:00:00"], "RFC 3339"),
        (vec!["--at", "tomorrow"], "RFC 3339"),
        (vec!["--at", "2000-01-01T00:00:00Z"], "in the past"),
        (vec!["--window", "Sat 02:00-04:00"], "DAYS HH:MM-HH:MM ZONE"),
        (
            vec!["--window", "Sat 02:00-04:00 Mars/Olympus"],
            "unknown time zone",
        ),
        (
            vec!["--window", "Sat 02:00-04:00 ../../etc/passwd"],
            "DAYS HH:MM-HH:MM ZONE",
        ),
    ] {
        let mut full = vec!["migrate", "cutover", "web"];
        full.extend(args.iter().copied());
        let out = a.cli().args(&full).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{full:?}: {err}"
        );
    }
    assert!(a.json(&["migrate", "status", "web"])["schedule"].is_null());
    // A schedule far ahead can be cancelled.
    let far = rfc3339(unix_now() + 86_400);
    a.ok(&["migrate", "cutover", "web", "--at", &far]);
    assert_eq!(
        a.json(&["migrate", "status", "web"])["scheduled_at"],
        far.as_str()
    );
    a.ok(&["migrate", "cutover", "web", "--cancel"]);
    assert!(a.json(&["migrate", "status", "web"])["schedule"].is_null());

    // 3 s ahead: it returns at once, and the cutover happens then.
    let t = unix_now() + 3;
    let at = rfc3339(t);
    let began = std::time::Instant::now();
    let v = a.json(&["migrate", "cutover", "web", "--at", &at]);
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "scheduling blocked"
    );
    assert_eq!(v["scheduled_at"], at.as_str(), "{v}");
    let st = a.json(&["migrate", "status", "web"]);
    assert_eq!(
        (&st["scheduled_at"], &st["schedule"]["state"], &st["phase"]),
        (&at.as_str().into(), &"pending".into(), &"ready".into()),
        "{st}"
    );
    let done = completed_at(&a, "web", 30);
    assert!(
        (t as f64 - 1.0..=t as f64 + 1.0).contains(&done),
        "scheduled at {t}, completed at {done:.3}"
    );
    let st = a.json(&["migrate", "status", "web"]);
    assert_eq!(st["schedule"]["state"], "done", "{st}");
    assert_eq!(st["schedule"]["last_attempt_at"], at.as_str(), "{st}");
    assert!(st["scheduled_at"].is_null(), "{st}");
    assert_eq!(st["last_cutover"]["to"], "b", "{st}");
    assert!(
        st["last_cutover"]["downtime_ms"].as_f64().unwrap() > 0.0,
        "{st}"
    );
    let steps: Vec<&str> = st["last_cutover"]["steps_us"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        &steps[..6],
        [
            "prehashed",
            "preflushed",
            "stopped",
            "flushed",
            "frozen",
            "drained"
        ],
        "{st}"
    );
    qemu_io(&b.uri("app"), &["read -P 0x5a 0 4M"]);
    let log = a.log_text();
    assert!(
        log.contains("migration.schedule.attempt")
            && log.contains("migration.schedule.cutover_done"),
        "{log}"
    );

    // A restart between scheduling and the time keeps the schedule.
    let t = unix_now() + 8;
    let at = rfc3339(t);
    a.ok(&["migrate", "cutover", "db", "--at", &at]);
    a.stop();
    a.spawn();
    let st = a.json(&["migrate", "status", "db"]);
    assert_eq!(
        (&st["scheduled_at"], &st["schedule"]["state"]),
        (&at.as_str().into(), &"pending".into()),
        "{st}"
    );
    // It is ready again once its link is back, then cuts over at its time
    // (or at the next look, 5 s later, if the link took longer).
    let done = completed_at(&a, "db", 60);
    assert!(done >= t as f64, "cut over before its time: {done} < {t}");
    let st = a.json(&["migrate", "status", "db"]);
    assert_eq!(st["schedule"]["state"], "done", "{st}");
    assert_eq!(st["last_cutover"]["to"], "b", "{st}");
    qemu_io(&b.uri("data"), &["read -P 0x5a 0 4M"]);
}

/// The current UTC weekday (Mon…Sun) and minute of the day, by `date`.
fn utc_day_minute() -> (String, u32) {
    let out = Command::new("date")
        .args(["-u", "+%a %H %M %S"])
        .output()
        .unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    let f: Vec<&str> = s.split_whitespace().collect();
    let (h, m): (u32, u32) = (f[1].parse().unwrap(), f[2].parse().unwrap());
    (f[0].to_string(), h * 60 + m)
}

#[test]
fn a_window_that_closes_before_the_migration_is_ready_ends_with_the_reason() {
    require("qemu-io");
    let (_root, a, mut b) = two_agents("");
    a.ok(&["volume", "create", "app", "--size", "16MiB"]);
    qemu_io(&a.uri("app"), &["write -P 0x5a 0 4M"]);
    a.ok(&["workload", "create", "web", "--volume", "app"]);
    migrate_until_ready(&a, "web");
    // The target goes away: the migration is no longer ready.
    b.stop();
    wait_until(30, "the migration notices", || phase(&a, "web") != "ready");
    // A window open now that closes at the end of this minute (at least
    // 8 s of it left).
    let sec = || unix_now() % 60;
    while sec() > 52 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (day, minute) = utc_day_minute();
    let window = format!(
        "{day} {:02}:{:02}-{:02}:{:02} UTC",
        minute / 60,
        minute % 60,
        (minute + 1) / 60,
        (minute + 1) % 60
    );
    let v = a.json(&["migrate", "cutover", "web", "--window", &window]);
    assert_eq!(v["schedule"]["window"], window.as_str(), "{v}");
    wait_until(90, "the schedule gives up", || {
        a.json(&["migrate", "status", "web"])["schedule"]["state"] == "gave-up"
    });
    let st = a.json(&["migrate", "status", "web"]);
    let reason = st["schedule"]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "the window {window} closed before a cutover succeeded"
        )) && reason.contains("not ready"),
        "{st}"
    );
    assert!(st["schedule"]["attempts"].as_u64().unwrap() >= 1, "{st}");
    assert_ne!(st["phase"], "completed", "{st}");
    let log = a.log_text();
    assert!(
        log.contains("migration.schedule.attempt")
            && log.contains("not-ready")
            && log.contains("migration.schedule.gave_up"),
        "{log}"
    );

    // `migrate start --auto-cutover --window`: only inside the window.
    b.spawn();
    wait_until(60, "ready again", || phase(&a, "web") == "ready");
    a.ok(&["volume", "create", "logs", "--size", "16MiB"]);
    a.ok(&["workload", "create", "logger", "--volume", "logs"]);
    // A window on another day than today (UTC): not now.
    let other = if day == "Mon" { "Tue" } else { "Mon" };
    let shut = format!("{other} 00:00-24:00 UTC");
    let st = a.json(&[
        "migrate",
        "start",
        "logger",
        "--to",
        "b",
        "--auto-cutover",
        "--window",
        &shut,
    ]);
    assert_eq!(st["schedule"]["recurring"], true, "{st}");
    wait_until(60, "logger ready", || phase(&a, "logger") == "ready");
    std::thread::sleep(Duration::from_secs(2));
    let st = a.json(&["migrate", "status", "logger"]);
    assert_eq!(
        (&st["phase"], &st["schedule"]["state"]),
        (&"ready".into(), &"pending".into()),
        "cut over outside its window: {st}"
    );
    assert!(
        st["scheduled_at"].as_str().unwrap().ends_with("T00:00:00Z"),
        "{st}"
    );
    // A new schedule replaces the one that gave up.
    a.ok(&[
        "migrate",
        "cutover",
        "web",
        "--window",
        "daily 00:00-24:00 UTC",
    ]);
    completed_at(&a, "web", 30);
    qemu_io(&b.uri("app"), &["read -P 0x5a 0 4M"]);
}

/// Issue 19, rolling upgrade: two nodes of the previous release (the end
/// of issue 18) replicate a workload; the replica is upgraded (its data dir
/// is read and upgraded, the old primary's link comes back to it), the
/// workload is cut over to it (the old node orchestrates the handover
/// against the new one), the old source — now the replica — is upgraded,
/// and the replication back runs between the two new nodes; no record is
/// lost on the way.
#[test]
fn a_rolling_upgrade_from_the_previous_release_moves_the_workload() {
    require("qemu-io");
    let Some(prev) = common::previous_release_bin() else {
        return;
    };
    let new = std::path::PathBuf::from(common::ferry_bin());
    let root = tempfile::Builder::new()
        .prefix("ferry-upgrade-")
        .tempdir()
        .unwrap();
    // Both nodes on the previous release.
    let start_old = |name: &str| {
        let mut a = Agent::configure(root.path(), name, "", "", &[]);
        a.set_bin(&prev);
        a.spawn();
        a
    };
    let mut a = start_old("a");
    let mut b = start_old("b");
    pair(&a, &b);
    // Really the previous release: its route table states no roles.
    assert!(a.json(&["api", "routes"])[0]["need"].is_null());
    a.ok(&["volume", "create", "app", "--size", "16MiB"]);
    qemu_io(&a.uri("app"), &["write -P 0x61 0 4M"]);
    a.ok(&["workload", "create", "web", "--volume", "app"]);
    migrate_until_ready(&a, "web");
    let w = records::Writer::start(a.uri("app"), 2048);
    wait_until(30, "writes", || w.acked() >= 5);

    // 1. Upgrade the replica: the old primary's link comes back to it.
    b.stop();
    b.set_bin(&new);
    b.spawn();
    assert!(b.json(&["node", "show"])["damaged"]
        .as_array()
        .unwrap()
        .is_empty());
    wait_until(60, "ready again with the upgraded replica", || {
        phase(&a, "web") == "ready"
    });
    // 2. The old node cuts over to the new one.
    let report = cut_over_while_writing(&a, "web");
    let acked = w.finish();
    assert_eq!(report["to"], "b", "{report}");
    assert!(acked.len() >= 5);
    qemu_io(&b.uri("app"), &["read -P 0x61 0 4M"]);
    records::verify(&b.uri("app"), &acked);
    // 3. Upgrade the old source, now the replica: the way back runs
    //    between two new nodes.
    a.stop();
    a.set_bin(&new);
    a.spawn();
    assert!(a.json(&["node", "show"])["damaged"]
        .as_array()
        .unwrap()
        .is_empty());
    wait_until(60, "the way back ready between the new nodes", || {
        b.json(&["migrate", "status", "web"])["phase"] == "ready"
    });
    // Both data dirs are in the new format now.
    for dir in [&a.dir, &b.dir] {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("volumes/app/volume.json")).unwrap())
                .unwrap();
        assert_eq!(v["ferry_record"], "volume", "{v}");
    }
    // And back, verified, new to new (asked again while the way back is
    // briefly not ready: a's restart has the link resync what a's activity
    // log marks).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let back = loop {
        let out = a
            .cli()
            .args(["--json", "migrate", "rollback", "web"])
            .output()
            .unwrap();
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            err.contains("not ready") && std::time::Instant::now() < deadline,
            "{err}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(back["to"], "a", "{back}");
    records::verify(&a.uri("app"), &acked);
}
