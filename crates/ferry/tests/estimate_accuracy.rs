//! The estimator's forecast against the real migration it forecasts: fio
//! (its `nbd` engine) writes at a fixed rate over an overlapping random
//! pattern through the source's export for the whole test; `ferry estimate`
//! observes it, its report (at the migration's `--max-rate`) forecasts the
//! initial sync, the time to `ready` and the convergence verdict; then the
//! real migration runs under the same load and each measured figure must lie
//! within ±20 % of the forecast (the verdicts must agree).
//!
//! Each figure is printed as `ACCURACY <case> <figure> forecast=… measured=…
//! error=…` (bench/estimate_accuracy.sh collects them). The load can be
//! changed for the bench: `FERRY_ACCURACY_WRITE_RATE` (fio's `rate=`, e.g.
//! `2m`), `FERRY_ACCURACY_MODE` (`async` or `sync`).

mod common;

use std::time::{Duration, Instant};

use common::fio::RateWriter;
use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// One case: a volume of `size_mib` MiB with its first `written_mib` MiB
/// written, in workload `web`.
struct Case {
    name: &'static str,
    size_mib: u64,
    written_mib: u64,
    bs: &'static str,
    region: &'static str,
    write_rate: String,
    max_rate: u64,
    observe_s: u64,
    mode: String,
}

struct Run {
    report: Value,
    /// `(seconds since migrate start, status)` polled every 200 ms.
    trace: Vec<(f64, Value)>,
}

