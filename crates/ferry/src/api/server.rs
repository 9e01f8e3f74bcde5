//! The agent's REST API (`/api/v1`) over HTTP: where a request goes.
//!
//! **route table → gate → decode → state → execute → encode**: every route
//! comes from ferry-api's one table ([`ferry_api::ROUTES`]: method, path,
//! least role, node states); [`auth`] establishes who calls (a token's role
//! or a paired node's certificate, 401 otherwise), [`gate`] checks the
//! route's need (403), [`handle`] decodes the request into a typed
//! [`Action`] (400 naming the field or the rule, 413 over
//! `api.body_bytes_max`), refuses it in a node state the route does not
//! allow (409 naming the state it needs), runs
//! [`crate::agent::dispatch::execute`], and encodes its typed reply — or
//! the [`ActionError`] with the status of its kind.
//!
//! `GET /api/v1/openapi.json` is the OpenAPI 3.1 document of all of it;
//! `ferry api routes` lists the table. `/metrics` (Prometheus text) and the
//! console's static files (`/`, `/console/{file}`: no data in them) are the
//! only paths served without a token.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, RawPathParams, Request, State};
use axum::http::Method;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodFilter, MethodRouter};
use axum::{Extension, Json, Router};
use ferry_core::link::Phase;
use serde_json::json;

use ferry_api::{Action, ActionError, ActionKind, Authority, ErrorKind, Need};

use ferry_api::Reply;

use super::session::{self, Sessions};
use super::{console, events};
use crate::agent::dispatch::{self, Asker};
use crate::agent::AgentCtx;
use crate::transport::conns::ConnSlot;

type Ctx = State<Arc<AgentCtx>>;

/// An error answer: `{"error": …}` with the status of its kind.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ActionError> for ApiError {
    fn from(e: ActionError) -> Self {
        ApiError(
            StatusCode::from_u16(e.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            e.message,
        )
    }
}

/// Who is on the other end of a connection, as its TLS handshake showed.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The fingerprint of the certificate the client presented (its key
    /// proven by the handshake), if any.
    pub cert_fingerprint: Option<String>,
    /// The registered peer that certificate belongs to.
    pub peer: Option<String>,
    /// The client's address (for the audit log).
    pub addr: Option<std::net::SocketAddr>,
    slot: Arc<ConnSlot>,
}

/// The console's shared state: its sessions and open event streams.
#[derive(Clone)]
pub struct Console {
    pub sessions: Arc<Sessions>,
    pub streams: Arc<events::Streams>,
    /// Failed logins recorded in the audit log, at most
    /// `audit.failed_logins_per_minute_max`.
    pub failed_logins: Arc<crate::agent::audit::FailedLogins>,
}

fn unauthorized() -> Response {
    ApiError(
        StatusCode::UNAUTHORIZED,
        "missing or wrong API token".into(),
    )
    .into_response()
}

