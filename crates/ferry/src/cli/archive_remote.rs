//! The agent's side of `ferry archive`: archives of live volumes,
//! workloads and shares, restores into a volume, imports of images, each
//! a job in the agent whose progress the CLI shows.

use std::path::Path;

use anyhow::{bail, Result};
use ferry_api::request as q;
use ferry_api::{Action, Reply};

use crate::cli::remote::{client, name, print};
use crate::cli::AgentConn;

/// `ferry archive create volume/NAME|workload/NAME|share/NAME --to STORE`:
/// `source` is `(kind, name)`.
pub fn create(
    source: (&str, &str),
    store: &Path,
    archive: Option<&str>,
    conn: &AgentConn,
    data_dir: &Path,
    json: bool,
) -> Result<()> {
    let _ = (source, store, archive, conn, data_dir, json);
    bail!("archives of live volumes, workloads and shares are not built yet")
}

/// `ferry archive restore NAME --store STORE --volume V [--disk DISK]`.
#[allow(clippy::too_many_arguments)]
pub fn restore_volume(
    archive: &str,
    store: &Path,
    volume: &str,
    disk: Option<&str>,
    conn: &AgentConn,
    data_dir: &Path,
    json: bool,
) -> Result<()> {
    let _ = (archive, store, volume, disk, conn, data_dir, json);
    bail!("restoring an archive into a volume is not built yet")
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
        Reply::ImageImported(v) => print(&v, json, |v| {
            println!(
                "imported {} ({}, {} bytes) as volume {}",
                v.path, v.format, v.size_bytes, v.volume.name
            )
        }),
        other => bail!("unexpected reply: {}", serde_json::to_string(&other)?),
    }
}
