//! Convergence of a migration with a real writer: fio (its `nbd` engine)
//! writing at a fixed rate over an overlapping random pattern through the
//! source's NBD export, against a migration whose copy is limited by
//! `--max-rate`. Without auto-converge the migration must say it does not
//! converge (both rates and the advice) within the documented bound; with
//! `--auto-converge` it must slow the writer, become ready and cut over with
//! every acknowledged write on the target.

mod common;

use std::time::{Duration, Instant};

use common::agent::Agent;
use common::fio::RateWriter;
use common::*;

const MIB: u64 = 1 << 20;
/// The migration's copy limit.
const MAX_RATE: u64 = MIB;
/// The writer's region (re-dirtied over and over) and rate (2 × MAX_RATE).
const REGION: &str = "8m";
const WRITE_RATE: &str = "2m";

/// The documented bound (README, Migrations): `not_converging` within 7 s
/// (the machine's 5 s window, `not_converging_after_ms`, plus two 1 s
/// samples) of the backlog ceasing to shrink — here from the start.
const NOT_CONVERGING_WITHIN_S: f64 = 7.0;

/// Two agents, a 64 MiB volume `app` (its first 8 MiB written) in workload
/// `web`.
fn setup() -> (tempfile::TempDir, Agent, Agent) {
    require("fio");
    require("qemu-io");
    let (root, a, b) = common::agent::two_agents("ferry-conv-", "");
    a.ok(&["volume", "create", "app", "--size", "64MiB"]);
    qemu_io(&a.uri("app"), &["write -P 0x33 0 8M"]);
    a.ok(&["workload", "create", "web", "--volume", "app"]);
    (root, a, b)
}

fn status(a: &Agent) -> serde_json::Value {
    a.json(&["migrate", "status", "web"])
}

/// Polls the status every 250 ms until `f` holds (or `secs` pass); returns
/// the seconds it took and the status that satisfied it.
fn until(
    a: &Agent,
    secs: f64,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> (f64, serde_json::Value) {
    let t0 = Instant::now();
    loop {
        let st = status(a);
        eprintln!(
            "{:6.2}s phase={} write={} send={} remaining={} not_converging={} throttle={}",
            t0.elapsed().as_secs_f64(),
            st["phase"],
            st["write_rate_bytes_per_s"],
            st["bandwidth_bytes_per_s"],
            st["bytes_remaining"],
            st["not_converging"],
            st["throttle_pct"]
        );
        if f(&st) {
            return (t0.elapsed().as_secs_f64(), st);
        }
        assert!(
            t0.elapsed().as_secs_f64() < secs,
            "timed out after {secs} s waiting for {what}: {st}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn writes_outrunning_the_rate_limit_report_not_converging_within_the_bound() {
    let (_root, a, _b) = setup();
    let _fio = RateWriter::start(&a.uri("app"), "4k", REGION, WRITE_RATE);
    // The writer runs at its rate before the migration starts.
    std::thread::sleep(Duration::from_secs(2));
    let rate = format!("{}MiB/s", MAX_RATE / MIB);
    a.ok(&["migrate", "start", "web", "--to", "b", "--max-rate", &rate]);
    let t0 = Instant::now();
    let (_, st) = until(&a, 30.0, "not_converging", |st| {
        st["not_converging"] == true
    });
    // Timed from before `migrate start` (plus one status poll of slack).
    let took = t0.elapsed().as_secs_f64();
    eprintln!("not_converging after {took:.2} s: {st}");
    assert!(took <= NOT_CONVERGING_WITHIN_S + 0.5, "{took:.2} s: {st}");
    // Both rates and the advice: the writes re-dirty about what the copy
    // sends, the copy sends about its limit, the writer writes its 2 MiB/s.
    let (dirty, copy, write) = (
        st["dirty_rate_bytes_per_s"].as_f64().unwrap(),
        st["copy_rate_bytes_per_s"].as_f64().unwrap(),
        st["write_rate_bytes_per_s"].as_f64().unwrap(),
    );
    let limit = MAX_RATE as f64;
    assert!((0.7 * limit..=1.3 * limit).contains(&copy), "{st}");
    assert!(dirty >= 0.9 * copy, "{st}");
    assert!((1.4 * limit..=2.6 * limit).contains(&write), "{st}");
    assert_eq!(st["max_rate_bytes_per_s"], MAX_RATE, "{st}");
    let advice = st["advice"].as_str().unwrap_or_default();
    assert!(
        advice.contains("--max-rate") && advice.contains("--auto-converge"),
        "{st}"
    );
    assert!(
        st["eta_seconds"].is_null(),
        "no ETA while it does not converge: {st}"
    );
    // Without auto-converge nothing is throttled.
    assert_eq!(st["throttle_pct"], 0, "{st}");
}

#[test]
fn auto_converge_slows_a_real_writer_until_ready_and_cuts_over() {
    let (_root, a, b) = setup();
    let fio = RateWriter::start(&a.uri("app"), "4k", REGION, WRITE_RATE);
    let records = records::Writer::paced(a.uri("app"), 16 * MIB / 4096, Duration::from_millis(50));
    std::thread::sleep(Duration::from_secs(2));
    let rate = format!("{}MiB/s", MAX_RATE / MIB);
    a.ok(&[
        "migrate",
        "start",
        "web",
        "--to",
        "b",
        "--max-rate",
        &rate,
        "--auto-converge",
    ]);
    let t0 = Instant::now();
    // The throttle rises and the writer's achieved rate falls.
    let (_, st) = until(&a, 30.0, "the throttle", |st| {
        st["throttle_pct"].as_u64() > Some(0)
    });
    assert_eq!(st["not_converging"], true, "{st}");
    assert!(
        st["advice"]
            .as_str()
            .unwrap()
            .contains("auto-converge is slowing"),
        "{st}"
    );
    // fio's 2 MiB/s of writes, paced to under 80% of it.
    // (Before the pacing, a delay proportional to each write's own time
    // left fio at 2.1 MB/s at 60%: its writes are fast and leave gaps.)
    let (took, st) = until(&a, 60.0, "the writer slowed", |st| {
        st["write_rate_bytes_per_s"].as_f64().unwrap() < 1.6 * MAX_RATE as f64
    });
    assert_ne!(st["phase"], "ready", "{st}");
    eprintln!("writer slowed after {took:.2} s: {st}");
    let (took, st) = until(&a, 60.0, "ready", |st| st["phase"] == "ready");
    let ready_s = t0.elapsed().as_secs_f64();
    eprintln!("ready after {ready_s:.2} s ({took:.2} s after the writer slowed): {st}");
    // Cut over at once (ready releases the throttle, and the writer may
    // outrun the link again before a later try).
    let report = loop {
        let out = a
            .cli()
            .args(["--json", "migrate", "cutover", "web"])
            .output()
            .unwrap();
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("not ready") && t0.elapsed() < Duration::from_secs(90),
            "{err}"
        );
        until(&a, 60.0, "ready again", |st| st["phase"] == "ready");
    };
    eprintln!("cutover: {report}");
    let acked = records.finish();
    drop(fio);
    assert_eq!(report["to"], "b", "{report}");
    assert!(acked.len() >= 20, "{}", acked.len());
    records::verify(&b.uri("app"), &acked);
    assert_eq!(b.status("app")["role"], "primary");
    // Everything else fio wrote reached b too: b's image (primary) and a's
    // (now its replica) compare equal once nothing writes.
    b.ok(&["replicate", "wait", "app", "--timeout", "30s"]);
    let v = b.json(&["volume", "verify", "app"]);
    assert_eq!(v["equal"], true, "{v}");
}
