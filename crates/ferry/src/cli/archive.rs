//! `ferry archive …`: the image archive (create, list, verify, restore,
//! prune, delete, import). Local commands work on a store directory on this
//! machine; live sources (volumes, workloads, shares), restores into a
//! volume and imports go through the agent ([`super::archive_remote`]).
//!
//! Long commands report progress on stderr (one line, updated every 0.5 s:
//! done, total, rate, ETA); `--json` prints only the result on stdout.
//! SIGINT/SIGTERM stop a create or restore at a checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use ferry_core::{ByteSize, Name};
use serde::Serialize;

use crate::archive::qemu::{self, ImageFormat};
use crate::archive::{
    self, ArchiveError, ArchiveSettings, Consistency, CreateSpec, DiskInput, FileSource,
    FileTarget, Manifest, Progress, Source, SourceKind, Store,
};
use crate::cli::AgentConn;

#[derive(Debug, Subcommand)]
pub enum ArchiveCommand {
    /// The agent's archive jobs (creates of live sources, restores into
    /// volumes) since it started: state, progress, errors.
    Jobs {
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Archive SOURCE into the store: an image file or block device on this
    /// machine (read as it is: crash-consistent only if nothing writes it
    /// meanwhile), or volume/NAME, workload/NAME, share/NAME through the
    /// agent. Run the same command again after an interruption to resume.
    Create {
        /// A path, or volume/NAME, workload/NAME, share/NAME.
        source: String,
        /// The store directory (made if missing; must then be empty).
        #[arg(long, env = "FERRY_ARCHIVE_STORE")]
        to: PathBuf,
        /// The archive's name (default: SOURCE-NAME-yyyymmddthhmmssz, UTC, lower
        /// case as names are).
        #[arg(long)]
        name: Option<String>,
        /// Bytes per chunk, the unit of dedup (a multiple of 64KiB, at most
        /// 4MiB; default 1MiB, `[archive] chunk_bytes`).
        #[arg(long)]
        chunk_bytes: Option<ByteSize>,
        /// Sync the store and record progress every this many bytes of the
        /// source: what an interrupted create resumes from (default 256MiB,
        /// `[archive] checkpoint_bytes`).
        #[arg(long)]
        checkpoint_bytes: Option<ByteSize>,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Every archive: name, source, consistency, size, created, chunks, new
    /// bytes; damaged manifests named.
    List {
        #[arg(long, env = "FERRY_ARCHIVE_STORE")]
        store: PathBuf,
    },
    /// Re-read and check every chunk of NAMEs (default: all): exit 1 and
    /// name each bad chunk and the archives that use it.
    Verify {
        names: Vec<String>,
        #[arg(long, env = "FERRY_ARCHIVE_STORE")]
        store: PathBuf,
    },
    /// Delete chunks no archive uses (refused while a create runs, unless
    /// --wait).
    Prune {
        #[arg(long, env = "FERRY_ARCHIVE_STORE")]
        store: PathBuf,
        /// Wait for running creates to end.
        #[arg(long)]
        wait: bool,
    },
    /// Delete an archive, or an interrupted create of that name (its chunks
    /// go at the next prune).
    Delete {
        name: String,
        #[arg(long, env = "FERRY_ARCHIVE_STORE")]
        store: PathBuf,
    },
    /// Restore a disk of archive NAME into a new image file (--to; never
    /// overwrites) or into a volume through the agent (--volume).
    Restore {
        name: String,
        #[arg(long, env = "FERRY_ARCHIVE_STORE")]
        store: PathBuf,
        /// A new image file.
        #[arg(long, required_unless_present = "volume", conflicts_with = "volume")]
        to: Option<PathBuf>,
        /// A volume of the agent (through its API).
        #[arg(long)]
        volume: Option<String>,
        /// The image format of --to: raw (sparse), qcow2, vmdk
        /// (streamOptimized) or vhdx.
        #[arg(long, default_value = "raw", value_parser = ["raw", "qcow2", "vmdk", "vhdx"])]
        format: String,
        /// Which disk of a multi-disk archive.
        #[arg(long)]
        disk: Option<String>,
        /// Offline seeding (with --volume): restore as the replica of NODE's
        /// volume — its id and the archive's barrier generation kept — so
        /// that `ferry migrate start W --to THIS-NODE --seed NAME` on NODE
        /// sends only what changed since the archive.
        #[arg(long, requires = "volume")]
        replica_of: Option<String>,
        #[command(flatten)]
        conn: AgentConn,
    },
    /// Import an image file on the agent's node as a new volume. The format
    /// is required (never guessed); an image that names another file
    /// (backing file, qcow2 data file, vmdk extents) is refused.
    Import {
        file: PathBuf,
        #[arg(short = 'f', long, value_parser = ["raw", "qcow2", "vmdk", "vhdx"])]
        format: String,
        #[arg(long)]
        volume: String,
        #[command(flatten)]
        conn: AgentConn,
    },
}

pub fn run(cmd: &ArchiveCommand, data_dir: &Path, json: bool) -> Result<()> {
    match cmd {
        ArchiveCommand::Create {
            source,
            to,
            name,
            chunk_bytes,
            checkpoint_bytes,
            conn,
        } => {
            for kind in ["volume", "workload", "share"] {
                if let Some(n) = source.strip_prefix(kind).and_then(|s| s.strip_prefix('/')) {
                    if !Path::new(source).exists() {
                        return super::archive_remote::create(
                            (kind, n),
                            to,
                            name.as_deref(),
                            conn,
                            data_dir,
                            json,
                        );
                    }
                }
            }
            let mut settings = ArchiveSettings::default();
            if let Some(c) = chunk_bytes {
                settings.chunk_bytes = c.0;
            }
            if let Some(c) = checkpoint_bytes {
                settings.checkpoint_bytes = c.0.max(1);
            }
            create_local(Path::new(source), to, name.as_deref(), &settings, json)
        }
        ArchiveCommand::List { store } => list(&open(store)?, json),
        ArchiveCommand::Verify { names, store } => verify(&open(store)?, names, json),
        ArchiveCommand::Prune { store, wait } => {
            let s = open(store)?;
            if *wait {
                eprintln!("waiting for running creates to end…");
            }
            let r = archive::prune(&s, *wait)?;
            crate::cli::remote::print(&r, json, |r| {
                println!(
                    "deleted {} of {} chunks ({} freed), {} kept, {} temporary files removed",
                    r.chunks_deleted,
                    r.chunks_before,
                    ByteSize(r.bytes_freed),
                    r.chunks_kept,
                    r.tmp_files_removed
                )
            })
        }
        ArchiveCommand::Delete { name, store } => {
            let s = open(store)?;
            let n = Name::parse(name)?;
            // An interrupted create of that name is forgotten too (else its
            // progress record keeps its chunks from prune).
            let partial = s.partial(&n).is_some();
            if partial {
                s.remove_partial(&n);
            }
            match s.delete_manifest(&n) {
                Err(ArchiveError::NoArchive { .. }) if partial => {}
                r => r?,
            }
            crate::cli::remote::print(&serde_json::json!({"deleted": name}), json, |_| {
                println!("deleted archive {name} (its chunks go at the next `ferry archive prune`)")
            })
        }
        ArchiveCommand::Restore {
            name,
            store,
            to,
            volume,
            format,
            disk,
            replica_of,
            conn,
        } => match (to, volume) {
            (Some(to), None) => restore_local(
                &open(store)?,
                name,
                to,
                format.parse()?,
                disk.as_deref(),
                json,
            ),
            (None, Some(v)) => super::archive_remote::restore_volume(
                name,
                store,
                v,
                disk.as_deref(),
                replica_of.as_deref(),
                conn,
                data_dir,
                json,
            ),
            _ => bail!("pass one of --to FILE or --volume VOLUME"),
        },
        ArchiveCommand::Jobs { conn } => super::archive_remote::jobs(conn, data_dir, json),
        ArchiveCommand::Import {
            file,
            format,
            volume,
            conn,
        } => super::archive_remote::import(file, format, volume, conn, data_dir, json),
    }
}

fn open(store: &Path) -> Result<Store> {
    Ok(Store::open(store, false)?)
}

/// Sets `stop` on SIGINT or SIGTERM (the signals are blocked in every
/// thread started after this, and awaited by one).
fn stop_on_signal() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let signals = crate::sys::signals::Signals::block()?;
    let s = stop.clone();
    std::thread::Builder::new()
        .name("ferry-signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                eprintln!(
                    "\n{} received: stopping at the next checkpoint…",
                    if sig == libc::SIGINT {
                        "SIGINT"
                    } else {
                        "SIGTERM"
                    }
                );
                s.store(true, Ordering::SeqCst);
            }
        })?;
    Ok(stop)
}

