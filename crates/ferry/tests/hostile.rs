//! A malformed or hostile client gets the error the spec names or a clean
//! disconnect: never a panic, never a hang, never a write outside the volume.
//! After each abuse the export must still serve a well-behaved client.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::raw::Raw;
use common::*;

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EPERM: u32 = 1;

fn still_serves(exp: &Exported) {
    qemu_io(exp.uri(), &["write -P 0x5a 0 4k", "read -P 0x5a 0 4k"]);
}

#[test]
fn bad_request_magic_disconnects() {
    let node = Node::new();
    node.create("vol", "1MiB");
    let exp = node.export("vol", &[]);
    let (mut r, size) = Raw::go(&exp.addr(), "vol", false);
    assert_eq!(size, 1 << 20);
    r.s.write_all(&[0xde; 28]).unwrap();
    assert!(r.closed_by_server());
    still_serves(&exp);
}

#[test]
fn truncated_packets_and_silent_clients_do_not_hang_the_server() {
    let node = Node::new();
    node.create("vol", "1MiB");
    let exp = node.export("vol", &["--handshake-timeout-ms", "300"]);
    // Half a header, then hang up.
    let (mut r, _) = Raw::go(&exp.addr(), "vol", false);
    r.s.write_all(&[0x25, 0x60, 0x95]).unwrap();
    drop(r);
    // A write header promising 64 KiB, 100 bytes of it, then hang up.
    let (mut r, _) = Raw::go(&exp.addr(), "vol", false);
    r.request(1, 0, 1, 0, 65536, &[7; 100]);
    drop(r);
    // Half a handshake, then hang up.
    let mut r = Raw::connect(&exp.addr());
    r.greeting();
    r.s.write_all(&[0, 0]).unwrap();
    drop(r);
    // Connect and say nothing: the handshake timeout closes it.
    let mut r = Raw::connect(&exp.addr());
    r.greeting();
    let t = Instant::now();
    assert!(r.closed_by_server());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "handshake_timeout_ms not enforced"
    );
    still_serves(&exp);
    // The truncated write wrote nothing.
    qemu_io(exp.uri(), &["read -P 0 4k 60k"]);
}

#[test]
fn bad_client_flags_and_oversized_options_disconnect() {
    let node = Node::new();
    node.create("vol", "1MiB");
    let exp = node.export("vol", &[]);
    let mut r = Raw::connect(&exp.addr());
    r.greeting();
    r.s.write_all(&0x8000_0001u32.to_be_bytes()).unwrap();
    assert!(r.closed_by_server());

    let mut r = Raw::connect(&exp.addr());
    r.greeting();
    r.s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut b = common::raw::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&6u32.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    r.s.write_all(&b).unwrap();
    assert!(r.closed_by_server());

    // Bad option magic.
    let mut r = Raw::connect(&exp.addr());
    r.greeting();
    r.s.write_all(&3u32.to_be_bytes()).unwrap();
    r.s.write_all(&[0u8; 16]).unwrap();
    assert!(r.closed_by_server());
    still_serves(&exp);
}

