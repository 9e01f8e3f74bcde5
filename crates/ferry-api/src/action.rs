//! [`Action`]: every call the API serves, typed — its path parameters,
//! query and body. The agent decodes each request into one
//! ([`Action::decode`]) and executes it; the CLI and the peer client build
//! one and send it ([`Action::path`], [`Action::body`]), the route table
//! giving the method and path.

use std::collections::BTreeMap;

use ferry_core::Name;
use serde::de::DeserializeOwned;

use crate::error::ActionError;
use crate::request::*;
use crate::routes::{ActionKind, Method, Route};

/// An action with its arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    GetNode,
    ListNodes,
    AddNode(AddNode),
    Pair(PairRequest),
    Repin(Repin),
    Rekey,
    RotateToken,
    ListTokens,
    CreateToken(CreateToken),
    RevokeToken {
        name: Name,
    },
    ListVolumes,
    CreateVolume(CreateVolume),
    ImportImage(ImportImage),
    DeleteVolume {
        name: Name,
    },
    VolumeHashes {
        name: Name,
        query: HashesQuery,
    },
    VolumeGeneration {
        name: Name,
    },
    VerifyVolume {
        name: Name,
    },
    PromoteVolume {
        name: Name,
        req: Promote,
    },
    ArmSnapshot {
        name: Name,
        req: ArmSnapshot,
    },
    Takeover {
        name: Name,
        req: Takeover,
    },
    MarkInconsistent {
        name: Name,
    },
    CreateReplica(CreateReplica),
    ListWorkloads,
    CreateWorkload(WorkloadSpec),
    GetWorkload {
        name: Name,
    },
    PutWorkload {
        name: Name,
        forwarded: bool,
        spec: WorkloadSpec,
    },
    DeleteWorkload {
        name: Name,
    },
    PrepareVmIncoming {
        name: Name,
        req: VmIncomingRequest,
    },
    CancelVmIncoming {
        name: Name,
    },
    StartTestHere {
        name: Name,
    },
    EndTestHere {
        name: Name,
    },
    RunHook {
        name: Name,
        which: HookName,
        req: HookRequest,
    },
    ListMigrations,
    StartMigration(StartMigration),
    GetMigration {
        name: Name,
    },
    SetMigration {
        name: Name,
        req: SetRate,
    },
    CutoverAll,
    Cutover {
        name: Name,
        req: CutoverRequest,
    },
    ScheduleCutover {
        name: Name,
        req: ScheduleRequest,
    },
    CancelCutover {
        name: Name,
    },
    ReverseMigration {
        name: Name,
        req: Reverse,
    },
    Rollback {
        name: Name,
    },
    Finalize {
        name: Name,
    },
    StartTest {
        name: Name,
    },
    EndTest {
        name: Name,
    },
    ListReplications,
    StartReplication(StartReplication),
    GetReplication {
        name: Name,
        wait: StatusWait,
    },
    SetReplication {
        name: Name,
        req: SetRate,
    },
    StopReplication {
        name: Name,
    },
    ListShares,
    CreateShare(CreateShare),
    GetShare {
        name: Name,
        counts: bool,
        wait: StatusWait,
    },
    ShareDigest {
        name: Name,
    },
    ShareFiles {
        name: Name,
    },
    VerifyShare {
        name: Name,
        req: ShareVerify,
    },
    ClusterStatus,
    ClusterAdd(ClusterAdd),
    ClusterRemove {
        name: Name,
        forwarded: bool,
    },
    ClusterStandby(Standby),
    ClusterPromote {
        name: Name,
        req: ForcePromote,
    },
    ClusterResolve {
        name: Name,
        req: Resolve,
    },
    ClusterDropCopy {
        name: Name,
        req: DropCopy,
    },
    ClusterSwitchover {
        name: Name,
    },
    OpenApi,
    ListAudit {
        /// RFC 3339, or an age (`90s`, `15m`, `1h`, `7d`).
        since: Option<String>,
    },
    VerifyAudit,
    PutAuditHead(AuditHead),
    GetAuditHeads,
    CreateSession(CreateSession),
    GetSession,
    DeleteSession,
    Events,
    GetStats(StatsQuery),
    ListStats,
    MigrationReport {
        name: Name,
    },
    GetConfig,
    ListEstimates,
    StartEstimate(StartEstimate),
    GetEstimate {
        name: Name,
    },
    StopEstimate {
        name: Name,
    },
    DeleteEstimate {
        name: Name,
    },
    EstimateReport {
        name: Name,
        query: EstimateReportQuery,
    },
    ProbeLink(ProbeLink),
    ListProbes,
    CreateArchive(CreateArchive),
    RestoreArchive(RestoreArchive),
    ListArchiveJobs,
    GetArchiveJob {
        name: Name,
    },
}

