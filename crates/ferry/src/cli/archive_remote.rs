//! The agent's side of `ferry archive`: archives of live volumes and
//! workloads, restores into a volume, each a job in the agent whose
//! progress and ETA the CLI follows (`GET /api/v1/archive-jobs/{name}`).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ferry_api::reply as r;
use ferry_api::request as q;
use ferry_api::{Action, Reply};
use ferry_core::ByteSize;

use crate::cli::remote::{client, name, print};
use crate::cli::AgentConn;
use crate::transport::client::ApiClient;

/// The store as the agent sees it: an absolute path (the agent runs with
/// its own working directory).
fn abs(store: &Path) -> Result<String> {
    let p = if store.is_absolute() {
        store.to_path_buf()
    } else {
        std::env::current_dir()?.join(store)
    };
    p.to_str()
        .map(String::from)
        .ok_or_else(|| anyhow::anyhow!("the store path {} is not UTF-8", p.display()))
}

/// `ferry archive create volume/V|workload/W|share/S --to STORE`:
/// `source` is `(kind, name)`.
pub fn create(
    source: (&str, &str),
    store: &Path,
    archive: Option<&str>,
    conn: &AgentConn,
    data_dir: &Path,
    json: bool,
) -> Result<()> {
    let c = client(conn, data_dir)?;
    let req = q::CreateArchive {
        source: format!("{}/{}", source.0, source.1),
        store: abs(store)?,
        name: archive.map(name).transpose()?,
    };
    let job = match c.send(&Action::CreateArchive(req))? {
        Reply::ArchiveJobStarted(j) => j,
        other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
    };
    if !json {
        eprintln!(
            "archiving {} at a flush barrier as {} in {} (writes go on)",
            job.source, job.archive, job.store
        );
    }
    finish(follow(&c, &job.name, json)?, json)
}

/// `ferry archive restore NAME --store STORE --volume V [--replica-of NODE]`.
#[allow(clippy::too_many_arguments)]
pub fn restore_volume(
    archive: &str,
    store: &Path,
    volume: &str,
    disk: Option<&str>,
    replica_of: Option<&str>,
    conn: &AgentConn,
    data_dir: &Path,
    json: bool,
) -> Result<()> {
    let c = client(conn, data_dir)?;
    let req = q::RestoreArchive {
        store: abs(store)?,
        archive: name(archive)?,
        volume: Some(name(volume)?),
        workload: None,
        disk: disk.map(String::from),
        replica_of: replica_of.map(name).transpose()?,
    };
    let job = match c.send(&Action::RestoreArchive(req))? {
        Reply::RestoreJobStarted(j) => j,
        other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
    };
    if !json {
        eprintln!(
            "restoring archive {} into volume {}",
            job.archive, job.source
        );
    }
    finish(follow(&c, &job.name, json)?, json)
}

/// `ferry workload create W --from-archive NAME --store STORE [--run]`
/// (I2V): every disk restored as a volume, the definition as archived
/// (`vm`: replaces the archived VM), then started if `run`.
#[allow(clippy::too_many_arguments)]
pub fn restore_workload(
    archive: &str,
    store: &Path,
    workload: &str,
    vm: Option<q::VmSpec>,
    run: bool,
    conn: &AgentConn,
    data_dir: &Path,
    json: bool,
) -> Result<()> {
    let c = client(conn, data_dir)?;
    let w = name(workload)?;
    let req = q::RestoreArchive {
        store: abs(store)?,
        archive: name(archive)?,
        volume: None,
        workload: Some(w.clone()),
        disk: None,
        replica_of: None,
    };
    let job = match c.send(&Action::RestoreArchive(req))? {
        Reply::RestoreJobStarted(j) => j,
        other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
    };
    if !json {
        eprintln!(
            "restoring archive {} as workload {workload} (volumes {})",
            job.archive, job.source
        );
    }
    let j = follow(&c, &job.name, json)?;
    if j.state != "done" {
        return finish(j, json);
    }
    let mut spec = match c.send(&Action::GetWorkload { name: w.clone() })? {
        Reply::Workload(s) => s,
        other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
    };
    if vm.is_some() {
        spec.vm = vm;
        match c.send(&Action::PutWorkload {
            name: w.clone(),
            forwarded: false,
            spec: spec.clone(),
        })? {
            Reply::WorkloadUpdated(_) => {}
            other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
        }
    }
    let started = if run {
        match c.send(&Action::RunHook {
            name: w.clone(),
            which: q::HookName::Start,
            req: q::HookRequest {
                role: Some("primary".into()),
            },
        })? {
            Reply::Hook(h) => Some(h),
            other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
        }
    } else {
        None
    };
    let out = serde_json::json!({"job": j, "workload": spec, "started": started});
    print(&out, json, |_| {
        println!(
            "workload {workload} created from archive {} (volumes {}; {}){}",
            j.archive,
            spec.volumes
                .iter()
                .map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if spec.vm.is_some() {
                "a QEMU VM"
            } else {
                "no VM"
            },
            if run { "; started" } else { "" }
        )
    })
}

