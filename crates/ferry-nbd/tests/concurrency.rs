//! The server answers requests out of order as each completes, and never runs
//! more than `max_in_flight_per_connection` of one connection's requests at once.
//!
//! A gated device (a `MemDevice` whose reads can be held) makes the timing
//! deterministic: the server under test is real, over real TCP.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ferry_nbd::device::{Allocation, BlockDevice, Completion, MemDevice, ZeroMode};
use ferry_nbd::{ConnectionLimits, Export, ListenAddr, Listener, Server, ServerLimits};

/// The methods a test device passes straight to its `inner` MemDevice;
/// `@but_read` leaves `read_at` to the device.
macro_rules! forward_to_inner {
    () => {
        forward_to_inner!(@but_read);
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.inner.read_at(buf, offset)
        }
    };
    (@but_read) => {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
            self.inner.write_at(buf, offset, fua)
        }
        fn flush(&self) -> std::io::Result<()> {
            self.inner.flush()
        }
        fn trim(&self, offset: u64, length: u64, fua: bool) -> std::io::Result<()> {
            self.inner.trim(offset, length, fua)
        }
        fn write_zeroes(&self, o: u64, l: u64, m: ZeroMode, fua: bool) -> std::io::Result<()> {
            self.inner.write_zeroes(o, l, m, fua)
        }
        fn block_status(
            &self,
            offset: u64,
            length: u64,
            max_runs: usize,
            out: &mut Vec<Allocation>,
        ) -> std::io::Result<()> {
            self.inner.block_status(offset, length, max_runs, out)
        }
    };
}

/// Holds every read until `open()` is called; counts reads running at once.
struct Gate {
    inner: MemDevice,
    open: Mutex<bool>,
    cv: Condvar,
    running: AtomicUsize,
    peak: AtomicUsize,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            inner: MemDevice::new(1 << 20),
            open: Mutex::new(false),
            cv: Condvar::new(),
            running: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        })
    }
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl BlockDevice for Gate {
    forward_to_inner!(@but_read);
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let g = self.open.lock().unwrap();
        let _g = self
            .cv
            .wait_timeout_while(g, Duration::from_secs(10), |open| !*open)
            .unwrap();
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.inner.read_at(buf, offset)
    }
}

fn serve(dev: Arc<dyn BlockDevice>, max_in_flight: usize) -> (Server, String) {
    let server = Server::new(
        vec![Export {
            name: "g".into(),
            description: String::new(),
            read_only: false,
            device: dev,
        }],
        ServerLimits {
            connection: ConnectionLimits {
                max_in_flight_per_connection: max_in_flight,
                ..ConnectionLimits::default()
            },
            ..ServerLimits::default()
        },
    )
    .unwrap();
    let l = Listener::bind(&"127.0.0.1:0".parse::<ListenAddr>().unwrap()).unwrap();
    let ListenAddr::Tcp(addr) = l.local_addr().clone() else {
        unreachable!()
    };
    server.serve(l).unwrap();
    (server, addr.to_string())
}

fn connect(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    // NBD_OPT_EXPORT_NAME "g" (with NO_ZEROES negotiated: size + flags only).
    let mut o = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
    o.extend_from_slice(&1u32.to_be_bytes());
    o.extend_from_slice(&1u32.to_be_bytes());
    o.push(b'g');
    s.write_all(&o).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    s
}

fn request(s: &mut TcpStream, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
    let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    s.write_all(&b).unwrap();
}

/// Reads a simple reply; returns (error, cookie) and skips `data` bytes for reads.
fn reply(s: &mut TcpStream, data: usize) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    let mut d = vec![0u8; data];
    s.read_exact(&mut d).unwrap();
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

#[test]
fn a_slow_read_does_not_hold_back_later_writes() {
    let dev = Gate::new();
    let (server, addr) = serve(dev.clone(), 16);
    let mut s = connect(&addr);
    request(&mut s, 0, 1, 0, 4096, &[]); // held by the gate
    request(&mut s, 1, 2, 4096, 4, b"fast");
    request(&mut s, 3, 3, 0, 0, &[]); // flush
                                      // The write and the flush are answered while the read is still held.
    let mut first = [reply(&mut s, 0), reply(&mut s, 0)];
    first.sort();
    assert_eq!(first, [(0, 2), (0, 3)]);
    dev.open();
    assert_eq!(reply(&mut s, 4096), (0, 1));
    server.shutdown();
}

#[test]
fn in_flight_requests_are_bounded_per_connection() {
    let dev = Gate::new();
    let (server, addr) = serve(dev.clone(), 4);
    let mut s = connect(&addr);
    for cookie in 0..20 {
        request(&mut s, 0, cookie, 0, 512, &[]);
    }
    // Give the server every chance to overrun its limit.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(dev.peak.load(Ordering::SeqCst), 4);
    dev.open();
    let mut cookies: Vec<u64> = (0..20).map(|_| reply(&mut s, 512).1).collect();
    cookies.sort();
    assert_eq!(cookies, (0..20).collect::<Vec<_>>());
    assert!(dev.peak.load(Ordering::SeqCst) <= 4);
    server.shutdown();
}

