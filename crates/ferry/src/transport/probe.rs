//! The link probe's wire side (`ferry estimate probe`): both ends of a
//! probe over the real mutual-TLS replication transport, the listener and
//! framing a volume link uses.
//!
//! ```text
//!  prober (dials)                                  listener
//!   Probe                                      ─▶
//!                                             ◀─ Probe{offset = its frame_bytes_max} | Error
//!   Ping{seq} × IDLE_PINGS, one at a time      ─▶
//!                                             ◀─ Ping{seq, offset = bytes received}
//!   Copy{payload} … (data, discarded)          ─▶
//!   Ping{seq} between them (queued behind data)─▶
//!                                             ◀─ Ack{offset = bytes received}  (every ACK_BYTES or ACK_INTERVAL)
//!                                             ◀─ Ping{seq, offset}             (as soon as it is read)
//!   Ping{final}                                ─▶  its answer carries every byte of the phase
//! ```
//!
//! Throughput counts only bytes the listener acknowledged: a phase's
//! bytes are the `offset` of the answer to its final ping, and its time
//! runs from its first frame to that answer. Nothing here knows about
//! volumes, estimates or the API.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use ferry_wire::{FrameHeader, Kind};

use super::dial::Dialer;
use super::inbound::Inbound;
use super::tls_io::SharedTls;

/// Ping round trips measured on the idle link, before the load.
pub const IDLE_PINGS: usize = 5;
/// A ping between data frames this often while loaded.
pub const LOADED_PING_INTERVAL: Duration = Duration::from_millis(50);
/// The listener acknowledges received bytes after this many…
pub const ACK_BYTES: u64 = 4 * 1024 * 1024;
/// …or this long, whichever comes first.
pub const ACK_INTERVAL: Duration = Duration::from_millis(50);
/// Data frames' payload at most (and never above either side's
/// `replication.frame_bytes_max`).
pub const DATA_FRAME_BYTES: u32 = 1024 * 1024;
/// A paced phase sends at least this many frames a second (smaller frames
/// at low rates), so the pacing is smooth at any rate.
const PACED_FRAMES_PER_S: u64 = 50;
/// How long an answer (the listener's reply, a ping's answer) may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a probe could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The peer's replication listener could not be reached (connect, TLS).
    #[error("cannot reach {peer}'s replication listener: {why}")]
    Unreachable { peer: String, why: String },
    /// The peer answered but would not run a probe now.
    #[error("{peer} refused the probe: {why}")]
    Refused { peer: String, why: String },
    /// The link failed during the measurement.
    #[error("the link to {peer} failed during the probe: {why}")]
    Failed { peer: String, why: String },
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Length of each phase.
    pub seconds: Duration,
    /// Also a phase paced to this rate, bytes/s.
    pub max_rate_bytes_per_s: Option<u64>,
    /// This node's `replication.frame_bytes_max`.
    pub frame_bytes_max: u32,
}

/// One phase's measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    /// Bytes the listener acknowledged.
    pub bytes: u64,
    /// From the phase's first frame to the acknowledgement of its last.
    pub elapsed: Duration,
    /// Round trips of pings sent between data frames, ms.
    pub rtt_ms: Vec<f64>,
}

impl Phase {
    pub fn throughput_bytes_per_s(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s
        } else {
            0.0
        }
    }
}

/// A probe's measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// Median round trip on the idle link, ms.
    pub rtt_ms_idle: f64,
    pub unlimited: Phase,
    pub limited: Option<Phase>,
}

/// What the reader thread learned from the listener.
#[derive(Default)]
struct Heard {
    /// Pings sent and not answered yet: seq → when.
    sent: Mutex<HashMap<u64, Instant>>,
    /// Answers: seq → (round trip, bytes received by then).
    answered: Mutex<HashMap<u64, (Duration, u64)>>,
    acked: AtomicU64,
    error: Mutex<Option<String>>,
    stop: AtomicBool,
}

