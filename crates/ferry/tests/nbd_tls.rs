//! Who may use an NBD export (issue 17, finding 6), tested with the real
//! clients: over TCP only with TLS and a client certificate of the node's
//! NBD CA (`ferry nbd client-cert`) — nbdinfo and nbdcopy with `nbds://`
//! URIs, qemu-io and qemu-img with `tls-creds-x509` and `tls-hostname` — and
//! nothing, not even the list of exports, without one; by default the export
//! is a Unix socket in a directory only its owner may enter, which an
//! unprivileged local user (uid 65534) cannot reach, and no NBD port is open.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::agent::{free_port, Agent};
use common::raw::Raw;
use common::*;

const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;

/// `ferry nbd client-cert NAME --out DIR` on the data dir `data`.
fn client_cert(data: &Path, name: &str, out: &Path) {
    let o = Command::new(ferry_bin())
        .env("FERRY_DATA_DIR", data)
        .env("FERRY_LOG", "warn")
        .args(["--json", "nbd", "client-cert", name, "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "client-cert: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["name"], name);
    use std::os::unix::fs::PermissionsExt;
    let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("client-key.pem"), 0o600);
    assert!(out.join("ca-cert.pem").exists() && out.join("client-cert.pem").exists());
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// qemu-io through `tls-creds-x509` with the certificates in `dir`.
fn qemu_io_tls(dir: &Path, addr: &str, export: &str, hostname: &str, cmds: &[&str]) -> Output {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut c = Command::new(require("qemu-io"));
    c.arg("--object").arg(format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        dir.display()
    ));
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg("--image-opts").arg(format!(
        "driver=nbd,host={host},port={port},export={export},tls-creds=tls0,tls-hostname={hostname}"
    ));
    output(&mut c)
}

fn nbds(addr: &str, export: &str, certs: &Path) -> String {
    format!(
        "nbds://{addr}/{export}?tls-certificates={}",
        certs.display()
    )
}

/// A client directory with our CA (so the client trusts the server) but a
/// certificate and key issued by another CA; `both_cas` also puts the other
/// CA in ca-cert.pem (QEMU checks its own certificate against it first).
fn foreign_client(root: &Path, ours: &Path, both_cas: bool) -> PathBuf {
    let other_data = root.join("other-node");
    let dir = root.join(if both_cas { "foreign-qemu" } else { "foreign" });
    client_cert(&other_data, "intruder", &dir);
    let mut ca = std::fs::read_to_string(ours.join("ca-cert.pem")).unwrap();
    if both_cas {
        ca.push_str(&std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap());
    }
    std::fs::write(dir.join("ca-cert.pem"), ca).unwrap();
    dir
}

#[test]
fn tls_export_serves_nbdinfo_nbdcopy_qemu_io_and_qemu_img_with_a_client_certificate() {
    let node = Node::new();
    node.create("vol", "32MiB");
    let certs = node.data_dir().join("client");
    client_cert(node.data_dir(), "tester", &certs);
    let exp = node.export("vol", &["--listen", "127.0.0.1:0"]);
    assert!(exp.uri().starts_with("nbds://127.0.0.1:"), "{}", exp.uri());
    let addr = exp.addr();

    // nbdinfo: the list and the export, over TLS.
    let list = run_ok(debian_tool("nbdinfo").args(["--list", "--json", &nbds(&addr, "", &certs)]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v["exports"][0]["export-name"], "vol", "{list}");
    assert_eq!(v["TLS"], true, "{list}");

    // nbdcopy in and out with four connections.
    let src = node.data_dir().join("src.raw");
    std::fs::write(&src, pattern(5, 32 << 20)).unwrap();
    run_ok(
        debian_tool("nbdcopy")
            .args(["--connections=4", "--requests=16", "--flush"])
            .arg(&src)
            .arg(nbds(&addr, "vol", &certs)),
    );
    let out = node.data_dir().join("out.raw");
    run_ok(
        debian_tool("nbdcopy")
            .args(["--connections=4"])
            .arg(nbds(&addr, "vol", &certs))
            .arg(&out),
    );
    run_ok(Command::new("cmp").arg(&src).arg(&out));

    // qemu-io with tls-creds and tls-hostname (the name is checked against
    // the server certificate: 127.0.0.1 is in it, another name is not).
    let o = qemu_io_tls(
        &certs,
        &addr,
        "vol",
        "127.0.0.1",
        &["write -P 0x5c 1M 64k", "read -P 0x5c 1M 64k", "flush"],
    );
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("read 65536/65536"),
        "{}",
        text(&o)
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("verification failed"));
    let o = qemu_io_tls(&certs, &addr, "vol", "not-this-server", &["read 0 4k"]);
    assert!(
        !o.status.success(),
        "a wrong tls-hostname was accepted: {}",
        text(&o)
    );

    // qemu-img reads it through the same credentials.
    let (host, port) = addr.rsplit_once(':').unwrap();
    let converted = node.data_dir().join("converted.raw");
    run_ok(
        Command::new(require("qemu-img"))
            .args(["convert", "-O", "raw", "--object"])
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                certs.display()
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,host={host},port={port},export=vol,tls-creds=tls0,tls-hostname=127.0.0.1"
            ))
            .arg(&converted),
    );
    let img = std::fs::read(&converted).unwrap();
    assert!(img[(1 << 20)..(1 << 20) + 65536].iter().all(|&b| b == 0x5c));
    assert!(img[..1 << 20] == std::fs::read(&src).unwrap()[..1 << 20]);
}

