//! Answers given later: a device that must wait for something before a write
//! is done (a replica's acknowledgement) takes a [`Completion`] instead of
//! blocking the worker that read the request, and answers through it from
//! whichever thread learns the outcome. The worker goes back to reading
//! requests at once, and one thread can answer many requests with one `writev`
//! ([`Completion::complete_batch`]).

use std::io;
use std::sync::Arc;

/// The connection side of a deferred reply.
pub trait Responder: Send + Sync {
    /// Sends the replies `(cookie, result)` of finished requests, in one write
    /// if it can, and counts them as no longer in flight.
    fn respond(&self, replies: &[(u64, io::Result<()>)]);
}

/// The right and duty to answer one request. Dropping it unanswered answers
/// `EIO`, so a client never waits forever for a reply that was lost.
pub struct Completion {
    responder: Option<Arc<dyn Responder>>,
    cookie: u64,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("cookie", &self.cookie)
            .finish_non_exhaustive()
    }
}

impl Completion {
    pub fn new(responder: Arc<dyn Responder>, cookie: u64) -> Completion {
        Completion {
            responder: Some(responder),
            cookie,
        }
    }

    /// Answers the request with `result`.
    pub fn complete(mut self, result: io::Result<()>) {
        if let Some(r) = self.responder.take() {
            r.respond(&[(self.cookie, result)]);
        }
    }

    /// Answers many requests, with one write per connection run: consecutive
    /// items of the same connection go out together.
    pub fn complete_batch(items: Vec<(Completion, io::Result<()>)>) {
        let mut run: Vec<(u64, io::Result<()>)> = Vec::new();
        let mut current: Option<Arc<dyn Responder>> = None;
        for (mut c, result) in items {
            let Some(r) = c.responder.take() else {
                continue;
            };
            if let Some(cur) = &current {
                if !Arc::ptr_eq(cur, &r) {
                    cur.respond(&run);
                    run.clear();
                }
            }
            run.push((c.cookie, result));
            current = Some(r);
        }
        if let Some(cur) = current {
            cur.respond(&run);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(r) = self.responder.take() {
            r.respond(&[(
                self.cookie,
                Err(io::Error::other("request dropped before it was answered")),
            )]);
        }
    }
}
