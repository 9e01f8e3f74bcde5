//! Shared harness for the integration tests: a data dir, the real `ferry` binary,
//! and the real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh, fio).
//!
//! Every process a test starts is owned by a guard that kills it (by PID) and
//! reaps it on drop, so a failing test leaves nothing behind.

#![allow(dead_code)]

pub mod agent;
pub mod audit_chain;
pub mod fio;
pub mod raw;
pub mod records;
pub mod ticks;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// The release before this one (the end of issue 18), for rolling-upgrade
/// tests: `FERRY_PREVIOUS_BIN` if set (scripts/test builds it), else built
/// here from that commit into `target/previous-release` (once; minutes).
pub const PREVIOUS_RELEASE: &str = "ce91735e99b58a44d1a6f68fb1f08c06e00ca7e3";

/// `None` when scripts/test found the previous release cannot be built
/// here (no git history): the caller says so and does not run.
pub fn previous_release_bin() -> Option<PathBuf> {
    if std::env::var("FERRY_PREVIOUS_BIN").as_deref() == Ok("unavailable") {
        eprintln!("NOT RUN: the previous release {PREVIOUS_RELEASE} cannot be built here (no git history; see scripts/test)");
        return None;
    }
    if let Ok(p) = std::env::var("FERRY_PREVIOUS_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.exists(),
            "FERRY_PREVIOUS_BIN={} does not exist",
            p.display()
        );
        return Some(p);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(repo.join("scripts/build-previous-release"))
        .output()
        .expect("scripts/build-previous-release");
    assert!(
        out.status.success(),
        "building the previous release failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Panics with a clear message when a client the tests need is missing.
pub fn require(tool: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin", "/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return p;
        }
    }
    panic!("`{tool}` is not installed: run scripts/test, which installs the Debian packages the tests need");
}

/// A data dir with the `ferry` CLI pointed at it.
pub struct Node {
    pub dir: tempfile::TempDir,
}

impl Node {
    pub fn new() -> Node {
        Node {
            dir: tempfile::Builder::new()
                .prefix("ferry-test-")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(ferry_bin());
        c.env("FERRY_DATA_DIR", self.dir.path())
            .env("FERRY_LOG", "warn");
        c
    }

    /// Runs `ferry ARGS`, returning its output whatever its status.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs `ferry ARGS` and requires success.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ferry {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn create(&self, name: &str, size: &str) {
        self.ok(&["volume", "create", name, "--size", size]);
    }

    pub fn image(&self, name: &str) -> PathBuf {
        self.dir.path().join("volumes").join(name).join("data.raw")
    }

    /// Starts `ferry --json export NAME EXTRA...` (by default on its Unix
    /// socket, DATA_DIR/run/NAME.sock) and waits until it prints where it
    /// listens.
    pub fn export(&self, name: &str, extra: &[&str]) -> Exported {
        let mut args = vec!["--json", "export", name];
        args.extend(extra);
        let mut child = self
            .cmd()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        if line.is_empty() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            let _ = child.wait();
            panic!("ferry export {args:?} did not start: {err}");
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let uris = v["uris"]
            .as_array()
            .unwrap_or_else(|| panic!("ferry export {args:?}: {v}"))
            .iter()
            .map(|u| u.as_str().unwrap().to_string())
            .collect();
        Exported {
            child: Some(child),
            uris,
            size: v["size_bytes"].as_u64().unwrap(),
        }
    }
}

/// A running `ferry export`; killed on drop.
pub struct Exported {
    child: Option<Child>,
    pub uris: Vec<String>,
    pub size: u64,
}

impl Exported {
    pub fn uri(&self) -> &str {
        &self.uris[0]
    }

