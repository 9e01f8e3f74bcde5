//! One entry point for every API action: [`execute`] takes a decoded
//! [`Action`] and answers its typed [`Reply`] or an [`ActionError`] whose
//! kind is the HTTP status. The REST server (`api/server.rs`) only decodes,
//! gates and encodes; what each action does is here, calling the engines.
//!
//! Replies built by functions that still answer a `serde_json::Value`
//! (migration, cluster, share internals) are read into their typed struct
//! by [`typed`], which in debug builds also checks that nothing is lost on
//! the way (a field added there but not to the type fails the tests).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::reply::{self as r, Reply};
use ferry_api::request as q;
use ferry_api::{Action, ActionError, Authority, ErrorKind, NodeState, Role};
use ferry_core::link::{Mode, Phase};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::agent::AgentCtx;

use crate::transport::client::ApiClient;
use crate::transport::peers::Peer;

/// Who asked, as the API's authentication established it.
#[derive(Debug, Clone)]
pub struct Asker {
    pub authority: Authority,
    /// The certificate the caller presented (its key proven by TLS).
    pub cert_fingerprint: Option<String>,
    /// The registered peer that certificate belongs to.
    pub peer: Option<String>,
    /// The client's address.
    pub addr: Option<std::net::SocketAddr>,
    /// The operation id a peer sent with its call (`x-ferry-op`): its part
    /// of a handover, recorded here under the same id.
    pub op: Option<String>,
}

/// The operation id in a request's headers, if it is one.
pub fn op_header(h: &axum::http::HeaderMap) -> Option<String> {
    let op = h.get(crate::transport::client::OP_HEADER)?.to_str().ok()?;
    let ok = !op.is_empty()
        && op.len() <= 64
        && op.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    ok.then(|| op.to_string())
}

/// The kind of failure anywhere in `e`'s chain: an [`ActionError`]'s own,
/// a token or volume error's (unknown → 404, exists → 409), else 400.
pub fn action_error(e: anyhow::Error) -> ActionError {
    use crate::agent::tokens::TokenError;
    use crate::volume::VolumeError;
    let kind = e
        .chain()
        .find_map(|c| {
            if let Some(a) = c.downcast_ref::<ActionError>() {
                return Some(a.kind);
            }
            match c.downcast_ref::<TokenError>() {
                Some(TokenError::Unknown(_)) => return Some(ErrorKind::NotFound),
                Some(TokenError::Exists(_) | TokenError::FileToken(_)) => {
                    return Some(ErrorKind::Conflict)
                }
                Some(_) => return Some(ErrorKind::Internal),
                None => {}
            }
            match c.downcast_ref::<VolumeError>()? {
                VolumeError::NotFound { .. } => Some(ErrorKind::NotFound),
                VolumeError::Exists { .. } | VolumeError::Busy { .. } => Some(ErrorKind::Conflict),
                _ => None,
            }
        })
        .unwrap_or(ErrorKind::BadInput);
    ActionError::new(kind, format!("{e:#}"))
}

type Res<T> = Result<T, ActionError>;

fn internal(m: impl Into<String>) -> ActionError {
    ActionError::new(ErrorKind::Internal, m)
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Res<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(action_error)
}

/// Runs `f` (an estimator action, typed errors) on the blocking pool.
async fn est_blocking<T: Send + 'static>(f: impl FnOnce() -> Res<T> + Send + 'static) -> Res<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal(e.to_string()))?
}

/// A reply an engine function built as JSON, as its type. In debug builds
/// (the tests) a reply that changes on the way — a field the type does not
/// know, a number of another kind — is an error naming both.
pub fn typed<T: Serialize + DeserializeOwned>(v: Value) -> Res<T> {
    let t: T = serde_json::from_value(v.clone()).map_err(|e| {
        internal(format!(
            "the reply does not fit its type {}: {e}: {v}",
            std::any::type_name::<T>()
        ))
    })?;
    if cfg!(debug_assertions) {
        let back = serde_json::to_value(&t).map_err(|e| internal(e.to_string()))?;
        if back != v {
            return Err(internal(format!(
                "the reply changes when typed as {}: built {v}, typed {back}",
                std::any::type_name::<T>()
            )));
        }
    }
    Ok(t)
}

/// A typed value as another type of the same shape (an engine's struct
/// as the API's).
fn convert<A: Serialize, B: Serialize + DeserializeOwned>(a: &A) -> Res<B> {
    typed(serde_json::to_value(a).map_err(|e| internal(e.to_string()))?)
}

/// What this node is, for the actions' `allowed_in`.
pub fn node_state(ctx: &AgentCtx) -> NodeState {
    if ctx.cfg.cluster.is_none() {
        NodeState::Standalone
    } else if crate::cluster::in_standby(&ctx.cfg.data_dir) {
        NodeState::Standby
    } else {
        NodeState::Clustered
    }
}

fn parse_mode(s: Option<&str>) -> Res<Mode> {
    match s.unwrap_or("sync") {
        "sync" => Ok(Mode::Sync),
        "async" => Ok(Mode::Async),
        other => Err(ActionError::bad_input(format!(
            "mode {other:?}: use sync or async"
        ))),
    }
}

/// Executes `action` for `who` (already authorized for it by the route
/// table's need and node states). An action that changes something (any
/// method but GET) is recorded in the audit log twice, under one
/// operation id: its request, durable before it runs (if that cannot be
/// written the action is refused, 503), and its result, durable before
/// the reply (if that cannot be written the reply is 500 saying the action
/// was done but its result not recorded).
pub async fn execute(ctx: &Arc<AgentCtx>, who: &Asker, action: Action) -> Res<Reply> {
    // The head exchange itself is not recorded (it changes only the heads
    // held for the peer, once a minute: it would bury the log).
    if action.method() == ferry_api::Method::Get || matches!(action, Action::PutAuditHead(_)) {
        return run(ctx, who, action, None).await;
    }
    let op = who.op.clone().unwrap_or_else(crate::audit::new_op_id);
    let rec = super::audit::action_record(who, &action, &op);
    // A peer-internal call (takeover, promote, snapshot arm, …) is a step
    // of a handover its node runs for an operator whose action that node
    // recorded durably before it began: here it is recorded like an
    // automatic decision, through the queue, so the handover's critical
    // path (the workload is frozen) never waits for this disk.
    if who.peer.is_some() && action.route().need == ferry_api::auth::Need::Peer {
        ctx.audit.decide(super::audit::phase(&rec, "request", None));
        let res = run(ctx, who, action, Some(&op)).await;
        let outcome = match &res {
            Ok(_) => serde_json::json!({"ok": true}),
            Err(e) => {
                serde_json::json!({"ok": false, "error": {"kind": e.kind, "status": e.kind.status(), "message": e.message}})
            }
        };
        ctx.audit
            .decide(super::audit::phase(&rec, "result", Some(outcome)));
        return res;
    }
    super::audit::record(ctx, super::audit::phase(&rec, "request", None))
        .await
        .map_err(|e| {
            ActionError::unavailable(format!(
                "refused: the audit log cannot record this action ({e}); nothing was done"
            ))
        })?;
    let res = run(ctx, who, action, Some(&op)).await;
    let outcome = match &res {
        Ok(_) => serde_json::json!({"ok": true}),
        Err(e) => {
            serde_json::json!({"ok": false, "error": {"kind": e.kind, "status": e.kind.status(), "message": e.message}})
        }
    };
    super::audit::record(ctx, super::audit::phase(&rec, "result", Some(outcome)))
        .await
        .map_err(|e| {
            internal(format!(
                "the action was {} but its result could not be recorded in the audit log: {e}",
                if res.is_ok() { "done" } else { "refused" }
            ))
        })?;
    res
}

