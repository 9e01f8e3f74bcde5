//! The NBD export driven by real clients: qemu-io, qemu-img, nbdinfo, nbdcopy,
//! nbdsh and fio. Each test starts `ferry export` on its default listener, a
//! Unix socket in the data dir's private `run/` (TLS over TCP: nbd_tls.rs).

mod common;

use std::process::Command;

use common::*;

#[test]
fn qemu_io_patterns_discard_zero_flush_and_aio() {
    let node = Node::new();
    node.create("vol", "64MiB");
    let exp = node.export("vol", &[]);
    let uri = exp.uri();
    qemu_io(
        uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 1M 512",
            "write -P 0x11 67108352 512", // the last sector
            "read -P 0xab 0 1M",
            "read -P 0xcd 1M 512",
            "read -P 0x11 67108352 512",
            "write -P 0x55 4M 1M",
            "write -z 4M 256k",
            "read -P 0 4M 256k",
            "read -P 0x55 4456448 786432",
            "write -P 0x66 8M 1M",
            "discard 8M 1M",
            "write -P 0x77 9M 64k",
            "write -f -P 0x78 10M 64k", // FUA
            "flush",
            "read -P 0x77 9M 64k",
            "read -P 0x78 10M 64k",
        ],
    );
    // Many requests in flight at once, then verified.
    let mut cmds: Vec<String> = (0..64)
        .map(|i| {
            format!(
                "aio_write -P {} {} 64k",
                i + 1,
                16 * 1024 * 1024 + i * 65536
            )
        })
        .collect();
    cmds.push("aio_flush".into());
    for i in 0..64 {
        cmds.push(format!(
            "aio_read -P {} {} 64k",
            i + 1,
            16 * 1024 * 1024 + i * 65536
        ));
    }
    cmds.push("aio_flush".into());
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(uri, &refs);
    // A new connection sees everything (and so does the image file itself).
    qemu_io(uri, &["read -P 64 20905984 64k"]);
    drop(exp);
    let image = std::fs::read(node.image("vol")).unwrap();
    assert!(image[..1 << 20].iter().all(|&b| b == 0xab));
    assert!(image[4 << 20..(4 << 20) + 262144].iter().all(|&b| b == 0));
}

