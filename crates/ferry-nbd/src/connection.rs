//! One NBD connection: the handshake, then the transmission phase served by a
//! small pool of worker threads (leader/follower).
//!
//! ```text
//!   socket ──▶ [reader mutex] ──▶ worker 1 ─┐
//!                                worker 2 ─┼─▶ device (pread/pwrite/fdatasync)
//!                                ...      ─┘        │
//!   socket ◀── [writer mutex] ◀──────── reply ◀─────┘
//! ```
//!
//! Each worker takes the reader lock, reads one request (header and payload),
//! lets go of the lock, performs the request on the device, then writes its reply
//! under the writer lock with a single `writev`. There is no hand-off between
//! threads on the hot path, replies go out as each request completes (out of
//! order), and the number of workers — started lazily, when every existing one is
//! busy — is bounded by the connection's in-flight limit,
//! `max_in_flight_per_connection`.
//!
//! A WRITE may be *deferred* by the device ([`BlockDevice::write_at_deferred`]):
//! the worker goes back to the socket at once and the device answers later
//! through a [`Completion`], from whichever thread learns the outcome (say, the
//! thread reading a replica's acknowledgements, which answers many writes with
//! one `write`). Deferred writes count against the same in-flight limit, and
//! the connection ends only once every one of them has been answered.
//!
//! The code is generic over `Read`/`Write`, so the fuzz target drives the real
//! connection logic over in-memory buffers.

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::device::{Allocation, BlockDevice, Completion, Responder};
use crate::handshake::{
    greeting, ExportInfo, HandshakeError, NegotiationLimits, Negotiator, Session, Step,
};
use crate::proto::*;
use crate::transmission::{self, Command, Context};

/// A request reader that shows what it already holds, so a worker knows
/// whether its next request is at hand without blocking.
pub trait Buffered: Read {
    fn buffered(&self) -> &[u8];
}

impl<T: Read> Buffered for BufReader<T> {
    fn buffered(&self) -> &[u8] {
        self.buffer()
    }
}

impl Buffered for &[u8] {
    fn buffered(&self) -> &[u8] {
        self
    }
}

/// Whether `b` starts with a whole request (header, and payload for a WRITE).
fn request_at_hand(b: &[u8]) -> bool {
    if b.len() < REQUEST_HEADER_BYTES {
        return false;
    }
    let kind = u16::from_be_bytes([b[6], b[7]]);
    let length = u32::from_be_bytes([b[24], b[25], b[26], b[27]]) as usize;
    kind != CMD_WRITE || b.len() - REQUEST_HEADER_BYTES >= length
}

/// Per-connection limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Largest READ/WRITE payload, and the advertised maximum block size.
    pub max_request_bytes: u32,
    /// Requests served at once on one connection (worker threads).
    pub max_in_flight_per_connection: usize,
    /// Most runs in one BLOCK_STATUS reply.
    pub block_status_runs_max: usize,
    /// A worker's I/O buffer is kept between requests up to this size.
    pub buffer_retain_bytes: usize,
    /// WRITEs up to this size (without FUA) run on the worker that read them,
    /// which then goes on reading: no hand-off to another thread per request.
    /// Buffered writes to one file take its inode lock in turn anyway, so
    /// running them side by side gains nothing; 0 = hand every request off.
    pub inline_write_bytes_max: u32,
    pub negotiation: NegotiationLimits,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_request_bytes: 32 * 1024 * 1024,
            max_in_flight_per_connection: 64,
            block_status_runs_max: 1024,
            buffer_retain_bytes: 4 * 1024 * 1024,
            inline_write_bytes_max: 64 * 1024,
            negotiation: NegotiationLimits::default(),
        }
    }
}

/// Why a connection ended other than by a clean disconnect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("bad request: {0}")]
    BadMagic(#[from] BadMagic),
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("client sent bytes after NBD_OPT_STARTTLS before the TLS handshake (plaintext injection); closed")]
    PlaintextAfterStartTls,
}

