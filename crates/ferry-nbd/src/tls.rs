//! `NBD_OPT_STARTTLS`: the TLS session of one connection, shared by the
//! thread reading requests and the workers writing replies.
//!
//! ```text
//!   socket ──▶ TlsReader (raw read, no lock) ──▶ [conn] decrypt ──▶ plaintext buffer
//!   socket ◀── [sock_w] ◀── ciphertext ◀── [conn] seal ◀── TlsWriter (a worker's reply)
//! ```
//!
//! One `rustls::ServerConnection` holds the state of both directions, so it
//! sits behind a mutex (`conn`) that is held only to decrypt or seal, never
//! across a blocking socket call. The reader waits for bytes on its own
//! descriptor without any lock, then decrypts them into a buffer of its own
//! (which [`Buffered`] shows the worker pool, so a burst of small writes is
//! still seen "at hand"). A writer seals under `conn`, then takes `sock_w`
//! *before* letting go of `conn`, so records reach the socket in the order
//! they were sealed (TLS sequence numbers) and a writer blocked on a full
//! socket never keeps the reader from decrypting. A large reply is sealed and
//! sent in pieces of [`SEND_PIECE_BYTES`], so the client decrypts the first
//! while the rest is sealed. The same design as the replication link's
//! `SharedTls` in the `ferry` crate.
//!
//! The handshake itself ([`accept`]) runs on the blocking socket with no time
//! limit of its own: the server's handshake deadline closes the socket
//! under it (see [`crate::server`]).

use std::io::{self, BufRead, IoSlice, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::connection::Buffered;

/// Plaintext sealed before it goes on the socket.
pub const SEND_PIECE_BYTES: usize = 256 * 1024;

/// Ciphertext read from the socket at once.
const RECV_BYTES: usize = 64 * 1024;

/// A sealing buffer grown past this (a large reply) is not kept.
const CIPHER_RETAIN_BYTES: usize = 2 * SEND_PIECE_BYTES;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the server side of the TLS handshake on `sock` to its end (client
/// certificate checked by `config`'s verifier), and sends what rustls wants
/// to send after it.
pub fn accept<S: Read + Write>(
    config: Arc<rustls::ServerConfig>,
    sock: &mut S,
) -> io::Result<rustls::ServerConnection> {
    let mut conn = rustls::ServerConnection::new(config)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    while conn.is_handshaking() {
        conn.complete_io(sock)?;
    }
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    // Whole pieces are written into rustls at once; SEND_PIECE_BYTES bounds them.
    conn.set_buffer_limit(None);
    Ok(conn)
}

struct Shared<S> {
    conn: Mutex<rustls::ServerConnection>,
    sock_w: Mutex<S>,
}

/// Splits an established TLS session into its reading and writing halves;
/// `read_sock` and `write_sock` are two handles of the same socket.
pub fn split<S: Read + Write>(
    conn: rustls::ServerConnection,
    read_sock: S,
    write_sock: S,
) -> (TlsReader<S>, TlsWriter<S>) {
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        sock_w: Mutex::new(write_sock),
    });
    (
        TlsReader {
            shared: shared.clone(),
            sock: read_sock,
            raw: vec![0u8; RECV_BYTES].into_boxed_slice(),
            plain: Vec::with_capacity(RECV_BYTES),
            pos: 0,
            closed: false,
        },
        TlsWriter {
            shared,
            cipher: Vec::new(),
        },
    )
}

/// Seals what `conn` wants to send and puts it on the socket, keeping the
/// order: `sock_w` is taken before `conn` is let go.
fn put_out<S: Write>(
    shared: &Shared<S>,
    mut conn: MutexGuard<'_, rustls::ServerConnection>,
    cipher: &mut Vec<u8>,
) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(cipher)?;
    }
    if cipher.is_empty() {
        return Ok(());
    }
    let mut sock = lock(&shared.sock_w);
    drop(conn);
    let r = sock.write_all(cipher);
    cipher.clear();
    r
}

