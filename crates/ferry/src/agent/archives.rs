//! The agent's archive jobs: archives of live volumes and workloads taken
//! at one flush barrier (`ferry archive create volume/V|workload/W`), and
//! restores into a new volume (`ferry archive restore … --volume V`), each
//! run on a thread of its own and followed by the CLI through
//! `GET /api/v1/archive-jobs/{name}`.
//!
//! The barrier: with the cutover lock held (no handover meanwhile), every
//! volume of the source holds its writes (`hold_for_barrier`, beside the
//! gate: a fence meanwhile is not undone) — every write acknowledged before
//! is in its image, none after has begun — and then, on each, a copy-before-write
//! snapshot is taken (`PrimaryVolume::archive_snap`), a new generation is
//! minted and a seed map started (offline seeding), and the volumes are
//! thawed. Writes go on while the archive reads the snapshots; each
//! snapshot ends with its job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use ferry_api::reply as r;
use ferry_api::request as q;
use ferry_api::ActionError;
use ferry_core::Name;

use super::AgentCtx;
use crate::archive::{
    self, ArchiveError, Consistency, DiskInput, DiskSource, Source, SourceKind, Store,
};
use crate::volume::primary::PrimaryVolume;

type Res<T> = Result<T, ActionError>;

/// Jobs since the agent started (bounded: the oldest finished go first).
#[derive(Debug, Default)]
pub struct ArchiveJobs {
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
}

/// Finished jobs kept for `GET /api/v1/archive-jobs`.
const FINISHED_JOBS_MAX: usize = 64;

#[derive(Debug)]
struct Job {
    status: Mutex<r::ArchiveJob>,
    #[allow(dead_code)]
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ArchiveJobs {
    fn add(&self, status: r::ArchiveJob) -> Res<Arc<Job>> {
        let mut jobs = lock(&self.jobs);
        if let Some(j) = jobs.get(&status.name) {
            if lock(&j.status).state == "running" {
                return Err(ActionError::conflict(format!(
                    "archive job {:?} is running: wait for it (ferry archive status {})",
                    status.name, status.name
                )));
            }
        }
        let finished: Vec<String> = jobs
            .iter()
            .filter(|(_, j)| lock(&j.status).state != "running")
            .map(|(k, _)| k.clone())
            .collect();
        if finished.len() >= FINISHED_JOBS_MAX {
            let oldest = finished
                .iter()
                .min_by_key(|k| lock(&jobs[*k].status).started_unix_ms)
                .cloned();
            if let Some(k) = oldest {
                jobs.remove(&k);
            }
        }
        let job = Arc::new(Job {
            status: Mutex::new(status.clone()),
            stop: AtomicBool::new(false),
        });
        jobs.insert(status.name.clone(), job.clone());
        Ok(job)
    }

    pub fn list(&self) -> Vec<r::ArchiveJob> {
        lock(&self.jobs)
            .values()
            .map(|j| lock(&j.status).clone())
            .collect()
    }

    pub fn get(&self, name: &str) -> Res<r::ArchiveJob> {
        lock(&self.jobs)
            .get(name)
            .map(|j| lock(&j.status).clone())
            .ok_or_else(|| {
                ActionError::not_found(format!(
                    "no archive job {name:?} on this node (ferry archive jobs)"
                ))
            })
    }
}

fn bad(e: impl std::fmt::Display) -> ActionError {
    ActionError::bad_input(e.to_string())
}

/// A store path from the API: absolute, no NUL, no `..` part.
fn store_path(s: &str) -> Res<PathBuf> {
    let p = Path::new(s);
    if !p.is_absolute()
        || s.contains('\0')
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(bad(format!(
            "store {s:?}: give an absolute directory path without `..`"
        )));
    }
    Ok(p.to_path_buf())
}

