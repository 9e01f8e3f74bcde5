//! Statistics history on real agents: the sampler records what clients
//! write, `ferry stats` and `GET /api/v1/stats` read it back, a `kill -9`
//! loses nothing that was recorded, a torn record on disk reads as a gap
//! (never a garbage sample), bad series names are refused, and a completed
//! migration has a report (JSON and printable HTML).

mod common;

use common::agent::{wait_until, Agent};
use common::*;
use serde_json::Value;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Samples every 200 ms (the 10 s points aggregate them).
const FAST: &str = "\n[history]\nsample_interval_ms = 200\n";

fn points(a: &Agent, series: &str, since: &str) -> Vec<Value> {
    a.json(&["stats", series, "--since", since])["points"]
        .as_array()
        .unwrap()
        .clone()
}

/// Every point is a sample of what was recorded: finite, min ≤ mean ≤ max,
/// counted at least once, on its tier's grid.
fn assert_sane(pts: &[Value]) {
    for p in pts {
        let (mean, min, max) = (
            p["mean"].as_f64().unwrap(),
            p["min"].as_f64().unwrap(),
            p["max"].as_f64().unwrap(),
        );
        assert!(
            min <= mean * 1.0001 + 1e-6 && mean <= max * 1.0001 + 1e-6,
            "{p}"
        );
        assert!(min >= 0.0 && max < 1e12, "{p}");
        assert!(p["count"].as_u64().unwrap() >= 1, "{p}");
        assert_eq!(p["t"].as_u64().unwrap() % 10, 0, "{p}");
    }
}

#[test]
fn history_records_writes_survives_kill_9_and_reads_torn_records_as_gaps() {
    require("qemu-io");
    let root = tempfile::Builder::new()
        .prefix("ferry-hist-")
        .tempdir()
        .unwrap();
    let mut a = Agent::start(root.path(), "a", FAST);
    a.ok(&["volume", "create", "v", "--size", "32MiB"]);
    a.ok(&["workload", "create", "w", "--volume", "v"]);
    for i in 0..4 {
        qemu_io(&a.uri("v"), &[&format!("write -P {} 0 4M", i + 1)]);
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let series = "volume/v/write_bytes_per_s";
    wait_until(30, "a write rate in the history", || {
        points(&a, series, "5m")
            .iter()
            .any(|p| p["max"].as_f64().unwrap() > 0.0)
    });
    // The list names the node's, the volume's series.
    let list = a.json(&["stats"]);
    let names: Vec<&str> = list["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for want in [
        "node/a/write_bytes_per_s",
        "node/a/write_iops",
        "volume/v/write_iops",
        "volume/v/write_latency_p99_ms",
        "volume/v/backlog_bytes",
        "volume/v/resync_percent",
        "workload/w/write_bytes_per_s",
    ] {
        assert!(names.contains(&want), "{want} not in {list}");
    }
    assert_eq!(list["series_bytes_max"], 1_454_400);
    // What was written: 16 MiB over the run's few seconds.
    let before = points(&a, series, "5m");
    assert_sane(&before);
    let bytes: f64 = before
        .iter()
        .map(|p| p["mean"].as_f64().unwrap() * p["count"].as_f64().unwrap() * 0.2)
        .sum();
    assert!(
        (8e6..40e6).contains(&bytes),
        "≈16 MiB written, history says {bytes}"
    );
    // CSV.
    let csv = a.ok(&["stats", series, "--since", "5m", "--csv"]);
    assert!(csv.starts_with("t,mean,min,max,count\n"), "{csv}");
    assert_eq!(csv.lines().count(), before.len() + 1);

    // kill -9 in the middle of a 10 s interval (so that the restart falls
    // in the same one, its point already holding some 20 samples): every
    // point recorded before is there after, with at least the samples it
    // had — the open point resumed, not started again.
    wait_until(12, "the middle of a 10 s interval", || {
        (4..6).contains(&(unix_now() % 10))
    });
    let backlog = "volume/v/backlog_bytes";
    let before_backlog = points(&a, backlog, "5m");
    a.kill9();
    a.spawn();
    std::thread::sleep(std::time::Duration::from_millis(800));
    for (s, before) in [(series, &before), (backlog, &before_backlog)] {
        let after = points(&a, s, "5m");
        assert_sane(&after);
        for p in before {
            let q = after
                .iter()
                .find(|q| q["t"] == p["t"])
                .unwrap_or_else(|| panic!("{s}: point {p} lost by kill -9: {after:?}"));
            assert!(q["count"].as_u64() >= p["count"].as_u64(), "{s}: {p} → {q}");
            assert!(q["max"].as_f64() >= p["max"].as_f64(), "{s}: {p} → {q}");
        }
    }

    // A torn record: bytes of the first point's record overwritten on disk.
    a.stop();
    let file = a.dir.join("history/volume/v/write_bytes_per_s.ring");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 1_454_400);
    let t = before[0]["t"].as_u64().unwrap();
    let at = (t / 10) % 8640 * 24;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&[0x42, 0x13, 0x37], at + 5).unwrap();
    }
    a.spawn();
    let torn = points(&a, series, "5m");
    assert_sane(&torn);
    assert!(torn.iter().all(|p| p["t"].as_u64() != Some(t)), "{torn:?}");
    for p in &before[1..] {
        assert!(torn.iter().any(|q| q["t"] == p["t"]), "{p} lost");
    }

    // Bad series: refused before any file is touched.
    let tok = a.token();
    for (q, code) in [
        ("series=volume/../write_iops", 400),
        ("series=volume/v/../../../etc/passwd", 400),
        ("series=volume/v/nope", 400),
        ("series=volume/v/write_iops&step=x", 400),
        ("", 400),
        ("series=volume/zz/write_iops", 404),
        ("series=volume/v/write_iops&from=20&to=10", 400),
    ] {
        let (c, body) = https(&a.api, &format!("/api/v1/stats?{q}"), Some(&tok));
        assert_eq!(c, code, "{q}: {body}");
    }
    let (c, body) = https(
        &a.api,
        "/api/v1/stats?series=node/a/write_iops&since=600&step=60",
        Some(&tok),
    );
    assert_eq!(c, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["step_s"].as_u64(), v["tier_step_s"].as_u64()),
        (Some(60), Some(60))
    );
}