/// Every `/api/v1` request, authentication: a registered peer's
/// certificate (node-to-node calls: [`Authority::Peer`]), the node's
/// `api.token` (admin), a named token (its role), or a console session's
/// cookie (its token's role; a state-changing request must then carry the
/// session's `X-Ferry-CSRF`, 403 otherwise). `POST /api/v1/session` (the
/// login) is authenticated by the token in its body. Nobody → 401. The
/// authority goes into the request for [`gate`]; the first request that
/// passes marks its connection authenticated (kept when the listener is full).
async fn auth(State(ctx): Ctx, mut req: Request, next: Next) -> Response {
    let caller = req.extensions().get::<Caller>().cloned();
    let Some(console) = req.extensions().get::<Console>().cloned() else {
        return unauthorized();
    };
    let mut presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let peer = caller.as_ref().and_then(|c| c.peer.clone());
    let login = req.method() == Method::POST && req.uri().path() == "/api/v1/session";
    let mut session_id = None;
    if peer.is_none() && presented.is_none() {
        if req.method() == Method::POST && req.uri().path() == "/api/v1/session" {
            // The login: its body holds the token. JSON only: a
            // cross-site form cannot send it (no login CSRF).
            let json = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json"));
            if !json {
                return ApiError(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "the login takes a JSON body: Content-Type: application/json".into(),
                )
                .into_response();
            }
            let (parts, body) = req.into_parts();
            let bytes = match axum::body::to_bytes(body, ctx.cfg.api.body_bytes_max).await {
                Ok(b) => b,
                Err(_) => {
                    return ApiError(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "the request body is larger than api.body_bytes_max".into(),
                    )
                    .into_response()
                }
            };
            presented = serde_json::from_slice::<ferry_api::request::CreateSession>(&bytes)
                .ok()
                .map(|c| c.token);
            req = Request::from_parts(parts, axum::body::Body::from(bytes));
        } else if let Some(id) = session::cookie_id(req.headers()) {
            let Some(s) = console.sessions.get(&ctx, &id) else {
                return ApiError(
                    StatusCode::UNAUTHORIZED,
                    "the console session ended (logged out, expired, its token revoked, or the agent restarted): log in again".into(),
                )
                .into_response();
            };
            let safe = matches!(*req.method(), Method::GET | Method::HEAD);
            let csrf = req
                .headers()
                .get(session::CSRF_HEADER)
                .and_then(|v| v.to_str().ok());
            if !safe && !Sessions::csrf_ok(&s, csrf) {
                tracing::warn!(token = %s.name, method = %req.method(), path = %req.uri().path(), "api.csrf_refused");
                return ApiError(
                    StatusCode::FORBIDDEN,
                    "a request the session cookie authenticates that changes state needs the session's X-Ferry-CSRF header".into(),
                )
                .into_response();
            }
            req.extensions_mut()
                .insert(session::Credential(s.token_for_checks()));
            req.extensions_mut().insert(Authority::Token {
                name: s.name,
                role: s.role,
            });
            session_id = Some(id);
        }
    }
    let authority = match (peer, presented) {
        (Some(node), _) => Some(Authority::Peer { node }),
        (None, Some(t)) => {
            let a = session::reauth(&ctx, &t).map(|(name, role)| Authority::Token { name, role });
            req.extensions_mut().insert(session::Credential(t));
            a
        }
        (None, None) => req.extensions().get::<Authority>().cloned(),
    };
    let Some(authority) = authority else {
        if login {
            failed_login(&ctx, &console, caller.as_ref().and_then(|c| c.addr)).await;
        }
        return unauthorized();
    };
    if let Some(id) = session_id {
        req.extensions_mut().insert(session::SessionId(id));
    }
    if let Some(c) = caller {
        c.slot.authenticated();
    }
    req.extensions_mut().insert(authority);
    next.run(req).await
}

/// A console login with a token that is not valid here, in the audit log
/// (at most `audit.failed_logins_per_minute_max` a minute; the rest
/// counted in the next one). Recorded before the 401 goes out; a log that
/// cannot be written does not change the answer.
async fn failed_login(ctx: &Arc<AgentCtx>, console: &Console, from: Option<std::net::SocketAddr>) {
    let now = jiff::Timestamp::now().as_millisecond();
    let Some(unrecorded) = console.failed_logins.admit(now) else {
        return;
    };
    tracing::warn!(from = ?from, "api.login_failed");
    let mut result = json!({"ok": false, "error": {"kind": "unauthorized", "status": 401,
        "message": "not a valid token on this node"}});
    if unrecorded > 0 {
        result["unrecorded_failed_logins_before"] = json!(unrecorded);
    }
    let rec = crate::agent::audit::session_record(ActionKind::CreateSession, None, from, result);
    if let Err(e) = crate::agent::audit::record(ctx, rec).await {
        tracing::error!(error = %e, "audit.login_not_recorded");
    }
}

/// Every route, authorization: what the route needs of its caller
/// ([`Need::check`]); 403 with the reason otherwise — before its body is
/// read.
async fn gate(State(need): State<Need>, req: Request, next: Next) -> Response {
    let Some(who) = req.extensions().get::<Authority>() else {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API token".into(),
        )
        .into_response();
    };
    if let Err(e) = need.check(who) {
        tracing::warn!(who = %who.describe(), method = %req.method(), path = %req.uri().path(), need = %need, "api.denied");
        return ApiError(StatusCode::FORBIDDEN, e.to_string()).into_response();
    }
    next.run(req).await
}

