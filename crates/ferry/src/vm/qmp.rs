//! A blocking QMP (QEMU Machine Protocol) client over a Unix socket.
//!
//! QMP is line-delimited JSON: QEMU greets (`{"QMP": …}`), the client sends
//! `qmp_capabilities`, then each command `{"execute", "arguments", "id"}`
//! is answered by `{"return": …, "id"}` or `{"error": {"class", "desc"},
//! "id"}`. Events (`{"event", "data", "timestamp"}`) may arrive at any time,
//! also between a command and its answer: they are kept, in order, for
//! [`Qmp::take_events`] and [`Qmp::wait_event`].
//!
//! Bounded: a line longer than [`QMP_LINE_BYTES_MAX`] is a protocol error
//! (the client is unusable after it), at most [`QMP_EVENTS_KEPT_MAX`]
//! events are kept (the oldest are dropped and counted in
//! [`Qmp::events_dropped`]), every read waits at most the call's timeout.

// The live move (issue 23) calls these; until it is wired in, only tests do.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest QMP line accepted (bytes, without its newline).
pub const QMP_LINE_BYTES_MAX: usize = 1024 * 1024;
/// Events kept until taken; beyond this the oldest are dropped.
pub const QMP_EVENTS_KEPT_MAX: usize = 1024;
/// How long a command's answer may take unless [`Qmp::command_timeout`] is set.
pub const QMP_COMMAND_TIMEOUT_MS_DEFAULT: u64 = 10_000;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to the QMP socket {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("QMP socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("QMP socket {}: protocol error: {why}", path.display())]
    Protocol { path: PathBuf, why: String },
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP command {command} was not answered within {ms} ms")]
    Timeout { command: String, ms: u64 },
    #[error("QMP socket {}: closed by QEMU", path.display())]
    Closed { path: PathBuf },
}

/// An event QEMU sent.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QmpEvent {
    pub name: String,
    /// The event's `data` (`Null` when it has none).
    pub data: Value,
    /// QEMU's own timestamp (host wall clock), microseconds since the Unix epoch.
    pub at_unix_us: u64,
}

/// A connected QMP client, capabilities negotiated.
#[derive(Debug)]
pub struct Qmp {
    sock: UnixStream,
    path: PathBuf,
    /// Bytes read and not yet split into lines.
    buf: Vec<u8>,
    events: VecDeque<QmpEvent>,
    /// Events dropped because [`QMP_EVENTS_KEPT_MAX`] were kept already.
    pub events_dropped: u64,
    /// How long [`Qmp::execute`] waits for an answer.
    pub command_timeout: Duration,
    /// QEMU's greeting (`{"QMP": {"version": …, "capabilities": …}}`).
    pub greeting: Value,
    next_id: u64,
    /// A protocol error or EOF was met: every later call fails at once.
    broken: Option<String>,
}

/// What one line was.
enum Line {
    Event(QmpEvent),
    Answer { id: Option<u64>, result: Answer },
    Greeting(Value),
}

enum Answer {
    Return(Value),
    Error { class: String, desc: String },
}

