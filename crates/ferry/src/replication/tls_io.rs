//! One rustls connection shared by a sending side and a reading side, on a
//! blocking socket — used by both ends of a link.
//!
//! `conn` guards the TLS state; `sock_w` keeps ciphertext in order on the
//! socket and is taken before `conn` is released, so records go out in the
//! order they were sealed, and a sender blocked on a full socket never keeps
//! the reader from decrypting what arrives.

use std::io::{self, BufRead, Write};
use std::net::TcpStream;
use std::sync::{Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct SharedTls {
    conn: Mutex<rustls::Connection>,
    sock_w: Mutex<TcpStream>,
    /// Ciphertext buffers for reuse: a fresh megabyte per send costs page
    /// faults and zeroing on every batch.
    spare: Mutex<Vec<Vec<u8>>>,
}

/// Ciphertext buffers kept for reuse (one per concurrent sender is enough).
const SPARE_CIPHER_BUFFERS: usize = 4;

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
            spare: Mutex::new(Vec::new()),
        })
    }

    /// Seals what `fill` writes and puts it on the socket.
    pub fn send_with(&self, fill: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> io::Result<()> {
        let mut conn = lock(&self.conn);
        fill(&mut conn.writer())?;
        let mut cipher = lock(&self.spare).pop().unwrap_or_default();
        while conn.wants_write() {
            conn.write_tls(&mut cipher)?;
        }
        let mut sock = lock(&self.sock_w);
        drop(conn);
        let sent = sock.write_all(&cipher);
        drop(sock);
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