#[test]
fn shutdown_closes_connections_and_stops_accepting() {
    let dev = Gate::new();
    dev.open();
    let (server, addr) = serve(dev, 4);
    let mut s = connect(&addr);
    request(&mut s, 1, 1, 0, 3, b"abc");
    assert_eq!(reply(&mut s, 0), (0, 1));
    server.shutdown();
    let mut b = [0u8; 1];
    assert_eq!(
        s.read(&mut b).unwrap_or(0),
        0,
        "connection closed by shutdown"
    );
    std::thread::sleep(Duration::from_millis(50));
    match TcpStream::connect(&addr) {
        Err(_) => {}
        Ok(mut c) => {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(c.read(&mut b).unwrap_or(0), 0, "no greeting after shutdown");
        }
    }
}

/// Regression: a worker could start reading after another had read DISC, so the
/// server never closed the connection. Repeated to catch the interleaving.
#[test]
fn disconnect_after_pipelined_requests_always_closes() {
    let dev = Gate::new();
    dev.open();
    let (server, addr) = serve(dev, 16);
    for round in 0..100u64 {
        let mut s = connect(&addr);
        // Pipelined writes grow the worker pool; then one request at a time, so an
        // idle worker is queued on the reader lock when DISC arrives.
        for cookie in 0..8 {
            request(&mut s, 1, cookie, cookie * 8, 8, &round.to_be_bytes());
        }
        for _ in 0..8 {
            assert_eq!(reply(&mut s, 0).0, 0);
        }
        request(&mut s, 1, 8, 0, 8, &round.to_be_bytes());
        assert_eq!(reply(&mut s, 0), (0, 8));
        request(&mut s, 0, 9, 0, 8, &[]);
        assert_eq!(reply(&mut s, 8), (0, 9));
        request(&mut s, 2, 99, 0, 0, &[]);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            s.read(&mut b).unwrap_or(1),
            0,
            "round {round}: server kept the connection open"
        );
    }
    server.shutdown();
}

/// Writes at once, answers only when the test says so (as a replicated
/// volume answers when its peer acknowledges).
struct Deferring {
    inner: MemDevice,
    held: Mutex<Vec<Completion>>,
}

impl BlockDevice for Deferring {
    forward_to_inner!();
    fn write_at_deferred(&self, buf: &[u8], offset: u64, fua: bool, _: bool, done: Completion) {
        match self.inner.write_at(buf, offset, fua) {
            Ok(()) => self.held.lock().unwrap().push(done),
            Err(e) => done.complete(Err(e)),
        }
    }
}

impl Deferring {
    fn wait_held(&self, n: usize) {
        for _ in 0..500 {
            if self.held.lock().unwrap().len() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("never held {n} writes");
    }
    fn take(&self) -> Vec<Completion> {
        std::mem::take(&mut *self.held.lock().unwrap())
    }
}

fn nothing_arrives(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 1];
    let r = s.read(&mut b);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "expected silence, got {r:?}"
    );
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
}

#[test]
fn deferred_writes_are_answered_later_bounded_and_before_the_end() {
    let dev = Arc::new(Deferring {
        inner: MemDevice::new(1 << 20),
        held: Mutex::new(Vec::new()),
    });
    let (server, addr) = serve(dev.clone(), 4);
    let mut s = connect(&addr);
    for cookie in 0..20u64 {
        request(&mut s, 1, cookie, cookie * 8, 8, &cookie.to_be_bytes());
    }
    // Deferred writes count against the in-flight limit: four held, no reply.
    dev.wait_held(4);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(dev.held.lock().unwrap().len(), 4);
    nothing_arrives(&mut s);
    // Answer them in batches, from this thread; the next ones come in.
    let mut answered = Vec::new();
    while answered.len() < 19 {
        let batch = dev.take();
        let n = batch.len();
        if n == 0 {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let mut items: Vec<_> = batch.into_iter().map(|c| (c, Ok(()))).collect();
        if answered.len() + n >= 20 {
            // The last one fails: its reply carries the error.
            let (c, _) = items.pop().unwrap();
            items.push((c, Err(std::io::Error::from_raw_os_error(28))));
        }
        Completion::complete_batch(items);
        for _ in 0..n {
            answered.push(reply(&mut s, 0));
        }
    }
    let errors: Vec<_> = answered.iter().filter(|(e, _)| *e != 0).collect();
    assert!(
        answered.len() == 20 && errors.len() == 1 && errors[0].0 == 28,
        "{answered:?}"
    );
    let mut cookies: Vec<u64> = answered.iter().map(|a| a.1).collect();
    cookies.sort();
    assert_eq!(cookies, (0..20).collect::<Vec<_>>());
    // Every write reached the device.
    let mut b = [0u8; 8];
    dev.inner.read_at(&mut b, 19 * 8).unwrap();
    assert_eq!(u64::from_be_bytes(b), 19);

    // DISC while a write is held: the reply still comes, then the end.
    request(&mut s, 1, 50, 0, 8, &[7; 8]);
    dev.wait_held(1);
    request(&mut s, 2, 51, 0, 0, &[]);
    nothing_arrives(&mut s);
    // A completion dropped unanswered answers EIO rather than hanging the client.
    drop(dev.take());
    assert_eq!(reply(&mut s, 0), (5, 50));
    let mut end = [0u8; 1];
    assert_eq!(s.read(&mut end).unwrap_or(1), 0, "connection kept open");
    server.shutdown();
}

#[test]
fn the_builtin_client_writes_reads_and_flushes() {
    let dev = Gate::new();
    dev.open();
    let (server, addr) = serve(dev.clone(), 4);
    let mut c = ferry_nbd::client::Client::connect(&addr, "g", Duration::from_secs(5)).unwrap();
    assert_eq!(c.size(), dev.size());
    c.write(4096, &[0xab; 8192], true).unwrap();
    c.flush().unwrap();
    let mut buf = vec![0u8; 8192];
    c.read(4096, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xab));
    // Out of range: the server's errno comes back as an error, the connection stays usable.
    let err = c.write(dev.size(), &[1; 512], false).unwrap_err();
    assert!(
        matches!(err, ferry_nbd::client::ClientError::Errno(_)),
        "{err}"
    );
    c.read(4096, &mut buf[..512]).unwrap();
    c.disconnect();
    let e = ferry_nbd::client::Client::connect(&addr, "nope", Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(e, ferry_nbd::client::ClientError::Refused { .. }),
        "{e}"
    );
    server.shutdown();
}

