//! fio as a real application writing at a fixed rate.

use std::process::{Child, Command, Stdio};

/// fio (its `nbd` engine) writing `bs` blocks at random over `[0, region)`
/// at `rate` (fio's units: `2m` is 2 MiB/s) through the NBD `uri`, one at a
/// time, until dropped (killed and reaped).
pub struct RateWriter(Child);

impl RateWriter {
    pub fn start(uri: &str, bs: &str, region: &str, rate: &str) -> RateWriter {
        let child = Command::new("fio")
            .args([
                "--name=w",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                &format!("--bs={bs}"),
                "--offset=0",
                &format!("--size={region}"),
                &format!("--rate={rate}"),
                "--iodepth=1",
                "--norandommap",
                "--time_based",
                "--runtime=600",
                "--output-format=json",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("fio");
        RateWriter(child)
    }
}

impl Drop for RateWriter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
