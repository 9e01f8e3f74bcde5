//! ferry-api: the control plane's types, shared by the agent (which serves
//! them) and the CLI (which calls them). No I/O: types and decisions only.
//!
//! - [`routes`]: the one route table — every [`ActionKind`] with its method,
//!   path, least role ([`Need`]) and the node states it is allowed in;
//! - [`action`]: [`Action`], each call typed, decoded from a request
//!   ([`Action::decode`]) or encoded into one ([`Action::path`],
//!   [`Action::body`]); [`request`]: the request bodies;
//! - [`reply`]: every reply typed, exactly as on the wire ([`Reply`]);
//! - [`openapi`]: the OpenAPI 3.1 document generated from all of these;
//! - [`auth`]: roles and the one decision whether a caller may
//!   ([`auth::Need::check`]); [`error`]: an action's failure in kinds that
//!   map to HTTP statuses (400, 401, 403, 404, 409, 413, 503, 500).

pub mod action;
pub mod auth;
pub mod error;
pub mod openapi;
pub mod reply;
pub mod request;
pub mod routes;

pub use action::{Action, Params};
pub use auth::{Authority, Denied, Need, Role};
pub use error::{ActionError, ErrorKind};
pub use reply::Reply;
pub use routes::{ActionKind, Method, NodeState, Route, States, ROUTES};
