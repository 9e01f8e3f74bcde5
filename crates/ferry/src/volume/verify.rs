//! `ferry volume verify`: are the primary and its replica equal?
//!
//! Each side hashes its image with BLAKE3 per dirty-map block (the Merkle
//! leaves) and folds them into a binary Merkle root; equal roots mean equal
//! images, and unequal leaves name the differing ranges. Before comparing, the
//! primary drains its link: a flush made durable on the peer, nothing dirty,
//! nothing queued.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use ferry_core::link::Phase;
use ferry_nbd::BlockDevice;
use serde_json::{json, Value};

/// The Merkle leaves of one volume, kept current as writes apply: a write
/// marks its blocks stale (after it reached the image), and stale leaves are
/// re-hashed by a background pass ([`LeafCache::refresh`]) or when asked for
/// ([`LeafCache::current`]). A cutover, taken with the volume frozen, so
/// re-reads only the blocks written since the last pass — its cost follows
/// the recent writes, not the volume size. Holes hash without being read.
///
/// Memory: 32 bytes per block (0.05% of the volume at 64 KiB blocks).
pub struct LeafCache {
    granularity: u64,
    size: u64,
    stale: Vec<std::sync::atomic::AtomicU64>,
    leaves: std::sync::Mutex<Vec<blake3::Hash>>,
    cursor: std::sync::atomic::AtomicU64,
    scrub_cursor: std::sync::atomic::AtomicU64,
    /// One refresh at a time: a block whose stale bit a refresh cleared is
    /// not current until that refresh stored its hash.
    refreshing: std::sync::Mutex<()>,
}

impl std::fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafCache")
            .field("blocks", &self.blocks())
            .finish_non_exhaustive()
    }
}

impl LeafCache {
    /// A cache with every leaf stale.
    pub fn new(size: u64, granularity: u64) -> LeafCache {
        let blocks = size.div_ceil(granularity);
        let words = blocks.div_ceil(64) as usize;
        let stale = (0..words)
            .map(|w| {
                let bits_here = (blocks - w as u64 * 64).min(64);
                std::sync::atomic::AtomicU64::new(if bits_here == 64 {
                    u64::MAX
                } else {
                    (1u64 << bits_here) - 1
                })
            })
            .collect();
        LeafCache {
            granularity,
            size,
            stale,
            leaves: std::sync::Mutex::new(vec![blake3::hash(b""); blocks as usize]),
            cursor: std::sync::atomic::AtomicU64::new(0),
            scrub_cursor: std::sync::atomic::AtomicU64::new(0),
            refreshing: std::sync::Mutex::new(()),
        }
    }