/// Runs `f` with the peer calls it makes on this thread carrying `op`.
fn with_op<T>(op: Option<String>, f: impl FnOnce() -> T) -> T {
    crate::transport::client::with_op(op.as_deref(), f)
}

async fn run(ctx: &Arc<AgentCtx>, who: &Asker, action: Action, op: Option<&str>) -> Res<Reply> {
    let ctx = ctx.clone();
    let op = op.map(str::to_string);
    Ok(match action {
        Action::GetNode => Reply::Node(node_info(&ctx)),
        Action::ListNodes => Reply::Nodes(
            ctx.peers
                .list()
                .iter()
                .map(|p| peer_info(&ctx, p))
                .collect(),
        ),
        Action::GetConfig => Reply::Config(r::EffectiveConfig {
            node: ctx.identity.node_name.clone(),
            config: serde_json::to_value(&ctx.cfg).map_err(|e| internal(e.to_string()))?,
        }),
        Action::AddNode(req) => Reply::NodeAdded(add_node(ctx, req).await?),
        Action::Pair(p) => Reply::Paired(pair(ctx, who, p).await?),
        Action::Repin(req) => Reply::Repinned(repin(ctx, who, req).await?),
        Action::Rekey => Reply::Rekeyed(rekey(ctx).await?),
        Action::RotateToken => {
            let c = ctx.clone();
            blocking(move || c.identity.rotate_token()).await?;
            tracing::warn!("api.token_rotated");
            Reply::TokenRotated(r::TokenRotated {
                node: ctx.identity.node_name.clone(),
                token_file: crate::transport::identity::token_path(&ctx.cfg.data_dir)
                    .display()
                    .to_string(),
            })
        }
        Action::ListTokens => Reply::Tokens(convert(&ctx.tokens.list())?),
        Action::CreateToken(req) => {
            let name = ferry_core::Name::parse(&req.name)
                .map_err(|e| ActionError::bad_input(format!("token name: {e}")))?;
            let role: Role = req
                .role
                .parse()
                .map_err(|e: ferry_api::auth::UnknownRole| ActionError::bad_input(e.to_string()))?;
            let (c, n) = (ctx.clone(), name.clone());
            let token = blocking(move || Ok(c.tokens.create(&n, role)?)).await?;
            tracing::warn!(token = %name, %role, by = %who.authority.describe(), "api.token_created");
            Reply::TokenCreated(r::TokenCreated {
                name: name.to_string(),
                role,
                token,
                node: ctx.identity.node_name.clone(),
                scope: "node".into(),
            })
        }
        Action::RevokeToken { name } => {
            let (c, n) = (ctx.clone(), name.clone());
            blocking(move || Ok(c.tokens.revoke(&n)?)).await?;
            tracing::warn!(token = %name, by = %who.authority.describe(), "api.token_revoked");
            Reply::TokenRevoked(r::TokenRevoked {
                revoked: name.to_string(),
                node: ctx.identity.node_name.clone(),
            })
        }
        Action::ListVolumes => {
            let list = blocking(move || Ok(ctx.store.list()?)).await?;
            Reply::Volumes(convert(&list)?)
        }
        Action::CreateVolume(req) => {
            let c = ctx.clone();
            let name = req.name.clone();
            blocking(move || c.create_volume(&req.name, req.size_bytes)).await?;
            let info = blocking(move || Ok(ctx.store.info(&name)?)).await?;
            Reply::VolumeCreated(convert(&info)?)
        }
        Action::ImportImage(req) => {
            let c = ctx.clone();
            let (path, format, volume) = (req.path.clone(), req.format.clone(), req.volume.clone());
            let image =
                blocking(move || crate::agent::import::import_image(&c, &path, &format, &volume))
                    .await?;
            let info = blocking(move || Ok(ctx.store.info(req.volume.as_str())?)).await?;
            Reply::ImageImported(r::ImageImported {
                path: req.path,
                format: image.format.as_str().to_string(),
                size_bytes: info.size_bytes,
                volume: convert(&info)?,
            })
        }
        Action::DeleteVolume { name } => {
            let n = name.to_string();
            blocking(move || ctx.delete_volume(&n)).await?;
            Reply::VolumeDeleted(r::Deleted {
                deleted: name.to_string(),
            })
        }
        Action::VolumeHashes { name, query } => {
            Reply::Hashes(hashes(ctx, name.to_string(), query).await?)
        }
        Action::VolumeGeneration { name } => Reply::Generation(generation(&ctx, name.as_str())?),
        Action::VerifyVolume { name } => {
            let v =
                blocking(move || ctx.verify_volume(&name, Duration::from_secs(60), Instant::now()))
                    .await?;
            Reply::VolumeVerify(typed(v)?)
        }
        Action::PromoteVolume { name, req } => {
            let mode = parse_mode(req.mode.as_deref())?;
            let n = name.to_string();
            let generation =
                blocking(move || ctx.promote_volume(&n, req.reverse_to.as_deref(), mode)).await?;
            Reply::VolumePromoted(r::VolumePromoted {
                promoted: name.to_string(),
                generation: format!("{generation:016x}"),
            })
        }
        Action::ArmSnapshot { name, req } => {
            let n = name.to_string();
            blocking(move || crate::migration::test_arm_here(&ctx, &n, req.token)).await?;
            Reply::Armed(r::Armed {
                armed: name.to_string(),
            })
        }
        Action::PrepareVmIncoming { name, req } => {
            let ctx = ctx.clone();
            Reply::VmIncomingReady(
                blocking(move || ctx.prepare_vm_incoming(&name, &req.source)).await?,
            )
        }
        Action::CancelVmIncoming { name } => {
            let ctx = ctx.clone();
            Reply::VmIncomingCancelled(blocking(move || ctx.cancel_vm_incoming(&name)).await?)
        }
        Action::Takeover { name, req } => {
            let mode = parse_mode(req.mode.as_deref())?;
            let promoted = blocking(move || {
                let promoted = ctx.commit_takeover(
                    &name,
                    &req.volumes,
                    &req.shares,
                    req.reverse_to.as_deref(),
                    mode,
                )?;
                ctx.settle_incoming_at_commit(&name, req.vm_token.as_deref());
                anyhow::Ok(promoted)
            })
            .await?;
            Reply::TakenOver(r::TakenOver {
                promoted: promoted
                    .into_iter()
                    .map(|(v, g)| r::PromotedVolume {
                        name: v.to_string(),
                        generation: format!("{g:016x}"),
                    })
                    .collect(),
            })
        }
        Action::MarkInconsistent { name } => {
            let n = name.to_string();
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
            Reply::MarkedInconsistent(r::MarkedInconsistent {
                inconsistent: name.to_string(),
            })
        }
        Action::CreateReplica(req) => {
            let name = req.volume.clone();
            blocking(move || {
                ctx.create_replica(&req.volume, &req.volume_id, req.size_bytes, &req.primary)
            })
            .await?;
            Reply::ReplicaCreated(r::ReplicaCreated { replica: name })
        }
        Action::ListWorkloads => {
            let list = blocking(move || crate::workload::list_workloads(&ctx.cfg.data_dir)).await?;
            Reply::Workloads(convert(&list)?)
        }
        Action::CreateWorkload(spec) => Reply::WorkloadCreated(create_workload(ctx, spec).await?),
        Action::GetWorkload { name } => {
            let n = name.to_string();
            let w = blocking(move || crate::workload::load_workload(&ctx.cfg.data_dir, &n)).await?;
            let w =
                w.ok_or_else(|| ActionError::not_found(format!("no workload {name:?} here")))?;
            Reply::Workload(convert(&w)?)
        }
        Action::PutWorkload {
            name,
            forwarded,
            spec,
        } => Reply::WorkloadUpdated(put_workload(ctx, name, forwarded, spec).await?),
        Action::DeleteWorkload { name } => {
            if ctx
                .migrations()
                .get(name.as_str())
                .is_some_and(|m| !m.state.phase.is_final())
            {
                return Err(ActionError::conflict(format!(
                    "workload {name:?} is migrating"
                )));
            }
            let n = name.to_string();
            let deleted =
                blocking(move || crate::workload::delete_workload(&ctx.cfg.data_dir, &n)).await?;
            if !deleted {
                return Err(ActionError::not_found(format!("no workload {name:?} here")));
            }
            Reply::WorkloadDeleted(r::Deleted {
                deleted: name.to_string(),
            })
        }
        Action::StartTestHere { name } => Reply::TestStartedHere(typed(
            blocking(move || crate::migration::test_start_here(&ctx, &name)).await?,
        )?),
        Action::EndTestHere { name } => Reply::TestEndedHere(typed(
            blocking(move || crate::migration::test_end_here(&ctx, &name)).await?,
        )?),
        Action::RunHook { name, which, req } => {
            let run = blocking(move || {
                let spec =
                    crate::workload::load_workload(&ctx.cfg.data_dir, &name)?.ok_or_else(|| {
                        anyhow::anyhow!("no workload {name:?} on node {}", ctx.identity.node_name)
                    })?;
                Ok(crate::workload::workload_hook(
                    &ctx.hook_env(),
                    &spec,
                    which.as_str(),
                    req.role.as_deref().unwrap_or("primary"),
                ))
            })
            .await?;
            Reply::Hook(r::HookResult {
                run: run.as_ref().map(convert).transpose()?,
            })
        }
        Action::ListMigrations => Reply::Migrations(typed(
            blocking(move || crate::migration::statuses(&ctx)).await?,
        )?),
        Action::StartMigration(req) => {
            let mode = parse_mode(req.mode.as_deref())?;
            let window = (req.window.is_some() || req.deadline.is_some()).then(|| {
                crate::migration::schedule::ScheduleRequest {
                    at: None,
                    window: req.window.clone(),
                    deadline: req.deadline.clone(),
                }
            });
            let v = blocking(move || {
                crate::migration::start(
                    &ctx,
                    &req.workload,
                    &req.to,
                    crate::migration::StartOptions {
                        mode,
                        max_rate: req.max_rate_bytes_per_s,
                        auto_converge: req.auto_converge,
                        auto_cutover: req.auto_cutover,
                        window,
                        baseline: match (&req.seed, req.checksum) {
                            (Some(a), _) => crate::volume::Baseline::Seed(a.clone()),
                            (None, true) => crate::volume::Baseline::Checksum,
                            (None, false) => crate::volume::Baseline::Full,
                        },
                    },
                )
            })
            .await?;
            Reply::MigrationStarted(typed(v)?)
        }
        Action::GetMigration { name } => {
            let v = blocking(move || crate::migration::status(&ctx, &name))
                .await
                .map_err(|e| ActionError::not_found(e.message))?;
            Reply::Migration(typed(v)?)
        }
        Action::SetMigration { name, req } => Reply::MigrationSet(typed(
            blocking(move || crate::migration::set_rate(&ctx, &name, req.max_rate_bytes_per_s))
                .await?,
        )?),
        Action::CutoverAll => Reply::CutoverAll(typed(
            blocking(move || with_op(op, || crate::migration::cutover_all(&ctx))).await?,
        )?),
        Action::Cutover { name, req } => Reply::Cutover(typed(
            blocking(move || {
                with_op(op, || {
                    crate::migration::cutover_with(&ctx, &name, req.reverse_on_failure, req.cold)
                })
            })
            .await?,
        )?),
        Action::ScheduleCutover { name, req } => {
            let req = crate::migration::schedule::ScheduleRequest {
                at: req.at,
                window: req.window,
                deadline: req.deadline,
            };
            Reply::ScheduleSet(typed(
                blocking(move || crate::migration::schedule::set(&ctx, &name, &req)).await?,
            )?)
        }
        Action::CancelCutover { name } => Reply::ScheduleCancelled(typed(
            blocking(move || crate::migration::schedule::cancel(&ctx, &name)).await?,
        )?),
        Action::ReverseMigration { name, req } => {
            let mode = req.mode.unwrap_or_else(|| "sync".into());
            let n = name.to_string();
            blocking(move || crate::migration::record_reverse(&ctx, &n, &req.target, &mode))
                .await?;
            Reply::Reversed(r::Reversed {
                reverse: name.to_string(),
            })
        }
        Action::Rollback { name } => Reply::RolledBack(typed(
            blocking(move || crate::migration::rollback(&ctx, &name)).await?,
        )?),
        Action::Finalize { name } => Reply::Finalized(typed(
            blocking(move || crate::migration::finalize(&ctx, &name)).await?,
        )?),
        Action::StartTest { name } => Reply::TestStarted(typed(
            blocking(move || crate::migration::test_start(&ctx, &name)).await?,
        )?),
        Action::EndTest { name } => Reply::TestEnded(typed(
            blocking(move || crate::migration::test_end(&ctx, &name)).await?,
        )?),
        Action::ListReplications => {
            let mut out = Vec::new();
            for v in ctx.primaries() {
                if v.link.lock().peer.is_some() {
                    out.push(status_of(&ctx, &v.name)?);
                }
            }
            for s in ctx.replicas() {
                out.push(status_of(&ctx, &s.name)?);
            }
            Reply::Replications(out)
        }
        Action::StartReplication(req) => {
            let mode = parse_mode(req.mode.as_deref())?;
            let c = ctx.clone();
            let name = req.volume.clone();
            ctx.adopt_volume(&name);
            blocking(move || {
                c.start_replication(
                    &req.volume,
                    &req.to,
                    mode,
                    req.max_rate_bytes_per_s,
                    &if req.checksum {
                        crate::volume::Baseline::Checksum
                    } else {
                        crate::volume::Baseline::Full
                    },
                )
            })
            .await?;
            Reply::ReplicationStarted(status_of(&ctx, &name)?)
        }
        Action::GetReplication { name, wait } => {
            if wait.wait_state.is_some() {
                ctx.adopt_volume(&name);
            }
            wait_for(&wait, || replication_state(&ctx, &name)).await;
            Reply::Replication(status_of(&ctx, &name)?)
        }
        Action::SetReplication { name, req } => {
            let v = ctx
                .primary(&name)
                .ok_or_else(|| ActionError::not_found(format!("{name:?} is not a primary here")))?;
            v.link.lock().max_rate_bytes_per_s = req.max_rate_bytes_per_s.filter(|&x| x > 0);
            Reply::ReplicationSet(status_of(&ctx, &name)?)
        }
        Action::StopReplication { name } => {
            let (c, n) = (ctx.clone(), name.to_string());
            blocking(move || c.stop_replication(&n)).await?;
            Reply::ReplicationStopped(status_of(&ctx, &name)?)
        }
        Action::ListShares => Reply::Shares(list_shares(ctx).await?),
        Action::CreateShare(req) => Reply::ShareCreated(create_share(ctx, req).await?),
        Action::GetShare { name, counts, wait } => {
            // Looked at without walking the tree (its record is one small file).
            wait_for(&wait, || {
                crate::share::status(&ctx, &name, false)
                    .ok()
                    .map(|s| s.state)
            })
            .await;
            let st = blocking(move || Ok(crate::share::status(&ctx, &name, counts)?)).await?;
            Reply::Share(convert(&st)?)
        }
        Action::ShareDigest { name } => Reply::ShareDigest(typed(
            blocking(move || crate::share::digest(&ctx, &name)).await?,
        )?),
        Action::ShareFiles { name } => Reply::ShareFiles(typed(
            blocking(move || crate::share::files(&ctx, &name)).await?,
        )?),
        Action::VerifyShare { name, req } => {
            let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(600_000));
            Reply::ShareVerify(typed(
                blocking(move || crate::share::verify(&ctx, &name, timeout)).await?,
            )?)
        }
        Action::ClusterStatus => Reply::Cluster(typed(ctx.cluster.json(&ctx))?),
        Action::ClusterAdd(req) => Reply::ClusterAdded(cluster_add(ctx, req).await?),
        Action::ClusterRemove { name, forwarded } => {
            let v = blocking(move || {
                if !forwarded {
                    if let Some(peer) = ctx.cfg.cluster.as_ref().and_then(|c| ctx.peers.get(&c.peer)) {
                        let c = ApiClient::to_peer(&ctx.identity, &peer)?;
                        let again = Action::ClusterRemove {
                            name: name.clone(),
                            forwarded: true,
                        };
                        if let Err(e) = c.send(&again) {
                            tracing::warn!(workload = %name, error = %format!("{e:#}"), "cluster.remove.peer_unreachable");
                        }
                    }
                }
                let removed = crate::cluster::remove(&ctx.cfg.data_dir, &name)?;
                if !removed && !forwarded {
                    anyhow::bail!("workload {name:?} is not under HA on this node");
                }
                Ok(r::ClusterRemoved {
                    workload: name.to_string(),
                    removed,
                })
            })
            .await?;
            Reply::ClusterRemoved(v)
        }
        Action::ClusterStandby(req) => {
            let v = blocking(move || {
                if req.node == ctx.identity.node_name {
                    return Ok(typed::<r::StandbySet>(crate::cluster::set_standby(
                        &ctx,
                        req.standby,
                    )?)?);
                }
                let peer = ctx.peers.get(&req.node).ok_or_else(|| {
                    anyhow::anyhow!("{} is neither this node nor a registered peer", req.node)
                })?;
                match ApiClient::to_peer(&ctx.identity, &peer)?
                    .send(&Action::ClusterStandby(req))?
                {
                    Reply::Standby(s) => Ok(s),
                    other => Err(unexpected(other).into()),
                }
            })
            .await?;
            Reply::Standby(v)
        }
        Action::ClusterPromote { name, req } => {
            if !req.force {
                return Err(ActionError::bad_input("a promotion by hand needs --force (it may lose writes or split the brain); a planned move is `ferry cluster switchover`"));
            }
            Reply::ForcePromoted(typed(
                blocking(move || crate::cluster::force_promote(&ctx, &name, req.by_policy)).await?,
            )?)
        }
        Action::ClusterResolve { name, req } => {
            let histories = req
                .histories
                .map(|h| serde_json::to_value(h).unwrap_or(Value::Null));
            Reply::SplitBrainResolved(typed(
                blocking(move || {
                    crate::cluster::resolve_split_brain(&ctx, &name, &req.keep, histories.as_ref())
                })
                .await?,
            )?)
        }
        Action::ClusterDropCopy { name, req } => {
            let v = blocking(move || {
                if req.node == ctx.identity.node_name {
                    return Ok(typed::<r::CopiesDropped>(crate::cluster::drop_copies(
                        &ctx, &name,
                    )?)?);
                }
                let peer = ctx.peers.get(&req.node).ok_or_else(|| {
                    anyhow::anyhow!("{} is neither this node nor a registered peer", req.node)
                })?;
                match ApiClient::to_peer(&ctx.identity, &peer)?
                    .send(&Action::ClusterDropCopy { name, req })?
                {
                    Reply::CopiesDropped(d) => Ok(d),
                    other => Err(unexpected(other).into()),
                }
            })
            .await?;
            Reply::CopiesDropped(v)
        }
        Action::ClusterSwitchover { name } => {
            let from_peer = who.peer.is_some();
            blocking(move || with_op(op, || switchover(&ctx, &name, from_peer))).await?
        }
        Action::OpenApi => Reply::OpenApi(ferry_api::openapi::document()),
        Action::ListAudit { since } => {
            Reply::Audit(blocking(move || super::audit::list(&ctx, since.as_deref())).await?)
        }
        Action::VerifyAudit => {
            Reply::AuditVerified(blocking(move || super::audit::verify(&ctx)).await?)
        }
        Action::PutAuditHead(h) => {
            let node = who.peer.clone();
            Reply::AuditHeadKept(blocking(move || super::audit::put_head(&ctx, node, h)).await?)
        }
        Action::GetAuditHeads => {
            let node = who.peer.clone();
            Reply::AuditHeads(blocking(move || super::audit::held_heads(&ctx, node)).await?)
        }
        // Console sessions and the event stream are the HTTP layer's
        // (cookies, a streamed body): `api::server` answers them before
        // dispatch; a forwarded one is refused.
        Action::CreateSession(_) | Action::GetSession | Action::DeleteSession | Action::Events => {
            return Err(ActionError::bad_input(
                "sessions and event streams are served by the API listener itself",
            ))
        }
        Action::GetStats(q) => Reply::Stats(crate::agent::stats::get(&ctx, q).await?),
        Action::ListStats => Reply::StatsSeriesList(crate::agent::stats::list(&ctx).await?),
        Action::MigrationReport { name } => {
            Reply::MigrationReport(crate::agent::stats::migration_report(&ctx, name).await?)
        }
        Action::ListEstimates => {
            Reply::Estimates(est_blocking(move || Ok(crate::agent::estimates::list(&ctx))).await?)
        }
        Action::StartEstimate(req) => Reply::EstimateStarted(
            est_blocking(move || crate::agent::estimates::start(&ctx, req)).await?,
        ),
        Action::GetEstimate { name } => {
            Reply::Estimate(est_blocking(move || crate::agent::estimates::get(&ctx, &name)).await?)
        }
        Action::StopEstimate { name } => Reply::EstimateStopped(
            est_blocking(move || crate::agent::estimates::stop(&ctx, &name)).await?,
        ),
        Action::DeleteEstimate { name } => Reply::EstimateDeleted(
            est_blocking(move || {
                crate::agent::estimates::delete(&ctx, &name)?;
                Ok(r::Deleted {
                    deleted: name.to_string(),
                })
            })
            .await?,
        ),
        Action::EstimateReport { name, query } => Reply::EstimateReport(Box::new(
            est_blocking(move || crate::agent::estimates::report(&ctx, &name, query)).await?,
        )),
        Action::ProbeLink(req) => Reply::Probe(
            est_blocking(move || {
                let load = ctx.estimates.current_load();
                crate::agent::probe::run(&ctx, req, load)
            })
            .await?,
        ),
        Action::ListProbes => {
            Reply::Probes(est_blocking(move || Ok(crate::agent::probe::list(&ctx))).await?)
        }
        Action::CreateArchive(req) => Reply::ArchiveJobStarted(
            est_blocking(move || crate::agent::archives::create(&ctx, req)).await?,
        ),
        Action::RestoreArchive(req) => Reply::RestoreJobStarted(
            est_blocking(move || crate::agent::archives::restore(&ctx, req)).await?,
        ),
        Action::ListArchiveJobs => Reply::ArchiveJobs(ctx.archive_jobs.list()),
        Action::GetArchiveJob { name } => Reply::ArchiveJob(ctx.archive_jobs.get(name.as_str())?),
    })
}