#[test]
fn qemu_io_over_unix_socket() {
    let node = Node::new();
    node.create("vol", "8MiB");
    // A socket in a directory other users may enter is refused.
    let open_dir = node.data_dir().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = node.run(&[
        "export",
        "vol",
        "--listen",
        &format!("unix:{}/nbd.sock", open_dir.display()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("other users could connect"));
    // A missing directory is made 0700.
    let sock = node.data_dir().join("sockets").join("nbd.sock");
    let listen = format!("unix:{}", sock.display());
    let exp = node.export("vol", &["--listen", &listen]);
    let mode = std::fs::metadata(sock.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    assert!(
        exp.uri().starts_with("nbd+unix:///vol?socket="),
        "{}",
        exp.uri()
    );
    qemu_io(exp.uri(), &["write -P 0x42 0 64k", "read -P 0x42 0 64k"]);
    let (status, _) = exp.terminate();
    assert!(status.success());
    assert!(!sock.exists(), "the socket file is removed on shutdown");
}

/// Writes `img` with data in some regions and holes elsewhere.
fn sparse_source(path: &std::path::Path, size: u64) -> Vec<(u64, usize)> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let regions = vec![
        (0u64, 1 << 20),
        (5 << 20, 123 * 4096),
        (20 << 20, 3 << 20),
        (size - 65536, 65536),
    ];
    for (i, (off, len)) in regions.iter().enumerate() {
        f.write_all_at(&pattern(i as u64 + 7, *len), *off).unwrap();
    }
    f.sync_all().unwrap();
    regions
}

#[test]
fn qemu_img_convert_in_and_out_and_compare() {
    let node = Node::new();
    node.create("vol", "32MiB");
    let src = node.data_dir().join("src.raw");
    sparse_source(&src, 32 << 20);
    let exp = node.export("vol", &[]);
    let qemu_img = require("qemu-img");
    run_ok(
        Command::new(&qemu_img)
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(exp.uri()),
    );
    run_ok(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(exp.uri()),
    );
    let out = node.data_dir().join("out.qcow2");
    run_ok(
        Command::new(&qemu_img)
            .args(["convert", "-f", "raw", "-O", "qcow2", exp.uri()])
            .arg(&out),
    );
    run_ok(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&src)
            .arg(&out),
    );
    // A changed byte is noticed: the comparison can fail.
    qemu_io(exp.uri(), &["write -P 0x01 30M 512"]);
    let diff = Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(exp.uri())
        .output()
        .unwrap();
    assert_eq!(
        diff.status.code(),
        Some(1),
        "qemu-img compare must see the difference"
    );
}

#[test]
fn nbdinfo_reports_size_flags_and_real_holes() {
    let node = Node::new();
    node.create("vol", "16MiB");
    let exp = node.export("vol", &[]);
    qemu_io(exp.uri(), &["write -P 1 1M 64k", "write -P 2 8M 2M"]);
    let info = run_ok(debian_tool("nbdinfo").args(["--json", exp.uri()]));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 16 << 20);
    assert_eq!(e["export-name"], "vol");
    for flag in [
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
        "can_cache",
        "can_fast_zero",
    ] {
        assert_eq!(e[flag], true, "{flag} in {info}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert!(info.contains("base:allocation"));

    let map = run_ok(debian_tool("nbdinfo").args(["--map", "--json", exp.uri()]));
    let extents: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let data: Vec<(u64, u64)> = extents
        .iter()
        .filter(|x| x["type"].as_u64() == Some(0))
        .map(|x| (x["offset"].as_u64().unwrap(), x["length"].as_u64().unwrap()))
        .collect();
    // The data runs are exactly what was written (ext4/tmpfs allocate 4 KiB blocks).
    assert_eq!(data, vec![(1 << 20, 65536), (8 << 20, 2 << 20)], "{map}");
    let total: u64 = extents.iter().map(|x| x["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 16 << 20);
    // The file agrees: the holes are real holes.
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(node.image("vol")).unwrap().blocks() * 512;
    assert_eq!(blocks, 65536 + (2 << 20));
}

#[test]
fn nbdcopy_multi_connection_in_and_out() {
    let node = Node::new();
    node.create("vol", "48MiB");
    let src = node.data_dir().join("src.raw");
    sparse_source(&src, 48 << 20);
    let exp = node.export("vol", &[]);
    run_ok(
        debian_tool("nbdcopy")
            .args(["--connections=4", "--requests=16", "--flush"])
            .arg(&src)
            .arg(exp.uri()),
    );
    let out = node.data_dir().join("out.raw");
    run_ok(
        debian_tool("nbdcopy")
            .args(["--connections=4", "--requests=16", exp.uri()])
            .arg(&out),
    );
    let a = std::fs::read(&src).unwrap();
    let b = std::fs::read(&out).unwrap();
    assert!(a == b, "nbdcopy round trip differs");
    run_ok(Command::new("cmp").arg(&src).arg(node.image("vol")));
}

#[test]
fn nbdsh_unknown_options_and_out_of_range_requests() {
    let node = Node::new();
    node.create("vol", "4MiB");
    node.create("ro", "1MiB");
    let exp = node.export("vol", &[]);
    let ro = node.export("ro", &["--read-only"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/nbdsh_errors.py");
    let out = run_ok(
        debian_tool("nbdsh")
            .env("FERRY_URI", exp.uri())
            .env("FERRY_RO_URI", ro.uri())
            .env("FERRY_ADDR", exp.addr())
            .args(["-c", &format!("exec(open({script:?}).read())")]),
    );
    assert!(out.contains("nbdsh checks passed"), "{out}");
}

#[test]
fn fio_randwrite_with_crc32c_verify() {
    let node = Node::new();
    node.create("vol", "64MiB");
    let exp = node.export("vol", &[]);
    let out = run_ok(Command::new(require("fio")).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", exp.uri()),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=32M",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--verify_fatal=1",
        "--do_verify=1",
        "--output-format=json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(v["jobs"][0]["error"], 0, "{out}");
    assert_eq!(v["jobs"][0]["write"]["io_bytes"], 32 << 20);
    assert_eq!(
        v["jobs"][0]["read"]["io_bytes"],
        32 << 20,
        "fio verified by reading everything back"
    );
}