/// Observes the load with an estimate, reports at the migration's rate, then
/// migrates under the same load until `done` holds on the status (or
/// `limit_s` pass).
fn run(c: &Case, limit_s: f64, done: impl Fn(&Value) -> bool) -> Run {
    require("fio");
    require("qemu-io");
    let (_root, a, _b) = common::agent::two_agents("ferry-acc-", "");
    let size = format!("{}MiB", c.size_mib);
    a.ok(&["volume", "create", "app", "--size", &size]);
    qemu_io(
        &a.uri("app"),
        &[&format!("write -P 0x33 0 {}M", c.written_mib)],
    );
    a.ok(&["workload", "create", "web", "--volume", "app"]);
    let _fio = RateWriter::start(&a.uri("app"), c.bs, c.region, &c.write_rate);
    std::thread::sleep(Duration::from_secs(1));
    a.ok(&[
        "estimate",
        "start",
        "e",
        "--volume",
        "app",
        "--duration",
        "1h",
    ]);
    let rate = format!("{}MiB/s", c.max_rate / MIB);
    // The link probed under the load, unlimited and at the migration's
    // `--max-rate` (which paces the copier only: the copy is link-bound).
    let t = Instant::now();
    let probe = a.json(&["estimate", "probe", "--to", "b", "--max-rate", &rate]);
    eprintln!("probe: {probe}");
    std::thread::sleep(Duration::from_secs(c.observe_s).saturating_sub(t.elapsed()));
    a.ok(&["estimate", "stop", "e"]);
    let report = a.json(&["estimate", "report", "e", "--to", "b", "--max-rate", &rate]);
    eprintln!("link: {}", report["link"]);
    let mut trace = Vec::new();
    a.ok(&[
        "migrate",
        "start",
        "web",
        "--to",
        "b",
        "--mode",
        &c.mode,
        "--max-rate",
        &rate,
    ]);
    let t0 = Instant::now();
    loop {
        let st = a.json(&["migrate", "status", "web"]);
        let t = t0.elapsed().as_secs_f64();
        let stop = done(&st) || t > limit_s;
        trace.push((t, st));
        if stop {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    print_trace(c.name, &trace);
    Run { report, trace }
}

fn print_trace(name: &str, trace: &[(f64, Value)]) {
    let mut last = String::new();
    for (t, st) in trace {
        let line = format!(
            "phase={} remaining={} backlog={} copy={} dirty={} write={} not_converging={}",
            st["phase"],
            st["bytes_remaining"],
            st["backlog_bytes"],
            st["copy_rate_bytes_per_s"],
            st["dirty_rate_bytes_per_s"],
            st["write_rate_bytes_per_s"],
            st["not_converging"]
        );
        if line != last {
            eprintln!("{name} {t:6.2}s {line}");
            last = line;
        }
    }
}

/// The first time (s since migrate start) `f` held.
fn first(trace: &[(f64, Value)], f: impl Fn(&Value) -> bool) -> Option<f64> {
    trace.iter().find(|(_, st)| f(st)).map(|(t, _)| *t)
}

fn verdict(report: &Value, mode: &str) -> (String, Option<f64>) {
    let v = &report["forecast"][format!("ready_{mode}")]["verdict"];
    (
        v["verdict"].as_str().unwrap_or_default().to_string(),
        v["seconds"].as_f64(),
    )
}

/// Prints one figure; returns its relative error.
fn figure(case: &str, what: &str, forecast: f64, measured: f64) -> f64 {
    let err = (forecast - measured) / measured;
    println!(
        "ACCURACY {case} {what} forecast={forecast:.2}s measured={measured:.2}s error={:+.1}%",
        err * 100.0
    );
    err
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// The copy is link-bound (4 MiB/s for 96 MiB allocated: about 24 s) while
/// fio rewrites 64 KiB blocks of a 32 MiB region at 2 MiB/s: it converges,
/// and the initial sync (the copy's first pass over the allocated bytes)
/// and the time to `ready` are each within ±20 % of the forecast.
#[test]
fn forecast_matches_a_converging_migration_under_load() {
    let mode = env_or("FERRY_ACCURACY_MODE", "async");
    let c = Case {
        name: "converging",
        size_mib: 256,
        written_mib: 96,
        bs: "64k",
        region: "32m",
        write_rate: env_or("FERRY_ACCURACY_WRITE_RATE", "2m"),
        max_rate: 4 * MIB,
        observe_s: 60,
        mode: mode.clone(),
    };
    let r = run(&c, 120.0, |st| st["phase"] == "ready");
    let rep = &r.report;
    eprintln!("report: {}", rep["forecast"]);
    let init_forecast = rep["forecast"]["initial_sync"]["seconds"].as_f64().unwrap();
    let (v, ready_forecast) = verdict(rep, &mode);
    let ready = first(&r.trace, |st| st["phase"] == "ready");
    // The first pass ends when what remains is what the writes re-dirtied
    // meanwhile: the status (sampled once a second) first shows less than a
    // second of copy left, plus that remainder at the copy's rate.
    let first_pass = r
        .trace
        .iter()
        .find(|(_, st)| st["bytes_remaining"].as_u64().unwrap_or(u64::MAX) < c.max_rate)
        .map(|(t, st)| t + st["bytes_remaining"].as_f64().unwrap() / c.max_rate as f64);
    println!("ACCURACY converging verdict forecast={v} measured_ready={ready:?}");
    assert_eq!(v, "converges", "{rep}");
    let ready = ready.expect("the migration became ready");
    let first_pass = first_pass.expect("the first pass ended");
    let e1 = figure("converging", "initial_sync", init_forecast, first_pass);
    let e2 = figure(
        "converging",
        &format!("ready_{mode}"),
        ready_forecast.unwrap(),
        ready,
    );
    assert!(e1.abs() <= 0.2, "initial sync off by {:.0} %", e1 * 100.0);
    assert!(e2.abs() <= 0.2, "time to ready off by {:.0} %", e2 * 100.0);
}

/// 4 KiB writes at 2 MiB/s over an 8 MiB region against a 1 MiB/s copy (as
/// in tests/convergence.rs): the forecast says async does not converge, and
/// the real migration reports `not_converging`.
#[test]
fn forecast_and_migration_agree_that_a_hot_writer_does_not_converge() {
    let c = Case {
        name: "not-converging",
        size_mib: 64,
        written_mib: 8,
        bs: "4k",
        region: "8m",
        write_rate: "2m".into(),
        max_rate: MIB,
        observe_s: 25,
        mode: "async".into(),
    };
    let r = run(&c, 40.0, |st| {
        st["not_converging"] == true || st["phase"] == "ready"
    });
    let rep = &r.report;
    eprintln!("report: {}", rep["forecast"]);
    let (v, secs) = verdict(rep, "async");
    let last = &r.trace.last().unwrap().1;
    println!(
        "ACCURACY not-converging verdict forecast={v} ({secs:?}) measured_not_converging={} phase={}",
        last["not_converging"], last["phase"]
    );
    assert!(v == "diverges" || v == "stalls", "{rep}");
    assert_eq!(last["not_converging"], true, "{last}");
}

/// Forwards connections on a new local port to `to`, the A → B direction
/// paced to `rate` bytes/s for all connections together (a WAN link's
/// bandwidth, which loopback lacks); B → A unpaced. Runs until the test
/// ends. Returns its address.
fn paced_proxy(to: String, rate: f64) -> String {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    // When the shared link is next free.
    let free = Arc::new(Mutex::new(Instant::now()));
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            let Ok(up) = std::net::TcpStream::connect(&to) else {
                continue;
            };
            let _ = up.set_nodelay(true);
            let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
            let (mut c, mut up) = (c, up);
            let free = free.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let done = {
                        let mut f = free.lock().unwrap();
                        let start = (*f).max(Instant::now());
                        *f = start + Duration::from_secs_f64(n as f64 / rate);
                        *f
                    };
                    if let Some(d) = done.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                    if up.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = up.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut up2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

/// Bytes that do not compress or repeat (xorshift), distinct per `seed`.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A share's load: `hot` files of `hot_bytes` rewritten whole, one every
/// `period_ms`, beside 160 cold files of 256 KiB (40 MiB).
struct ShareCase {
    name: &'static str,
    hot: u64,
    hot_bytes: usize,
    period_ms: u64,
    observe_s: u64,
}

struct ShareRun {
    report: Value,
    /// When the share left `resyncing` and when the migration was ready,
    /// s after migrate start.
    synced: Option<f64>,
    ready: Option<f64>,
    /// The migration reported not_converging at some point.
    not_converging: bool,
}

/// Two agents in private mount namespaces, a's replication link to b paced
/// to 4 MiB/s; an async share in workload `files` under the case's load;
/// an estimate of it for `observe_s`, a probe under the load, the report;
/// then the real migration, polled until ready or `limit_s`.
fn share_run(c: &ShareCase, limit_s: u64) -> ShareRun {
    use common::agent::{pair, Agent};
    use std::os::unix::fs::PermissionsExt;
    require("unshare");
    let root = tempfile::Builder::new()
        .prefix("ferry-acc-share-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Each agent in a mount namespace of its own: the promoted copy is
    // bind-mounted at the share's path, as on two hosts.
    let private = ["unshare", "-m", "--propagation", "private"];
    let mut a = Agent::start_wrapped(root.path(), "a", "", &private);
    let b = Agent::start_wrapped(root.path(), "b", "", &private);
    pair(&a, &b);
    // a reaches b's replication listener through the paced link.
    let proxy = paced_proxy(b.replication.clone(), 4.0 * MIB as f64);
    a.stop();
    let peers = a.dir.join("peers.json");
    // Edited by hand: written back as the bare list (the format before
    // records had an envelope and a checksum), which the agent upgrades.
    let record: Value = serde_json::from_str(&std::fs::read_to_string(&peers).unwrap()).unwrap();
    let text = record["body"].to_string().replace(&b.replication, &proxy);
    std::fs::write(&peers, text).unwrap();
    a.spawn();
    let peers_now = std::fs::read_to_string(&peers).unwrap();
    assert!(peers_now.contains(&proxy), "{peers_now}");

    let src = root.path().join("app");
    std::fs::create_dir_all(src.join("cold")).unwrap();
    std::fs::create_dir_all(src.join("hot")).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o777)).unwrap();
    for i in 0..160u64 {
        std::fs::write(src.join(format!("cold/{i}")), noise(i, 256 * 1024)).unwrap();
    }
    for i in 0..c.hot {
        std::fs::write(src.join(format!("hot/{i}")), noise(1000 + i, c.hot_bytes)).unwrap();
    }
    let s = src.to_str().unwrap();
    a.ok(&["share", "create", "data", "--path", s, "--mode", "async"]);
    a.ok(&["workload", "create", "files", "--share", "data"]);
    // The application: a hot file rewritten whole every period.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, src, hot, bytes, period) =
            (stop.clone(), src.clone(), c.hot, c.hot_bytes, c.period_ms);
        std::thread::spawn(move || {
            let mut n = 0u64;
            let t0 = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::write(
                    src.join(format!("hot/{}", n % hot)),
                    noise(100_000 + n, bytes),
                );
                n += 1;
                let next = t0 + Duration::from_millis(period * n);
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    a.ok(&[
        "estimate",
        "start",
        "e",
        "--share",
        "data",
        "--duration",
        "1h",
    ]);
    let t = Instant::now();
    let probe = a.json(&["estimate", "probe", "--to", "b", "--seconds", "5"]);
    eprintln!("probe: {probe}");
    std::thread::sleep(Duration::from_secs(c.observe_s).saturating_sub(t.elapsed()));
    a.ok(&["estimate", "stop", "e"]);
    let report = a.json(&["estimate", "report", "e", "--to", "b"]);
    eprintln!("report: {}", report["forecast"]);
    eprintln!("status: {}", report["status"]);
    // The watcher's changes reached the estimate: each hot file a key
    // however often rewritten.
    let st = &report["status"];
    let w10 = st["working_set"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["window_s"] == 10)
        .map(|p| p["max_keys"].as_u64().unwrap());
    let per_10s = (10_000 / c.period_ms).min(c.hot);
    assert!(
        w10.is_some_and(|w| w >= per_10s * 8 / 10 && w <= c.hot),
        "W(10 s) {w10:?} for {per_10s} files rewritten in 10 s: {st}"
    );
    assert!(st["bytes_written"].as_u64().unwrap() > 0, "{st}");

    a.ok(&["migrate", "start", "files", "--to", "b", "--mode", "async"]);
    let t0 = Instant::now();
    let (mut synced, mut ready, mut not_converging) = (None, None, false);
    let mut last = String::new();
    while t0.elapsed() < Duration::from_secs(limit_s) {
        let t = t0.elapsed().as_secs_f64();
        let sh = a.json(&["share", "status", "data"]);
        let st = a.json(&["migrate", "status", "files"]);
        let line = format!(
            "share state={} resync_bytes={} bytes_sent={} pending={} phase={} not_converging={}",
            sh["state"],
            sh["resync_bytes"],
            sh["bytes_sent"],
            sh["pending_paths"],
            st["phase"],
            st["not_converging"]
        );
        if line != last {
            eprintln!("{} {t:6.2}s {line}", c.name);
            last = line;
        }
        // The resync's first pass is over once the share is linked and
        // no longer resyncing.
        if synced.is_none()
            && sh["state"] != "resyncing"
            && sh["state"] != "disconnected"
            && sh["state"] != "connecting"
        {
            synced = Some(t);
        }
        not_converging |= st["not_converging"] == true;
        if st["phase"] == "ready" {
            ready = Some(t);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    ShareRun {
        report,
        synced,
        ready,
        not_converging,
    }
}

/// A share (file level, async) over a link paced to 4 MiB/s: 40 MiB of
/// files, and an application rewriting 16 files of 64 KiB at 512 KiB/s the
/// whole time. The estimate observes it (keys are files), the probe
/// measures the paced link under that load, and the real migration of the
/// workload holding the share is timed: its initial sync (the share's
/// resync: every file sent) and its time to `ready` within ±20 % of the
/// forecast.
#[test]
fn forecast_matches_a_share_migration_over_a_paced_link() {
    let c = ShareCase {
        name: "share",
        hot: 16,
        hot_bytes: 64 * 1024,
        period_ms: 125,
        observe_s: 40,
    };
    let r = share_run(&c, 120);
    let init_forecast = r.report["forecast"]["initial_sync"]["seconds"]
        .as_f64()
        .unwrap();
    let (v, ready_forecast) = verdict(&r.report, "async");
    println!(
        "ACCURACY share verdict forecast={v} measured_ready={:?}",
        r.ready
    );
    assert_eq!(v, "converges", "{}", r.report);
    let ready = r.ready.expect("the share's migration became ready");
    let synced = r.synced.unwrap_or(ready);
    let e1 = figure("share", "initial_sync", init_forecast, synced);
    let e2 = figure("share", "ready_async", ready_forecast.unwrap(), ready);
    assert!(e1.abs() <= 0.2, "initial sync off by {:.0} %", e1 * 100.0);
    assert!(e2.abs() <= 0.2, "time to ready off by {:.0} %", e2 * 100.0);
}

/// The same share with 256 hot files of 64 KiB (16 MiB) rewritten at about
/// 6 MiB/s, more than the 4 MiB/s link carries: the forecast says it does
/// not converge, and the real migration is never ready (and says
/// `not_converging`).
#[test]
fn forecast_and_migration_agree_that_a_hot_share_does_not_converge() {
    let c = ShareCase {
        name: "share-hot",
        hot: 256,
        hot_bytes: 64 * 1024,
        period_ms: 10,
        observe_s: 25,
    };
    let r = share_run(&c, 45);
    let (v, secs) = verdict(&r.report, "async");
    println!(
        "ACCURACY share-hot verdict forecast={v} ({secs:?}) measured_ready={:?} not_converging={}",
        r.ready, r.not_converging
    );
    assert!(v == "diverges" || v == "stalls", "{}", r.report);
    assert!(r.ready.is_none(), "ready at {:?}", r.ready);
    assert!(r.not_converging, "the migration never said not_converging");
}
