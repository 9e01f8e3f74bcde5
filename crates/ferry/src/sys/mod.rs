//! The process's own plumbing: signal handling and log output.

pub mod logging;
pub mod signals;
