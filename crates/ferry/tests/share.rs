//! Shares: a sync share's FUSE mount driven by real programs (sqlite3, git,
//! tar, fio with verification, rsync), its replica compared entry by entry
//! (content, type, mode, owner, mtime, link count), and a replica outage that
//! resyncs only the files changed meanwhile. Async shares: a watched
//! directory under random changes converges (deltas for large files, changes
//! that restore size and mtime caught by ctime, symlink loops copied as
//! links), also after the kernel's event queue overflowed; an agent without
//! DAC override reports what it cannot read and replicates the rest.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::agent::{two_agents, wait_until, Agent};
use common::{assert_trees_equal, require, run_ok, tree_diff, Mount};

/// The share's mount point on `a`; lazily unmounted when dropped (also when
/// a test fails or the agent was killed).
fn mount_point(root: &Path) -> (PathBuf, Mount) {
    let p = root.join("mnt");
    std::fs::create_dir_all(&p).unwrap();
    (p.clone(), Mount(p))
}

/// `share create app --path MNT --to b` on `a`, then waits until b's copy is up to date.
fn create_sync_share(a: &Agent, mnt: &Path) {
    a.ok(&[
        "share",
        "create",
        "app",
        "--path",
        mnt.to_str().unwrap(),
        "--to",
        "b",
    ]);
    a.ok(&["share", "wait", "app", "--timeout", "60s"]);
}

fn share_status(a: &Agent, name: &str) -> serde_json::Value {
    a.json(&["share", "status", name])
}

fn data_dir(agent: &Agent, share: &str) -> PathBuf {
    agent.dir.join("shares").join(share).join("data")
}

