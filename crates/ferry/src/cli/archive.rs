//! `ferry archive …`: the image archive (create, list, verify, restore,
//! prune, delete, import). Local commands work on a store directory on this
//! machine; live sources (volumes, workloads, shares), restores into a
//! volume and imports go through the agent ([`super::archive_remote`]).

use std::path::Path;

use anyhow::{bail, Result};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum ArchiveCommand {}

pub fn run(cmd: &ArchiveCommand, _data_dir: &Path, _json: bool) -> Result<()> {
    match *cmd {}
    #[allow(unreachable_code)]
    {
        bail!("not built yet")
    }
}
