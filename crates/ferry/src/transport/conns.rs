//! Connection caps for the agent's TCP listeners (API, replication): a
//! named maximum of connections, a maximum of handshakes still
//! unauthenticated, and one deadline for a whole handshake.
//!
//! The caps must not become the denial of service themselves, so a full
//! table makes room by closing the *oldest unauthenticated* connection: an
//! authenticated one (a registered peer's certificate, a valid token) is
//! never closed for a newcomer, and a flood of idle connections only evicts
//! itself. A connection that does not authenticate within the deadline is
//! closed by the reaper.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Closes a connection from outside its own thread or task.
pub type Evict = Box<dyn Fn() + Send + Sync>;

struct Entry {
    authenticated: bool,
    started: Instant,
    evict: Evict,
}

/// One listener's table.
pub struct ConnTable {
    what: &'static str,
    connections_max: usize,
    handshakes_max: usize,
    inner: Mutex<BTreeMap<u64, Entry>>,
    next: std::sync::atomic::AtomicU64,
    evicted: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for ConnTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTable")
            .field("what", &self.what)
            .field("connections_max", &self.connections_max)
            .finish_non_exhaustive()
    }
}

/// A connection's place in its table; dropping it frees the place.
pub struct ConnSlot {
    table: Arc<ConnTable>,
    id: u64,
}

impl std::fmt::Debug for ConnSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConnSlot({})", self.id)
    }
}

impl ConnTable {
    pub fn new(
        what: &'static str,
        connections_max: usize,
        handshakes_max: usize,
    ) -> Arc<ConnTable> {
        Arc::new(ConnTable {
            what,
            connections_max: connections_max.max(1),
            handshakes_max: handshakes_max.clamp(1, connections_max.max(1)),
            inner: Mutex::new(BTreeMap::new()),
            next: std::sync::atomic::AtomicU64::new(0),
            evicted: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for a new connection, closing the oldest
    /// unauthenticated one if the table or its handshakes are full; `None`
    /// when every place holds an authenticated connection (close the new
    /// one).
    pub fn admit(self: &Arc<Self>, evict: Evict) -> Option<ConnSlot> {
        let mut t = self.lock();
        let pending = t.values().filter(|e| !e.authenticated).count();
        if pending >= self.handshakes_max || t.len() >= self.connections_max {
            let oldest = t.iter().find(|(_, e)| !e.authenticated).map(|(id, _)| *id);
            match oldest {
                Some(id) => {
                    if let Some(e) = t.remove(&id) {
                        (e.evict)();
                        self.evicted
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                None => {
                    tracing::warn!(
                        listener = self.what,
                        connections = t.len(),
                        "conns.full: every connection is authenticated; refusing a new one"
                    );
                    return None;
                }
            }
        }
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        t.insert(
            id,
            Entry {
                authenticated: false,
                started: Instant::now(),
                evict,
            },
        );
        Some(ConnSlot {
            table: self.clone(),
            id,
        })
    }

    /// Closes every unauthenticated connection older than `deadline`.
    pub fn reap(&self, deadline: Duration) {
        let mut t = self.lock();
        let late: Vec<u64> = t
            .iter()
            .filter(|(_, e)| !e.authenticated && e.started.elapsed() > deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(e) = t.remove(&id) {
                (e.evict)();
            }
        }
    }

    /// Connections open now, and unauthenticated ones closed for others
    /// since start.
    pub fn counts(&self) -> (usize, u64) {
        (
            self.lock().len(),
            self.evicted.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Runs [`Self::reap`] every quarter of `deadline` on a thread of its own.
    pub fn spawn_reaper(self: &Arc<Self>, deadline: Duration) -> std::io::Result<()> {
        let t = self.clone();
        std::thread::Builder::new()
            .name(format!("{}-reaper", self.what))
            .spawn(move || loop {
                std::thread::sleep((deadline / 4).max(Duration::from_millis(50)));
                t.reap(deadline);
            })?;
        Ok(())
    }
}

impl ConnSlot {
    /// The connection proved who it is: it is never evicted for a newcomer
    /// and the handshake deadline no longer applies.
    pub fn authenticated(&self) {
        if let Some(e) = self.table.lock().get_mut(&self.id) {
            e.authenticated = true;
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

/// Raises the soft limit of open descriptors to the hard limit: the caps
/// above, not the default 1,024, decide when connections are refused.
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let before = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            tracing::debug!(from = before, to = lim.rlim_cur, "agent.nofile_raised");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counter() -> (Arc<AtomicUsize>, impl Fn() -> Evict) {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        (n, move || {
            let m = m.clone();
            Box::new(move || {
                m.fetch_add(1, Ordering::SeqCst);
            })
        })
    }

    #[test]
    fn a_flood_evicts_itself_never_the_authenticated() {
        let t = ConnTable::new("test", 4, 2);
        let (evicted, ev) = counter();
        let peer = t.admit(ev()).unwrap();
        peer.authenticated();
        let mut flood = Vec::new();
        for _ in 0..100 {
            flood.push(t.admit(ev()).unwrap());
        }
        // Two handshakes at most: 98 evicted, the peer kept.
        assert_eq!(evicted.load(Ordering::SeqCst), 98);
        assert_eq!(t.counts().0, 3);
        drop(flood);
        assert_eq!(t.counts().0, 1);
        drop(peer);
        assert_eq!(t.counts().0, 0);
    }

    #[test]
    fn full_of_authenticated_refuses_newcomers() {
        let t = ConnTable::new("test", 2, 2);
        let (_, ev) = counter();
        let a = t.admit(ev()).unwrap();
        let b = t.admit(ev()).unwrap();
        a.authenticated();
        b.authenticated();
        assert!(t.admit(ev()).is_none());
        drop(a);
        assert!(t.admit(ev()).is_some());
    }

    #[test]
    fn the_reaper_closes_late_handshakes_only() {
        let t = ConnTable::new("test", 8, 8);
        let (evicted, ev) = counter();
        let late = t.admit(ev()).unwrap();
        let authed = t.admit(ev()).unwrap();
        authed.authenticated();
        std::thread::sleep(Duration::from_millis(20));
        t.reap(Duration::from_millis(10));
        assert_eq!(evicted.load(Ordering::SeqCst), 1);
        assert_eq!(t.counts().0, 1);
        drop((late, authed));
    }
}
