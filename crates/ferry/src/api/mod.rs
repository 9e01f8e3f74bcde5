//! The REST API (`/api/v1`): the server the agent runs, and the client the CLI uses.

pub mod client;
pub mod server;
