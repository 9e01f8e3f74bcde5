//! A small blocking NBD client: fixed newstyle handshake with `NBD_OPT_GO`,
//! then one request at a time (simple replies), over a Unix socket (what
//! ferry's own tools use: the demo's writer, tests) or plain TCP. No TLS:
//! real workloads use QEMU or libnbd.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::proto::*;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("not an NBD server (bad magic in its greeting)")]
    NotNbd,
    #[error("the server refused export {name:?} (reply {code:#x})")]
    Refused { name: String, code: u32 },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the server answered errno {0}")]
    Errno(u32),
}

/// A client's socket.
trait Transport: Read + Write + Send + std::fmt::Debug {}
impl<T: Read + Write + Send + std::fmt::Debug> Transport for T {}

/// One connection to one export.
#[derive(Debug)]
pub struct Client {
    sock: Box<dyn Transport>,
    size: u64,
    next_cookie: u64,
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

impl Client {
    /// Connects to `addr` (HOST:PORT, plain TCP) and opens export `name`.
    pub fn connect(addr: &str, name: &str, timeout: Duration) -> Result<Client, ClientError> {
        let sock = TcpStream::connect(addr)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        sock.set_nodelay(true)?;
        Client::open(Box::new(sock), name)
    }

    /// Connects to the Unix socket at `path` and opens export `name`.
    pub fn connect_unix(path: &Path, name: &str, timeout: Duration) -> Result<Client, ClientError> {
        let sock = UnixStream::connect(path)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        Client::open(Box::new(sock), name)
    }

    /// Connects to an `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST:PORT/EXPORT` URI.
    pub fn connect_uri(uri: &str, timeout: Duration) -> Result<Client, ClientError> {
        let bad = || {
            ClientError::Protocol(format!("unsupported NBD URI {uri:?} (nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT)"))
        };
        if let Some(rest) = uri.strip_prefix("nbd+unix:///") {
            let (name, query) = rest.split_once('?').ok_or_else(bad)?;
            let path = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(bad)?;
            return Client::connect_unix(Path::new(path), name, timeout);
        }
        if let Some(rest) = uri.strip_prefix("nbd://") {
            let (addr, name) = rest.split_once('/').unwrap_or((rest, ""));
            return Client::connect(addr, name, timeout);
        }
        Err(bad())
    }

    fn open(sock: Box<dyn Transport>, name: &str) -> Result<Client, ClientError> {
        let mut c = Client {
            sock,
            size: 0,
            next_cookie: 1,
        };
        c.handshake(name)?;
        Ok(c)
    }

    fn handshake(&mut self, name: &str) -> Result<(), ClientError> {
        let mut g = [0u8; 18];
        self.sock.read_exact(&mut g)?;
        if g[..8] != NBD_MAGIC.to_be_bytes() || g[8..16] != IHAVEOPT.to_be_bytes() {
            return Err(ClientError::NotNbd);
        }
        let server_flags = be_u16(&g[16..18]);
        let mut flags = FLAG_C_FIXED_NEWSTYLE;
        if server_flags & FLAG_NO_ZEROES != 0 {
            flags |= FLAG_C_NO_ZEROES;
        }
        self.sock.write_all(&flags.to_be_bytes())?;
        // NBD_OPT_GO: name length, name, no information requests.
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        self.sock.write_all(&opt)?;
        loop {
            let mut h = [0u8; 20];
            self.sock.read_exact(&mut h)?;
            if h[..8] != OPTION_REPLY_MAGIC.to_be_bytes() {
                return Err(ClientError::Protocol("bad option reply magic".into()));
            }
            let code = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
            if len > 64 * 1024 {
                return Err(ClientError::Protocol(format!(
                    "option reply of {len} bytes"
                )));
            }
            let mut body = vec![0u8; len as usize];
            self.sock.read_exact(&mut body)?;
            match code {
                REP_ACK => break,
                REP_INFO if body.len() >= 12 && be_u16(&body) == INFO_EXPORT => {
                    self.size = u64::from_be_bytes(body[2..10].try_into().unwrap_or([0; 8]));
                }
                REP_INFO => {}
                c if c & REP_ERR != 0 => {
                    return Err(ClientError::Refused {
                        name: name.to_string(),
                        code: c,
                    })
                }
                c => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected option reply {c:#x}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.sock.write_all(&b)?;
        let mut r = [0u8; SIMPLE_REPLY_BYTES];
        self.sock.read_exact(&mut r)?;
        if r[..4] != SIMPLE_REPLY_MAGIC.to_be_bytes() {
            return Err(ClientError::Protocol(
                "bad reply magic (structured replies are not negotiated)".into(),
            ));
        }
        if r[8..16] != cookie.to_be_bytes() {
            return Err(ClientError::Protocol("reply to another request".into()));
        }
        let errno = u32::from_be_bytes([r[4], r[5], r[6], r[7]]);
        if errno != 0 {
            return Err(ClientError::Errno(errno));
        }
        Ok(())
    }

    /// Writes `data` at `offset`; with `fua`, durable before the reply.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let len = u32::try_from(data.len())
            .map_err(|_| ClientError::Protocol("write too large".into()))?;
        self.request(
            CMD_WRITE,
            if fua { CMD_FLAG_FUA } else { 0 },
            offset,
            len,
            data,
        )
    }

    /// Fills `buf` from `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let len =
            u32::try_from(buf.len()).map_err(|_| ClientError::Protocol("read too large".into()))?;
        self.request(CMD_READ, 0, offset, len, &[])?;
        self.sock.read_exact(buf)?;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])
    }

    /// Says goodbye (`NBD_CMD_DISC`), which has no reply.
    pub fn disconnect(mut self) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&CMD_DISC.to_be_bytes());
        b.extend_from_slice(&[0u8; 20]);
        let _ = self.sock.write_all(&b);
    }
}
