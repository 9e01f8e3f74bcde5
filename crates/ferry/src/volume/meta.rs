//! Per-volume replication metadata: `volumes/NAME/meta.bin`, a fixed-layout,
//! checksummed record written in place — not a database commit per write.
//!
//! Two 4 KiB slots; each update writes the slot after the current one with a
//! higher sequence number and `fdatasync`s it, so a torn write leaves the other
//! slot intact. Loading takes the valid slot with the highest sequence.
//!
//! ```text
//! slot: magic "FERRYMT1" | version u32 | seq u64 | role u8 | consistent u8 | clean u8 |
//!       mode u8 | generation u64 | n u32 | ancestors [u64; 16] | n u32 |
//!       activity-log extents [u64; 256] | peer_len u8 | peer [u8; 64] | … | crc32c u32
//! ```
//!
//! The activity log lists the 4 MiB extents writes may be in flight in. An
//! extent is recorded here, durably, *before* the first write into it is
//! submitted; after an unclean stop every listed extent counts as dirty.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_core::link::Mode;
use ferry_core::GenerationHistory;

pub const SLOT_BYTES: usize = 4096;
const MAGIC: &[u8; 8] = b"FERRYMT1";
const VERSION: u32 = 1;
pub const ANCESTORS_MAX: usize = 16;
/// Most activity-log extents one record holds.
pub const AL_SLOTS: usize = 256;
/// Activity-log extent size.
pub const AL_EXTENT_SHIFT: u32 = 22;
pub const PEER_NAME_BYTES_MAX: usize = 64;

const OFF_AL: usize = 36 + ANCESTORS_MAX * 8 + 4;
const OFF_PEER: usize = OFF_AL + AL_SLOTS * 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

/// What the record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaState {
    pub role: Role,
    /// This copy is a usable image (not mid-resync).
    pub consistent: bool,
    /// The agent stopped cleanly last time.
    pub clean: bool,
    pub mode: Mode,
    pub generation: GenerationHistory,
    pub al_extents: Vec<u64>,
    /// The replication peer, if any.
    pub peer: Option<String>,
}

impl MetaState {
    pub fn new_primary() -> MetaState {
        MetaState {
            role: Role::Primary,
            consistent: true,
            clean: true,
            mode: Mode::Sync,
            generation: GenerationHistory::blank(),
            al_extents: Vec::new(),
            peer: None,
        }
    }

    pub fn new_secondary(primary: &str) -> MetaState {
        MetaState {
            role: Role::Secondary,
            consistent: false,
            clean: true,
            mode: Mode::Sync,
            generation: GenerationHistory::blank(),
            al_extents: Vec::new(),
            peer: Some(primary.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path}: no valid metadata slot (both damaged); restore the volume or recreate the replica"
    )]
    Damaged { path: PathBuf },
}

/// The open metadata file of one volume.
#[derive(Debug)]
pub struct MetaFile {
    file: File,
    path: PathBuf,
    seq: u64,
    state: MetaState,
}