/// One served route: its method, path, need, and handler.
pub type Route = (Method, &'static str, Need, MethodRouter<Arc<AgentCtx>>);

fn method_filter(m: ferry_api::Method) -> (Method, MethodFilter) {
    use ferry_api::Method as M;
    match m {
        M::Get => (Method::GET, MethodFilter::GET),
        M::Post => (Method::POST, MethodFilter::POST),
        M::Put => (Method::PUT, MethodFilter::PUT),
        M::Patch => (Method::PATCH, MethodFilter::PATCH),
        M::Delete => (Method::DELETE, MethodFilter::DELETE),
    }
}

/// Every `/api/v1` route, from ferry-api's route table and nothing else:
/// each behind the authentication, its own authorization, and one handler
/// that decodes the table's action.
pub fn routes() -> Vec<Route> {
    ferry_api::ROUTES
        .iter()
        .map(|r| {
            let (method, filter) = method_filter(r.method);
            let kind = r.kind;
            let handler = axum::routing::on(
                filter,
                move |ctx: Ctx,
                      who: Extension<Authority>,
                      caller: Option<Extension<Caller>>,
                      params: RawPathParams,
                      query: Query<Vec<(String, String)>>,
                      headers: axum::http::HeaderMap,
                      console: Extension<Console>,
                      credential: Option<Extension<session::Credential>>,
                      session: Option<Extension<session::SessionId>>,
                      body: Result<Bytes, axum::extract::rejection::BytesRejection>| {
                    let console = HttpSide {
                        console: console.0,
                        credential: credential.map(|c| c.0 .0),
                        session: session.map(|s| s.0 .0),
                        headers,
                    };
                    handle(kind, ctx, who, caller, params, query, console, body)
                },
            )
            .layer(middleware::from_fn_with_state(r.need, gate));
            (method, r.path, r.need, handler)
        })
        .collect()
}

/// What the HTTP layer knows of a request beside its action: the console
/// state, the token it presented, its session.
struct HttpSide {
    console: Console,
    credential: Option<String>,
    session: Option<String>,
    /// The request's headers (the audit's `x-ferry-op`).
    headers: axum::http::HeaderMap,
}

/// One request of action `kind`: decode, check the node state, execute,
/// encode.
#[allow(clippy::too_many_arguments)]
async fn handle(
    kind: ActionKind,
    State(ctx): Ctx,
    Extension(authority): Extension<Authority>,
    caller: Option<Extension<Caller>>,
    params: RawPathParams,
    Query(query): Query<Vec<(String, String)>>,
    http: HttpSide,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let route = kind.route();
    let bytes = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is larger than api.body_bytes_max".into(),
            )
            .into_response()
        }
        Err(e) => return ApiError(StatusCode::BAD_REQUEST, e.body_text()).into_response(),
    };
    let params: BTreeMap<String, String> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let query: BTreeMap<String, String> = query.into_iter().collect();
    let html = match report_format(kind, &query) {
        Ok(html) => html,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let body: &[u8] = if route.method.has_body() { &bytes } else { b"" };
    let action = match Action::decode(kind, &params, &query, body) {
        Ok(a) => a,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let state = dispatch::node_state(&ctx);
    if !route.allowed_in.contains(state) {
        return ApiError::from(ActionError::conflict(format!(
            "{} needs {}; node {} is {}",
            kind.name(),
            route.allowed_in.needed(),
            ctx.identity.node_name,
            state.as_str()
        )))
        .into_response();
    }
    let who = Asker {
        authority,
        cert_fingerprint: caller.as_ref().and_then(|c| c.cert_fingerprint.clone()),
        peer: caller.as_ref().and_then(|c| c.peer.clone()),
        addr: caller.as_ref().and_then(|c| c.addr),
        op: dispatch::op_header(&http.headers),
    };
    let (who, action) = match http_action(&ctx, &http, who, action).await {
        Ok(done) => return done,
        Err(to_dispatch) => to_dispatch,
    };
    let changes_tokens = matches!(kind, ActionKind::RevokeToken | ActionKind::RotateToken);
    match dispatch::execute(&ctx, &who, action).await {
        Ok(reply) => {
            if changes_tokens {
                http.console.sessions.tokens_changed(&ctx);
            }
            if route.method != ferry_api::Method::Get {
                http.console.sessions.state_changed();
            }
            match reply {
                Reply::MigrationReport(r) if html => console::secure(
                    (
                        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                        super::report_html::render(&r),
                    )
                        .into_response(),
                ),
                reply => Json(reply).into_response(),
            }
        }
        Err(e) => {
            if e.kind == ErrorKind::Internal {
                tracing::error!(action = kind.name(), error = %e, "api.internal_error");
            }
            ApiError::from(e).into_response()
        }
    }
}

/// `GET /api/v1/migrations/{name}/report?format=html`: the migration
/// report as its printable page ([`super::report_html`], with the
/// console's security headers) instead of JSON; `format=json` or none is
/// the JSON reply; any other value is 400 (other routes ignore `format`).
fn report_format(kind: ActionKind, query: &BTreeMap<String, String>) -> Result<bool, ActionError> {
    match (kind, query.get("format").map(String::as_str)) {
        (_, None) => Ok(false),
        (ActionKind::MigrationReport, Some("json")) => Ok(false),
        (ActionKind::MigrationReport, Some("html")) => Ok(true),
        (ActionKind::MigrationReport, Some(other)) => Err(ActionError::bad_input(format!(
            "format must be html or json, not {other:?}"
        ))),
        (_, Some(_)) => Ok(false),
    }
}

/// The actions the HTTP layer answers itself (sessions: cookies; events: a
/// streamed body); any other goes back to be dispatched.
#[allow(clippy::result_large_err)]
async fn http_action(
    ctx: &Arc<AgentCtx>,
    http: &HttpSide,
    who: Asker,
    action: Action,
) -> Result<Response, (Asker, Action)> {
    let sessions = &http.console.sessions;
    Ok(match action {
        Action::CreateSession(req) => {
            let Some((name, role)) = session::reauth(ctx, &req.token) else {
                return Ok(unauthorized());
            };
            let Some((id, s)) = sessions.create(&req.token, name, role) else {
                return Ok(ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the system random generator failed".into(),
                )
                .into_response());
            };
            tracing::info!(token = %s.name, role = %s.role, "api.session_created");
            // Recorded before the cookie goes out; no login the log
            // cannot record (as for any action that changes something).
            let rec = crate::agent::audit::session_record(
                ActionKind::CreateSession,
                Some(&who.authority),
                who.addr,
                json!({"ok": true}),
            );
            if let Err(e) = crate::agent::audit::record(ctx, rec).await {
                sessions.remove(&id);
                return Ok(ApiError::from(ActionError::unavailable(format!(
                    "refused: the audit log cannot record this login ({e})"
                )))
                .into_response());
            }
            (
                [(header::SET_COOKIE, session::set_cookie(&id, sessions.ttl()))],
                Json(Reply::SessionCreated(s.info())),
            )
                .into_response()
        }
        Action::GetSession => match http.session.as_deref().and_then(|id| sessions.get(ctx, id)) {
            Some(s) => Json(Reply::Session(s.info())).into_response(),
            None => ApiError(
                StatusCode::NOT_FOUND,
                "no console session: this request was not made with a session cookie".into(),
            )
            .into_response(),
        },
        Action::DeleteSession => {
            let ended = http
                .session
                .as_deref()
                .is_some_and(|id| sessions.remove(id));
            // The session has ended whatever the log says: a logout that
            // could not be recorded is logged, not refused.
            let rec = crate::agent::audit::session_record(
                ActionKind::DeleteSession,
                Some(&who.authority),
                who.addr,
                json!({"ok": true, "ended": ended}),
            );
            if let Err(e) = crate::agent::audit::record(ctx, rec).await {
                tracing::error!(error = %e, "audit.logout_not_recorded");
            }
            (
                [(header::SET_COOKIE, session::clear_cookie())],
                Json(Reply::SessionEnded(ferry_api::reply::SessionEnded {
                    ended,
                })),
            )
                .into_response()
        }
        Action::Events => events::open(
            ctx.clone(),
            sessions.clone(),
            http.console.streams.clone(),
            events::Owner {
                asker: who,
                credential: http.credential.clone(),
                session: http.session.clone(),
            },
        ),
        other => return Err((who, other)),
    })
}