/// A request's path parameters or query, by name (percent-decoded).
pub type Params = BTreeMap<String, String>;

fn name(params: &Params, key: &str) -> Result<Name, ActionError> {
    let raw = params
        .get(key)
        .ok_or_else(|| ActionError::bad_input(format!("no {key} in the path")))?;
    Name::parse(raw).map_err(|e| ActionError::bad_input(e.to_string()))
}

/// A JSON body into `T`: a body that does not fit names the field.
fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ActionError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let msg = if inner.is_data() && path != "." {
                format!("the request body does not fit: {path}: {inner}")
            } else if inner.is_data() {
                format!("the request body does not fit: {inner}")
            } else {
                format!("the request body is not JSON: {inner}")
            };
            Err(ActionError::bad_input(msg))
        }
    }
}

fn flag(query: &Params, key: &str) -> Result<bool, ActionError> {
    match query.get(key).map(String::as_str) {
        None => Ok(false),
        Some("1" | "true") => Ok(true),
        Some("0" | "false" | "") => Ok(false),
        Some(other) => Err(ActionError::bad_input(format!(
            "?{key}={other}: use true or false"
        ))),
    }
}

fn wait(query: &Params) -> Result<StatusWait, ActionError> {
    let wait_ms = match query.get("wait_ms") {
        None => None,
        Some(ms) => Some(
            ms.parse::<u64>()
                .map_err(|_| ActionError::bad_input(format!("?wait_ms={ms}: a number of ms")))?,
        ),
    };
    Ok(StatusWait {
        wait_state: query.get("wait_state").cloned(),
        wait_ms,
    })
}

fn number(query: &Params, key: &str) -> Result<Option<u64>, ActionError> {
    query
        .get(key)
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| ActionError::bad_input(format!("?{key}={v}: a number of seconds")))
        })
        .transpose()
}

fn stats_query(query: &Params) -> Result<StatsQuery, ActionError> {
    let series = query
        .get("series")
        .ok_or_else(|| ActionError::bad_input("no ?series= (SCOPE/NAME/METRIC)"))?;
    Ok(StatsQuery {
        series: ferry_core::history::SeriesName::parse(series)
            .map_err(|e| ActionError::bad_input(e.to_string()))?,
        from: number(query, "from")?,
        to: number(query, "to")?,
        since: number(query, "since")?,
        step: number(query, "step")?,
    })
}

fn report_query(query: &Params) -> Result<EstimateReportQuery, ActionError> {
    let u = |k: &str| -> Result<Option<u64>, ActionError> {
        query
            .get(k)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| ActionError::bad_input(format!("?{k}={v}: a whole number")))
            })
            .transpose()
    };
    let ship_days = query
        .get("ship_days")
        .map(|v| match v.parse::<f64>() {
            Ok(d) if d.is_finite() && d > 0.0 => Ok(d),
            _ => Err(ActionError::bad_input(format!(
                "?ship_days={v}: a number of days above 0"
            ))),
        })
        .transpose()?;
    let with = match query.get("with") {
        None => Vec::new(),
        Some(w) => w
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| Name::parse(x).map_err(|e| ActionError::bad_input(format!("?with={w}: {e}"))))
            .collect::<Result<_, _>>()?,
    };
    let stat = query.get("stat").cloned();
    if let Some(s) = &stat {
        if s != "max" && s != "mean" {
            return Err(ActionError::bad_input(format!("?stat={s}: max or mean")));
        }
    }
    let to = match query.get("to") {
        None => None,
        Some(t) => Some(
            Name::parse(t)
                .map_err(|e| ActionError::bad_input(format!("?to={t}: {e}")))?
                .as_str()
                .to_string(),
        ),
    };
    Ok(EstimateReportQuery {
        to,
        bandwidth_bytes_per_s: u("bandwidth_bytes_per_s")?,
        max_rate_bytes_per_s: u("max_rate_bytes_per_s")?,
        ship_days,
        with,
        stat,
    })
}

