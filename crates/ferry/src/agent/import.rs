//! `POST /api/v1/images/import` (`ferry archive import`): an image file on
//! this node becomes a new primary volume. The image is inspected first
//! (`crate::archive::qemu::inspect`: the format is given, never probed; an
//! image naming another file is refused), the volume is created with its
//! virtual size rounded up to 512 bytes, `qemu-img convert -n` writes the
//! image into the volume's data file before the volume is loaded (nothing
//! serves it yet), and then it is loaded as `CreateVolume` does. A failed
//! conversion deletes the new volume.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use ferry_core::Name;

use crate::agent::AgentCtx;
use crate::archive::qemu::{self, ImageFormat, ImageInfo};

pub fn import_image(
    ctx: &Arc<AgentCtx>,
    path: &str,
    format: &str,
    volume: &Name,
) -> Result<ImageInfo> {
    let path = Path::new(path);
    if !path.is_absolute() {
        bail!(
            "the image path {path:?} must be absolute (it is a path on node {})",
            ctx.identity.node_name
        );
    }
    let format: ImageFormat = format.parse()?;
    let info = qemu::inspect(path, format)?;
    let size = info.virtual_size_bytes.div_ceil(512) * 512;
    {
        let _g = ctx.admin.lock().unwrap_or_else(|p| p.into_inner());
        ctx.store.create(volume.as_str(), size)?;
    }
    let data = ctx.store.image_path(volume);
    let converted = qemu::convert_to_raw(path, format, &data, true)
        .with_context(|| format!("importing {} into volume {volume}", path.display()));
    let loaded = converted.and_then(|_| {
        let _g = ctx.admin.lock().unwrap_or_else(|p| p.into_inner());
        ctx.load_volume(volume.as_str())
    });
    if let Err(e) = loaded {
        if let Err(d) = ctx.store.delete(volume.as_str(), true) {
            tracing::warn!(volume = %volume, error = %d, "import.cleanup_failed");
        }
        return Err(e);
    }
    tracing::info!(volume = %volume, image = %path.display(), format = %format, size, "volume.imported");
    Ok(info)
}