/// Moves the plaintext rustls holds into `plain`; `true` once the client
/// has closed the session (close_notify, or the socket's end).
fn drain(conn: &mut rustls::ServerConnection, plain: &mut Vec<u8>) -> io::Result<bool> {
    let mut reader = conn.reader();
    loop {
        match reader.fill_buf() {
            Ok([]) => return Ok(true),
            Ok(chunk) => {
                let n = chunk.len();
                plain.extend_from_slice(chunk);
                reader.consume(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            // The socket ended without close_notify: requests are framed, so a
            // cut in the middle of one is seen by the reader anyway.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}

/// The reading half: decrypted requests, with what is at hand visible.
pub struct TlsReader<S> {
    shared: Arc<Shared<S>>,
    sock: S,
    raw: Box<[u8]>,
    plain: Vec<u8>,
    pos: usize,
    closed: bool,
}

impl<S> std::fmt::Debug for TlsReader<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReader")
            .field("buffered", &(self.plain.len() - self.pos))
            .field("closed", &self.closed)
            .finish()
    }
}

impl<S: Read + Write> TlsReader<S> {
    /// Refills the (empty) plaintext buffer: from what rustls already holds,
    /// else from the socket. Leaves it empty only at the end of the stream.
    fn fill(&mut self) -> io::Result<()> {
        self.plain.clear();
        self.pos = 0;
        loop {
            if self.closed {
                return Ok(());
            }
            self.closed = drain(&mut lock(&self.shared.conn), &mut self.plain)?;
            if !self.plain.is_empty() {
                return Ok(());
            }
            let n = loop {
                match self.sock.read(&mut self.raw) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    r => break r?,
                }
            };
            let mut conn = lock(&self.shared.conn);
            let mut slice = &self.raw[..n];
            loop {
                // An empty slice tells rustls the socket ended.
                conn.read_tls(&mut slice)?;
                if let Err(e) = conn.process_new_packets() {
                    // Send the alert that says why, then give up.
                    let _ = put_out(&self.shared, conn, &mut Vec::new());
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
                // Drained as we go: rustls bounds the plaintext it holds.
                self.closed = drain(&mut conn, &mut self.plain)? || n == 0;
                if slice.is_empty() {
                    break;
                }
            }
            // A key update or an alert to answer.
            if conn.wants_write() {
                put_out(&self.shared, conn, &mut Vec::new())?;
            }
        }
    }
}

impl<S: Read + Write> Read for TlsReader<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.pos == self.plain.len() {
            self.fill()?;
        }
        let have = &self.plain[self.pos..];
        let n = have.len().min(out.len());
        out[..n].copy_from_slice(&have[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl<S: Read + Write> Buffered for TlsReader<S> {
    fn buffered(&self) -> &[u8] {
        &self.plain[self.pos..]
    }
}

/// The writing half: each `write`/`write_vectored` is sealed and sent whole.
pub struct TlsWriter<S> {
    shared: Arc<Shared<S>>,
    cipher: Vec<u8>,
}

impl<S> std::fmt::Debug for TlsWriter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsWriter")
    }
}

/// Slices of one piece: a reply has at most 3, more are sent in another piece.
const PIECE_SLICES: usize = 8;

impl<S: Write> TlsWriter<S> {
    fn send(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let mut piece: [IoSlice<'_>; PIECE_SLICES] = [IoSlice::new(&[]); PIECE_SLICES];
        let (mut i, mut off) = (0, 0);
        while i < bufs.len() {
            let (mut count, mut bytes) = (0, 0);
            while i < bufs.len() && count < PIECE_SLICES && bytes < SEND_PIECE_BYTES {
                let rest = &bufs[i][off..];
                let take = rest.len().min(SEND_PIECE_BYTES - bytes);
                if take > 0 {
                    piece[count] = IoSlice::new(&rest[..take]);
                    count += 1;
                    bytes += take;
                }
                off += take;
                if off == bufs[i].len() {
                    i += 1;
                    off = 0;
                }
            }
            self.seal_and_send(&mut piece[..count])?;
        }
        Ok(())
    }

    fn seal_and_send(&mut self, mut piece: &mut [IoSlice<'_>]) -> io::Result<()> {
        if piece.is_empty() {
            return Ok(());
        }
        let mut conn = lock(&self.shared.conn);
        {
            let mut w = conn.writer();
            while !piece.is_empty() {
                match w.write_vectored(piece) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => IoSlice::advance_slices(&mut piece, n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let r = put_out(&self.shared, conn, &mut self.cipher);
        if self.cipher.capacity() > CIPHER_RETAIN_BYTES {
            self.cipher = Vec::new();
        }
        r
    }
}

impl<S: Write> Write for TlsWriter<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(&[IoSlice::new(buf)])?;
        Ok(buf.len())
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.send(bufs)?;
        Ok(bufs.iter().map(|b| b.len()).sum())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
