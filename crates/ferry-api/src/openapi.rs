//! The OpenAPI 3.1 document of the API, generated from the route table and
//! the request and reply types (their JSON Schemas, draft 2020-12: the
//! dialect of OpenAPI 3.1), served at `GET /api/v1/openapi.json`.

use schemars::generate::SchemaSettings;
use schemars::SchemaGenerator;
use serde_json::{json, Map, Value};

use crate::reply::{ErrorBody, Reply};
use crate::request::*;
use crate::routes::{ActionKind, ROUTES};

/// The request body schema of `kind`, if it takes one.
fn request_schema(kind: ActionKind, g: &mut SchemaGenerator) -> Option<schemars::Schema> {
    use ActionKind as K;
    Some(match kind {
        K::AddNode => g.subschema_for::<AddNode>(),
        K::Pair => g.subschema_for::<PairRequest>(),
        K::Repin => g.subschema_for::<Repin>(),
        K::CreateToken => g.subschema_for::<CreateToken>(),
        K::CreateVolume => g.subschema_for::<CreateVolume>(),
        K::ImportImage => g.subschema_for::<ImportImage>(),
        K::PromoteVolume => g.subschema_for::<Promote>(),
        K::ArmSnapshot => g.subschema_for::<ArmSnapshot>(),
        K::Takeover => g.subschema_for::<Takeover>(),
        K::PrepareVmIncoming => g.subschema_for::<VmIncomingRequest>(),
        K::CreateReplica => g.subschema_for::<CreateReplica>(),
        K::CreateWorkload | K::PutWorkload => g.subschema_for::<WorkloadSpec>(),
        K::RunHook => g.subschema_for::<HookRequest>(),
        K::StartMigration => g.subschema_for::<StartMigration>(),
        K::SetMigration | K::SetReplication => g.subschema_for::<SetRate>(),
        K::Cutover => g.subschema_for::<CutoverRequest>(),
        K::ScheduleCutover => g.subschema_for::<ScheduleRequest>(),
        K::ReverseMigration => g.subschema_for::<Reverse>(),
        K::StartReplication => g.subschema_for::<StartReplication>(),
        K::CreateShare => g.subschema_for::<CreateShare>(),
        K::VerifyShare => g.subschema_for::<ShareVerify>(),
        K::ClusterAdd => g.subschema_for::<ClusterAdd>(),
        K::ClusterStandby => g.subschema_for::<Standby>(),
        K::ClusterPromote => g.subschema_for::<ForcePromote>(),
        K::ClusterResolve => g.subschema_for::<Resolve>(),
        K::ClusterDropCopy => g.subschema_for::<DropCopy>(),
        K::PutAuditHead => g.subschema_for::<AuditHead>(),
        _ => return None,
    })
}

/// Query parameters of `kind`: (name, schema type, description).
fn query_params(kind: ActionKind) -> &'static [(&'static str, &'static str, &'static str)] {
    use ActionKind as K;
    match kind {
        K::VolumeHashes => &[
            (
                "fresh",
                "boolean",
                "Read the whole image, not the leaf cache.",
            ),
            (
                "warm",
                "boolean",
                "Bring the leaf cache up to date; answer only how many leaves.",
            ),
        ],
        K::PutWorkload | K::ClusterRemove => &[(
            "forwarded",
            "boolean",
            "Passed on by the peer: do not pass it on again.",
        )],
        K::GetReplication => &[
            ("wait_state", "string", "Answer once the state is this…"),
            (
                "wait_ms",
                "integer",
                "…or after this many ms (at most 5000).",
            ),
        ],
        K::GetShare => &[
            (
                "counts",
                "boolean",
                "`0`: do not walk the tree for files and bytes.",
            ),
            ("wait_state", "string", "Answer once the state is this…"),
            (
                "wait_ms",
                "integer",
                "…or after this many ms (at most 5000).",
            ),
        ],
        K::MigrationReport => &[(
            "format",
            "string",
            "`html`: the printable page (text/html; the console's links use it); `json` (the default): the reply below.",
        )],
        K::ListAudit => &[(
            "since",
            "string",
            "Only records from then on: RFC 3339, or an age (`90s`, `15m`, `1h`, `7d`).",
        )],
        K::GetStats => &[
            (
                "series",
                "string",
                "SCOPE/NAME/METRIC, e.g. volume/disk0/write_bytes_per_s (required).",
            ),
            ("from", "integer", "Unix s (default: `to` − `since`)."),
            ("to", "integer", "Unix s (default: now)."),
            (
                "since",
                "integer",
                "Seconds before `to`, when `from` is not given (default 3600).",
            ),
            (
                "step",
                "integer",
                "Seconds between points (default: the finest kept for the range).",
            ),
        ],
        _ => &[],
    }
}

