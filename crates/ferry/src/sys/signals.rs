//! SIGINT/SIGTERM as a value: blocked in every thread, then awaited with `sigwait`.
//!
//! Must be set up before any thread starts, so that every thread inherits the
//! blocked mask and the signal is delivered only to the waiting thread.

use anyhow::{bail, Result};

pub struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    /// Blocks SIGINT and SIGTERM in this thread (and the threads it starts later).
    pub fn block() -> Result<Signals> {
        // SAFETY: sigset_t is a plain C struct; all-zero is a valid value to
        // initialise with sigemptyset, which we call right away.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, exclusively borrowed sigset_t; these calls only
        // write into it and into this thread's signal mask.
        let rc = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if rc != 0 {
            bail!(
                "cannot block signals: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        Ok(Signals { set })
    }

    /// Waits for SIGINT or SIGTERM; returns its number.
    pub fn wait(&self) -> Result<i32> {
        let mut sig: libc::c_int = 0;
        // SAFETY: `self.set` is an initialised sigset_t and `sig` a valid out-pointer.
        let rc = unsafe { libc::sigwait(&self.set, &mut sig) };
        if rc != 0 {
            bail!("sigwait failed: {}", std::io::Error::from_raw_os_error(rc));
        }
        Ok(sig)
    }
}

/// Unblocks every signal in this thread: for a child between fork and exec
/// (`CommandExt::pre_exec`). Children inherit the mask, and ferry blocks
/// SIGINT and SIGTERM in every thread ([`Signals::block`]): a QEMU or a
/// hook started with them blocked would ignore SIGTERM until SIGKILL.
/// Async-signal-safe: only sigemptyset/sigprocmask on a stack sigset_t.
pub fn unblock_all_in_child() -> std::io::Result<()> {
    // SAFETY: sigset_t is a plain C struct initialised by sigemptyset right
    // away; sigprocmask only reads it and changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
