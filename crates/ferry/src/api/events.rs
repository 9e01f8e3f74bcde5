//! `GET /api/v1/events`: Server-Sent Events for the console and `ferry
//! events --follow`. Once per second — and every `EVENTS_BURST_TICK_MS`
//! for `EVENTS_BURST_MS` after an action changed something on this node,
//! so that what an operator just did shows at once — a stream sends
//! `event: migrations`, `cluster` and `nodes` — the same typed replies as
//! the GET routes — when they changed since it last sent them, and `event:
//! event` for each cluster event it has not sent yet. At most
//! `api.event_streams_max` streams are open at once (429 past that). A
//! stream ends (`event: end`) as soon as the token it was opened with is
//! revoked or its session ends.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use ferry_api::{Action, Reply};
use serde_json::json;

use crate::agent::dispatch::{self, Asker};
use crate::agent::AgentCtx;

use super::session::{self, Sessions};

/// How often a stream looks for changes.
pub const EVENTS_INTERVAL_MS: u64 = 1000;
/// After an action changed something here, a stream looks this often…
pub const EVENTS_BURST_TICK_MS: u64 = 200;
/// …for this long (the handover's last steps, e.g. the cluster thread
/// publishing the new primary, land within it).
pub const EVENTS_BURST_MS: u64 = 2000;
/// A stream with nothing new sends a comment this often (clients and
/// proxies see it alive).
pub const EVENTS_KEEPALIVE_MS: u64 = 15_000;

/// The open streams, counted.
#[derive(Default)]
pub struct Streams {
    open: AtomicUsize,
}

struct Slot(Arc<Streams>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A body of chunks a task sends.
struct ChunkStream(tokio::sync::mpsc::Receiver<Bytes>);

impl futures_core::Stream for ChunkStream {
    type Item = Result<Bytes, std::convert::Infallible>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|o| o.map(Ok))
    }
}

fn frame(event: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// Who the stream is for: checked again at every tick and whenever tokens
/// change.
pub struct Owner {
    pub asker: Asker,
    /// The token it was opened with (none for a paired node).
    pub credential: Option<String>,
    /// The console session it was opened through.
    pub session: Option<String>,
}

impl Owner {
    fn still_valid(&self, ctx: &AgentCtx, sessions: &Sessions) -> bool {
        if let Some(id) = &self.session {
            if sessions.get(ctx, id).is_none() {
                return false;
            }
        }
        match &self.credential {
            Some(t) => session::reauth(ctx, t).is_some(),
            None => self.asker.peer.is_some(),
        }
    }
}

/// Opens a stream for `owner`.
pub fn open(
    ctx: Arc<AgentCtx>,
    sessions: Arc<Sessions>,
    streams: Arc<Streams>,
    owner: Owner,
) -> Response {
    let max = ctx.cfg.api.event_streams_max;
    if streams.open.fetch_add(1, Ordering::SeqCst) >= max {
        streams.open.fetch_sub(1, Ordering::SeqCst);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(
                json!({ "error": format!("{max} event streams are open (api.event_streams_max)") }),
            ),
        )
            .into_response();
    }
    let slot = Slot(streams);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let _slot = slot;
        run(ctx, sessions, owner, tx).await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(ChunkStream(rx)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn run(
    ctx: Arc<AgentCtx>,
    sessions: Arc<Sessions>,
    owner: Owner,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    let mut revoked = sessions.watch();
    let mut changes = sessions.watch_changes();
    let mut tick = tokio::time::interval(Duration::from_millis(EVENTS_BURST_TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut looked: Option<tokio::time::Instant> = None;
    let mut burst_until = tokio::time::Instant::now();
    let mut last: [Option<String>; 3] = [None, None, None];
    let mut seen: HashSet<String> = HashSet::new();
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        let mut now_please = false;
        tokio::select! {
            _ = tick.tick() => {}
            changed = revoked.changed() => {
                if changed.is_err() { return; }
                now_please = true;
            }
            changed = changes.changed() => {
                if changed.is_err() { return; }
                burst_until = tokio::time::Instant::now() + Duration::from_millis(EVENTS_BURST_MS);
                now_please = true;
            }
            _ = tx.closed() => return,
        }
        let now = tokio::time::Instant::now();
        let due = now_please
            || now < burst_until
            || looked
                .is_none_or(|t| now.duration_since(t) >= Duration::from_millis(EVENTS_INTERVAL_MS));
        if !due {
            continue;
        }
        looked = Some(now);
        if !owner.still_valid(&ctx, &sessions) {
            let _ = tx
                .send(frame(
                    "end",
                    &json!({ "why": "the session ended or its token was revoked" }),
                ))
                .await;
            return;
        }
        let actions = [
            ("migrations", Action::ListMigrations),
            ("cluster", Action::ClusterStatus),
            ("nodes", Action::ListNodes),
        ];
        let mut sent = false;
        for (i, (name, action)) in actions.into_iter().enumerate() {
            let Ok(reply) = dispatch::execute(&ctx, &owner.asker, action).await else {
                continue;
            };
            if let Reply::Cluster(c) = &reply {
                let mut now = HashSet::new();
                for e in c.workloads.iter().flat_map(|w| &w.events) {
                    let v = serde_json::to_value(e).unwrap_or_default();
                    let key = v.to_string();
                    if !seen.contains(&key) {
                        if tx.send(frame("event", &v)).await.is_err() {
                            return;
                        }
                        sent = true;
                    }
                    now.insert(key);
                }
                seen = now;
            }
            let v = serde_json::to_value(&reply).unwrap_or_default();
            let text = v.to_string();
            if last[i].as_deref() != Some(text.as_str()) {
                if tx.send(frame(name, &v)).await.is_err() {
                    return;
                }
                last[i] = Some(text);
                sent = true;
            }
        }
        if sent {
            quiet_since = tokio::time::Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_millis(EVENTS_KEEPALIVE_MS) {
            if tx
                .send(Bytes::from_static(b": keep-alive\n\n"))
                .await
                .is_err()
            {
                return;
            }
            quiet_since = tokio::time::Instant::now();
        }
    }
}