/// Waits until the replica's tree equals `src` (an async share converges).
fn wait_converged(src: &Path, replica: &Path, secs: u64, a: &Agent) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let d = tree_diff(src, replica);
        let Some(d) = d else { return };
        assert!(
            std::time::Instant::now() < deadline,
            "not converged after {secs} s: {d}\n{}\n--- primary log ---\n{}",
            a.json(&["share", "status", "app"]),
            a.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn sh(dir: &Path, script: &str) {
    run_ok(Command::new("bash").args(["-ec", script]).current_dir(dir));
}

#[test]
fn sync_mount_runs_real_programs_and_the_replica_matches() {
    for t in ["sqlite3", "git", "tar", "fio", "rsync"] {
        require(t);
    }
    let (root, a, b) = two_agents("ferry-share-", "");
    let (mnt, _m) = mount_point(root.path());
    create_sync_share(&a, &mnt);

    // sqlite3: a write workload in WAL mode (fsyncs through the mount).
    let mut sql =
        String::from("PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);\n");
    for i in 0..200 {
        sql.push_str(&format!(
            "BEGIN; INSERT INTO t(v) VALUES (hex(randomblob({}))); UPDATE t SET v = v || 'x' WHERE id % 7 = {}; COMMIT;\n",
            100 + i,
            i % 7
        ));
    }
    sql.push_str("PRAGMA wal_checkpoint(TRUNCATE);\n");
    std::fs::write(root.path().join("load.sql"), &sql).unwrap();
    sh(
        &mnt,
        &format!(
            "sqlite3 db.sqlite < {}",
            root.path().join("load.sql").display()
        ),
    );

    // git: a real repository, committed and garbage-collected.
    sh(
        &mnt,
        "mkdir repo && cd repo && git init -q && cp -r /usr/share/zoneinfo/Europe src \
         && git add -A && git -c user.name=t -c user.email=t@t commit -qm first \
         && echo more >> src/Paris && git -c user.name=t -c user.email=t@t commit -qam second \
         && git gc -q && git fsck --no-progress",
    );

    // tar: extract a large archive (thousands of files, symlinks, modes).
    let archive = root.path().join("doc.tar");
    run_ok(
        Command::new("tar")
            .args(["-cf"])
            .arg(&archive)
            .args(["-C", "/usr/share", "doc"]),
    );
    sh(
        &mnt,
        &format!("mkdir t && tar -xf {} -C t", archive.display()),
    );

    // fio: random writes verified with crc32c, then read back.
    sh(
        &mnt,
        "fio --name=v --directory=. --rw=randwrite --bs=4k --size=8M --ioengine=psync \
         --verify=crc32c --do_verify=1 --fsync=64 --output=/dev/null",
    );
    // Large sequential writes (past the page cache on both nodes), then a
    // small write into their middle and an unaligned tail (through it).
    sh(
        &mnt,
        "fio --name=s --directory=. --rw=write --bs=1M --size=16M --ioengine=psync \
         --verify=crc32c --do_verify=1 --output=/dev/null \
         && dd if=/dev/urandom of=s.0.0 bs=4k count=1 seek=1000 conv=notrunc status=none \
         && dd if=/dev/urandom of=s.0.0 bs=1000 count=300 seek=16777 conv=notrunc status=none",
    );

    // rsync onto the mount: hard links, symlinks, times, modes.
    sh(&mnt, "rsync -aH /usr/share/zoneinfo/ zi/");

    // Awkward names: a newline, invalid UTF-8, 255 bytes; a rename over an
    // open file; a file removed while open; a symlink loop, a link upwards.
    sh(
        &mnt,
        "printf a > $'new\\nline' && printf b > $'\\xff\\xfe' && printf c > $(printf 'n%.0s' $(seq 255)) \
         && exec 3<>victim && echo old >&3 && echo new > repl && mv repl victim && echo more >&3 \
         && exec 4<>gone && rm gone && echo late >&4 && exec 3>&- 4>&- \
         && ln -s loop2 loop1 && ln -s loop1 loop2 && ln -s .. zi/up",
    );
    // An extended attribute, and a sparse file (64 MiB, one byte written).
    sh(
        &mnt,
        "echo x > xa && python3 -c \"import os; os.setxattr('xa', 'user.k', b'v1')\" \
         && truncate -s 64M sparse && printf y | dd of=sparse bs=1 seek=1048576 conv=notrunc status=none",
    );

    a.ok(&["share", "wait", "app", "--timeout", "60s"]);
    let st = share_status(&a, "app");
    assert_eq!(st["state"], "up-to-date", "{st}");
    assert_trees_equal(&data_dir(&a, "app"), &data_dir(&b, "app"));

    // The replica's database is whole and holds every committed row.
    let copy = root.path().join("replica.sqlite");
    std::fs::copy(data_dir(&b, "app").join("db.sqlite"), &copy).unwrap();
    let check = run_ok(
        Command::new("sqlite3")
            .arg(&copy)
            .arg("PRAGMA integrity_check; SELECT count(*) FROM t;"),
    );
    assert_eq!(check.trim(), "ok\n200", "{check}");
    // The xattr arrived, and the sparse file stayed sparse.
    let xa = run_ok(Command::new("python3").arg("-c").arg(format!(
        "import os; print(os.getxattr('{}', 'user.k').decode())",
        data_dir(&b, "app").join("xa").display()
    )));
    assert_eq!(xa.trim(), "v1");
    let blocks = run_ok(
        Command::new("stat")
            .args(["-c", "%b"])
            .arg(data_dir(&b, "app").join("sparse")),
    );
    assert!(
        blocks.trim().parse::<u64>().unwrap() < 1024,
        "sparse file filled on the replica: {blocks} blocks"
    );
    // Orphans (the open-then-removed file) are gone on both sides.
    for ag in [&a, &b] {
        let o = ag.dir.join("shares/app/orphans");
        assert_eq!(std::fs::read_dir(&o).unwrap().count(), 0, "{}", o.display());
    }
    // `share verify` reads both trees whole: equal now; a replica file
    // damaged behind ferry's back (same size and mtime) and a stray file
    // there are named, and it exits non-zero.
    let v = a.json(&["share", "verify", "app"]);
    assert_eq!(v["equal"], true, "{v}");
    assert!(v["files"].as_u64().unwrap() > 100, "{v}");
    let victim = data_dir(&b, "app").join("xa");
    run_ok(Command::new("bash").arg("-ec").arg(format!(
        "f={}; cp -p $f $f.keep; printf 'Z' | dd of=$f conv=notrunc status=none; touch -r $f.keep $f; rm $f.keep; echo stray > $(dirname $f)/stray",
        victim.display()
    )));
    let out = a.cli().args(["share", "verify", "app"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("xa: content differs"), "{text}");
    assert!(text.contains("stray: only on the replica"), "{text}");
}

#[test]
fn read_only_files_pass_through_to_the_backing_file_and_writers_stay_replicated() {
    require("python3");
    let (root, a, b) = two_agents("ferry-share-", "");
    let (mnt, _m) = mount_point(root.path());
    create_sync_share(&a, &mnt);
    // Written with O_DIRECT: nothing of it is in the mount's page cache.
    // Then made read-only for everyone (what passes through).
    sh(
        &mnt,
        "dd if=/dev/urandom of=big bs=1M count=4 oflag=direct status=none && chmod 444 big \
         && dd if=/dev/urandom of=rw bs=1M count=4 oflag=direct status=none",
    );
    let reads = |a: &Agent| share_status(a, "app")["fuse_read_bytes"].as_u64().unwrap();
    let opens = |a: &Agent| {
        share_status(a, "app")["passthrough_opens"]
            .as_u64()
            .unwrap()
    };
    let before = reads(&a);
    // A read-only open of a read-only file passes through: the kernel
    // reads the backing file, the daemon sees no read.
    let copy = root.path().join("big.copy");
    sh(&mnt, &format!("cat big > {}", copy.display()));
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(data_dir(&a, "app").join("big")).unwrap()
    );
    assert!(opens(&a) >= 1);
    assert_eq!(reads(&a), before, "passthrough reads reached the daemon");
    // A writable file's read-only open is served by the daemon.
    sh(&mnt, "cat rw > /dev/null");
    assert!(reads(&a) >= before + (4 << 20));
    // While read-only handles pass through, a writable open (root may)
    // would have its writes passed through unreplicated: refused with
    // ETXTBSY; once they close it works, and readers of a writable file
    // see every write at once.
    sh(
        &mnt,
        "python3 - <<'EOF'
import errno, mmap, os
r = os.open('big', os.O_RDONLY)
r2 = os.open('big', os.O_RDONLY)
with open('big', 'rb') as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    assert m[:4096] == os.pread(r2, 4096, 0)
    m.close()
try:
    os.open('big', os.O_RDWR)
    raise SystemExit('a writable open was allowed while reads pass through')
except OSError as e:
    assert e.errno == errno.ETXTBSY, e
# Four writable opens at once while a reader is open: at most three of the
# four FUSE workers wait, so one is left to take the reader's release.
import threading, time
got = []
def opener():
    try:
        got.append(os.open('big', os.O_RDWR))
    except OSError as e:
        got.append(e.errno)
ts = [threading.Thread(target=opener) for _ in range(4)]
for t in ts:
    t.start()
time.sleep(0.1)
os.close(r)
os.close(r2)
for t in ts:
    t.join()
opened = [g for g in got if g not in (errno.ETXTBSY,)]
assert len(opened) >= 3, got
for fd in opened:
    os.close(fd)
w = os.open('big', os.O_RDWR)
os.pwrite(w, b'fresh', 0)
os.close(w)
w = os.open('rw', os.O_RDWR)
r = os.open('rw', os.O_RDONLY)
os.pwrite(w, b'again', 4096)
assert os.pread(r, 5, 4096) == b'again'
os.close(r)
os.close(w)
EOF",
    );
    a.ok(&["share", "wait", "app", "--timeout", "60s"]);
    assert_trees_equal(&data_dir(&a, "app"), &data_dir(&b, "app"));
    let got = std::fs::read(data_dir(&b, "app").join("big")).unwrap();
    assert_eq!(&got[..5], b"fresh");
}

#[test]
fn replica_outage_resyncs_only_the_changed_files() {
    let (root, a, mut b) = two_agents("ferry-share-", "");
    let (mnt, _m) = mount_point(root.path());
    create_sync_share(&a, &mnt);
    sh(
        &mnt,
        "mkdir d && for i in $(seq 100); do head -c 65536 /dev/urandom > d/f$i; done",
    );
    a.ok(&["share", "wait", "app", "--timeout", "60s"]);
    let before = share_status(&a, "app")["resync_files"].as_u64().unwrap();
    b.kill9();
    // Writes go on while the replica is gone; they are journaled.
    sh(
        &mnt,
        "echo changed >> d/f1 && echo changed >> d/f2 && rm d/f3 && mv d/f4 d/moved \
         && mkdir e && echo new > e/new",
    );
    wait_until(20, "the link to notice", || {
        share_status(&a, "app")["state"] == "disconnected"
    });
    assert!(share_status(&a, "app")["pending_paths"].as_u64().unwrap() > 0);
    b.spawn();
    a.ok(&["share", "wait", "app", "--timeout", "60s"]);
    let st = share_status(&a, "app");
    let resent = st["resync_files"].as_u64().unwrap() - before;
    // f1, f2, moved (renamed: compared at its new path) and e/new; not the other 96.
    assert!(resent <= 4, "resent {resent} files: {st}\n{}", a.log_text());
    assert_eq!(st["pending_paths"], 0, "{st}");
    assert_trees_equal(&data_dir(&a, "app"), &data_dir(&b, "app"));
}

/// A deterministic pseudo-random sequence (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn async_share(root: &Path, a: &Agent) -> PathBuf {
    let src = root.join("src");
    std::fs::create_dir_all(&src).unwrap();
    a.ok(&[
        "share",
        "create",
        "app",
        "--path",
        src.to_str().unwrap(),
        "--mode",
        "async",
        "--to",
        "b",
    ]);
    src
}

