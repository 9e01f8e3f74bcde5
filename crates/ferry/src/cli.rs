//! Every command, flag and environment variable of the `ferry` binary, in one place.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ferry_core::ByteSize;
use ferry_nbd::ListenAddr;

/// ferry keeps a server's volumes replicated to another server, so its workload
/// can be live-migrated or failed over. Exit codes: 0 ok, 1 failed, 2 usage.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Where volumes and state live.
    #[arg(
        long,
        global = true,
        env = "FERRY_DATA_DIR",
        default_value = "/var/lib/ferry"
    )]
    pub data_dir: PathBuf,
    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log level on stderr: error, warn, info, debug or trace.
    #[arg(long, global = true, env = "FERRY_LOG", default_value = "info")]
    pub log_level: tracing::Level,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list, resize and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Serve a volume over NBD until interrupted (SIGINT or SIGTERM).
    Export(ExportArgs),
    /// The main job on an embedded default: a fresh sparse volume served on 127.0.0.1.
    Demo(DemoArgs),
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a sparse volume.
    Create {
        name: String,
        /// Size, e.g. 10GiB, 512MiB or 1073741824 (a multiple of 512 bytes).
        #[arg(long)]
        size: ByteSize,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show { name: String },
    /// Change a volume's size (refused while it is exported).
    Resize {
        name: String,
        #[arg(long)]
        size: ByteSize,
        /// Allow a smaller size; the bytes past the new end are lost.
        #[arg(long)]
        shrink: bool,
    },
    /// Delete a volume and its data (refused while it is exported).
    Delete {
        name: String,
        /// Confirm that the volume's data is to be destroyed.
        #[arg(long)]
        yes: bool,
    },
}

/// Limits of an NBD export; each is enforced by the server.
#[derive(Debug, Args, Clone)]
pub struct ExportLimitArgs {
    /// Largest single read or write (also the advertised maximum block size).
    #[arg(long, default_value = "32MiB")]
    pub max_request_bytes: ByteSize,
    /// Requests served at once on one connection.
    #[arg(long, default_value_t = 16)]
    pub max_in_flight_per_connection: usize,
    /// Connections served at once; more are closed on accept.
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
    /// A client must finish the handshake within this many milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The volume to serve; the NBD export name is the volume name.
    pub name: String,
    /// HOST:PORT (port 0 picks a free one) or unix:PATH. May be repeated.
    #[arg(long, required = true)]
    pub listen: Vec<ListenAddr>,
    /// Refuse writes (the export is advertised read-only).
    #[arg(long)]
    pub read_only: bool,
    #[command(flatten)]
    pub limits: ExportLimitArgs,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of the demo volume.
    #[arg(long, default_value = "1GiB")]
    pub size: ByteSize,
    /// Where to serve it; if the port is taken, a free one is picked.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub listen: ListenAddr,
}
