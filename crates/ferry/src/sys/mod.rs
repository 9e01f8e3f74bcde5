//! The process's own plumbing: signal handling, log output, standard output.

pub mod logging;
pub mod out;
pub mod signals;