/// Runs a probe to `peer` (blocking, about `seconds` × phases).
pub fn measure(dialer: &Dialer, peer: &str, plan: &Plan) -> Result<Measured, ProbeError> {
    let unreachable = |why: String| ProbeError::Unreachable {
        peer: peer.to_string(),
        why,
    };
    let failed = |why: String| ProbeError::Failed {
        peer: peer.to_string(),
        why,
    };
    let (_, mut tls) = dialer
        .connect(peer)
        .map_err(|e| unreachable(format!("{e:#}")))?;
    tls.sock
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| unreachable(e.to_string()))?;
    tls.sock
        .set_write_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| unreachable(e.to_string()))?;
    let own_max = plan.frame_bytes_max;
    let mut body = Vec::new();
    let send = |tls: &mut super::dial::PeerStream, f: &[u8]| -> io::Result<()> {
        tls.write_all(f)?;
        tls.flush()
    };
    send(&mut tls, &FrameHeader::new(Kind::Probe, 0, 0, 0).encode())
        .map_err(|e| unreachable(e.to_string()))?;
    let reply = ferry_wire::read_frame(&mut tls, own_max, &mut body)
        .map_err(|e| unreachable(format!("no answer to the probe: {e}")))?;
    let peer_max = match reply.kind {
        Kind::Probe => u32::try_from(reply.offset).unwrap_or(u32::MAX),
        Kind::Error => {
            return Err(ProbeError::Refused {
                peer: peer.to_string(),
                why: String::from_utf8_lossy(&body[..reply.len as usize]).into_owned(),
            })
        }
        other => return Err(failed(format!("answered the probe with a {other:?} frame"))),
    };
    let frame_bytes = DATA_FRAME_BYTES.min(own_max).min(peer_max).max(1);

    // Idle round trips, one ping at a time.
    let mut idle = Vec::new();
    for seq in 1..=IDLE_PINGS as u64 {
        let t = Instant::now();
        send(&mut tls, &FrameHeader::new(Kind::Ping, seq, 0, 0).encode())
            .map_err(|e| failed(e.to_string()))?;
        loop {
            let h = ferry_wire::read_frame(&mut tls, own_max, &mut body)
                .map_err(|e| failed(format!("ping unanswered: {e}")))?;
            match h.kind {
                Kind::Ping if h.seq == seq => break,
                Kind::Ping | Kind::Ack => {}
                Kind::Error => {
                    return Err(failed(
                        String::from_utf8_lossy(&body[..h.len as usize]).into_owned(),
                    ))
                }
                other => return Err(failed(format!("unexpected {other:?} frame"))),
            }
        }
        idle.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let rtt_ms_idle = percentile(&mut idle, 50.0);

    // The load: one sender (this thread), one reader.
    let rustls::StreamOwned { conn, sock } = tls;
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| failed(e.to_string()))?;
    let wire = SharedTls::new(conn, &sock).map_err(|e| failed(e.to_string()))?;
    let ctl = sock.try_clone().map_err(|e| failed(e.to_string()))?;
    let heard = Heard::default();
    let result = std::thread::scope(|s| {
        let reader = std::thread::Builder::new()
            .name("probe-rx".into())
            .spawn_scoped(s, || read_answers(sock, &wire, &heard, own_max));
        if let Err(e) = reader {
            return Err(failed(format!("cannot start the reader: {e}")));
        }
        let mut next_seq = IDLE_PINGS as u64 + 1;
        let r = (|| {
            let unlimited = phase(
                &wire,
                &heard,
                plan.seconds,
                None,
                frame_bytes,
                &mut next_seq,
                0,
            )
            .map_err(failed)?;
            let limited = match plan.max_rate_bytes_per_s {
                Some(rate) => Some(
                    phase(
                        &wire,
                        &heard,
                        plan.seconds,
                        Some(rate),
                        frame_bytes,
                        &mut next_seq,
                        unlimited.1,
                    )
                    .map_err(failed)?,
                ),
                None => None,
            };
            Ok(Measured {
                rtt_ms_idle,
                unlimited: unlimited.0,
                limited: limited.map(|l| l.0),
            })
        })();
        heard.stop.store(true, Ordering::SeqCst);
        let _ = ctl.shutdown(Shutdown::Both);
        r
    });
    result
}