/// How the transmission phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client sent `NBD_CMD_DISC` or `NBD_OPT_ABORT`.
    Disconnect,
    /// The client closed the socket (or the server shut it down).
    Closed,
}

/// Runs a handshake without TLS. `Ok(None)` when the client aborted or hung up.
pub fn handshake<R: Read, W: Write>(
    reader: &mut R,
    writer: &mut W,
    exports: &[ExportInfo],
    limits: &ConnectionLimits,
) -> Result<Option<Session>, ConnectionError> {
    let mut n = Negotiator::new(exports, limits.negotiation);
    if !greet(reader, writer, &mut n)? {
        return Ok(None);
    }
    match negotiate(reader, writer, &mut n, &mut |_| true)? {
        Negotiated::Session(s) => Ok(Some(s)),
        Negotiated::Ended => Ok(None),
        // A negotiator in TlsMode::Off never asks for TLS.
        Negotiated::StartTls => Err(ConnectionError::Handshake(HandshakeError::TlsRequired)),
    }
}

/// How option negotiation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    /// The client picked an export: on to transmission.
    Session(Session),
    /// `NBD_OPT_STARTTLS` was acknowledged: run the TLS handshake on the
    /// socket, call [`Negotiator::tls_started`], then [`negotiate`] again
    /// over the TLS stream.
    StartTls,
    /// The client aborted or hung up.
    Ended,
}

/// Sends the greeting and reads the client's flags; `Ok(false)` when the
/// client hung up.
pub fn greet<R: Read, W: Write>(
    reader: &mut R,
    writer: &mut W,
    n: &mut Negotiator<'_>,
) -> Result<bool, ConnectionError> {
    writer.write_all(&greeting())?;
    writer.flush()?;
    let mut flags = [0u8; 4];
    if !read_exact_or_eof(reader, &mut flags)? {
        return Ok(false);
    }
    n.client_flags(u32::from_be_bytes(flags))?;
    Ok(true)
}

