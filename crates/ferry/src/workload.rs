//! Workloads: a named set of volumes and shares plus hooks (`start`,
//! `stop`, `check`: shell commands run with a timeout, their output
//! captured) and an optional QEMU VM. Definitions are records in
//! `DATA_DIR/workloads/` on every node that holds the workload.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use ferry_core::Name;

/// What a hook needs of the node it runs on.
#[derive(Debug, Clone, Copy)]
pub struct HookEnv<'a> {
    pub node_name: &'a str,
    pub data_dir: &'a Path,
    /// Where this node's NBD exports are (`nbd+unix://` URIs).
    pub nbd_uri_base: &'a ferry_nbd::ListenAddr,
    pub vms: &'a std::sync::Arc<crate::vm::Vms>,
    /// `[vm]`: QMP timeouts, live moves.
    pub vm_settings: &'a crate::vm::VmSettings,
}

/// Longest hook output kept (its tail).
const HOOK_OUTPUT_BYTES_MAX: usize = 16 * 1024;

/// A workload's definition: the API's type, also its record on disk.
pub use ferry_api::request::WorkloadSpec;

/// Refuses a definition that cannot work, saying why.
pub fn validate(spec: &WorkloadSpec) -> Result<()> {
    if spec.volumes.is_empty() && spec.shares.is_empty() {
        bail!(
            "workload {:?} needs at least one volume or share (--volume NAME, --share NAME)",
            spec.name
        );
    }
    for (i, v) in spec.volumes.iter().enumerate() {
        if spec.volumes[..i].contains(v) {
            bail!("workload {:?} names volume {v:?} twice", spec.name);
        }
    }
    for (i, s) in spec.shares.iter().enumerate() {
        if spec.shares[..i].contains(s) {
            bail!("workload {:?} names share {s:?} twice", spec.name);
        }
    }
    if let Some(vip) = &spec.vip {
        let (addr, prefix) = vip.split_once('/').ok_or_else(|| {
            anyhow!("virtual IP {vip:?} must be ADDR/PREFIX, e.g. 198.18.0.10/24")
        })?;
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|_| anyhow!("virtual IP {vip:?}: {addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        match prefix.parse::<u8>() {
            Ok(p) if p <= max => {}
            _ => bail!("virtual IP {vip:?}: the prefix must be 0 to {max}"),
        }
        match &spec.vip_interface {
            None => bail!("virtual IP {vip:?} needs --vip-interface IFACE (where to add it)"),
            Some(i)
                if i.is_empty()
                    || i.len() > 15
                    || !i
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b)) =>
            {
                bail!("--vip-interface {i:?} is not an interface name")
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Names as plain strings, for code that keys maps or JSON by them.
pub fn names(n: &[Name]) -> Vec<String> {
    n.iter().map(|n| n.to_string()).collect()
}

fn workloads_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("workloads")
}

/// Saves a workload definition (atomically).
pub fn save_workload(data_dir: &Path, spec: &WorkloadSpec) -> Result<()> {
    if spec.volumes.is_empty() && spec.shares.is_empty() {
        bail!("a workload needs at least one volume or share (--volume NAME, --share NAME)");
    }
    let dir = workloads_dir(data_dir);
    std::fs::create_dir_all(&dir)?;
    Ok(crate::store::save(
        &dir.join(format!("{}.json", spec.name)),
        spec,
    )?)
}

impl crate::store::Record for WorkloadSpec {
    const KIND: &'static str = "workload";
}

pub fn load_workload(data_dir: &Path, name: &str) -> Result<Option<WorkloadSpec>> {
    crate::volume::validate_name(name)
        .map_err(|_| anyhow!("{name:?} is not a valid workload name"))?;
    let path = workloads_dir(data_dir).join(format!("{name}.json"));
    Ok(crate::store::load(&path)?)
}

pub fn list_workloads(data_dir: &Path) -> Result<Vec<WorkloadSpec>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(workloads_dir(data_dir)) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if let Some(name) = n.strip_suffix(".json") {
            // One damaged definition must not hide the others.
            match load_workload(data_dir, name) {
                Ok(Some(w)) => out.push(w),
                Ok(None) => {}
                Err(e) => tracing::error!(workload = name, error = %format!("{e:#}"),
                    "workload.damaged: left out; repair or delete its file"),
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

pub fn delete_workload(data_dir: &Path, name: &str) -> Result<bool> {
    crate::volume::validate_name(name)
        .map_err(|_| anyhow!("{name:?} is not a valid workload name"))?;
    match std::fs::remove_file(workloads_dir(data_dir).join(format!("{name}.json"))) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// What a hook did (the API's type: hooks are part of replies).
pub use ferry_api::reply::HookRun;

/// Runs `cmd` with `sh -c` in its own process group, killed (the whole
/// group) after `timeout`.
pub fn run_hook(hook: &str, cmd: &str, timeout: Duration, env: &[(&str, &str)]) -> HookRun {
    use std::os::unix::process::CommandExt;
    let started = Instant::now();
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and only
    // resets the signal mask (async-signal-safe): a hook, and what it
    // starts, must see SIGTERM, which the agent blocks in every thread.
    unsafe {
        c.pre_exec(crate::sys::signals::unblock_all_in_child);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let failed = |why: String| HookRun {
        hook: hook.to_string(),
        ok: false,
        exit_code: None,
        timed_out: false,
        elapsed_ms: started.elapsed().as_millis() as u64,
        output: why,
    };
    let mut child = match c.spawn() {
        Ok(ch) => ch,
        Err(e) => return failed(format!("cannot run sh: {e}")),
    };
    // Collect output on threads, so a chatty hook never blocks on a full pipe.
    let collect = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = r.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > 2 * HOOK_OUTPUT_BYTES_MAX {
                        buf.drain(..buf.len() - HOOK_OUTPUT_BYTES_MAX);
                    }
                }
            }
            buf
        })
    };
    let out = collect(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = collect(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = started + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                // SAFETY: kill(2) with a negative pid signals the hook's own
                // process group (made by process_group(0) above); no memory is
                // touched.
                unsafe {
                    libc::kill(-(child.id() as i32), libc::SIGKILL);
                }
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => break None,
        }
    };
    let mut output = out.join().unwrap_or_default();
    output.extend(err.join().unwrap_or_default());
    if output.len() > HOOK_OUTPUT_BYTES_MAX {
        output.drain(..output.len() - HOOK_OUTPUT_BYTES_MAX);
    }
    let exit_code = status.and_then(|s| s.code());
    HookRun {
        hook: hook.to_string(),
        ok: !timed_out && exit_code == Some(0),
        exit_code,
        timed_out,
        elapsed_ms: started.elapsed().as_millis() as u64,
        output: String::from_utf8_lossy(&output).into_owned(),
    }
}