/// Holds the answers of writes made with more requests at hand until the
/// next write without, or `settle()`: as a replicating device holds frames.
struct Holding {
    inner: MemDevice,
    held: Mutex<Vec<Completion>>,
    /// Writes that arrived with more at hand / settle calls that had work.
    batched: AtomicUsize,
    settles: AtomicUsize,
}

impl Holding {
    fn release(&self) -> bool {
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        let any = !held.is_empty();
        Completion::complete_batch(held.into_iter().map(|c| (c, Ok(()))).collect());
        any
    }
}

impl BlockDevice for Holding {
    forward_to_inner!();
    fn write_at_deferred(&self, buf: &[u8], offset: u64, fua: bool, more: bool, done: Completion) {
        let r = self.inner.write_at(buf, offset, fua);
        if r.is_err() {
            return done.complete(r);
        }
        self.held.lock().unwrap().push(done);
        if more {
            self.batched.fetch_add(1, Ordering::SeqCst);
        } else {
            self.release();
        }
    }
    fn settle(&self) {
        if self.release() {
            self.settles.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[test]
fn small_writes_at_hand_are_batched_and_held_work_is_settled_before_any_wait() {
    let dev = Arc::new(Holding {
        inner: MemDevice::new(1 << 20),
        held: Mutex::new(Vec::new()),
        batched: AtomicUsize::new(0),
        settles: AtomicUsize::new(0),
    });
    let (server, addr) = serve(dev.clone(), 8);
    let mut s = connect(&addr);
    // 40 writes in one burst (more than the in-flight limit of 8), then a
    // READ: all answered, so nothing stayed held behind the limit or the read.
    let mut burst = Vec::new();
    for cookie in 0..40u64 {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&(cookie * 512).to_be_bytes());
        b.extend_from_slice(&512u32.to_be_bytes());
        b.extend_from_slice(&[cookie as u8; 512]);
        burst.extend_from_slice(&b);
    }
    s.write_all(&burst).unwrap();
    request(&mut s, 0, 99, 0, 512, &[]);
    let mut got: Vec<u64> = (0..41)
        .map(|_| {
            let (e, c) = reply(&mut s, 0);
            assert_eq!(e, 0);
            if c == 99 {
                let mut d = [0u8; 512];
                s.read_exact(&mut d).unwrap();
                assert_eq!(d, [0u8; 512]);
            }
            c
        })
        .collect();
    got.sort();
    assert_eq!(got, (0..40).chain([99]).collect::<Vec<_>>());
    assert!(
        dev.batched.load(Ordering::SeqCst) > 0,
        "no write was batched"
    );
    assert!(
        dev.settles.load(Ordering::SeqCst) > 0,
        "the limit never settled"
    );

    // A request cut in half: the writes before it are answered meanwhile.
    request(&mut s, 1, 100, 0, 512, &[1; 512]);
    let mut half = 0x2560_9513u32.to_be_bytes().to_vec();
    half.extend_from_slice(&0u16.to_be_bytes());
    half.extend_from_slice(&1u16.to_be_bytes());
    half.extend_from_slice(&101u64.to_be_bytes());
    half.extend_from_slice(&512u64.to_be_bytes());
    half.extend_from_slice(&512u32.to_be_bytes());
    half.extend_from_slice(&[2; 100]);
    s.write_all(&half).unwrap();
    assert_eq!(reply(&mut s, 0), (0, 100));
    s.write_all(&[2; 412]).unwrap();
    assert_eq!(reply(&mut s, 0), (0, 101));
    let mut b = [0u8; 512];
    dev.inner.read_at(&mut b, 512).unwrap();
    assert_eq!(b, [2; 512]);
    server.shutdown();
}
