//! `ferry demo`: the main job on an embedded default — a live migration on one
//! machine. It starts two agents (`a` and `b`) with temporary data dirs on
//! 127.0.0.1, registers them with each other, creates a volume on `a`, and
//! runs a writer (the "application") that keeps writing numbered, checksummed
//! 4 KiB records through `a`'s NBD export. It migrates the workload to `b`
//! with a live progress display, cuts over while the writer writes (the writer
//! sees its writes at `a` fail after the commit point and carries on at `b`,
//! as a restarted application would), then reads every slot back from `b` and
//! checks that each holds the last record acknowledged for it. It prints the
//! measured downtime, stops both agents and removes everything.

use std::io::{BufRead, BufReader, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_core::ByteSize;
use ferry_nbd::client::Client;
use serde_json::json;

use crate::cli::DemoArgs;
use crate::transport::client::ApiClient;

const RECORD_BYTES: usize = 4096;
const RECORD_MAGIC: &[u8; 8] = b"FERRYREC";

/// A record: magic, sequence number, CRC32C of the rest, then filler derived
/// from the sequence number.
fn record(seq: u64) -> Vec<u8> {
    let mut r = vec![0u8; RECORD_BYTES];
    r[..8].copy_from_slice(RECORD_MAGIC);
    r[8..16].copy_from_slice(&seq.to_be_bytes());
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in r[20..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let crc = ferry_core::crc32c::crc32c(&r[20..]);
    r[16..20].copy_from_slice(&crc.to_be_bytes());
    r
}

/// The sequence number of a valid record, or why it is not one.
fn check_record(r: &[u8]) -> Result<u64, &'static str> {
    if &r[..8] != RECORD_MAGIC {
        return Err("no record");
    }
    let seq = u64::from_be_bytes(r[8..16].try_into().unwrap_or([0; 8]));
    let crc = u32::from_be_bytes(r[16..20].try_into().unwrap_or([0; 4]));
    if crc != ferry_core::crc32c::crc32c(&r[20..]) || r != record(seq).as_slice() {
        return Err("torn or corrupt record");
    }
    Ok(seq)
}

struct Node {
    api: String,
    /// The agent's NBD Unix socket (the demo's application runs on the same
    /// host; NBD over TCP needs TLS and a client certificate).
    nbd: PathBuf,
    token: String,
    fingerprint: String,
    child: Child,
}

impl Node {
    fn client(&self) -> Result<ApiClient> {
        ApiClient::operator(&self.api, &self.token, &self.fingerprint)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the PID of our own child (not yet reaped).
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_node(root: &Path, name: &'static str) -> Result<Node> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir)?;
    let (api, repl) = (free_port()?, free_port()?);
    let config = root.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "node_name = \"{name}\"\ndata_dir = \"{}\"\napi_listen = \"127.0.0.1:{api}\"\nreplication_listen = \"127.0.0.1:{repl}\"\n",
            dir.display()
        ),
    )?;
    let log = std::fs::File::create(root.join(format!("{name}.log")))?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["agent", "--config"])
        .arg(&config)
        .env("FERRY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("cannot start a ferry agent")?;
    // The agent prints one JSON line once it listens.
    let mut line = String::new();
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim().is_empty() {
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "agent {name} did not start; its log: {}",
            root.join(format!("{name}.log")).display()
        );
    }
    let token = std::fs::read_to_string(dir.join("api.token"))?
        .trim()
        .to_string();
    let fingerprint = crate::transport::identity::local_fingerprint(&dir)?;
    Ok(Node {
        api: format!("127.0.0.1:{api}"),
        nbd: dir.join("run").join("nbd.sock"),
        token,
        fingerprint,
        child,
    })
}

