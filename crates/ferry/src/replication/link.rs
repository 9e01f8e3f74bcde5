//! The network side of a primary's link (tokio): connect with TLS to the peer,
//! handshake, then stream queued frames and read acknowledgements until the
//! link fails; reconnect with backoff. The state machine itself is the
//! [`ferry_core::Replicator`] inside [`super::primary::Link`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_core::generation::Relation;
use ferry_core::link::{Mode, Phase, TickAction};
use ferry_core::GenerationHistory;
use ferry_wire::{FrameHeader, Hello, HelloReply, Kind, HEADER_BYTES, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};

use super::primary::{Out, PrimaryVolume};
use crate::agent::AgentCtx;

/// Flag on a Flush frame: the peer is now up to date at generation `offset`.
pub const FLAG_UP_TO_DATE: u16 = 1;
/// Idle links send a ping this often, so a dead peer is noticed.
const PING_INTERVAL_MS: u64 = 1000;

pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    frame_bytes_max: u32,
    body: &mut Vec<u8>,
) -> Result<FrameHeader> {
    let mut h = [0u8; HEADER_BYTES];
    r.read_exact(&mut h).await?;
    let hdr = FrameHeader::parse(&h, frame_bytes_max)?;
    body.resize(hdr.body_bytes(), 0);
    r.read_exact(body).await?;
    hdr.verify(body)?;
    Ok(hdr)
}

/// Runs the link of `vol` until it is stopped, reconnecting with backoff.
pub async fn run(vol: Arc<PrimaryVolume>, ctx: Arc<AgentCtx>) {
    vol.start_copier();
    let mut backoff_ms = 100;
    loop {
        let (stop, peer) = {
            let l = vol.link.lock();
            (l.stop, l.peer.clone())
        };
        let Some(peer) = peer.filter(|_| !stop) else {
            vol.link.disconnected(None);
            return;
        };
        let result = connect_once(&vol, &ctx, &peer, &mut backoff_ms).await;
        let msg = result.err().map(|e| format!("{e:#}"));
        if let Some(m) = &msg {
            tracing::warn!(volume = %vol.name, %peer, error = %m, "replication.link.down");
        }
        vol.link.disconnected(msg);
        if let Err(e) = vol.save_dirty_map(true) {
            tracing::error!(volume = %vol.name, error = %e, "replication.dirty_map.save_failed");
        }
        tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
        backoff_ms = (backoff_ms * 2).min(vol.settings.reconnect_backoff_max_ms.max(100));
    }
}