fn archive_err(e: ArchiveError) -> ActionError {
    match e {
        ArchiveError::NoStore(_) | ArchiveError::NoArchive { .. } => {
            ActionError::not_found(e.to_string())
        }
        ArchiveError::Exists { .. } | ArchiveError::Busy(_) => ActionError::conflict(e.to_string()),
        ArchiveError::NotAStore(_) | ArchiveError::Settings(_) => bad(e),
        e => ActionError::new(ferry_api::ErrorKind::Internal, e.to_string()),
    }
}

/// A volume's archive snapshot as a disk to archive.
struct SnapSource(Arc<PrimaryVolume>);

impl DiskSource for SnapSource {
    fn size(&self) -> u64 {
        ferry_nbd::BlockDevice::size(&self.0.local)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.archive_snap.read(&self.0.local, buf, offset)
    }
    fn is_hole(&self, offset: u64, len: u64) -> std::io::Result<bool> {
        self.0.archive_snap.is_hole(&self.0.local, offset, len)
    }
}

fn default_name(source: &str) -> Res<Name> {
    let now = jiff::Timestamp::now()
        .strftime("%Y%m%dt%H%M%Sz")
        .to_string();
    let base: String = source.chars().take(40).collect();
    Name::parse(&format!("{base}-{now}")).map_err(bad)
}

/// The barrier on `vols` (see the module doc): returns the generation minted.
fn barrier(ctx: &AgentCtx, vols: &[Arc<PrimaryVolume>], archive: &Name) -> Res<u64> {
    let _no_handover = lock(&ctx.cutover_lock);
    for v in vols {
        if !v.gate_open() {
            return Err(ActionError::conflict(format!(
                "volume {} is frozen or handed over (a cutover or failover runs): try again when it is done",
                v.name
            )));
        }
        if v.archive_snap.is_active() {
            return Err(ActionError::conflict(format!(
                "volume {} is being archived already: wait for that archive (ferry archive jobs)",
                v.name
            )));
        }
    }
    let g = crate::transport::identity::random_u64();
    let token = crate::transport::identity::random_u64();
    let gran = ctx.cfg.replication.granularity_bytes;
    for v in vols {
        v.hold_for_barrier();
    }
    let result = (|| -> Res<()> {
        for v in vols {
            let size = ferry_nbd::BlockDevice::size(&v.local);
            v.archive_snap
                .arm(&v.name, true, token)
                .map_err(|e| ActionError::conflict(e.to_string()))?;
            v.archive_snap
                .take_if_armed(&v.dir.join("archive.cow"), size, gran, token)
                .map_err(|e| ActionError::new(ferry_api::ErrorKind::Internal, e.to_string()))?;
            v.mint_generation(g).map_err(|e| {
                ActionError::new(
                    ferry_api::ErrorKind::Internal,
                    format!(
                        "volume {}: cannot record the barrier's generation: {e}",
                        v.name
                    ),
                )
            })?;
            v.seeds
                .add(archive, g, size, gran, ctx.cfg.archive.seed_maps_max)
                .map_err(|e| {
                    ActionError::new(
                        ferry_api::ErrorKind::Internal,
                        format!("volume {}: cannot start the seed map: {e}", v.name),
                    )
                })?;
        }
        Ok(())
    })();
    for v in vols {
        v.release_barrier();
    }
    if let Err(e) = result {
        for v in vols {
            v.archive_snap.end();
            v.seeds.remove(archive);
        }
        return Err(e);
    }
    tracing::info!(archive = %archive.as_str(), volumes = vols.len(), generation = format!("{g:016x}"), "archive.barrier: snapshots taken, writes go on");
    Ok(g)
}

fn job_status(name: &str, kind: &str, archive: &str, store: &Path, source: &str) -> r::ArchiveJob {
    r::ArchiveJob {
        name: name.to_string(),
        kind: kind.to_string(),
        archive: archive.to_string(),
        store: store.display().to_string(),
        source: source.to_string(),
        state: "running".into(),
        started_unix_ms: crate::sys::unix_ms(),
        finished_unix_ms: None,
        done_bytes: 0,
        total_bytes: 0,
        bytes_per_s: 0.0,
        eta_s: None,
        error: None,
        consistency: None,
        disks: Vec::new(),
        chunks: 0,
        new_chunks: 0,
        new_stored_bytes: 0,
    }
}