/// A peer's reply of another type than its action's (it cannot be: the
/// client decodes by the action's kind).
fn unexpected(r: Reply) -> ActionError {
    internal(format!(
        "unexpected reply {}",
        serde_json::to_string(&r).unwrap_or_default()
    ))
}

fn node_info(ctx: &AgentCtx) -> r::NodeInfo {
    r::NodeInfo {
        node_name: ctx.identity.node_name.clone(),
        fingerprint: ctx.identity.fingerprint(),
        cert_pem: ctx.identity.cert_pem(),
        api: ctx.cfg.api_listen.to_string(),
        replication: ctx.cfg.replication_listen.to_string(),
        nbd: ctx.nbd_uri(""),
        nbd_tls: ctx.nbd_tls_uri(""),
        heartbeat: heartbeat_addrs(ctx),
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: ctx.started.elapsed().as_secs(),
        free_bytes: crate::agent::free_bytes(&ctx.cfg.data_dir),
        damaged: ctx
            .damaged
            .list()
            .into_iter()
            .map(|d| r::DamagedObject {
                kind: d.kind.to_string(),
                name: d.name,
                path: d.path,
                error: d.error,
            })
            .collect(),
    }
}

fn heartbeat_addrs(ctx: &AgentCtx) -> Vec<String> {
    ctx.cfg
        .cluster
        .as_ref()
        .map(|c| c.heartbeat.iter().map(|a| a.to_string()).collect())
        .unwrap_or_default()
}

