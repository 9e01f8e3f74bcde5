//! A deliberately minimal raw NBD client for sending what real clients never
//! would: bad magic, truncated packets, oversized requests, unknown commands.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// A TCP or Unix socket.
pub enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(b),
            Sock::Unix(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(b),
            Sock::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Raw {
    pub s: Sock,
}

impl Raw {
    /// Connects to `HOST:PORT` or `unix:PATH`.
    pub fn connect(addr: &str) -> Raw {
        let t = Some(Duration::from_secs(10));
        let s = match addr.strip_prefix("unix:") {
            Some(path) => {
                let s = UnixStream::connect(path).unwrap();
                s.set_read_timeout(t).unwrap();
                Sock::Unix(s)
            }
            None => {
                let s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(t).unwrap();
                s.set_nodelay(true).unwrap();
                Sock::Tcp(s)
            }
        };
        Raw { s }
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    /// True when the server closed the connection (EOF or reset) within the timeout.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
        }
    }

    pub fn greeting(&mut self) {
        let g = self.read_n(18);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Reads one option reply: (option, type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let data = self.read_n(len);
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            data,
        )
    }

    /// Full handshake with NBD_OPT_GO on `name`; optionally structured replies.
    pub fn go(addr: &str, name: &str, structured: bool) -> (Raw, u64) {
        let mut r = Raw::connect(addr);
        r.greeting();
        r.s.write_all(&3u32.to_be_bytes()).unwrap();
        if structured {
            r.send_option(8, &[]);
            assert_eq!(r.option_reply().1, 1);
        }
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        r.send_option(7, &d);
        let mut size = 0;
        loop {
            let (_, kind, data) = r.option_reply();
            match kind {
                3 if data[0..2] == [0, 0] => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap())
                }
                3 => {}
                1 => break,
                other => panic!("GO failed with reply {other:#x}"),
            }
        }
        (r, size)
    }

    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// Reads a simple reply header: (error, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }
}
