//! The image archive through the real `ferry archive` CLI and the real
//! `qemu-img`: round trips of images with holes, restores to every format
//! compared by `qemu-img compare`, dedup of a second archive, a damaged
//! chunk named by verify, prune racing creates under `kill -9`, and imports
//! that refuse images naming other files (CVE-2022-47951, CVE-2024-32498)
//! while a clean qcow2 becomes a volume that replicates.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::agent::{two_agents, wait_until, Agent};
use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn ferry(args: &[&str]) -> Output {
    Command::new(ferry_bin())
        .args(args)
        .env("FERRY_LOG", "warn")
        .env_remove("FERRY_ARCHIVE_STORE")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = ferry(args);
    assert!(
        out.status.success(),
        "ferry {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = ok(&a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not one JSON document ({e}): {out}"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A sparse image of `size` bytes with `pattern` data at each `(offset, len)`.
fn image(path: &Path, size: u64, data: &[(u64, u64)], seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, &(off, len)) in data.iter().enumerate() {
        f.write_all_at(&pattern(seed + i as u64, len as usize), off)
            .unwrap();
    }
}

fn qemu_img(args: &[&str]) -> String {
    run_ok(Command::new(require("qemu-img")).args(args))
}

#[test]
fn an_image_with_holes_round_trips_to_raw_and_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let store = dir.path().join("store");
    // 24 MiB + 12 KiB: data, holes, a chunk that is half data, a short
    // last chunk.
    let size = 24 * MIB + 12288;
    image(
        &img,
        size,
        &[(0, 3 * MIB), (5 * MIB + 4096, 300_000), (size - 9000, 9000)],
        7,
    );
    let c = json(&[
        "archive",
        "create",
        s(&img),
        "--to",
        s(&store),
        "--name",
        "a1",
    ]);
    assert_eq!(c["consistency"], "crash-consistent-if-idle", "{c}");
    assert_eq!(c["size_bytes"], size);
    assert_eq!(c["chunks"], 25);
    assert_eq!(c["new_chunks"], 5, "{c}");
    assert!(
        c["read_bytes"].as_u64().unwrap() < 8 * MIB,
        "holes are not read: {c}"
    );
    // Text output says what consistency it has.
    let out = ferry(&["archive", "create", s(&img), "--to", s(&store)]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("crash-consistent-if-idle"), "{text}");
    assert!(text.contains("0 new chunks"), "{text}");
    let list = json(&["archive", "list", "--store", s(&store)]);
    let names: Vec<&str> = list["archives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{list}");
    assert!(names.contains(&"a1"));
    let default = names.iter().find(|n| **n != "a1").unwrap();
    assert!(
        default.starts_with("disk.img-") && default.ends_with('z') && default.len() == 25,
        "default name {default}"
    );

    // Raw: byte-identical and sparse.
    let raw = dir.path().join("out.raw");
    json(&[
        "archive",
        "restore",
        "a1",
        "--store",
        s(&store),
        "--to",
        s(&raw),
    ]);
    assert_eq!(std::fs::read(&raw).unwrap(), std::fs::read(&img).unwrap());
    let alloc = std::fs::metadata(&raw).unwrap().blocks() * 512;
    assert!(
        alloc <= 6 * MIB,
        "restored raw is sparse: {alloc} bytes allocated"
    );
    // Never overwritten.
    let before = std::fs::read(&raw).unwrap();
    let out = ferry(&[
        "archive",
        "restore",
        "a1",
        "--store",
        s(&store),
        "--to",
        s(&raw),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("never overwrites"));
    assert_eq!(std::fs::read(&raw).unwrap(), before);

    for fmt in ["qcow2", "vmdk", "vhdx"] {
        let out = dir.path().join(format!("out.{fmt}"));
        let r = json(&[
            "archive",
            "restore",
            "a1",
            "--store",
            s(&store),
            "--to",
            s(&out),
            "--format",
            fmt,
        ]);
        assert_eq!(r["format"], fmt);
        let info: Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", "-f", fmt, s(&out)]))
                .unwrap();
        assert_eq!(info["format"], fmt);
        if fmt == "vmdk" {
            assert_eq!(
                info["format-specific"]["data"]["create-type"],
                "streamOptimized"
            );
        }
        let cmp = qemu_img(&["compare", "-f", "raw", "-F", fmt, s(&img), s(&out)]);
        assert!(cmp.contains("identical"), "{fmt}: {cmp}");
    }
    // No temporary file is left beside the targets.
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // A target in a directory that does not exist: exit 1.
    let out = ferry(&[
        "archive",
        "restore",
        "a1",
        "--store",
        s(&store),
        "--to",
        "/nonexistent-dir/x.qcow2",
        "--format",
        "qcow2",
    ]);
    assert_eq!(out.status.code(), Some(1));
    // Usage errors exit 2; a missing store exits 1 and says so.
    assert_eq!(ferry(&["archive", "restore", "a1"]).status.code(), Some(2));
    let out = ferry(&["archive", "list", "--store", s(&dir.path().join("none"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no archive store"));
    // --store from the environment.
    let out = Command::new(ferry_bin())
        .args(["--json", "archive", "list"])
        .env("FERRY_ARCHIVE_STORE", &store)
        .output()
        .unwrap();
    assert!(out.status.success());
    // Delete, then prune frees what only it used (nothing: a2 shares all).
    ok(&["archive", "delete", "a1", "--store", s(&store)]);
    let p = json(&["archive", "prune", "--store", s(&store)]);
    assert_eq!(p["chunks_deleted"], 0, "{p}");
    ok(&["archive", "delete", default, "--store", s(&store)]);
    let p = json(&["archive", "prune", "--store", s(&store)]);
    assert_eq!(p["chunks_deleted"], 5, "{p}");
}

#[test]
fn verify_names_a_truncated_chunk_and_its_users() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    let store = dir.path().join("store");
    image(&img, 4 * MIB, &[(0, 4 * MIB)], 11);
    json(&[
        "archive",
        "create",
        s(&img),
        "--to",
        s(&store),
        "--name",
        "one",
    ]);
    json(&[
        "archive",
        "create",
        s(&img),
        "--to",
        s(&store),
        "--name",
        "two",
    ]);
    let v = json(&["archive", "verify", "--store", s(&store)]);
    assert_eq!(v["ok"], true, "{v}");
    // Truncate one chunk file by 10 bytes.
    let mut chunks = Vec::new();
    for d in std::fs::read_dir(store.join("chunks")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            chunks.push(f.unwrap().path());
        }
    }
    chunks.sort();
    assert_eq!(chunks.len(), 4);
    let bad = &chunks[2];
    let id = bad.file_name().unwrap().to_str().unwrap().to_string();
    let len = std::fs::metadata(bad).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(bad)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let out = ferry(&["archive", "verify", "--store", s(&store)]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("BAD chunk {id}")), "{text}");
    assert!(
        text.contains("used by one:d.img@") && text.contains("used by two:d.img@"),
        "{text}"
    );
    let out = ferry(&["--json", "archive", "verify", "one", "--store", s(&store)]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["bad_chunks"][0]["id"], id.as_str());
    // Restore refuses the damaged archive and leaves no file.
    let to = dir.path().join("r.raw");
    let out = ferry(&[
        "archive",
        "restore",
        "one",
        "--store",
        s(&store),
        "--to",
        s(&to),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&id));
    assert!(!to.exists());
    // A new create writes the torn chunk again; verify is clean after it.
    json(&[
        "archive",
        "create",
        s(&img),
        "--to",
        s(&store),
        "--name",
        "three",
    ]);
    assert_eq!(
        json(&["archive", "verify", "--store", s(&store)])["ok"],
        true
    );
    // A damaged manifest is named by list and verify (exit 1), and prune
    // refuses to guess at its chunks.
    std::fs::write(store.join("archives/four.json"), b"{not a manifest").unwrap();
    let l = json(&["archive", "list", "--store", s(&store)]);
    assert!(
        l["damaged_manifests"][0]
            .as_str()
            .unwrap()
            .contains("four.json"),
        "{l}"
    );
    assert_eq!(l["archives"].as_array().unwrap().len(), 3);
    let out = ferry(&["archive", "verify", "--store", s(&store)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("DAMAGED manifest"));
    let out = ferry(&["archive", "prune", "--store", s(&store)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("four.json"));
}

#[test]
fn a_second_archive_after_rewriting_one_percent_adds_about_one_percent() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("v.img");
    let store = dir.path().join("store");
    let size = 256 * MIB;
    let chunk = 256 * 1024u64;
    image(&img, size, &[(0, size)], 3);
    let a = json(&[
        "archive",
        "create",
        s(&img),
        "--to",
        s(&store),
        "--name",
        "before",
        "--chunk-bytes",
        "256KiB",
    ]);
    assert_eq!(a["new_raw_bytes"], size);
    // Rewrite 11 of the 1024 chunks whole (1.07 %), spread over the image.
    let n = size / chunk;
    let rewrite = n.div_ceil(100);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    for i in 0..rewrite {
        let at = (i * 97 % n) * chunk;
        f.write_all_at(&pattern(1000 + 2 * i, chunk as usize), at)
            .unwrap();
    }
    drop(f);
    let b = json(&[
        "archive",
        "create",
        s(&img),
        "--to",
        s(&store),
        "--name",
        "after",
        "--chunk-bytes",
        "256KiB",
    ]);
    let new = b["new_raw_bytes"].as_u64().unwrap();
    let stored = b["new_stored_bytes"].as_u64().unwrap();
    let pct = new as f64 * 100.0 / size as f64;
    eprintln!("rewrote {rewrite} of {n} chunks: the second archive added {new} raw bytes ({pct:.3} %), {stored} stored");
    assert_eq!(b["new_chunks"], rewrite, "{b}");
    assert!(pct <= 1.1, "{pct} %");
    assert!(stored as f64 <= 0.011 * size as f64 + 4096.0, "{stored}");
    // The restore's progress: a line every 0.5 s on stderr (not a
    // terminal: one line each), the result alone on stdout.
    let out = dir.path().join("after.raw");
    let t = Instant::now();
    let o = ferry(&[
        "--json",
        "archive",
        "restore",
        "after",
        "--store",
        s(&store),
        "--to",
        s(&out),
    ]);
    let took = t.elapsed().as_secs_f64();
    assert!(o.status.success());
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["size_bytes"], size);
    let err = String::from_utf8_lossy(&o.stderr);
    // (The rate of the lines: archive::tests::progress_is_reported_every_half_second.)
    eprintln!("restore took {took:.2} s");
    assert!(err.contains("restored 256 MiB of 256 MiB (100%)"), "{err}");
    run_ok(Command::new("cmp").arg(&img).arg(&out));
}

/// A tiny deterministic generator for the kill points.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn spawn(args: &[&str]) -> std::process::Child {
    Command::new(ferry_bin())
        .args(args)
        .env("FERRY_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

struct Reap(Vec<std::process::Child>);
impl Drop for Reap {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn prune_racing_creates_loses_nothing_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.img");
    let store = dir.path().join("store");
    let size = 64 * MIB;
    image(&img, size, &[(0, size)], 5);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);
    // Round 0's archive shares almost every chunk with each later image;
    // its wall time bounds the random kill points.
    let t0 = Instant::now();
    json(&[
        "archive",
        "create",
        s(&img),
        "--to",
        s(&store),
        "--name",
        "r0",
        "--checkpoint-bytes",
        "2MiB",
    ]);
    let wall_ms = t0.elapsed().as_millis() as u64 + 1;
    eprintln!("a create takes {wall_ms} ms");
    let mut prev = "r0".to_string();
    for round in 1..=6u64 {
        // Change a few chunks, then delete the previous archive: its chunks
        // are prunable, and the next create dedups against them.
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&pattern(round * 31, MIB as usize), (round * 7 % 64) * MIB)
            .unwrap();
        drop(f);
        ok(&["archive", "delete", &prev, "--store", s(&store)]);
        let name = format!("r{round}");
        let create_args = [
            "archive",
            "create",
            s(&img),
            "--to",
            s(&store),
            "--name",
            &name,
            "--checkpoint-bytes",
            "4MiB",
        ];
        let mut kids = Reap(vec![
            spawn(&create_args),
            spawn(&["archive", "prune", "--store", s(&store), "--wait"]),
        ]);
        // Kill one of them (by PID) at a random point, let the other end.
        let victim = (rng.next() % 2) as usize;
        let at = rng.next() % (wall_ms * 5 / 4);
        std::thread::sleep(Duration::from_millis(at));
        let _ = kids.0[victim].kill(); // SIGKILL
        eprintln!(
            "round {round}: killed the {} at {at} ms",
            ["create", "prune"][victim]
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        for k in &mut kids.0 {
            loop {
                if k.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(Instant::now() < deadline, "a create or prune hangs");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        drop(kids);
        // Nothing any archive names is gone.
        let v = json(&["archive", "verify", "--store", s(&store)]);
        assert_eq!(v["ok"], true, "round {round} (seed {seed}): {v}");
        // Another prune, then the same create resumes (or, if it ended,
        // says the archive exists) and the archive restores byte-identical.
        ok(&["archive", "prune", "--store", s(&store), "--wait"]);
        let done = store.join("archives").join(format!("{name}.json")).exists();
        eprintln!(
            "round {round}: the create had {}finished",
            if done { "" } else { "not " }
        );
        if !done {
            let c = json(&create_args);
            assert_eq!(c["archive"], name.as_str());
        }
        let out = dir.path().join(format!("{name}.raw"));
        json(&[
            "archive",
            "restore",
            &name,
            "--store",
            s(&store),
            "--to",
            s(&out),
        ]);
        run_ok(Command::new("cmp").arg(&img).arg(&out));
        std::fs::remove_file(&out).unwrap();
        prev = name;
    }
    assert_eq!(
        json(&["archive", "verify", "--store", s(&store)])["ok"],
        true
    );
}

#[test]
fn a_create_stopped_by_sigterm_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.img");
    let store = dir.path().join("store");
    let size = 96 * MIB;
    image(&img, size, &[(0, size)], 9);
    let mut kids = Reap(vec![Command::new(ferry_bin())
        .args([
            "archive",
            "create",
            s(&img),
            "--to",
            s(&store),
            "--checkpoint-bytes",
            "4MiB",
            "--chunk-bytes",
            "256KiB",
        ])
        .env("FERRY_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()]);
    // Once a checkpoint is on disk, SIGTERM. (A fast machine may finish
    // the create first: its progress record is gone again at the end.)
    wait_until(60, "a progress record, or the create's end", || {
        kids.0[0].try_wait().ok().flatten().is_some()
            || std::fs::read_dir(store.join("partial"))
                .map(|mut d| d.next().is_some())
                .unwrap_or(false)
    });
    if kids.0[0].try_wait().ok().flatten().is_some() {
        eprintln!("the create ended before a checkpoint was seen; resume not exercised");
        return;
    }
    // kill(1) by PID (not reaped yet: at worst a zombie, which takes it).
    run_ok(Command::new("kill").args(["-TERM", &kids.0[0].id().to_string()]));
    let out = kids.0.pop().unwrap().wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        // It finished before the signal came: nothing to resume.
        eprintln!("the create ended before SIGTERM; resume not exercised");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("interrupted; run the same command to resume"),
        "{err}"
    );
    // The same command (no --name: the interrupted create of this source is
    // found) resumes and reads less than the whole image.
    let c = json(&[
        "archive",
        "create",
        s(&img),
        "--to",
        s(&store),
        "--checkpoint-bytes",
        "4MiB",
        "--chunk-bytes",
        "256KiB",
    ]);
    assert_eq!(c["resumed"], true, "{c}");
    assert!(c["read_bytes"].as_u64().unwrap() < size, "{c}");
    let out = dir.path().join("o.raw");
    json(&[
        "archive",
        "restore",
        c["archive"].as_str().unwrap(),
        "--store",
        s(&store),
        "--to",
        s(&out),
    ]);
    run_ok(Command::new("cmp").arg(&img).arg(&out));
    assert!(std::fs::read_dir(store.join("partial"))
        .unwrap()
        .next()
        .is_none());
    // An interrupted create can be forgotten: delete drops its record, and
    // prune then frees its chunks.
    let name = "forgotten";
    let mut kid = Reap(vec![spawn(&[
        "archive",
        "create",
        s(&img),
        "--to",
        s(&store),
        "--name",
        name,
        "--chunk-bytes",
        "128KiB",
        "--checkpoint-bytes",
        "128KiB",
    ])]);
    // A checkpoint (a syncfs) after every chunk keeps it running long
    // enough to be killed once its first record is on disk.
    let rec = store.join("partial").join(format!("{name}.json"));
    let t = Instant::now();
    while !rec.exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "no progress record");
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = kid.0[0].kill();
    let _ = kid.0[0].wait();
    if store.join(format!("archives/{name}.json")).exists() {
        eprintln!("the create ended before kill -9; forgetting not exercised");
        return;
    }
    let l = json(&["archive", "list", "--store", s(&store)]);
    assert!(l["interrupted_creates"].to_string().contains(name), "{l}");
    ok(&["archive", "delete", name, "--store", s(&store)]);
    assert!(!rec.exists());
    let p = json(&["archive", "prune", "--store", s(&store)]);
    assert!(p["chunks_deleted"].as_u64().unwrap() > 0, "{p}");
    assert_eq!(
        json(&["archive", "verify", "--store", s(&store)])["ok"],
        true
    );
}

/// Images that name another file, made by the real qemu-img.
fn hostile_images(dir: &Path) -> Vec<(PathBuf, &'static str, &'static str)> {
    let secret = dir.join("secret.raw");
    image(&secret, MIB, &[(0, MIB)], 99);
    let back = dir.join("backing.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&secret),
        "-F",
        "raw",
        s(&back),
    ]);
    let df = dir.join("datafile.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&secret)),
        s(&df),
        "1M",
    ]);
    // A vmdk descriptor whose extent is the secret file.
    let vmdk = dir.join("extent.vmdk");
    std::fs::write(
        &vmdk,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 2048 FLAT \"{}\" 0\n\nddb.adapterType = \"ide\"\n",
            s(&secret)
        ),
    )
    .unwrap();
    // A descriptor that says monolithicSparse but whose sparse extent is
    // another (real) vmdk: qemu-img itself refuses to open it (7.2), and so
    // the import fails before anything is read.
    let other = dir.join("other.vmdk");
    qemu_img(&["create", "-f", "vmdk", s(&other), "1M"]);
    let sparse = dir.join("sparse-desc.vmdk");
    std::fs::write(
        &sparse,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n\nRW 2048 SPARSE \"{}\"\n\nddb.adapterType = \"ide\"\n",
            s(&other)
        ),
    )
    .unwrap();
    vec![
        (sparse, "vmdk", "Unsupported image type 'monolithicSparse'"),
        (back, "qcow2", "backing file"),
        (df, "qcow2", "data file"),
        (vmdk, "vmdk", "CVE-2022-47951"),
    ]
}

