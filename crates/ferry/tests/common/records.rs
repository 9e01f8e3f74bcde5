//! An application that writes numbered 4 KiB records through an NBD URI
//! with qemu-io (record i at offset i × 4 KiB, every byte `i % 200 + 1`;
//! one process a write, as a slow application) until stopped or a write
//! fails (the volume moved away), and the check that they are all there.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<u64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Records from `first` on, back to back.
    pub fn start(uri: String, first: u64) -> Writer {
        Writer::paced(uri, first, Duration::ZERO)
    }

    /// Records from `first` on, `pause` between two.
    pub fn paced(uri: String, first: u64, pause: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), acked.clone());
        let thread = std::thread::spawn(move || {
            let mut i = first;
            while !s.load(Ordering::SeqCst) {
                let out = Command::new("qemu-io")
                    .args(["-f", "raw", "-c"])
                    .arg(format!("write -P {} {} 4k", i % 200 + 1, i * 4096))
                    .arg(&uri)
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() || !text.contains("wrote 4096/4096") {
                    return;
                }
                a.lock().unwrap().push(i);
                i += 1;
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
        });
        Writer {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    /// Records acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stops; the records whose write was acknowledged.
    pub fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        self.acked.lock().unwrap().clone()
    }
}

/// Every record of `records` reads back from `uri`.
pub fn verify(uri: &str, records: &[u64]) {
    for chunk in records.chunks(64) {
        let cmds: Vec<String> = chunk
            .iter()
            .map(|i| format!("read -P {} {} 4k", i % 200 + 1, i * 4096))
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        super::qemu_io(uri, &cmds);
    }
}

/// The guest of tests/guest/records.sh, from its console file: the last
/// `WROTE n` (the last record its disk acknowledged) and the last
/// `VERIFIED m` (records found on the disk at boot).
#[allow(dead_code)]
pub fn guest_console(path: &std::path::Path) -> (Option<u64>, Option<u64>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let last = |tag: &str| {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(tag))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .next_back()
    };
    (last("WROTE "), last("VERIFIED "))
}
