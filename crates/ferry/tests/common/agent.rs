//! Agents for replication tests: each in its own temporary data dir, on fixed
//! loopback ports (so a restart keeps its address), killed by PID on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::ferry_bin;

/// A free port on 127.0.0.1, never the same one twice in this process (a
/// port just released can come back at once: an agent's API and NBD
/// listeners once got the same one).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub api: String,
    /// The NBD Unix socket, as `unix:PATH` (see [`Agent::uri`]).
    pub nbd: String,
    pub replication: String,
    child: Option<Child>,
    pub log: PathBuf,
    /// A program (and its arguments) the agent is run under, e.g. `setpriv …`.
    wrapper: Vec<String>,
    /// The ferry binary this node runs (agent and CLI): this build's, or
    /// another release's (see [`Agent::set_bin`]).
    pub bin: PathBuf,
}

impl Agent {
    /// Starts agent `name` in `root/name` with extra `[replication]` settings.
    pub fn start(root: &Path, name: &str, replication_toml: &str) -> Agent {
        Agent::start_wrapped(root, name, replication_toml, &[])
    }

    /// Like [`Agent::start`], run under `wrapper` (a program that execs the
    /// rest of its arguments, such as `setpriv …`).
    pub fn start_wrapped(
        root: &Path,
        name: &str,
        replication_toml: &str,
        wrapper: &[&str],
    ) -> Agent {
        Agent::start_with(root, name, "", replication_toml, wrapper)
    }

    /// Like [`Agent::start_wrapped`], with `top_toml` lines before the tables
    /// (e.g. `nbd_listen = …`).
    pub fn start_with(
        root: &Path,
        name: &str,
        top_toml: &str,
        replication_toml: &str,
        wrapper: &[&str],
    ) -> Agent {
        let mut a = Agent::configure(root, name, top_toml, replication_toml, wrapper);
        a.spawn();
        a
    }

    /// Agent `name`'s directory and config, not started yet (e.g. to run
    /// another release: [`Agent::set_bin`], then [`Agent::spawn`]).
    pub fn configure(
        root: &Path,
        name: &str,
        top_toml: &str,
        replication_toml: &str,
        wrapper: &[&str],
    ) -> Agent {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (api, repl) = (free_port(), free_port());
        let config = root.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "node_name = \"{name}\"\ndata_dir = \"{}\"\napi_listen = \"127.0.0.1:{api}\"\nreplication_listen = \"127.0.0.1:{repl}\"\n{top_toml}\n\n[replication]\nreconnect_backoff_max_ms = 500\n{replication_toml}\n",
                dir.display()
            ),
        )
        .unwrap();
        let a = Agent {
            name: name.to_string(),
            log: root.join(format!("{name}.log")),
            nbd: format!("unix:{}", dir.join("run").join("nbd.sock").display()),
            dir,
            config,
            api: format!("127.0.0.1:{api}"),
            replication: format!("127.0.0.1:{repl}"),
            child: None,
            wrapper: wrapper.iter().map(|w| w.to_string()).collect(),
            bin: PathBuf::from(ferry_bin()),
        };
        a
    }

    /// Runs `bin` from the next [`Agent::spawn`] on (a stopped agent
    /// restarted as another release: an upgrade), and for its CLI.
    pub fn set_bin(&mut self, bin: &Path) {
        self.bin = bin.to_path_buf();
    }

    /// (Re)starts the process and waits until it prints its addresses.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let mut child = cmd
            .args(["agent", "--config"])
            .arg(&self.config)
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
        assert!(
            line.contains("fingerprint"),
            "agent {} did not start: {}",
            self.name,
            self.log_text()
        );
        self.child = Some(child);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the PID of our own unreaped child.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().unwrap().is_none() {
                assert!(
                    Instant::now() < deadline,
                    "agent {} did not stop on SIGTERM",
                    self.name
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("api.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A `ferry` command aimed at this agent.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("FERRY_API", &self.api)
            .env("FERRY_DATA_DIR", &self.dir)
            .env("FERRY_LOG", "warn");
        c
    }

    /// Runs the CLI, which must fail (not by a usage error the CLI itself
    /// finds only: any non-zero exit); its stderr.
    #[allow(dead_code)]
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli().args(args).output().unwrap();
        assert!(
            !out.status.success(),
            "ferry {args:?} on {} succeeded: {}",
            self.name,
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ferry {args:?} on {} failed: {}\n{}\n--- agent log ---\n{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    pub fn status(&self, volume: &str) -> Value {
        self.json(&["replicate", "status", volume])
    }

    /// `volume` on the agent's NBD Unix socket.
    pub fn uri(&self, volume: &str) -> String {
        format!(
            "nbd+unix:///{volume}?socket={}",
            self.nbd.strip_prefix("unix:").unwrap()
        )
    }

    pub fn image(&self, volume: &str) -> PathBuf {
        self.dir.join("volumes").join(volume).join("data.raw")
    }

    /// A function that POSTs a JSON body to this agent's /api/v1/replicas
    /// as the paired node `from` does (with its certificate: a
    /// peer-internal call), and requires success.
    pub fn api_client(&self, from: &Agent) -> impl Fn(&str) {
        let (api, dir) = (self.api.clone(), from.dir.clone());
        move |body: &str| {
            let (code, text) = super::https_request_as(
                &api,
                "POST",
                "/api/v1/replicas",
                Some(&dir),
                None,
                Some(body),
            );
            assert_eq!(code, 200, "{text}");
        }
    }

    /// This node's certificate fingerprint (`ferry node id`).
    pub fn fingerprint(&self) -> String {
        self.json(&["node", "id"])["fingerprint"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// RSS of the agent process in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb * 1024
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Two registered agents `a` and `b` under a fresh temp dir named `prefix…`,
/// each with `extra` config lines.
pub fn two_agents(prefix: &str, extra: &str) -> (tempfile::TempDir, Agent, Agent) {
    let root = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let a = Agent::start(root.path(), "a", extra);
    let b = Agent::start(root.path(), "b", extra);
    pair(&a, &b);
    (root, a, b)
}

/// Registers `b` at `a`, both ways.
pub fn pair(a: &Agent, b: &Agent) {
    let tok = a.dir.join("peer-token");
    std::fs::write(&tok, b.token()).unwrap();
    a.ok(&[
        "node",
        "add",
        &b.name,
        "--api",
        &b.api,
        "--token-file",
        tok.to_str().unwrap(),
        "--fingerprint",
        &b.fingerprint(),
    ]);
}

/// Polls `f` until it returns true or `secs` pass.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