fn progress_into(job: &Job) -> impl FnMut(archive::Progress) + '_ {
    move |p| {
        let mut s = lock(&job.status);
        s.done_bytes = p.done_bytes;
        s.total_bytes = p.total_bytes;
        s.bytes_per_s = p.bytes_per_s;
        s.eta_s = p.eta_s;
    }
}

/// Runs `work` on a thread of its own (`thread`), its outcome into the
/// job; answers the job's status as it is now.
fn run_job(
    job: Arc<Job>,
    thread: &str,
    work: impl FnOnce(&Job) -> Result<archive::Manifest, String> + Send + 'static,
) -> Res<r::ArchiveJob> {
    let j = job.clone();
    let spawned = std::thread::Builder::new()
        .name(thread.to_string())
        .spawn(move || finish(&j, work(&j)));
    if let Err(e) = spawned {
        let msg = format!("cannot start the {thread} thread: {e}");
        finish(&job, Err(msg.clone()));
        return Err(ActionError::new(ferry_api::ErrorKind::Internal, msg));
    }
    let s = lock(&job.status).clone();
    Ok(s)
}

fn finish(job: &Job, r: Result<archive::Manifest, String>) {
    let mut s = lock(&job.status);
    s.finished_unix_ms = Some(crate::sys::unix_ms());
    match r {
        Ok(m) => {
            s.state = "done".into();
            s.consistency = serde_json::to_value(m.consistency)
                .ok()
                .and_then(|v| v.as_str().map(String::from));
            s.disks = m
                .disks
                .iter()
                .map(|d| r::ArchiveDisk {
                    name: d.name.clone(),
                    size_bytes: d.size_bytes,
                    merkle_root: d.merkle_root.clone(),
                    generation: d.generation.clone(),
                    volume_id: d.volume_id.clone(),
                })
                .collect();
            s.chunks = m.stats.chunks;
            s.new_chunks = m.stats.new_chunks;
            s.new_stored_bytes = m.stats.new_stored_bytes;
            s.done_bytes = s.total_bytes.max(s.done_bytes);
            s.eta_s = Some(0.0);
        }
        Err(e) => {
            s.state = "failed".into();
            s.error = Some(e);
        }
    }
}