    fn blocks(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    /// Marks the blocks of `[offset, offset + length)` stale. Call after the
    /// bytes reached the image.
    pub fn invalidate(&self, offset: u64, length: u64) {
        if length == 0 || offset >= self.size {
            return;
        }
        let first = offset / self.granularity;
        let last = (offset + length - 1).min(self.size - 1) / self.granularity;
        for b in first..=last {
            self.stale[(b / 64) as usize]
                .fetch_or(1 << (b % 64), std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Stale blocks left.
    pub fn stale_blocks(&self) -> u64 {
        self.stale
            .iter()
            .map(|w| u64::from(w.load(std::sync::atomic::Ordering::Relaxed).count_ones()))
            .sum()
    }

    fn hash_block(&self, dev: &dyn BlockDevice, b: u64, buf: &mut Vec<u8>) -> std::io::Result<u64> {
        let off = b * self.granularity;
        let n = (self.size - off).min(self.granularity) as usize;
        let mut runs = Vec::new();
        dev.block_status(off, n as u64, 1, &mut runs)?;
        let h = if runs
            .first()
            .is_some_and(|r| r.hole && r.zero && r.length >= n as u64)
        {
            buf.clear();
            buf.resize(n, 0);
            blake3::hash(buf)
        } else {
            buf.resize(n, 0);
            dev.read_at(&mut buf[..n], off)?;
            blake3::hash(&buf[..n])
        };
        self.leaves.lock().unwrap_or_else(|p| p.into_inner())[b as usize] = h;
        Ok(n as u64)
    }

    /// Re-hashes stale blocks, up to about `budget_bytes` of them (from where
    /// the last pass stopped); returns the bytes hashed.
    pub fn refresh(&self, dev: &dyn BlockDevice, budget_bytes: u64) -> std::io::Result<u64> {
        use std::sync::atomic::Ordering;
        let _one = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        let blocks = self.blocks();
        let mut buf = Vec::new();
        let mut done = 0u64;
        let start = self.cursor.load(Ordering::Relaxed) % blocks.max(1);
        let mut b = start;
        for _ in 0..blocks {
            if done >= budget_bytes {
                break;
            }
            let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            // Clear first: a write landing from now on marks it again.
            if self.stale[w].fetch_and(!bit, Ordering::SeqCst) & bit != 0 {
                if let Err(e) = self.hash_block(dev, b, &mut buf) {
                    self.stale[w].fetch_or(bit, Ordering::SeqCst);
                    return Err(e);
                }
                done += self.granularity;
            }
            b = (b + 1) % blocks;
        }
        self.cursor.store(b, Ordering::Relaxed);
        Ok(done)
    }

    /// Background read-back: re-hashes up to `budget_bytes` of *clean*
    /// leaves from the image and corrects those that changed without a write
    /// through ferry (an image edited behind its back, bit rot). Returns the
    /// bytes read and the blocks found changed.
    pub fn scrub(&self, dev: &dyn BlockDevice, budget_bytes: u64) -> std::io::Result<(u64, u64)> {
        use std::sync::atomic::Ordering;
        let _one = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        let blocks = self.blocks();
        let mut buf = Vec::new();
        let (mut done, mut changed) = (0u64, 0u64);
        let mut b = self.scrub_cursor.load(Ordering::Relaxed) % blocks.max(1);
        for _ in 0..blocks {
            if done >= budget_bytes {
                break;
            }
            let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            if self.stale[w].load(Ordering::SeqCst) & bit == 0 {
                let before = self.leaves.lock().unwrap_or_else(|p| p.into_inner())[b as usize];
                self.hash_block(dev, b, &mut buf)?;
                let after = self.leaves.lock().unwrap_or_else(|p| p.into_inner())[b as usize];
                // A write that landed meanwhile marked it stale: not a finding.
                if after != before && self.stale[w].load(Ordering::SeqCst) & bit == 0 {
                    changed += 1;
                }
                done += self.granularity;
            }
            b = (b + 1) % blocks;
        }
        self.scrub_cursor.store(b, Ordering::Relaxed);
        Ok((done, changed))
    }

    /// Every leaf, current: stale ones are hashed now. Exact when no write
    /// lands meanwhile (a frozen primary, a drained replica).
    pub fn current(&self, dev: &dyn BlockDevice) -> std::io::Result<Vec<blake3::Hash>> {
        self.refresh(dev, u64::MAX)?;
        Ok(self
            .leaves
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }
}

/// BLAKE3 of every `granularity`-sized block of `dev`.
pub fn leaf_hashes(dev: &dyn BlockDevice, granularity: u64) -> Result<Vec<blake3::Hash>> {
    let size = dev.size();
    let mut out = Vec::with_capacity(size.div_ceil(granularity) as usize);
    let mut buf = vec![0u8; granularity as usize];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(granularity) as usize;
        dev.read_at(&mut buf[..n], pos)?;
        out.push(blake3::hash(&buf[..n]));
        pos += n as u64;
    }
    Ok(out)
}

pub use ferry_core::merkle::merkle_root;

/// Drains the link of primary `vol`, then compares both sides' hashes
/// (`granularity` bytes each; `peer_get(peer, path)` fetches the replica's
/// from its node's API).
pub fn verify(
    vol: &super::primary::PrimaryVolume,
    granularity: u64,
    peer_get: &dyn Fn(&str, &str) -> Result<Value>,
    timeout: Duration,
    start: Instant,
) -> Result<Value> {
    let name = &vol.name;
    let peer_name = vol
        .link
        .lock()
        .peer
        .clone()
        .ok_or_else(|| anyhow!("volume {name:?} is not replicated"))?;
    loop {
        vol.flush()?;
        let l = vol.link.lock();
        let st = l.rep.status();
        if st.phase == Phase::Streaming
            && st.dirty_bytes == 0
            && !l.group.as_ref().is_some_and(|g| g.has_frames(l.tag))
            && st.unconfirmed_blocks == 0
            && st.backlog_bytes == 0
        {
            break;
        }
        if start.elapsed() > timeout {
            bail!(
                "the link to {peer_name} did not drain within {} s (state {}, {} bytes dirty)",
                timeout.as_secs(),
                st.replica.as_str(),
                st.dirty_bytes
            );
        }
        drop(l);
        std::thread::sleep(Duration::from_millis(100));
    }
    // An audit reads both images whole: it also catches changes made behind
    // ferry's back, which the leaf caches (and so a cutover) cannot see.
    let g = granularity;
    let local = leaf_hashes(&vol.local, g)?;
    let remote = peer_get(
        &peer_name,
        &format!("/api/v1/volumes/{name}/hashes?fresh=1"),
    )?;
    let remote: Vec<String> = remote["hashes"]
        .as_array()
        .ok_or_else(|| anyhow!("bad hash list from {peer_name}"))?
        .iter()
        .filter_map(|h| h.as_str().map(str::to_string))
        .collect();
    if remote.len() != local.len() {
        bail!(
            "{peer_name} has {} blocks, this node {}",
            remote.len(),
            local.len()
        );
    }
    let mut differing: Vec<(u64, u64)> = Vec::new();
    for (i, (a, b)) in local.iter().zip(&remote).enumerate() {
        if a.to_hex().as_str() != b {
            let off = i as u64 * g;
            let len = g.min(vol.local.size() - off);
            match differing.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => differing.push((off, len)),
            }
        }
    }
    let remote_hashes: Vec<blake3::Hash> = remote
        .iter()
        .filter_map(|h| blake3::Hash::from_hex(h).ok())
        .collect();
    let root_local = merkle_root(&local);
    let root_peer = merkle_root(&remote_hashes);
    Ok(json!({
        "volume": name,
        "peer": peer_name,
        "equal": differing.is_empty() && root_local == root_peer,
        "root": root_local.to_hex().to_string(),
        "peer_root": root_peer.to_hex().to_string(),
        "blocks": local.len(),
        "differing": differing.iter().map(|(o, l)| json!({"offset": o, "length": l})).collect::<Vec<_>>(),
        "seconds": start.elapsed().as_secs_f64(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_nbd::MemDevice;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn leaf_cache_stays_exact_under_writes_and_a_concurrent_refresher() {
        let g = 4096;
        let size = 64 * g + 1000; // a short last block
        let dev = Arc::new(MemDevice::new(size as usize));
        let cache = Arc::new(LeafCache::new(size, g));
        let stop = Arc::new(AtomicBool::new(false));
        let bg = {
            let (dev, cache, stop) = (dev.clone(), cache.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    cache.refresh(&*dev, 8 * 4096).unwrap();
                }
            })
        };
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..200u64 {
            // Writes: data first, then invalidate (as the volumes do).
            for _ in 0..5 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = x % size;
                let len = (x >> 32) % 9000 + 1;
                let len = len.min(size - off);
                dev.write_at(&vec![(round % 251) as u8 + 1; len as usize], off, false)
                    .unwrap();
                cache.invalidate(off, len);
            }
            if round % 20 == 0 {
                assert_eq!(
                    cache.current(&*dev).unwrap(),
                    leaf_hashes(&*dev, g).unwrap()
                );
            }
        }
        stop.store(true, Ordering::SeqCst);
        bg.join().unwrap();
        assert_eq!(
            cache.current(&*dev).unwrap(),
            leaf_hashes(&*dev, g).unwrap()
        );
        assert_eq!(cache.stale_blocks(), 0);
    }
}