/// `ferry archive jobs`: the agent's archive jobs.
pub fn jobs(conn: &AgentConn, data_dir: &Path, json: bool) -> Result<()> {
    match client(conn, data_dir)?.send(&Action::ListArchiveJobs)? {
        Reply::ArchiveJobs(js) => print(&js, json, |js| {
            if js.is_empty() {
                println!("no archive jobs since the agent started");
            }
            for j in js {
                println!(
                    "{:<32} {:<8} {:<8} {} {} of {}{}",
                    j.name,
                    j.kind,
                    j.state,
                    j.source,
                    ByteSize(j.done_bytes),
                    ByteSize(j.total_bytes),
                    j.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
        }),
        other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
    }
}

fn eta(s: Option<f64>) -> String {
    match s {
        Some(s) if s.is_finite() => crate::cli::estimate::dur(s),
        _ => "—".into(),
    }
}

/// Polls the job until it ends, with a progress line on stderr (a
/// terminal's line is rewritten in place).
fn follow(c: &ApiClient, job: &str, json: bool) -> Result<r::ArchiveJob> {
    let tty = !json && unsafe_isatty();
    let started = Instant::now();
    let mut last_line = Instant::now() - Duration::from_secs(10);
    loop {
        let j = match c.send(&Action::GetArchiveJob { name: name(job)? })? {
            Reply::ArchiveJob(j) => j,
            other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
        };
        if j.state != "running" {
            if tty {
                eprintln!();
            }
            return Ok(j);
        }
        if !json && (tty || last_line.elapsed() >= Duration::from_secs(5)) {
            last_line = Instant::now();
            let pct = if j.total_bytes > 0 {
                100.0 * j.done_bytes as f64 / j.total_bytes as f64
            } else {
                0.0
            };
            let line = format!(
                "{:5.1}%  {} of {}  {}/s  ETA {}  ({} elapsed)",
                pct,
                ByteSize(j.done_bytes),
                ByteSize(j.total_bytes),
                ByteSize(j.bytes_per_s as u64),
                eta(j.eta_s),
                crate::cli::estimate::dur(started.elapsed().as_secs_f64())
            );
            if tty {
                eprint!("\r{line}\x1b[K");
                let _ = std::io::stderr().flush();
            } else {
                eprintln!("{line}");
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn unsafe_isatty() -> bool {
    // SAFETY: isatty only reads the descriptor's state.
    unsafe { libc::isatty(2) == 1 }
}

fn finish(j: r::ArchiveJob, json: bool) -> Result<()> {
    let failed = j.state != "done";
    print(&j, json, |j| {
        if j.state == "done" {
            match j.kind.as_str() {
                "create" => {
                    println!(
                        "archive {} in {}: {} ({}), {} chunks, {} new ({} stored)",
                        j.archive,
                        j.store,
                        j.source,
                        j.consistency.as_deref().unwrap_or("?"),
                        j.chunks,
                        j.new_chunks,
                        ByteSize(j.new_stored_bytes)
                    );
                    for d in &j.disks {
                        println!(
                            "  disk {}: {}, Merkle root {}, generation {}",
                            d.name,
                            ByteSize(d.size_bytes),
                            d.merkle_root,
                            d.generation.as_deref().unwrap_or("—")
                        );
                    }
                }
                _ => println!(
                    "volume {} restored from archive {} ({} checked against its Merkle root)",
                    j.source,
                    j.archive,
                    ByteSize(j.total_bytes)
                ),
            }
        } else {
            eprintln!(
                "archive job {} failed: {}",
                j.name,
                j.error.as_deref().unwrap_or("no reason given")
            );
        }
    })?;
    if failed {
        // Printed above; exit 1 without a second message.
        std::process::exit(1);
    }
    Ok(())
}

/// `ferry archive import FILE -f FORMAT --volume V`: the agent inspects the
/// image (`qemu-img info`, refusing one that names another file), creates
/// the volume with its virtual size and converts the image into it.
pub fn import(
    file: &Path,
    format: &str,
    volume: &str,
    conn: &AgentConn,
    data_dir: &Path,
    json: bool,
) -> Result<()> {
    let v = import_image(file, format, volume, conn, data_dir)?;
    print(&v, json, |v| {
        println!(
            "imported {} ({}, {} bytes) as volume {}",
            v.path, v.format, v.size_bytes, v.volume.name
        )
    })
}

/// The import's request and reply (for `ferry p2v build --volume` too).
pub fn import_image(
    file: &Path,
    format: &str,
    volume: &str,
    conn: &AgentConn,
    data_dir: &Path,
) -> Result<r::ImageImported> {
    let path = std::path::absolute(file)?;
    let Some(path_str) = path.to_str() else {
        bail!("{}: the path must be UTF-8", path.display());
    };
    let req = q::ImportImage {
        path: path_str.to_string(),
        format: format.to_string(),
        volume: name(volume)?,
    };
    match client(conn, data_dir)?.send(&Action::ImportImage(req))? {
        Reply::ImageImported(v) => Ok(v),
        other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
    }
}