/// `POST /api/v1/archives`.
pub fn create(ctx: &Arc<AgentCtx>, req: q::CreateArchive) -> Res<r::ArchiveJob> {
    let (kind, src_name) = req.source.split_once('/').ok_or_else(|| {
        bad(format!(
            "source {:?}: give volume/NAME, workload/NAME or share/NAME",
            req.source
        ))
    })?;
    let src_name = Name::parse(src_name).map_err(bad)?;
    let store_dir = store_path(&req.store)?;
    let name = match req.name {
        Some(n) => n,
        None => default_name(src_name.as_str())?,
    };
    let (kind, vols, workload): (
        SourceKind,
        Vec<Arc<PrimaryVolume>>,
        Option<serde_json::Value>,
    ) = match kind {
        "volume" => {
            let v = ctx.primary(src_name.as_str()).ok_or_else(|| {
                ActionError::not_found(format!(
                    "volume {:?} is not a primary on this node",
                    src_name.as_str()
                ))
            })?;
            (SourceKind::Volume, vec![v], None)
        }
        "workload" => {
            let spec = crate::workload::load_workload(&ctx.cfg.data_dir, src_name.as_str())
                .map_err(|e| ActionError::new(ferry_api::ErrorKind::Internal, format!("{e:#}")))?
                .ok_or_else(|| {
                    ActionError::not_found(format!(
                        "no workload {:?} on this node",
                        src_name.as_str()
                    ))
                })?;
            if !spec.shares.is_empty() {
                return Err(bad(format!(
                    "workload {:?} has shares ({}): archiving a workload's shares is not built yet; archive its volumes one by one (volume/NAME)",
                    src_name.as_str(),
                    spec.shares.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                )));
            }
            let mut vols = Vec::new();
            for v in &spec.volumes {
                vols.push(ctx.primary(v.as_str()).ok_or_else(|| {
                    ActionError::conflict(format!(
                        "volume {:?} of workload {:?} is not a primary on this node",
                        v.as_str(),
                        src_name.as_str()
                    ))
                })?);
            }
            (SourceKind::Workload, vols, serde_json::to_value(&spec).ok())
        }
        "share" => {
            if ctx.shares.primary(src_name.as_str()).is_none() {
                return Err(ActionError::not_found(format!(
                    "share {:?} is not a primary on this node",
                    src_name.as_str()
                )));
            }
            return create_share(ctx, src_name, &store_dir, name);
        }
        other => {
            return Err(bad(format!(
                "source kind {other:?}: give volume/NAME, workload/NAME or share/NAME"
            )))
        }
    };
    let store = Store::open(&store_dir, true).map_err(archive_err)?;
    if store.exists(&name) {
        return Err(archive_err(ArchiveError::Exists {
            name: name.as_str().to_string(),
            store: store_dir,
        }));
    }
    ctx.cfg
        .archive
        .check(ctx.cfg.replication.granularity_bytes)
        .map_err(archive_err)?;
    let source_label = format!("{}/{}", kind.as_str(), src_name.as_str());
    let job = ctx.archive_jobs.add(job_status(
        name.as_str(),
        "create",
        name.as_str(),
        &store_dir,
        &source_label,
    ))?;
    let g = match barrier(ctx, &vols, &name) {
        Ok(g) => g,
        Err(e) => {
            finish(&job, Err(e.to_string()));
            return Err(e);
        }
    };
    lock(&job.status).total_bytes = vols
        .iter()
        .map(|v| ferry_nbd::BlockDevice::size(&v.local))
        .sum();
    let ctx2 = ctx.clone();
    run_job(job, "ferry-archive", move |job2| {
        let sources: Vec<SnapSource> = vols.iter().map(|v| SnapSource(v.clone())).collect();
        let spec = archive::CreateSpec {
            name: name.clone(),
            source: Source {
                kind,
                name: src_name.as_str().to_string(),
                node: ctx2.identity.node_name.clone(),
            },
            consistency: Consistency::FlushBarrier,
            // A live source is never resumed (a new barrier is a new image);
            // its chunks are deduplicated on a retry.
            source_key: format!("{source_label}@{g:016x}"),
            disks: vols
                .iter()
                .zip(&sources)
                .map(|(v, s)| DiskInput {
                    name: v.name.clone(),
                    volume_id: Some(v.id.clone()),
                    generation: Some(g),
                    source: s,
                })
                .collect(),
            workload,
            leaf_bytes: ctx2.cfg.replication.granularity_bytes,
        };
        let stop = AtomicBool::new(false);
        let r = archive::create_disks(
            &store,
            spec,
            &ctx2.cfg.archive,
            &stop,
            &mut progress_into(job2),
        );
        for v in &vols {
            v.archive_snap.end();
            if r.is_err() {
                v.seeds.remove(&name);
            }
        }
        match &r {
            Ok(m) => {
                tracing::info!(archive = %name.as_str(), store = %store.root().display(), new_chunks = m.stats.new_chunks, new_stored_bytes = m.stats.new_stored_bytes, "archive.created")
            }
            Err(e) => {
                tracing::error!(archive = %name.as_str(), error = %e, "archive.create_failed")
            }
        }
        r.map_err(|e| e.to_string())
    })
}

