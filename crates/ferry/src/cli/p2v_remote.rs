//! `ferry p2v build … --volume V`: the image built from a captured tree,
//! imported as a ferry volume through the agent (`ferry archive import`),
//! ready to run as a QEMU VM workload.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use ferry_core::ByteSize;

use crate::cli::AgentConn;

/// Builds the image of `archive` at `to` (default `./VOLUME.raw`), imports
/// it as volume `volume` through the agent of `conn` (on this machine: it
/// reads the file), removes the image, and keeps the kernel and initramfs
/// beside where it was.
#[allow(clippy::too_many_arguments)]
pub fn p2v_build_volume(
    archive: &str,
    store: &Path,
    volume: &str,
    to: Option<&Path>,
    size: ByteSize,
    (kernel, initrd): (Option<&str>, Option<&str>),
    conn: &AgentConn,
    data_dir: &Path,
    json: bool,
) -> Result<()> {
    let image: PathBuf = match to {
        Some(p) => p.to_path_buf(),
        None => std::env::current_dir()?.join(format!("{volume}.raw")),
    };
    let image = std::path::absolute(&image)?;
    if image.exists() {
        bail!("{} exists: choose another path with --to", image.display());
    }
    let built = super::p2v::build_image(archive, store, &image, size, kernel, initrd)?;
    // The image goes whatever happens to the import; the boot files stay.
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _image = Remove(image.clone());
    if !json {
        eprintln!(
            "built {} ({} bytes); importing it as volume {volume}",
            image.display(),
            built.size_bytes
        );
    }
    super::archive_remote::import_image(&image, "raw", volume, conn, data_dir)?;
    let append = "root=/dev/vda rw console=ttyS0";
    let mut workload = format!(
        "ferry workload create {volume} --volume {volume} --vm-kernel {}",
        built.kernel.display()
    );
    if let Some(i) = &built.initrd {
        workload.push_str(&format!(" --vm-initrd {}", i.display()));
    }
    workload.push_str(&format!(" --vm-append '{append}' --vm-memory 1GiB"));
    let out = serde_json::json!({
        "archive": archive,
        "volume": volume,
        "size_bytes": built.size_bytes,
        "kernel": built.kernel,
        "initrd": built.initrd,
        "kernel_in_tree": built.kernel_in_tree,
        "workload_command": workload,
    });
    crate::cli::remote::print(&out, json, |_| {
        println!(
            "volume {volume}: {} of ext4 from archive {archive}; kernel {}{}",
            ByteSize(built.size_bytes),
            built.kernel.display(),
            built
                .initrd
                .as_ref()
                .map(|i| format!(", initramfs {}", i.display()))
                .unwrap_or_default()
        );
        println!("run it as a VM workload with:\n  {workload}");
    })
}