#[test]
fn a_completed_migration_has_a_report() {
    require("qemu-io");
    let (_root, a, b) = common::agent::two_agents("ferry-hist-mig-", FAST);
    a.ok(&["volume", "create", "v", "--size", "32MiB"]);
    qemu_io(&a.uri("v"), &["write -P 7 0 16M"]);
    a.ok(&["workload", "create", "w", "--volume", "v"]);
    a.ok(&["migrate", "start", "w", "--to", "b"]);
    wait_until(60, "migration ready", || {
        a.json(&["migrate", "status", "w"])["phase"] == "ready"
    });
    // The workload's lag, probed ten times per sample: p50 ≤ p99 in every
    // point, and 0 once nothing waits.
    wait_until(10, "lag percentiles of 0 once ready", || {
        let p99 = points(&a, "workload/w/lag_p99_seconds", "5m");
        p99.last().is_some_and(|p| p["mean"] == 0.0)
    });
    let (p50, p99) = (
        points(&a, "workload/w/lag_p50_seconds", "5m"),
        points(&a, "workload/w/lag_p99_seconds", "5m"),
    );
    for q in &p50 {
        let same = p99.iter().find(|p| p["t"] == q["t"]);
        let same = same.unwrap_or_else(|| panic!("no p99 at {q}: {p99:?}"));
        assert!(
            q["max"].as_f64().unwrap() <= same["max"].as_f64().unwrap(),
            "p50 {q} above p99 {same}"
        );
    }
    // A report before the end says so.
    let r = a.json(&["migrate", "report", "w"]);
    assert_eq!(
        (r["completed"].as_bool(), &r["ended_unix"]),
        (Some(false), &Value::Null),
        "{r}"
    );
    // An operator's own token cuts over: the report names who did what
    // (from the audit log).
    let ops = a.ok(&["token", "create", "ops", "--role", "operator"]);
    let ops = ops
        .split_whitespace()
        .find(|w| w.starts_with("ops."))
        .unwrap()
        .to_string();
    let out = a
        .cli()
        .env("FERRY_TOKEN", &ops)
        .args(["--json", "migrate", "cutover", "w"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cut: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Give the sampler a sample after the end.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let r = a.json(&["migrate", "report", "w"]);
    assert_eq!(r["completed"], true, "{r}");
    assert_eq!(r["phase"], "completed");
    assert_eq!(r["downtime_ms"], cut["downtime_ms"], "{r}");
    assert_eq!(r["verified"], true);
    assert_eq!(r["started_by"], "token api.token (admin)", "{r}");
    assert_eq!(r["cut_over_by"], "token ops (operator)", "{r}");
    let phases: Vec<&str> = r["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases.last(), Some(&"completed"), "{r}");
    assert!(
        phases.contains(&"ready") && phases.contains(&"cutting-over"),
        "{r}"
    );
    let started = r["started_unix"].as_u64().unwrap();
    let ended = r["ended_unix"].as_u64().unwrap();
    assert!(started <= ended && ended <= started + 120, "{r}");
    // The 16 MiB written (and the rest of the 32 MiB volume's copy) went
    // over the link.
    let moved = r["bytes_moved"].as_u64().unwrap_or(0);
    assert!(moved >= 16 << 20, "bytes_moved {moved}: {r}");
    assert!(r["link_rate"]["peak_bytes_per_s"].as_f64().unwrap() > 0.0);
    // The printable page.
    let html = a.ok(&["migrate", "report", "w", "--html"]);
    assert!(html.contains("<link rel=\"stylesheet\" href=\"/console/print.css\">"));
    assert!(html.contains("Migration of w") && html.contains("completed"));
    assert!(!html.contains("<script"));
    // A viewer may read it; a migration that is not here is 404.
    let (c, body) = https(&a.api, "/api/v1/migrations/nope/report", Some(&a.token()));
    assert_eq!(c, 404, "{body}");
    drop(b);
}