/// `ferry cluster switchover` (or the console's button) on either node: on
/// the serving node it is the switchover itself; on the other one, asked by
/// an operator whose role the route already checked, it is forwarded to
/// the serving peer with this node's own authority (the control plane's
/// rule for forwarded actions) under the same operation id, so both audit
/// logs hold it. A call that came from the peer is never forwarded again.
fn switchover(ctx: &Arc<AgentCtx>, name: &str, from_peer: bool) -> anyhow::Result<Reply> {
    let here = ctx.identity.node_name.clone();
    let served_by = ctx
        .cluster
        .workload(name)
        .ok()
        .and_then(|s| s["primary"].as_str().map(str::to_string));
    let peer = ctx.cfg.cluster.as_ref().map(|c| c.peer.clone());
    match (served_by, peer) {
        (Some(p), Some(peer)) if !from_peer && p != here && p == peer => {
            let peer = ctx
                .peers
                .get(&peer)
                .ok_or_else(|| anyhow::anyhow!("peer {peer} is not registered"))?;
            let c = ApiClient::to_peer(&ctx.identity, &peer)?;
            tracing::info!(workload = %name, to = %peer.name, "cluster.switchover.forwarded: served by the peer");
            c.send(&Action::ClusterSwitchover {
                name: name.parse()?,
            })
            .map_err(|e| e.context(format!("{} refused the switchover of {name:?}", peer.name)))
        }
        _ => Ok(Reply::Switchover(typed(crate::cluster::switchover(
            ctx, name,
        )?)?)),
    }
}