    /// Where the first listener is: `unix:PATH` or `HOST:PORT`.
    pub fn addr(&self) -> String {
        let uri = self.uri();
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let path = rest.split("socket=").nth(1).unwrap();
            return format!("unix:{}", path.split('&').next().unwrap());
        }
        let rest = uri
            .strip_prefix("nbd://")
            .or_else(|| uri.strip_prefix("nbds://"))
            .unwrap();
        rest.split('/').next().unwrap().to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status and stderr.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return (status, err);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ferry export did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Exported {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a client command; panics with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// qemu-io against `uri` with the given `-c` commands.
pub fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut c = Command::new(require("qemu-io"));
    c.args(["-f", "raw"]);
    for cmd in commands {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = run_ok(&mut c);
    // qemu-io exits 0 even when a pattern check fails; it says so on stdout.
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

/// A Command for a Debian tool, with /usr/bin first on PATH (nbdsh needs
/// Debian's python3, not another one earlier on PATH).
pub fn debian_tool(tool: &str) -> Command {
    let path = require(tool);
    let mut c = Command::new(path);
    let old = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:/bin:{old}"));
    c
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// `method path` on an agent's API over HTTPS (curl; the certificate is
/// not checked: these tests are about what the agent answers), with `token`
/// or none and a JSON `body` or none: (status, body). Status 0: no HTTP
/// answer at all.
pub fn https_request(
    api: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    https_request_as(api, method, path, None, token, body)
}

/// [`https_request`], presenting the node certificate of the agent whose
/// data dir is `node` (as a paired node's calls do), if given.
pub fn https_request_as(
    api: &str,
    method: &str,
    path: &str,
    node: Option<&Path>,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-k", "-m", "30", "-w", "\n%{http_code}", "-X", method]);
    if let Some(dir) = node {
        c.arg("--cert")
            .arg(dir.join("tls/node.crt"))
            .arg("--key")
            .arg(dir.join("tls/node.key"));
    }
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data", b]);
    }
    let out = c.arg(format!("https://{api}{path}")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let code = code.trim().parse().unwrap_or(0);
    log_reply(method, path, code, body);
    (code, body.to_string())
}

/// With `FERRY_API_REPLY_LOG` set (scripts/test): appends the reply as the
/// `ferry` client does, for the check of every reply against the OpenAPI
/// document (`scripts/check-api-replies`).
pub fn log_reply(method: &str, path: &str, status: u16, body: &str) {
    use std::io::Write;
    let Some(file) = std::env::var_os("FERRY_API_REPLY_LOG") else {
        return;
    };
    let body: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| serde_json::Value::String(body.into()));
    let mut line = serde_json::json!({"method": method, "route": null, "path": path,
        "status": status, "body": body})
    .to_string();
    line.push('\n');
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// `GET path` on an agent's API over HTTPS: see [`https_request`].
pub fn https(api: &str, path: &str, token: Option<&str>) -> (u16, String) {
    https_request(api, "GET", path, token, None)
}

/// A small tmpfs mounted at a path (root only), unmounted when dropped.
pub struct Mount(pub PathBuf);

impl Mount {
    pub fn tmpfs(at: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a small tmpfs needs root");
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Every entry's type, mode, owner, size, link count and mtime (ns), and
/// the content of every file: equal on both sides.
pub fn assert_trees_equal(a: &Path, b: &Path) {
    if let Some(d) = tree_diff(a, b) {
        panic!("{d}");
    }
}

/// How the trees at `a` and `b` differ (None: equal).
pub fn tree_diff(a: &Path, b: &Path) -> Option<String> {
    let listing = |d: &Path| {
        // Entries may vanish while `find` walks a tree still converging: a
        // failed walk is a difference too (the caller may look again).
        let out = Command::new("find")
            .arg(".")
            .args(["-printf", "%p %y %m %U %G %s %n %T@\\n"])
            .current_dir(d)
            .output()
            .unwrap();
        let text = if out.status.success() {
            String::from_utf8_lossy(&out.stdout).into_owned()
        } else {
            format!("(find failed: {})", String::from_utf8_lossy(&out.stderr))
        };
        text.lines()
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
    if !only_a.is_empty() || !only_b.is_empty() {
        return Some(format!(
            "trees differ:\nprimary only: {only_a:#?}\nreplica only: {only_b:#?}"
        ));
    }
    let out = Command::new("diff")
        .args(["-r", "--no-dereference", "-q"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    (!out.status.success())
        .then(|| format!("content differs: {}", String::from_utf8_lossy(&out.stdout)))
}