fn encode(seq: u64, s: &MetaState) -> [u8; SLOT_BYTES] {
    let mut b = [0u8; SLOT_BYTES];
    b[0..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..20].copy_from_slice(&seq.to_le_bytes());
    b[20] = match s.role {
        Role::Primary => 1,
        Role::Secondary => 2,
    };
    b[21] = u8::from(s.consistent);
    b[22] = u8::from(s.clean);
    b[23] = match s.mode {
        Mode::Sync => 0,
        Mode::Async => 1,
    };
    b[24..32].copy_from_slice(&s.generation.current().to_le_bytes());
    let anc: Vec<u64> = s.generation.ancestors().take(ANCESTORS_MAX).collect();
    b[32..36].copy_from_slice(&(anc.len() as u32).to_le_bytes());
    for (i, a) in anc.iter().enumerate() {
        b[36 + i * 8..44 + i * 8].copy_from_slice(&a.to_le_bytes());
    }
    let al = &s.al_extents[..s.al_extents.len().min(AL_SLOTS)];
    b[OFF_AL - 4..OFF_AL].copy_from_slice(&(al.len() as u32).to_le_bytes());
    for (i, e) in al.iter().enumerate() {
        b[OFF_AL + i * 8..OFF_AL + 8 + i * 8].copy_from_slice(&e.to_le_bytes());
    }
    if let Some(peer) = &s.peer {
        let p = &peer.as_bytes()[..peer.len().min(PEER_NAME_BYTES_MAX)];
        b[OFF_PEER] = p.len() as u8;
        b[OFF_PEER + 1..OFF_PEER + 1 + p.len()].copy_from_slice(p);
    }
    let crc = ferry_core::crc32c::crc32c(&b[..SLOT_BYTES - 4]);
    b[SLOT_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<(u64, MetaState)> {
    if b.len() != SLOT_BYTES || &b[0..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(b[SLOT_BYTES - 4..].try_into().ok()?);
    if ferry_core::crc32c::crc32c(&b[..SLOT_BYTES - 4]) != crc {
        return None;
    }
    if u32::from_le_bytes(b[8..12].try_into().ok()?) != VERSION {
        return None;
    }
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let seq = u64_at(12);
    let role = match b[20] {
        1 => Role::Primary,
        2 => Role::Secondary,
        _ => return None,
    };
    let n_anc = (u32::from_le_bytes(b[32..36].try_into().ok()?) as usize).min(ANCESTORS_MAX);
    let ancestors = (0..n_anc).map(|i| u64_at(36 + i * 8)).collect();
    let n_al = (u32::from_le_bytes(b[OFF_AL - 4..OFF_AL].try_into().ok()?) as usize).min(AL_SLOTS);
    let al_extents = (0..n_al).map(|i| u64_at(OFF_AL + i * 8)).collect();
    let plen = usize::from(b[OFF_PEER]).min(PEER_NAME_BYTES_MAX);
    let peer = (plen > 0)
        .then(|| String::from_utf8_lossy(&b[OFF_PEER + 1..OFF_PEER + 1 + plen]).into_owned());
    Some((
        seq,
        MetaState {
            role,
            consistent: b[21] != 0,
            clean: b[22] != 0,
            mode: if b[23] == 1 { Mode::Async } else { Mode::Sync },
            generation: GenerationHistory::from_parts(u64_at(24), ancestors, ANCESTORS_MAX),
            al_extents,
            peer,
        },
    ))
}

impl MetaFile {
    /// Opens `path`, creating it with `initial` when it does not exist.
    pub fn open_or_create(path: &Path, initial: MetaState) -> Result<MetaFile, MetaError> {
        let err = |source| MetaError::Io {
            path: path.to_path_buf(),
            source,
        };
        let exists = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(err)?;
        if !exists {
            let mut m = MetaFile {
                file,
                path: path.to_path_buf(),
                seq: 0,
                state: initial,
            };
            m.write()?;
            return Ok(m);
        }
        let mut best: Option<(u64, MetaState)> = None;
        for slot in 0..2u64 {
            let mut b = vec![0u8; SLOT_BYTES];
            if file.read_exact_at(&mut b, slot * SLOT_BYTES as u64).is_ok() {
                if let Some((seq, st)) = decode(&b) {
                    if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                        best = Some((seq, st));
                    }
                }
            }
        }
        let (seq, state) = best.ok_or_else(|| MetaError::Damaged {
            path: path.to_path_buf(),
        })?;
        Ok(MetaFile {
            file,
            path: path.to_path_buf(),
            seq,
            state,
        })
    }

    pub fn state(&self) -> &MetaState {
        &self.state
    }

    /// Changes the state and makes it durable before returning.
    pub fn update(&mut self, f: impl FnOnce(&mut MetaState)) -> Result<(), MetaError> {
        f(&mut self.state);
        self.write()
    }

    fn write(&mut self) -> Result<(), MetaError> {
        self.seq += 1;
        let slot = self.seq % 2;
        let b = encode(self.seq, &self.state);
        let err = |source| MetaError::Io {
            path: self.path.clone(),
            source,
        };
        self.file
            .write_all_at(&b, slot * SLOT_BYTES as u64)
            .map_err(err)?;
        self.file.sync_data().map_err(err)
    }
}

/// Writes the dirty map atomically next to the metadata.
pub fn save_dirty_map(dir: &Path, map: &ferry_core::DirtyMap) -> io::Result<()> {
    let path = dir.join("dirty.map");
    let tmp = dir.join("dirty.map.tmp");
    // A failed write (a full disk) leaves no partial temp file taking space.
    if let Err(e) = std::fs::write(&tmp, map.encode()).and_then(|()| File::open(&tmp)?.sync_all()) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()
}

/// Loads the saved dirty map, or `None` when there is none.
/// Blocks a demoted old primary may hold that its new primary never saw
/// (`suspect.map`): sent in the handshake, resent by the primary.
pub fn save_suspect_map(dir: &Path, map: &ferry_core::DirtyMap) -> io::Result<()> {
    let path = dir.join("suspect.map");
    let tmp = dir.join("suspect.map.tmp");
    std::fs::write(&tmp, map.encode())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The encoded suspect map, if any.
pub fn load_suspect_map(dir: &Path) -> Option<Vec<u8>> {
    std::fs::read(dir.join("suspect.map")).ok()
}

/// The replica is up to date again: nothing is suspect any more.
pub fn clear_suspect_map(dir: &Path) {
    let _ = std::fs::remove_file(dir.join("suspect.map"));
}

pub fn load_dirty_map(
    dir: &Path,
    size: u64,
    granularity: u64,
) -> io::Result<Option<Result<ferry_core::DirtyMap, ferry_core::DirtyMapError>>> {
    match std::fs::read(dir.join("dirty.map")) {
        Ok(b) => Ok(Some(ferry_core::DirtyMap::decode(&b, size, granularity))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_torn_slot() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.bin");
        let mut m = MetaFile::open_or_create(&p, MetaState::new_primary()).unwrap();
        m.update(|s| {
            s.generation.bump(42);
            s.al_extents = vec![1, 2, 3];
            s.peer = Some("b".into());
        })
        .unwrap();
        m.update(|s| s.clean = false).unwrap();
        let expected = m.state().clone();
        drop(m);
        assert_eq!(
            MetaFile::open_or_create(&p, MetaState::new_primary())
                .unwrap()
                .state(),
            &expected
        );
        // Tear the newest slot: the previous one is used.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        let newest = 3 % 2;
        f.write_all_at(&[0xff; 100], newest * SLOT_BYTES as u64 + 200)
            .unwrap();
        let m = MetaFile::open_or_create(&p, MetaState::new_primary()).unwrap();
        assert!(m.state().clean, "fell back to the slot before the torn one");
        assert_eq!(m.state().generation.current(), 42);
        // Both torn: refused, not silently reset.
        f.write_all_at(&[0xff; 100], (1 - newest) * SLOT_BYTES as u64 + 200)
            .unwrap();
        assert!(matches!(
            MetaFile::open_or_create(&p, MetaState::new_primary()),
            Err(MetaError::Damaged { .. })
        ));
    }
}
