//! The agent's REST API. Handlers only translate HTTP to calls on
//! [`AgentCtx`] and back; blocking work runs on the blocking pool.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | /api/v1/node | this node: name, fingerprint, addresses |
//! | GET, POST | /api/v1/nodes | registered peers; register one both ways |
//! | POST | /api/v1/nodes/pair | (peer → peer) the other half of `node add` |
//! | GET, POST | /api/v1/volumes | volumes; create one |
//! | GET | /api/v1/volumes/{name}/hashes | BLAKE3 per block (verify) |
//! | POST | /api/v1/volumes/{name}/verify | drain the link, compare with the peer |
//! | POST | /api/v1/replicas | (peer → peer) hold a replica |
//! | GET, POST | /api/v1/replications | status of all; start one |
//! | GET, PATCH, DELETE | /api/v1/replications/{name} | status (`?wait_state=S&wait_ms=N`: once the state is S, at the latest after N ms); change max rate; stop |
//! | GET, POST | /api/v1/shares | status of all; create one |
//! | GET | /api/v1/shares/{name} | status (`?counts=0`: without walking the tree; `wait_state`, `wait_ms` as for replications) |
//! | GET | /api/v1/shares/{name}/digest | digest of this node's copy (cached file hashes) |
//! | GET | /api/v1/shares/{name}/files | this node's copy entry by entry, files read whole |
//! | POST | /api/v1/shares/{name}/verify | wait until level, compare with the replica |
//! | GET | /metrics | Prometheus text (no token) |
//!
//! The authoritative list, with the least role each route needs, is
//! [`routes`] (`ferry api routes`). Every `/api/v1` call needs a token
//! (`Authorization: Bearer`: `DATA_DIR/api.token`, admin, or a named token
//! with its role) or a paired node's certificate; peer-internal routes take
//! only the certificate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::Method;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodFilter, MethodRouter};
use axum::{Json, Router};
use ferry_core::link::{Mode, Phase};
use serde::Deserialize;
use serde_json::{json, Value};

use ferry_api::{ActionError, Authority, Need, Role};

use crate::agent::AgentCtx;
use crate::transport::conns::ConnSlot;
use crate::transport::peers::Peer;

type Ctx = State<Arc<AgentCtx>>;

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

/// An error's status: the [`ActionError`] kind anywhere in its chain (a
/// wrong state → 409, an unknown name → 404, a peer that does not answer →
/// 503), else 400.
impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        use crate::volume::VolumeError;
        let status = e
            .chain()
            .find_map(|c| {
                if let Some(a) = c.downcast_ref::<ActionError>() {
                    return StatusCode::from_u16(a.kind.status()).ok();
                }
                use crate::agent::tokens::TokenError;
                match c.downcast_ref::<TokenError>() {
                    Some(TokenError::Unknown(_)) => return Some(StatusCode::NOT_FOUND),
                    Some(TokenError::Exists(_) | TokenError::FileToken(_)) => {
                        return Some(StatusCode::CONFLICT)
                    }
                    Some(_) => return Some(StatusCode::INTERNAL_SERVER_ERROR),
                    None => {}
                }
                match c.downcast_ref::<VolumeError>()? {
                    VolumeError::NotFound { .. } => Some(StatusCode::NOT_FOUND),
                    VolumeError::Exists { .. } | VolumeError::Busy { .. } => {
                        Some(StatusCode::CONFLICT)
                    }
                    _ => None,
                }
            })
            .unwrap_or(StatusCode::BAD_REQUEST);
        ApiError(status, format!("{e:#}"))
    }
}

/// A JSON request body: like axum's `Json`, but a body that does not fit
/// the type — unknown field, wrong type, missing field, bad name — is 400
/// with serde's message (it names the field and the rule), a body over
/// `api.body_bytes_max` 413.
pub struct Body<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(JsonRejection::JsonDataError(e)) => Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("the request body does not fit: {}", e.body_text()),
            )),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is larger than api.body_bytes_max".into(),
            )),
            Err(e) => Err(ApiError(StatusCode::BAD_REQUEST, e.body_text())),
        }
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

/// Who is on the other end of a connection, as its TLS handshake showed.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The fingerprint of the certificate the client presented (its key
    /// proven by the handshake), if any.
    pub cert_fingerprint: Option<String>,
    /// The registered peer that certificate belongs to.
    pub peer: Option<String>,
    slot: Arc<ConnSlot>,
}

/// Every `/api/v1` request, authentication: a registered peer's
/// certificate (node-to-node calls: [`Authority::Peer`]), the node's
/// `api.token` (admin) or a named token (its role). Nobody → 401. The
/// authority goes into the request for [`gate`]; the first request that
/// passes marks its connection authenticated (kept when the listener is full).
async fn auth(State(ctx): Ctx, mut req: Request, next: Next) -> Response {
    let caller = req.extensions().get::<Caller>().cloned();
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let authority = match (caller.as_ref().and_then(|c| c.peer.clone()), presented) {
        (Some(node), _) => Some(Authority::Peer { node }),
        (None, Some(t)) if !t.is_empty() && ctx.identity.token_matches(&t) => {
            Some(Authority::Token {
                name: crate::agent::tokens::FILE_TOKEN_NAME.into(),
                role: Role::Admin,
            })
        }
        (None, Some(t)) => ctx
            .tokens
            .authenticate(&t)
            .map(|(name, role)| Authority::Token { name, role }),
        (None, None) => None,
    };
    let Some(authority) = authority else {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API token".into(),
        )
        .into_response();
    };
    if let Some(c) = caller {
        c.slot.authenticated();
    }
    req.extensions_mut().insert(authority);
    next.run(req).await
}

/// Every route, authorization: what the route needs of its caller
/// ([`Need::check`]); 403 with the reason otherwise.
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

