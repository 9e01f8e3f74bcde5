//! The estimator's cost on the write path: 5,000,000 random 4 KiB writes
//! into an `Observation` at 100 and at 100,000 writes a second (of clock
//! time fed in), the time per write. Run by `bench/estimate.sh` (release).

use ferry_core::estimate::{KeyKind, Observation};

fn main() {
    let mut x: u64 = 11;
    let mut next = move || {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for per_s in [100u64, 100_000] {
        let mut o = Observation::new(
            KeyKind::Blocks {
                block_bytes: 64 * 1024,
            },
            0,
        );
        let n = 5_000_000u64;
        let t = std::time::Instant::now();
        for i in 0..n {
            let ms = i * 1000 / per_s;
            o.record_write_extent(ms, (next() % (1 << 24)) * 4096, 4096);
        }
        let ns = t.elapsed().as_nanos() as f64 / n as f64;
        println!("{per_s} writes/s: {ns:.1} ns per 4 KiB write (sketch, windows, totals)");
    }
}
