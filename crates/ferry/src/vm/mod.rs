//! QEMU VMs of workloads: ferry starts `qemu-system-x86_64` itself, with the
//! VM's disks on this node's NBD exports (one virtio disk per volume, in the
//! workload's order, `cache=none`), and its serial console captured to
//! `DATA_DIR/vms/WORKLOAD/console.log`. Stopping sends SIGTERM (QEMU flushes
//! its disks and exits), then SIGKILL after the hook timeout.
//!
//! Each VM has a supervisor thread that spawned it and waits for it; the VM
//! is started with `PR_SET_PDEATHSIG`, so it dies with that thread (and with
//! the agent) instead of outliving it.
//!
//! Every VM has a QMP socket (`vms/INSTANCE/qmp.sock`, the directory 0700).
//! A live move (issue 23, [`live`]) starts the VM at the target paused and
//! waiting for its RAM (`-S -incoming defer`, [`Vms::start_incoming`]); the
//! workload's start at the target then continues that VM
//! ([`Vms::start`] finds it) instead of booting a new one.

pub mod live;
pub mod qmp;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_nbd::ListenAddr;

/// How to run a workload's VM: the API's type.
pub use ferry_api::request::VmSpec;

/// `[vm]`: how VMs move live, each limit with its unit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmSettings {
    /// The longest pause QEMU aims for when it stops the guest to send the
    /// last of its RAM (QEMU's `downtime-limit`).
    pub downtime_limit_ms: u64,
    /// QEMU throttles the guest's vCPUs when RAM does not converge (its
    /// `auto-converge`).
    pub auto_converge: bool,
    /// The RAM stream's rate limit (QEMU's `max-bandwidth`); 0: as fast as
    /// the link goes.
    pub max_bandwidth_bytes_per_s: u64,
    /// A live move whose RAM has not converged and completed this long
    /// after it began is cancelled; the guest goes on at the source.
    pub precopy_timeout_ms: u64,
    /// The target's VM must be up and waiting for the RAM within this long.
    pub incoming_timeout_ms: u64,
    /// Each QMP command's answer within this long.
    pub qmp_timeout_ms: u64,
    /// The RAM stream ends as failed when no byte went either way for this
    /// long (both ends).
    pub stream_idle_timeout_ms: u64,
    /// A live move flushes and drains its volumes with the guest paused:
    /// they give up after this long (at most the migration's
    /// `cutover_drain_timeout_ms`), and the guest goes on at the source.
    pub drain_timeout_ms: u64,
}

impl Default for VmSettings {
    fn default() -> Self {
        VmSettings {
            downtime_limit_ms: 300,
            auto_converge: true,
            max_bandwidth_bytes_per_s: 0,
            precopy_timeout_ms: 600_000,
            incoming_timeout_ms: 10_000,
            qmp_timeout_ms: 10_000,
            stream_idle_timeout_ms: 60_000,
            drain_timeout_ms: 5_000,
        }
    }
}

/// A running VM.
#[derive(Debug)]
struct VmProc {
    child: Arc<Mutex<std::process::Child>>,
    qmp: PathBuf,
    /// Started paused, waiting for a live move's RAM (not yet continued).
    incoming: std::sync::atomic::AtomicBool,
    /// The move it waits for was committed here ([`Vms::arm_incoming`]):
    /// only then does the workload's start continue it.
    armed: std::sync::atomic::AtomicBool,
    /// A waiting VM's QMP connection, kept open from its start so that its
    /// `cont` (inside the guest's pause) does not pay for a new one.
    waiting_qmp: Mutex<Option<qmp::Qmp>>,
}

/// Running VMs of this node, by workload.
#[derive(Debug, Default)]
pub struct Vms {
    running: Mutex<HashMap<String, Arc<VmProc>>>,
    /// Live moves under way from here, by workload (`migrate status`).
    moves: Mutex<HashMap<String, live::SharedProgress>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Signals `child` if it has not exited (and so was not reaped): the caller
/// holds its lock, so the supervisor cannot reap it meanwhile.
fn signal(child: &mut std::process::Child, sig: i32) {
    if matches!(child.try_wait(), Ok(None)) {
        // SAFETY: kill(2) on the PID of our own child, which try_wait just
        // found running and which nobody can reap while we hold its lock.
        unsafe {
            libc::kill(child.id() as i32, sig);
        }
    }
}

fn nbd_uri(base: &ListenAddr, volume: &str) -> String {
    match base {
        ListenAddr::Tcp(a) => format!("nbd://{a}/{volume}"),
        ListenAddr::Unix(p) => format!("nbd+unix:///{volume}?socket={}", p.display()),
    }
}

/// `vms/INSTANCE/console.log`, where the instance is a workload's name, or
/// `NAME@test` for its test instance: the name is checked before it
/// becomes a path.
fn console_path(data_dir: &std::path::Path, instance: &str) -> Result<PathBuf> {
    Ok(vm_dir(data_dir, instance)?.join("console.log"))
}

/// `vms/INSTANCE`, the name checked (see [`console_path`]).
pub fn vm_dir(data_dir: &std::path::Path, instance: &str) -> Result<PathBuf> {
    let (base, test) = match instance.strip_suffix("@test") {
        Some(b) => (b, true),
        None => (instance, false),
    };
    let name = ferry_core::Name::parse(base)?;
    let dir = if test {
        format!("{name}@test")
    } else {
        name.into_string()
    };
    Ok(data_dir.join("vms").join(dir))
}

impl Vms {
    pub fn is_running(&self, workload: &str) -> bool {
        lock(&self.running).contains_key(workload)
    }

