//! `ferry p2v …`: capture a live Linux root tree into an archive; build a
//! bootable disk image from one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use ferry_core::{ByteSize, Name};
use serde::Serialize;

use crate::archive::manifest::{Entry, EntryKind};
use crate::archive::tree::{self, CaptureOptions, TreeProgress};
use crate::archive::{ArchiveSettings, Manifest, Source, SourceKind, Store};

/// What `capture` leaves out unless `--no-default-excludes`.
pub const DEFAULT_EXCLUDES: [&str; 5] = ["/proc", "/sys", "/dev", "/run", "/tmp"];

/// Symlinks followed at most when finding the kernel in a tree.
const SYMLINK_HOPS_MAX: usize = 16;

#[derive(Debug, Subcommand)]
pub enum P2vCommand {
    /// Capture a live root tree into an archive store, file by file, while
    /// it runs: a first pass under an inotify watcher, then passes over
    /// what changed until one sees no change or --max-passes. Stays on the
    /// root's filesystem; sockets, FIFOs and devices are skipped (counted).
    Capture {
        /// The tree to capture (`/` for this server).
        #[arg(long)]
        root: PathBuf,
        /// A path inside the tree to leave out (as seen from the tree:
        /// `/var/cache`); a directory stays as an empty one. Repeatable.
        /// Always excluded unless --no-default-excludes: /proc /sys /dev
        /// /run /tmp, and the store itself when it is inside the tree.
        #[arg(long)]
        exclude: Vec<PathBuf>,
        /// Do not exclude /proc /sys /dev /run /tmp by default.
        #[arg(long)]
        no_default_excludes: bool,
        /// The archive store (a directory; made if missing).
        #[arg(long)]
        to: PathBuf,
        /// The archive's name (default: p2v-UNIXSECONDS).
        #[arg(long)]
        name: Option<String>,
        /// Passes at most while the tree keeps changing.
        #[arg(long, default_value_t = tree::MAX_PASSES_DEFAULT)]
        max_passes: u32,
        /// Descend into other filesystems mounted inside the tree.
        #[arg(long)]
        cross_filesystems: bool,
    },
    /// Build a bootable raw ext4 image from a captured tree (mke2fs -d, no
    /// mount), with the tree's kernel and initramfs next to it as
    /// FILE.vmlinuz and FILE.initrd, and print the QEMU command to boot it.
    Build {
        /// The archive's name.
        archive: String,
        /// The archive store.
        #[arg(long)]
        store: PathBuf,
        /// The raw image to write (must not exist). With --volume: where it
        /// is built before the import (default ./VOLUME.raw), removed after.
        #[arg(long, required_unless_present = "volume")]
        to: Option<PathBuf>,
        /// A new ferry volume to import the image into (through the agent,
        /// on this machine: it reads the built image); the kernel and
        /// initramfs stay next to the image's path.
        #[arg(long)]
        volume: Option<String>,
        /// The image's size: 4GiB, 512MiB.
        #[arg(long)]
        size: ByteSize,
        /// The kernel, as a path in the tree (default: the newest /boot/vmlinuz-*).
        #[arg(long)]
        kernel: Option<String>,
        /// The initramfs, as a path in the tree (default: the kernel's
        /// /boot/initrd.img-VERSION or /boot/initramfs-VERSION.img, else the newest).
        #[arg(long)]
        initrd: Option<String>,
        #[command(flatten)]
        conn: crate::cli::AgentConn,
    },
}

