//! The live guest's console ticks (tests/guest/live.sh prints `TICK seq
//! uptime boot_id pid` every ~10 ms on its serial console), stamped as the
//! host sees them arrive in either node's `DATA_DIR/vms/W/console.log`: a
//! live move shows one boot id, one pid and no missing seq; the longest gap
//! between two ticks is the guest's pause seen from outside.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A TICK line as the host saw it arrive.
#[derive(Debug, Clone)]
pub struct Tick {
    pub at: Instant,
    pub seq: u64,
    pub boot_id: String,
    pub pid: String,
}

/// Tails console files (either node's), stamping each TICK line on arrival.
pub struct Ticks {
    seen: Arc<Mutex<Vec<Tick>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticks {
    pub fn watch(files: &[PathBuf]) -> Ticks {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, files) = (seen.clone(), stop.clone(), files.to_vec());
        let thread = std::thread::spawn(move || {
            // Start at each file's current end: only new lines count.
            let mut pos: Vec<u64> = files
                .iter()
                .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
                .collect();
            let mut partial = vec![String::new(); files.len()];
            while !st.load(Ordering::SeqCst) {
                for (i, f) in files.iter().enumerate() {
                    use std::io::{Read, Seek};
                    let Ok(mut fh) = std::fs::File::open(f) else {
                        continue;
                    };
                    if fh.seek(std::io::SeekFrom::Start(pos[i])).is_err() {
                        continue;
                    }
                    let mut buf = Vec::new();
                    let n = fh.read_to_end(&mut buf).unwrap_or(0);
                    if n == 0 {
                        continue;
                    }
                    let now = Instant::now();
                    pos[i] += n as u64;
                    partial[i].push_str(&String::from_utf8_lossy(&buf));
                    while let Some(nl) = partial[i].find('\n') {
                        let line: String = partial[i].drain(..=nl).collect();
                        let w: Vec<&str> = line.split_whitespace().collect();
                        if w.len() == 5 && w[0] == "TICK" {
                            if let Ok(seq) = w[1].parse() {
                                s.lock().unwrap().push(Tick {
                                    at: now,
                                    seq,
                                    boot_id: w[3].to_string(),
                                    pid: w[4].to_string(),
                                });
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Ticks {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn finish(mut self) -> Vec<Tick> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for Ticks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What the ticks of a live move show: the longest gap between two ticks
/// (ms), and that one boot id and one pid ticked with no seq missing.
pub fn one_life(ticks: &[Tick]) -> f64 {
    assert!(ticks.len() > 10, "too few ticks: {}", ticks.len());
    let boots: std::collections::BTreeSet<_> = ticks.iter().map(|t| &t.boot_id).collect();
    let pids: std::collections::BTreeSet<_> = ticks.iter().map(|t| &t.pid).collect();
    assert_eq!(boots.len(), 1, "the guest rebooted: boot ids {boots:?}");
    assert_eq!(pids.len(), 1, "the ticking process changed: {pids:?}");
    for w in ticks.windows(2) {
        assert_eq!(
            w[1].seq,
            w[0].seq + 1,
            "ticks lost or repeated between {} and {}",
            w[0].seq,
            w[1].seq
        );
    }
    ticks
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at).as_secs_f64() * 1000.0)
        .fold(0.0, f64::max)
}
