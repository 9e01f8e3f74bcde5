//! `ferry p2v …`: capture a live Linux root tree into an archive; build a
//! bootable disk image from one.

use std::path::Path;

use anyhow::{bail, Result};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum P2vCommand {}

pub fn run(cmd: &P2vCommand, _data_dir: &Path, _json: bool) -> Result<()> {
    match *cmd {}
    #[allow(unreachable_code)]
    {
        bail!("not built yet")
    }
}