/// The reply schema of `kind` (an object for the document itself).
fn reply_schema(kind: ActionKind, g: &mut SchemaGenerator) -> Value {
    match Reply::schema_for(kind, g).to_value() {
        Value::Bool(true) => json!({"type": "object"}),
        v => v,
    }
}

/// The document.
pub fn document() -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    settings.meta_schema = None;
    let mut g = settings.into_generator();
    let error = g.subschema_for::<ErrorBody>();
    let mut paths: Map<String, Value> = Map::new();
    for r in ROUTES {
        let mut params: Vec<Value> = r
            .params()
            .into_iter()
            .map(|p| {
                json!({"name": p, "in": "path", "required": true,
                    "schema": {"type": "string"},
                    "description": if p == "which" { "start, stop or check" } else { "a name: 1-64 of a-z 0-9 . _ -, starting with a letter or digit" }})
            })
            .collect();
        for (name, ty, doc) in query_params(r.kind) {
            params.push(
                json!({"name": name, "in": "query", "required": *name == "series",
                "schema": {"type": ty}, "description": doc}),
            );
        }
        let mut op = json!({
            "operationId": r.kind.name(),
            "summary": r.summary,
            "x-ferry-need": r.need.as_str(),
            "x-ferry-allowed-in": r.allowed_in.names(),
            "responses": {
                "200": {
                    "description": "The action's reply.",
                    "content": {"application/json": {"schema": reply_schema(r.kind, &mut g)}},
                },
                "default": {
                    "description": "400 bad input, 401 no or a wrong token, 403 a role too low or a peer-internal call, 404 unknown name, 409 wrong state, 413 body too large, 503 a peer that does not answer.",
                    "content": {"application/json": {"schema": error.clone()}},
                },
            },
        });
        if r.kind == ActionKind::MigrationReport {
            op["responses"]["200"]["content"]["text/html"] = json!({"schema": {"type": "string"}});
        }
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if let Some(s) = request_schema(r.kind, &mut g) {
            op["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": s}}});
        }
        let entry = paths.entry(r.path.to_string()).or_insert_with(|| json!({}));
        entry[r.method.as_str().to_ascii_lowercase()] = op;
    }
    let schemas = g.take_definitions(true);
    json!({
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "ferry agent API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Every route needs `Authorization: Bearer TOKEN` (a named token with a role, or DATA_DIR/api.token: admin) or a paired node's certificate; `x-ferry-need` is the least it needs (`peer`: a paired node's certificate only). `x-ferry-allowed-in` lists the node states an action is allowed in (409 otherwise).",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_in_the_document_with_its_schemas() {
        let d = document();
        for r in ROUTES {
            let op = &d["paths"][r.path][r.method.as_str().to_ascii_lowercase()];
            assert_eq!(op["operationId"], r.kind.name());
            assert!(op["responses"]["200"]["content"]["application/json"]["schema"].is_object());
        }
        let s = &d["components"]["schemas"]["CutoverReport"];
        assert_eq!(s["properties"]["downtime_ms"]["type"], "number", "{s}");
        // Every reference resolves.
        let text = d.to_string();
        for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &part[..part.find('"').unwrap()];
            assert!(d["components"]["schemas"][name].is_object(), "{name}");
        }
    }
}