/// The whole app: every route of [`routes`] behind [`auth`]; `/metrics` and
/// the console's static files are the only paths served without a token.
fn app(ctx: Arc<AgentCtx>) -> Router {
    let mut by_path: Vec<(&'static str, MethodRouter<Arc<AgentCtx>>)> = Vec::new();
    for (_, path, _, handler) in routes() {
        match by_path.iter_mut().find(|(p, _)| *p == path) {
            Some((_, mr)) => *mr = std::mem::take(mr).merge(handler),
            None => by_path.push((path, handler)),
        }
    }
    let console = Console {
        sessions: Arc::new(Sessions::new(ctx.cfg.api.session_ttl_ms)),
        streams: Arc::new(events::Streams::default()),
        failed_logins: Arc::new(crate::agent::audit::FailedLogins::new(
            ctx.cfg.audit.failed_logins_per_minute_max,
        )),
    };
    let api = by_path
        .into_iter()
        .fold(Router::new(), |r, (path, mr)| r.route(path, mr))
        .layer(middleware::from_fn_with_state(ctx.clone(), auth))
        .layer(Extension(console))
        .layer(axum::extract::DefaultBodyLimit::max(
            ctx.cfg.api.body_bytes_max,
        ));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(console::index))
        .route("/console/{file}", get(console::file))
        .merge(api)
        .layer(middleware::from_fn(server_timing))
        .with_state(ctx)
}