/// The progress line on stderr: rewritten in place on a terminal, one line
/// per report otherwise.
struct Reporter {
    what: &'static str,
    tty: bool,
    shown: bool,
}

impl Reporter {
    fn new(what: &'static str) -> Reporter {
        use std::io::IsTerminal;
        Reporter {
            what,
            tty: std::io::stderr().is_terminal(),
            shown: false,
        }
    }

    fn show(&mut self, p: Progress) {
        let pct = if p.total_bytes > 0 {
            p.done_bytes as f64 * 100.0 / p.total_bytes as f64
        } else {
            100.0
        };
        let eta = match p.eta_s {
            Some(s) if p.done_bytes < p.total_bytes => {
                format!(", ETA {}", crate::cli::estimate::dur(s))
            }
            _ => String::new(),
        };
        let line = format!(
            "{} {} of {} ({pct:.0}%), {}/s{eta}",
            self.what,
            ByteSize(p.done_bytes),
            ByteSize(p.total_bytes),
            ByteSize(p.bytes_per_s as u64)
        );
        let mut e = std::io::stderr().lock();
        if self.tty {
            let _ = write!(e, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(e, "{line}");
        }
        let _ = e.flush();
        self.shown = true;
    }

    fn done(&mut self) {
        if self.tty && self.shown {
            eprintln!();
        }
        self.shown = false;
    }
}

/// This machine's name (the kernel's), for the manifest's `source.node`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn utc_stamp() -> String {
    jiff::Timestamp::now()
        .strftime("%Y%m%dt%H%M%Sz")
        .to_string()
}

