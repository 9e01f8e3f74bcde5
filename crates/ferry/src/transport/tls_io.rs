//! One rustls connection shared by a sending side and a reading side, on a
//! blocking socket — used by both ends of a link.
//!
//! `conn` guards the TLS state; `sock_w` keeps ciphertext in order on the
//! socket and is taken before `conn` is released, so records go out in the
//! order they were sealed, and a sender blocked on a full socket never keeps
//! the reader from decrypting what arrives. A large send is sealed and put
//! on the socket in pieces ([`SEND_PIECE_BYTES`]), so the peer decrypts the
//! first while the rest is sealed; `send` keeps another sender's bytes from
//! coming between the pieces.

use std::io::{self, BufRead, Write};
use std::net::TcpStream;
use std::sync::{Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct SharedTls {
    conn: Mutex<rustls::Connection>,
    sock_w: Mutex<TcpStream>,
    /// Held for a whole send (its pieces go out back to back).
    send: Mutex<()>,
    /// Ciphertext buffers for reuse: a fresh megabyte per send costs page
    /// faults and zeroing on every batch.
    spare: Mutex<Vec<Vec<u8>>>,
}

/// Ciphertext buffers kept for reuse (one per concurrent sender is enough).
const SPARE_CIPHER_BUFFERS: usize = 4;

/// Plaintext sealed before it goes on the socket, so sealing the rest of a
/// large send overlaps with the peer receiving and opening this much.
pub const SEND_PIECE_BYTES: usize = 256 * 1024;

impl std::fmt::Debug for SharedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedTls")
    }
}

impl SharedTls {
    /// Takes over a connection whose handshake is done; `sock` is cloned for writing.
    pub fn new(conn: impl Into<rustls::Connection>, sock: &TcpStream) -> io::Result<SharedTls> {
        let mut conn = conn.into();
        // Whole frames are written into rustls at once; the callers' queues bound memory.
        conn.set_buffer_limit(None);
        Ok(SharedTls {
            conn: Mutex::new(conn),
            sock_w: Mutex::new(sock.try_clone()?),
            send: Mutex::new(()),
            spare: Mutex::new(Vec::new()),
        })
    }

    /// Seals what `fill` writes and puts it on the socket, a piece of
    /// [`SEND_PIECE_BYTES`] at a time.
    pub fn send_with(&self, fill: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> io::Result<()> {
        let _one = lock(&self.send);
        let mut w = Pieces {
            tls: self,
            conn: None,
            sealed: 0,
            cipher: lock(&self.spare).pop().unwrap_or_default(),
        };
        let sent = fill(&mut w).and_then(|()| w.put_out());
        let mut cipher = std::mem::take(&mut w.cipher);
        drop(w);
        cipher.clear();
        let mut spare = lock(&self.spare);
        if spare.len() < SPARE_CIPHER_BUFFERS {
            spare.push(cipher);
        }
        sent
    }

    pub fn send(&self, plain: &[u8]) -> io::Result<()> {
        self.send_with(|w| w.write_all(plain))
    }

    /// Decrypts `raw` (bytes read from the socket), appending plaintext to `plain`.
    pub fn open(&self, raw: &[u8], plain: &mut Vec<u8>) -> io::Result<()> {
        let mut conn = lock(&self.conn);
        let mut slice = raw;
        while !slice.is_empty() {
            conn.read_tls(&mut slice)?;
            conn.process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")))?;
            // Drain as we go (rustls bounds the plaintext it holds), copying
            // straight from its buffer into `plain`.
            let mut reader = conn.reader();
            loop {
                match reader.fill_buf() {
                    Ok([]) => break,
                    Ok(chunk) => {
                        let m = chunk.len();
                        plain.extend_from_slice(chunk);
                        reader.consume(m);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// The writer a send fills: seals into the connection, and puts each
/// [`SEND_PIECE_BYTES`] of plaintext on the socket as soon as it is sealed.
struct Pieces<'a> {
    tls: &'a SharedTls,
    conn: Option<MutexGuard<'a, rustls::Connection>>,
    /// Plaintext sealed since the last piece went out.
    sealed: usize,
    cipher: Vec<u8>,
}

impl Pieces<'_> {
    /// Sends what is sealed, releasing the connection once the socket is
    /// held (records leave in the order they were sealed).
    fn put_out(&mut self) -> io::Result<()> {
        let Some(mut conn) = self.conn.take() else {
            return Ok(());
        };
        while conn.wants_write() {
            conn.write_tls(&mut self.cipher)?;
        }
        let mut sock = lock(&self.tls.sock_w);
        drop(conn);
        let r = sock.write_all(&self.cipher);
        self.cipher.clear();
        self.sealed = 0;
        r
    }
}

impl Write for Pieces<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let take = buf.len().min(SEND_PIECE_BYTES - self.sealed);
        let conn = self.conn.get_or_insert_with(|| lock(&self.tls.conn));
        let n = conn.writer().write(&buf[..take])?;
        self.sealed += n;
        if self.sealed >= SEND_PIECE_BYTES {
            self.put_out()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.put_out()
    }
}
