//! ferry-api: the control plane's types, shared by the agent (which serves
//! them) and the CLI (which calls them). No I/O: types and decisions only.
//!
//! Today: [`auth`] — the roles a named API token can hold, what each route
//! needs ([`auth::Need`]) and the one decision whether a caller may
//! ([`auth::Need::check`]); [`error`] — an action's failure in kinds that
//! map to HTTP statuses (400, 401, 403, 404, 409, 413, 503, 500).

pub mod auth;
pub mod error;

pub use auth::{Authority, Denied, Need, Role};
pub use error::{ActionError, ErrorKind};