#[test]
fn async_watcher_converges_under_random_changes() {
    let (root, a, b) = two_agents("ferry-share-async-", "");
    let src = root.path().join("src");
    std::fs::create_dir_all(src.join("d1/d2")).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Present before the share exists: the initial sync carries them.
    std::fs::write(src.join("big"), rng.bytes(4 << 20)).unwrap();
    for i in 0..20 {
        std::fs::write(src.join(format!("d1/f{i}")), rng.bytes(1000 + i * 100)).unwrap();
    }
    // Symlink loops and a link to an ancestor: copied as links, never followed.
    sh(
        &src,
        "ln -s loop-b loop-a && ln -s loop-a loop-b && ln -s self self && ln -s .. d1/d2/up",
    );
    async_share(root.path(), &a);
    a.ok(&["share", "wait", "app", "--timeout", "60s"]);
    let replica = data_dir(&b, "app");
    wait_converged(&src, &replica, 30, &a);
    let st = share_status(&a, "app");
    assert_eq!(st["crash_consistent"], false, "{st}");
    assert!(st["watched_dirs"].as_u64().unwrap() >= 3, "{st}");

    // A 4 KiB change in the middle of a 4 MiB file moves as a delta.
    let sent_before = share_status(&a, "app")["resync_bytes"].as_u64().unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(src.join("big"))
            .unwrap();
        f.write_all_at(&rng.bytes(4096), 2 << 20).unwrap();
    }
    wait_converged(&src, &replica, 30, &a);
    let st = share_status(&a, "app");
    let sent = st["resync_bytes"].as_u64().unwrap() - sent_before;
    assert!(sent <= 256 * 1024, "a 4 KiB change sent {sent} bytes: {st}");
    assert!(
        st["delta_reused_bytes"].as_u64().unwrap() >= 3 << 20,
        "{st}"
    );

    // Same size, mtime restored (what tar and rsync do): ctime tells.
    sh(
        &src,
        "t=$(stat -c %Y d1/f3); head -c 1300 /dev/urandom > d1/f3; touch -d @$t d1/f3",
    );
    wait_converged(&src, &replica, 30, &a);

    // Random creates, appends, in-place writes, renames (files and
    // directories), deletes, chmods, hard and symbolic links.
    let mut files: Vec<PathBuf> = (0..20).map(|i| PathBuf::from(format!("d1/f{i}"))).collect();
    let mut dirs: Vec<PathBuf> = vec!["d1".into(), "d1/d2".into()];
    for step in 0..400u64 {
        match rng.below(10) {
            0 | 1 => {
                let d = &dirs[rng.below(dirs.len() as u64) as usize];
                let p = d.join(format!("n{step}"));
                let n = rng.below(20_000) as usize;
                std::fs::write(src.join(&p), rng.bytes(n)).unwrap();
                files.push(p);
            }
            2 if !files.is_empty() => {
                use std::io::Write;
                let p = &files[rng.below(files.len() as u64) as usize];
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(src.join(p))
                    .unwrap();
                f.write_all(&rng.bytes(500)).unwrap();
            }
            3 if !files.is_empty() => {
                let i = rng.below(files.len() as u64) as usize;
                let d = &dirs[rng.below(dirs.len() as u64) as usize];
                let to = d.join(format!("r{step}"));
                std::fs::rename(src.join(&files[i]), src.join(&to)).unwrap();
                files[i] = to;
            }
            4 if files.len() > 5 => {
                let i = rng.below(files.len() as u64) as usize;
                std::fs::remove_file(src.join(files.swap_remove(i))).unwrap();
            }
            5 => {
                let p = PathBuf::from(format!("dir{step}"));
                std::fs::create_dir(src.join(&p)).unwrap();
                std::fs::write(src.join(p.join("inside")), rng.bytes(100)).unwrap();
                files.push(p.join("inside"));
                dirs.push(p);
            }
            6 if dirs.len() > 3 => {
                // Rename a top-level directory made above, with its content.
                let i = 2 + rng.below(dirs.len() as u64 - 2) as usize;
                let from = dirs[i].clone();
                let to = PathBuf::from(format!("moved{step}"));
                std::fs::rename(src.join(&from), src.join(&to)).unwrap();
                for f in files.iter_mut().chain(dirs.iter_mut()) {
                    if let Ok(rest) = f.strip_prefix(&from) {
                        *f = to.join(rest);
                    }
                }
            }
            7 if !files.is_empty() => {
                use std::os::unix::fs::PermissionsExt;
                let p = &files[rng.below(files.len() as u64) as usize];
                let mode = [0o600, 0o644, 0o640, 0o755][rng.below(4) as usize];
                std::fs::set_permissions(src.join(p), std::fs::Permissions::from_mode(mode))
                    .unwrap();
            }
            8 if !files.is_empty() => {
                let p = files[rng.below(files.len() as u64) as usize].clone();
                let l = p.with_file_name(format!("hl{step}"));
                std::fs::hard_link(src.join(&p), src.join(&l)).unwrap();
                files.push(l);
            }
            9 => {
                let p = PathBuf::from(format!("d1/sl{step}"));
                std::os::unix::fs::symlink(format!("target-{step}"), src.join(p)).unwrap();
            }
            _ => {}
        }
        if step % 50 == 0 {
            std::thread::sleep(std::time::Duration::from_millis(30));
        }
    }
    wait_converged(&src, &replica, 60, &a);
    let st = share_status(&a, "app");
    assert!(
        st["lag_p99_ms"].as_u64().unwrap() > 0,
        "lag is reported: {st}"
    );
    assert_eq!(st["overflows"], 0, "{st}");
}