/// Every answer says how long the agent took to make it (from the request's
/// headers read to its answer's headers, authentication included):
/// `Server-Timing: app;dur=MS`, which browsers show per request
/// (`PerformanceResourceTiming.serverTiming`) — what the console's
/// benchmark reads.
async fn server_timing(req: Request, next: Next) -> Response {
    let t0 = std::time::Instant::now();
    let mut r = next.run(req).await;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("app;dur={ms:.2}")) {
        r.headers_mut().insert("server-timing", v);
    }
    r
}

/// Serves the API over TLS (the node's certificate) on `listener` until the
/// runtime stops. Each connection: a place in the table
/// (`api.connections_max`, the oldest unauthenticated one closed when
/// full), the TLS handshake and the request's headers within
/// `api.handshake_timeout_ms`, one request (no keep-alive).
pub async fn serve(listener: std::net::TcpListener, ctx: Arc<AgentCtx>) {
    // Browsers (any SNI but ferry's internal name) get the operator's
    // certificate if `[api]` names one (checked when the config loaded).
    let operator = match (&ctx.cfg.api.tls_cert_file, &ctx.cfg.api.tls_key_file) {
        (Some(c), Some(k)) => match crate::transport::tls::operator_cert(c, k) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::error!(error = %e, "api.tls_cert_failed");
                return;
            }
        },
        _ => None,
    };
    let tls = match crate::transport::tls::api_server_config(&ctx.identity, operator) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "api.tls_failed");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let deadline = Duration::from_millis(ctx.cfg.api.handshake_timeout_ms);
    let table = ctx.api_conns.clone();
    let app = app(ctx.clone());
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "api.listen_failed");
            return;
        }
    };
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors, most likely: let others finish.
                tracing::warn!(error = %e, "api.accept_failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let stop = Arc::new(tokio::sync::Notify::new());
        let evict = stop.clone();
        let Some(slot) = table.admit(Box::new(move || evict.notify_one())) else {
            continue;
        };
        let (acceptor, app, ctx) = (acceptor.clone(), app.clone(), ctx.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = serve_conn(tcp, acceptor, app, Arc::new(slot), deadline, &ctx) => {}
                _ = stop.notified() => {}
            }
        });
    }
}

async fn serve_conn(
    tcp: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    slot: Arc<ConnSlot>,
    deadline: Duration,
    ctx: &AgentCtx,
) {
    let _ = tcp.set_nodelay(true);
    let addr = tcp.peer_addr().ok();
    let Ok(Ok(tls)) = tokio::time::timeout(deadline, acceptor.accept(tcp)).await else {
        return;
    };
    let cert_fingerprint = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| crate::transport::identity::fingerprint(c));
    let peer = cert_fingerprint
        .as_deref()
        .and_then(|fp| ctx.peers.by_fingerprint(fp))
        .map(|p| p.name);
    if peer.is_some() {
        slot.authenticated();
    }
    let caller = Caller {
        cert_fingerprint,
        peer,
        addr,
        slot,
    };
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(caller.clone());
        let mut app = app.clone();
        async move { tower_service::Service::call(&mut app, req).await }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(deadline)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
        .without_shutdown()
        .await;
    // Lingering close: a request answered before its body was read (413)
    // would otherwise be closed with the body still arriving, and the
    // kernel's reset would destroy the answer before the client read it.
    // Send our close, then read and drop what the client still sends, for
    // at most the request deadline and 16 × api.body_bytes_max bytes.
    if let Ok(parts) = served {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tls = parts.io.into_inner();
        let _ = tls.shutdown().await;
        let cap = 16 * ctx.cfg.api.body_bytes_max as u64;
        let drain = async {
            let mut buf = vec![0u8; 64 * 1024];
            let mut read = 0u64;
            while read < cap {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n as u64,
                }
            }
        };
        let _ = tokio::time::timeout(deadline, drain).await;
    }
}

