//! Offline seeding's source side: for each archive taken of this primary
//! at a flush barrier, the generation minted there and a dirty map of
//! every block written since. A copy restored from that archive elsewhere
//! then needs only those blocks (plus whatever a hash comparison finds
//! different), not the whole volume.
//!
//! ```text
//! DATA_DIR/volumes/NAME/seeds/ARCHIVE.seed   {archive, generation, created_unix_ms} (store record)
//! DATA_DIR/volumes/NAME/seeds/ARCHIVE.map    the dirty map since the barrier (CRC'd)
//! ```
//!
//! Writes mark the maps in memory (off: one atomic load per write). The
//! maps are saved when an activity-log extent is evicted (as the
//! replication dirty map is), every `save` of the agent's housekeeping, and
//! at a clean stop; after a crash, the activity log's extents are added,
//! so no block written since the barrier is ever missing from a map.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use ferry_core::{DirtyMap, Extent, Name};
use serde::{Deserialize, Serialize};

const SEEDS_DIR: &str = "seeds";

/// A seed's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedRecord {
    pub archive: Name,
    /// The generation minted at the archive's barrier, hex.
    pub generation: String,
    pub created_unix_ms: u64,
}

impl crate::store::Record for SeedRecord {
    const KIND: &'static str = "volume-seed";
}

#[derive(Debug)]
struct Seed {
    record: SeedRecord,
    map: DirtyMap,
}

