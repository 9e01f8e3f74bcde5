//! Standard output of the commands that print as they go.

use std::io::Write;

use anyhow::Result;
use serde::Serialize;

/// Prints one JSON document on its own line.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

pub fn flush_stdout() {
    let _ = std::io::stdout().flush();
}