/// One route of the API: its method, its path (axum syntax), what it needs
/// of its caller, and its handler.
pub type Route = (Method, &'static str, Need, MethodRouter<Arc<AgentCtx>>);

macro_rules! route {
    ($m:ident $path:literal => $h:expr, $need:ident) => {
        (
            Method::$m,
            $path,
            Need::$need,
            axum::routing::on(MethodFilter::$m, $h)
                .layer(middleware::from_fn_with_state(Need::$need, gate)),
        )
    };
}

/// Every `/api/v1` route with the least role it needs (`PEER`: a paired
/// node's certificate only, never a token). The router is built from this
/// table and nothing else, every entry sits behind the authentication and
/// its own authorization, so `ferry api routes` and the tests that walk it
/// see exactly what is served and enforced.
pub fn routes() -> Vec<Route> {
    vec![
        route!(GET "/api/v1/node" => node, VIEWER),
        route!(GET "/api/v1/nodes" => nodes, VIEWER),
        route!(POST "/api/v1/nodes" => add_node, ADMIN),
        route!(POST "/api/v1/nodes/pair" => pair, ADMIN),
        route!(POST "/api/v1/nodes/repin" => repin, PEER),
        route!(POST "/api/v1/node/rekey" => rekey, ADMIN),
        route!(POST "/api/v1/token/rotate" => rotate_token, ADMIN),
        route!(GET "/api/v1/tokens" => list_tokens, ADMIN),
        route!(POST "/api/v1/tokens" => create_token, ADMIN),
        route!(DELETE "/api/v1/tokens/{name}" => revoke_token, ADMIN),
        route!(GET "/api/v1/volumes" => volumes, VIEWER),
        route!(POST "/api/v1/volumes" => create_volume, OPERATOR),
        route!(DELETE "/api/v1/volumes/{name}" => delete_volume, ADMIN),
        route!(GET "/api/v1/volumes/{name}/hashes" => hashes, VIEWER),
        route!(GET "/api/v1/volumes/{name}/generation" => generation, VIEWER),
        route!(POST "/api/v1/volumes/{name}/verify" => verify, OPERATOR),
        route!(POST "/api/v1/volumes/{name}/promote" => promote_volume, PEER),
        route!(POST "/api/v1/volumes/{name}/snapshot" => arm_snapshot, PEER),
        route!(POST "/api/v1/workloads/{name}/takeover" => takeover, PEER),
        route!(POST "/api/v1/volumes/{name}/inconsistent" => mark_inconsistent, PEER),
        route!(POST "/api/v1/replicas" => create_replica, PEER),
        route!(GET "/api/v1/workloads" => workloads, VIEWER),
        route!(POST "/api/v1/workloads" => create_workload, ADMIN),
        route!(GET "/api/v1/workloads/{name}" => workload, VIEWER),
        route!(PUT "/api/v1/workloads/{name}" => put_workload, ADMIN),
        route!(DELETE "/api/v1/workloads/{name}" => delete_workload, ADMIN),
        route!(POST "/api/v1/workloads/{name}/test" => start_test_here, PEER),
        route!(DELETE "/api/v1/workloads/{name}/test" => end_test_here, PEER),
        route!(POST "/api/v1/workloads/{name}/hooks/{which}" => run_workload_hook, OPERATOR),
        route!(GET "/api/v1/migrations" => migrations, VIEWER),
        route!(POST "/api/v1/migrations" => start_migration, OPERATOR),
        route!(GET "/api/v1/migrations/{name}" => migration, VIEWER),
        route!(PATCH "/api/v1/migrations/{name}" => set_migration, OPERATOR),
        route!(POST "/api/v1/migrations-cutover-all" => cutover_all, OPERATOR),
        route!(POST "/api/v1/migrations/{name}/cutover" => cutover, OPERATOR),
        route!(POST "/api/v1/migrations/{name}/schedule" => schedule_cutover, OPERATOR),
        route!(DELETE "/api/v1/migrations/{name}/schedule" => cancel_cutover, OPERATOR),
        route!(POST "/api/v1/migrations/{name}/reverse" => reverse_migration, PEER),
        route!(POST "/api/v1/migrations/{name}/rollback" => rollback, OPERATOR),
        route!(POST "/api/v1/migrations/{name}/finalize" => finalize, OPERATOR),
        route!(POST "/api/v1/migrations/{name}/test" => start_test, OPERATOR),
        route!(DELETE "/api/v1/migrations/{name}/test" => end_test, OPERATOR),
        route!(GET "/api/v1/replications" => replications, VIEWER),
        route!(POST "/api/v1/replications" => start_replication, OPERATOR),
        route!(GET "/api/v1/replications/{name}" => replication, VIEWER),
        route!(PATCH "/api/v1/replications/{name}" => set_replication, OPERATOR),
        route!(DELETE "/api/v1/replications/{name}" => stop_replication, OPERATOR),
        route!(GET "/api/v1/shares" => shares, VIEWER),
        route!(POST "/api/v1/shares" => create_share, ADMIN),
        route!(GET "/api/v1/shares/{name}" => share_status, VIEWER),
        route!(GET "/api/v1/shares/{name}/digest" => share_digest, VIEWER),
        route!(GET "/api/v1/shares/{name}/files" => share_files, PEER),
        route!(POST "/api/v1/shares/{name}/verify" => share_verify, OPERATOR),
        route!(GET "/api/v1/cluster" => cluster_status, VIEWER),
        route!(POST "/api/v1/cluster/workloads" => cluster_add, ADMIN),
        route!(DELETE "/api/v1/cluster/workloads/{name}" => cluster_remove, ADMIN),
        route!(POST "/api/v1/cluster/standby" => cluster_standby, OPERATOR),
        route!(POST "/api/v1/cluster/workloads/{name}/promote" => cluster_promote, ADMIN),
        route!(POST "/api/v1/cluster/workloads/{name}/resolve-split-brain" => cluster_resolve, ADMIN),
        route!(POST "/api/v1/cluster/workloads/{name}/drop-copy" => cluster_drop_copy, ADMIN),
        route!(POST "/api/v1/cluster/workloads/{name}/switchover" => cluster_switchover, OPERATOR),
    ]
}

/// The whole app: every route of [`routes`] behind [`auth`]; `/metrics` is
/// the only path served without a token.
fn app(ctx: Arc<AgentCtx>) -> Router {
    let mut by_path: Vec<(&'static str, MethodRouter<Arc<AgentCtx>>)> = Vec::new();
    for (_, path, _, handler) in routes() {
        match by_path.iter_mut().find(|(p, _)| *p == path) {
            Some((_, mr)) => *mr = std::mem::take(mr).merge(handler),
            None => by_path.push((path, handler)),
        }
    }
    let api = by_path
        .into_iter()
        .fold(Router::new(), |r, (path, mr)| r.route(path, mr))
        .layer(middleware::from_fn_with_state(ctx.clone(), auth))
        .layer(axum::extract::DefaultBodyLimit::max(
            ctx.cfg.api.body_bytes_max,
        ));
    Router::new()
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(ctx)
}

/// Serves the API over TLS (the node's certificate) on `listener` until the
/// runtime stops. Each connection: a place in the table
/// (`api.connections_max`, the oldest unauthenticated one closed when
/// full), the TLS handshake and the request's headers within
/// `api.handshake_timeout_ms`, one request (no keep-alive).
pub async fn serve(listener: std::net::TcpListener, ctx: Arc<AgentCtx>) {
    let tls = match crate::transport::tls::api_server_config(&ctx.identity) {
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
        slot,
    };
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(caller.clone());
        let mut app = app.clone();
        async move { tower_service::Service::call(&mut app, req).await }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(deadline)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
        .await;
}

fn node_json(ctx: &AgentCtx) -> Value {
    json!({
        "node_name": ctx.identity.node_name,
        "fingerprint": ctx.identity.fingerprint(),
        "cert_pem": ctx.identity.cert_pem(),
        "api": ctx.cfg.api_listen.to_string(),
        "replication": ctx.cfg.replication_listen.to_string(),
        "nbd": ctx.nbd_uri(""),
        "nbd_tls": ctx.nbd_tls_uri(""),
        "heartbeat": heartbeat_addrs(ctx),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": ctx.started.elapsed().as_secs(),
        "free_bytes": crate::agent::free_bytes(&ctx.cfg.data_dir),
        "damaged": ctx.damaged.list(),
    })
}

fn heartbeat_addrs(ctx: &AgentCtx) -> Vec<String> {
    ctx.cfg
        .cluster
        .as_ref()
        .map(|c| c.heartbeat.iter().map(|a| a.to_string()).collect())
        .unwrap_or_default()
}

async fn node(State(ctx): Ctx) -> ApiResult {
    Ok(Json(node_json(&ctx)))
}

async fn nodes(State(ctx): Ctx) -> ApiResult {
    let list: Vec<Value> = ctx
        .peers
        .list()
        .into_iter()
        .map(|p| json!({"name": p.name, "api": p.api, "replication": p.replication, "fingerprint": p.fingerprint}))
        .collect();
    Ok(Json(json!(list)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNode {
    name: String,
    api: String,
    token: String,
    /// The certificate fingerprint the operator supplied or confirmed: the
    /// only one pinned.
    fingerprint: String,
}

/// `ferry node add`: reach the peer over TLS pinned to the fingerprint the
/// operator gave, check its name, pair both ways (mutual TLS; the peer's
/// token authorizes this one call and is not kept).
async fn add_node(State(ctx): Ctx, Body(req): Body<AddNode>) -> ApiResult {
    let peer = blocking(move || {
        let client = crate::api::client::ApiClient::pairing(
            &ctx.identity,
            &req.api,
            &req.fingerprint,
            &req.token,
        )?;
        let info = client.get("/api/v1/node")?;
        let name = info["node_name"].as_str().unwrap_or_default().to_string();
        if name != req.name {
            anyhow::bail!(
                "the node at {} calls itself {name:?}, not {:?}",
                req.api,
                req.name
            );
        }
        if name == ctx.identity.node_name {
            anyhow::bail!("a node cannot be its own peer");
        }
        let fp = info["fingerprint"].as_str().unwrap_or_default().to_string();
        if req.fingerprint.trim() != fp {
            anyhow::bail!(
                "the node at {} reports fingerprint {fp}, not the pinned {}",
                req.api,
                req.fingerprint
            );
        }
        let cert_pem = info["cert_pem"].as_str().unwrap_or_default().to_string();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("the peer's certificate is not PEM: {e}"))?;
        let der: rustls_pki_types::CertificateDer = der;
        if crate::transport::identity::fingerprint(&der) != fp {
            anyhow::bail!("the peer's certificate does not match its fingerprint");
        }
        // Keep the heartbeat key of an earlier pairing: re-adding a node
        // must not break heartbeats the other side authenticates.
        let heartbeat_key = ctx
            .peers
            .get(&name)
            .map(|p| p.heartbeat_key)
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| {
                (0..4)
                    .map(|_| format!("{:016x}", crate::transport::identity::random_u64()))
                    .collect()
            });
        client.post(
            "/api/v1/nodes/pair",
            &json!({
                "name": ctx.identity.node_name,
                "api": ctx.cfg.api_listen.to_string(),
                "replication": ctx.cfg.replication_listen.to_string(),
                "cert_pem": ctx.identity.cert_pem(),
                "fingerprint": ctx.identity.fingerprint(),
                "heartbeat": heartbeat_addrs(&ctx),
                "heartbeat_key": heartbeat_key,
            }),
        )?;
        let peer = Peer {
            name,
            api: req.api.clone(),
            replication: info["replication"].as_str().unwrap_or_default().to_string(),
            fingerprint: fp,
            cert_pem,
            token: String::new(),
            previous_fingerprint: None,
            heartbeat: info["heartbeat"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            heartbeat_key,
        };
        ctx.peers.upsert(peer.clone())?;
        tracing::info!(peer = %peer.name, fingerprint = %peer.fingerprint, "node.registered");
        Ok(peer)
    })
    .await?;
    Ok(Json(
        json!({"name": peer.name, "api": peer.api, "replication": peer.replication, "fingerprint": peer.fingerprint}),
    ))
}

/// (peer → peer) the other half of `node add`. The caller must present the
/// very certificate it asks to have pinned (the TLS handshake proved it
/// holds its key); the API token of this node authorized the call.
async fn pair(
    State(ctx): Ctx,
    axum::Extension(caller): axum::Extension<Caller>,
    Body(mut p): Body<Peer>,
) -> ApiResult {
    if caller.cert_fingerprint.as_deref() != Some(p.fingerprint.as_str()) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "pairing must come over TLS with the certificate being registered".into(),
        ));
    }
    crate::volume::validate_name(&p.name)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    p.token = String::new();
    p.previous_fingerprint = None;
    let der: rustls_pki_types::CertificateDer =
        rustls_pki_types::pem::PemObject::from_pem_slice(p.cert_pem.as_bytes()).map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("certificate is not PEM: {e}"),
            )
        })?;
    if crate::transport::identity::fingerprint(&der) != p.fingerprint {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "certificate does not match fingerprint".into(),
        ));
    }
    if p.name == ctx.identity.node_name {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "a node cannot pair with itself".into(),
        ));
    }
    let name = p.name.clone();
    blocking(move || ctx.peers.upsert(p)).await?;
    tracing::info!(peer = %name, "node.paired");
    Ok(Json(json!({"paired": name})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Repin {
    cert_pem: String,
    fingerprint: String,
    /// The node uses its new certificate now: stop accepting the old one.
    #[serde(default)]
    done: bool,
}

/// (peer → peer) `ferry node rekey` on the calling node: pin its new
/// certificate. Only a registered peer can ask, authenticated by the
/// certificate it is replacing; until it says `done` both are accepted.
async fn repin(
    State(ctx): Ctx,
    axum::Extension(caller): axum::Extension<Caller>,
    Body(r): Body<Repin>,
) -> ApiResult {
    let Some(name) = caller.peer.clone() else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "only a registered node may re-pin its own certificate".into(),
        ));
    };
    let der: rustls_pki_types::CertificateDer =
        rustls_pki_types::pem::PemObject::from_pem_slice(r.cert_pem.as_bytes()).map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("certificate is not PEM: {e}"),
            )
        })?;
    if crate::transport::identity::fingerprint(&der) != r.fingerprint {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "certificate does not match fingerprint".into(),
        ));
    }
    let presented = caller.cert_fingerprint.clone().unwrap_or_default();
    let fingerprint = r.fingerprint.clone();
    blocking(move || {
        let mut p = ctx
            .peers
            .get(&name)
            .ok_or_else(|| anyhow::anyhow!("node {name:?} is not registered"))?;
        if r.done {
            if presented != r.fingerprint {
                anyhow::bail!("finish a rekey with the new certificate");
            }
            p.previous_fingerprint = None;
        } else if p.fingerprint != r.fingerprint {
            p.previous_fingerprint = Some(p.fingerprint.clone());
            p.fingerprint = r.fingerprint.clone();
            p.cert_pem = r.cert_pem.clone();
        }
        ctx.peers.upsert(p)?;
        tracing::warn!(peer = %name, fingerprint = %r.fingerprint, done = r.done, "node.repinned");
        Ok(())
    })
    .await?;
    Ok(Json(
        json!({"repinned": caller.peer, "fingerprint": fingerprint}),
    ))
}

