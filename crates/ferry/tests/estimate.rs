//! The migration estimator on a real agent: `ferry estimate` observes what
//! real clients write (qemu-io through the export, files through a share's
//! FUSE mount), counts bytes, IOs and distinct blocks (W(T)) exactly as
//! written, keeps them across an agent restart (the gap counted as not
//! observed), feeds the statistics history, refuses what it must, and its
//! report's figures follow from what it saw.

mod common;

use std::time::Duration;

use common::agent::{wait_until, Agent};
use common::*;
use serde_json::Value;

const KIB64: u64 = 65_536;

fn status(a: &Agent, name: &str) -> Value {
    a.json(&["estimate", "status", name])
}

/// W(T)'s max for window `t` s, if measured yet.
fn w_max(st: &Value, t: u64) -> Option<u64> {
    st["working_set"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["window_s"] == t)
        .map(|p| p["max_keys"].as_u64().unwrap())
}

#[test]
fn an_estimate_counts_what_clients_write_and_survives_a_restart() {
    require("qemu-io");
    let root = tempfile::Builder::new()
        .prefix("ferry-est-")
        .tempdir()
        .unwrap();
    let mut a = Agent::start(
        root.path(),
        "a",
        "\n[history]\nsample_interval_ms = 500\n[estimate]\nsave_interval_ms = 1000\n",
    );
    a.ok(&["volume", "create", "v", "--size", "64MiB"]);
    a.ok(&["workload", "create", "w", "--volume", "v"]);
    let st = a.json(&[
        "estimate",
        "start",
        "e",
        "--volume",
        "v",
        "--duration",
        "1h",
    ]);
    assert_eq!(st["state"], "observing", "{st}");
    assert_eq!(st["method"], "filter");
    assert_eq!(st["block_bytes"], KIB64);
    // One observer per volume: a second estimate of it (or of its
    // workload) is refused, naming the first.
    let e = a.fails(&["estimate", "start", "e2", "--workload", "w"]);
    assert!(e.contains("observed by estimate e"), "{e}");
    let e = a.fails(&["estimate", "start", "e", "--volume", "v"]);
    assert!(e.contains("exists"), "{e}");
    let e = a.fails(&["estimate", "start", "x", "--volume", "nope"]);
    assert!(e.contains("not served here"), "{e}");
    let e = a.fails(&[
        "estimate",
        "start",
        "x",
        "--volume",
        "v",
        "--duration",
        "0s",
    ]);
    assert!(e.contains("duration"), "{e}");
    let e = a.fails(&["estimate", "start", "x", "--device", "relative/path"]);
    assert!(e.contains("absolute path"), "{e}");

    // Windows of 10 s start every 5 s from the observation's first whole
    // second: writes from 6 s on fall wholly into one.
    std::thread::sleep(Duration::from_secs(6));
    // 4 MiB written twice over the same range (64 blocks of 64 KiB, which
    // coalesce), 1 MiB elsewhere (16 blocks), one 4 KiB write straddling
    // two more blocks (at 40 MiB − 2 KiB): 9 MiB + 4 KiB in four writes, 82 distinct blocks; and a
    // read. Within a couple of seconds: one 10 s window holds them all
    // (windows hop by half their length).
    let uri = a.uri("v");
    qemu_io(
        &uri,
        &[
            "write -P 1 0 4M",
            "write -P 2 0 4M",
            "write -P 3 32M 1M",
            "write -P 4 41940992 4k",
            "read 0 64k",
        ],
    );
    wait_until(30, "a full 10 s window", || {
        w_max(&status(&a, "e"), 10).is_some_and(|n| n >= 82)
    });
    let st = status(&a, "e");
    assert_eq!(st["bytes_written"], 9 * 1024 * 1024 + 4096, "{st}");
    assert_eq!(w_max(&st, 10), Some(82), "{st}");
    assert!(st["read_ios"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["write_ios"].as_u64().unwrap() >= 4, "{st}");
    let alloc = st["allocated_bytes"].as_u64().unwrap();
    assert!(
        (5 * 1024 * 1024..=7 * 1024 * 1024).contains(&alloc),
        "allocated {alloc}: {st}"
    );
    assert_eq!(st["size_bytes"], 64 * 1024 * 1024);
    assert!(
        st["memory_bytes"].as_u64().unwrap() <= st["memory_bound_bytes"].as_u64().unwrap(),
        "{st}"
    );
    // The history store has the estimate's series.
    wait_until(30, "estimate samples in the history", || {
        a.json(&["stats", "estimate/e/write_bytes_per_s", "--since", "5m"])["points"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["max"].as_f64().unwrap() > 0.0)
    });
    let ub = a.json(&["stats", "estimate/e/unique_bytes", "--since", "5m"]);
    let most = ub["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["max"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(most >= 64.0 * KIB64 as f64, "{ub}");

    // Restart: the observation comes back; the down time is not observed.
    std::thread::sleep(Duration::from_millis(1500)); // a save
    let before = status(&a, "e");
    a.stop();
    std::thread::sleep(Duration::from_secs(3));
    a.spawn();
    let after = status(&a, "e");
    assert_eq!(after["state"], "observing", "{after}");
    assert_eq!(after["bytes_written"], before["bytes_written"], "{after}");
    assert!(
        after["unobserved_s"].as_f64().unwrap() >= 2.5,
        "the 3 s down are not observed: {after}"
    );
    // And it still observes, through the restarted agent's new volume.
    qemu_io(&a.uri("v"), &["write -P 5 48M 64k"]);
    wait_until(10, "the write after the restart", || {
        status(&a, "e")["bytes_written"].as_u64().unwrap()
            == before["bytes_written"].as_u64().unwrap() + KIB64
    });

    // Stop keeps what was seen; the report's initial sync is the allocated
    // bytes over what the bandwidth given leaves the copy beside the
    // streamed writes (1 MiB/s less the observed write rate), its inputs
    // say so.
    let st = a.json(&["estimate", "stop", "e"]);
    assert_eq!(st["state"], "stopped");
    let rep = a.json(&["estimate", "report", "e", "--bandwidth", "1MiB/s"]);
    let alloc = rep["allocated_bytes"].as_f64().unwrap();
    let init = rep["forecast"]["initial_sync"]["seconds"].as_f64().unwrap();
    let inputs = &rep["forecast"]["initial_sync"]["why"]["inputs"];
    let input = |name: &str| {
        inputs
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .and_then(|i| i["value"].as_f64())
            .unwrap_or_else(|| panic!("no input {name}: {inputs}"))
    };
    let copy = 1048576.0 - input("write_rate");
    assert!(input("write_rate") > 0.0, "{inputs}");
    assert!(
        (init - alloc / copy).abs() < 1e-6 && input("copy_rate") == copy,
        "initial sync {init} s for {alloc} B at 1 MiB/s: {rep}"
    );
    assert!(inputs.to_string().contains("allocated_bytes"), "{inputs}");
    assert_eq!(rep["link"]["from"], "given");
    // The text report names every figure.
    let text = a.ok(&["estimate", "report", "e", "--bandwidth", "1MiB/s"]);
    for want in [
        "initial sync",
        "time to ready, sync",
        "time to ready, async",
        "cutover downtime",
        "why:",
    ] {
        assert!(text.contains(want), "{want} not in {text}");
    }
    let e = a.fails(&["estimate", "report", "e"]);
    assert!(e.contains("--to NODE") && e.contains("--bandwidth"), "{e}");
    let e = a.fails(&["estimate", "report", "e", "--to", "b"]);
    assert!(e.contains("no probe"), "{e}");
    // Now e2 may observe the volume; delete forgets e.
    a.ok(&[
        "estimate",
        "start",
        "e2",
        "--workload",
        "w",
        "--duration",
        "10m",
    ]);
    a.ok(&["estimate", "delete", "e"]);
    let list = a.json(&["estimate", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["e2"], "{list}");
    assert!(!a.dir.join("estimates/e.json").exists());
    assert!(!a.dir.join("estimates/e.state").exists());
}

#[test]
fn a_share_estimate_counts_files() {
    let root = tempfile::Builder::new()
        .prefix("ferry-est-share-")
        .tempdir()
        .unwrap();
    let a = Agent::start(root.path(), "a", "");
    let mnt = root.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let _m = Mount(mnt.clone());
    a.ok(&["share", "create", "app", "--path", mnt.to_str().unwrap()]);
    let st = a.json(&[
        "estimate",
        "start",
        "s",
        "--share",
        "app",
        "--duration",
        "1h",
    ]);
    assert_eq!(st["key_kind"], "files", "{st}");
    assert_eq!(st["method"], "watcher", "{st}");
    std::thread::sleep(Duration::from_secs(6));
    // Ten files, each written three times: ten distinct keys.
    for round in 0..3 {
        for i in 0..10 {
            std::fs::write(mnt.join(format!("f{i}")), vec![round as u8; 8192]).unwrap();
        }
    }
    wait_until(30, "a full 10 s window", || {
        w_max(&status(&a, "s"), 10).is_some()
    });
    let st = status(&a, "s");
    assert_eq!(w_max(&st, 10), Some(10), "{st}");
    assert!(st["bytes_written"].as_u64().unwrap() >= 30 * 8192, "{st}");
    let rep = a.json(&["estimate", "report", "s", "--bandwidth", "10MiB/s"]);
    assert!(
        rep["warnings"].to_string().contains("files"),
        "a share's report says its keys are files: {rep}"
    );
}
