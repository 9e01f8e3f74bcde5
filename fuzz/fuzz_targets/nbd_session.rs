//! Feeds arbitrary bytes to the real connection code as if a client sent them:
//! the fixed-newstyle handshake, then transmission-phase requests against a small
//! in-memory export. Any panic, hang or out-of-bounds access is a finding.

#![no_main]

use std::io;

use ferry_nbd::connection::{handshake, transmission, ConnectionLimits};
use ferry_nbd::{Allocation, BlockDevice, ExportInfo, MemDevice, NegotiationLimits, ZeroMode};

const SIZE: usize = 64 * 1024;

/// The in-memory device, asserting that the server never passes a range outside it.
struct Strict(MemDevice);

fn inside(offset: u64, length: u64) {
    assert!(
        offset.checked_add(length).is_some_and(|end| end <= SIZE as u64),
        "server passed [{offset}, +{length}) to a {SIZE}-byte device"
    );
}

impl BlockDevice for Strict {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        inside(offset, buf.len() as u64);
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        inside(offset, buf.len() as u64);
        self.0.write_at(buf, offset, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        inside(offset, length);
        self.0.trim(offset, length, fua)
    }
    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        inside(offset, length);
        self.0.write_zeroes(offset, length, mode, fua)
    }
    fn block_status(&self, offset: u64, length: u64, max: usize, out: &mut Vec<Allocation>) -> io::Result<()> {
        inside(offset, length);
        self.0.block_status(offset, length, max, out)
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limits = ConnectionLimits {
        max_request_bytes: 16 * 1024,
        max_in_flight_per_connection: 1,
        block_status_runs_max: 8,
        buffer_retain_bytes: 16 * 1024,
        // Writes up to 4 KiB run inline, bigger ones are handed off: both paths.
        inline_write_bytes_max: 4096,
        negotiation: NegotiationLimits {
            option_bytes_max: 4096,
            handshake_options_max: 32,
        },
    };
    let exports = [
        ExportInfo {
            name: "vol".into(),
            description: "fuzz".into(),
            size: SIZE as u64,
            read_only: false,
            min_block_bytes: 1,
            preferred_block_bytes: 4096,
            max_block_bytes: limits.max_request_bytes,
        },
        ExportInfo {
            name: "ro".into(),
            description: String::new(),
            size: SIZE as u64,
            read_only: true,
            min_block_bytes: 1,
            preferred_block_bytes: 4096,
            max_block_bytes: limits.max_request_bytes,
        },
    ];
    let device = Strict(MemDevice::new(SIZE));
    let mut reader: &[u8] = data;
    let mut writer = io::sink();
    let Ok(Some(session)) = handshake(&mut reader, &mut writer, &exports, &limits) else {
        return;
    };
    let info = &exports[session.export];
    let before = device.0.snapshot();
    let _ = transmission(reader, writer, &device, info, session, &limits, &|| {});
    assert_eq!(device.size(), SIZE as u64);
    if info.read_only {
        assert!(device.0.snapshot() == before, "a read-only export was written");
    }
});