    /// The progress slot of a live move of `workload` from here.
    pub fn move_progress_slot(&self, workload: &str) -> live::SharedProgress {
        lock(&self.moves)
            .entry(workload.to_string())
            .or_default()
            .clone()
    }

    /// A live move of `workload` under way from here: QEMU's figures.
    pub fn move_progress(&self, workload: &str) -> Option<ferry_api::reply::VmMoveProgress> {
        let slot = lock(&self.moves).get(workload).cloned()?;
        let p = lock(&slot).clone();
        p
    }

    /// Whether the VM of `workload` runs here paused, waiting for (or
    /// holding) a live move's RAM.
    pub fn is_incoming(&self, workload: &str) -> bool {
        lock(&self.running)
            .get(workload)
            .is_some_and(|p| p.incoming.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// The QMP socket of the running VM of `workload`.
    pub fn qmp_path(&self, workload: &str) -> Option<PathBuf> {
        lock(&self.running).get(workload).map(|p| p.qmp.clone())
    }

    /// The live move the waiting VM of `workload` holds was committed here
    /// (a cutover's takeover with its token, an HA hand-over): the next
    /// [`Vms::start`] continues it. `false` when no VM waits.
    pub fn arm_incoming(&self, workload: &str) -> bool {
        match lock(&self.running).get(workload) {
            Some(p) if p.incoming.load(std::sync::atomic::Ordering::SeqCst) => {
                p.armed.store(true, std::sync::atomic::Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }

    fn is_armed(&self, workload: &str) -> bool {
        lock(&self.running)
            .get(workload)
            .is_some_and(|p| p.armed.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Starts the VM of `workload` on this node's exports of `volumes`. A VM
    /// a live move brought here whose move was committed here
    /// ([`Vms::arm_incoming`]; paused, its RAM complete) is continued
    /// instead. Any other waiting VM holds a state that may be stale (a move
    /// aborted after its RAM arrived, its cancel lost): it is ended and the
    /// VM booted anew from the disks; so is one whose move did not
    /// complete.
    pub fn start(
        self: &Arc<Self>,
        data_dir: &std::path::Path,
        nbd: &ListenAddr,
        workload: &str,
        volumes: &[String],
        spec: &VmSpec,
        settings: &VmSettings,
    ) -> Result<()> {
        if self.is_incoming(workload) {
            if !self.is_armed(workload) {
                tracing::warn!(workload, "vm.incoming.stale: a VM waited here for a move that was not committed here; ended, booting anew");
                self.kill(workload);
            } else {
                match self.continue_incoming(workload, settings) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        tracing::warn!(workload, error = %format!("{e:#}"), "vm.incoming.not_continued: booting it anew");
                        self.kill(workload);
                    }
                }
            }
        }
        self.spawn(data_dir, nbd, workload, volumes, spec, false)
    }

    /// Starts the VM of `workload` paused and waiting for a live move's RAM
    /// (`-S -incoming defer`), listening for the stream on
    /// `vms/W/incoming.sock`; returns that socket's path.
    pub fn start_incoming(
        self: &Arc<Self>,
        data_dir: &std::path::Path,
        nbd: &ListenAddr,
        workload: &str,
        volumes: &[String],
        spec: &VmSpec,
        settings: &VmSettings,
    ) -> Result<PathBuf> {
        self.spawn(data_dir, nbd, workload, volumes, spec, true)?;
        let set_up = (|| {
            let qmp_path = self
                .qmp_path(workload)
                .ok_or_else(|| anyhow!("the VM of {workload:?} exited at once"))?;
            let mut q = connect_qmp(&qmp_path, settings)?;
            // The drives are activated at `cont`, after ferry's commit, not
            // when the RAM is in (the exports refuse writes until then).
            q.execute(
                "migrate-set-capabilities",
                serde_json::json!({"capabilities": [
                    {"capability": "late-block-activate", "state": true},
                    {"capability": "events", "state": true},
                ]}),
            )?;
            let sock = vm_dir(data_dir, workload)?.join("incoming.sock");
            let _ = std::fs::remove_file(&sock);
            q.execute(
                "migrate-incoming",
                serde_json::json!({"uri": format!("unix:{}", sock.display())}),
            )?;
            if let Some(p) = lock(&self.running).get(workload) {
                *lock(&p.waiting_qmp) = Some(q);
            }
            anyhow::Ok(sock)
        })();
        if set_up.is_err() {
            self.kill(workload);
        }
        set_up
    }

    /// Continues the paused VM a live move brought here, once QEMU has
    /// loaded all of its state (waits up to `incoming_timeout_ms`).
    fn continue_incoming(&self, workload: &str, settings: &VmSettings) -> Result<()> {
        let qmp_path = self
            .qmp_path(workload)
            .ok_or_else(|| anyhow!("no VM of {workload:?} runs here"))?;
        let kept = lock(&self.running)
            .get(workload)
            .and_then(|p| lock(&p.waiting_qmp).take());
        let mut q = match kept {
            Some(q) => q,
            None => connect_qmp(&qmp_path, settings)?,
        };
        let deadline = Instant::now() + Duration::from_millis(settings.incoming_timeout_ms);
        loop {
            let st = q.execute("query-status", serde_json::Value::Null)?;
            let status = st["status"].as_str().unwrap_or("");
            // `inmigrate` while the RAM arrives; `paused` (`-S`) once all is in.
            if status == "paused" || status == "prelaunch" && migration_completed(&mut q) {
                break;
            }
            if status != "inmigrate" && status != "prelaunch" {
                bail!("the incoming VM of {workload:?} is {status}, not paused with its RAM in");
            }
            if Instant::now() > deadline {
                bail!(
                    "the incoming VM of {workload:?} did not receive all of its state in {} ms (it is {status})",
                    settings.incoming_timeout_ms
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        q.execute("cont", serde_json::Value::Null)?;
        if let Some(p) = lock(&self.running).get(workload) {
            p.incoming.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        tracing::info!(workload, "vm.continued: the live move's VM runs here");
        Ok(())
    }

    /// Ends the VM of `workload` at once (SIGKILL): a live move's VM that
    /// will not run here. `false` when none ran.
    pub fn kill(&self, workload: &str) -> bool {
        let Some(p) = lock(&self.running).get(workload).cloned() else {
            return false;
        };
        signal(&mut lock(&p.child), libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.is_running(workload) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        tracing::info!(workload, "vm.killed");
        true
    }

    fn spawn(
        self: &Arc<Self>,
        data_dir: &std::path::Path,
        nbd: &ListenAddr,
        workload: &str,
        volumes: &[String],
        spec: &VmSpec,
        incoming: bool,
    ) -> Result<()> {
        if self.is_running(workload) {
            bail!("the VM of {workload:?} already runs here");
        }
        for f in spec.kernel.iter().chain(&spec.initrd) {
            if !std::path::Path::new(f).is_file() {
                bail!("VM file {f} does not exist on this node");
            }
        }
        let console = console_path(data_dir, workload)?;
        let dir = vm_dir(data_dir, workload)?;
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            // The QMP and migration sockets live here: the agent's user only.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let qmp = dir.join("qmp.sock");
        // sockaddr_un holds 107 bytes of path: QEMU could not bind a longer one.
        let longest = dir.join("incoming.sock");
        if longest.as_os_str().len() > SOCKET_PATH_BYTES_MAX {
            bail!(
                "the VM's socket path {} is longer than {SOCKET_PATH_BYTES_MAX} bytes (a Unix socket's limit): use a shorter data_dir or workload name",
                longest.display()
            );
        }
        let _ = std::fs::remove_file(&qmp);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console)
            .with_context(|| format!("cannot open {}", console.display()))?;
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-nographic", "-no-reboot", "-accel"])
            .arg(spec.accel.as_deref().unwrap_or("tcg"))
            .arg("-m")
            .arg(spec.memory_mib.to_string());
        if let Some(k) = &spec.kernel {
            c.arg("-kernel").arg(k);
        }
        if let Some(i) = &spec.initrd {
            c.arg("-initrd").arg(i);
        }
        if let Some(a) = &spec.append {
            c.arg("-append").arg(a);
        }
        for v in volumes {
            c.arg("-drive").arg(format!(
                "file={},format=raw,if=virtio,cache=none",
                nbd_uri(nbd, v)
            ));
        }
        c.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if incoming {
            c.args(["-S", "-incoming", "defer"]);
        }
        c.args(&spec.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl(2) with PR_SET_PDEATHSIG only sets a flag of the
        // child, and the signal mask is reset (QEMU must see SIGTERM: the
        // agent blocks it in every thread); both are async-signal-safe and
        // touch no memory of ours.
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                crate::sys::signals::unblock_all_in_child()
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let me = self.clone();
        let name = workload.to_string();
        let qmp_path = qmp.clone();
        std::thread::Builder::new()
            .name(format!("vm-{workload}"))
            .spawn(move || {
                let child = match c.spawn() {
                    Ok(ch) => Arc::new(Mutex::new(ch)),
                    Err(e) => {
                        let _ = tx.send(Err(anyhow!("cannot start qemu-system-x86_64: {e}")));
                        return;
                    }
                };
                lock(&me.running).insert(
                    name.clone(),
                    Arc::new(VmProc {
                        child: child.clone(),
                        qmp: qmp_path,
                        incoming: std::sync::atomic::AtomicBool::new(incoming),
                        armed: std::sync::atomic::AtomicBool::new(false),
                        waiting_qmp: Mutex::new(None),
                    }),
                );
                let _ = tx.send(Ok(()));
                // Poll rather than wait(): stop() signals under the same lock,
                // so a PID is never signalled after it was reaped.
                let status = loop {
                    let st = {
                        let mut ch = lock(&child);
                        let st = ch.try_wait();
                        if !matches!(st, Ok(None)) {
                            lock(&me.running).remove(&name);
                        }
                        st
                    };
                    match st {
                        Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                        other => break other,
                    }
                };
                tracing::info!(workload = %name, status = ?status, "vm.exited");
            })?;
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("the VM supervisor did not report"))??;
        // A VM that dies at once (a bad argument) is an error. This wait is
        // part of a cutover's downtime, so it is short. An incoming VM is
        // waited for until its QMP socket answers (below, by the caller).
        if incoming {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !qmp.exists() && self.is_running(workload) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
        if !self.is_running(workload) {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            let tail: String = text
                .chars()
                .rev()
                .take(2000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            bail!(
                "the VM exited at once; its console ({}):\n{tail}",
                console.display()
            );
        }
        tracing::info!(workload, console = %console.display(), "vm.started");
        Ok(())
    }

    /// Stops the VM of `workload`: SIGTERM, then SIGKILL after `timeout`.
    /// `Ok(false)` when none ran.
    pub fn stop(&self, workload: &str, timeout: Duration) -> Result<bool> {
        let Some(p) = lock(&self.running).get(workload).cloned() else {
            return Ok(false);
        };
        let child = p.child.clone();
        signal(&mut lock(&child), libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        while self.is_running(workload) {
            if Instant::now() > deadline {
                signal(&mut lock(&child), libc::SIGKILL);
                std::thread::sleep(Duration::from_millis(100));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::info!(workload, "vm.stopped");
        Ok(true)
    }
}

/// The longest Unix socket path (`sockaddr_un.sun_path` less its NUL).
const SOCKET_PATH_BYTES_MAX: usize = 107;

/// A QMP connection with the node's QMP timeout.
pub fn connect_qmp(path: &std::path::Path, settings: &VmSettings) -> Result<qmp::Qmp> {
    let t = Duration::from_millis(settings.qmp_timeout_ms);
    let deadline = Instant::now() + t;
    loop {
        match qmp::Qmp::connect(path, t) {
            Ok(q) => return Ok(q),
            // QEMU creates the socket early in its start: retry briefly.
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "vm.qmp.retry");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether QEMU's (incoming) migration says `completed`.
fn migration_completed(q: &mut qmp::Qmp) -> bool {
    q.execute("query-migrate", serde_json::Value::Null)
        .is_ok_and(|m| m["status"] == "completed")
}

#[cfg(test)]
mod console_tests {
    use super::console_path;

    #[test]
    fn a_test_instance_has_its_own_console_and_names_stay_checked() {
        let d = std::path::Path::new("/d");
        assert_eq!(
            console_path(d, "vm").unwrap(),
            std::path::Path::new("/d/vms/vm/console.log")
        );
        assert_eq!(
            console_path(d, "vm@test").unwrap(),
            std::path::Path::new("/d/vms/vm@test/console.log")
        );
        for bad in ["../x", "../x@test", "a@b", "@test", "a/b@test"] {
            assert!(console_path(d, bad).is_err(), "{bad}");
        }
    }
}