/// A primary's seed maps.
#[derive(Debug, Default)]
pub struct SeedMaps {
    on: AtomicBool,
    changed: AtomicBool,
    seeds: Mutex<Vec<Seed>>,
    dir: Mutex<Option<PathBuf>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SeedMaps {
    /// Loads the seeds of the volume in `vol_dir`; `unclean_al`: the
    /// activity log's extents after a crash (each counts as written).
    pub fn load(
        &self,
        vol_dir: &Path,
        size: u64,
        granularity: u64,
        unclean_al: Option<(&[u64], u32)>,
    ) {
        let dir = vol_dir.join(SEEDS_DIR);
        *lock(&self.dir) = Some(dir.clone());
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut seeds = Vec::new();
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "seed") {
                continue;
            }
            let rec = match crate::store::load::<SeedRecord>(&p) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "volume.seed.unreadable: this seed is dropped (its archive seeds nothing now; --checksum still works)");
                    continue;
                }
            };
            let map_path = p.with_extension("map");
            let map = std::fs::read(&map_path)
                .ok()
                .and_then(|b| DirtyMap::decode(&b, size, granularity).ok());
            let Some(mut map) = map else {
                tracing::warn!(path = %map_path.display(), "volume.seed.map_unreadable: this seed is dropped");
                continue;
            };
            if let Some((al, shift)) = unclean_al {
                for x in al {
                    map.mark(x << shift, 1 << shift);
                }
            }
            seeds.push(Seed { record: rec, map });
        }
        seeds.sort_by_key(|s| s.record.created_unix_ms);
        self.on.store(!seeds.is_empty(), Ordering::SeqCst);
        self.changed.store(unclean_al.is_some(), Ordering::Relaxed);
        *lock(&self.seeds) = seeds;
    }

    /// Marks a write (call before it reaches the image).
    pub fn mark(&self, e: Extent) {
        if !self.on.load(Ordering::Acquire) {
            return;
        }
        for s in lock(&self.seeds).iter_mut() {
            s.map.mark(e.offset, e.length);
        }
        self.changed.store(true, Ordering::Relaxed);
    }

    /// Starts a seed for `archive` at `generation` (call with the volume
    /// frozen at the barrier); at most `max` are kept (the oldest goes).
    pub fn add(
        &self,
        archive: &Name,
        generation: u64,
        size: u64,
        granularity: u64,
        max: usize,
    ) -> std::io::Result<()> {
        let map = DirtyMap::new(size, granularity).map_err(std::io::Error::other)?;
        let record = SeedRecord {
            archive: archive.clone(),
            generation: format!("{generation:016x}"),
            created_unix_ms: crate::sys::unix_ms(),
        };
        let mut seeds = lock(&self.seeds);
        seeds.retain(|s| s.record.archive != *archive);
        while seeds.len() >= max.max(1) {
            let old = seeds.remove(0);
            self.remove_files(&old.record.archive);
            tracing::info!(archive = %old.record.archive.as_str(), "volume.seed.dropped: archive.seed_maps_max reached; the oldest seed goes");
        }
        self.save_one(&Seed {
            record: record.clone(),
            map: map.clone(),
        })?;
        seeds.push(Seed { record, map });
        self.on.store(true, Ordering::Release);
        Ok(())
    }

    fn paths(&self, archive: &Name) -> Option<(PathBuf, PathBuf)> {
        let d = lock(&self.dir).clone()?;
        Some((
            d.join(format!("{}.seed", archive.as_str())),
            d.join(format!("{}.map", archive.as_str())),
        ))
    }

    fn save_one(&self, s: &Seed) -> std::io::Result<()> {
        let Some((rec, map)) = self.paths(&s.record.archive) else {
            return Err(std::io::Error::other("the seed maps were not loaded"));
        };
        if let Some(d) = rec.parent() {
            std::fs::create_dir_all(d)?;
        }
        // Map first: a record always has its map.
        crate::store::write_atomic_private(&map, &s.map.encode())?;
        crate::store::save(&rec, &s.record).map_err(std::io::Error::other)
    }

    fn remove_files(&self, archive: &Name) {
        if let Some((rec, map)) = self.paths(archive) {
            let _ = std::fs::remove_file(rec);
            let _ = std::fs::remove_file(map);
        }
    }

    /// Saves every map if anything was marked since the last save.
    pub fn save(&self) -> std::io::Result<()> {
        if !self.changed.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let seeds = lock(&self.seeds);
        for s in seeds.iter() {
            let Some((_, map)) = self.paths(&s.record.archive) else {
                continue;
            };
            if let Err(e) = crate::store::write_atomic_private(&map, &s.map.encode()) {
                self.changed.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
        Ok(())
    }

    /// The generation and the map of `archive`'s seed.
    pub fn get(&self, archive: &str) -> Option<(u64, DirtyMap)> {
        lock(&self.seeds)
            .iter()
            .find(|s| s.record.archive.as_str() == archive)
            .and_then(|s| {
                Some((
                    u64::from_str_radix(&s.record.generation, 16).ok()?,
                    s.map.clone(),
                ))
            })
    }

    /// Forgets `archive`'s seed.
    pub fn remove(&self, archive: &Name) -> bool {
        let mut seeds = lock(&self.seeds);
        let before = seeds.len();
        seeds.retain(|s| s.record.archive != *archive);
        self.remove_files(archive);
        self.on.store(!seeds.is_empty(), Ordering::Release);
        seeds.len() != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_mark_save_and_survive_a_crash_with_the_activity_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = SeedMaps::default();
        s.load(dir.path(), 1 << 20, 4096, None);
        s.mark(Extent {
            offset: 0,
            length: 10,
        }); // before any seed: not recorded
        let a = Name::parse("a1").unwrap();
        s.add(&a, 0xabc, 1 << 20, 4096, 2).unwrap();
        s.mark(Extent {
            offset: 8192,
            length: 100,
        });
        s.save().unwrap();
        let (g, m) = s.get("a1").unwrap();
        assert_eq!(g, 0xabc);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![2]);
        // Reloaded after a crash: the activity log's extents count.
        let t = SeedMaps::default();
        t.load(dir.path(), 1 << 20, 4096, Some((&[3], 16)));
        let (_, m) = t.get("a1").unwrap();
        assert!(m.is_dirty(2) && m.is_dirty(3 * 16) && m.is_dirty(3 * 16 + 15) && !m.is_dirty(0));
        // Bounded: a third seed drops the oldest.
        t.add(&Name::parse("a2").unwrap(), 2, 1 << 20, 4096, 2)
            .unwrap();
        t.add(&Name::parse("a3").unwrap(), 3, 1 << 20, 4096, 2)
            .unwrap();
        assert!(t.get("a1").is_none());
        assert!(t.get("a2").is_some() && t.get("a3").is_some());
        assert!(!dir.path().join("seeds/a1.seed").exists());
    }
}
