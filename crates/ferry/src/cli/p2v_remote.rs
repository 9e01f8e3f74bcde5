//! `ferry p2v build … --volume V`: the image built from a captured tree,
//! imported as a ferry volume through the agent.

use std::path::Path;

use anyhow::{bail, Result};
use ferry_core::ByteSize;

/// Builds the image of `archive` and imports it as volume `volume`.
///
/// Not built yet: the agent's image import route (`ImportImage`) is not on
/// this branch. Until it is, build a file with `--to FILE` and import it.
pub fn p2v_build_volume(archive: &str, store: &Path, volume: &str, size: ByteSize) -> Result<()> {
    let _ = (store, size);
    bail!(
        "p2v build --volume is not built yet (the agent's image import is missing): build a file with `ferry p2v build {archive} --store STORE --to FILE --size SIZE` and import FILE as volume {volume} once `ferry archive import` exists"
    )
}