/// `NAME-yyyymmddThhmmssZ` from a file name, fitted to [`Name`]: lower
/// case, other characters as `-`, cut to fit.
fn default_name(source: &Path) -> Result<Name> {
    let stem = source
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut base: String = stem
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let stamp = utc_stamp();
    let room = ferry_core::name::NAME_BYTES_MAX - stamp.len() - 1;
    base.truncate(room);
    let base = base.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let base = if base.is_empty() { "image" } else { base };
    Ok(Name::parse(&format!("{base}-{stamp}"))?)
}

const LEAF_BYTES: u64 = ferry_core::dirty::DEFAULT_GRANULARITY_BYTES;

#[derive(Debug, Serialize)]
struct Created<'a> {
    archive: &'a str,
    store: String,
    source: &'a Source,
    consistency: Consistency,
    size_bytes: u64,
    chunks: u64,
    zero_chunks: u64,
    new_chunks: u64,
    new_stored_bytes: u64,
    new_raw_bytes: u64,
    read_bytes: u64,
    elapsed_ms: u64,
    resumed: bool,
}

fn create_local(
    source: &Path,
    to: &Path,
    name: Option<&str>,
    settings: &ArchiveSettings,
    json: bool,
) -> Result<()> {
    let stop = stop_on_signal()?;
    let path = std::path::absolute(source)
        .with_context(|| format!("cannot resolve {}", source.display()))?;
    let src = FileSource::open(&path)?;
    let key = src.key(&path);
    let store = Store::open(to, true)?;
    // Resume: the same name, or (no name given) an interrupted create of
    // the same source.
    let partial = store.partials().into_iter().find(|p| p.source_key == key);
    let (name, resumed) = match name {
        Some(n) => {
            let n = Name::parse(n)?;
            let r = store.partial(&n).is_some_and(|p| p.source_key == key);
            (n, r)
        }
        None => match partial {
            Some(p) => (p.name, true),
            None => (default_name(&path)?, false),
        },
    };
    let kind = if src.is_device() {
        SourceKind::Device
    } else {
        SourceKind::Image
    };
    let disk_name = path
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| path.display().to_string());
    let spec = CreateSpec {
        name: name.clone(),
        source: Source {
            kind,
            name: path.display().to_string(),
            node: hostname(),
        },
        consistency: Consistency::CrashConsistentIfIdle,
        source_key: key,
        disks: vec![DiskInput {
            name: disk_name,
            volume_id: None,
            generation: None,
            source: &src,
        }],
        workload: None,
        leaf_bytes: LEAF_BYTES,
    };
    eprintln!(
        "{} archive {} of {} {} ({}) into {}: crash-consistent-if-idle (the {} is read as it is; nothing may write it meanwhile)",
        if resumed { "resuming" } else { "creating" },
        name.as_str(),
        kind.as_str(),
        path.display(),
        ByteSize(archive::DiskSource::size(&src)),
        to.display(),
        kind.as_str()
    );
    let mut rep = Reporter::new("archived");
    let r = archive::create_disks(&store, spec, settings, &stop, &mut |p| rep.show(p));
    rep.done();
    let m = match r {
        Ok(m) => m,
        Err(ArchiveError::Interrupted) => bail!(
            "interrupted; run the same command to resume (archive {} in {})",
            name.as_str(),
            to.display()
        ),
        Err(e) => return Err(e.into()),
    };
    let c = Created {
        archive: m.name.as_str(),
        store: to.display().to_string(),
        source: &m.source,
        consistency: m.consistency,
        size_bytes: m.size_bytes(),
        chunks: m.stats.chunks,
        zero_chunks: m.stats.zero_chunks,
        new_chunks: m.stats.new_chunks,
        new_stored_bytes: m.stats.new_stored_bytes,
        new_raw_bytes: m.stats.new_raw_bytes,
        read_bytes: m.stats.read_bytes,
        elapsed_ms: m.stats.elapsed_ms,
        resumed,
    };
    crate::cli::remote::print(&c, json, |c| {
        println!(
            "archive {} created: {} in {} chunks ({} holes/zero), {} new chunks, {} new bytes stored ({} raw); consistency crash-consistent-if-idle; {:.1} s",
            c.archive,
            ByteSize(c.size_bytes),
            c.chunks,
            c.zero_chunks,
            c.new_chunks,
            ByteSize(c.new_stored_bytes),
            ByteSize(c.new_raw_bytes),
            c.elapsed_ms as f64 / 1000.0
        )
    })
}