fn peer_info(ctx: &AgentCtx, p: &Peer) -> r::PeerInfo {
    let seen = ctx.peer_watch.get(&p.name).unwrap_or_default();
    let probed = seen.up || seen.error.is_some();
    r::PeerInfo {
        name: p.name.clone(),
        api: p.api.clone(),
        replication: p.replication.clone(),
        fingerprint: p.fingerprint.clone(),
        up: probed.then_some(seen.up),
        version: seen.version,
        since_unix_ms: probed.then_some(seen.since_unix_ms),
        probe_error: seen.error,
    }
}

/// `ferry node add`: reach the peer over TLS pinned to the fingerprint the
/// operator gave, check its name, pair both ways (mutual TLS; the peer's
/// token authorizes this one call and is not kept).
async fn add_node(ctx: Arc<AgentCtx>, req: q::AddNode) -> Res<r::PeerInfo> {
    let here = ctx.clone();
    let peer = blocking(move || {
        let client = ApiClient::pairing(&ctx.identity, &req.api, &req.fingerprint, &req.token)?;
        let Reply::Node(info) = client.send(&Action::GetNode)? else {
            anyhow::bail!("the node at {} did not describe itself", req.api);
        };
        let name = info.node_name.clone();
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
        let fp = info.fingerprint.clone();
        if req.fingerprint.trim() != fp {
            anyhow::bail!(
                "the node at {} reports fingerprint {fp}, not the pinned {}",
                req.api,
                req.fingerprint
            );
        }
        let cert_pem = info.cert_pem.clone();
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
        client.send(&Action::Pair(q::PairRequest {
            name: ctx.identity.node_name.clone(),
            api: ctx.cfg.api_listen.to_string(),
            replication: ctx.cfg.replication_listen.to_string(),
            cert_pem: ctx.identity.cert_pem(),
            fingerprint: ctx.identity.fingerprint(),
            token: String::new(),
            previous_fingerprint: None,
            heartbeat: heartbeat_addrs(&ctx),
            heartbeat_key: heartbeat_key.clone(),
        }))?;
        let peer = Peer {
            name,
            api: req.api.clone(),
            replication: info.replication.clone(),
            fingerprint: fp,
            cert_pem,
            token: String::new(),
            previous_fingerprint: None,
            heartbeat: info.heartbeat.clone(),
            heartbeat_key,
        };
        ctx.peers.upsert(peer.clone())?;
        tracing::info!(peer = %peer.name, fingerprint = %peer.fingerprint, "node.registered");
        Ok(peer)
    })
    .await?;
    Ok(peer_info(&here, &peer))
}