/// One phase: data for `seconds` (paced to `rate` if given), pings between
/// frames, then a final ping whose answer counts the phase's bytes.
/// Returns the phase and the listener's byte count at its end.
fn phase(
    wire: &SharedTls,
    heard: &Heard,
    seconds: Duration,
    rate: Option<u64>,
    frame_bytes: u32,
    next_seq: &mut u64,
    base: u64,
) -> Result<(Phase, u64), String> {
    let chunk = match rate {
        Some(r) => (r / PACED_FRAMES_PER_S).clamp(4096, u64::from(frame_bytes)) as usize,
        None => frame_bytes as usize,
    };
    // Not all zeroes (nothing on the way should find it easy).
    let payload: Vec<u8> = (0..chunk)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
        .collect();
    let frame = ferry_wire::encode_frame(Kind::Copy, 0, 0, &payload);
    let start = Instant::now();
    let mut pings = Vec::new();
    let mut last_ping = start;
    let mut tokens = chunk as f64;
    let mut last_fill = start;
    let check = |heard: &Heard| -> Result<(), String> {
        match lock(&heard.error).clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    };
    loop {
        check(heard)?;
        let now = Instant::now();
        let elapsed = now - start;
        if elapsed >= seconds {
            break;
        }
        // Pings in the paced phase too: at a low rate they keep the
        // listener's idle timeout from ending the probe between frames.
        if now - last_ping >= LOADED_PING_INTERVAL {
            last_ping = now;
            pings.push(send_ping(wire, heard, next_seq)?);
        }
        if let Some(r) = rate {
            tokens = (tokens + (now - last_fill).as_secs_f64() * r as f64).min(chunk as f64);
            last_fill = now;
            if tokens < chunk as f64 {
                let wait = (chunk as f64 - tokens) / r as f64;
                let left = (seconds - elapsed).as_secs_f64();
                let ping_due = LOADED_PING_INTERVAL
                    .saturating_sub(now - last_ping)
                    .as_secs_f64();
                std::thread::sleep(Duration::from_secs_f64(
                    wait.min(left).min(ping_due).max(0.0001),
                ));
                continue;
            }
            tokens -= chunk as f64;
        }
        wire.send(&frame)
            .map_err(|e| format!("sending data: {e}"))?;
    }
    // The final ping: answered after every byte before it was read.
    let fin = send_ping(wire, heard, next_seq)?;
    let wait_until = Instant::now() + seconds.max(ANSWER_TIMEOUT);
    let (at, received) = loop {
        check(heard)?;
        if let Some(&(rtt, received)) = lock(&heard.answered).get(&fin.0) {
            break (fin.1 + rtt, received);
        }
        if Instant::now() >= wait_until {
            return Err(format!(
                "the phase's last bytes were not acknowledged within {} s",
                seconds.max(ANSWER_TIMEOUT).as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let answered = lock(&heard.answered);
    let rtt_ms = pings
        .iter()
        .filter_map(|(seq, _)| answered.get(seq).map(|a| a.0.as_secs_f64() * 1000.0))
        .collect();
    Ok((
        Phase {
            bytes: received.saturating_sub(base),
            elapsed: at - start,
            rtt_ms,
        },
        received,
    ))
}

fn send_ping(
    wire: &SharedTls,
    heard: &Heard,
    next_seq: &mut u64,
) -> Result<(u64, Instant), String> {
    let seq = *next_seq;
    *next_seq += 1;
    let t = Instant::now();
    lock(&heard.sent).insert(seq, t);
    wire.send(&FrameHeader::new(Kind::Ping, seq, 0, 0).encode())
        .map_err(|e| format!("sending a ping: {e}"))?;
    Ok((seq, t))
}

/// The prober's reader: acknowledgements and ping answers, until stopped.
fn read_answers(mut sock: TcpStream, wire: &SharedTls, heard: &Heard, frame_max: u32) {
    let mut raw = vec![0u8; 64 * 1024];
    let mut plain = Vec::new();
    let fail = |why: String| {
        lock(&heard.error).get_or_insert(why);
    };
    while !heard.stop.load(Ordering::SeqCst) {
        match sock.read(&mut raw) {
            Ok(0) => return fail("the peer closed the connection".into()),
            Ok(n) => {
                if let Err(e) = wire.open(&raw[..n], &mut plain) {
                    return fail(format!("{e}"));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return fail(e.to_string()),
        }
        let mut used = 0;
        loop {
            let (hdr, payload, len) = match ferry_wire::split_frame(&plain[used..], frame_max) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return fail(e.to_string()),
            };
            used += len;
            match hdr.kind {
                Kind::Ack => {
                    heard.acked.fetch_max(hdr.offset, Ordering::SeqCst);
                }
                Kind::Ping => {
                    heard.acked.fetch_max(hdr.offset, Ordering::SeqCst);
                    if let Some(t) = lock(&heard.sent).remove(&hdr.seq) {
                        lock(&heard.answered).insert(hdr.seq, (t.elapsed(), hdr.offset));
                    }
                }
                Kind::Error => {
                    return fail(format!(
                        "the peer reported: {}",
                        String::from_utf8_lossy(payload)
                    ))
                }
                other => return fail(format!("unexpected {other:?} frame from the peer")),
            }
        }
        plain.drain(..used);
    }
}

/// Nearest-rank percentile `p` (0–100) of `v` (sorted in place); 0 if empty.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The listener's limits for a probe.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// `replication.frame_bytes_max`: larger frames end the probe.
    pub frame_bytes_max: u32,
    /// A probe is ended after this long (the prober's phases and drains,
    /// from `estimate.probe_seconds_max`).
    pub duration_max: Duration,
}

/// Peers whose probe this process is answering: one per peer at a time (a
/// second one is refused with an `Error` while the first runs).
fn active() -> &'static Mutex<HashSet<String>> {
    static ACTIVE: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    ACTIVE.get_or_init(|| Mutex::new(HashSet::new()))
}

struct Active(String);

impl Drop for Active {
    fn drop(&mut self) {
        lock(active()).remove(&self.0);
    }
}

/// What a probe the listener answered received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub bytes: u64,
    pub frames: u64,
}

/// The listener's side of a probe whose first frame (`Probe`) was read:
/// discards data, answers pings at once, acknowledges received bytes every
/// [`ACK_BYTES`] or [`ACK_INTERVAL`]; ends when the prober closes the link.
pub fn serve(inbound: Inbound, limits: ServeLimits) -> anyhow::Result<Served> {
    let Inbound {
        peer,
        mut reader,
        control,
        first,
        ..
    } = inbound;
    if first.kind != Kind::Probe {
        anyhow::bail!("not a probe: {:?}", first.kind);
    }
    let send = |reader: &mut std::io::BufReader<super::inbound::InboundTls>, f: &[u8]| {
        let w = reader.get_mut();
        w.write_all(f)?;
        w.flush()
    };
    if !lock(active()).insert(peer.name.clone()) {
        let why = format!("a probe from {} is already running here", peer.name);
        let _ = send(
            &mut reader,
            &ferry_wire::encode_frame(Kind::Error, 0, 0, why.as_bytes()),
        );
        let _ = control.shutdown(Shutdown::Both);
        anyhow::bail!("probe refused: {why}");
    }
    let _active = Active(peer.name.clone());
    // A prober that stops reading its answers cannot hold this thread.
    control.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    send(
        &mut reader,
        &FrameHeader::new(Kind::Probe, 0, u64::from(limits.frame_bytes_max), 0).encode(),
    )?;
    tracing::info!(peer = %peer.name, "probe.inbound.start");
    let started = Instant::now();
    let mut served = Served {
        bytes: 0,
        frames: 0,
    };
    let mut acked = 0u64;
    let mut last_ack = Instant::now();
    let mut body = Vec::new();
    let result = loop {
        if started.elapsed() > limits.duration_max {
            let why = format!(
                "probe longer than {} s (estimate.probe_seconds_max, both phases): ended",
                limits.duration_max.as_secs()
            );
            let _ = send(
                &mut reader,
                &ferry_wire::encode_frame(Kind::Error, 0, 0, why.as_bytes()),
            );
            break Err(anyhow::anyhow!(why));
        }
        let hdr = match ferry_wire::read_frame(&mut reader, limits.frame_bytes_max, &mut body) {
            Ok(h) => h,
            Err(ferry_wire::ReadFrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                break Ok(())
            }
            Err(ferry_wire::ReadFrameError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) =>
            {
                break Ok(())
            }
            Err(e) => {
                let _ = send(
                    &mut reader,
                    &ferry_wire::encode_frame(Kind::Error, 0, 0, e.to_string().as_bytes()),
                );
                break Err(e.into());
            }
        };
        served.frames += 1;
        match hdr.kind {
            Kind::Copy => {
                served.bytes += u64::from(hdr.len);
                if served.bytes - acked >= ACK_BYTES || last_ack.elapsed() >= ACK_INTERVAL {
                    acked = served.bytes;
                    last_ack = Instant::now();
                    send(
                        &mut reader,
                        &FrameHeader::new(Kind::Ack, 0, acked, 0).encode(),
                    )?;
                }
            }
            Kind::Ping => {
                acked = served.bytes;
                last_ack = Instant::now();
                send(
                    &mut reader,
                    &FrameHeader::new(Kind::Ping, hdr.seq, acked, 0).encode(),
                )?;
            }
            other => {
                let why = format!("unexpected {other:?} frame in a probe");
                let _ = send(
                    &mut reader,
                    &ferry_wire::encode_frame(Kind::Error, 0, 0, why.as_bytes()),
                );
                break Err(anyhow::anyhow!(why));
            }
        }
    };
    let _ = control.shutdown(Shutdown::Both);
    tracing::info!(peer = %peer.name, bytes = served.bytes, frames = served.frames,
        secs = started.elapsed().as_secs_f64(), "probe.inbound.end");
    result.map(|()| served)
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), 50.0);
        assert_eq!(percentile(&mut v, 99.0), 99.0);
        assert_eq!(percentile(&mut v, 100.0), 100.0);
        assert_eq!(percentile(&mut [3.0], 99.0), 3.0);
        assert_eq!(percentile(&mut [], 50.0), 0.0);
    }
}
