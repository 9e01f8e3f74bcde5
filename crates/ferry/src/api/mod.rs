//! The REST API (`/api/v1`): the server the agent runs. Its client, the
//! CLI's and the peers', is `transport::client`. The web console's files
//! (`console`), its sessions (`session`) and the event stream (`events`)
//! are served on the same listener.

pub mod console;
pub mod events;
pub mod report_html;
pub mod server;
pub mod session;