#[test]
fn tls_export_tells_nothing_without_tls_and_refuses_missing_or_foreign_certificates() {
    let node = Node::new();
    node.create("vol", "4MiB");
    let certs = node.data_dir().join("client");
    client_cert(node.data_dir(), "tester", &certs);
    let exp = node.export("vol", &["--listen", "127.0.0.1:0"]);
    let addr = exp.addr();

    // Plain TCP: LIST (and everything else) gets NBD_REP_ERR_TLS_REQD.
    let mut r = Raw::connect(&addr);
    r.greeting();
    std::io::Write::write_all(&mut r.s, &3u32.to_be_bytes()).unwrap();
    for opt in [3u32, 6, 7, 8] {
        let data = if opt == 6 || opt == 7 {
            let mut d = 3u32.to_be_bytes().to_vec();
            d.extend_from_slice(b"vol\0\0");
            d
        } else {
            vec![]
        };
        r.send_option(opt, &data);
        let (o, kind, msg) = r.option_reply();
        assert_eq!((o, kind), (opt, REP_ERR_TLS_REQD), "option {opt}");
        assert!(!msg.windows(3).any(|w| w == b"vol"));
    }
    // nbdinfo --list over plain TCP lists nothing, and says why.
    let o = output(
        debian_tool("nbdinfo")
            .env("LIBNBD_DEBUG", "1")
            .args(["--list", &format!("nbd://{addr}/")]),
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("vol"),
        "{}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("requires TLS"),
        "{}",
        text(&o)
    );

    // TLS without a client certificate (only the CA, to trust the server).
    let no_cert = node.data_dir().join("no-cert");
    std::fs::create_dir(&no_cert).unwrap();
    std::fs::copy(certs.join("ca-cert.pem"), no_cert.join("ca-cert.pem")).unwrap();
    let o = output(debian_tool("nbdinfo").args(["--list", &nbds(&addr, "", &no_cert)]));
    assert!(!o.status.success(), "no client certificate: {}", text(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("vol"));

    // A certificate of another node's CA: nbdinfo and qemu-io are refused.
    let foreign = foreign_client(node.data_dir(), &certs, false);
    let o = output(debian_tool("nbdinfo").args(["--list", &nbds(&addr, "", &foreign)]));
    assert!(
        !o.status.success(),
        "another CA's certificate: {}",
        text(&o)
    );
    let foreign = foreign_client(node.data_dir(), &certs, true);
    let o = qemu_io_tls(&foreign, &addr, "vol", "127.0.0.1", &["write -P 1 0 4k"]);
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("wrote 4096/4096"),
        "qemu-io with another CA's certificate wrote: {}",
        text(&o)
    );
    // Nothing written, and the rightful client still gets in.
    let o = qemu_io_tls(&certs, &addr, "vol", "127.0.0.1", &["read -P 0 0 4k"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("read 4096/4096"),
        "{}",
        text(&o)
    );
    let (status, stderr) = exp.terminate();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("TLS handshake"),
        "refusals are logged: {stderr}"
    );
}

/// The TCP ports process `pid` listens on.
fn tcp_ports_of(pid: u32) -> Vec<String> {
    let out = run_ok(Command::new(require("ss")).args(["-ltnpH"]));
    out.lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect()
}

/// Runs `nbdinfo ARGS` as uid/gid 65534 with no groups, for 5 s at most
/// (a server that is not NBD may wait for the client forever).
fn nbdinfo_as_nobody(args: &[&str]) -> Output {
    let mut c = Command::new(require("timeout"));
    c.args([
        "5",
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        "/usr/bin/nbdinfo",
    ])
    .args(args)
    .env("PATH", "/usr/bin:/bin");
    output(&mut c)
}