/// `ferry node rekey`: a new key and certificate for this node, pinned by
/// every registered peer over the old trust before it is used; then used
/// by every new handshake (API, replication, peer calls); then the peers
/// drop the old one. A peer that cannot be reached stops the rekey before
/// anything changes here.
async fn rekey(State(ctx): Ctx) -> ApiResult {
    let out = blocking(move || {
        let _admin = ctx.admin();
        let old = ctx.identity.fingerprint();
        let (key_pem, key) = ctx.identity.new_key()?;
        let new_fp = key.fingerprint.clone();
        let cert_pem = key.cert_pem.clone();
        let peers = ctx.peers.list();
        for p in &peers {
            crate::api::client::ApiClient::to_peer(&ctx.identity, p)?
                .post(
                    "/api/v1/nodes/repin",
                    &json!({"cert_pem": cert_pem, "fingerprint": new_fp}),
                )
                .map_err(|e| anyhow::anyhow!("{e:#}"))
                .map_err(|e| e.context(format!("node {} did not pin the new certificate; nothing changed here (retry once it is reachable)", p.name)))?;
        }
        ctx.identity.install_key(&key_pem, key)?;
        let mut unfinished = Vec::new();
        for p in &peers {
            let done = crate::api::client::ApiClient::to_peer(&ctx.identity, p).and_then(|c| {
                c.post(
                    "/api/v1/nodes/repin",
                    &json!({"cert_pem": cert_pem, "fingerprint": new_fp, "done": true}),
                )
            });
            if let Err(e) = done {
                tracing::warn!(peer = %p.name, error = %format!("{e:#}"), "node.rekey.unfinished");
                unfinished.push(p.name.clone());
            }
        }
        tracing::warn!(old = %old, new = %new_fp, "node.rekeyed");
        Ok(json!({
            "node": ctx.identity.node_name,
            "old_fingerprint": old,
            "fingerprint": new_fp,
            "peers": peers.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
            "peers_still_accepting_old": unfinished,
        }))
    })
    .await?;
    Ok(Json(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    name: String,
    role: String,
}

/// `ferry token create NAME --role R`: the token, shown this once.
async fn create_token(
    State(ctx): Ctx,
    axum::Extension(who): axum::Extension<Authority>,
    Body(r): Body<CreateToken>,
) -> ApiResult {
    let name = ferry_core::Name::parse(&r.name)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("token name: {e}")))?;
    let role: Role = r.role.parse().map_err(|e: ferry_api::auth::UnknownRole| {
        ApiError(StatusCode::BAD_REQUEST, e.to_string())
    })?;
    let (c, n) = (ctx.clone(), name.clone());
    let token = blocking(move || Ok(c.tokens.create(&n, role)?)).await?;
    tracing::warn!(token = %name, %role, by = %who.describe(), "api.token_created");
    Ok(Json(json!({
        "name": name,
        "role": role,
        "token": token,
        "node": ctx.identity.node_name,
        "scope": "node",
    })))
}