/// A process stopped with SIGSTOP until dropped (also when the test fails).
struct Stopped(i32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        let pid = pid as i32;
        // SAFETY: kill only sends a signal, to a process this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

#[test]
fn async_watcher_rescans_after_the_event_queue_overflows() {
    let (root, a, b) = two_agents("ferry-share-overflow-", "");
    // The system's queue size, not a tiny one: a sysctl is global, and other
    // tests' watchers made meanwhile would get the tiny queue too.
    let queued_max: u64 = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let src = async_share(root.path(), &a);
    a.ok(&["share", "wait", "app", "--timeout", "60s"]);
    // The directories first, until the watcher watches them (root, x, x/y).
    sh(&src, "mkdir -p x/y");
    wait_until(10, "x and x/y watched", || {
        share_status(&a, "app")["watched_dirs"]
            .as_u64()
            .unwrap_or(0)
            >= 3
    });
    // Then more events than the queue holds (each new file is at least a
    // create and a close), made while the agent is stopped (SIGSTOP), so its
    // watcher cannot keep the queue short: the kernel drops events and
    // queues an overflow.
    let n = queued_max / 2 + 300;
    {
        let _stopped = Stopped::new(a.pid());
        sh(
            &src,
            &format!(
                "for i in $(seq {n}); do echo $i > x/y/f$i; done && \
                 for i in $(seq 1 3 300); do mv x/y/f$i x/g$i; done && rm x/y/f2 x/y/f5"
            ),
        );
    }
    let replica = data_dir(&b, "app");
    wait_converged(&src, &replica, 60, &a);
    let st = share_status(&a, "app");
    assert!(st["overflows"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["rescans"].as_u64().unwrap() >= 1, "{st}");
    // Same size, mtime restored, after an overflow: still caught (ctime).
    sh(
        &src,
        "t=$(stat -c %Y x/g1); echo 9 > x/g1; touch -d @$t x/g1; \
         for i in $(seq 400); do touch x/y/f3; done",
    );
    wait_converged(&src, &replica, 60, &a);
}

/// Two paired agents, b's whole data dir a 48 MiB filesystem, a keeping
/// `reserve` bytes of it free; a sync share "app" mounted on a. Fields drop
/// in order: the mount, the agents, then b's filesystem and the directory.
struct SmallReplica {
    _mount: Mount,
    mnt: PathBuf,
    a: Agent,
    b: Agent,
    _small: Mount,
    _root: tempfile::TempDir,
}

impl SmallReplica {
    fn start(prefix: &str, reserve: u64) -> SmallReplica {
        let root = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        let small = Mount::tmpfs(&root.path().join("b"), "48m");
        let a = Agent::start(
            root.path(),
            "a",
            &format!("\n[shares]\nreplica_free_bytes_min = {reserve}\n"),
        );
        let b = Agent::start(root.path(), "b", "");
        common::agent::pair(&a, &b);
        let (mnt, mount) = mount_point(root.path());
        create_sync_share(&a, &mnt);
        SmallReplica {
            _mount: mount,
            mnt,
            a,
            b,
            _small: small,
            _root: root,
        }
    }
}

#[test]
fn a_full_replica_fails_writes_here_with_enospc_and_the_copies_stay_equal() {
    // a keeps 8 MiB of b's 48 MiB in reserve.
    let small = SmallReplica::start("ferry-share-full-", 8 << 20);
    let (a, b, mnt) = (&small.a, &small.b, &small.mnt);
    // a's own disk has room; the replica's does not: the write fails here.
    let out = Command::new("dd")
        .args([
            "if=/dev/urandom",
            "bs=1M",
            "count=100",
            "conv=fsync",
            "status=none",
        ])
        .arg(format!("of={}", mnt.join("big").display()))
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("No space left"),
        "dd of 100 MiB onto a 48 MiB replica: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let st = share_status(a, "app");
    assert_eq!(st["state"], "up-to-date", "the replica fell behind: {st}");
    let size = std::fs::metadata(mnt.join("big")).unwrap().len();
    assert!(size > 16 << 20 && size < 48 << 20, "wrote {size} bytes");
    assert_trees_equal(&data_dir(a, "app"), &data_dir(b, "app"));
    // Space freed on both: writes succeed again.
    sh(
        mnt,
        "rm big && head -c 4194304 /dev/urandom > again && sync again",
    );
    a.ok(&["share", "wait", "app", "--timeout", "60s"]);
    assert_trees_equal(&data_dir(a, "app"), &data_dir(b, "app"));
}

#[test]
fn a_replica_that_cannot_apply_what_it_acknowledged_records_itself_outdated_then_resyncs() {
    let small = SmallReplica::start("ferry-share-late-fail-", 1 << 20);
    let (a, b, mnt) = (&small.a, &small.b, &small.mnt);
    let record = || -> serde_json::Value {
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(b.dir.join("shares/app/share.json")).unwrap())
                .unwrap();
        r["body"].clone()
    };
    assert_ne!(record()["generation"], 0, "b is an up-to-date copy");
    // Something else takes the replica's space while b is stopped (so it
    // cannot report it): a still believes there is room, sends a 1 MiB
    // write, and b receives (and acknowledges) it, then cannot apply it.
    let filler = b.dir.join("filler");
    // Made first: the write below then sends nothing before its data.
    sh(mnt, "touch big");
    let writer = {
        let _stopped = Stopped::new(b.pid());
        sh(
            &b.dir,
            "avail=$(df -B1 --output=avail . | tail -1); fallocate -l $((avail - 65536)) filler",
        );
        let w = Command::new("dd")
            .args([
                "if=/dev/urandom",
                "bs=1M",
                "count=4",
                "conv=notrunc",
                "status=none",
            ])
            .arg(format!("of={}", mnt.join("big").display()))
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        w
    };
    // The first write went through on a (the rest may fail with ENOSPC).
    let _ = writer.wait_with_output();
    wait_until(30, "b records that it is not an up-to-date copy", || {
        record()["generation"] == 0
    });
    assert!(std::fs::metadata(mnt.join("big")).unwrap().len() >= 1 << 20);
    // The primary keeps serving; once the space is back, b resyncs.
    std::fs::remove_file(&filler).unwrap();
    a.ok(&["share", "wait", "app", "--timeout", "60s"]);
    assert_ne!(record()["generation"], 0);
    assert_trees_equal(&data_dir(a, "app"), &data_dir(b, "app"));
}

#[test]
fn a_large_write_that_fails_here_after_it_was_sent_is_undone_on_the_replica() {
    require("chattr");
    let (root, a, b) = two_agents("ferry-share-early-", "");
    let (mnt, _m) = mount_point(root.path());
    create_sync_share(&a, &mnt);
    sh(&mnt, "head -c 2097152 /dev/urandom > f");
    a.ok(&["share", "wait", "app", "--timeout", "60s"]);
    let backing = data_dir(&a, "app").join("f");
    // The file is open through the mount when its backing file turns
    // immutable: ferry's own write to it fails (EPERM), after a 1 MiB write
    // (sent before it is written here) went to the replica.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "exec 3<>{f} && chattr +i {b} && dd if=/dev/urandom bs=1M count=1 conv=notrunc status=none >&3",
            f = mnt.join("f").display(),
            b = backing.display()
        ))
        .output()
        .unwrap();
    run_ok(Command::new("chattr").arg("-i").arg(&backing));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not permitted"),
        "the write failed here: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The replica got the write; the link was dropped, and the resync that
    // follows compares the file by content.
    a.ok(&["share", "wait", "app", "--timeout", "60s"]);
    assert_trees_equal(&data_dir(&a, "app"), &data_dir(&b, "app"));
}

