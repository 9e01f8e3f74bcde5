//! Images of other formats (qcow2, vmdk, vhdx) through the real `qemu-img`:
//! inspect one before anything reads it, convert it to raw, write one.
//!
//! An image file can name other files: a backing file, a qcow2 external
//! data file, a vmdk's extents. Converting such an image reads those files
//! (any file the caller can read, e.g. `/etc/shadow` or another tenant's
//! disk) into the result: CVE-2022-47951 (vmdk extents) and CVE-2024-32498
//! (qcow2 data-file, backing files). So:
//!
//! - the format is always given, never probed (a raw image whose first bytes
//!   look like a qcow2 header is still raw);
//! - the file is opened here, read-only with O_NOFOLLOW, and handed to
//!   `qemu-img` as that open descriptor (`/dev/fd/N`, through the `file`
//!   protocol with `--image-opts`: no `json:` or `nbd:` filename is ever
//!   interpreted): what is checked is what is converted, even if the path
//!   is swapped meanwhile, and a relative extent resolves under `/dev/fd/`
//!   (to nothing);
//! - [`inspect`] runs `qemu-img info` (which opens no backing file and
//!   reads no data) and refuses every image that names another file;
//! - [`convert_to_raw`] converts only an image [`inspect`] accepted.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::ArchiveError;

/// The formats ferry reads and writes through `qemu-img`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
    Vmdk,
    Vhdx,
}

impl ImageFormat {
    pub fn as_str(&self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vhdx => "vhdx",
        }
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = ArchiveError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "raw" => ImageFormat::Raw,
            "qcow2" => ImageFormat::Qcow2,
            "vmdk" => ImageFormat::Vmdk,
            "vhdx" => ImageFormat::Vhdx,
            other => {
                return Err(ArchiveError::Settings(format!(
                    "image format {other:?}: ferry reads and writes raw, qcow2, vmdk and vhdx"
                )))
            }
        })
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `qemu-img info` says of an accepted image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub format: ImageFormat,
    pub virtual_size_bytes: u64,
    /// Bytes the file takes on disk.
    pub actual_size_bytes: u64,
    /// vmdk: its create type (monolithicSparse, streamOptimized).
    pub subformat: Option<String>,
}

/// `driver=FMT,file.driver=file,file.filename=PATH,read-only=on` (commas in
/// the path doubled, as QemuOpts wants).
fn image_opts(path: &Path, format: ImageFormat, read_only: bool) -> String {
    let p = path.to_string_lossy().replace(',', ",,");
    format!(
        "driver={},file.driver=file,file.filename={p}{}",
        format.as_str(),
        if read_only { ",read-only=on" } else { "" }
    )
}

fn absolute(path: &Path) -> Result<(), ArchiveError> {
    if !path.is_absolute() || path.to_str().is_none() {
        return Err(ArchiveError::Settings(format!(
            "{}: an image path must be absolute UTF-8",
            path.display()
        )));
    }
    Ok(())
}

fn run(mut cmd: Command, what: &'static str, path: &Path) -> Result<Vec<u8>, ArchiveError> {
    let out = cmd.output().map_err(|source| ArchiveError::Io {
        what: "cannot run qemu-img (install qemu-utils) for",
        path: path.to_path_buf(),
        source,
    })?;
    if !out.status.success() {
        return Err(ArchiveError::Qemu {
            what,
            path: path.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

fn refuse(path: &Path, why: String) -> ArchiveError {
    ArchiveError::UnsafeImage {
        path: path.to_path_buf(),
        why,
    }
}

/// The image, open: read-only, O_NOFOLLOW, a regular file.
struct Opened {
    file: std::fs::File,
    /// `/dev/fd/N`: how `qemu-img` (a child that inherits it) names it.
    fd_path: PathBuf,
}

fn open_image(path: &Path) -> Result<Opened, ArchiveError> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    absolute(path)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| ArchiveError::Io {
            what: "cannot open the image",
            path: path.to_path_buf(),
            source,
        })?;
    let m = file.metadata().map_err(|source| ArchiveError::Io {
        what: "cannot stat the image",
        path: path.to_path_buf(),
        source,
    })?;
    if !m.is_file() {
        return Err(refuse(path, "not a regular file".into()));
    }
    let fd_path = PathBuf::from(format!("/dev/fd/{}", file.as_raw_fd()));
    Ok(Opened { file, fd_path })
}

/// `qemu-img`, with the signals ferry blocks (SIGINT, SIGTERM: awaited by
/// a thread, `sys::signals`) unblocked again, so a Ctrl-C ends it too.
fn qemu_cmd() -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("qemu-img");
    // SAFETY: the closure runs in the child between fork and exec and only
    // resets the signal mask, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(crate::sys::signals::unblock_all_in_child);
    }
    cmd
}