fn consistency_str(c: Consistency) -> &'static str {
    match c {
        Consistency::FlushBarrier => "flush-barrier",
        Consistency::CrashConsistentIfIdle => "crash-consistent-if-idle",
        Consistency::FileLevel => "file-level",
    }
}

#[derive(Debug, Serialize)]
struct Listed {
    name: String,
    source: String,
    node: String,
    consistency: Consistency,
    size_bytes: u64,
    created_unix_ms: u64,
    chunks: u64,
    new_stored_bytes: u64,
}

#[derive(Debug, Serialize)]
struct ListOut {
    archives: Vec<Listed>,
    damaged_manifests: Vec<String>,
    interrupted_creates: Vec<String>,
}

fn list(store: &Store, json: bool) -> Result<()> {
    let (ms, bad) = store.manifests()?;
    let out = ListOut {
        archives: ms
            .iter()
            .map(|m: &Manifest| Listed {
                name: m.name.as_str().to_string(),
                source: format!("{}:{}", m.source.kind.as_str(), m.source.name),
                node: m.source.node.clone(),
                consistency: m.consistency,
                size_bytes: m.size_bytes(),
                created_unix_ms: m.created_unix_ms,
                chunks: m.disks.iter().map(|d| d.chunks.len() as u64).sum::<u64>()
                    + m.trees
                        .iter()
                        .flat_map(|t| t.entries.iter().map(|e| e.chunks.len() as u64))
                        .sum::<u64>(),
                new_stored_bytes: m.stats.new_stored_bytes,
            })
            .collect(),
        damaged_manifests: bad
            .iter()
            .map(|(p, why)| format!("{}: {why}", p.display()))
            .collect(),
        interrupted_creates: store
            .partials()
            .iter()
            .map(|p| p.name.as_str().to_string())
            .collect(),
    };
    crate::cli::remote::print(&out, json, |o| {
        println!(
            "{:<40} {:<32} {:<24} {:>10} {:<20} {:>8} {:>10}",
            "NAME", "SOURCE", "CONSISTENCY", "SIZE", "CREATED (UTC)", "CHUNKS", "NEW"
        );
        for a in &o.archives {
            let created = jiff::Timestamp::from_millisecond(a.created_unix_ms as i64)
                .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            println!(
                "{:<40} {:<32} {:<24} {:>10} {:<20} {:>8} {:>10}",
                a.name,
                a.source,
                consistency_str(a.consistency),
                ByteSize(a.size_bytes).to_string(),
                created,
                a.chunks,
                ByteSize(a.new_stored_bytes).to_string()
            );
        }
        for p in &o.interrupted_creates {
            println!("(interrupted create {p}: run the same create to resume)");
        }
        for d in &o.damaged_manifests {
            println!("DAMAGED manifest {d}");
        }
    })
}

fn verify(store: &Store, names: &[String], json: bool) -> Result<()> {
    let names: Vec<Name> = names
        .iter()
        .map(|n| Name::parse(n))
        .collect::<Result<_, _>>()?;
    let mut rep = Reporter::new("verified");
    let r = archive::verify(store, &names, &ArchiveSettings::default(), &mut |p| {
        rep.show(p)
    });
    rep.done();
    let r = r?;
    crate::cli::remote::print(&r, json, |r| {
        for b in &r.bad_chunks {
            println!("BAD chunk {}: {}", b.id, b.why);
            for u in &b.used_by {
                println!("  used by {u}");
            }
        }
        for d in &r.bad_roots {
            println!("BAD disk {d}: its chunks do not give the manifest's Merkle root");
        }
        for d in &r.damaged_manifests {
            println!("DAMAGED manifest {d}");
        }
        println!(
            "{}: {} archives, {} chunks, {} checked; {} bad chunks",
            if r.ok { "ok" } else { "FAILED" },
            r.archives.len(),
            r.chunks_checked,
            ByteSize(r.bytes_checked),
            r.bad_chunks.len()
        );
    })?;
    if !r.ok {
        crate::sys::out::flush_stdout();
        std::process::exit(1);
    }
    Ok(())
}