/// A share's archive: its files, copied while its watcher catches changes,
/// pass after pass until one finds none (`archive::tree::capture`); each file
/// as of its last copy.
fn create_share(
    ctx: &Arc<AgentCtx>,
    share: Name,
    store_dir: &Path,
    name: Name,
) -> Res<r::ArchiveJob> {
    let store = Store::open(store_dir, true).map_err(archive_err)?;
    if store.exists(&name) {
        return Err(archive_err(ArchiveError::Exists {
            name: name.as_str().to_string(),
            store: store_dir.to_path_buf(),
        }));
    }
    let data = crate::share::ShareStore::new(&ctx.cfg.data_dir).data_dir(&share);
    let label = format!("share/{}", share.as_str());
    let job = ctx.archive_jobs.add(job_status(
        name.as_str(),
        "create",
        name.as_str(),
        store_dir,
        &label,
    ))?;
    let ctx2 = ctx.clone();
    run_job(job, "ferry-archive", move |job2| {
        let stop = AtomicBool::new(false);
        let opts = archive::tree::CaptureOptions {
            leaf_bytes: ctx2.cfg.replication.granularity_bytes,
            ..Default::default()
        };
        let source = Source {
            kind: SourceKind::Share,
            name: share.as_str().to_string(),
            node: ctx2.identity.node_name.clone(),
        };
        let r = archive::tree::capture(
            &store,
            &data,
            &[],
            &name,
            source,
            &ctx2.cfg.archive,
            &opts,
            &stop,
            &mut |p| {
                let mut s = lock(&job2.status);
                s.done_bytes = p.done_bytes;
                s.total_bytes = p.total_bytes;
                s.bytes_per_s = p.bytes_per_s;
                s.eta_s = p.eta_s;
            },
        );
        match &r {
            Ok(c) => {
                tracing::info!(archive = %name.as_str(), share = %share.as_str(), passes = c.report.passes, files = c.report.files, "archive.created")
            }
            Err(e) => {
                tracing::error!(archive = %name.as_str(), error = %e, "archive.create_failed")
            }
        }
        r.map(|c| c.manifest).map_err(|e| e.to_string())
    })
}