/// `qemu-img` inheriting `keep`'s descriptor (close-on-exec cleared in the
/// child only).
fn qemu_img(keep: &Opened) -> Command {
    use std::os::unix::io::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = keep.file.as_raw_fd();
    let mut cmd = qemu_cmd();
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only fcntl(2), which is async-signal-safe; it touches no memory of
    // the parent but the copied integer `fd`.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn info_of(path: &Path, img: &Opened, format: ImageFormat) -> Result<ImageInfo, ArchiveError> {
    let mut cmd = qemu_img(img);
    cmd.arg("info")
        .arg("--output=json")
        .arg("--image-opts")
        .arg(image_opts(&img.fd_path, format, true));
    let out = run(cmd, "qemu-img info failed on", path)?;
    let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| ArchiveError::Qemu {
        what: "qemu-img info gave unreadable JSON for",
        path: path.to_path_buf(),
        stderr: e.to_string(),
    })?;
    check_info(path, &img.fd_path, format, &v)
}

/// Runs `qemu-img info` on `path` as `format` and accepts it only if it
/// is one self-contained file: no backing file, no external data file, no
/// extent or child outside it.
pub fn inspect(path: &Path, format: ImageFormat) -> Result<ImageInfo, ArchiveError> {
    let img = open_image(path)?;
    info_of(path, &img, format)
}

/// The decision over `qemu-img info`'s JSON (separate for the unit tests).
fn check_info(
    path: &Path,
    own: &Path,
    format: ImageFormat,
    v: &serde_json::Value,
) -> Result<ImageInfo, ArchiveError> {
    const BACKING: &str = "names a backing file";
    for key in [
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
    ] {
        if let Some(b) = v.get(key) {
            return Err(refuse(
                path,
                format!(
                    "it {BACKING} ({key} {b}): converting it would read that file into the result (CVE-2024-32498 class)"
                ),
            ));
        }
    }
    if v.get("backing-image").is_some() {
        return Err(refuse(path, format!("it {BACKING} (CVE-2024-32498 class)")));
    }
    let have = v["format"].as_str().unwrap_or("");
    if have != format.as_str() {
        return Err(refuse(
            path,
            format!("qemu-img opened it as {have:?}, not {format}"),
        ));
    }
    let spec = &v["format-specific"]["data"];
    if let Some(df) = spec.get("data-file") {
        return Err(refuse(
            path,
            format!("it is a qcow2 with an external data file ({df}): converting it would read that file (CVE-2024-32498)"),
        ));
    }
    let mut subformat = None;
    if format == ImageFormat::Vmdk {
        let ct = spec["create-type"].as_str().unwrap_or("").to_string();
        if !matches!(ct.as_str(), "monolithicSparse" | "streamOptimized") {
            return Err(refuse(
                path,
                format!("it is a {ct:?} vmdk: only single-file vmdks (monolithicSparse, streamOptimized) are read; a descriptor with flat, split or other extents can name any file (CVE-2022-47951)"),
            ));
        }
        if spec["parent-cid"]
            .as_u64()
            .is_some_and(|p| p != 0xffff_ffff)
        {
            return Err(refuse(
                path,
                "it is a vmdk delta with a parent disk (CVE-2024-32498 class)".into(),
            ));
        }
        let extents = spec["extents"].as_array().cloned().unwrap_or_default();
        for e in &extents {
            let f = e["filename"].as_str().unwrap_or("");
            if Path::new(f) != own {
                return Err(refuse(
                    path,
                    format!("its extent {f:?} is another file: converting it would read that file (CVE-2022-47951)"),
                ));
            }
        }
        subformat = Some(ct);
    }
    // Newer qemu-img lists the nodes it opened: only the file itself.
    if let Some(children) = v.get("children").and_then(|c| c.as_array()) {
        for c in children {
            let name = c["name"].as_str().unwrap_or("");
            let f = c["info"]["filename"].as_str().unwrap_or("");
            if name != "file" || Path::new(f) != own {
                return Err(refuse(
                    path,
                    format!("it has a child {name:?} ({f:?}) besides its own file (CVE-2024-32498 class)"),
                ));
            }
        }
    }
    let virtual_size_bytes = v["virtual-size"]
        .as_u64()
        .ok_or_else(|| ArchiveError::Qemu {
            what: "qemu-img info gave no virtual size for",
            path: path.to_path_buf(),
            stderr: String::new(),
        })?;
    Ok(ImageInfo {
        path: path.to_path_buf(),
        format,
        virtual_size_bytes,
        actual_size_bytes: v["actual-size"].as_u64().unwrap_or(0),
        subformat,
    })
}