#[test]
fn spec_errors_on_bad_requests_and_the_connection_survives() {
    let node = Node::new();
    node.create("vol", "1MiB");
    let exp = node.export("vol", &["--max-request-bytes", "64KiB"]);
    let (mut r, size) = Raw::go(&exp.addr(), "vol", false);
    // Unknown command.
    r.request(0x77, 0, 1, 0, 512, &[]);
    assert_eq!(r.simple_reply(), (EINVAL, 1));
    // Unknown flag.
    r.request(0, 0x100, 2, 0, 512, &[]);
    assert_eq!(r.simple_reply(), (EINVAL, 2));
    // Read past the end / overflowing u64.
    r.request(0, 0, 3, size, 512, &[]);
    assert_eq!(r.simple_reply(), (EINVAL, 3));
    r.request(0, 0, 4, u64::MAX - 100, 512, &[]);
    assert_eq!(r.simple_reply(), (EINVAL, 4));
    // Write past the end: ENOSPC, and the payload is consumed so the stream stays in sync.
    r.request(1, 0, 5, size - 256, 512, &[0xee; 512]);
    assert_eq!(r.simple_reply(), (ENOSPC, 5));
    r.request(1, 0, 6, u64::MAX - 100, 512, &[0xee; 512]);
    assert_eq!(r.simple_reply(), (ENOSPC, 6));
    // Write above max_request_bytes (64 KiB): refused, payload skipped.
    r.request(1, 0, 7, 0, 128 * 1024, &vec![0xee; 128 * 1024]);
    assert_eq!(r.simple_reply(), (EINVAL, 7));
    // Read above max_request_bytes.
    r.request(0, 0, 8, 0, 128 * 1024, &[]);
    assert_eq!(r.simple_reply(), (EINVAL, 8));
    // Block status without having negotiated it.
    r.request(7, 0, 9, 0, 4096, &[]);
    assert_eq!(r.simple_reply(), (EINVAL, 9));
    // Flush with a range.
    r.request(3, 0, 10, 5, 0, &[]);
    assert_eq!(r.simple_reply(), (EINVAL, 10));
    // Zero-length read.
    r.request(0, 0, 11, 0, 0, &[]);
    assert_eq!(r.simple_reply(), (EINVAL, 11));
    // And a good write + read still work on the same connection.
    r.request(1, 1, 12, 4096, 4, b"ok!!");
    assert_eq!(r.simple_reply(), (0, 12));
    r.request(0, 0, 13, 4096, 4, &[]);
    assert_eq!(r.simple_reply(), (0, 13));
    assert_eq!(r.read_n(4), b"ok!!");
    // Clean disconnect.
    r.request(2, 0, 14, 0, 0, &[]);
    assert!(r.closed_by_server());
    drop(exp);
    // Nothing was written outside the volume, and none of the refused bytes landed.
    let image = std::fs::read(node.image("vol")).unwrap();
    assert_eq!(image.len(), 1 << 20);
    assert!(!image.contains(&0xee));
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let node = Node::new();
    node.create("vol", "1MiB");
    let exp = node.export("vol", &["--read-only"]);
    let (mut r, _) = Raw::go(&exp.addr(), "vol", false);
    r.request(1, 0, 1, 0, 512, &[1; 512]);
    assert_eq!(r.simple_reply(), (EPERM, 1));
    r.request(4, 0, 2, 0, 512, &[]);
    assert_eq!(r.simple_reply(), (EPERM, 2));
    r.request(6, 0, 3, 0, 512, &[]);
    assert_eq!(r.simple_reply(), (EPERM, 3));
    r.request(3, 0, 4, 0, 0, &[]);
    assert_eq!(r.simple_reply(), (0, 4));
}

#[test]
fn max_connections_is_enforced() {
    let node = Node::new();
    node.create("vol", "1MiB");
    let exp = node.export("vol", &["--max-connections", "2"]);
    let (a, _) = Raw::go(&exp.addr(), "vol", false);
    let (_b, _) = Raw::go(&exp.addr(), "vol", false);
    let mut c = Raw::connect(&exp.addr());
    assert!(c.closed_by_server(), "a third connection must be closed");
    drop(a);
    // The slot frees up once the first connection is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut d = Raw::connect(&exp.addr());
        let mut g = [0u8; 1];
        if std::io::Read::read(&mut d.s, &mut g).unwrap_or(0) == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn random_garbage_never_kills_the_server() {
    let node = Node::new();
    node.create("vol", "1MiB");
    let exp = node.export("vol", &["--handshake-timeout-ms", "500"]);
    for seed in 0..200u64 {
        let junk = pattern(seed, 16 + (seed as usize * 37) % 600);
        if seed % 2 == 0 {
            // Garbage in the handshake.
            let mut r = Raw::connect(&exp.addr());
            let _ = r.s.write_all(&junk);
        } else {
            // Garbage after a good handshake, starting with a valid request magic.
            let (mut r, _) = Raw::go(&exp.addr(), "vol", seed % 4 == 1);
            let mut b = common::raw::REQUEST_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&junk);
            let _ = r.s.write_all(&b);
        }
    }
    still_serves(&exp);
    let (status, stderr) = exp.terminate();
    assert!(status.success(), "export exited with {status}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