async fn list_tokens(State(ctx): Ctx) -> ApiResult {
    Ok(Json(json!(ctx.tokens.list())))
}

async fn revoke_token(
    State(ctx): Ctx,
    axum::Extension(who): axum::Extension<Authority>,
    Path(name): Path<String>,
) -> ApiResult {
    let (c, n) = (ctx.clone(), name.clone());
    blocking(move || Ok(c.tokens.revoke(&n)?)).await?;
    tracing::warn!(token = %name, by = %who.describe(), "api.token_revoked");
    Ok(Json(
        json!({"revoked": name, "node": ctx.identity.node_name}),
    ))
}

/// `ferry token rotate`: a new API token (written to DATA_DIR/api.token,
/// 0600); the old one stops working at once.
async fn rotate_token(State(ctx): Ctx) -> ApiResult {
    let c = ctx.clone();
    blocking(move || c.identity.rotate_token()).await?;
    tracing::warn!("api.token_rotated");
    Ok(Json(json!({
        "node": ctx.identity.node_name,
        "token_file": crate::transport::identity::token_path(&ctx.cfg.data_dir).display().to_string(),
    })))
}

async fn volumes(State(ctx): Ctx) -> ApiResult {
    let list = blocking(move || Ok(ctx.store.list()?)).await?;
    Ok(Json(serde_json::to_value(list).unwrap_or(Value::Null)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVolume {
    name: String,
    size_bytes: u64,
}

async fn create_volume(State(ctx): Ctx, Body(req): Body<CreateVolume>) -> ApiResult {
    let c = ctx.clone();
    let name = req.name.clone();
    blocking(move || c.create_volume(&req.name, req.size_bytes)).await?;
    let info = blocking(move || Ok(ctx.store.info(&name)?)).await?;
    Ok(Json(serde_json::to_value(info).unwrap_or(Value::Null)))
}

async fn delete_volume(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    let n = name.clone();
    blocking(move || ctx.delete_volume(&n)).await?;
    Ok(Json(json!({"deleted": name})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Promote {
    reverse_to: Option<String>,
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Takeover {
    volumes: Vec<String>,
    #[serde(default)]
    shares: Vec<String>,
    reverse_to: Option<String>,
    mode: Option<String>,
}

/// Cutover's commit point on the target, for all of a workload's volumes.
async fn takeover(State(ctx): Ctx, Path(name): Path<String>, Body(r): Body<Takeover>) -> ApiResult {
    let mode = parse_mode(r.mode.as_deref())?;
    let promoted = blocking(move || {
        ctx.commit_takeover(&name, &r.volumes, &r.shares, r.reverse_to.as_deref(), mode)
    })
    .await?;
    let promoted: Vec<Value> = promoted
        .into_iter()
        .map(|(v, g)| json!({"name": v, "generation": format!("{g:016x}")}))
        .collect();
    Ok(Json(json!({"promoted": promoted})))
}

async fn promote_volume(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Body(r): Body<Promote>,
) -> ApiResult {
    let mode = parse_mode(r.mode.as_deref())?;
    let n = name.clone();
    let generation =
        blocking(move || ctx.promote_volume(&n, r.reverse_to.as_deref(), mode)).await?;
    Ok(Json(
        json!({"promoted": name, "generation": format!("{generation:016x}")}),
    ))
}

/// A comparison found this replica different: it is not usable until resynced.
async fn mark_inconsistent(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    let n = name.clone();
    blocking(move || {
        let s = ctx
            .replica(&n)
            .ok_or_else(|| anyhow::anyhow!("{n:?} is not a replica here"))?;
        s.meta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .update(|m| m.consistent = false)?;
        tracing::warn!(volume = %n, "replica.inconsistent: a comparison found it different; resyncing");
        Ok(())
    })
    .await?;
    Ok(Json(json!({"inconsistent": name})))
}

async fn workloads(State(ctx): Ctx) -> ApiResult {
    let list = blocking(move || crate::migrate::list_workloads(&ctx.cfg.data_dir)).await?;
    Ok(Json(serde_json::to_value(list).unwrap_or(Value::Null)))
}

fn not_found(what: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, what)
}

async fn workload(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    let n = name.clone();
    let w = blocking(move || crate::migrate::load_workload(&ctx.cfg.data_dir, &n)).await?;
    let w = w.ok_or_else(|| not_found(format!("no workload {name:?} here")))?;
    Ok(Json(serde_json::to_value(w).unwrap_or(Value::Null)))
}

async fn create_workload(
    State(ctx): Ctx,
    Body(spec): Body<crate::migrate::WorkloadSpec>,
) -> ApiResult {
    let v = serde_json::to_value(&spec).unwrap_or(Value::Null);
    blocking(move || {
        spec.validate()?;
        if crate::migrate::load_workload(&ctx.cfg.data_dir, &spec.name)?.is_some() {
            anyhow::bail!(
                "workload {:?} exists; change it with PUT or delete it first",
                spec.name
            );
        }
        for vol in &spec.volumes {
            if ctx.primary(vol).is_none() {
                anyhow::bail!(
                    "volume {vol:?} is not a primary on node {}; create it first",
                    ctx.identity.node_name
                );
            }
        }
        crate::migrate::save_workload(&ctx.cfg.data_dir, &spec)
    })
    .await?;
    Ok(Json(v))
}

/// Stores a definition as given (a migration's source copies it here).
async fn cluster_status(State(ctx): Ctx) -> ApiResult {
    Ok(Json(ctx.cluster.json(&ctx)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterAdd {
    workload: ferry_core::Name,
    preferred: String,
    #[serde(default)]
    accept_loss: bool,
    #[serde(default)]
    forwarded: bool,
}

/// `ferry cluster add`: puts a workload under HA on both nodes, keeping its
/// current primary and adopting its replication (or starting it).
async fn cluster_add(State(ctx): Ctx, Body(r): Body<ClusterAdd>) -> ApiResult {
    let v = blocking(move || {
        let Some(cfg) = ctx.cfg.cluster.clone() else {
            anyhow::bail!(
                "node {} has no [cluster] table in its config: add one (peer, heartbeat, witness) and restart it",
                ctx.identity.node_name
            );
        };
        let me = ctx.identity.node_name.clone();
        if r.preferred != me && r.preferred != cfg.peer {
            anyhow::bail!("--preferred must be {me} or {}", cfg.peer);
        }
        let peer = ctx.peers.get(&cfg.peer).ok_or_else(|| {
            anyhow::anyhow!("peer {} is not registered yet: run `ferry node add {}` first", cfg.peer, cfg.peer)
        })?;
        let spec = crate::migrate::load_workload(&ctx.cfg.data_dir, &r.workload)?
            .ok_or_else(|| anyhow::anyhow!("workload {:?} is not defined on node {me}", r.workload))?;
        let store = crate::share::ShareStore::new(&ctx.cfg.data_dir);
        let share_role = |s: &str| store.load(s).map(|r| r.role).unwrap_or_default();
        let primaries = spec.volumes.iter().filter(|v| ctx.primary(v).is_some()).count()
            + spec.shares.iter().filter(|s| ctx.shares.primary(s).is_some()).count();
        let replicas = spec.volumes.iter().filter(|v| ctx.replica(v).is_some()).count()
            + spec.shares.iter().filter(|s| share_role(s) == "replica").count();
        let members = spec.volumes.len() + spec.shares.len();
        let role = if primaries == members {
            ferry_core::cluster::Role::Primary
        } else if replicas == members {
            ferry_core::cluster::Role::Secondary
        } else {
            anyhow::bail!(
                "workload {:?}: its volumes and shares must all be primaries or all be replicas on node {me}",
                r.workload
            );
        };
        if role == ferry_core::cluster::Role::Primary {
            for s in &spec.shares {
                let to = store.load(s)?.peer;
                if to.as_deref() != Some(cfg.peer.as_str()) {
                    anyhow::bail!(
                        "share {s:?} replicates to {}, not to the cluster peer {}: create it with --to {}",
                        to.as_deref().unwrap_or("no node"),
                        cfg.peer,
                        cfg.peer
                    );
                }
            }
        }
        if role == ferry_core::cluster::Role::Primary {
            // Adopt the replication to the peer, or start it.
            for v in &spec.volumes {
                let p = ctx.primary(v).ok_or_else(|| {
                    anyhow::anyhow!("volume {v:?} stopped being served here while the workload was being added; try again")
                })?;
                let to = p.link.lock().peer.clone();
                match to {
                    Some(to) if to == cfg.peer => {}
                    Some(other) => anyhow::bail!(
                        "volume {v:?} replicates to {other}, not to the cluster peer {}",
                        cfg.peer
                    ),
                    None => ctx.start_replication(v, &cfg.peer, ferry_core::link::Mode::Sync, None, false)?,
                }
            }
        }
        let h = crate::cluster::HaWorkload {
            workload: r.workload.clone(),
            preferred: r.preferred.clone(),
            accept_loss: r.accept_loss,
            state: crate::cluster::load(&ctx.cfg.data_dir, &r.workload)
                .map(|h| h.state)
                .unwrap_or(ferry_core::cluster::Persisted {
                    role,
                    epoch: 0,
                    candidate: false,
                }),
        };
        if !r.forwarded {
            let c = crate::api::client::ApiClient::to_peer(&ctx.identity, &peer)?;
            c.put(
                &format!("/api/v1/workloads/{}?forwarded=true", spec.name),
                &serde_json::to_value(&spec)?,
            )
            .map_err(|e| e.context(format!("cannot give the workload definition to {}", cfg.peer)))?;
            c.post(
                "/api/v1/cluster/workloads",
                &json!({"workload": r.workload, "preferred": r.preferred,
                        "accept_loss": r.accept_loss, "forwarded": true}),
            )
            .map_err(|e| e.context(format!("{} refused to manage the workload", cfg.peer)))?;
        }
        crate::cluster::save(&ctx.cfg.data_dir, &h)?;
        tracing::info!(workload = %h.workload, preferred = %h.preferred, role = ?h.state.role, "cluster.workload.added");
        Ok(json!({"workload": h.workload, "preferred": h.preferred, "role": h.state.role}))
    })
    .await?;
    Ok(Json(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Standby {
    node: String,
    standby: bool,
}

/// `ferry cluster standby|unstandby NODE`, asked of either node.
async fn cluster_standby(State(ctx): Ctx, Body(r): Body<Standby>) -> ApiResult {
    let v = blocking(move || {
        if r.node == ctx.identity.node_name {
            return crate::cluster::set_standby(&ctx, r.standby);
        }
        let peer = ctx.peers.get(&r.node).ok_or_else(|| {
            anyhow::anyhow!("{} is neither this node nor a registered peer", r.node)
        })?;
        crate::api::client::ApiClient::to_peer(&ctx.identity, &peer)?.post(
            "/api/v1/cluster/standby",
            &json!({"node": r.node, "standby": r.standby}),
        )
    })
    .await?;
    Ok(Json(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForcePromote {
    #[serde(default)]
    force: bool,
    /// Asked by the peer's split-brain policy (not an operator).
    #[serde(default)]
    by_policy: bool,
}

async fn cluster_promote(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Body(r): Body<ForcePromote>,
) -> ApiResult {
    if !r.force {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "a promotion by hand needs --force (it may lose writes or split the brain); a planned move is `ferry cluster switchover`".into(),
        ));
    }
    let v = blocking(move || crate::cluster::force_promote(&ctx, &name, r.by_policy)).await?;
    Ok(Json(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resolve {
    keep: String,
    #[serde(default)]
    histories: Option<Value>,
}

async fn cluster_resolve(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Body(r): Body<Resolve>,
) -> ApiResult {
    let v = blocking(move || {
        crate::cluster::resolve_split_brain(&ctx, &name, &r.keep, r.histories.as_ref())
    })
    .await?;
    Ok(Json(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DropCopy {
    node: String,
}

async fn cluster_drop_copy(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Body(r): Body<DropCopy>,
) -> ApiResult {
    let v = blocking(move || {
        if r.node == ctx.identity.node_name {
            return crate::cluster::drop_copies(&ctx, &name);
        }
        let peer = ctx.peers.get(&r.node).ok_or_else(|| {
            anyhow::anyhow!("{} is neither this node nor a registered peer", r.node)
        })?;
        crate::api::client::ApiClient::to_peer(&ctx.identity, &peer)?.post(
            &format!("/api/v1/cluster/workloads/{name}/drop-copy"),
            &json!({"node": r.node}),
        )
    })
    .await?;
    Ok(Json(v))
}

async fn cluster_switchover(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    let v = blocking(move || crate::cluster::switchover(&ctx, &name)).await?;
    Ok(Json(v))
}

#[derive(Deserialize, Default)]
struct ForwardedQuery {
    #[serde(default)]
    forwarded: bool,
}

/// `ferry cluster remove`: the workload leaves HA on both nodes (its data,
/// replication and definition stay).
async fn cluster_remove(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Query(q): Query<ForwardedQuery>,
) -> ApiResult {
    let v = blocking(move || {
        if !q.forwarded {
            if let Some(peer) = ctx.cfg.cluster.as_ref().and_then(|c| ctx.peers.get(&c.peer)) {
                let c = crate::api::client::ApiClient::to_peer(&ctx.identity, &peer)?;
                if let Err(e) = c.delete(&format!("/api/v1/cluster/workloads/{name}?forwarded=true")) {
                    tracing::warn!(workload = %name, error = %format!("{e:#}"), "cluster.remove.peer_unreachable");
                }
            }
        }
        let removed = crate::cluster::remove(&ctx.cfg.data_dir, &name)?;
        if !removed && !q.forwarded {
            anyhow::bail!("workload {name:?} is not under HA on this node");
        }
        Ok(json!({"workload": name, "removed": removed}))
    })
    .await?;
    Ok(Json(v))
}

async fn put_workload(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Query(q): Query<PutQuery>,
    Body(spec): Body<crate::migrate::WorkloadSpec>,
) -> ApiResult {
    if spec.name != name {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body names workload {:?}, the path {name:?}", spec.name),
        ));
    }
    let forwarded = q.forwarded;
    let v = blocking(move || {
        spec.validate()?;
        crate::migrate::save_workload(&ctx.cfg.data_dir, &spec)?;
        // Changed through either node, kept the same on both: pass it on to
        // every peer that holds this workload.
        let mut updated = vec![ctx.identity.node_name.clone()];
        if !forwarded {
            for p in ctx.peers.list() {
                let c = crate::api::client::ApiClient::to_peer(&ctx.identity, &p)?;
                if c.get(&format!("/api/v1/workloads/{}", spec.name)).is_err() {
                    continue;
                }
                c.put(
                    &format!("/api/v1/workloads/{}?forwarded=true", spec.name),
                    &serde_json::to_value(&spec)?,
                )
                .map_err(|e| {
                    e.context(format!(
                        "saved here, but node {} did not take the change",
                        p.name
                    ))
                })?;
                updated.push(p.name.clone());
            }
        }
        let mut v = serde_json::to_value(&spec)?;
        v["updated_on"] = json!(updated);
        Ok(v)
    })
    .await?;
    Ok(Json(v))
}

#[derive(Deserialize, Default)]
struct PutQuery {
    #[serde(default)]
    forwarded: bool,
}

async fn delete_workload(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    let n = name.clone();
    let c = ctx.clone();
    if c.migrations()
        .get(&name)
        .is_some_and(|m| !m.state.phase.is_final())
    {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("workload {name:?} is migrating"),
        ));
    }
    let deleted = blocking(move || crate::migrate::delete_workload(&ctx.cfg.data_dir, &n)).await?;
    if !deleted {
        return Err(not_found(format!("no workload {name:?} here")));
    }
    Ok(Json(json!({"deleted": name})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HookReq {
    role: Option<String>,
}

async fn run_workload_hook(
    State(ctx): Ctx,
    Path((name, which)): Path<(String, String)>,
    Body(r): Body<HookReq>,
) -> ApiResult {
    if !matches!(which.as_str(), "start" | "stop" | "check") {
        return Err(not_found(format!(
            "no hook {which:?}: start, stop or check"
        )));
    }
    let run = blocking(move || {
        let spec = crate::migrate::load_workload(&ctx.cfg.data_dir, &name)?.ok_or_else(|| {
            anyhow::anyhow!("no workload {name:?} on node {}", ctx.identity.node_name)
        })?;
        Ok(crate::migrate::workload_hook(
            &ctx,
            &spec,
            &which,
            r.role.as_deref().unwrap_or("primary"),
        ))
    })
    .await?;
    Ok(Json(json!({"run": run})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartMigration {
    workload: String,
    to: String,
    mode: Option<String>,
    max_rate_bytes_per_s: Option<u64>,
    #[serde(default)]
    auto_converge: bool,
    #[serde(default)]
    auto_cutover: bool,
    /// With `auto_cutover`: only inside this maintenance window…
    window: Option<String>,
    /// …and not after this (RFC 3339).
    deadline: Option<String>,
}

async fn start_migration(State(ctx): Ctx, Body(r): Body<StartMigration>) -> ApiResult {
    let mode = parse_mode(r.mode.as_deref())?;
    let window =
        (r.window.is_some() || r.deadline.is_some()).then(|| crate::schedule::ScheduleRequest {
            at: None,
            window: r.window.clone(),
            deadline: r.deadline.clone(),
        });
    blocking(move || {
        crate::migrate::start(
            &ctx,
            &r.workload,
            &r.to,
            crate::migrate::StartOptions {
                mode,
                max_rate: r.max_rate_bytes_per_s,
                auto_converge: r.auto_converge,
                auto_cutover: r.auto_cutover,
                window,
            },
        )
    })
    .await
    .map(Json)
}

async fn migrations(State(ctx): Ctx) -> ApiResult {
    blocking(move || crate::migrate::statuses(&ctx))
        .await
        .map(Json)
}

async fn migration(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    blocking(move || crate::migrate::status(&ctx, &name))
        .await
        .map_err(|e| ApiError(StatusCode::NOT_FOUND, e.1))
        .map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reverse {
    target: String,
    mode: Option<String>,
}

async fn reverse_migration(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Body(r): Body<Reverse>,
) -> ApiResult {
    let mode = r.mode.unwrap_or_else(|| "sync".into());
    let n = name.clone();
    blocking(move || crate::migrate::record_reverse(&ctx, &n, &r.target, &mode)).await?;
    Ok(Json(json!({"reverse": name})))
}

async fn cutover_all(State(ctx): Ctx) -> ApiResult {
    blocking(move || crate::migrate::cutover_all(&ctx))
        .await
        .map(Json)
}

async fn set_migration(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Body(r): Body<SetReplication>,
) -> ApiResult {
    blocking(move || crate::migrate::set_rate(&ctx, &name, r.max_rate_bytes_per_s))
        .await
        .map(Json)
}

async fn rollback(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    blocking(move || crate::migrate::rollback(&ctx, &name))
        .await
        .map(Json)
}

async fn finalize(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    blocking(move || crate::migrate::finalize(&ctx, &name))
        .await
        .map(Json)
}

/// Test cutover, on the source.
async fn start_test(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    blocking(move || crate::migrate::test_start(&ctx, &name))
        .await
        .map(Json)
}

async fn end_test(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    blocking(move || crate::migrate::test_end(&ctx, &name))
        .await
        .map(Json)
}

/// Test cutover, on the target: arm a replica's snapshot.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ArmSnapshot {
    token: u64,
}

async fn arm_snapshot(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Body(r): Body<ArmSnapshot>,
) -> ApiResult {
    let n = name.clone();
    blocking(move || crate::migrate::test_arm_here(&ctx, &n, r.token)).await?;
    Ok(Json(json!({"armed": name})))
}

/// Test cutover, on the target: start the test instance.
async fn start_test_here(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    blocking(move || crate::migrate::test_start_here(&ctx, &name))
        .await
        .map(Json)
}

async fn end_test_here(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    blocking(move || crate::migrate::test_end_here(&ctx, &name))
        .await
        .map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CutoverReq {
    #[serde(default = "yes")]
    reverse_on_failure: bool,
}

fn yes() -> bool {
    true
}

async fn cutover(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Body(r): Body<CutoverReq>,
) -> ApiResult {
    blocking(move || crate::migrate::cutover_with(&ctx, &name, r.reverse_on_failure))
        .await
        .map(Json)
}

/// Schedules a cutover (`--at`, `--window`, `--deadline`).
async fn schedule_cutover(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Body(r): Body<crate::schedule::ScheduleRequest>,
) -> ApiResult {
    blocking(move || crate::schedule::set(&ctx, &name, &r))
        .await
        .map(Json)
}

async fn cancel_cutover(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    blocking(move || crate::schedule::cancel(&ctx, &name))
        .await
        .map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateReplica {
    volume: String,
    volume_id: String,
    size_bytes: u64,
    primary: String,
}

async fn create_replica(State(ctx): Ctx, Body(r): Body<CreateReplica>) -> ApiResult {
    let name = r.volume.clone();
    blocking(move || ctx.create_replica(&r.volume, &r.volume_id, r.size_bytes, &r.primary)).await?;
    Ok(Json(json!({"replica": name})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartReplication {
    volume: String,
    to: String,
    mode: Option<String>,
    max_rate_bytes_per_s: Option<u64>,
    #[serde(default)]
    checksum: bool,
}

fn parse_mode(s: Option<&str>) -> Result<Mode, ApiError> {
    match s.unwrap_or("sync") {
        "sync" => Ok(Mode::Sync),
        "async" => Ok(Mode::Async),
        other => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("mode {other:?}: use sync or async"),
        )),
    }
}

async fn start_replication(State(ctx): Ctx, Body(r): Body<StartReplication>) -> ApiResult {
    let mode = parse_mode(r.mode.as_deref())?;
    let c = ctx.clone();
    let name = r.volume.clone();
    ctx.adopt_volume(&name);
    blocking(move || {
        c.start_replication(&r.volume, &r.to, mode, r.max_rate_bytes_per_s, r.checksum)
    })
    .await?;
    status_of(&ctx, &name).map(Json)
}

fn phase_str(p: Phase) -> &'static str {
    match p {
        Phase::Disconnected => "disconnected",
        Phase::Resyncing => "resyncing",
        Phase::Streaming => "connected",
        Phase::SplitBrain => "split-brain",
    }
}

/// The status document of one volume (docs/status.md describes it).
pub fn status_of(ctx: &Arc<AgentCtx>, name: &str) -> Result<Value, ApiError> {
    ctx.adopt_volume(name);
    if let Some(v) = ctx.primary(name) {
        let l = v.link.lock();
        let st = l.rep.status();
        let total = l.stats.resync_total_bytes.max(st.dirty_bytes);
        let synced_percent = if total == 0 {
            100.0
        } else {
            100.0 * (total - st.dirty_bytes.min(total)) as f64 / total as f64
        };
        let rate = l.stats.rate_bytes_per_s;
        let eta = if st.dirty_bytes == 0 {
            Some(0)
        } else if rate > 1.0 {
            Some((st.dirty_bytes as f64 / rate).ceil() as u64)
        } else {
            None
        };
        return Ok(json!({
            "volume": v.name,
            "role": "primary",
            "peer": l.peer,
            "stream": l.link_group,
            "mode": if l.rep.config().mode == Mode::Sync { "sync" } else { "async" },
            "link": if l.stats.split_brain { "split-brain" } else { phase_str(st.phase) },
            "state": st.replica.as_str(),
            "synced_percent": (synced_percent * 10.0).round() / 10.0,
            "dirty_bytes": st.dirty_bytes,
            "backlog_bytes": st.backlog_bytes,
            "behind": st.behind,
            "bytes_sent": l.stats.bytes_sent,
            "copy_bytes_sent": l.stats.copy_bytes_sent,
            "write_bytes_sent": l.stats.write_bytes_sent,
            "rate_bytes_per_s": rate.round() as u64,
            "eta_seconds": eta,
            "max_rate_bytes_per_s": l.max_rate_bytes_per_s,
            "merkle_stale_blocks": v.leaves.stale_blocks(),
            "last_error": l.stats.last_error,
        }));
    }
    if let Some(s) = ctx.replica(name) {
        let m = s.meta.lock().unwrap_or_else(|p| p.into_inner());
        return Ok(json!({
            "volume": s.name,
            "role": "secondary",
            "peer": m.state().peer,
            "state": if m.state().consistent { "up-to-date" } else { "inconsistent" },
            "received_seq": s.received_seq.load(std::sync::atomic::Ordering::Relaxed),
            "bytes_applied": s.bytes_applied.load(std::sync::atomic::Ordering::Relaxed),
            "merkle_stale_blocks": s.leaves.stale_blocks(),
            "last_error": *s.last_error.lock().unwrap_or_else(|p| p.into_inner()),
        }));
    }
    Err(ApiError(
        StatusCode::NOT_FOUND,
        format!(
            "no volume named {name:?} on node {}",
            ctx.identity.node_name
        ),
    ))
}

async fn replications(State(ctx): Ctx) -> ApiResult {
    let mut out = Vec::new();
    for v in ctx.primaries() {
        if v.link.lock().peer.is_some() {
            out.push(status_of(&ctx, &v.name)?);
        }
    }
    for s in ctx.replicas() {
        out.push(status_of(&ctx, &s.name)?);
    }
    Ok(Json(json!(out)))
}

/// `?wait_state=S&wait_ms=N`: answer once the state is S, or after N ms
/// (at most [`STATUS_WAIT_MS_MAX`]) with the status as it is then; a
/// waiting client learns of the change within [`STATUS_WAIT_POLL_MS`]
/// instead of its own polling interval.
#[derive(Deserialize)]
struct StatusWait {
    wait_state: Option<String>,
    wait_ms: Option<u64>,
}

/// Longest a status request waits for a state (the client asks again).
const STATUS_WAIT_MS_MAX: u64 = 5_000;
/// How often a waiting status request looks at the state.
const STATUS_WAIT_POLL_MS: u64 = 2;

impl StatusWait {
    /// Looks at `state` (cheap) until it is the one waited for or the wait
    /// is over, then answers with `status` (the whole status, once).
    async fn wait<S, Fut>(&self, mut state: S, status: Fut) -> ApiResult
    where
        S: FnMut() -> Option<String>,
        Fut: std::future::Future<Output = Result<Value, ApiError>>,
    {
        if let Some(want) = self.wait_state.as_deref() {
            let deadline = Instant::now()
                + Duration::from_millis(self.wait_ms.unwrap_or(0).min(STATUS_WAIT_MS_MAX));
            while Instant::now() < deadline && state().as_deref() != Some(want) {
                tokio::time::sleep(Duration::from_millis(STATUS_WAIT_POLL_MS)).await;
            }
        }
        status.await.map(Json)
    }
}

/// A volume's replication state as its status names it (no other work).
fn replication_state(ctx: &AgentCtx, name: &str) -> Option<String> {
    if let Some(v) = ctx.primary(name) {
        return Some(v.link.lock().rep.replica_state().as_str().to_string());
    }
    let s = ctx.replica(name)?;
    let m = s.meta.lock().unwrap_or_else(|p| p.into_inner());
    Some(
        if m.state().consistent {
            "up-to-date"
        } else {
            "inconsistent"
        }
        .to_string(),
    )
}

async fn replication(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Query(w): Query<StatusWait>,
) -> ApiResult {
    if w.wait_state.is_some() {
        ctx.adopt_volume(&name);
    }
    w.wait(|| replication_state(&ctx, &name), async {
        status_of(&ctx, &name)
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetReplication {
    max_rate_bytes_per_s: Option<u64>,
}

async fn set_replication(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Body(r): Body<SetReplication>,
) -> ApiResult {
    let v = ctx.primary(&name).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("{name:?} is not a primary here"),
        )
    })?;
    v.link.lock().max_rate_bytes_per_s = r.max_rate_bytes_per_s.filter(|&x| x > 0);
    status_of(&ctx, &name).map(Json)
}

async fn stop_replication(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    let c = ctx.clone();
    let n = name.clone();
    blocking(move || c.stop_replication(&n)).await?;
    status_of(&ctx, &name).map(Json)
}

/// Block hashes of a volume: from the leaf cache (current for every write
/// that went through ferry), or with `?fresh=1` by reading the whole image —
/// for an old copy ferry did not write (checksum resync) and for `verify`.
/// A volume's data history here: `ids` is [current, ancestors…].
async fn generation(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    let g = if let Some(p) = ctx.primary(&name) {
        p.meta_state().generation
    } else if let Some(s) = ctx.replica(&name) {
        s.meta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state()
            .generation
            .clone()
    } else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no volume {name:?} on node {}", ctx.identity.node_name),
        ));
    };
    let mut ids = vec![g.current()];
    ids.extend(g.ancestors());
    Ok(Json(json!({"volume": name, "ids": ids})))
}

async fn hashes(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let g = ctx.cfg.replication.granularity_bytes;
    let fresh = q.get("fresh").is_some_and(|v| v == "1" || v == "true");
    // `warm=1`: bring the cached leaves up to date, send none of them.
    let warm = q.get("warm").is_some_and(|v| v == "1" || v == "true");
    let leaves = blocking(move || {
        use crate::volume::verify::leaf_hashes;
        if let Some(p) = ctx.primary(&name) {
            if fresh {
                leaf_hashes(&p.local, g)
            } else {
                Ok(p.leaves.current(&p.local)?)
            }
        } else if let Some(s) = ctx.replica(&name) {
            if fresh {
                leaf_hashes(&s.dev, g)
            } else {
                Ok(s.leaves.current(&s.dev)?)
            }
        } else {
            anyhow::bail!("no volume named {name:?} here");
        }
    })
    .await?;
    if warm {
        return Ok(Json(
            json!({"granularity_bytes": g, "leaves": leaves.len()}),
        ));
    }
    Ok(Json(
        json!({"granularity_bytes": g, "hashes": leaves.iter().map(|h| h.to_hex().to_string()).collect::<Vec<_>>()}),
    ))
}

async fn verify(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    let result =
        blocking(move || ctx.verify_volume(&name, Duration::from_secs(60), Instant::now())).await?;
    Ok(Json(result))
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateShare {
    name: String,
    path: std::path::PathBuf,
    mode: String,
    to: Option<String>,
}

async fn create_share(State(ctx): Ctx, Body(r): Body<CreateShare>) -> ApiResult {
    let c = ctx.clone();
    let name = r.name.clone();
    blocking(move || {
        let _admin = c.admin();
        if let Some(to) = &r.to {
            if c.peers.get(to).is_none() {
                anyhow::bail!("node {to:?} is not registered (ferry node add)");
            }
        }
        let rec = crate::share::ShareRecord {
            name: crate::share::check_name(&r.name)?,
            id: format!("{:016x}", crate::share::random_u64()),
            mode: r.mode.clone(),
            path: r.path.clone(),
            role: "primary".into(),
            peer: r.to.clone(),
            generation: crate::share::random_u64(),
            clean: true,
            level_at: 0,
            received_at: 0,
            suspect_since: None,
            level_exact: false,
            bind_data: false,
        };
        let store = crate::share::ShareStore::new(&c.cfg.data_dir);
        store.create(&rec)?;
        let rec_name = rec.name.clone();
        if let Err(e) = crate::share::start_primary(&c, rec) {
            // Nothing was served: leave no half-made share behind.
            let _ = std::fs::remove_dir_all(store.dir(&rec_name));
            return Err(e);
        }
        Ok(())
    })
    .await?;
    let st = blocking(move || Ok(crate::share::status(&ctx, &name, true)?)).await?;
    Ok(Json(serde_json::to_value(st).unwrap_or(Value::Null)))
}

async fn shares(State(ctx): Ctx) -> ApiResult {
    let list = blocking(move || {
        let store = crate::share::ShareStore::new(&ctx.cfg.data_dir);
        let mut out = Vec::new();
        for n in store.list() {
            // One damaged share must not hide the others: it is set aside
            // and listed under `damaged` in the node's status.
            match crate::share::status(&ctx, &n, true) {
                Ok(s) => {
                    ctx.damaged.clear("share", &n);
                    out.push(s)
                }
                Err(e @ crate::share::ShareError::Damaged { .. }) => {
                    ctx.damaged
                        .report("share", &n, &store.root().join(&n), e.to_string())
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    })
    .await?;
    Ok(Json(serde_json::to_value(list).unwrap_or(Value::Null)))
}

/// This node's copy entry by entry, files read whole (`share verify`).
async fn share_files(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    Ok(Json(
        blocking(move || crate::share::files(&ctx, &name)).await?,
    ))
}

#[derive(Deserialize, Default)]
struct ShareVerify {
    timeout_ms: Option<u64>,
}

/// `ferry share verify`: compare with the replica, entry by entry.
async fn share_verify(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Body(r): Body<ShareVerify>,
) -> ApiResult {
    let timeout = Duration::from_millis(r.timeout_ms.unwrap_or(600_000));
    Ok(Json(
        blocking(move || crate::share::verify(&ctx, &name, timeout)).await?,
    ))
}

/// The digest of this node's copy (a switchover compares both nodes').
async fn share_digest(State(ctx): Ctx, Path(name): Path<String>) -> ApiResult {
    Ok(Json(
        blocking(move || crate::share::digest(&ctx, &name)).await?,
    ))
}

async fn share_status(
    State(ctx): Ctx,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    Query(w): Query<StatusWait>,
) -> ApiResult {
    // `counts=0`: skip walking the tree for files and bytes.
    let counts = !q.get("counts").is_some_and(|v| v == "0" || v == "false");
    // Looked at without walking the tree (its record is one small file).
    let state = || {
        crate::share::status(&ctx, &name, false)
            .ok()
            .map(|s| s.state)
    };
    let status = async {
        let (ctx, name) = (ctx.clone(), name.clone());
        let st = blocking(move || Ok(crate::share::status(&ctx, &name, counts)?)).await?;
        Ok(serde_json::to_value(st).unwrap_or(Value::Null))
    };
    w.wait(state, status).await
}