#[test]
fn async_share_reports_what_it_cannot_read_and_replicates_the_rest() {
    // The agent runs without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, like
    // a service account: a file or directory with mode 000 is closed to it.
    let setpriv = require("setpriv");
    let setpriv = setpriv.to_str().unwrap();
    let root = tempfile::Builder::new()
        .prefix("ferry-share-eacces-")
        .tempdir()
        .unwrap();
    let drop_caps = "-dac_override,-dac_read_search";
    let mut a = Agent::start_wrapped(
        root.path(),
        "a",
        "",
        &[
            setpriv,
            &format!("--inh-caps={drop_caps}"),
            &format!("--bounding-set={drop_caps}"),
            "--",
        ],
    );
    let b = Agent::start(root.path(), "b", "");
    common::agent::pair(&a, &b);
    let src = root.path().join("src");
    std::fs::create_dir_all(src.join("locked")).unwrap();
    std::fs::write(src.join("open"), "everyone may read this").unwrap();
    std::fs::write(src.join("secret"), "only after chmod").unwrap();
    std::fs::write(src.join("locked/inner"), "behind a closed directory").unwrap();
    sh(&src, "chmod 000 secret locked");
    async_share(root.path(), &a);
    let replica = data_dir(&b, "app");
    wait_until(60, "the readable file on the replica", || {
        std::fs::read(replica.join("open")).is_ok_and(|d| d == b"everyone may read this")
    });
    wait_until(30, "the unreadable entries in status", || {
        share_status(&a, "app")["unreadable_files"]
            .as_u64()
            .unwrap()
            >= 1
    });
    let st = share_status(&a, "app");
    let err = st["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("secret") || err.contains("locked"),
        "status names what it cannot read: {st}"
    );
    assert!(a.is_running(), "the agent went down: {}", a.log_text());
    // Opened up: the watcher sees the mode change and both arrive.
    sh(&src, "chmod 644 secret && chmod 755 locked");
    wait_converged(&src, &replica, 60, &a);
    assert_eq!(
        std::fs::read(replica.join("locked/inner")).unwrap(),
        b"behind a closed directory"
    );
    // Closed again, then a restart (an async share compares the whole tree
    // on start): what the replica holds below it is not taken for deleted.
    sh(&src, "chmod 000 locked");
    a.kill9();
    a.spawn();
    wait_until(60, "the restarted share up to date", || {
        let st = share_status(&a, "app");
        st["state"] == "up-to-date" && st["unreadable_files"].as_u64().unwrap() >= 1
    });
    assert_eq!(
        std::fs::read(replica.join("locked/inner")).unwrap(),
        b"behind a closed directory",
        "the replica's copy below an unreadable directory was removed"
    );
    sh(&src, "chmod 755 locked");
    drop(b);
}