/// Runs one of a workload's actions on this node: `start` runs the start
/// hook, then starts the VM; `stop` stops the VM, then runs the stop hook;
/// `check` runs the check hook. `None` when there is nothing to run.
pub fn workload_hook(
    env: &HookEnv<'_>,
    spec: &WorkloadSpec,
    which: &str,
    role: &str,
) -> Option<HookRun> {
    run_action(env, spec, which, role, true)
}

/// Like [`workload_hook`] without the VM: only the shell hook. A live VM
/// move runs the stop hook once the VM's RAM has moved (the guest is
/// paused, it never stops) and the start hook at the source again on a
/// rollback; the VM itself moves or continues on its own.
pub fn workload_shell_hook(
    env: &HookEnv<'_>,
    spec: &WorkloadSpec,
    which: &str,
    role: &str,
) -> Option<HookRun> {
    run_action(env, spec, which, role, false)
}

fn run_action(
    env: &HookEnv<'_>,
    spec: &WorkloadSpec,
    which: &str,
    role: &str,
    with_vm: bool,
) -> Option<HookRun> {
    let cmd = match which {
        "start" => spec.start.as_deref(),
        "stop" => spec.stop.as_deref(),
        "check" => spec.check.as_deref(),
        _ => None,
    };
    let timeout = Duration::from_millis(spec.hook_timeout_ms);
    // A test instance runs on the test overlays, under its own VM name.
    let (instance, exports): (String, Vec<String>) = if role == "test" {
        (
            test_export(&spec.name),
            spec.volumes.iter().map(|v| test_export(v)).collect(),
        )
    } else {
        (spec.name.to_string(), names(&spec.volumes))
    };
    let uris: Vec<String> = exports.iter().map(|e| env.nbd_uri_base.uri(e)).collect();
    let uris = uris.join(" ");
    // Where the workload's shares are used on this node (their records'
    // paths: a sync share's mount point).
    let store = crate::share::ShareStore::new(env.data_dir);
    let share_paths: Vec<String> = spec
        .shares
        .iter()
        .filter_map(|s| store.load(s).ok())
        .map(|r| r.path.to_string_lossy().into_owned())
        .collect();
    let share_paths = share_paths.join(" ");
    let vm = |what: &str| -> Option<HookRun> {
        let vm = spec.vm.as_ref().filter(|_| with_vm)?;
        let started = Instant::now();
        let r = match what {
            "start" => env
                .vms
                .start(
                    env.data_dir,
                    env.nbd_uri_base,
                    &instance,
                    &exports,
                    vm,
                    env.vm_settings,
                )
                .map(|()| "VM started".to_string()),
            _ => env
                .vms
                .stop(&instance, timeout)
                .map(|ran| if ran { "VM stopped" } else { "no VM ran here" }.to_string()),
        };
        Some(HookRun {
            hook: format!("vm-{what}"),
            ok: r.is_ok(),
            exit_code: None,
            timed_out: false,
            elapsed_ms: started.elapsed().as_millis() as u64,
            output: r.unwrap_or_else(|e| format!("{e:#}")),
        })
    };
    let hook = |cmd: Option<&str>| -> Option<HookRun> {
        let run = run_hook(
            which,
            cmd?,
            timeout,
            &[
                ("FERRY_WORKLOAD", &spec.name),
                ("FERRY_NODE", env.node_name),
                ("FERRY_ROLE", role),
                ("FERRY_VOLUME_URIS", &uris),
                ("FERRY_SHARE_PATHS", &share_paths),
            ],
        );
        tracing::info!(workload = %spec.name, hook = which, ok = run.ok, exit_code = ?run.exit_code,
            timed_out = run.timed_out, elapsed_ms = run.elapsed_ms, "workload.hook");
        Some(run)
    };
    let (first, second) = match which {
        "start" => {
            let h = hook(cmd);
            if h.as_ref().is_some_and(|h| !h.ok) {
                return h;
            }
            (h, vm("start"))
        }
        "stop" => {
            let v = vm("stop");
            (v, hook(cmd))
        }
        _ => (hook(cmd), None),
    };
    match (first, second) {
        (Some(a), Some(b)) => Some(HookRun {
            hook: format!("{}+{}", a.hook, b.hook),
            ok: a.ok && b.ok,
            exit_code: b.exit_code.or(a.exit_code),
            timed_out: a.timed_out || b.timed_out,
            elapsed_ms: a.elapsed_ms + b.elapsed_ms,
            output: format!("{}\n{}", a.output, b.output),
        }),
        (a, b) => a.or(b),
    }
}

/// The export name of a volume's test overlay.
pub fn test_export(volume: &str) -> String {
    format!("{volume}@test")
}

#[cfg(test)]
mod signal_tests {
    use super::run_hook;
    use std::time::Duration;

    #[test]
    fn a_hook_sees_sigterm_although_the_agent_blocks_it() {
        // The agent blocks SIGTERM in every thread (sys::signals); a child
        // inherits the mask. Block it here the same way, then run a hook
        // that sends itself SIGTERM: it must die at once, not sleep on.
        let _blocked = crate::sys::signals::Signals::block().unwrap();
        let run = run_hook(
            "stop",
            "kill -TERM $$; sleep 10; echo survived",
            Duration::from_secs(20),
            &[],
        );
        assert!(!run.output.contains("survived"), "{run:?}");
        assert!(run.elapsed_ms < 5_000, "{run:?}");
    }
}