/// (peer → peer) the other half of `node add`. The caller must present the
/// very certificate it asks to have pinned (the TLS handshake proved it
/// holds its key); the API token of this node authorized the call.
async fn pair(ctx: Arc<AgentCtx>, who: &Asker, p: q::PairRequest) -> Res<r::Paired> {
    if who.cert_fingerprint.as_deref() != Some(p.fingerprint.as_str()) {
        return Err(ActionError::new(
            ErrorKind::Forbidden,
            "pairing must come over TLS with the certificate being registered",
        ));
    }
    crate::volume::validate_name(&p.name).map_err(|e| ActionError::bad_input(e.to_string()))?;
    let der: rustls_pki_types::CertificateDer =
        rustls_pki_types::pem::PemObject::from_pem_slice(p.cert_pem.as_bytes())
            .map_err(|e| ActionError::bad_input(format!("certificate is not PEM: {e}")))?;
    if crate::transport::identity::fingerprint(&der) != p.fingerprint {
        return Err(ActionError::bad_input(
            "certificate does not match fingerprint",
        ));
    }
    if p.name == ctx.identity.node_name {
        return Err(ActionError::bad_input("a node cannot pair with itself"));
    }
    let peer = Peer {
        name: p.name.clone(),
        api: p.api,
        replication: p.replication,
        fingerprint: p.fingerprint,
        cert_pem: p.cert_pem,
        token: String::new(),
        previous_fingerprint: None,
        heartbeat: p.heartbeat,
        heartbeat_key: p.heartbeat_key,
    };
    let name = p.name;
    blocking(move || ctx.peers.upsert(peer)).await?;
    tracing::info!(peer = %name, "node.paired");
    Ok(r::Paired { paired: name })
}

