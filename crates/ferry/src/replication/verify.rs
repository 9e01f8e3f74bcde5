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

use crate::agent::AgentCtx;

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

/// The binary Merkle root over `leaves` (an odd node is carried up as is).
pub fn merkle_root(leaves: &[blake3::Hash]) -> blake3::Hash {
    if leaves.is_empty() {
        return blake3::hash(b"");
    }
    let mut level: Vec<blake3::Hash> = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|c| match c {
                [a, b] => {
                    let mut h = blake3::Hasher::new();
                    h.update(a.as_bytes());
                    h.update(b.as_bytes());
                    h.finalize()
                }
                [a] => *a,
                _ => unreachable!("chunks(2) yields one or two"),
            })
            .collect();
    }
    level[0]
}

/// Drains the link of `name`, then compares both sides' hashes.
pub fn verify(ctx: &AgentCtx, name: &str, timeout: Duration, start: Instant) -> Result<Value> {
    let vol = ctx.primary(name).ok_or_else(|| {
        anyhow!("volume {name:?} is not a primary on this node; run verify on the primary")
    })?;
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
            && l.queue.is_empty()
            && st.unconfirmed_extents == 0
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
    let g = ctx.cfg.replication.granularity_bytes;
    let local = leaf_hashes(&*vol, g)?;
    let peer = ctx
        .peers
        .get(&peer_name)
        .ok_or_else(|| anyhow!("peer {peer_name} is not registered"))?;
    let remote = crate::api::client::ApiClient::new(&peer.api, &peer.token)
        .get(&format!("/api/v1/volumes/{name}/hashes"))?;
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