#[test]
fn the_agent_serves_nbd_on_a_private_unix_socket_and_on_tcp_only_with_tls() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::Builder::new()
        .prefix("ferry-nbd-sec-")
        .tempdir()
        .unwrap();
    // Directories others may traverse, and an agent started with umask 000:
    // only the socket directory ferry makes may keep other users out.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let umask0 = ["sh", "-c", "umask 000; exec \"$0\" \"$@\""];
    let mut a = Agent::start_with(root.path(), "a", "", "", &umask0);
    std::fs::set_permissions(&a.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    a.ok(&["volume", "create", "vol", "--size", "4MiB"]);

    let sock = a.dir.join("run").join("nbd.sock");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&a.dir.join("run")), 0o700, "the socket's directory");
    assert_eq!(mode(&sock), 0o600, "the socket");
    let node = a.json(&["node", "show"]);
    let unix = format!("nbd+unix:///?socket={}", sock.display());
    assert_eq!(node["nbd"], unix.as_str(), "{node}");
    assert!(
        node["nbd_tls"].is_null(),
        "no TCP listener unless configured: {node}"
    );

    // Root (the agent's user) reaches the volume through the URI it reports.
    let info = run_ok(debian_tool("nbdinfo").args(["--list", "--json", &unix]));
    assert!(info.contains("\"vol\""), "{info}");
    // An unprivileged user reaches nothing: not the socket, and no TCP port
    // of the agent speaks NBD to it.
    let o = nbdinfo_as_nobody(&["--list", &unix]);
    assert!(
        !o.status.success(),
        "uid 65534 listed the exports: {}",
        text(&o)
    );
    let ports = tcp_ports_of(a.pid());
    assert_eq!(ports.len(), 2, "API and replication only: {ports:?}");
    for p in &ports {
        let o = nbdinfo_as_nobody(&["--list", &format!("nbd://{p}/")]);
        assert!(
            !o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("vol"),
            "uid 65534 listed exports on {p}: {}",
            text(&o)
        );
    }

    // With nbd_listen: TCP, TLS with a certificate of the node's CA required.
    let port = free_port();
    let cfg = std::fs::read_to_string(&a.config).unwrap().replacen(
        "replication_listen",
        &format!("nbd_listen = \"127.0.0.1:{port}\"\nreplication_listen"),
        1,
    );
    std::fs::write(&a.config, cfg).unwrap();
    a.stop();
    a.spawn();
    let certs = root.path().join("client");
    client_cert(&a.dir, "tester", &certs);
    let node = a.json(&["node", "show"]);
    let tls_uri = format!("nbds://127.0.0.1:{port}/");
    assert_eq!(node["nbd_tls"], tls_uri.as_str(), "{node}");
    let listed = run_ok(debian_tool("nbdinfo").args([
        "--list",
        &format!("{tls_uri}?tls-certificates={}", certs.display()),
    ]));
    assert!(listed.contains("vol"), "{listed}");
    let o = nbdinfo_as_nobody(&["--list", &format!("nbd://127.0.0.1:{port}/")]);
    assert!(!o.status.success(), "{}", text(&o));
    let o = qemu_io_tls(
        &certs,
        &format!("127.0.0.1:{port}"),
        "vol",
        "a",
        &["write -P 7 0 64k"],
    );
    assert!(
        o.status.success(),
        "tls-hostname = the node's name: {}",
        text(&o)
    );
    qemu_io(&a.uri("vol"), &["read -P 7 0 64k"]);
}

#[test]
fn idle_connection_floods_on_both_nbd_listeners_do_not_lock_clients_out() {
    let root = tempfile::Builder::new()
        .prefix("ferry-nbd-flood-")
        .tempdir()
        .unwrap();
    let port = free_port();
    let a = Agent::start_with(
        root.path(),
        "a",
        &format!("nbd_listen = \"127.0.0.1:{port}\""),
        "",
        &[],
    );
    a.ok(&["volume", "create", "vol", "--size", "4MiB"]);
    let certs = root.path().join("client");
    client_cert(&a.dir, "tester", &certs);
    let sock = a.dir.join("run").join("nbd.sock");
    // 2,000 idle connections to each listener (64 slots): nobody says a word.
    let tcp: Vec<std::net::TcpStream> = (0..2000)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let unix: Vec<std::os::unix::net::UnixStream> = (0..2000)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap())
        .collect();
    // The flood is there before the clients come (each newcomer closes the
    // oldest silent connection, so a client connecting while the agent is
    // still accepting the flood's backlog would be closed by the flood's
    // later connections): wait until both accept queues are empty.
    let queued = |args: &[&str]| -> u64 {
        let out = Command::new("ss").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(if args[0] == "-Hlx" { 2 } else { 1 })
            .and_then(|q| q.parse().ok())
            .unwrap_or(u64::MAX)
    };
    let tcp_q = ["-Hltn".to_string(), format!("sport = :{port}")];
    let unix_q = ["-Hlx".to_string(), "src".into(), sock.display().to_string()];
    let drained = std::time::Instant::now();
    while queued(&tcp_q.iter().map(String::as_str).collect::<Vec<_>>()) > 0
        || queued(&unix_q.iter().map(String::as_str).collect::<Vec<_>>()) > 0
    {
        assert!(
            drained.elapsed() < std::time::Duration::from_secs(30),
            "the agent did not accept the flood within 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Clients still get in at once, over TLS and over the socket.
    let t = std::time::Instant::now();
    let o = qemu_io_tls(
        &certs,
        &format!("127.0.0.1:{port}"),
        "vol",
        "127.0.0.1",
        &["write -P 9 0 64k"],
    );
    assert!(o.status.success(), "{}", text(&o));
    qemu_io(&a.uri("vol"), &["read -P 9 0 64k"]);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "clients waited {:?} behind the flood",
        t.elapsed()
    );
    // The agent holds no more than its slots (plus a few closing).
    let fds = std::fs::read_dir(format!("/proc/{}/fd", a.pid()))
        .unwrap()
        .count();
    assert!(fds < 400, "the agent holds {fds} descriptors");
    drop((tcp, unix));
}
