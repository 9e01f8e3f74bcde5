//! The REST API (`/api/v1`): the server the agent runs. Its client, the
//! CLI's and the peers', is `transport::client`.

pub mod report_html;
pub mod server;