/// (peer → peer) `ferry node rekey` on the calling node: pin its new
/// certificate. Only a registered peer can ask, authenticated by the
/// certificate it is replacing; until it says `done` both are accepted.
async fn repin(ctx: Arc<AgentCtx>, who: &Asker, req: q::Repin) -> Res<r::Repinned> {
    let Some(name) = who.peer.clone() else {
        return Err(ActionError::new(
            ErrorKind::Forbidden,
            "only a registered node may re-pin its own certificate",
        ));
    };
    let der: rustls_pki_types::CertificateDer =
        rustls_pki_types::pem::PemObject::from_pem_slice(req.cert_pem.as_bytes())
            .map_err(|e| ActionError::bad_input(format!("certificate is not PEM: {e}")))?;
    if crate::transport::identity::fingerprint(&der) != req.fingerprint {
        return Err(ActionError::bad_input(
            "certificate does not match fingerprint",
        ));
    }
    let presented = who.cert_fingerprint.clone().unwrap_or_default();
    let fingerprint = req.fingerprint.clone();
    let n = name.clone();
    blocking(move || {
        let mut p = ctx
            .peers
            .get(&n)
            .ok_or_else(|| anyhow::anyhow!("node {n:?} is not registered"))?;
        if req.done {
            if presented != req.fingerprint {
                anyhow::bail!("finish a rekey with the new certificate");
            }
            p.previous_fingerprint = None;
        } else if p.fingerprint != req.fingerprint {
            p.previous_fingerprint = Some(p.fingerprint.clone());
            p.fingerprint = req.fingerprint.clone();
            p.cert_pem = req.cert_pem.clone();
        }
        ctx.peers.upsert(p)?;
        tracing::warn!(peer = %n, fingerprint = %req.fingerprint, done = req.done, "node.repinned");
        Ok(())
    })
    .await?;
    Ok(r::Repinned {
        repinned: Some(name),
        fingerprint,
    })
}

/// `ferry node rekey`: a new key and certificate for this node, pinned by
/// every registered peer over the old trust before it is used; then used
/// by every new handshake (API, replication, peer calls); then the peers
/// drop the old one. A peer that cannot be reached stops the rekey before
/// anything changes here.
async fn rekey(ctx: Arc<AgentCtx>) -> Res<r::Rekeyed> {
    blocking(move || {
        let _admin = ctx.admin();
        let old = ctx.identity.fingerprint();
        let (key_pem, key) = ctx.identity.new_key()?;
        let new_fp = key.fingerprint.clone();
        let cert_pem = key.cert_pem.clone();
        let peers = ctx.peers.list();
        let repin = |done: bool| {
            Action::Repin(q::Repin {
                cert_pem: cert_pem.clone(),
                fingerprint: new_fp.clone(),
                done,
            })
        };
        for p in &peers {
            ApiClient::to_peer(&ctx.identity, p)?
                .send(&repin(false))
                .map_err(|e| anyhow::anyhow!("{e:#}"))
                .map_err(|e| e.context(format!("node {} did not pin the new certificate; nothing changed here (retry once it is reachable)", p.name)))?;
        }
        ctx.identity.install_key(&key_pem, key)?;
        let mut unfinished = Vec::new();
        for p in &peers {
            let done = ApiClient::to_peer(&ctx.identity, p).and_then(|c| c.send(&repin(true)));
            if let Err(e) = done {
                tracing::warn!(peer = %p.name, error = %format!("{e:#}"), "node.rekey.unfinished");
                unfinished.push(p.name.clone());
            }
        }
        tracing::warn!(old = %old, new = %new_fp, "node.rekeyed");
        Ok(r::Rekeyed {
            node: ctx.identity.node_name.clone(),
            old_fingerprint: old,
            fingerprint: new_fp,
            peers: peers.iter().map(|p| p.name.clone()).collect(),
            peers_still_accepting_old: unfinished,
        })
    })
    .await
}

async fn hashes(ctx: Arc<AgentCtx>, name: String, query: q::HashesQuery) -> Res<r::BlockHashes> {
    let g = ctx.cfg.replication.granularity_bytes;
    let fresh = query.fresh;
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
    // `warm`: bring the cached leaves up to date, send none of them.
    Ok(if query.warm {
        r::BlockHashes {
            granularity_bytes: g,
            hashes: None,
            leaves: Some(leaves.len() as u64),
        }
    } else {
        r::BlockHashes {
            granularity_bytes: g,
            hashes: Some(leaves.iter().map(|h| h.to_hex().to_string()).collect()),
            leaves: None,
        }
    })
}

/// A volume's data history here: `ids` is [current, ancestors…].
fn generation(ctx: &AgentCtx, name: &str) -> Res<r::Generation> {
    let g = if let Some(p) = ctx.primary(name) {
        p.meta_state().generation
    } else if let Some(s) = ctx.replica(name) {
        s.meta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state()
            .generation
            .clone()
    } else {
        return Err(ActionError::not_found(format!(
            "no volume {name:?} on node {}",
            ctx.identity.node_name
        )));
    };
    let mut ids = vec![g.current()];
    ids.extend(g.ancestors());
    Ok(r::Generation {
        volume: name.to_string(),
        ids,
    })
}

async fn create_workload(ctx: Arc<AgentCtx>, spec: q::WorkloadSpec) -> Res<q::WorkloadSpec> {
    let inner = spec.clone();
    blocking(move || {
        crate::workload::validate(&inner)?;
        if crate::workload::load_workload(&ctx.cfg.data_dir, &inner.name)?.is_some() {
            anyhow::bail!(
                "workload {:?} exists; change it with PUT or delete it first",
                inner.name
            );
        }
        for vol in &inner.volumes {
            if ctx.primary(vol).is_none() {
                anyhow::bail!(
                    "volume {vol:?} is not a primary on node {}; create it first",
                    ctx.identity.node_name
                );
            }
        }
        crate::workload::save_workload(&ctx.cfg.data_dir, &inner)
    })
    .await?;
    Ok(spec)
}

async fn put_workload(
    ctx: Arc<AgentCtx>,
    name: ferry_core::Name,
    forwarded: bool,
    spec: q::WorkloadSpec,
) -> Res<r::WorkloadUpdated> {
    if spec.name != name {
        return Err(ActionError::bad_input(format!(
            "the body names workload {:?}, the path {name:?}",
            spec.name
        )));
    }
    let inner = spec.clone();
    let updated_on = blocking(move || {
        crate::workload::validate(&inner)?;
        crate::workload::save_workload(&ctx.cfg.data_dir, &inner)?;
        // Changed through either node, kept the same on both: pass it on to
        // every peer that holds this workload.
        let mut updated = vec![ctx.identity.node_name.clone()];
        if !forwarded {
            for p in ctx.peers.list() {
                let c = ApiClient::to_peer(&ctx.identity, &p)?;
                if c.send(&Action::GetWorkload { name: name.clone() }).is_err() {
                    continue;
                }
                c.send(&Action::PutWorkload {
                    name: name.clone(),
                    forwarded: true,
                    spec: spec.clone(),
                })
                .map_err(|e| {
                    e.context(format!(
                        "saved here, but node {} did not take the change",
                        p.name
                    ))
                })?;
                updated.push(p.name.clone());
            }
        }
        Ok((spec, updated))
    })
    .await?;
    Ok(r::WorkloadUpdated {
        spec: updated_on.0,
        updated_on: updated_on.1,
    })
}