/// Reads options and answers them until the client picks an export, asks
/// for TLS, aborts or hangs up. `ready` is called with the session the
/// client picked *before* the reply that starts transmission is written (so
/// the caller's bookkeeping is done when the client sees it); if it returns
/// `false` nothing is sent and negotiation ends.
pub fn negotiate<R: Read, W: Write>(
    reader: &mut R,
    writer: &mut W,
    n: &mut Negotiator<'_>,
    ready: &mut dyn FnMut(&Session) -> bool,
) -> Result<Negotiated, ConnectionError> {
    let mut data = Vec::new();
    let mut out = Vec::new();
    loop {
        let mut header = [0u8; OPTION_HEADER_BYTES];
        if !read_exact_or_eof(reader, &mut header)? {
            return Ok(Negotiated::Ended);
        }
        let (option, length) = n.option_header(&header)?;
        data.resize(length as usize, 0);
        reader.read_exact(&mut data)?;
        out.clear();
        let step = n.option(option, &data, &mut out)?;
        if let Step::Transmission(session) = &step {
            if !ready(session) {
                return Ok(Negotiated::Ended);
            }
        }
        writer.write_all(&out)?;
        writer.flush()?;
        match step {
            Step::Continue => {}
            Step::Abort => return Ok(Negotiated::Ended),
            Step::StartTls => return Ok(Negotiated::StartTls),
            Step::Transmission(session) => return Ok(Negotiated::Session(session)),
        }
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the first byte.
fn read_exact_or_eof<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads and drops `n` bytes (the payload of a refused WRITE) with a small buffer.
fn skip<R: Read>(r: &mut R, mut n: u64) -> io::Result<()> {
    let mut scratch = [0u8; 8192];
    while n > 0 {
        let chunk = n.min(scratch.len() as u64) as usize;
        r.read_exact(&mut scratch[..chunk])?;
        n -= chunk as u64;
    }
    Ok(())
}

/// Writes every byte of `bufs`, with as few `writev` calls as the kernel allows.
fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The reply side of a connection, shared with deferred completions.
struct Replies<W> {
    writer: Mutex<W>,
    /// Requests read and not answered yet (deferred ones included).
    in_flight: AtomicUsize,
    /// Threads waiting on `settled` for `deferred` to go down.
    waiters: AtomicUsize,
    wait_lock: Mutex<()>,
    settled: Condvar,
}

impl<W> Replies<W> {
    /// Blocks while more than `max` requests are unanswered.
    fn wait_at_most(&self, max: usize) {
        if self.in_flight.load(Ordering::SeqCst) <= max {
            return;
        }
        let mut g = lock(&self.wait_lock);
        self.waiters.fetch_add(1, Ordering::SeqCst);
        while self.in_flight.load(Ordering::SeqCst) > max {
            g = self.settled.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// `n` requests were answered.
    fn answered(&self, n: usize) {
        self.in_flight.fetch_sub(n, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = lock(&self.wait_lock);
            self.settled.notify_all();
        }
    }
}

impl<W: Write + Send> Responder for Replies<W> {
    fn respond(&self, replies: &[(u64, io::Result<()>)]) {
        let mut out = Vec::with_capacity(replies.len() * SIMPLE_REPLY_BYTES);
        for (cookie, result) in replies {
            let code = match result {
                Ok(()) => 0,
                Err(e) => {
                    let errno = Errno::from_io(e);
                    tracing::warn!(cookie, error = %e, errno = errno.code(), "nbd.request.failed");
                    errno.code()
                }
            };
            out.extend_from_slice(&simple_reply(*cookie, code));
        }
        // A failed write means the client is gone; its reader sees that too.
        if let Err(e) = lock(&self.writer).write_all(&out) {
            tracing::debug!(error = %e, "nbd.reply.lost");
        }
        self.answered(replies.len());
    }
}

struct Shared<'a, R, W> {
    reader: Mutex<R>,
    replies: Arc<Replies<W>>,
    /// `replies`, as deferred completions see it.
    responder: Arc<dyn Responder>,
    closing: AtomicBool,
    /// Workers waiting for the reader lock.
    idle: AtomicUsize,
    workers: AtomicUsize,
    /// First error that ended the connection, for the log.
    failure: Mutex<Option<ConnectionError>>,
    disconnect: AtomicBool,
    device: &'a dyn BlockDevice,
    /// Unblocks a worker stuck reading the socket when the connection must end.
    close_transport: &'a (dyn Fn() + Sync),
    ctx: Context,
    limits: ConnectionLimits,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<R, W> Shared<'_, R, W> {
    fn fail(&self, e: ConnectionError) {
        self.closing.store(true, Ordering::SeqCst);
        (self.close_transport)();
        let mut f = lock(&self.failure);
        if f.is_none() {
            *f = Some(e);
        }
    }
}

/// A request read off the wire, ready to run.
enum Incoming {
    Run {
        cookie: u64,
        cmd: Command,
    },
    Refused {
        cookie: u64,
        errno: Errno,
        read: bool,
    },
}

/// Serves the transmission phase until the client disconnects or the socket closes.
pub fn transmission<R, W>(
    reader: R,
    writer: W,
    device: &dyn BlockDevice,
    info: &ExportInfo,
    session: Session,
    limits: &ConnectionLimits,
    close_transport: &(dyn Fn() + Sync),
) -> Result<Ending, ConnectionError>
where
    R: Buffered + Send,
    W: Write + Send + 'static,
{
    let replies = Arc::new(Replies {
        writer: Mutex::new(writer),
        in_flight: AtomicUsize::new(0),
        waiters: AtomicUsize::new(0),
        wait_lock: Mutex::new(()),
        settled: Condvar::new(),
    });
    let shared = Shared {
        reader: Mutex::new(reader),
        replies: replies.clone(),
        responder: replies,
        closing: AtomicBool::new(false),
        idle: AtomicUsize::new(0),
        workers: AtomicUsize::new(1),
        failure: Mutex::new(None),
        disconnect: AtomicBool::new(false),
        device,
        close_transport,
        ctx: Context {
            size: info.size,
            read_only: info.read_only,
            session,
            max_request_bytes: limits.max_request_bytes,
        },
        limits: *limits,
    };
    std::thread::scope(|scope| worker(scope, &shared));
    // Every request (deferred ones too) is answered before the connection ends.
    shared.replies.wait_at_most(0);
    if let Some(e) = shared
        .failure
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        return Err(e);
    }
    Ok(if shared.disconnect.load(Ordering::SeqCst) {
        Ending::Disconnect
    } else {
        Ending::Closed
    })
}

const WORKER_STACK_BYTES: usize = 256 * 1024;

fn worker<'scope, 'env, R, W>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    shared: &'scope Shared<'env, R, W>,
) where
    R: Buffered + Send,
    W: Write + Send,
{
    let mut buf: Vec<u8> = Vec::new();
    let mut runs: Vec<Allocation> = Vec::new();
    let mut status: Vec<u8> = Vec::new();
    loop {
        shared.idle.fetch_add(1, Ordering::SeqCst);
        let incoming = {
            let mut reader = lock(&shared.reader);
            shared.idle.fetch_sub(1, Ordering::SeqCst);
            // Inline writes whose device work was held back (see settle()).
            let mut held = false;
            let max_in_flight = shared.limits.max_in_flight_per_connection;
            loop {
                if shared.closing.load(Ordering::SeqCst) {
                    settle(shared, &mut held);
                    return;
                }
                // Held work is done before anything that may wait: a read of
                // a request not yet at hand, or the in-flight limit (held
                // writes are answered only after it).
                if held
                    && (!request_at_hand(reader.buffered())
                        || shared.replies.in_flight.load(Ordering::SeqCst) >= max_in_flight)
                {
                    settle(shared, &mut held);
                }
                // The in-flight limit counts requests until they are answered,
                // deferred ones included; only the reader-lock holder takes one.
                shared.replies.wait_at_most(max_in_flight.saturating_sub(1));
                let incoming = read_request(&mut *reader, &shared.ctx, &mut buf);
                if matches!(&incoming, Ok(Some(i)) if !matches!(i, Incoming::Run { cmd: Command::Disconnect, .. }))
                {
                    shared.replies.in_flight.fetch_add(1, Ordering::SeqCst);
                }
                // Decide about the end of the stream while still holding the reader,
                // so no other worker starts a read that nothing will ever answer.
                if !matches!(incoming, Ok(Some(Incoming::Run { cmd, .. })) if cmd != Command::Disconnect)
                    && !matches!(incoming, Ok(Some(Incoming::Refused { .. })))
                {
                    shared.closing.store(true, Ordering::SeqCst);
                }
                // A small write runs here, and this worker keeps the reader.
                if let Ok(Some(Incoming::Run {
                    cookie,
                    cmd:
                        cmd @ Command::Write {
                            length, fua: false, ..
                        },
                })) = incoming
                {
                    if length <= shared.limits.inline_write_bytes_max {
                        let more = request_at_hand(reader.buffered());
                        let result =
                            execute(shared, cookie, cmd, more, &mut buf, &mut runs, &mut status);
                        // Without `more` the device did what was held, too.
                        held = more;
                        if !matches!(result, Ok(true)) {
                            shared.replies.answered(1);
                        }
                        if let Err(e) = result {
                            settle(shared, &mut held);
                            drop(reader);
                            shared.fail(e.into());
                            return;
                        }
                        continue;
                    }
                }
                settle(shared, &mut held);
                break incoming;
            }
        };
        let incoming = match incoming {
            Ok(Some(i)) => i,
            Ok(None) => {
                shared.closing.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                shared.fail(e);
                return;
            }
        };
        if let Incoming::Run {
            cmd: Command::Disconnect,
            ..
        } = incoming
        {
            shared.disconnect.store(true, Ordering::SeqCst);
            shared.closing.store(true, Ordering::SeqCst);
            return;
        }
        // Keep one worker at the reader while this one works, up to the limit.
        if shared.idle.load(Ordering::SeqCst) == 0 {
            let n = shared.workers.load(Ordering::SeqCst);
            if n < shared.limits.max_in_flight_per_connection
                && shared
                    .workers
                    .compare_exchange(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                let spawned = std::thread::Builder::new()
                    .name("nbd-worker".into())
                    .stack_size(WORKER_STACK_BYTES)
                    .spawn_scoped(scope, move || worker(scope, shared));
                if spawned.is_err() {
                    shared.workers.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
        let result = match incoming {
            Incoming::Refused {
                cookie,
                errno,
                read,
            } => reply_error(shared, cookie, errno, read).map(|()| false),
            Incoming::Run { cookie, cmd } => {
                execute(shared, cookie, cmd, false, &mut buf, &mut runs, &mut status)
            }
        };
        if !matches!(result, Ok(true)) {
            shared.replies.answered(1);
        }
        if let Err(e) = result {
            shared.fail(e.into());
            return;
        }
        if buf.len() > shared.limits.buffer_retain_bytes {
            buf = Vec::new();
        }
    }
}

/// Lets the device do what inline writes held back.
fn settle<R, W>(shared: &Shared<'_, R, W>, held: &mut bool) {
    if std::mem::take(held) {
        shared.device.settle();
    }
}

/// Reads one request; for WRITE, its payload lands in `buf[..length]`.
/// `Ok(None)` on a clean EOF between requests.
fn read_request<R: Read>(
    reader: &mut R,
    ctx: &Context,
    buf: &mut Vec<u8>,
) -> Result<Option<Incoming>, ConnectionError> {
    let mut raw = [0u8; REQUEST_HEADER_BYTES];
    if !read_exact_or_eof(reader, &mut raw)? {
        return Ok(None);
    }
    let h = RequestHeader::parse(&raw)?;
    let payload = transmission::payload_bytes(&h);
    match transmission::validate(&h, ctx) {
        Ok(cmd) => {
            if let Command::Write { length, .. } = cmd {
                let len = length as usize;
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                reader.read_exact(&mut buf[..len])?;
            }
            Ok(Some(Incoming::Run {
                cookie: h.cookie,
                cmd,
            }))
        }
        Err(refusal) => {
            tracing::debug!(
                cookie = h.cookie,
                kind = h.kind,
                offset = h.offset,
                length = h.length,
                errno = refusal.errno.code(),
                reason = refusal.reason,
                "nbd.request.refused"
            );
            skip(reader, u64::from(payload))?;
            Ok(Some(Incoming::Refused {
                cookie: h.cookie,
                errno: refusal.errno,
                read: h.kind == CMD_READ,
            }))
        }
    }
}

/// Runs one request; `more_at_hand` as in [`BlockDevice::write_at_deferred`].
fn execute<R, W: Write>(
    shared: &Shared<'_, R, W>,
    cookie: u64,
    cmd: Command,
    more_at_hand: bool,
    buf: &mut Vec<u8>,
    runs: &mut Vec<Allocation>,
    status: &mut Vec<u8>,
) -> io::Result<bool> {
    let dev = shared.device;
    let outcome = match cmd {
        Command::Read { offset, length } => {
            let len = length as usize;
            if buf.len() < len {
                buf.resize(len, 0);
            }
            match dev.read_at(&mut buf[..len], offset) {
                Ok(()) => return reply_read(shared, cookie, offset, &buf[..len]).map(|()| false),
                Err(e) => Err(e),
            }
        }
        Command::Write {
            offset,
            length,
            fua,
        } => {
            let done = Completion::new(shared.responder.clone(), cookie);
            dev.write_at_deferred(&buf[..length as usize], offset, fua, more_at_hand, done);
            return Ok(true);
        }
        Command::Flush => dev.flush(),
        Command::Trim {
            offset,
            length,
            fua,
        } => dev.trim(offset, u64::from(length), fua),
        Command::Cache { offset, length } => dev.cache(offset, u64::from(length)),
        Command::WriteZeroes {
            offset,
            length,
            mode,
            fua,
        } => dev.write_zeroes(offset, u64::from(length), mode, fua),
        Command::BlockStatus {
            offset,
            length,
            one,
        } => {
            runs.clear();
            let max = if one {
                1
            } else {
                shared.limits.block_status_runs_max
            };
            match dev.block_status(offset, u64::from(length), max, runs) {
                Ok(()) => {
                    return reply_block_status(shared, cookie, length, runs, status).map(|()| false)
                }
                Err(e) => Err(e),
            }
        }
        Command::Disconnect => Ok(()),
    };
    match outcome {
        Ok(()) => reply_ok(shared, cookie),
        Err(e) => {
            let errno = Errno::from_io(&e);
            tracing::warn!(cookie, ?cmd, error = %e, errno = errno.code(), "nbd.request.failed");
            reply_error(shared, cookie, errno, matches!(cmd, Command::Read { .. }))
        }
    }
    .map(|()| false)
}

fn reply_ok<R, W: Write>(shared: &Shared<'_, R, W>, cookie: u64) -> io::Result<()> {
    lock(&shared.replies.writer).write_all(&simple_reply(cookie, 0))
}

fn reply_error<R, W: Write>(
    shared: &Shared<'_, R, W>,
    cookie: u64,
    errno: Errno,
    is_read: bool,
) -> io::Result<()> {
    let mut w = lock(&shared.replies.writer);
    if shared.ctx.session.structured_replies && is_read {
        // A READ under structured replies must answer with chunks.
        let mut b = [0u8; 26];
        b[..20].copy_from_slice(&chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6));
        b[20..24].copy_from_slice(&errno.code().to_be_bytes());
        // b[24..26]: message length 0.
        w.write_all(&b)
    } else {
        w.write_all(&simple_reply(cookie, errno.code()))
    }
}

fn reply_read<R, W: Write>(
    shared: &Shared<'_, R, W>,
    cookie: u64,
    offset: u64,
    data: &[u8],
) -> io::Result<()> {
    let mut w = lock(&shared.replies.writer);
    if shared.ctx.session.structured_replies {
        // data.len() <= max_request_bytes < 2^32 - 8, checked by validation.
        let len = (data.len() + 8) as u32;
        let hdr = chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, len);
        let off = offset.to_be_bytes();
        write_all_vectored(
            &mut *w,
            &mut [IoSlice::new(&hdr), IoSlice::new(&off), IoSlice::new(data)],
        )
    } else {
        let hdr = simple_reply(cookie, 0);
        write_all_vectored(&mut *w, &mut [IoSlice::new(&hdr), IoSlice::new(data)])
    }
}

fn reply_block_status<R, W: Write>(
    shared: &Shared<'_, R, W>,
    cookie: u64,
    length: u32,
    runs: &[Allocation],
    payload: &mut Vec<u8>,
) -> io::Result<()> {
    payload.clear();
    payload.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
    let mut covered: u64 = 0;
    for run in runs {
        // Never report more than was asked, even if a device over-reports.
        let len = run.length.min(u64::from(length) - covered);
        if len == 0 {
            break;
        }
        covered += len;
        payload.extend_from_slice(&(len as u32).to_be_bytes());
        payload.extend_from_slice(&run.flags().to_be_bytes());
    }
    if covered == 0 {
        // A device that reported nothing: the spec needs one descriptor; status 0 is always safe.
        payload.extend_from_slice(&length.to_be_bytes());
        payload.extend_from_slice(&0u32.to_be_bytes());
    }
    let hdr = chunk_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        payload.len() as u32,
    );
    let mut w = lock(&shared.replies.writer);
    write_all_vectored(&mut *w, &mut [IoSlice::new(&hdr), IoSlice::new(payload)])
}