/// Files made beside the target, removed when dropped unless kept.
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A new file, O_EXCL and O_NOFOLLOW: an existing file (or symlink) is never
/// written.
fn create_new(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow!(
                    "{} exists: restore never overwrites; choose a new file",
                    path.display()
                )
            } else {
                anyhow!("cannot create {}: {e}", path.display())
            }
        })
}

#[derive(Debug, Serialize)]
struct Restored<'a> {
    archive: &'a str,
    disk: &'a str,
    to: String,
    format: ImageFormat,
    size_bytes: u64,
    merkle_root: &'a str,
}

fn restore_local(
    store: &Store,
    name: &str,
    to: &Path,
    format: ImageFormat,
    disk: Option<&str>,
    json: bool,
) -> Result<()> {
    let stop = stop_on_signal()?;
    let m = store.manifest(&Name::parse(name)?)?;
    let d = match disk {
        Some(dn) => m.disks.iter().find(|d| d.name == dn).ok_or_else(|| {
            anyhow!(
                "archive {name} has no disk {dn:?} (it has: {})",
                m.disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?,
        None => match m.disks.as_slice() {
            [d] => d,
            [] => bail!("archive {name} has no disk (a file-level archive)"),
            ds => bail!(
                "archive {name} has {} disks: pass --disk ({})",
                ds.len(),
                ds.iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    let to = std::path::absolute(to)?;
    if to.symlink_metadata().is_ok() {
        bail!(
            "{} exists: restore never overwrites; choose a new file",
            to.display()
        );
    }
    let dir = to.parent().unwrap_or(Path::new("/"));
    let file_name = to
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file name", to.display()))?
        .to_string_lossy()
        .to_string();
    let mut temps = TempFiles(Vec::new());
    let raw_path = if format == ImageFormat::Raw {
        to.clone()
    } else {
        dir.join(format!(".{file_name}.ferry-raw-{}", std::process::id()))
    };
    let f = create_new(&raw_path)?;
    temps.0.push(raw_path.clone());
    f.set_len(d.size_bytes)
        .with_context(|| format!("cannot size {}", raw_path.display()))?;
    eprintln!(
        "restoring disk {} of archive {} ({}) to {} ({format})",
        d.name,
        m.name.as_str(),
        ByteSize(d.size_bytes),
        to.display()
    );
    let mut rep = Reporter::new("restored");
    let r = archive::restore_disk(
        store,
        &m,
        d,
        &FileTarget {
            file: f,
            fresh: true,
        },
        &ArchiveSettings::default(),
        &stop,
        &mut |p| rep.show(p),
    );
    rep.done();
    match r {
        Ok(()) => {}
        Err(ArchiveError::Interrupted) => {
            bail!("interrupted; nothing was left at {}", to.display())
        }
        Err(e) => return Err(e.into()),
    }
    if format != ImageFormat::Raw {
        let out = dir.join(format!(
            ".{file_name}.ferry-{format}-{}",
            std::process::id()
        ));
        temps.0.push(out.clone());
        qemu::convert_from_raw(&raw_path, &out, format)?;
        // link(2) fails if `to` appeared meanwhile: nothing is clobbered.
        std::fs::hard_link(&out, &to).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow!("{} appeared meanwhile: not overwritten", to.display())
            } else {
                anyhow!("cannot place {}: {e}", to.display())
            }
        })?;
    } else {
        std::fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot sync {}", to.display()))?;
        temps.0.clear();
    }
    drop(temps);
    if let Ok(dd) = std::fs::File::open(dir) {
        let _ = dd.sync_all();
    }
    let out = Restored {
        archive: m.name.as_str(),
        disk: &d.name,
        to: to.display().to_string(),
        format,
        size_bytes: d.size_bytes,
        merkle_root: &d.merkle_root,
    };
    crate::cli::remote::print(&out, json, |o| {
        println!(
            "restored disk {} of archive {} to {} ({}, {}); Merkle root {} checked",
            o.disk,
            o.archive,
            o.to,
            o.format,
            ByteSize(o.size_bytes),
            o.merkle_root
        )
    })
}
