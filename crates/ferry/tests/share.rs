//! Shares: a sync share's FUSE mount driven by real programs (sqlite3, git,
//! tar, fio with verification, rsync), its replica compared entry by entry
//! (content, type, mode, owner, mtime, link count), and a replica outage that
//! resyncs only the files changed meanwhile.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::agent::{two_agents, wait_until, Agent};
use common::{require, run_ok, Mount};

/// The share's mount point on `a`; lazily unmounted when dropped (also when
/// a test fails or the agent was killed).
fn mount_point(root: &Path) -> (PathBuf, Mount) {
    let p = root.join("mnt");
    std::fs::create_dir_all(&p).unwrap();
    (p.clone(), Mount(p))
}

fn share_status(a: &Agent, name: &str) -> serde_json::Value {
    a.json(&["share", "status", name])
}

fn data_dir(agent: &Agent, share: &str) -> PathBuf {
    agent.dir.join("shares").join(share).join("data")
}

/// Every entry's type, mode, owner, size, link count and mtime (ns), and
/// the content of every file: equal on both sides.
fn assert_trees_equal(a: &Path, b: &Path) {
    let listing = |d: &Path| {
        run_ok(
            Command::new("find")
                .arg(".")
                .args(["-printf", "%p %y %m %U %G %s %n %T@\\n"])
                .current_dir(d),
        )
        .lines()
        .map(|l| {
            // Directory sizes are the filesystem's business, not content.
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() >= 8 && f[f.len() - 7] == "d" {
                let n = f.len();
                format!(
                    "{} d {} {} {} - {}",
                    f[..n - 7].join(" "),
                    f[n - 6],
                    f[n - 5],
                    f[n - 4],
                    f[n - 1]
                )
            } else {
                l.to_string()
            }
        })
        .collect::<std::collections::BTreeSet<String>>()
    };
    let (la, lb) = (listing(a), listing(b));
    let only_a: Vec<_> = la.difference(&lb).take(10).collect();
    let only_b: Vec<_> = lb.difference(&la).take(10).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty(),
        "trees differ:\nprimary only: {only_a:#?}\nreplica only: {only_b:#?}"
    );
    let out = Command::new("diff")
        .args(["-r", "--no-dereference", "-q"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "content differs: {}",
        String::from_utf8_lossy(&out.stdout)
    );
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

    // rsync onto the mount: hard links, symlinks, times, modes.
    sh(&mnt, "rsync -aH /usr/share/zoneinfo/ zi/");

    // Awkward names: a newline, invalid UTF-8, 255 bytes; a rename over an
    // open file; a file removed while open.
    sh(
        &mnt,
        "printf a > $'new\\nline' && printf b > $'\\xff\\xfe' && printf c > $(printf 'n%.0s' $(seq 255)) \
         && exec 3<>victim && echo old >&3 && echo new > repl && mv repl victim && echo more >&3 \
         && exec 4<>gone && rm gone && echo late >&4 && exec 3>&- 4>&-",
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
}

#[test]
fn replica_outage_resyncs_only_the_changed_files() {
    let (root, a, mut b) = two_agents("ferry-share-", "");
    let (mnt, _m) = mount_point(root.path());
    a.ok(&[
        "share",
        "create",
        "app",
        "--path",
        mnt.to_str().unwrap(),
        "--to",
        "b",
    ]);
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