impl Qmp {
    /// Connects to QEMU's QMP socket at `path`, reads its greeting and
    /// negotiates capabilities (`qmp_capabilities`), all within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let sock = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut q = Qmp {
            sock,
            path: path.to_path_buf(),
            buf: Vec::new(),
            events: VecDeque::new(),
            events_dropped: 0,
            command_timeout: Duration::from_millis(QMP_COMMAND_TIMEOUT_MS_DEFAULT),
            greeting: Value::Null,
            next_id: 1,
            broken: None,
        };
        let deadline = Instant::now() + timeout;
        loop {
            match q.read_line(deadline)? {
                None => {
                    return Err(QmpError::Timeout {
                        command: "(greeting)".into(),
                        ms: timeout.as_millis() as u64,
                    })
                }
                Some(Line::Greeting(g)) => {
                    q.greeting = g;
                    break;
                }
                Some(Line::Event(e)) => q.keep(e),
                Some(Line::Answer { .. }) => {
                    return Err(q.protocol("an answer before the greeting".into()))
                }
            }
        }
        let saved = q.command_timeout;
        q.command_timeout = deadline.saturating_duration_since(Instant::now());
        let r = q.execute("qmp_capabilities", Value::Null);
        q.command_timeout = saved;
        r?;
        Ok(q)
    }

    /// The socket's path.
    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `command` (`arguments`: an object, or `Null` for none) and
    /// returns its `return` value. Waits at most [`Qmp::command_timeout`];
    /// events that arrive meanwhile are kept.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.check()?;
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&msg).map_err(|e| self.protocol(e.to_string()))?;
        line.push(b'\n');
        let timeout = self.command_timeout;
        let deadline = Instant::now() + timeout;
        self.sock
            .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(|e| self.io(e))?;
        if let Err(e) = self.sock.write_all(&line) {
            return Err(match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => self.closed(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => QmpError::Timeout {
                    command: command.into(),
                    ms: timeout.as_millis() as u64,
                },
                _ => self.io(e),
            });
        }
        loop {
            match self.read_line(deadline)? {
                None => {
                    return Err(QmpError::Timeout {
                        command: command.into(),
                        ms: timeout.as_millis() as u64,
                    })
                }
                Some(Line::Event(e)) => self.keep(e),
                // A late answer to an earlier command that timed out.
                Some(Line::Answer { id: Some(got), .. }) if got != id => {}
                Some(Line::Answer { result, .. }) => {
                    return match result {
                        Answer::Return(v) => Ok(v),
                        Answer::Error { class, desc } => Err(QmpError::Command {
                            command: command.into(),
                            class,
                            desc,
                        }),
                    }
                }
                Some(Line::Greeting(_)) => return Err(self.protocol("a second greeting".into())),
            }
        }
    }

    /// Every event kept so far, oldest first.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// The first event named `name`: a kept one first (it and the events
    /// before it are taken; others stay kept), else the next that arrives
    /// within `timeout`. `None` on timeout.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<Option<QmpEvent>, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e.name == name) {
                return Ok(self.events.remove(i));
            }
            self.check()?;
            match self.read_line(deadline)? {
                None => return Ok(None),
                Some(Line::Event(e)) => self.keep(e),
                Some(Line::Answer { .. }) => {}
                Some(Line::Greeting(_)) => return Err(self.protocol("a second greeting".into())),
            }
        }
    }

    /// Reads the events that arrive within `wait` (kept for
    /// [`Qmp::take_events`]).
    #[cfg(test)]
    pub fn poll_events(&mut self, wait: Duration) -> Result<(), QmpError> {
        self.check()?;
        let deadline = Instant::now() + wait;
        loop {
            match self.read_line(deadline)? {
                None => return Ok(()),
                Some(Line::Event(e)) => self.keep(e),
                Some(Line::Answer { .. }) => {}
                Some(Line::Greeting(_)) => return Err(self.protocol("a second greeting".into())),
            }
        }
    }

    fn keep(&mut self, e: QmpEvent) {
        if self.events.len() >= QMP_EVENTS_KEPT_MAX {
            self.events.pop_front();
            self.events_dropped += 1;
        }
        self.events.push_back(e);
    }

    fn check(&self) -> Result<(), QmpError> {
        match &self.broken {
            None => Ok(()),
            Some(why) if why == "closed" => Err(QmpError::Closed {
                path: self.path.clone(),
            }),
            Some(why) => Err(QmpError::Protocol {
                path: self.path.clone(),
                why: format!("unusable after an earlier error: {why}"),
            }),
        }
    }

    fn protocol(&mut self, why: String) -> QmpError {
        self.broken.get_or_insert_with(|| why.clone());
        QmpError::Protocol {
            path: self.path.clone(),
            why,
        }
    }

    fn io(&self, source: io::Error) -> QmpError {
        QmpError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn closed(&mut self) -> QmpError {
        self.broken = Some("closed".into());
        QmpError::Closed {
            path: self.path.clone(),
        }
    }

    /// The next line, parsed; `None` if none came by `deadline`.
    fn read_line(&mut self, deadline: Instant) -> Result<Option<Line>, QmpError> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                if nl > QMP_LINE_BYTES_MAX {
                    return Err(self.protocol(format!(
                        "a line longer than {QMP_LINE_BYTES_MAX} bytes (QMP_LINE_BYTES_MAX)"
                    )));
                }
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let text = &line[..nl];
                if text.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                return self.parse(text).map(Some);
            }
            if self.buf.len() > QMP_LINE_BYTES_MAX {
                return Err(self.protocol(format!(
                    "a line longer than {QMP_LINE_BYTES_MAX} bytes (QMP_LINE_BYTES_MAX)"
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.sock
                .set_read_timeout(Some(left))
                .map_err(|e| self.io(e))?;
            let mut chunk = [0u8; 64 * 1024];
            match self.sock.read(&mut chunk) {
                Ok(0) => return Err(self.closed()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(self.closed()),
                Err(e) => return Err(self.io(e)),
            }
        }
    }

    fn parse(&mut self, text: &[u8]) -> Result<Line, QmpError> {
        let v: Value = match serde_json::from_slice(text) {
            Ok(v) => v,
            Err(e) => return Err(self.protocol(format!("bad JSON: {e}"))),
        };
        let Some(obj) = v.as_object() else {
            return Err(self.protocol("a line that is not a JSON object".into()));
        };
        if let Some(g) = obj.get("QMP") {
            return Ok(Line::Greeting(g.clone()));
        }
        if let Some(name) = obj.get("event").and_then(Value::as_str) {
            let ts = obj.get("timestamp");
            let secs = ts
                .and_then(|t| t.get("seconds"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let us = ts
                .and_then(|t| t.get("microseconds"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            return Ok(Line::Event(QmpEvent {
                name: name.to_string(),
                data: obj.get("data").cloned().unwrap_or(Value::Null),
                at_unix_us: secs.saturating_mul(1_000_000).saturating_add(us),
            }));
        }
        let id = obj.get("id").and_then(Value::as_u64);
        if let Some(r) = obj.get("return") {
            return Ok(Line::Answer {
                id,
                result: Answer::Return(r.clone()),
            });
        }
        if let Some(err) = obj.get("error") {
            let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            return Ok(Line::Answer {
                id,
                result: Answer::Error {
                    class: field("class"),
                    desc: field("desc"),
                },
            });
        }
        let shown: String = String::from_utf8_lossy(text).chars().take(200).collect();
        Err(self.protocol(format!("unexpected message {shown}")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A QEMU process started by a test, killed (by PID) and reaped when dropped.
    pub(crate) struct QemuProc {
        pub child: std::process::Child,
        pub qmp: PathBuf,
    }

    impl QemuProc {
        /// Starts `qemu-system-x86_64 ARGS -qmp unix:DIR/NAME.qmp` and waits
        /// for its QMP socket to appear.
        pub(crate) fn start(dir: &Path, name: &str, args: &[&str]) -> QemuProc {
            let qmp = dir.join(format!("{name}.qmp"));
            let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
            let child = std::process::Command::new("qemu-system-x86_64")
                .args(args)
                .arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()))
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("qemu-system-x86_64 (scripts/install-deps)");
            let p = QemuProc { child, qmp };
            let t = Instant::now();
            while !p.qmp.exists() {
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "QEMU {name} made no QMP socket"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            p
        }

        pub(crate) fn kill(&mut self) {
            if matches!(self.child.try_wait(), Ok(None)) {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
    }

    impl Drop for QemuProc {
        fn drop(&mut self) {
            self.kill();
        }
    }

    fn none_machine(dir: &Path) -> QemuProc {
        QemuProc::start(
            dir,
            "none",
            &["-machine", "none", "-nodefaults", "-display", "none", "-S"],
        )
    }

    #[test]
    fn qmp_status_cont_event_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = none_machine(dir.path());
        let mut q = Qmp::connect(&qemu.qmp, Duration::from_secs(10)).unwrap();
        assert!(q.greeting.get("version").is_some(), "{:?}", q.greeting);
        assert_eq!(q.path(), qemu.qmp);
        let st = q.execute("query-status", Value::Null).unwrap();
        assert_eq!(st["status"], "prelaunch", "{st}");
        assert_eq!(st["running"], false);

        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        assert_eq!(q.execute("cont", Value::Null).unwrap(), json!({}));
        let ev = q
            .wait_event("RESUME", Duration::from_secs(5))
            .unwrap()
            .expect("a RESUME event");
        let after = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        // QEMU's wall clock, the same host's: within the call (1 s slack).
        assert!(
            ev.at_unix_us + 1_000_000 >= before && ev.at_unix_us <= after + 1_000_000,
            "RESUME at {} outside [{before}, {after}]",
            ev.at_unix_us
        );
        assert_eq!(
            q.execute("query-status", Value::Null).unwrap()["status"],
            "running"
        );

        match q.execute("no-such-command", Value::Null) {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "no-such-command");
                assert_eq!(class, "CommandNotFound");
                assert!(desc.contains("no-such-command"), "{desc}");
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        // Arguments are passed: a bad one is the command's error.
        match q.execute("stop", json!({ "bogus": 1 })) {
            Err(QmpError::Command { class, .. }) => assert_eq!(class, "GenericError"),
            other => panic!("expected a command error, got {other:?}"),
        }
        // Still usable after command errors.
        q.execute("stop", Value::Null).unwrap();
        assert!(q
            .wait_event("STOP", Duration::from_secs(5))
            .unwrap()
            .is_some());
        // Nothing more: a timeout is None, not an error.
        assert!(q
            .wait_event("RESUME", Duration::from_millis(200))
            .unwrap()
            .is_none());
        q.execute("cont", Value::Null).unwrap();
        q.poll_events(Duration::from_millis(300)).unwrap();
        let names: Vec<String> = q.take_events().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["RESUME"]);
        assert!(q.take_events().is_empty());
    }

    #[test]
    fn qmp_missing_socket_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody-here.qmp");
        let e = Qmp::connect(&path, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, QmpError::Connect { .. }), "{e:?}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn qmp_qemu_killed_mid_call_is_closed_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let mut qemu = none_machine(dir.path());
        let mut q = Qmp::connect(&qemu.qmp, Duration::from_secs(10)).unwrap();
        q.command_timeout = Duration::from_secs(30);
        // Kill QEMU while a command waits for its answer: `stop` on a
        // stopped machine answers at once, so the call is held by a command
        // that does not answer before QEMU dies — send the kill from a
        // thread as the call starts.
        let pid = qemu.child.id() as i32;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: kill(2) on the PID of the QEMU this test started and
            // has not reaped (it is reaped by `qemu.kill()` below).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        });
        let t = Instant::now();
        let mut last = Ok(Value::Null);
        while t.elapsed() < Duration::from_secs(10) {
            last = q.execute("query-status", Value::Null);
            if last.is_err() {
                break;
            }
        }
        killer.join().unwrap();
        qemu.kill();
        let e = last.expect_err("QEMU was killed: the call must fail");
        assert!(
            matches!(e, QmpError::Closed { .. } | QmpError::Io { .. }),
            "{e:?}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        // And every later call fails at once.
        let t = Instant::now();
        assert!(q.execute("query-status", Value::Null).is_err());
        assert!(t.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn qmp_bounds_a_long_line_and_kept_events() {
        // A fake QMP server: a greeting, then a line with no end.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake.qmp");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut line = String::new();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            std::io::BufRead::read_line(&mut r, &mut line).unwrap();
            s.write_all(b"{\"return\": {}, \"id\": 1}\n").unwrap();
            // More events than are kept, then a too-long line.
            for i in 0..(QMP_EVENTS_KEPT_MAX + 5) {
                let ev = format!(
                    "{{\"event\": \"E{i}\", \"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}}}\n"
                );
                s.write_all(ev.as_bytes()).unwrap();
            }
            s.write_all(b"{\"return\": {}, \"id\": 2}\n").unwrap();
            let _ = s.write_all(&vec![b'x'; QMP_LINE_BYTES_MAX + 10]);
            let _ = s.write_all(b"\n");
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        q.execute("query-status", Value::Null).unwrap();
        assert_eq!(q.events_dropped, 5);
        let ev = q.take_events();
        assert_eq!(ev.len(), QMP_EVENTS_KEPT_MAX);
        assert_eq!(ev[0].name, "E5");
        assert_eq!(ev[0].at_unix_us, 1_000_002);
        let e = q.poll_events(Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(&e, QmpError::Protocol { why, .. } if why.contains("QMP_LINE_BYTES_MAX")),
            "{e:?}"
        );
        server.join().unwrap();
    }

    /// THE REAL THING: two QEMU processes migrate through the VM-stream
    /// tunnel (source QEMU → outgoing.sock → node a → mutual TLS → node b →
    /// incoming.sock → target QEMU), 64 MiB of random bytes in guest RAM,
    /// read back from the target and compared.
    #[test]
    fn qmp_live_migration_through_the_vmstream_tunnel() {
        use crate::transport::vmstream::{testing::pair, Outgoing, TunnelLimits};
        let limits = TunnelLimits::default();
        let p = pair(limits);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Random bytes in guest RAM at 32 MiB (the generic loader writes
        // them at reset; the target has no loader: what it holds came
        // through the stream).
        const AT: u64 = 0x200_0000;
        const LEN: usize = 64 << 20;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let blob: Vec<u8> = (0..LEN / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        let blob_path = d.join("blob.bin");
        std::fs::write(&blob_path, &blob).unwrap();
        let common = [
            "-machine",
            "pc",
            "-m",
            "128",
            "-nodefaults",
            "-display",
            "none",
            "-accel",
            "tcg",
        ];
        let loader = format!(
            "loader,file={},addr={AT:#x},force-raw=on",
            blob_path.display()
        );
        let mut src_args: Vec<&str> = common.to_vec();
        src_args.extend(["-device", &loader]);
        let mut src = QemuProc::start(d, "source", &src_args);
        let mut dst_args: Vec<&str> = common.to_vec();
        dst_args.extend(["-S", "-incoming", "defer"]);
        let mut dst = QemuProc::start(d, "target", &dst_args);
        let mut qs = Qmp::connect(&src.qmp, Duration::from_secs(10)).unwrap();
        let mut qd = Qmp::connect(&dst.qmp, Duration::from_secs(10)).unwrap();
        assert_eq!(
            qs.execute("query-status", Value::Null).unwrap()["status"],
            "running"
        );

        let incoming = d.join("incoming.sock");
        qd.execute(
            "migrate-incoming",
            json!({ "uri": format!("unix:{}", incoming.display()) }),
        )
        .unwrap();
        p.sessions
            .lock()
            .unwrap()
            .insert("vm1".into(), ("s3cret".into(), incoming));
        let outgoing = d.join("outgoing.sock");
        let out = Outgoing::open(&p.dialer, &p.peer, "vm1", "s3cret", &outgoing, limits).unwrap();
        // QEMU's own cap (32 MiB/s by default) lifted: the tunnel is measured.
        qs.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": 100u64 << 30 }),
        )
        .unwrap();
        let t = Instant::now();
        qs.execute(
            "migrate",
            json!({ "uri": format!("unix:{}", outgoing.display()) }),
        )
        .unwrap();
        let status = loop {
            let m = qs.execute("query-migrate", Value::Null).unwrap();
            let st = m["status"].as_str().unwrap_or("").to_string();
            if matches!(st.as_str(), "completed" | "failed" | "cancelled") {
                break (st, m);
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "migration still {st} after 120 s: {m}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let migrate_secs = t.elapsed().as_secs_f64();
        assert_eq!(status.0, "completed", "{}", status.1);
        let t3 = Instant::now();
        while !out.is_done() {
            assert!(
                t3.elapsed() < Duration::from_secs(30),
                "the tunnel did not end"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let stats = out.finish(Duration::from_secs(30)).unwrap();
        let served = p
            .served
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap();
        assert_eq!(served.bytes_in, stats.bytes_out);
        assert_eq!(
            qs.execute("query-status", Value::Null).unwrap()["status"],
            "postmigrate"
        );
        // The target: completed, paused (it was started with -S).
        let t2 = Instant::now();
        loop {
            let m = qd.execute("query-migrate", Value::Null).unwrap();
            if m["status"] == "completed" {
                break;
            }
            assert!(t2.elapsed() < Duration::from_secs(30), "target: {m}");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            qd.execute("query-status", Value::Null).unwrap()["status"],
            "paused"
        );
        // What the target holds is what the source had.
        let dump = d.join("dump.bin");
        qd.execute(
            "pmemsave",
            json!({ "val": AT, "size": LEN, "filename": dump.display().to_string() }),
        )
        .unwrap();
        let got = std::fs::read(&dump).unwrap();
        assert!(got == blob, "the target's RAM differs from the source's");
        qd.execute("cont", Value::Null).unwrap();
        assert!(qd
            .wait_event("RESUME", Duration::from_secs(10))
            .unwrap()
            .is_some());
        assert_eq!(
            qd.execute("query-status", Value::Null).unwrap()["status"],
            "running"
        );
        let mib = stats.bytes_out as f64 / (1 << 20) as f64;
        eprintln!(
            "live migration through the tunnel: {mib:.1} MiB in {:.2} s tunnel time = {:.0} MiB/s \
             (QEMU's migration took {migrate_secs:.2} s; {} bytes back)",
            stats.elapsed.as_secs_f64(),
            mib / stats.elapsed.as_secs_f64(),
            stats.bytes_in
        );
        assert!(stats.bytes_out >= LEN as u64, "{stats:?}");
        src.kill();
        dst.kill();
    }
}