async fn connect_once(
    vol: &Arc<PrimaryVolume>,
    ctx: &Arc<AgentCtx>,
    peer_name: &str,
    backoff_ms: &mut u64,
) -> Result<()> {
    let peer = ctx
        .peers
        .get(peer_name)
        .ok_or_else(|| anyhow!("node {peer_name:?} is not registered (ferry node add)"))?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(&peer.replication),
    )
    .await
    .map_err(|_| anyhow!("connecting to {} timed out", peer.replication))?
    .with_context(|| format!("cannot connect to {} at {}", peer.name, peer.replication))?;
    tcp.set_nodelay(true)?;
    let tls_cfg = crate::agent::tls::client_config(&ctx.identity, peer.fingerprint.clone())?;
    let connector = tokio_rustls::TlsConnector::from(tls_cfg);
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(crate::agent::tls::server_name(), tcp),
    )
    .await
    .map_err(|_| anyhow!("TLS handshake with {} timed out", peer.name))?
    .with_context(|| format!("TLS handshake with {} failed", peer.name))?;
    let (mut rd, wr) = tokio::io::split(tls);
    let mut wr = BufWriter::with_capacity(256 * 1024, wr);

    let (generation, mode) = {
        let meta = vol.meta.lock().unwrap_or_else(|p| p.into_inner());
        (meta.state().generation.clone(), meta.state().mode)
    };
    let hello = Hello {
        protocol_versions: vec![PROTOCOL_VERSION],
        node_name: ctx.identity.node_name.clone(),
        volume: vol.name.clone(),
        volume_id: vol.id.clone(),
        size_bytes: ferry_nbd::BlockDevice::size(&vol.local),
        granularity_bytes: vol.settings.granularity_bytes,
        generation: generation.current(),
        ancestors: generation.ancestors().collect(),
        mode: if mode == Mode::Sync { "sync" } else { "async" }.into(),
    };
    wr.write_all(&ferry_wire::encode_frame(
        Kind::Hello,
        0,
        0,
        &hello.to_bytes(),
    ))
    .await?;
    wr.flush().await?;
    let mut body = Vec::new();
    let frame_max = vol.settings.frame_bytes_max;
    let hdr = tokio::time::timeout(
        Duration::from_secs(10),
        read_frame(&mut rd, frame_max, &mut body),
    )
    .await
    .map_err(|_| anyhow!("{} did not answer the handshake", peer.name))??;
    if hdr.kind != Kind::HelloReply {
        bail!(
            "{} answered the handshake with a {:?} frame",
            peer.name,
            hdr.kind
        );
    }
    let reply = HelloReply::from_bytes(&body[..hdr.len as usize])?;
    if reply.node_name != peer.name {
        bail!(
            "the peer at {} calls itself {:?}, not {:?}",
            peer.replication,
            reply.node_name,
            peer.name
        );
    }
    if let Some(reason) = reply.refused {
        bail!("{} refused the link: {reason}", peer.name);
    }
    let peer_gen = GenerationHistory::from_parts(reply.generation, reply.ancestors.clone(), 16);
    let mut relation = generation.relate(&peer_gen);
    {
        let now = vol.now_ms();
        let mut l = vol.link.lock();
        if relation == Relation::PeerBlank && l.checksum_baseline {
            // The dirty map already says exactly which blocks differ.
            relation = Relation::InSync;
        }
        l.checksum_baseline = false;
        if !l.rep.on_connect(relation, now) {
            l.stats.split_brain = relation == Relation::SplitBrain;
            let why = match relation {
                Relation::SplitBrain => "split brain: both copies were written separately; nothing is resynced until an operator resolves it",
                _ => "the peer holds newer data than this node; refusing to overwrite it",
            };
            drop(l);
            *backoff_ms = 30_000;
            bail!("{why}");
        }
        if relation == Relation::PeerBlank {
            // The peer's fresh image reads as zeroes: holes need not be sent.
            let mut runs = Vec::new();
            let size = ferry_nbd::BlockDevice::size(&vol.local);
            let mut pos = 0;
            while pos < size {
                runs.clear();
                ferry_nbd::BlockDevice::block_status(&vol.local, pos, size - pos, 1024, &mut runs)?;
                for r in &runs {
                    if r.hole {
                        l.rep.assume_equal(ferry_core::Extent {
                            offset: pos,
                            length: r.length,
                        });
                    }
                    pos += r.length;
                }
                if runs.is_empty() {
                    break;
                }
            }
        }
        l.bumped_while_down = false;
        l.stats.last_error = None;
        l.stats.split_brain = false;
        l.stats.connected_since = Some(std::time::Instant::now());
        l.stats.resync_total_bytes = l.rep.dirty_map().dirty_bytes();
        tracing::info!(volume = %vol.name, peer = %peer.name, ?relation,
            resync_bytes = l.stats.resync_total_bytes, "replication.link.up");
    }
    *backoff_ms = 100;
    vol.link.copier.notify_all();
    vol.link.sender.notify_one();

    let reader = {
        let vol = vol.clone();
        async move {
            let mut body = Vec::new();
            loop {
                let hdr = read_frame(&mut rd, frame_max, &mut body).await?;
                match hdr.kind {
                    Kind::Ack => {
                        let now = vol.now_ms();
                        let mut l = vol.link.lock();
                        l.rep.on_ack(hdr.seq, hdr.offset, now);
                        if l.rep.phase() == Phase::Streaming && !l.announced_up_to_date {
                            if let Some(seq) = l.rep.on_flush(now) {
                                let g = vol
                                    .meta
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .state()
                                    .generation
                                    .current();
                                l.queue.push_back(Out::Flush {
                                    seq,
                                    up_to_date_generation: Some(g),
                                });
                                l.announced_up_to_date = true;
                                vol.link.sender.notify_one();
                                tracing::info!(volume = %vol.name, "replication.resync.done: peer up to date");
                            }
                        }
                        vol.link.wake_acked(&mut l);
                        drop(l);
                        vol.link.copier.notify_all();
                    }
                    Kind::Error => {
                        let msg = String::from_utf8_lossy(&body[..hdr.len as usize]).into_owned();
                        bail!("peer reported: {msg}");
                    }
                    other => bail!("unexpected {other:?} frame from the peer"),
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        }
    };
    let writer = {
        let vol = vol.clone();
        async move {
            let mut last_sent = std::time::Instant::now();
            loop {
                let batch: Vec<Out> = {
                    let mut l = vol.link.lock();
                    if l.stop || l.peer.is_none() {
                        return Ok(());
                    }
                    if let Some(TickAction::PeerFailed { silent_ms }) = l.rep.tick(vol.now_ms()) {
                        bail!(
                            "peer silent for {silent_ms} ms (peer_ack_timeout_ms {})",
                            vol.settings.peer_ack_timeout_ms
                        );
                    }
                    l.queue.drain(..).collect()
                };
                if batch.is_empty() {
                    if last_sent.elapsed() >= Duration::from_millis(PING_INTERVAL_MS) {
                        wr.write_all(&FrameHeader::new(Kind::Ping, 0, 0, 0).encode())
                            .await?;
                        wr.flush().await?;
                        last_sent = std::time::Instant::now();
                    }
                    let _ = tokio::time::timeout(
                        Duration::from_millis(100),
                        vol.link.sender.notified(),
                    )
                    .await;
                    continue;
                }
                let mut bytes = 0u64;
                for o in &batch {
                    bytes += o.wire_bytes();
                    write_out(&mut wr, o).await?;
                }
                wr.flush().await?;
                last_sent = std::time::Instant::now();
                let mut l = vol.link.lock();
                l.stats.bytes_sent += bytes;
                l.stats.frames_sent += batch.len() as u64;
                for o in &batch {
                    match o {
                        Out::Data {
                            kind: Kind::Copy,
                            data,
                            ..
                        } => l.stats.copy_bytes_sent += data.len() as u64,
                        Out::Data { data, .. } => l.stats.write_bytes_sent += data.len() as u64,
                        _ => {}
                    }
                }
            }
        }
    };
    tokio::select! {
        r = reader => r,
        w = writer => w,
    }
}

async fn write_out<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, o: &Out) -> Result<()> {
    match o {
        Out::Data {
            kind,
            seq,
            offset,
            data,
        } => {
            let h = FrameHeader::new(*kind, *seq, *offset, data.len() as u32);
            w.write_all(&h.encode()).await?;
            w.write_all(data).await?;
            w.write_all(&ferry_wire::trailer(data)).await?;
        }
        Out::Zero {
            seq,
            offset,
            length,
        } => {
            w.write_all(&ferry_wire::encode_frame(
                Kind::Zero,
                *seq,
                *offset,
                &length.to_be_bytes(),
            ))
            .await?;
        }
        Out::Flush {
            seq,
            up_to_date_generation,
        } => {
            let mut h = FrameHeader::new(Kind::Flush, *seq, up_to_date_generation.unwrap_or(0), 0);
            if up_to_date_generation.is_some() {
                h.flags = FLAG_UP_TO_DATE;
            }
            w.write_all(&h.encode()).await?;
        }
    }
    Ok(())
}