async fn metrics(State(ctx): Ctx) -> Response {
    let mut out = String::new();
    out.push_str("# HELP ferry_replication_bytes_sent_total Bytes sent on replication links.\n# TYPE ferry_replication_bytes_sent_total counter\n");
    let prim = ctx.primaries();
    for v in &prim {
        let l = v.link.lock();
        out.push_str(&format!(
            "ferry_replication_bytes_sent_total{{volume=\"{}\"}} {}\n",
            v.name, l.stats.bytes_sent
        ));
    }
    out.push_str("# HELP ferry_replication_backlog_bytes Bytes sent or queued and not yet acknowledged.\n# TYPE ferry_replication_backlog_bytes gauge\n");
    for v in &prim {
        let st = v.link.lock().rep.status();
        out.push_str(&format!(
            "ferry_replication_backlog_bytes{{volume=\"{}\"}} {}\n",
            v.name, st.backlog_bytes
        ));
    }
    out.push_str("# HELP ferry_replication_dirty_bytes Bytes not known equal on the peer.\n# TYPE ferry_replication_dirty_bytes gauge\n");
    for v in &prim {
        let st = v.link.lock().rep.status();
        out.push_str(&format!(
            "ferry_replication_dirty_bytes{{volume=\"{}\"}} {}\n",
            v.name, st.dirty_bytes
        ));
    }
    out.push_str("# HELP ferry_replication_link_up 1 when the replication link is connected.\n# TYPE ferry_replication_link_up gauge\n");
    for v in &prim {
        let st = v.link.lock().rep.status();
        let up = u8::from(matches!(st.phase, Phase::Resyncing | Phase::Streaming));
        out.push_str(&format!(
            "ferry_replication_link_up{{volume=\"{}\"}} {up}\n",
            v.name
        ));
    }
    out.push_str("# HELP ferry_write_latency_seconds Client write latency on primaries, replication included.\n# TYPE ferry_write_latency_seconds histogram\n");
    for v in &prim {
        let h = &v.write_latency;
        let mut cum = 0u64;
        for (i, b) in crate::volume::primary::LATENCY_BUCKETS_US
            .iter()
            .enumerate()
        {
            cum += h.buckets[i].load(std::sync::atomic::Ordering::Relaxed);
            out.push_str(&format!(
                "ferry_write_latency_seconds_bucket{{volume=\"{}\",le=\"{}\"}} {cum}\n",
                v.name,
                *b as f64 / 1e6
            ));
        }
        cum += h.buckets[crate::volume::primary::LATENCY_BUCKETS_US.len()]
            .load(std::sync::atomic::Ordering::Relaxed);
        out.push_str(&format!(
            "ferry_write_latency_seconds_bucket{{volume=\"{}\",le=\"+Inf\"}} {cum}\n",
            v.name
        ));
        out.push_str(&format!(
            "ferry_write_latency_seconds_sum{{volume=\"{}\"}} {}\n",
            v.name,
            h.sum_us.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6
        ));
        out.push_str(&format!(
            "ferry_write_latency_seconds_count{{volume=\"{}\"}} {cum}\n",
            v.name
        ));
    }
    for s in ctx.replicas() {
        let bad = s
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        out.push_str(&format!(
            "ferry_replica_error{{volume=\"{}\"}} {}\n",
            s.name,
            u8::from(bad)
        ));
    }
    out.push_str("# HELP ferry_listener_connections Connections open on a TCP listener.\n# TYPE ferry_listener_connections gauge\n");
    out.push_str("# HELP ferry_listener_evicted_total Unauthenticated connections closed to make room for new ones.\n# TYPE ferry_listener_evicted_total counter\n");
    for (name, t) in [("api", &ctx.api_conns), ("replication", &ctx.repl_conns)] {
        let (open, evicted) = t.counts();
        out.push_str(&format!(
            "ferry_listener_connections{{listener=\"{name}\"}} {open}\nferry_listener_evicted_total{{listener=\"{name}\"}} {evicted}\n"
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[cfg(test)]
mod tests {
    /// The router serves exactly ferry-api's table, with each route's need.
    #[test]
    fn the_router_is_the_route_table() {
        let served = super::routes();
        assert_eq!(served.len(), ferry_api::ROUTES.len());
        for (r, (method, path, need, _)) in ferry_api::ROUTES.iter().zip(&served) {
            assert_eq!(method.as_str(), r.method.as_str());
            assert_eq!(*path, r.path);
            assert_eq!(*need, r.need);
        }
    }
}