/// `setpriv` running `args` as user and group 65534 (nobody), no groups.
fn as_nobody(args: &[&str]) -> Command {
    let mut c = Command::new(require("setpriv"));
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(args);
    c
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Runs `tests/scripts/swap_race.py` as nobody: fchmod 0666 of `target` in
/// a loop while entries `a` and `b` of `dir` are swapped, until `chmods`
/// succeeded (at most 60 s) or `victim` changed mode. Returns the script's
/// report; at least a fifth of `chmods` and 300 swaps must have run.
fn swap_race(
    target: &Path,
    dir: &Path,
    (a, b): (&str, &str),
    victim: &Path,
    chmods: u64,
) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/swap_race.py");
    let out = as_nobody(&[
        "/usr/bin/python3",
        script,
        "60",
        &chmods.to_string(),
        target.to_str().unwrap(),
        dir.to_str().unwrap(),
        a,
        b,
        victim.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count = |what: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(what))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(
        // (A fiftieth of the chmods asked for: under the whole suite's load
        // the swapper starves the chmod loop — 80 and 190 chmods against 24
        // million swaps in two runs — and that is still a race that ran.)
        mode_of(victim) != 0o600 || count("chmods ") >= chmods / 50 && count("swaps ") >= 300,
        "the race did not run: {text}"
    );
    text
}

/// A temp dir other users may enter (a test's mount point must be reachable
/// by the unprivileged user).
fn open_root(prefix: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    root
}

#[test]
fn an_unprivileged_user_cannot_chmod_outside_the_share_through_a_swapped_symlink() {
    use std::os::unix::fs::PermissionsExt;
    require("setpriv");
    let root = open_root("ferry-share-chmod-race-");
    let a = Agent::start(root.path(), "a", "");
    // The data dir and shares/ are root's alone (also when they existed).
    assert_eq!(mode_of(&a.dir), 0o700);
    assert_eq!(mode_of(&a.dir.join("shares")), 0o700);
    let (mnt, _m) = mount_point(root.path());
    a.ok(&["share", "create", "app", "--path", mnt.to_str().unwrap()]);
    std::fs::create_dir(mnt.join("u")).unwrap();
    std::os::unix::fs::chown(mnt.join("u"), Some(65534), Some(65534)).unwrap();
    let victim = root.path().join("victim");
    std::fs::write(&victim, "root's alone").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let backing = data_dir(&a, "app").join("u");
    run_ok(&mut as_nobody(&[
        "touch",
        mnt.join("u/f").to_str().unwrap(),
    ]));
    // As shipped, the user cannot reach the backing tree at all.
    let out = as_nobody(&["ls", backing.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an unprivileged user lists the backing tree"
    );
    // Opened up (an operator's chmod): the user puts a symlink to the victim
    // beside their file and swaps the two while calling chmod through the
    // mount. The chmod acts on the entry it checked, never through the link.
    for d in [a.dir.clone(), a.dir.join("shares")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    run_ok(&mut as_nobody(&[
        "ln",
        "-s",
        victim.to_str().unwrap(),
        backing.join("s").to_str().unwrap(),
    ]));
    let report = swap_race(&mnt.join("u/f"), &backing, ("f", "s"), &victim, 1000);
    assert_eq!(
        mode_of(&victim),
        0o600,
        "a root-owned file outside the share was chmodded through a symlink ({report})"
    );
    // A restart tightens an existing data dir again.
    let mut a = a;
    a.stop();
    a.spawn();
    assert_eq!(mode_of(&a.dir), 0o700);
    assert_eq!(mode_of(&a.dir.join("shares")), 0o700);
}

#[test]
fn the_sync_mount_is_nosuid_and_nodev() {
    use std::os::unix::fs::PermissionsExt;
    let root = open_root("ferry-share-nosuid-");
    let a = Agent::start(root.path(), "a", "");
    let (mnt, _m) = mount_point(root.path());
    a.ok(&["share", "create", "app", "--path", mnt.to_str().unwrap()]);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(mnt.to_str().unwrap()))
        .unwrap_or_else(|| panic!("{} is not mounted: {mountinfo}", mnt.display()));
    let opts: Vec<&str> = line.split(' ').nth(5).unwrap().split(',').collect();
    assert!(
        opts.contains(&"nosuid") && opts.contains(&"nodev"),
        "mount options: {line}"
    );
    // allow_other: another user may use it.
    assert!(line.contains("allow_other"), "{line}");
    // A set-user-ID root program in the share runs as its caller.
    let id = mnt.join("id");
    std::fs::copy("/usr/bin/id", &id).unwrap();
    std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let euid = run_ok(&mut as_nobody(&[id.to_str().unwrap(), "-u"]));
    assert_eq!(euid.trim(), "65534", "a set-user-ID file ran as its owner");
    // A device node in the share opens nothing.
    run_ok(
        Command::new("mknod")
            .arg(mnt.join("zero"))
            .args(["c", "1", "5"]),
    );
    std::fs::set_permissions(mnt.join("zero"), std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = std::fs::File::open(mnt.join("zero")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
}

#[test]
fn a_rename_through_the_mount_cannot_redirect_a_chmod_to_another_users_file() {
    use std::os::unix::fs::PermissionsExt;
    require("setpriv");
    let root = open_root("ferry-share-setattr-race-");
    let a = Agent::start(root.path(), "a", "");
    let (mnt, _m) = mount_point(root.path());
    a.ok(&["share", "create", "app", "--path", mnt.to_str().unwrap()]);
    // nobody's directory u holds nobody's p/x and root's r/x (0600).
    let u = mnt.join("u");
    std::fs::create_dir(&u).unwrap();
    std::os::unix::fs::chown(&u, Some(65534), Some(65534)).unwrap();
    run_ok(&mut as_nobody(&[
        "bash",
        "-ec",
        &format!("mkdir {0}/p && echo mine > {0}/p/x", u.display()),
    ]));
    std::fs::create_dir(u.join("r")).unwrap();
    std::fs::write(u.join("r/x"), "root's").unwrap();
    std::fs::set_permissions(u.join("r/x"), std::fs::Permissions::from_mode(0o600)).unwrap();
    // Root's file by a name that does not move.
    std::fs::hard_link(u.join("r/x"), mnt.join("victim")).unwrap();
    // nobody swaps p and r through the mount while calling fchmod on its
    // own p/x: an inode resolved to the path u/p/x before a swap names
    // root's file after it.
    let report = swap_race(&u.join("p/x"), &u, ("p", "r"), &mnt.join("victim"), 20_000);
    assert_eq!(
        mode_of(&mnt.join("victim")),
        0o600,
        "another user's file was chmodded through a rename race ({report})"
    );
    assert_eq!(std::fs::read(mnt.join("victim")).unwrap(), b"root's");
}

#[test]
fn a_share_created_on_a_full_disk_leaves_nothing_behind() {
    let root = tempfile::Builder::new()
        .prefix("ferry-share-full-")
        .tempdir()
        .unwrap();
    // The agent's data dir is a small tmpfs of its own.
    let _disk = common::Mount::tmpfs(&root.path().join("a"), "4m");
    let a = Agent::start(root.path(), "a", "");
    let (mnt, _m) = mount_point(root.path());
    let filler = a.dir.join("filler");
    let out = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the disk did not fill up");
    let shares = a.dir.join("shares");
    let listing = || {
        let mut v: Vec<String> = std::fs::read_dir(&shares)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    for mode in ["sync", "async"] {
        let out = a
            .cli()
            .args(["share", "create", "app", "--mode", mode, "--path"])
            .arg(&mnt)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "created on a full disk");
        assert!(err.contains("No space left"), "{err}");
        assert_eq!(listing(), Vec::<String>::new(), "left behind ({mode})");
    }
    // A directory a failed creation of an earlier version left is cleared.
    for d in ["app/data", "app/orphans"] {
        std::fs::create_dir_all(shares.join(d)).unwrap();
    }
    std::fs::write(shares.join("app/share.json.tmp"), b"").unwrap();
    std::fs::remove_file(&filler).unwrap();
    a.ok(&["share", "create", "app", "--path", mnt.to_str().unwrap()]);
    assert_eq!(listing(), vec!["app".to_string()]);
    assert_eq!(share_status(&a, "app")["serving"], true);
    std::fs::write(mnt.join("f"), b"x").unwrap();
    assert_eq!(std::fs::read(data_dir(&a, "app").join("f")).unwrap(), b"x");
}

#[test]
fn the_sync_mount_follows_posix_on_unlinked_files_and_set_group_id_directories() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (root, a, b) = two_agents("ferry-share-posix-", "");
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (mnt, _m) = mount_point(root.path());
    create_sync_share(&a, &mnt);
    // An open file loses its last name: fstat says no links (ext4, POSIX).
    let mut f = std::fs::File::create(mnt.join("x")).unwrap();
    std::io::Write::write_all(&mut f, b"still here").unwrap();
    assert_eq!(f.metadata().unwrap().nlink(), 1);
    std::fs::remove_file(mnt.join("x")).unwrap();
    assert_eq!(f.metadata().unwrap().nlink(), 0, "fstat after unlink");
    std::io::Write::write_all(&mut f, b", written after").unwrap();
    assert_eq!(f.metadata().unwrap().nlink(), 0, "fstat after a write");
    // ...or is renamed over.
    let g = std::fs::File::create(mnt.join("y")).unwrap();
    std::fs::write(mnt.join("z"), b"new").unwrap();
    std::fs::rename(mnt.join("z"), mnt.join("y")).unwrap();
    assert_eq!(g.metadata().unwrap().nlink(), 0, "fstat after rename over");
    assert_eq!(std::fs::metadata(mnt.join("y")).unwrap().nlink(), 1);
    drop((f, g));
    // A set-group-ID directory keeps the bit across chown (Linux keeps it
    // for directories; it clears set-user-ID and set-group-ID of files).
    let reference = root.path().join("local");
    for base in [&mnt, &reference] {
        let d = base.join("d");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o2775)).unwrap();
        std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
        std::os::unix::fs::chown(&d, None, Some(0)).unwrap();
        assert_eq!(
            mode_of(&d),
            0o2775,
            "chown of a set-group-ID directory in {}",
            base.display()
        );
        let f = base.join("d/exe");
        std::fs::write(&f, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o6755)).unwrap();
        std::os::unix::fs::chown(&f, Some(65534), Some(65534)).unwrap();
        assert_eq!(
            mode_of(&f),
            0o755,
            "chown of a set-ID file in {}",
            base.display()
        );
    }
    // In a set-group-ID directory, new entries take its group, and new
    // directories its set-group-ID bit, which a chown keeps.
    let mut seen = Vec::new();
    for base in [&mnt, &reference] {
        let s = base.join("s");
        std::fs::create_dir(&s).unwrap();
        std::os::unix::fs::chown(&s, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o2775)).unwrap();
        std::fs::create_dir(s.join("sub")).unwrap();
        std::fs::write(s.join("file"), b"f").unwrap();
        std::os::unix::fs::symlink("file", s.join("link")).unwrap();
        run_ok(Command::new("mkfifo").arg(s.join("fifo")));
        std::os::unix::fs::chown(s.join("sub"), Some(1), Some(1)).unwrap();
        let look = |n: &str| {
            let m = std::fs::symlink_metadata(s.join(n)).unwrap();
            (n.to_string(), m.gid(), m.mode() & 0o7777)
        };
        let got: Vec<_> = ["sub", "file", "link", "fifo"]
            .iter()
            .map(|n| look(n))
            .collect();
        assert_eq!(
            got[0],
            ("sub".to_string(), 1, 0o2755),
            "in {}",
            base.display()
        );
        assert_eq!(got[1].1, 65534, "in {}", base.display());
        seen.push(got);
    }
    assert_eq!(
        seen[0], seen[1],
        "the mount differs from a local filesystem"
    );
    // (The trees' comparison reads every file: no fifo.)
    std::fs::remove_file(mnt.join("s/fifo")).unwrap();
    a.ok(&["share", "wait", "app", "--timeout", "60s"]);
    assert_trees_equal(&data_dir(&a, "app"), &data_dir(&b, "app"));
}
