//! The `ferry` command line as operators (and acceptance checks) type it:
//! spellings, `--json`, exit codes 0/1/2, and the data-dir rules.

mod common;

use common::*;

#[test]
fn volume_create_and_list_human_and_json() {
    let node = Node::new();
    let out = node.ok(&["volume", "create", "disk0", "--size", "10GiB"]);
    assert!(out.contains("created volume disk0 (10 GiB)"), "{out}");
    node.ok(&["volume", "create", "disk1", "--size", "512MiB"]);
    let table = node.ok(&["volume", "list"]);
    assert!(
        table.contains("disk0") && table.contains("10 GiB") && table.contains("512 MiB"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&node.ok(&["volume", "list", "--json"])).unwrap();
    let vols = json.as_array().unwrap();
    assert_eq!(vols.len(), 2);
    assert_eq!(vols[0]["name"], "disk0");
    assert_eq!(vols[0]["size_bytes"], 10u64 << 30);
    assert_eq!(vols[0]["allocated_bytes"], 0, "a new volume is sparse");
    assert_eq!(vols[0]["exported"], false);
    assert_eq!(vols[0]["id"].as_str().unwrap().len(), 32);
    // The image really is sparse on disk.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(node.image("disk0")).unwrap();
    assert_eq!(meta.len(), 10 << 30);
    assert_eq!(meta.blocks(), 0);
}

#[test]
fn exit_codes_and_clear_errors() {
    let node = Node::new();
    // Usage errors: 2.
    assert_eq!(node.run(&["volume", "create", "x"]).status.code(), Some(2));
    assert_eq!(
        node.run(&["volume", "create", "x", "--size", "ten"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(node.run(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        node.run(&["export"]).status.code(),
        Some(2),
        "the volume is required"
    );
    assert_eq!(
        node.run(&["export", "x", "--listen", "nowhere"])
            .status
            .code(),
        Some(2)
    );
    // Failures: 1, with a message that says what to do.
    let out = node.run(&["volume", "show", "missing"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no volume named \"missing\"") && err.contains("ferry volume list"),
        "{err}"
    );
    let out = node.run(&["volume", "create", "../evil", "--size", "1MiB"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid name"));
    let out = node.run(&["volume", "create", "odd", "--size", "1000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 512"));
    node.create("dup", "1MiB");
    let out = node.run(&["--json", "volume", "create", "dup", "--size", "1MiB"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("already exists"));
    // Help and version are not errors.
    assert_eq!(node.run(&["--help"]).status.code(), Some(0));
    assert_eq!(node.run(&["--version"]).status.code(), Some(0));
}

#[test]
fn data_dir_from_flag_or_environment() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env_dir: &std::path::Path| {
        std::process::Command::new(ferry_bin())
            .env("FERRY_DATA_DIR", env_dir)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(
        run(&["volume", "create", "in-env", "--size", "1MiB"], a.path())
            .status
            .success()
    );
    let flag = b.path().to_str().unwrap();
    assert!(run(
        &[
            "--data-dir",
            flag,
            "volume",
            "create",
            "in-flag",
            "--size",
            "1MiB"
        ],
        a.path()
    )
    .status
    .success());
    assert!(a.path().join("volumes/in-env/data.raw").exists());
    assert!(b.path().join("volumes/in-flag/data.raw").exists());
    assert!(!a.path().join("volumes/in-flag").exists());
}

#[test]
fn export_prints_uri_refuses_resize_while_serving_and_stops_cleanly() {
    let node = Node::new();
    node.create("vol", "4MiB");
    // Human output: the URI on its own line.
    let mut child = node
        .cmd()
        .args(["export", "vol"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let first = lines.next().unwrap().unwrap();
    let uri = lines.next().unwrap().unwrap();
    assert!(first.contains("exporting volume vol (4 MiB)"), "{first}");
    assert_eq!(
        uri,
        format!(
            "nbd+unix:///vol?socket={}",
            node.data_dir().join("run/vol.sock").display()
        )
    );
    qemu_io(&uri, &["write -P 3 0 64k"]);
    let _ = child.kill();
    let _ = child.wait();

    let exp = node.export("vol", &[]);
    let out = node.run(&["volume", "resize", "vol", "--size", "8MiB"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use") && err.contains(&exp.pid().to_string()),
        "{err}"
    );
    let out = node.run(&["volume", "delete", "vol", "--yes"]);
    assert_eq!(out.status.code(), Some(1), "delete refused while exported");
    // A second export of the same volume is refused too.
    assert_eq!(node.run(&["export", "vol"]).status.code(), Some(1));
    let listed: serde_json::Value =
        serde_json::from_str(&node.ok(&["--json", "volume", "list"])).unwrap();
    assert_eq!(listed[0]["exported"], true);

    let (status, stderr) = exp.terminate();
    assert!(
        status.success(),
        "SIGTERM must end the export cleanly: {stderr}"
    );
    // Lock released: resize works now, and the data survived.
    node.ok(&["volume", "resize", "vol", "--size", "8MiB"]);
    let out = node.run(&["volume", "resize", "vol", "--size", "4MiB"]);
    assert_eq!(out.status.code(), Some(1), "shrinking needs --shrink");
    let exp = node.export("vol", &[]);
    assert_eq!(exp.size, 8 << 20);
    qemu_io(exp.uri(), &["read -P 3 0 64k", "read -P 0 4M 4M"]);
}

#[test]
fn demo_migrates_a_written_volume_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(ferry_bin())
        .env("TMPDIR", tmp.path())
        .env("FERRY_LOG", "warn")
        .args(["--json", "demo", "--size", "32MiB"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["records_missing_or_wrong"], 0, "{v}");
    assert!(v["slots_checked"].as_u64().unwrap() > 10, "{v}");
    assert_eq!(v["role_a"], "secondary", "{v}");
    assert_eq!(v["role_b"], "primary", "{v}");
    assert!(v["downtime_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "demo data removed"
    );
}
