//! The web console in a real browser: two agents under HA with a witness,
//! each in its own network namespace (as in tests/cluster.rs), and
//! Debian's headless Chromium driven by Playwright's Python client from a
//! fourth namespace (tests/console/console_test.py): login with an admin
//! token, the overview's nodes and workloads, a switchover from the
//! Cluster view (checked here with the CLI), a viewer's pages without a
//! state-changing button and its POSTs refused, the CSP and the cookie's
//! flags, logout, a revoked token's session and event stream ending, and
//! a failover (the serving agent killed) shown live on an open Cluster view.
//! axe-core (npm) checks each view; screenshots go to
//! target/console-screenshots/ (their paths are printed).

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ferry_bin, require};
use serde_json::Value;

const VENV_PYTHON: &str = "/opt/ferry-venv/bin/python";
const AXE: &str = "/opt/ferry-node/node_modules/axe-core/axe.min.js";

/// Chromium, the Python venv with Playwright and axe-core
/// (scripts/install-deps installs them).
fn require_browser() {
    require("chromium");
    for need in [VENV_PYTHON, AXE] {
        assert!(
            std::path::Path::new(need).exists(),
            "{need} missing: run scripts/install-deps"
        );
    }
}

fn addr_of(node: &str) -> &'static str {
    match node {
        "a" => "198.18.0.1",
        "b" => "198.18.0.2",
        "w" => "198.18.0.3",
        _ => "198.18.0.4",
    }
}

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap()
}