/// Converts an accepted image to raw at `out_raw` (`existing`: write into
/// that file as it is, `-n`, e.g. a volume's data file of the right size;
/// else `out_raw` is created). Inspects it first.
pub fn convert_to_raw(
    path: &Path,
    format: ImageFormat,
    out_raw: &Path,
    existing: bool,
) -> Result<ImageInfo, ArchiveError> {
    let img = open_image(path)?;
    let info = info_of(path, &img, format)?;
    absolute(out_raw)?;
    let mut cmd = qemu_img(&img);
    cmd.arg("convert").arg("--image-opts");
    if existing {
        cmd.arg("-n")
            .arg("--target-image-opts")
            .arg(image_opts(&img.fd_path, format, true))
            .arg(image_opts(out_raw, ImageFormat::Raw, false));
    } else {
        cmd.arg("-O")
            .arg("raw")
            .arg(image_opts(&img.fd_path, format, true))
            .arg(out_raw);
    }
    run(cmd, "qemu-img convert failed on", path)?;
    Ok(info)
}

/// Writes `out` in `format` from the raw image `raw` (`-f raw`, never
/// probed; vmdk: streamOptimized, one self-contained file). `out` must not
/// exist.
pub fn convert_from_raw(raw: &Path, out: &Path, format: ImageFormat) -> Result<(), ArchiveError> {
    absolute(raw)?;
    absolute(out)?;
    let mut cmd = qemu_cmd();
    cmd.arg("convert")
        .arg("--image-opts")
        .arg("-O")
        .arg(format.as_str());
    if format == ImageFormat::Vmdk {
        cmd.arg("-o").arg("subformat=streamOptimized");
    }
    cmd.arg(image_opts(raw, ImageFormat::Raw, true)).arg(out);
    run(cmd, "qemu-img convert failed writing", out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p() -> PathBuf {
        PathBuf::from("/i/x.img")
    }

    #[test]
    fn refuses_what_names_another_file() {
        let ok = json!({"format": "qcow2", "virtual-size": 1048576, "format-specific": {"type": "qcow2", "data": {}}});
        assert_eq!(
            check_info(&p(), &p(), ImageFormat::Qcow2, &ok)
                .unwrap()
                .virtual_size_bytes,
            1 << 20
        );
        let back = json!({"format": "qcow2", "virtual-size": 1, "backing-filename": "/etc/shadow"});
        let e = check_info(&p(), &p(), ImageFormat::Qcow2, &back)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backing file") && e.contains("CVE-2024-32498"),
            "{e}"
        );
        let df = json!({"format": "qcow2", "virtual-size": 1, "format-specific": {"data": {"data-file": "/x"}}});
        let e = check_info(&p(), &p(), ImageFormat::Qcow2, &df)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data file") && e.contains("CVE-2024-32498"),
            "{e}"
        );
        let vm = |ct: &str, f: &str| json!({"format": "vmdk", "virtual-size": 1, "format-specific": {"data": {"create-type": ct, "parent-cid": 4294967295u64, "extents": [{"filename": f}]}}});
        assert!(check_info(
            &p(),
            &p(),
            ImageFormat::Vmdk,
            &vm("streamOptimized", "/i/x.img")
        )
        .is_ok());
        let e = check_info(
            &p(),
            &p(),
            ImageFormat::Vmdk,
            &vm("monolithicSparse", "/etc/shadow"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("CVE-2022-47951"), "{e}");
        let e = check_info(
            &p(),
            &p(),
            ImageFormat::Vmdk,
            &vm("monolithicFlat", "/i/x.img"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("CVE-2022-47951"), "{e}");
        let child = json!({"format": "raw", "virtual-size": 1, "children": [{"name": "file", "info": {"filename": "/i/x.img"}}, {"name": "data-file", "info": {"filename": "/y"}}]});
        assert!(check_info(&p(), &p(), ImageFormat::Raw, &child).is_err());
        let wrong = json!({"format": "raw", "virtual-size": 1});
        assert!(check_info(&p(), &p(), ImageFormat::Qcow2, &wrong).is_err());
    }

    #[test]
    fn image_opts_escape_commas() {
        assert_eq!(
            image_opts(Path::new("/a,b"), ImageFormat::Vhdx, true),
            "driver=vhdx,file.driver=file,file.filename=/a,,b,read-only=on"
        );
    }
}