/// The application: writes record after record, slot = seq mod slots; on an
/// error it reconnects — to whichever node serves the volume — and carries on.
struct Writer {
    stop: Arc<AtomicBool>,
    /// Last acknowledged record per slot.
    acked: Arc<Mutex<Vec<Option<u64>>>>,
    /// Highest record ever sent per slot (may have landed without an ack).
    sent: Arc<Mutex<Vec<Option<u64>>>>,
    writes: Arc<AtomicU64>,
    /// Longest time between two acknowledged writes (µs): what the app saw.
    max_gap_us: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Writer {
    fn start(targets: Vec<PathBuf>, volume: &str, slots: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(vec![None; slots as usize]));
        let sent = Arc::new(Mutex::new(vec![None; slots as usize]));
        let writes = Arc::new(AtomicU64::new(0));
        let max_gap_us = Arc::new(AtomicU64::new(0));
        let (s, a, se, w, g) = (
            stop.clone(),
            acked.clone(),
            sent.clone(),
            writes.clone(),
            max_gap_us.clone(),
        );
        let volume = volume.to_string();
        let thread = std::thread::spawn(move || -> Result<()> {
            let mut seq = 0u64;
            let mut conn: Option<Client> = None;
            let mut last_ack = Instant::now();
            let mut target = 0usize;
            while !s.load(Ordering::SeqCst) {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => {
                        match Client::connect_unix(
                            &targets[target],
                            &volume,
                            Duration::from_secs(30),
                        ) {
                            Ok(c) => conn.insert(c),
                            Err(_) => {
                                target = (target + 1) % targets.len();
                                std::thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                        }
                    }
                };
                let slot = seq % slots;
                se.lock().unwrap_or_else(|p| p.into_inner())[slot as usize] = Some(seq);
                match c.write(slot * RECORD_BYTES as u64, &record(seq), false) {
                    Ok(()) => {
                        a.lock().unwrap_or_else(|p| p.into_inner())[slot as usize] = Some(seq);
                        w.fetch_add(1, Ordering::Relaxed);
                        g.fetch_max(last_ack.elapsed().as_micros() as u64, Ordering::Relaxed);
                        last_ack = Instant::now();
                        seq += 1;
                    }
                    Err(_) => {
                        // The volume moved (or the node went away): find it again.
                        conn = None;
                        target = (target + 1) % targets.len();
                        seq += 1;
                    }
                }
            }
            if let Some(c) = conn {
                c.disconnect();
            }
            Ok(())
        });
        Writer {
            stop,
            acked,
            sent,
            writes,
            max_gap_us,
            thread: Some(thread),
        }
    }

    fn finish(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("the writer panicked"),
            None => Ok(()),
        }
    }
}

