//! P2V: a live busybox root tree captured while a writer changes it, built
//! into an ext4 image and booted under QEMU; a "physical disk" (a loop
//! device holding ext4) archived and restored.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{ferry_bin, require};
use serde_json::Value;

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ferry(args: &[&str]) -> Output {
    Command::new(ferry_bin())
        .args(args)
        .env("FERRY_LOG", "warn")
        .output()
        .expect("running ferry")
}

fn ferry_json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = ok(ferry(&a), &format!("ferry {args:?}"));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn ws() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A process group killed (by its id) and reaped when dropped.
struct Group(Child);

impl Group {
    fn spawn(cmd: &mut Command) -> Group {
        Group(cmd.process_group(0).spawn().expect("spawn"))
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the group this guard started; no memory is passed.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// A loop device detached when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// `debugfs -R "rdump / OUT" IMAGE`: the image's tree, read without a mount.
fn dump_image(image: &Path, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    ok(
        Command::new(require("debugfs"))
            .arg("-R")
            .arg(format!("rdump / {}", out.display()))
            .arg(image)
            .output()
            .unwrap(),
        "debugfs rdump",
    );
}

fn fsck_clean(image: &Path) {
    ok(
        Command::new(require("fsck.ext4"))
            .args(["-n", "-f"])
            .arg(image)
            .output()
            .unwrap(),
        "fsck.ext4 -n -f",
    );
}

/// Every regular file under `dir`, relative path → bytes.
fn files_under(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, d: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                walk(base, &e.path(), out);
            } else if t.is_file() {
                let rel = e
                    .path()
                    .strip_prefix(base)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, std::fs::read(e.path()).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Lines 1..n, each whole: what the writer appends, cut at some point.
fn counter_lines(text: &str) -> u64 {
    let mut n = 0;
    for l in text.lines() {
        n += 1;
        assert_eq!(
            l,
            n.to_string(),
            "the counter is not a prefix-consistent snapshot: {text:?}"
        );
    }
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "a torn last line: {text:?}"
    );
    n
}

#[test]
fn a_live_root_is_captured_in_passes_built_into_an_image_and_boots() {
    for t in [
        "qemu-system-x86_64",
        "mke2fs",
        "debugfs",
        "fsck.ext4",
        "cpio",
        "busybox",
    ] {
        require(t);
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    ok(
        Command::new(ws().join("crates/ferry/tests/p2v/build-root"))
            .arg(&root)
            .arg(ws().join("target/guest-p2v"))
            .output()
            .unwrap(),
        "build-root",
    );
    // The writer: appends to a counter, creates and deletes files and
    // directories, every few ms, for as long as the capture runs.
    let r = root.display();
    let script = format!(
        "i=0; while :; do i=$((i+1)); echo $i >> {r}/var/log/counter; \
         echo $i > {r}/var/spool/f$i; rm -f {r}/var/spool/f$((i-5)); \
         mkdir -p {r}/var/spool/d$i; echo $i > {r}/var/spool/d$i/x; rm -rf {r}/var/spool/d$((i-5)); \
         sleep 0.003; done"
    );
    let writer = Group::spawn(Command::new("sh").arg("-c").arg(&script));
    let counter = root.join("var/log/counter");
    let t0 = Instant::now();
    while std::fs::read_to_string(&counter)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 20
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the writer does not write"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let store = dir.path().join("store");
    let c = ferry_json(&[
        "p2v",
        "capture",
        "--root",
        root.to_str().unwrap(),
        "--to",
        store.to_str().unwrap(),
        "--name",
        "live",
    ]);
    drop(writer);
    let passes = c["passes"].as_u64().unwrap();
    assert!(
        passes > 1,
        "the writer changed the tree during the first pass: {c}"
    );
    assert!(passes <= 3, "max_passes is 3: {c}");
    assert_eq!(c["skipped_special"], 0, "{c}");
    let excluded: Vec<&str> = c["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(excluded, ["dev", "proc", "run", "sys", "tmp"], "{c}");
    let final_counter = std::fs::read_to_string(&counter).unwrap();
    let final_n = counter_lines(&final_counter);

    // Build the image; its tree must be the captured one.
    let img = dir.path().join("disk.raw");
    let b = ferry_json(&[
        "p2v",
        "build",
        "live",
        "--store",
        store.to_str().unwrap(),
        "--to",
        img.to_str().unwrap(),
        "--size",
        "64MiB",
    ]);
    assert!(
        b["kernel_in_tree"]
            .as_str()
            .unwrap()
            .starts_with("/boot/vmlinuz-"),
        "{b}"
    );
    assert!(
        b["initrd_in_tree"]
            .as_str()
            .unwrap()
            .starts_with("/boot/initrd.img-"),
        "{b}"
    );
    let qemu_cmd: Vec<String> = b["qemu_command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(
        qemu_cmd.contains(&"root=/dev/vda rw console=ttyS0".to_string()),
        "{b}"
    );
    fsck_clean(&img);
    let dumped = dir.path().join("dumped");
    dump_image(&img, &dumped);
    let files = files_under(&dumped);
    // Every file as of some point: the counter a prefix of the final one,
    // each writer file holding its own number.
    let snap = String::from_utf8(files["var/log/counter"].clone()).unwrap();
    let n = counter_lines(&snap);
    assert!(n >= 20 && n <= final_n, "{n} of {final_n}");
    assert!(final_counter.starts_with(&snap));
    let mut writer_files = 0;
    for (p, data) in &files {
        let num = p.strip_prefix("var/spool/f").or_else(|| {
            p.strip_prefix("var/spool/d")
                .and_then(|s| s.strip_suffix("/x"))
        });
        if let Some(num) = num {
            writer_files += 1;
            // Empty is a state it had too (created, not yet written) when
            // the last pass ended between the two.
            let text = String::from_utf8_lossy(data);
            assert!(
                text.is_empty() || text == format!("{num}\n"),
                "{p}: {text:?}"
            );
        }
    }
    assert!(
        writer_files > 0,
        "no writer file captured: {:?}",
        files.keys()
    );
    for p in ["etc/data.bin", "bin/busybox", "sbin/init"] {
        assert_eq!(files[p], std::fs::read(root.join(p)).unwrap(), "{p}");
    }
    assert_eq!(
        std::fs::read_link(dumped.join("bin/sh")).unwrap(),
        Path::new("busybox"),
        "symlinks kept as they are"
    );
    for d in ["proc", "sys", "dev", "run", "tmp"] {
        assert!(dumped.join(d).is_dir(), "/{d} kept as an empty directory");
        assert_eq!(
            std::fs::read_dir(dumped.join(d)).unwrap().count(),
            0,
            "/{d} is empty"
        );
    }

    // Boot it: the captured /sbin/init runs the check and powers off.
    let kernel = b["kernel"].as_str().unwrap();
    let initrd = b["initrd"].as_str().unwrap();
    let mut qemu = Group::spawn(
        Command::new("qemu-system-x86_64")
            .args(["-nographic", "-no-reboot", "-m", "256", "-accel", "tcg"])
            .args(["-kernel", kernel, "-initrd", initrd])
            .args(["-append", "root=/dev/vda rw console=ttyS0 panic=-1 quiet"])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=virtio", img.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let stdout = qemu.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut console = String::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut passed = false;
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        console.push_str(&line);
        console.push('\n');
        if line.contains("P2V CHECK OK") {
            passed = true;
        }
        if line.contains("P2V CHECK FAILED") || line.contains("Power down") {
            break;
        }
    }
    assert!(
        passed,
        "the booted image did not pass its check:\n{console}"
    );
    assert!(console.contains("P2V GUEST UP"), "{console}");
    assert!(
        console.contains(&format!("counter has {n} lines")),
        "the guest sees the captured counter:\n{console}"
    );
}

#[test]
fn a_physical_disk_is_archived_and_restored_byte_for_byte() {
    for t in ["losetup", "mke2fs", "debugfs", "fsck.ext4"] {
        require(t);
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    let mut x = 7u64;
    let mut rnd = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    std::fs::write(src.join("a/big"), rnd(5 << 20)).unwrap();
    std::fs::write(src.join("a/b/small"), b"small file\n").unwrap();
    std::fs::write(src.join("zeros"), vec![0u8; 3 << 20]).unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    ok(
        Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-d"])
            .arg(&src)
            .arg("-F")
            .arg(&img)
            .output()
            .unwrap(),
        "mke2fs",
    );
    let dev = ok(
        Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&img)
            .output()
            .unwrap(),
        "losetup",
    )
    .trim()
    .to_string();
    let _loop = Loop(dev.clone());
    let store = dir.path().join("store");
    let c = ferry_json(&[
        "archive",
        "create",
        &dev,
        "--to",
        store.to_str().unwrap(),
        "--name",
        "disk",
    ]);
    assert_eq!(c["consistency"], "crash-consistent-if-idle", "{c}");
    let out = dir.path().join("restored.raw");
    ferry_json(&[
        "archive",
        "restore",
        "disk",
        "--store",
        store.to_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
    ]);
    fsck_clean(&out);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap(),
        "the restored disk differs"
    );
    let dumped = dir.path().join("dumped");
    dump_image(&out, &dumped);
    for p in ["a/big", "a/b/small", "zeros"] {
        assert_eq!(
            std::fs::read(dumped.join(p)).unwrap(),
            std::fs::read(src.join(p)).unwrap(),
            "{p}"
        );
    }
}

/// P2V to a workload: a captured root built straight into a ferry volume
/// (`p2v build --volume`, imported by the agent) runs as a QEMU VM
/// workload, whose console shows the captured system's check passing.
#[test]
fn a_captured_root_built_into_a_volume_runs_as_a_vm_workload() {
    for t in [
        "qemu-system-x86_64",
        "mke2fs",
        "cpio",
        "busybox",
        "qemu-img",
    ] {
        require(t);
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    ok(
        Command::new(ws().join("crates/ferry/tests/p2v/build-root"))
            .arg(&root)
            .arg(ws().join("target/guest-p2v"))
            .output()
            .unwrap(),
        "build-root",
    );
    let store = dir.path().join("store");
    ferry_json(&[
        "p2v",
        "capture",
        "--root",
        root.to_str().unwrap(),
        "--to",
        store.to_str().unwrap(),
        "--name",
        "srv",
    ]);
    let a = common::agent::Agent::start(dir.path(), "a", "");
    let image = dir.path().join("srv.raw");
    let b = a.json(&[
        "p2v",
        "build",
        "srv",
        "--store",
        store.to_str().unwrap(),
        "--volume",
        "srv",
        "--to",
        image.to_str().unwrap(),
        "--size",
        "64MiB",
    ]);
    assert!(!image.exists(), "the built image is removed once imported");
    assert_eq!(b["volume"], "srv", "{b}");
    let kernel = b["kernel"].as_str().unwrap().to_string();
    let initrd = b["initrd"].as_str().unwrap().to_string();
    a.ok(&[
        "workload",
        "create",
        "srv",
        "--volume",
        "srv",
        "--vm-kernel",
        &kernel,
        "--vm-initrd",
        &initrd,
        "--vm-append",
        "root=/dev/vda rw console=ttyS0 panic=-1 quiet",
        "--vm-memory",
        "256MiB",
        "--hook-timeout",
        "20s",
    ]);
    a.ok(&["workload", "start", "srv"]);
    let con = a.dir.join("vms/srv/console.log");
    common::agent::wait_until(180, "the P2V guest's check", || {
        let t = std::fs::read_to_string(&con).unwrap_or_default();
        t.contains("P2V CHECK OK") || t.contains("P2V CHECK FAILED")
    });
    let text = std::fs::read_to_string(&con).unwrap();
    assert!(
        text.contains("P2V CHECK OK") && !text.contains("P2V CHECK FAILED"),
        "{text}"
    );
    a.ok(&["workload", "stop", "srv"]);
}

#[test]
fn an_interrupted_capture_keeps_its_chunks_named_and_writes_no_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    ok(
        Command::new("head")
            .args(["-c", "400M", "/dev/urandom"])
            .stdout(std::fs::File::create(root.join("big")).unwrap())
            .output()
            .unwrap(),
        "head",
    );
    let store = dir.path().join("store");
    let mut cap = Group::spawn(
        Command::new(ferry_bin())
            .args(["p2v", "capture", "--root"])
            .arg(&root)
            .arg("--to")
            .arg(&store)
            .args(["--name", "cut"])
            .env("FERRY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    // Interrupted once the first checkpoint's chunks are being written.
    let t0 = Instant::now();
    while std::fs::read_dir(store.join("chunks"))
        .map(|d| d.count())
        .unwrap_or(0)
        < 3
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the capture writes no chunk"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) of the process this test started.
    unsafe { libc::kill(cap.0.id() as i32, libc::SIGINT) };
    let status = cap.0.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut cap.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(
        !store.join("archives/cut.json").exists(),
        "no manifest of a cut capture"
    );
    let partial = std::fs::read_to_string(store.join("partial/cut.json")).unwrap();
    let v: Value = serde_json::from_str(&partial).unwrap();
    let n = v["body"]["files"].as_array().map_or(0, |f| f.len());
    assert!(
        n > 0,
        "the partial record names the chunks written: {partial}"
    );
}
