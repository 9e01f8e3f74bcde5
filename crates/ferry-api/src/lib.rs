//! ferry-api: the control plane's types, shared by the agent (which serves
//! them) and the CLI (which calls them). No I/O: types and decisions only.
//!
//! Today: [`auth`] — the roles a named API token can hold, what each route
//! needs ([`auth::Need`]) and the one decision whether a caller may
//! ([`auth::Need::check`]).

pub mod auth;

pub use auth::{Authority, Denied, Need, Role};
