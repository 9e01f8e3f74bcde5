//! Console sessions: a login with a named token (`POST /api/v1/session`)
//! gives an HttpOnly, Secure, SameSite=Strict `ferry_session` cookie that
//! stands for that token (same role) until `api.session_ttl_ms` has passed,
//! the user logs out, or the token is revoked (or, for the api.token file,
//! rotated). A request the cookie authenticates that changes state must
//! carry the session's CSRF value in `X-Ferry-CSRF`.
//!
//! Sessions are kept in memory only: a restart of the agent logs everyone
//! out. Each keeps the token it was made from (in memory, as the agent
//! already holds every request's token while serving it) and every use
//! checks that token again, so a revoked token's sessions end at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_api::Role;

use crate::agent::AgentCtx;

/// The cookie's name.
pub const COOKIE: &str = "ferry_session";
/// The header a state-changing request carries its session's CSRF value in.
pub const CSRF_HEADER: &str = "x-ferry-csrf";
/// Sessions kept at once; a login past this ends the session that expires
/// soonest.
pub const SESSIONS_MAX: usize = 4096;

/// What a request presented as its token (Bearer or through its session):
/// kept by an event stream to check it again.
#[derive(Debug, Clone)]
pub struct Credential(pub String);

/// The session a request's cookie named (its id).
#[derive(Debug, Clone)]
pub struct SessionId(pub String);

#[derive(Debug, Clone)]
pub struct Session {
    token: String,
    pub name: String,
    pub role: Role,
    expires: Instant,
    pub expires_unix: u64,
    pub csrf: String,
}

impl Session {
    /// The token it stands for (an event stream checks it again).
    pub fn token_for_checks(&self) -> String {
        self.token.clone()
    }

    pub fn info(&self) -> ferry_api::reply::SessionInfo {
        ferry_api::reply::SessionInfo {
            name: self.name.clone(),
            role: self.role,
            expires_unix: self.expires_unix,
            csrf: self.csrf.clone(),
        }
    }
}

/// The node's console sessions, and a counter that moves whenever tokens
/// are revoked or rotated (event streams watch it to check theirs).
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    ttl: Duration,
    revoked: tokio::sync::watch::Sender<u64>,
    /// Moves after every state-changing action this node answered: event
    /// streams look again at once rather than at their next second.
    changed: tokio::sync::watch::Sender<u64>,
}

/// The role `token` has on this node now: the api.token file's (admin) or a
/// named token's.
pub fn reauth(ctx: &AgentCtx, token: &str) -> Option<(String, Role)> {
    if token.is_empty() {
        return None;
    }
    if ctx.identity.token_matches(token) {
        return Some((crate::agent::tokens::FILE_TOKEN_NAME.into(), Role::Admin));
    }
    ctx.tokens.authenticate(token)
}

fn same(a: &str, b: &str) -> bool {
    blake3::hash(a.as_bytes()) == blake3::hash(b.as_bytes())
}

impl Sessions {
    pub fn new(ttl_ms: u64) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            ttl: Duration::from_millis(ttl_ms),
            revoked: tokio::sync::watch::channel(0).0,
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new session for `token` (already authenticated as `name`, `role`):
    /// (its id, the session).
    pub fn create(&self, token: &str, name: String, role: Role) -> Option<(String, Session)> {
        let id = crate::transport::identity::random_hex(32).ok()?;
        let csrf = crate::transport::identity::random_hex(32).ok()?;
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let s = Session {
            token: token.to_string(),
            name,
            role,
            expires: Instant::now() + self.ttl,
            expires_unix: now_unix + self.ttl.as_secs(),
            csrf,
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        map.retain(|_, s| s.expires > now);
        while map.len() >= SESSIONS_MAX {
            let Some(k) = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&k);
        }
        map.insert(id.clone(), s.clone());
        Some((id, s))
    }

    /// The live session `id` names, its token checked again (a revoked
    /// token's session ends here); its role is the token's now.
    pub fn get(&self, ctx: &AgentCtx, id: &str) -> Option<Session> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.get(id)?.clone();
        let live = s.expires > Instant::now();
        match reauth(ctx, &s.token) {
            Some((name, role)) if live && name == s.name => Some(Session { role, ..s }),
            _ => {
                map.remove(id);
                None
            }
        }
    }

    pub fn remove(&self, id: &str) -> bool {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .is_some()
    }

    /// Tokens changed (revoked, rotated): end the sessions whose token no
    /// longer authenticates, and wake every event stream to check its own.
    pub fn tokens_changed(&self, ctx: &AgentCtx) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, s| reauth(ctx, &s.token).is_some_and(|(n, _)| n == s.name));
        self.revoked.send_modify(|g| *g += 1);
    }

    /// Moves whenever [`Sessions::tokens_changed`] runs.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revoked.subscribe()
    }

    /// An action changed something on this node.
    pub fn state_changed(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// Moves whenever [`Sessions::state_changed`] runs.
    pub fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Whether `presented` is the session's CSRF value.
    pub fn csrf_ok(s: &Session, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| same(p, &s.csrf))
    }
}

/// The session id in a request's `Cookie` headers, if any.
pub fn cookie_id(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The `Set-Cookie` value of a new session.
pub fn set_cookie(id: &str, ttl: Duration) -> String {
    format!(
        "{COOKIE}={id}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={}",
        ttl.as_secs()
    )
}

/// The `Set-Cookie` value that removes it (logout).
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others_and_carries_its_flags() {
        let mut h = axum::http::HeaderMap::new();
        h.insert(
            axum::http::header::COOKIE,
            "a=1; ferry_session=abc; b=2".parse().unwrap(),
        );
        assert_eq!(cookie_id(&h).as_deref(), Some("abc"));
        let c = set_cookie("x", Duration::from_secs(60));
        for flag in [
            "HttpOnly",
            "Secure",
            "SameSite=Strict",
            "Path=/",
            "Max-Age=60",
        ] {
            assert!(c.contains(flag), "{c}");
        }
    }
}