/// `ferry cluster add`: puts a workload under HA on both nodes, keeping its
/// current primary and adopting its replication (or starting it).
async fn cluster_add(ctx: Arc<AgentCtx>, r: q::ClusterAdd) -> Res<r::ClusterAdded> {
    blocking(move || {
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
        let spec = crate::workload::load_workload(&ctx.cfg.data_dir, &r.workload)?
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
                    None => ctx.start_replication(
                        v,
                        &cfg.peer,
                        Mode::Sync,
                        None,
                        &crate::volume::Baseline::Full,
                    )?,
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
            let c = ApiClient::to_peer(&ctx.identity, &peer)?;
            c.send(&Action::PutWorkload {
                name: spec.name.clone(),
                forwarded: true,
                spec: spec.clone(),
            })
            .map_err(|e| e.context(format!("cannot give the workload definition to {}", cfg.peer)))?;
            c.send(&Action::ClusterAdd(q::ClusterAdd {
                forwarded: true,
                ..r.clone()
            }))
            .map_err(|e| e.context(format!("{} refused to manage the workload", cfg.peer)))?;
        }
        crate::cluster::save(&ctx.cfg.data_dir, &h)?;
        tracing::info!(workload = %h.workload, preferred = %h.preferred, role = ?h.state.role, "cluster.workload.added");
        Ok(r::ClusterAdded {
            workload: h.workload.to_string(),
            preferred: h.preferred.clone(),
            role: serde_json::to_value(h.state.role)?
                .as_str()
                .unwrap_or_default()
                .to_string(),
        })
    })
    .await
}

async fn create_share(ctx: Arc<AgentCtx>, r: q::CreateShare) -> Res<r::ShareStatus> {
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
            path: std::path::PathBuf::from(&r.path),
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
    convert(&st)
}

async fn list_shares(ctx: Arc<AgentCtx>) -> Res<Vec<r::ShareStatus>> {
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
    convert(&list)
}

/// Longest a status request waits for a state (the client asks again).
const STATUS_WAIT_MS_MAX: u64 = 5_000;
/// How often a waiting status request looks at the state.
const STATUS_WAIT_POLL_MS: u64 = 2;

/// `?wait_state=S&wait_ms=N`: returns once `state` (cheap) is S, or after
/// N ms (at most [`STATUS_WAIT_MS_MAX`]); a waiting client learns of the
/// change within [`STATUS_WAIT_POLL_MS`] instead of its own polling interval.
async fn wait_for(w: &q::StatusWait, mut state: impl FnMut() -> Option<String>) {
    if let Some(want) = w.wait_state.as_deref() {
        let deadline =
            Instant::now() + Duration::from_millis(w.wait_ms.unwrap_or(0).min(STATUS_WAIT_MS_MAX));
        while Instant::now() < deadline && state().as_deref() != Some(want) {
            tokio::time::sleep(Duration::from_millis(STATUS_WAIT_POLL_MS)).await;
        }
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

fn phase_str(p: Phase) -> &'static str {
    match p {
        Phase::Disconnected => "disconnected",
        Phase::Resyncing => "resyncing",
        Phase::Streaming => "connected",
        Phase::SplitBrain => "split-brain",
    }
}

/// The status of one volume's replication (docs/status.md describes it).
pub fn status_of(ctx: &Arc<AgentCtx>, name: &str) -> Res<r::ReplicationStatus> {
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
        return Ok(r::ReplicationStatus::Primary(r::PrimaryReplication {
            volume: v.name.to_string(),
            role: "primary".into(),
            peer: l.peer.clone(),
            stream: l.link_group.clone(),
            mode: if l.rep.config().mode == Mode::Sync {
                "sync"
            } else {
                "async"
            }
            .into(),
            link: if l.stats.split_brain {
                "split-brain"
            } else {
                phase_str(st.phase)
            }
            .into(),
            state: st.replica.as_str().into(),
            synced_percent: (synced_percent * 10.0).round() / 10.0,
            dirty_bytes: st.dirty_bytes,
            backlog_bytes: st.backlog_bytes,
            behind: st.behind,
            bytes_sent: l.stats.bytes_sent,
            copy_bytes_sent: l.stats.copy_bytes_sent,
            write_bytes_sent: l.stats.write_bytes_sent,
            rate_bytes_per_s: rate.round() as u64,
            eta_seconds: eta,
            max_rate_bytes_per_s: l.max_rate_bytes_per_s,
            merkle_stale_blocks: v.leaves.stale_blocks(),
            last_error: l.stats.last_error.clone(),
        }));
    }
    if let Some(s) = ctx.replica(name) {
        let m = s.meta.lock().unwrap_or_else(|p| p.into_inner());
        return Ok(r::ReplicationStatus::Replica(r::ReplicaReplication {
            volume: s.name.to_string(),
            role: "secondary".into(),
            peer: m.state().peer.clone(),
            state: if m.state().consistent {
                "up-to-date"
            } else {
                "inconsistent"
            }
            .into(),
            received_seq: s.received_seq.load(std::sync::atomic::Ordering::Relaxed),
            bytes_applied: s.bytes_applied.load(std::sync::atomic::Ordering::Relaxed),
            merkle_stale_blocks: s.leaves.stale_blocks(),
            last_error: s
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }));
    }
    Err(ActionError::not_found(format!(
        "no volume named {name:?} on node {}",
        ctx.identity.node_name
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply an engine builds with a field its type does not know, or a
    /// number of another kind, is an error in the tests, not a silent loss.
    #[test]
    fn typed_replies_lose_nothing_on_the_way() {
        let v = serde_json::json!({"workload": "w", "from": "a", "to": "b",
            "verified_ms": 3, "downtime_ms": 5});
        let r: r::SwitchoverReport = typed(v.clone()).unwrap();
        assert_eq!(r.downtime_ms, 5);
        let mut more = v.clone();
        more["resent_blocks"] = 2.into();
        let e = typed::<r::SwitchoverReport>(more).unwrap_err();
        assert!(e.message.contains("changes when typed"), "{e}");
        let mut float = v;
        float["downtime_ms"] = serde_json::json!(5.5);
        assert!(typed::<r::SwitchoverReport>(float).is_err());
    }
}