fn enc(v: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

impl Action {
    /// Decodes a request of `kind`: its path parameters, query and body
    /// (ignored by actions that take none). Bad input is 400 naming the
    /// field or the rule; a hook that is not one 404.
    pub fn decode(
        kind: ActionKind,
        params: &Params,
        query: &Params,
        bytes: &[u8],
    ) -> Result<Action, ActionError> {
        use ActionKind as K;
        let n = || name(params, "name");
        Ok(match kind {
            K::GetNode => Action::GetNode,
            K::GetConfig => Action::GetConfig,
            K::ListNodes => Action::ListNodes,
            K::AddNode => Action::AddNode(body(bytes)?),
            K::Pair => Action::Pair(body(bytes)?),
            K::Repin => Action::Repin(body(bytes)?),
            K::Rekey => Action::Rekey,
            K::RotateToken => Action::RotateToken,
            K::ListTokens => Action::ListTokens,
            K::CreateToken => Action::CreateToken(body(bytes)?),
            K::RevokeToken => Action::RevokeToken { name: n()? },
            K::ListVolumes => Action::ListVolumes,
            K::CreateVolume => Action::CreateVolume(body(bytes)?),
            K::ImportImage => Action::ImportImage(body(bytes)?),
            K::DeleteVolume => Action::DeleteVolume { name: n()? },
            K::VolumeHashes => Action::VolumeHashes {
                name: n()?,
                query: HashesQuery {
                    fresh: flag(query, "fresh")?,
                    warm: flag(query, "warm")?,
                },
            },
            K::VolumeGeneration => Action::VolumeGeneration { name: n()? },
            K::VerifyVolume => Action::VerifyVolume { name: n()? },
            K::PromoteVolume => Action::PromoteVolume {
                name: n()?,
                req: body(bytes)?,
            },
            K::ArmSnapshot => Action::ArmSnapshot {
                name: n()?,
                req: body(bytes)?,
            },
            K::Takeover => Action::Takeover {
                name: n()?,
                req: body(bytes)?,
            },
            K::MarkInconsistent => Action::MarkInconsistent { name: n()? },
            K::CreateReplica => Action::CreateReplica(body(bytes)?),
            K::ListWorkloads => Action::ListWorkloads,
            K::CreateWorkload => Action::CreateWorkload(body(bytes)?),
            K::GetWorkload => Action::GetWorkload { name: n()? },
            K::PutWorkload => Action::PutWorkload {
                name: n()?,
                forwarded: flag(query, "forwarded")?,
                spec: body(bytes)?,
            },
            K::DeleteWorkload => Action::DeleteWorkload { name: n()? },
            K::PrepareVmIncoming => Action::PrepareVmIncoming {
                name: n()?,
                req: body(bytes)?,
            },
            K::CancelVmIncoming => Action::CancelVmIncoming { name: n()? },
            K::StartTestHere => Action::StartTestHere { name: n()? },
            K::EndTestHere => Action::EndTestHere { name: n()? },
            K::RunHook => {
                let which = params.get("which").map(String::as_str).unwrap_or("");
                let which = match which {
                    "start" => HookName::Start,
                    "stop" => HookName::Stop,
                    "check" => HookName::Check,
                    other => {
                        return Err(ActionError::not_found(format!(
                            "no hook {other:?}: start, stop or check"
                        )))
                    }
                };
                Action::RunHook {
                    name: n()?,
                    which,
                    req: body(bytes)?,
                }
            }
            K::ListMigrations => Action::ListMigrations,
            K::StartMigration => Action::StartMigration(body(bytes)?),
            K::GetMigration => Action::GetMigration { name: n()? },
            K::SetMigration => Action::SetMigration {
                name: n()?,
                req: body(bytes)?,
            },
            K::CutoverAll => Action::CutoverAll,
            K::Cutover => Action::Cutover {
                name: n()?,
                req: body(bytes)?,
            },
            K::ScheduleCutover => Action::ScheduleCutover {
                name: n()?,
                req: body(bytes)?,
            },
            K::CancelCutover => Action::CancelCutover { name: n()? },
            K::ReverseMigration => Action::ReverseMigration {
                name: n()?,
                req: body(bytes)?,
            },
            K::Rollback => Action::Rollback { name: n()? },
            K::Finalize => Action::Finalize { name: n()? },
            K::StartTest => Action::StartTest { name: n()? },
            K::EndTest => Action::EndTest { name: n()? },
            K::ListReplications => Action::ListReplications,
            K::StartReplication => Action::StartReplication(body(bytes)?),
            K::GetReplication => Action::GetReplication {
                name: n()?,
                wait: wait(query)?,
            },
            K::SetReplication => Action::SetReplication {
                name: n()?,
                req: body(bytes)?,
            },
            K::StopReplication => Action::StopReplication { name: n()? },
            K::ListShares => Action::ListShares,
            K::CreateShare => Action::CreateShare(body(bytes)?),
            K::GetShare => Action::GetShare {
                name: n()?,
                counts: !matches!(query.get("counts").map(String::as_str), Some("0" | "false")),
                wait: wait(query)?,
            },
            K::ShareDigest => Action::ShareDigest { name: n()? },
            K::ShareFiles => Action::ShareFiles { name: n()? },
            K::VerifyShare => Action::VerifyShare {
                name: n()?,
                req: body(bytes)?,
            },
            K::ClusterStatus => Action::ClusterStatus,
            K::ClusterAdd => Action::ClusterAdd(body(bytes)?),
            K::ClusterRemove => Action::ClusterRemove {
                name: n()?,
                forwarded: flag(query, "forwarded")?,
            },
            K::ClusterStandby => Action::ClusterStandby(body(bytes)?),
            K::ClusterPromote => Action::ClusterPromote {
                name: n()?,
                req: body(bytes)?,
            },
            K::ClusterResolve => Action::ClusterResolve {
                name: n()?,
                req: body(bytes)?,
            },
            K::ClusterDropCopy => Action::ClusterDropCopy {
                name: n()?,
                req: body(bytes)?,
            },
            K::ClusterSwitchover => Action::ClusterSwitchover { name: n()? },
            K::OpenApi => Action::OpenApi,
            K::ListAudit => Action::ListAudit {
                since: query.get("since").cloned(),
            },
            K::VerifyAudit => Action::VerifyAudit,
            K::PutAuditHead => Action::PutAuditHead(body(bytes)?),
            K::GetAuditHeads => Action::GetAuditHeads,
            K::CreateSession => Action::CreateSession(body(bytes)?),
            K::GetSession => Action::GetSession,
            K::DeleteSession => Action::DeleteSession,
            K::Events => Action::Events,
            K::GetStats => Action::GetStats(stats_query(query)?),
            K::ListStats => Action::ListStats,
            K::MigrationReport => Action::MigrationReport { name: n()? },
            K::ListEstimates => Action::ListEstimates,
            K::StartEstimate => Action::StartEstimate(body(bytes)?),
            K::GetEstimate => Action::GetEstimate { name: n()? },
            K::StopEstimate => Action::StopEstimate { name: n()? },
            K::DeleteEstimate => Action::DeleteEstimate { name: n()? },
            K::EstimateReport => Action::EstimateReport {
                name: n()?,
                query: report_query(query)?,
            },
            K::ProbeLink => Action::ProbeLink(body(bytes)?),
            K::ListProbes => Action::ListProbes,
            K::CreateArchive => Action::CreateArchive(body(bytes)?),
            K::RestoreArchive => Action::RestoreArchive(body(bytes)?),
            K::ListArchiveJobs => Action::ListArchiveJobs,
            K::GetArchiveJob => Action::GetArchiveJob { name: n()? },
        })
    }

    /// Which action this is.
    pub fn kind(&self) -> ActionKind {
        use ActionKind as K;
        match self {
            Action::GetNode => K::GetNode,
            Action::GetConfig => K::GetConfig,
            Action::ListNodes => K::ListNodes,
            Action::AddNode(_) => K::AddNode,
            Action::Pair(_) => K::Pair,
            Action::Repin(_) => K::Repin,
            Action::Rekey => K::Rekey,
            Action::RotateToken => K::RotateToken,
            Action::ListTokens => K::ListTokens,
            Action::CreateToken(_) => K::CreateToken,
            Action::RevokeToken { .. } => K::RevokeToken,
            Action::ListVolumes => K::ListVolumes,
            Action::CreateVolume(_) => K::CreateVolume,
            Action::ImportImage(_) => K::ImportImage,
            Action::DeleteVolume { .. } => K::DeleteVolume,
            Action::VolumeHashes { .. } => K::VolumeHashes,
            Action::VolumeGeneration { .. } => K::VolumeGeneration,
            Action::VerifyVolume { .. } => K::VerifyVolume,
            Action::PromoteVolume { .. } => K::PromoteVolume,
            Action::ArmSnapshot { .. } => K::ArmSnapshot,
            Action::Takeover { .. } => K::Takeover,
            Action::MarkInconsistent { .. } => K::MarkInconsistent,
            Action::CreateReplica(_) => K::CreateReplica,
            Action::ListWorkloads => K::ListWorkloads,
            Action::CreateWorkload(_) => K::CreateWorkload,
            Action::GetWorkload { .. } => K::GetWorkload,
            Action::PutWorkload { .. } => K::PutWorkload,
            Action::DeleteWorkload { .. } => K::DeleteWorkload,
            Action::PrepareVmIncoming { .. } => K::PrepareVmIncoming,
            Action::CancelVmIncoming { .. } => K::CancelVmIncoming,
            Action::StartTestHere { .. } => K::StartTestHere,
            Action::EndTestHere { .. } => K::EndTestHere,
            Action::RunHook { .. } => K::RunHook,
            Action::ListMigrations => K::ListMigrations,
            Action::StartMigration(_) => K::StartMigration,
            Action::GetMigration { .. } => K::GetMigration,
            Action::SetMigration { .. } => K::SetMigration,
            Action::CutoverAll => K::CutoverAll,
            Action::Cutover { .. } => K::Cutover,
            Action::ScheduleCutover { .. } => K::ScheduleCutover,
            Action::CancelCutover { .. } => K::CancelCutover,
            Action::ReverseMigration { .. } => K::ReverseMigration,
            Action::Rollback { .. } => K::Rollback,
            Action::Finalize { .. } => K::Finalize,
            Action::StartTest { .. } => K::StartTest,
            Action::EndTest { .. } => K::EndTest,
            Action::ListReplications => K::ListReplications,
            Action::StartReplication(_) => K::StartReplication,
            Action::GetReplication { .. } => K::GetReplication,
            Action::SetReplication { .. } => K::SetReplication,
            Action::StopReplication { .. } => K::StopReplication,
            Action::ListShares => K::ListShares,
            Action::CreateShare(_) => K::CreateShare,
            Action::GetShare { .. } => K::GetShare,
            Action::ShareDigest { .. } => K::ShareDigest,
            Action::ShareFiles { .. } => K::ShareFiles,
            Action::VerifyShare { .. } => K::VerifyShare,
            Action::ClusterStatus => K::ClusterStatus,
            Action::ClusterAdd(_) => K::ClusterAdd,
            Action::ClusterRemove { .. } => K::ClusterRemove,
            Action::ClusterStandby(_) => K::ClusterStandby,
            Action::ClusterPromote { .. } => K::ClusterPromote,
            Action::ClusterResolve { .. } => K::ClusterResolve,
            Action::ClusterDropCopy { .. } => K::ClusterDropCopy,
            Action::ClusterSwitchover { .. } => K::ClusterSwitchover,
            Action::OpenApi => K::OpenApi,
            Action::ListAudit { .. } => K::ListAudit,
            Action::VerifyAudit => K::VerifyAudit,
            Action::PutAuditHead(_) => K::PutAuditHead,
            Action::GetAuditHeads => K::GetAuditHeads,
            Action::CreateSession(_) => K::CreateSession,
            Action::GetSession => K::GetSession,
            Action::DeleteSession => K::DeleteSession,
            Action::Events => K::Events,
            Action::GetStats(_) => K::GetStats,
            Action::ListStats => K::ListStats,
            Action::MigrationReport { .. } => K::MigrationReport,
            Action::ListEstimates => K::ListEstimates,
            Action::StartEstimate(_) => K::StartEstimate,
            Action::GetEstimate { .. } => K::GetEstimate,
            Action::StopEstimate { .. } => K::StopEstimate,
            Action::DeleteEstimate { .. } => K::DeleteEstimate,
            Action::EstimateReport { .. } => K::EstimateReport,
            Action::ProbeLink(_) => K::ProbeLink,
            Action::ListProbes => K::ListProbes,
            Action::CreateArchive(_) => K::CreateArchive,
            Action::RestoreArchive(_) => K::RestoreArchive,
            Action::ListArchiveJobs => K::ListArchiveJobs,
            Action::GetArchiveJob { .. } => K::GetArchiveJob,
        }
    }

    /// Its route in the table.
    pub fn route(&self) -> &'static Route {
        self.kind().route()
    }

    pub fn method(&self) -> Method {
        self.route().method
    }

    /// The name in its path, if it has one.
    pub fn name(&self) -> Option<&Name> {
        match self {
            Action::RevokeToken { name }
            | Action::DeleteVolume { name }
            | Action::VolumeHashes { name, .. }
            | Action::VolumeGeneration { name }
            | Action::VerifyVolume { name }
            | Action::PromoteVolume { name, .. }
            | Action::ArmSnapshot { name, .. }
            | Action::Takeover { name, .. }
            | Action::MarkInconsistent { name }
            | Action::GetWorkload { name }
            | Action::PutWorkload { name, .. }
            | Action::DeleteWorkload { name }
            | Action::PrepareVmIncoming { name, .. }
            | Action::CancelVmIncoming { name }
            | Action::StartTestHere { name }
            | Action::EndTestHere { name }
            | Action::RunHook { name, .. }
            | Action::GetMigration { name }
            | Action::SetMigration { name, .. }
            | Action::Cutover { name, .. }
            | Action::ScheduleCutover { name, .. }
            | Action::CancelCutover { name }
            | Action::ReverseMigration { name, .. }
            | Action::Rollback { name }
            | Action::Finalize { name }
            | Action::StartTest { name }
            | Action::EndTest { name }
            | Action::GetReplication { name, .. }
            | Action::SetReplication { name, .. }
            | Action::StopReplication { name }
            | Action::GetShare { name, .. }
            | Action::ShareDigest { name }
            | Action::ShareFiles { name }
            | Action::VerifyShare { name, .. }
            | Action::ClusterRemove { name, .. }
            | Action::ClusterPromote { name, .. }
            | Action::ClusterResolve { name, .. }
            | Action::ClusterDropCopy { name, .. }
            | Action::ClusterSwitchover { name }
            | Action::MigrationReport { name }
            | Action::GetEstimate { name }
            | Action::StopEstimate { name }
            | Action::DeleteEstimate { name }
            | Action::EstimateReport { name, .. }
            | Action::GetArchiveJob { name } => Some(name),
            _ => None,
        }
    }

    /// The request's path and query: the route's path with its parameters
    /// filled in (names cannot hold `/`, `?`, `%` or spaces: no escaping).
    pub fn path(&self) -> String {
        let mut p = self.route().path.to_string();
        if let Some(n) = self.name() {
            p = p.replace("{name}", n.as_str());
        }
        if let Action::RunHook { which, .. } = self {
            p = p.replace("{which}", which.as_str());
        }
        let mut q: Vec<String> = Vec::new();
        match self {
            Action::VolumeHashes { query, .. } => {
                if query.fresh {
                    q.push("fresh=1".into());
                }
                if query.warm {
                    q.push("warm=1".into());
                }
            }
            Action::PutWorkload { forwarded, .. } | Action::ClusterRemove { forwarded, .. }
                if *forwarded =>
            {
                q.push("forwarded=true".into());
            }
            Action::GetReplication { wait, .. } => push_wait(&mut q, wait),
            Action::ListAudit { since: Some(s) } => {
                q.push(format!(
                    "since={}",
                    s.replace('%', "%25").replace('+', "%2B")
                ));
            }
            Action::GetShare { counts, wait, .. } => {
                if !counts {
                    q.push("counts=0".into());
                }
                push_wait(&mut q, wait);
            }
            Action::GetStats(s) => {
                q.push(format!("series={}", s.series));
                for (k, v) in [
                    ("from", s.from),
                    ("to", s.to),
                    ("since", s.since),
                    ("step", s.step),
                ] {
                    if let Some(v) = v {
                        q.push(format!("{k}={v}"));
                    }
                }
            }
            Action::EstimateReport { query: r, .. } => {
                if let Some(t) = &r.to {
                    q.push(format!("to={t}"));
                }
                for (k, v) in [
                    ("bandwidth_bytes_per_s", r.bandwidth_bytes_per_s),
                    ("max_rate_bytes_per_s", r.max_rate_bytes_per_s),
                ] {
                    if let Some(v) = v {
                        q.push(format!("{k}={v}"));
                    }
                }
                if let Some(d) = r.ship_days {
                    q.push(format!("ship_days={d}"));
                }
                if !r.with.is_empty() {
                    let w: Vec<&str> = r.with.iter().map(Name::as_str).collect();
                    q.push(format!("with={}", w.join(",")));
                }
                if let Some(st) = &r.stat {
                    q.push(format!("stat={st}"));
                }
            }
            _ => {}
        }
        if !q.is_empty() {
            p.push('?');
            p.push_str(&q.join("&"));
        }
        p
    }

    /// The request's JSON body (`None` for GET and DELETE; `{}` for a POST
    /// that takes no arguments).
    pub fn body(&self) -> Option<serde_json::Value> {
        if !self.method().has_body() {
            return None;
        }
        Some(match self {
            Action::AddNode(r) => enc(r),
            Action::Pair(r) => enc(r),
            Action::Repin(r) => enc(r),
            Action::CreateToken(r) => enc(r),
            Action::CreateVolume(r) => enc(r),
            Action::ImportImage(r) => enc(r),
            Action::PromoteVolume { req, .. } => enc(req),
            Action::ArmSnapshot { req, .. } => enc(req),
            Action::Takeover { req, .. } => enc(req),
            Action::PrepareVmIncoming { req, .. } => enc(req),
            Action::CreateReplica(r) => enc(r),
            Action::CreateWorkload(s) => enc(s),
            Action::PutWorkload { spec, .. } => enc(spec),
            Action::RunHook { req, .. } => enc(req),
            Action::StartMigration(r) => enc(r),
            Action::SetMigration { req, .. } | Action::SetReplication { req, .. } => enc(req),
            Action::Cutover { req, .. } => enc(req),
            Action::ScheduleCutover { req, .. } => enc(req),
            Action::ReverseMigration { req, .. } => enc(req),
            Action::StartReplication(r) => enc(r),
            Action::CreateShare(r) => enc(r),
            Action::VerifyShare { req, .. } => enc(req),
            Action::ClusterAdd(r) => enc(r),
            Action::ClusterStandby(r) => enc(r),
            Action::ClusterPromote { req, .. } => enc(req),
            Action::ClusterResolve { req, .. } => enc(req),
            Action::ClusterDropCopy { req, .. } => enc(req),
            Action::PutAuditHead(r) => enc(r),
            Action::CreateSession(r) => enc(r),
            Action::StartEstimate(r) => enc(r),
            Action::ProbeLink(r) => enc(r),
            Action::CreateArchive(r) => enc(r),
            Action::RestoreArchive(r) => enc(r),
            _ => serde_json::json!({}),
        })
    }
}