/// `POST /api/v1/archives/restore`.
pub fn restore(ctx: &Arc<AgentCtx>, req: q::RestoreArchive) -> Res<r::ArchiveJob> {
    let store_dir = store_path(&req.store)?;
    let store = Store::open(&store_dir, false).map_err(archive_err)?;
    let m = store.manifest(&req.archive).map_err(archive_err)?;
    // What to restore: one disk into `volume`, or (I2V) every disk into a
    // volume of its own name and the workload's definition.
    let (job_name, targets, workload): (
        String,
        Vec<(archive::Disk, String)>,
        Option<crate::workload::WorkloadSpec>,
    ) = match (&req.volume, &req.workload) {
        (Some(v), None) => {
            let disk = match &req.disk {
                Some(d) => m.disks.iter().find(|x| &x.name == d),
                None if m.disks.len() == 1 => m.disks.first(),
                None => m.disks.iter().find(|x| x.name == v.as_str()),
            }
            .cloned()
            .ok_or_else(|| {
                bad(format!(
                    "archive {:?} has disks {}: choose one with --disk",
                    m.name.as_str(),
                    m.disks
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            (
                format!("restore-{}", v.as_str()),
                vec![(disk, v.as_str().to_string())],
                None,
            )
        }
        (None, Some(w)) => {
            if req.replica_of.is_some() {
                return Err(bad(
                    "--replica-of restores one volume (--volume), not a workload",
                ));
            }
            if m.disks.is_empty() {
                return Err(bad(format!("archive {:?} holds no disk", m.name.as_str())));
            }
            if crate::workload::load_workload(&ctx.cfg.data_dir, w.as_str())
                .ok()
                .flatten()
                .is_some()
            {
                return Err(ActionError::conflict(format!(
                    "workload {:?} exists on this node: choose another name",
                    w.as_str()
                )));
            }
            let mut targets = Vec::new();
            for d in &m.disks {
                Name::parse(&d.name).map_err(|e| {
                    bad(format!(
                        "disk {:?} cannot name a volume ({e}): restore it with --volume",
                        d.name
                    ))
                })?;
                targets.push((d.clone(), d.name.clone()));
            }
            let mut spec: crate::workload::WorkloadSpec = match &m.workload {
                Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                    bad(format!(
                        "archive {:?}'s workload definition cannot be read ({e})",
                        m.name.as_str()
                    ))
                })?,
                None => crate::workload::WorkloadSpec {
                    name: w.clone(),
                    volumes: Vec::new(),
                    shares: Vec::new(),
                    start: None,
                    stop: None,
                    check: None,
                    hook_timeout_ms: 30_000,
                    vm: None,
                    vip: None,
                    vip_interface: None,
                },
            };
            spec.name = w.clone();
            spec.volumes = targets
                .iter()
                .filter_map(|(_, v)| Name::parse(v).ok())
                .collect();
            spec.shares.clear();
            (format!("restore-{}", w.as_str()), targets, Some(spec))
        }
        _ => return Err(bad("give exactly one of volume and workload")),
    };
    for (_, v) in &targets {
        if ctx.store.meta(v).is_ok() {
            return Err(ActionError::conflict(format!(
                "volume {v:?} exists on this node: restore into a new name, or delete it first"
            )));
        }
    }
    // Seeding: the source's id and the barrier's generation, as its replica.
    let seed = match &req.replica_of {
        None => None,
        Some(primary) => {
            let disk = &targets[0].0;
            if ctx.peers.get(primary.as_str()).is_none() {
                return Err(bad(format!(
                    "node {:?} is not registered here (ferry node add)",
                    primary.as_str()
                )));
            }
            let id = disk.volume_id.clone().ok_or_else(|| {
                bad("this archive's disk is not a ferry volume's (no volume id): it cannot seed a replica; restore it as a volume of its own")
            })?;
            let g = disk
                .generation
                .as_deref()
                .and_then(|g| u64::from_str_radix(g, 16).ok())
                .ok_or_else(|| bad("this archive was not taken at a barrier (no generation): it cannot seed a replica"))?;
            Some((primary.as_str().to_string(), id, g))
        }
    };
    let label = targets
        .iter()
        .map(|(_, v)| v.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let job = ctx.archive_jobs.add(job_status(
        &job_name,
        "restore",
        m.name.as_str(),
        &store_dir,
        &label,
    ))?;
    lock(&job.status).total_bytes = targets.iter().map(|(d, _)| d.size_bytes).sum();
    let ctx2 = ctx.clone();
    run_job(job, "ferry-restore", move |job2| {
        let r = (|| -> Result<(), String> {
            let mut before = 0;
            for (disk, vname) in &targets {
                restore_volume(&ctx2, &store, &m, disk, vname, seed.clone(), job2, before)?;
                before += disk.size_bytes;
            }
            if let Some(spec) = &workload {
                crate::workload::save_workload(&ctx2.cfg.data_dir, spec)
                    .map_err(|e| format!("{e:#}"))?;
                tracing::info!(workload = %spec.name.as_str(), archive = %m.name.as_str(), "archive.workload_restored");
            }
            Ok(())
        })();
        if let Err(e) = &r {
            tracing::error!(job = %job2.status.lock().unwrap_or_else(|p| p.into_inner()).name, archive = %m.name.as_str(), error = %e, "archive.restore_failed");
        }
        r.map(|()| m.clone())
    })
}

#[allow(clippy::too_many_arguments)]
fn restore_volume(
    ctx: &Arc<AgentCtx>,
    store: &Store,
    m: &archive::Manifest,
    disk: &archive::Disk,
    vname: &str,
    seed: Option<(String, String, u64)>,
    job: &Job,
    done_before: u64,
) -> Result<(), String> {
    use crate::volume::meta::{MetaFile, MetaState};
    let size = disk.size_bytes;
    match &seed {
        Some((_, id, _)) => ctx.store.create_with_id(vname, size, id),
        None => ctx.store.create(vname, size),
    }
    .map_err(|e| e.to_string())?;
    let checked = crate::volume::validate_name(vname).map_err(|e| e.to_string())?;
    let dir = ctx.store.dir(&checked);
    // Until the data is whole, the volume is an inconsistent replica of
    // nobody: a crash here leaves nothing that serves half an image.
    let mut st =
        MetaState::new_secondary(seed.as_ref().map(|s| s.0.as_str()).unwrap_or("restoring"));
    st.consistent = false;
    let mut meta =
        MetaFile::open_or_create(&dir.join("meta.bin"), st).map_err(|e| e.to_string())?;
    let image = ctx.store.image_path(&checked);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .map_err(|e| format!("{}: {e}", image.display()))?;
    let stop = AtomicBool::new(false);
    let total = lock(&job.status).total_bytes;
    let mut progress = progress_into(job);
    archive::restore_disk(
        store,
        m,
        disk,
        &archive::FileTarget { file, fresh: true },
        &ctx.cfg.archive,
        &stop,
        &mut |p| {
            progress(archive::Progress {
                done_bytes: done_before + p.done_bytes,
                total_bytes: total,
                ..p
            })
        },
    )
    .map_err(|e| e.to_string())?;
    std::fs::File::open(&image)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("{}: {e}", image.display()))?;
    meta.update(|s| match &seed {
        Some((primary, _, g)) => {
            s.role = crate::volume::meta::Role::Secondary;
            s.peer = Some(primary.clone());
            s.consistent = true;
            s.generation = ferry_core::GenerationHistory::with_current(*g);
        }
        None => {
            *s = MetaState::new_primary();
        }
    })
    .map_err(|e| e.to_string())?;
    drop(meta);
    ctx.load_volume(vname).map_err(|e| format!("{e:#}"))?;
    tracing::info!(volume = vname, archive = %m.name.as_str(), seed_for = ?seed.as_ref().map(|s| &s.0), "archive.restored");
    Ok(())
}

/// Offline seeding's checks before the first sync of `vol` to node `to`:
/// this volume has a seed for `archive` whose generation is still in its
/// history, and `to`'s copy is at that generation (restored from that
/// archive with `--replica-of`). Returns the blocks written since the
/// barrier.
pub fn seed_check(
    vol: &Arc<PrimaryVolume>,
    peer: &crate::transport::client::ApiClient,
    to: &str,
    archive: &Name,
    me: &str,
) -> anyhow::Result<ferry_core::DirtyMap> {
    use anyhow::{anyhow, bail};
    let a = archive.as_str();
    let (g, map) = vol.seeds.get(a).ok_or_else(|| {
        anyhow!(
            "volume {} has no seed for archive {a:?}: it was not archived on this node at a barrier (ferry archive create volume/{} …), or its seed was dropped (archive.seed_maps_max); use --checksum instead",
            vol.name,
            vol.name
        )
    })?;
    if !vol.generations().contains(&g) {
        bail!(
            "archive {a:?} is too old for volume {}: its generation {g:016x} is no longer in the volume's history (too many role changes since); use --checksum instead",
            vol.name
        );
    }
    let v = peer.get(&format!("/api/v1/volumes/{}/generation", vol.name))?;
    let ids: Vec<u64> = v["ids"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
        .unwrap_or_default();
    match ids.first() {
        Some(&cur) if cur == g => {}
        Some(&cur) => bail!(
            "node {to}'s copy of volume {} is at generation {cur:016x}, not at archive {a:?}'s ({g:016x}): it was restored from another archive, or written since; restore {a} there (ferry archive restore {a} --volume {} --replica-of {me}), or use --checksum",
            vol.name,
            vol.name
        ),
        None => bail!(
            "node {to} has no copy of volume {}: restore archive {a} there first (ferry archive restore {a} --volume {} --replica-of {me})",
            vol.name,
            vol.name
        ),
    }
    tracing::info!(volume = %vol.name, archive = a, generation = format!("{g:016x}"), written_since_bytes = map.dirty_bytes(), "replication.seed.checked");
    Ok(map)
}