#[test]
fn import_refuses_images_naming_other_files_and_a_clean_qcow2_replicates() {
    require("qemu-img");
    let (root, a, b): (tempfile::TempDir, Agent, Agent) = two_agents("ferry-arch-", "");
    for (img, fmt, why) in hostile_images(root.path()) {
        let e = a.fails(&["archive", "import", s(&img), "-f", fmt, "--volume", "evil"]);
        assert!(e.contains(why), "{}: {e}", img.display());
        assert!(
            e.contains("CVE-20") || e.contains("qemu-img info failed"),
            "{e}"
        );
        let vols = a.json(&["volume", "list"]);
        assert!(!vols.to_string().contains("evil"), "{vols}");
    }
    // The agent opens the image with O_NOFOLLOW: a symlink is refused.
    let raw = root.path().join("src.raw");
    image(
        &raw,
        20 * MIB + 512,
        &[(MIB, 3 * MIB), (15 * MIB, 100_000)],
        21,
    );
    let q = root.path().join("src.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)]);
    let link = root.path().join("link.qcow2");
    std::os::unix::fs::symlink(&q, &link).unwrap();
    let e = a.fails(&[
        "archive",
        "import",
        s(&link),
        "-f",
        "qcow2",
        "--volume",
        "viasym",
    ]);
    assert!(e.contains("cannot open the image"), "{e}");
    // A clean qcow2: the volume has its virtual size and its bytes.
    let r = a.json(&["archive", "import", s(&q), "-f", "qcow2", "--volume", "imp"]);
    assert_eq!(r["size_bytes"], 20 * MIB + 512, "{r}");
    assert_eq!(r["volume"]["name"], "imp");
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        s(&raw),
        s(&a.image("imp")),
    ]);
    assert!(cmp.contains("identical"), "{cmp}");
    // It is a primary like any: it replicates and verifies equal.
    a.ok(&["replicate", "start", "imp", "--to", "b"]);
    a.ok(&["replicate", "wait", "imp", "--timeout", "60s"]);
    let v = a.json(&["volume", "verify", "imp"]);
    assert_eq!(v["equal"], true, "{v}");
    run_ok(Command::new("cmp").arg(a.image("imp")).arg(b.image("imp")));
    // A single-file vmdk (its extent is itself) and a vhdx import too.
    for (fmt, opts) in [("vmdk", "subformat=streamOptimized"), ("vhdx", "")] {
        let f = root.path().join(format!("src.{fmt}"));
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&raw), s(&f)]);
        qemu_img(&args);
        let vol = format!("imp-{fmt}");
        a.json(&["archive", "import", s(&f), "-f", fmt, "--volume", &vol]);
        let cmp = qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            s(&raw),
            s(&a.image(&vol)),
        ]);
        assert!(cmp.contains("identical"), "{fmt}: {cmp}");
    }
    // An existing volume name is refused, and the existing one kept.
    let e = a.fails(&["archive", "import", s(&q), "-f", "qcow2", "--volume", "imp"]);
    assert!(e.contains("exists"), "{e}");
}