fn sh_ok(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces `TAG-br` (a bridge), `TAG-a`, `TAG-b`, `TAG-w`, `TAG-c` and
/// the processes started in them; all removed on drop, failed or not.
struct Net {
    tag: String,
    root: tempfile::TempDir,
    children: Vec<Child>,
}

impl Net {
    fn new() -> Net {
        require("ip");
        let net = Net {
            tag: format!("fc{}", std::process::id()),
            root: tempfile::Builder::new()
                .prefix("ferry-console")
                .tempdir()
                .unwrap(),
            children: Vec::new(),
        };
        let br = net.ns("br");
        sh_ok(&["ip", "netns", "add", &br]);
        sh_ok(&["ip", "-n", &br, "link", "add", "br0", "type", "bridge"]);
        sh_ok(&["ip", "-n", &br, "link", "set", "br0", "up"]);
        for n in ["a", "b", "w", "c"] {
            let ns = net.ns(n);
            sh_ok(&["ip", "netns", "add", &ns]);
            let (host, inner) = (format!("p{n}"), format!("e{n}"));
            sh_ok(&[
                "ip", "-n", &br, "link", "add", &host, "type", "veth", "peer", "name", &inner,
            ]);
            sh_ok(&["ip", "-n", &br, "link", "set", &inner, "netns", &ns]);
            sh_ok(&["ip", "-n", &br, "link", "set", &host, "master", "br0", "up"]);
            sh_ok(&["ip", "-n", &ns, "link", "set", &inner, "name", "eth0"]);
            let addr = format!("{}/24", addr_of(n));
            sh_ok(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            sh_ok(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            sh_ok(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.tag)
    }

    fn dir(&self, n: &str) -> PathBuf {
        self.root.path().join(n)
    }

    fn cmd(&self, n: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(n), program]);
        c
    }

    /// Starts a process and waits for its first line on stdout.
    fn spawn(&mut self, mut c: Command, log: &str, want: &str) {
        let log = std::fs::File::create(self.root.path().join(log)).unwrap();
        let mut child = c
            .env("FERRY_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains(want), "did not start: {line}");
        self.children.push(child);
    }

    fn start_witness(&mut self) {
        let dir = self.dir("w");
        std::fs::create_dir_all(&dir).unwrap();
        let key = self.root.path().join("witness.key");
        std::fs::write(&key, "0123456789abcdef-test-witness-key\n").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let mut c = self.cmd("w", ferry_bin());
        c.args(["witness", "--listen", &format!("{}:7380", addr_of("w"))])
            .arg("--key-file")
            .arg(&key)
            .env("FERRY_DATA_DIR", &dir);
        self.spawn(c, "w.log", "witness");
    }

    fn start_agent(&mut self, n: &str) {
        self.start_agent_with(n, "");
    }

    /// [`Net::start_agent`] with `extra` TOML appended to its config (its
    /// own tables, e.g. `[audit]`).
    fn start_agent_with(&mut self, n: &str, extra: &str) {
        let ip = addr_of(n);
        let peer = if n == "a" { "b" } else { "a" };
        let cluster = format!(
            "\n[cluster]\npeer = \"{peer}\"\nheartbeat = [\"{ip}:7370\"]\nwitness = \"{}:7380\"\nheartbeat_interval_ms = 100\nfailure_timeout_ms = 1000\ncheck_interval_ms = 200\nwitness_key_file = \"{}\"\n{extra}",
            addr_of("w"),
            self.root.path().join("witness.key").display(),
        );
        self.start_agent_config(n, &cluster);
    }

    /// An agent in namespace `n` with its addresses, `extra` TOML appended.
    fn start_agent_config(&mut self, n: &str, extra: &str) {
        let dir = self.dir(n);
        std::fs::create_dir_all(&dir).unwrap();
        let ip = addr_of(n);
        let config = self.root.path().join(format!("{n}.toml"));
        std::fs::write(
            &config,
            format!(
                "node_name = \"{n}\"\ndata_dir = \"{}\"\napi_listen = \"{ip}:7360\"\nreplication_listen = \"{ip}:7361\"\n\n[replication]\nreconnect_backoff_max_ms = 500\n{extra}",
                dir.display(),
            ),
        )
        .unwrap();
        let mut c = self.cmd(n, ferry_bin());
        c.args(["agent", "--config"]).arg(&config);
        self.spawn(c, &format!("{n}.log"), "fingerprint");
    }

    fn log(&self, n: &str) -> String {
        std::fs::read_to_string(self.root.path().join(format!("{n}.log"))).unwrap_or_default()
    }

    fn ferry(&self, n: &str, args: &[&str]) -> std::process::Output {
        let token = std::fs::read_to_string(self.dir(n).join("api.token")).unwrap();
        self.cmd("c", ferry_bin())
            .args(args)
            .env("FERRY_API", format!("{}:7360", addr_of(n)))
            .env("FERRY_TOKEN", token.trim())
            .env("FERRY_DATA_DIR", self.dir(n))
            .env("FERRY_LOG", "warn")
            .output()
            .unwrap()
    }

    fn ok(&self, n: &str, args: &[&str]) -> String {
        let out = self.ferry(n, args);
        assert!(
            out.status.success(),
            "ferry {args:?} on {n} failed: {}\n--- log of {n} ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log(n)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, n: &str, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(n, &a)).unwrap()
    }

    fn status(&self, n: &str, workload: &str) -> Value {
        let v = self.json(n, &["cluster", "status"]);
        v["workloads"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["workload"] == workload).cloned())
            .unwrap_or(Value::Null)
    }

    /// `b` paired with `a`, volume `vol` replicated in sync mode, workload
    /// `web` under HA served by `a`.
    fn ha_workload(&self) {
        self.add_b_at_a();
        self.ok("a", &["volume", "create", "vol", "--size", "4MiB"]);
        self.ok("a", &["workload", "create", "web", "--volume", "vol"]);
        self.ok(
            "a",
            &["replicate", "start", "vol", "--to", "b", "--mode", "sync"],
        );
        self.ok("a", &["replicate", "wait", "vol", "--timeout", "60s"]);
        self.ok("a", &["cluster", "add", "web", "--preferred", "a"]);
        let t0 = Instant::now();
        loop {
            let s = self.status("a", "web");
            if s["primary"] == "a" && s["replicas"][0]["state"] == "up-to-date" {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "web not up: {s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// For the Migrate view's test: plain agents (no `[cluster]`, no
/// witness) in the namespaces, `b` registered at `a`.
impl Net {
    fn start_plain_agent(&mut self, n: &str) {
        self.start_agent_config(n, "");
    }

    /// `b` registered at `a` (`ferry node add`).
    fn add_b_at_a(&self) {
        let token = self.dir("b").join("api.token");
        let fp = self.json("b", &["node", "id"])["fingerprint"]
            .as_str()
            .unwrap()
            .to_string();
        let api_b = format!("{}:7360", addr_of("b"));
        self.ok(
            "a",
            &[
                "node",
                "add",
                "b",
                "--api",
                &api_b,
                "--token-file",
                token.to_str().unwrap(),
                "--fingerprint",
                &fp,
            ],
        );
    }

    /// Volume `name` on node `n`'s NBD Unix socket (reachable from any
    /// namespace: it is a file).
    fn nbd_uri(&self, n: &str, volume: &str) -> String {
        format!(
            "nbd+unix:///{volume}?socket={}",
            self.dir(n).join("run").join("nbd.sock").display()
        )
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in self.children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in ["a", "b", "w", "c", "br"] {
            let ns = self.ns(n);
            let pids = sh(&["ip", "netns", "pids", &ns]);
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill(2) on a process inside a namespace this
                    // test created (only its own processes run there: the
                    // browser and its helpers, if the script failed).
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            let _ = sh(&["ip", "netns", "del", &ns]);
        }
        if std::thread::panicking() {
            for n in ["a", "b", "w"] {
                let log = self.log(n);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!(
                    "--- last lines of {n}.log ---\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }
}

/// Where the screenshots go: target/console-screenshots/.
fn screenshot_dir() -> PathBuf {
    let bin = PathBuf::from(ferry_bin());
    // target/<profile>/ferry → target/
    let target = bin
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_console_logs_in_shows_the_cluster_switches_over_and_honours_roles() {
    require_browser();
    let mut net = Net::new();
    net.start_witness();
    net.start_agent("a");
    net.start_agent("b");
    net.ha_workload();
    let token = |name: &str, role: &str| -> String {
        let out = net.ok("a", &["token", "create", name, "--role", role]);
        out.lines().next().unwrap().trim().to_string()
    };
    let (admin, viewer, doomed) = (
        token("alice", "admin"),
        token("vic", "viewer"),
        token("doomed", "operator"),
    );
    let shots = screenshot_dir();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/console/console_test.py");
    let run = |extra: &[&str]| {
        let out = net
            .cmd("c", VENV_PYTHON)
            .arg(&script)
            .args(["--base", &format!("https://{}:7360", addr_of("a"))])
            .args(["--admin", &admin, "--viewer", &viewer, "--doomed", &doomed])
            .args(["--nodes", "a,b", "--workload", "web", "--switch-to", "b"])
            .arg("--shots")
            .arg(&shots)
            .args(["--axe", AXE])
            .args(extra)
            .env("HOME", net.root.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        println!("{stdout}");
        assert!(
            out.status.success(),
            "the browser script failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[]);
    // The switchover the page asked for, as the CLI sees it.
    let s = net.status("b", "web");
    assert_eq!(s["primary"], "b", "{s}");
    assert_eq!(s["role"], "primary", "{s}");
    // The switchover back that a's console forwarded to b (which served the
    // workload then): in both audit logs under one operation id, alice's
    // on a, node a's on b.
    let switchovers = |n: &str| -> Vec<Value> {
        net.json(n, &["audit", "list"])["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["record"].clone())
            .filter(|r| r["action"] == "ClusterSwitchover" && r["phase"] == "result")
            .collect()
    };
    let (on_a, on_b) = (switchovers("a"), switchovers("b"));
    let forwarded = on_b
        .iter()
        .find(|r| r["who"] == "node a")
        .unwrap_or_else(|| panic!("no switchover from node a on b: {on_b:?}"));
    let mine = on_a
        .iter()
        .find(|r| r["op"] == forwarded["op"])
        .unwrap_or_else(|| panic!("a has no switchover with op {}: {on_a:?}", forwarded["op"]));
    assert_eq!(mine["token"], "alice", "{mine}");
    // b's agent is killed with a's Cluster view open: the page shows a
    // serving again, with the detection and failover times, over SSE.
    let b_pid = net.children[2].id().to_string();
    run(&["--kill-pid", &b_pid, "--failover-to", "a"]);
    let s = net.status("a", "web");
    assert_eq!(s["primary"], "a", "{s}");
    // And as `ferry events` prints it: the first snapshots, one JSON a line.
    let out = net.ok("a", &["--json", "events"]);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let cluster = lines
        .iter()
        .find(|l| l["event"] == "cluster")
        .unwrap_or_else(|| panic!("no cluster snapshot: {out}"));
    assert_eq!(cluster["data"]["workloads"][0]["primary"], "a", "{out}");
    assert!(lines.iter().any(|l| l["event"] == "nodes"), "{out}");
    assert!(lines.iter().any(|l| l["event"] == "migrations"), "{out}");
}

/// The subject of the certificate the agent at `api` serves to a client
/// asking for `sni`.
fn served_subject(api: &str, sni: &str) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", api, "-servername", sni])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_else(|| panic!("no certificate from {api}: {text}"))
        .to_string()
}

/// `[api] tls_cert_file` / `tls_key_file`: browsers (any SNI but
/// `ferry-node`) get the operator's certificate; the CLI, pinned to the
/// node's own, still gets that one; a key others can read is refused.
#[test]
fn an_operator_certificate_is_served_to_browsers_and_a_readable_key_refused() {
    require("openssl");
    let root = tempfile::Builder::new()
        .prefix("ferry-console")
        .tempdir()
        .unwrap();
    let (cert, key) = (root.path().join("cert.pem"), root.path().join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=console.example"])
        .args(["-addext", "subjectAltName=DNS:console.example"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let api_toml = format!(
        "\n[api]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        cert.display(),
        key.display()
    );
    // A key others can read: the agent refuses to start, naming the key.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let refused = common::agent::Agent::configure(root.path(), "r", &api_toml, "", &[]);
    let out = Command::new(ferry_bin())
        .args(["agent", "--config"])
        .arg(&refused.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a readable key: {err}");
    assert!(
        err.contains("api.tls_key_file") && err.contains("chmod 600"),
        "{err}"
    );
    drop(refused);
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let a = common::agent::Agent::start_with(root.path(), "a", &api_toml, "", &[]);
    assert!(
        served_subject(&a.api, "console.example").contains("console.example"),
        "a browser did not get the operator's certificate"
    );
    let node = served_subject(&a.api, "ferry-node");
    assert!(!node.contains("console.example"), "{node}");
    // The CLI pins the node's certificate: it still works.
    a.ok(&["volume", "list"]);
    let (code, body) = common::https(&a.api, "/", None);
    assert_eq!(code, 200);
    assert!(body.contains("ferry console"), "{body}");
}

/// The Migrate view (tests/console/migrate_test.py): volume `vol` of
/// workload `web` on `a`, 48 MiB written, then a writer that keeps
/// writing 4 KiB records; in the browser an operator starts the migration
/// to `b` at 2 MiB/s, watches the progress bar move over SSE, lifts the
/// limit live, sees `ready`, runs and ends a test cutover, schedules a
/// cutover and cancels it, cuts over from the page and reads the downtime
/// in the report on the page and in the printable report (who started,
/// who cut over). Checked here: `b` serves `vol` with every record the
/// writer had acknowledged, and the writer wrote during the migration.
#[test]
fn a_migration_is_started_watched_and_cut_over_from_the_console() {
    require_browser();
    require("qemu-io");
    let mut net = Net::new();
    net.start_plain_agent("a");
    net.start_plain_agent("b");
    net.add_b_at_a();
    net.ok("a", &["volume", "create", "vol", "--size", "64MiB"]);
    let hooks = net.root.path().join("hooks.log");
    let h = hooks.display();
    net.ok(
        "a",
        &[
            "workload",
            "create",
            "web",
            "--volume",
            "vol",
            "--start",
            &format!("echo start $FERRY_NODE $FERRY_ROLE >> {h}"),
            "--stop",
            &format!("echo stop $FERRY_NODE $FERRY_ROLE >> {h}"),
            "--check",
            &format!("[ $FERRY_ROLE = test ] || grep -q 'start b target' {h}"),
        ],
    );
    common::qemu_io(&net.nbd_uri("a", "vol"), &["write -P 0x77 16M 48M"]);
    let writer = common::records::Writer::start(net.nbd_uri("a", "vol"), 0);
    let token = |name: &str, role: &str| -> String {
        let out = net.ok("a", &["token", "create", name, "--role", role]);
        out.lines().next().unwrap().trim().to_string()
    };
    let (operator, viewer) = (token("oscar", "operator"), token("vic", "viewer"));
    let shots = screenshot_dir();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/console/migrate_test.py");
    let before = writer.acked();
    let out = net
        .cmd("c", VENV_PYTHON)
        .arg(&script)
        .args(["--base", &format!("https://{}:7360", addr_of("a"))])
        .args(["--operator", &operator, "--viewer", &viewer])
        .args(["--workload", "web", "--target", "b", "--rate-mib", "2"])
        .arg("--shots")
        .arg(&shots)
        .args(["--axe", AXE])
        .env("HOME", net.root.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    let acked = writer.finish();
    assert!(
        out.status.success(),
        "the browser script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        acked.len() >= before + 20,
        "the writer kept writing during the migration: {before} → {}",
        acked.len()
    );
    // What the page did, as the CLI sees it.
    let st = net.json("a", &["migrate", "status", "web"]);
    assert_eq!(st["phase"], "completed", "{st}");
    assert!(
        st["last_cutover"]["downtime_ms"].as_f64().unwrap() > 0.0,
        "{st}"
    );
    let log = std::fs::read_to_string(&hooks).unwrap();
    // The test instance (started and ended from the page), then the cutover.
    assert!(
        log.starts_with("start b test\n") && log.ends_with("stop a source\nstart b target\n"),
        "{log}"
    );
    // b serves the volume with every acknowledged record and the old data.
    let uri = net.nbd_uri("b", "vol");
    for chunk in acked.chunks(64) {
        let cmds: Vec<String> = chunk
            .iter()
            .map(|i| format!("read -P {} {} 4k", i % 200 + 1, i * 4096))
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        let out = common::qemu_io(&uri, &cmds);
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
    let out = common::qemu_io(&uri, &["read -P 0x77 16M 48M"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// The Configure and Audit views (tests/console/confaudit_test.py): an
/// admin creates a token (secret shown once), revokes one after the
/// confirmation and changes a workload's start hook and time limit — on
/// both nodes, checked here with the CLI; the Audit view shows each with
/// the token's name, and the login, filters narrow it, and the chain
/// verifies; a viewer gets no control and 403s. Then one byte of a's audit
/// log is changed on disk: `ferry audit verify` fails, and so does the
/// Audit view's "Verify now"; the byte back, the chain is rewritten
/// consistently with the Audit view open: "Verify now" shows it rewritten,
/// the peer's and the witness's heads differing from the records.
#[test]
fn the_console_configures_tokens_and_workloads_and_shows_the_audit_log() {
    require_browser();
    let mut net = Net::new();
    net.start_witness();
    // Heads sent every second: the Audit view compares them.
    let audit = "\n[audit]\nhead_interval_ms = 1000\n";
    net.start_agent_with("a", audit);
    net.start_agent_with("b", audit);
    net.ha_workload();
    let token = |name: &str, role: &str| -> String {
        let out = net.ok("a", &["token", "create", name, "--role", role]);
        out.lines().next().unwrap().trim().to_string()
    };
    let (admin, viewer, doomed) = (
        token("alice", "admin"),
        token("vic", "viewer"),
        token("doomed", "operator"),
    );
    let shots = screenshot_dir();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/console/confaudit_test.py");
    let run = |extra: &[&str]| {
        let out = net
            .cmd("c", VENV_PYTHON)
            .arg(&script)
            .args(["--base", &format!("https://{}:7360", addr_of("a"))])
            .args([
                "--admin",
                &admin,
                "--admin-name",
                "alice",
                "--viewer",
                &viewer,
            ])
            .args(["--doomed", &doomed, "--doomed-name", "doomed"])
            .args(["--workload", "web", "--peer", "b"])
            .arg("--shots")
            .arg(&shots)
            .args(["--axe", AXE])
            .args(extra)
            .env("HOME", net.root.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        println!("{stdout}");
        assert!(
            out.status.success(),
            "the browser script failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[]);
    // The workload change the page made, on both nodes.
    for n in ["a", "b"] {
        let w = net.json(n, &["workload", "show", "web"]);
        assert_eq!(w["start"], "/bin/true set-from-console", "{n}: {w}");
        assert_eq!(w["hook_timeout_ms"], 45000, "{n}: {w}");
    }
    // The token the page created is listed; the one it revoked is not.
    let tokens = net.ok("a", &["--json", "token", "list"]);
    assert!(
        tokens.contains("\"carol\"") && !tokens.contains("\"doomed\""),
        "{tokens}"
    );
    // One byte of a's log changed on disk: `ferry audit verify` fails…
    assert!(net.ferry("a", &["audit", "verify"]).status.success());
    let log = net.dir("a").join("audit").join("audit.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let at = bytes
        .windows(5)
        .position(|w| w == b"carol")
        .expect("carol in a's audit log");
    bytes[at] = b'k';
    std::fs::write(&log, &bytes).unwrap();
    let out = net.ferry("a", &["audit", "verify"]);
    assert!(
        !out.status.success(),
        "verify passed after a byte changed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // …and the Audit view shows it.
    run(&["--tampered"]);
    // The byte back; then, with the Audit view open (its login recorded
    // first), the chain rewritten consistently: whole on its own, but the
    // heads the peer and the witness hold reveal it on the page.
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[at] = b'c';
    std::fs::write(&log, &bytes).unwrap();
    assert!(net.ferry("a", &["audit", "verify"]).status.success());
    let (ready, go) = (net.root.path().join("ready"), net.root.path().join("go"));
    let child = net
        .cmd("c", VENV_PYTHON)
        .arg(&script)
        .args(["--base", &format!("https://{}:7360", addr_of("a"))])
        .args([
            "--admin",
            &admin,
            "--admin-name",
            "alice",
            "--viewer",
            &viewer,
        ])
        .args(["--doomed", &doomed, "--doomed-name", "doomed"])
        .args(["--workload", "web", "--peer", "b", "--rewritten"])
        .arg("--ready")
        .arg(&ready)
        .arg("--go")
        .arg(&go)
        .arg("--shots")
        .arg(&shots)
        .args(["--axe", AXE])
        .env("HOME", net.root.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ready.exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    common::audit_chain::rewrite_consistently(&log, "\"carol\"", "\"karol\"");
    std::fs::write(&go, "").unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Statistics view (tests/console/statistics_test.py): an agent whose
/// history samples every 500 ms, a volume in a workload that qemu-io
/// writes for ~30 s (so the write rate and IOPS have real non-zero points
/// in several 10 s intervals), and an agent with history off (the empty
/// state). The page lists the scopes, draws the volume's write rate, its
/// summary and CSV equal `ferry stats`, the range choice changes the
/// query, keyboard operation, a viewer's view, refreshing only while the
/// view is open. Runs on 127.0.0.1 (no namespace needed: one node).
#[test]
fn the_statistics_view_charts_history_and_downloads_the_same_csv_as_the_cli() {
    use common::agent::{wait_until, Agent};
    require_browser();
    require("qemu-io");
    let root = tempfile::Builder::new()
        .prefix("ferry-console-stats")
        .tempdir()
        .unwrap();
    let a = Agent::start(root.path(), "a", "\n[history]\nsample_interval_ms = 500\n");
    let off = Agent::start(root.path(), "b", "\n[history]\nenabled = false\n");
    a.ok(&["volume", "create", "v", "--size", "32MiB"]);
    a.ok(&["workload", "create", "web", "--volume", "v"]);
    // The writer: 1 MiB every 2 s for ≥ 28 s (any 20 s or more touch at
    // least three 10 s intervals).
    for i in 0..15 {
        common::qemu_io(&a.uri("v"), &[&format!("write -P {} {i}M 1M", i + 1)]);
        std::thread::sleep(Duration::from_secs(2));
    }
    // Closed points (their 10 s over, as the script counts them) with
    // writes: the script compares only closed rows, so it must not start
    // while the third written interval is still open.
    let written_points = || -> usize {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        a.json(&[
            "stats",
            "volume/v/write_bytes_per_s",
            "--since",
            "5m",
            "--step",
            "10",
        ])["points"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["t"].as_f64().unwrap() + 10.0 < now - 2.0)
            .filter(|p| p["max"].as_f64().unwrap() > 0.0)
            .count()
    };
    wait_until(40, "3 closed points with writes in the history", || {
        written_points() >= 3
    });
    let token = |agent: &Agent, name: &str, role: &str| -> String {
        let out = agent.ok(&["token", "create", name, "--role", role]);
        out.lines().next().unwrap().trim().to_string()
    };
    let (admin, viewer, off_admin) = (
        token(&a, "alice", "admin"),
        token(&a, "vic", "viewer"),
        token(&off, "olga", "admin"),
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/console/statistics_test.py");
    let out = Command::new(VENV_PYTHON)
        .arg(&script)
        .args(["--base", &format!("https://{}", a.api)])
        .args(["--base-off", &format!("https://{}", off.api)])
        .args([
            "--admin",
            &admin,
            "--viewer",
            &viewer,
            "--admin-off",
            &off_admin,
        ])
        .args(["--node", "a", "--volume", "v", "--workload", "web"])
        .arg("--ferry")
        .arg(ferry_bin())
        .args(["--api", &a.api])
        .arg("--data-dir")
        .arg(&a.dir)
        .arg("--shots")
        .arg(screenshot_dir())
        .args(["--axe", AXE])
        .env("HOME", root.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser script failed:\n{stdout}\n{}\n--- agent log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log_text()
    );
}

/// The Estimate view (tests/console/estimate_test.py): an agent with two
/// volumes; estimate `e` observes `v` while qemu-io writes 1 MiB a second
/// for ~12 s (so W(T) has measured windows). The page lists it (method,
/// state, progress, allocated bytes), draws W(T) with its data table,
/// starts a second estimate (of `v2`) from the form by keyboard and shows
/// the API's refusal next to the form, forecasts over an entered bandwidth
/// (the initial sync is allocated ÷ bandwidth, as the API says, with its
/// why), probes the link to the paired node `b` (its result, or the API's
/// refusal, shown by the form), deletes after a confirmation; a viewer
/// gets no start form.
#[test]
fn the_estimate_view_lists_charts_starts_and_forecasts() {
    use common::agent::{wait_until, Agent};
    require_browser();
    require("qemu-io");
    let root = tempfile::Builder::new()
        .prefix("ferry-console-est")
        .tempdir()
        .unwrap();
    let a = Agent::start(
        root.path(),
        "a",
        "\n[history]\nsample_interval_ms = 500\n[estimate]\nsave_interval_ms = 1000\n",
    );
    // A paired node: the forecast's link choice and the probe button.
    let b = Agent::start(root.path(), "b", "");
    common::agent::pair(&a, &b);
    a.ok(&["volume", "create", "v", "--size", "64MiB"]);
    a.ok(&["volume", "create", "v2", "--size", "32MiB"]);
    a.ok(&["workload", "create", "web", "--volume", "v"]);
    a.ok(&[
        "estimate",
        "start",
        "e",
        "--volume",
        "v",
        "--duration",
        "1h",
    ]);
    // Overlapping writes: 1 MiB a second over an 8 MiB range, ~12 s.
    for i in 0..12 {
        common::qemu_io(
            &a.uri("v"),
            &[&format!("write -P {} {}M 1M", i + 1, (i * 3) % 8)],
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    wait_until(40, "W(T) measured at 3 window lengths or more", || {
        a.json(&["estimate", "status", "e"])["working_set"]
            .as_array()
            .is_some_and(|w| w.len() >= 3)
    });
    let token = |name: &str, role: &str| -> String {
        let out = a.ok(&["token", "create", name, "--role", role]);
        out.lines().next().unwrap().trim().to_string()
    };
    let (operator, viewer) = (token("olive", "operator"), token("vic", "viewer"));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/console/estimate_test.py");
    let out = Command::new(VENV_PYTHON)
        .arg(&script)
        .args(["--base", &format!("https://{}", a.api)])
        .args(["--operator", &operator, "--viewer", &viewer])
        .args([
            "--estimate",
            "e",
            "--volume",
            "v",
            "--volume2",
            "v2",
            "--peer",
            "b",
        ])
        .arg("--shots")
        .arg(screenshot_dir())
        .args(["--axe", AXE])
        .env("HOME", root.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser script failed:\n{stdout}\n{}\n--- agent log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log_text()
    );
}