fn push_wait(q: &mut Vec<String>, w: &StatusWait) {
    if let Some(s) = &w.wait_state {
        q.push(format!("wait_state={s}"));
    }
    if let Some(ms) = w.wait_ms {
        q.push(format!("wait_ms={ms}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::ROUTES;

    /// A minimal body each action with one accepts.
    fn sample_body(kind: ActionKind) -> &'static str {
        use ActionKind as K;
        match kind {
            K::AddNode => r#"{"name":"b","api":"h:1","token":"t","fingerprint":"f"}"#,
            K::Pair => {
                r#"{"name":"b","api":"h:1","replication":"h:2","fingerprint":"f","cert_pem":"c"}"#
            }
            K::Repin => r#"{"cert_pem":"c","fingerprint":"f"}"#,
            K::CreateToken => r#"{"name":"t","role":"viewer"}"#,
            K::CreateVolume => r#"{"name":"v","size_bytes":1}"#,
            K::ImportImage => r#"{"path":"/i.qcow2","format":"qcow2","volume":"v"}"#,
            K::ArmSnapshot => r#"{"token":1}"#,
            K::Takeover => r#"{"volumes":["v"]}"#,
            K::PrepareVmIncoming => r#"{"source":"a"}"#,
            K::CreateReplica => r#"{"volume":"v","volume_id":"i","size_bytes":1,"primary":"a"}"#,
            K::CreateWorkload | K::PutWorkload => r#"{"name":"w","volumes":["v"]}"#,
            K::StartMigration => r#"{"workload":"w","to":"b"}"#,
            K::ReverseMigration => r#"{"target":"a"}"#,
            K::StartReplication => r#"{"volume":"v","to":"b"}"#,
            K::CreateShare => r#"{"name":"s","path":"/x","mode":"sync"}"#,
            K::ClusterAdd => r#"{"workload":"w","preferred":"a"}"#,
            K::ClusterStandby => r#"{"node":"a","standby":true}"#,
            K::ClusterResolve => r#"{"keep":"a"}"#,
            K::ClusterDropCopy => r#"{"node":"a"}"#,
            K::PutAuditHead => r#"{"seq":1,"hash":"00"}"#,
            K::CreateSession => r#"{"token":"t.s"}"#,
            K::StartEstimate => r#"{"name":"e","volume":"v"}"#,
            K::ProbeLink => r#"{"to":"b"}"#,
            K::CreateArchive => r#"{"source":"volume/v","store":"/s"}"#,
            K::RestoreArchive => r#"{"store":"/s","archive":"a","volume":"v"}"#,
            _ => "{}",
        }
    }

    /// Every route decodes into an action of its kind, and that action
    /// encodes back to the route's method and path: the table and the
    /// `Action` enum cover each other.
    #[test]
    fn every_route_has_an_action_and_every_action_a_route() {
        for r in ROUTES {
            let mut params = Params::new();
            params.insert("name".into(), "w".into());
            params.insert("which".into(), "start".into());
            let mut query = Params::new();
            if r.kind == ActionKind::GetStats {
                query.insert("series".into(), "volume/v/write_iops".into());
            }
            let a = Action::decode(r.kind, &params, &query, sample_body(r.kind).as_bytes())
                .unwrap_or_else(|e| panic!("{:?}: {e}", r.kind));
            assert_eq!(a.kind(), r.kind);
            assert_eq!(a.method(), r.method);
            let mut want = r.path.replace("{name}", "w").replace("{which}", "start");
            if r.kind == ActionKind::GetStats {
                want.push_str("?series=volume/v/write_iops");
            }
            assert_eq!(a.path(), want, "{:?}", r.kind);
            assert_eq!(a.body().is_some(), r.method.has_body());
            if let Some(b) = a.body() {
                // What the client sends decodes to the same action.
                let again =
                    Action::decode(r.kind, &params, &Params::new(), b.to_string().as_bytes())
                        .unwrap();
                assert_eq!(again, a, "{:?}", r.kind);
            }
        }
    }

    #[test]
    fn bad_bodies_and_names_say_what_is_wrong() {
        let e = Action::decode(
            ActionKind::CreateVolume,
            &Params::new(),
            &Params::new(),
            br#"{"name":5,"size_bytes":1}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind.status(), 400);
        assert!(e.message.contains("name: invalid type"), "{e}");
        let e = Action::decode(
            ActionKind::CreateVolume,
            &Params::new(),
            &Params::new(),
            br#"{"name":"v","size_bytes":1,"colour":1}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("unknown field `colour`"), "{e}");
        let mut p = Params::new();
        p.insert("name".into(), "../../x".into());
        let e = Action::decode(ActionKind::DeleteVolume, &p, &Params::new(), b"").unwrap_err();
        assert_eq!(e.kind.status(), 400);
        assert!(e.message.contains("invalid name"), "{e}");
        p.insert("name".into(), "w".into());
        p.insert("which".into(), "rm".into());
        let e = Action::decode(ActionKind::RunHook, &p, &Params::new(), b"{}").unwrap_err();
        assert_eq!(e.kind.status(), 404);
    }
}