pub fn run(cmd: &P2vCommand, _data_dir: &Path, json: bool) -> Result<()> {
    match cmd {
        P2vCommand::Capture {
            root,
            exclude,
            no_default_excludes,
            to,
            name,
            max_passes,
            cross_filesystems,
        } => capture(
            root,
            exclude,
            *no_default_excludes,
            to,
            name.as_deref(),
            *max_passes,
            *cross_filesystems,
            json,
        ),
        P2vCommand::Build {
            archive,
            store,
            to,
            volume,
            size,
            kernel,
            initrd,
            conn,
        } => {
            if let Some(v) = volume {
                return super::p2v_remote::p2v_build_volume(
                    archive,
                    store,
                    v,
                    to.as_deref(),
                    *size,
                    (kernel.as_deref(), initrd.as_deref()),
                    conn,
                    _data_dir,
                    json,
                );
            }
            let to = to.as_ref().expect("clap: --to or --volume");
            build(
                archive,
                store,
                to,
                *size,
                kernel.as_deref(),
                initrd.as_deref(),
                json,
            )
        }
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// A flag set by SIGINT or SIGTERM: a capture ends early and keeps a
/// progress record naming the chunks written (a prune keeps them).
fn stop_on_signal() -> Result<&'static AtomicBool> {
    static STOP: AtomicBool = AtomicBool::new(false);
    let signals = crate::sys::signals::Signals::block()?;
    std::thread::Builder::new()
        .name("ferry-p2v-signals".into())
        .spawn(move || {
            if signals.wait().is_ok() {
                eprintln!(
                    "interrupted: stopping (what is copied so far is kept for a prune-safe retry)"
                );
                STOP.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        })?;
    Ok(&STOP)
}

fn archive_name(name: Option<&str>) -> Result<Name> {
    let s = match name {
        Some(n) => n.to_string(),
        None => format!("p2v-{}", crate::sys::unix_ms() / 1000),
    };
    Ok(Name::parse(&s)?)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn show_progress(what: &str, p: &TreeProgress) {
    let eta = p
        .eta_s
        .map(|s| format!(", ETA {s:.0} s"))
        .unwrap_or_default();
    eprintln!(
        "{what} pass {}: {} files, {:.1} of ~{:.1} MiB, {:.1} MiB/s{eta}",
        p.pass,
        p.files,
        mib(p.done_bytes),
        mib(p.total_bytes),
        mib(p.bytes_per_s as u64),
    );
}

#[allow(clippy::too_many_arguments)]
fn capture(
    root: &Path,
    exclude: &[PathBuf],
    no_default_excludes: bool,
    to: &Path,
    name: Option<&str>,
    max_passes: u32,
    cross_filesystems: bool,
    json: bool,
) -> Result<()> {
    let name = archive_name(name)?;
    let store = Store::open(to, true)?;
    let mut excludes: Vec<PathBuf> = exclude.to_vec();
    if !no_default_excludes {
        excludes.extend(DEFAULT_EXCLUDES.iter().map(PathBuf::from));
    }
    let root_abs = root
        .canonicalize()
        .with_context(|| format!("cannot open the root {}", root.display()))?;
    if let Ok(store_abs) = to.canonicalize() {
        if let Ok(rel) = store_abs.strip_prefix(&root_abs) {
            if rel.as_os_str().is_empty() {
                bail!("the store {} is the root itself", to.display());
            }
            excludes.push(rel.to_path_buf());
        }
    }
    let source = Source {
        kind: SourceKind::Tree,
        name: root_abs.display().to_string(),
        node: hostname(),
    };
    let opts = CaptureOptions {
        max_passes,
        cross_filesystems,
        ..Default::default()
    };
    let stop = stop_on_signal()?;
    let c = tree::capture(
        &store,
        &root_abs,
        &excludes,
        &name,
        source,
        &ArchiveSettings::default(),
        &opts,
        stop,
        &mut |p| show_progress("capture", &p),
    )?;
    #[derive(Serialize)]
    struct Out<'a> {
        archive: &'a str,
        store: &'a Path,
        #[serde(flatten)]
        report: &'a tree::CaptureReport,
        new_chunks: u64,
        new_stored_bytes: u64,
    }
    let out = Out {
        archive: name.as_str(),
        store: to,
        report: &c.report,
        new_chunks: c.manifest.stats.new_chunks,
        new_stored_bytes: c.manifest.stats.new_stored_bytes,
    };
    if json {
        crate::sys::out::print_json(&out)?;
    } else {
        let r = &c.report;
        println!(
            "archive {} in {}: {} files, {} dirs, {} symlinks, {:.1} MiB in {} passes ({}), {} skipped (sockets, FIFOs, devices), {} mount points kept empty, {:.1} s",
            name.as_str(),
            to.display(),
            r.files,
            r.dirs,
            r.symlinks,
            mib(r.bytes),
            r.passes,
            if r.settled {
                "the last saw no change".to_string()
            } else {
                format!("{} paths changed after the last", r.changed_after_last_pass)
            },
            r.skipped_special,
            r.skipped_mounts.len(),
            r.elapsed_ms as f64 / 1000.0
        );
    }
    Ok(())
}

/// Compares version-like names: digit runs as numbers.
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn runs(s: &str) -> Vec<(bool, &str)> {
        let mut v = Vec::new();
        let mut start = 0;
        let b = s.as_bytes();
        for i in 1..=b.len() {
            if i == b.len() || b[i].is_ascii_digit() != b[start].is_ascii_digit() {
                v.push((b[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        v
    }
    let (ra, rb) = (runs(a), runs(b));
    for (x, y) in ra.iter().zip(rb.iter()) {
        let o = match (x, y) {
            ((true, x), (true, y)) => x
                .trim_start_matches('0')
                .len()
                .cmp(&y.trim_start_matches('0').len())
                .then_with(|| x.trim_start_matches('0').cmp(y.trim_start_matches('0'))),
            ((_, x), (_, y)) => x.cmp(y),
        };
        if o.is_ne() {
            return o;
        }
    }
    ra.len().cmp(&rb.len())
}

/// The file entry at `path` in the tree, following symlinks (at the last
/// component) inside the tree.
fn resolve<'a>(by_path: &HashMap<&str, &'a Entry>, path: &str) -> Result<&'a Entry> {
    let mut parts: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(String::from)
        .collect();
    for _ in 0..SYMLINK_HOPS_MAX {
        let p = parts.join("/");
        match by_path.get(p.as_str()) {
            Some(e) if e.kind == EntryKind::File => return Ok(e),
            Some(e) if e.kind == EntryKind::Symlink => {
                let t = e.target.as_deref().unwrap_or("");
                let mut next: Vec<String> = if t.starts_with('/') {
                    Vec::new()
                } else {
                    parts[..parts.len() - 1].to_vec()
                };
                for c in t.split('/') {
                    match c {
                        "" | "." => {}
                        ".." => {
                            next.pop();
                        }
                        c => next.push(c.to_string()),
                    }
                }
                parts = next;
            }
            Some(_) => bail!("/{p} is a directory in the archive"),
            None => bail!("/{p} is not in the archive"),
        }
    }
    bail!("/{path}: more than {SYMLINK_HOPS_MAX} symlinks")
}

/// A boot file: its path in the tree and its (file) entry.
type BootFile<'a> = (String, &'a Entry);

/// The kernel and initramfs to boot: given, or found in /boot.
fn boot_files<'a>(
    tree: &'a crate::archive::manifest::Tree,
    kernel: Option<&str>,
    initrd: Option<&str>,
) -> Result<(BootFile<'a>, Option<BootFile<'a>>)> {
    let by_path: HashMap<&str, &Entry> =
        tree.entries.iter().map(|e| (e.path.as_str(), e)).collect();
    let newest = |prefix: &str, suffix: &str| -> Option<String> {
        tree.entries
            .iter()
            .filter(|e| e.kind != EntryKind::Dir)
            .filter_map(|e| {
                let rest = e.path.strip_prefix(prefix)?.strip_suffix(suffix)?;
                (!rest.is_empty() && !rest.contains('/')).then(|| e.path.clone())
            })
            .max_by(|a, b| natural_cmp(a, b))
    };
    let kpath = match kernel {
        Some(k) => k.trim_start_matches('/').to_string(),
        None => newest("boot/vmlinuz-", "").context(
            "no /boot/vmlinuz-* in the archive: give the kernel's path in the tree with --kernel",
        )?,
    };
    let k = resolve(&by_path, &kpath)?;
    let version = kpath.strip_prefix("boot/vmlinuz-").map(String::from);
    let ipath = match initrd {
        Some(i) => Some(i.trim_start_matches('/').to_string()),
        None => version
            .as_ref()
            .and_then(|v| {
                [
                    format!("boot/initrd.img-{v}"),
                    format!("boot/initramfs-{v}.img"),
                ]
                .into_iter()
                .find(|p| by_path.contains_key(p.as_str()))
            })
            .or_else(|| newest("boot/initrd.img-", ""))
            .or_else(|| newest("boot/initramfs-", ".img")),
    };
    let i = match ipath {
        Some(p) => Some((p.clone(), resolve(&by_path, &p)?)),
        None => None,
    };
    Ok(((kpath, k), i))
}

/// Removes a directory tree when dropped (the restored tree of a build).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn extract(store: &Store, m: &Manifest, e: &Entry, to: &Path) -> Result<()> {
    let f = std::fs::File::create_new(to)
        .with_context(|| format!("cannot create {} (it must not exist)", to.display()))?;
    let mut w = std::io::BufWriter::new(f);
    tree::read_entry(store, m, e, &mut w)?;
    std::io::Write::flush(&mut w)?;
    Ok(())
}

/// Builds the raw image `to` of `size` from archive `archive` (a captured
/// tree) and its boot files; returns what it made.
pub fn build_image(
    archive: &str,
    store: &Path,
    to: &Path,
    size: ByteSize,
    kernel: Option<&str>,
    initrd: Option<&str>,
) -> Result<BuildResult> {
    let store = Store::open(store, false)?;
    let m = store.manifest(&Name::parse(archive)?)?;
    let Some(tree) = m.trees.first() else {
        bail!("archive {archive} holds no file tree (it is a disk archive: restore it with ferry archive restore)");
    };
    let ((kpath, k), i) = boot_files(tree, kernel, initrd)?;
    if size.0 < tree.entries.iter().map(|e| e.size_bytes).sum::<u64>() {
        bail!(
            "--size {} is smaller than the tree's files ({} bytes)",
            size.0,
            m.size_bytes()
        );
    }
    let kout = with_suffix(to, ".vmlinuz");
    let iout = with_suffix(to, ".initrd");
    for p in [to, kout.as_path(), iout.as_path()] {
        if p.exists() {
            bail!("{} exists: choose a new file", p.display());
        }
    }
    let dir = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.p2v-tree.{}",
        to.file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _guard = RemoveOnDrop(tmp.clone());
    let stop = AtomicBool::new(false);
    tree::restore_tree(&store, &m, tree, &tmp, &stop, &mut |p| {
        show_progress("restore", &p)
    })?;
    let img =
        std::fs::File::create_new(to).with_context(|| format!("cannot create {}", to.display()))?;
    img.set_len(size.0)?;
    drop(img);
    eprintln!("mke2fs -t ext4 -d {} {}", tmp.display(), to.display());
    let out = Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&tmp)
        .arg("-F")
        .arg(to)
        .output()
        .context("cannot run mke2fs (package e2fsprogs)")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(to);
        bail!(
            "mke2fs failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    extract(&store, &m, k, &kout)?;
    let initrd_out = match &i {
        Some((_, e)) => {
            extract(&store, &m, e, &iout)?;
            Some(iout.clone())
        }
        None => None,
    };
    let mut qemu = vec![
        "qemu-system-x86_64".to_string(),
        "-m".into(),
        "1024".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        kout.display().to_string(),
    ];
    if let Some(i) = &initrd_out {
        qemu.extend(["-initrd".into(), i.display().to_string()]);
    }
    qemu.extend([
        "-append".into(),
        "root=/dev/vda rw console=ttyS0".into(),
        "-drive".into(),
        format!("file={},format=raw,if=virtio", to.display()),
    ]);
    Ok(BuildResult {
        archive: archive.to_string(),
        image: to.to_path_buf(),
        size_bytes: size.0,
        kernel: kout,
        kernel_in_tree: format!("/{kpath}"),
        initrd: initrd_out,
        initrd_in_tree: i.map(|(p, _)| format!("/{p}")),
        qemu_command: qemu,
    })
}

/// What `p2v build` made.
#[derive(Debug, Serialize)]
pub struct BuildResult {
    pub archive: String,
    pub image: PathBuf,
    pub size_bytes: u64,
    pub kernel: PathBuf,
    pub kernel_in_tree: String,
    pub initrd: Option<PathBuf>,
    pub initrd_in_tree: Option<String>,
    pub qemu_command: Vec<String>,
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_./=,:".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn build(
    archive: &str,
    store: &Path,
    to: &Path,
    size: ByteSize,
    kernel: Option<&str>,
    initrd: Option<&str>,
    json: bool,
) -> Result<()> {
    let r = build_image(archive, store, to, size, kernel, initrd)?;
    if json {
        crate::sys::out::print_json(&r)?;
    } else {
        println!(
            "image {} ({} bytes, ext4), kernel {} (from {}), initramfs {}",
            r.image.display(),
            r.size_bytes,
            r.kernel.display(),
            r.kernel_in_tree,
            r.initrd
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none found".into())
        );
        println!("boot it with:");
        println!(
            "  {}",
            r.qemu_command
                .iter()
                .map(|s| shell_quote(s))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_kernel_by_version() {
        use std::cmp::Ordering::*;
        assert_eq!(
            natural_cmp("boot/vmlinuz-6.1.0-9", "boot/vmlinuz-6.1.0-10"),
            Less
        );
        assert_eq!(
            natural_cmp("boot/vmlinuz-5.10.0", "boot/vmlinuz-6.1.0"),
            Less
        );
        assert_eq!(natural_cmp("a", "a"), Equal);
    }
}
