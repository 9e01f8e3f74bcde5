//! QEMU VMs of workloads: ferry starts `qemu-system-x86_64` itself, with the
//! VM's disks on this node's NBD exports (one virtio disk per volume, in the
//! workload's order, `cache=none`), and its serial console captured to
//! `DATA_DIR/vms/WORKLOAD/console.log`. Stopping sends SIGTERM (QEMU flushes
//! its disks and exits), then SIGKILL after the hook timeout.
//!
//! Each VM has a supervisor thread that spawned it and waits for it; the VM
//! is started with `PR_SET_PDEATHSIG`, so it dies with that thread (and with
//! the agent) instead of outliving it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_nbd::ListenAddr;

/// How to run a workload's VM: the API's type.
pub use ferry_api::request::VmSpec;

pub mod qmp;

/// Running VMs of this node, by workload.
#[derive(Debug, Default)]
pub struct Vms {
    running: Mutex<HashMap<String, Arc<Mutex<std::process::Child>>>>,
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
    Ok(data_dir.join("vms").join(dir).join("console.log"))
}

impl Vms {
    pub fn is_running(&self, workload: &str) -> bool {
        lock(&self.running).contains_key(workload)
    }

    /// Starts the VM of `workload` on this node's exports of `volumes`.
    pub fn start(
        self: &Arc<Self>,
        data_dir: &std::path::Path,
        nbd: &ListenAddr,
        workload: &str,
        volumes: &[String],
        spec: &VmSpec,
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
        std::fs::create_dir_all(console.parent().unwrap_or(data_dir))?;
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
        c.args(&spec.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl(2) with PR_SET_PDEATHSIG only sets a flag of the
        // child; it is async-signal-safe and touches no memory of ours.
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let me = self.clone();
        let name = workload.to_string();
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
                lock(&me.running).insert(name.clone(), child.clone());
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
        // part of a cutover's downtime, so it is short.
        std::thread::sleep(Duration::from_millis(100));
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
        let Some(child) = lock(&self.running).get(workload).cloned() else {
            return Ok(false);
        };
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