pub fn run(args: &DemoArgs, json: bool) -> Result<()> {
    let root = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let result = demo(&root, args, json);
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn say(json: bool, msg: impl AsRef<str>) {
    if !json {
        println!("{}", msg.as_ref());
        crate::sys::out::flush_stdout();
    }
}

fn demo(root: &Path, args: &DemoArgs, json: bool) -> Result<()> {
    let size = args.size.bytes();
    if size < 1 << 20 {
        bail!("--size must be at least 1 MiB");
    }
    let started = Instant::now();
    say(
        json,
        format!(
            "ferry demo: two nodes on 127.0.0.1, data in {}",
            root.display()
        ),
    );
    let a = start_node(root, "a")?;
    let b = start_node(root, "b")?;
    say(
        json,
        format!("  node a: API {}  NBD {}", a.api, a.nbd.display()),
    );
    say(
        json,
        format!("  node b: API {}  NBD {}", b.api, b.nbd.display()),
    );
    let (ca, cb) = (a.client()?, b.client()?);
    ca.post(
        "/api/v1/nodes",
        &json!({"name": "b", "api": b.api, "token": b.token, "fingerprint": b.fingerprint}),
    )
    .context("registering b with a")?;
    say(json, "  registered a ⇄ b (certificates pinned both ways)");
    ca.post(
        "/api/v1/volumes",
        &json!({"name": "demo", "size_bytes": size}),
    )?;
    ca.post(
        "/api/v1/workloads",
        &json!({"name": "app", "volumes": ["demo"]}),
    )?;
    say(
        json,
        format!("  volume demo ({}) on a, workload app", ByteSize(size)),
    );

    let slots = size / RECORD_BYTES as u64;
    let mut writer = Writer::start(vec![a.nbd.clone(), b.nbd.clone()], "demo", slots);
    std::thread::sleep(Duration::from_millis(500));
    say(
        json,
        format!(
            "  the application writes checksummed records through a's export ({} so far)",
            writer.writes.load(Ordering::Relaxed)
        ),
    );

    ca.post(
        "/api/v1/migrations",
        &json!({"workload": "app", "to": "b", "mode": "sync"}),
    )?;
    let tty = !json && std::io::stdout().is_terminal();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let st = ca.get("/api/v1/migrations/app")?;
        let phase = st["phase"].as_str().unwrap_or("?").to_string();
        let line = format!(
            "  migrating app a → b: {:<8} {:>10} left  {:>10}/s link  {:>10}/s writes  ETA {}",
            phase,
            ByteSize(st["bytes_remaining"].as_u64().unwrap_or(0)).to_string(),
            ByteSize(st["bandwidth_bytes_per_s"].as_u64().unwrap_or(0)).to_string(),
            ByteSize(st["write_rate_bytes_per_s"].as_u64().unwrap_or(0)).to_string(),
            st["eta_seconds"]
                .as_f64()
                .map_or("?".into(), |s| format!("{s:.0} s")),
        );
        if tty {
            print!("\x1b[2K\r{line}");
            crate::sys::out::flush_stdout();
        }
        if phase == "ready" {
            if tty {
                println!();
            } else {
                say(json, line);
            }
            break;
        }
        if Instant::now() > deadline {
            bail!("the migration did not become ready in 10 minutes: {st}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    say(json, "  cutting over while the application writes…");
    let report = ca.post("/api/v1/migrations/app/cutover", &json!({}))?;
    std::thread::sleep(Duration::from_millis(500));
    writer.finish()?;
    let downtime = report["downtime_ms"].as_f64().unwrap_or(f64::NAN);
    let gap_ms = writer.max_gap_us.load(Ordering::Relaxed) as f64 / 1000.0;
    let writes = writer.writes.load(Ordering::Relaxed);
    say(json, format!("  cut over: downtime {downtime:.1} ms (freeze at a → b serving); the application's longest wait between two acknowledged writes: {gap_ms:.1} ms"));

    // Every acknowledged record must be on b.
    let mut c = Client::connect_unix(&b.nbd, "demo", Duration::from_secs(30))
        .map_err(|e| anyhow!("b does not serve the volume after the cutover: {e}"))?;
    let acked = writer
        .acked
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let sent = writer
        .sent
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut buf = vec![0u8; RECORD_BYTES];
    let (mut checked, mut bad) = (0u64, Vec::new());
    for (slot, want) in acked.iter().enumerate() {
        let Some(want) = want else { continue };
        c.read(slot as u64 * RECORD_BYTES as u64, &mut buf)?;
        checked += 1;
        match check_record(&buf) {
            // A later record may have landed without its ack reaching us.
            Ok(seq) if seq == *want || sent[slot].is_some_and(|s| seq > *want && seq <= s) => {}
            Ok(seq) => bad.push(format!("slot {slot}: record {seq}, acknowledged {want}")),
            Err(why) => bad.push(format!("slot {slot}: {why}, acknowledged {want}")),
        }
    }
    c.disconnect();
    let roles = (
        ca.get("/api/v1/replications/demo")?["role"].clone(),
        cb.get("/api/v1/replications/demo")?["role"].clone(),
    );
    let summary = json!({
        "writes_acknowledged": writes,
        "slots_checked": checked,
        "records_missing_or_wrong": bad.len(),
        "downtime_ms": downtime,
        "app_max_wait_ms": gap_ms,
        "role_a": roles.0,
        "role_b": roles.1,
        "cutover": report,
        "seconds": started.elapsed().as_secs_f64(),
    });
    if !bad.is_empty() {
        for m in bad.iter().take(10) {
            eprintln!("  LOST: {m}");
        }
        bail!(
            "{} of {checked} acknowledged records are not on b",
            bad.len()
        );
    }
    if json {
        crate::sys::out::print_json(&summary)?;
    } else {
        println!("  verified on b: all {checked} slots hold their last acknowledged record ({writes} writes acknowledged in all)");
        println!(
            "  a is now the {} and b the {}; replication runs b → a",
            roles.0.as_str().unwrap_or("?"),
            roles.1.as_str().unwrap_or("?")
        );
        println!(
            "ferry demo: done in {:.1} s, nothing lost; cleaning up",
            started.elapsed().as_secs_f64()
        );
    }
    drop(a);
    drop(b);
    Ok(())
}
