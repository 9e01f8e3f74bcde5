//! The `ferry` binary: a thin edge over the library crates. Parses the command
//! line, sets up logging, runs one command, prints its result, and turns errors
//! into exit codes (0 ok, 1 failed, 2 usage).

mod agent;
mod api;
mod archive;
mod audit;
mod cli;
mod cluster;
mod config;
mod estimate;
mod handover;
mod history;
mod migration;
mod share;
mod store;
mod sys;
mod transport;
mod vm;
mod volume;
mod workload;

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use ferry_core::ByteSize;

use cli::{demo, export, remote};
use cli::{Cli, Command, VolumeCommand};
use volume::VolumeStore;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_max_level(cli.global.log_level)
        .with_writer(sys::logging::MakeWriter)
        .with_target(false)
        .init();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if cli.global.json {
                let _ = print_json(&serde_json::json!({ "error": format!("{e:#}") }));
            }
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    let json = cli.global.json;
    match &cli.command {
        Command::Volume(VolumeCommand::Create { name, size })
            if std::env::var_os("FERRY_API").is_some() =>
        {
            // With an agent, volumes are created through it so it exports them at once.
            let conn = cli::AgentConn {
                api: std::env::var("FERRY_API").ok(),
                token_file: None,
                api_fingerprint: std::env::var("FERRY_API_FINGERPRINT").ok(),
            };
            remote::create_volume(&conn, &cli.global.data_dir, name, size.bytes(), json)
        }
        Command::Volume(VolumeCommand::Delete { name, yes })
            if std::env::var_os("FERRY_API").is_some() =>
        {
            if !*yes {
                bail!("deleting volume {name} destroys its data: pass --yes to confirm");
            }
            let conn = cli::AgentConn {
                api: std::env::var("FERRY_API").ok(),
                token_file: None,
                api_fingerprint: std::env::var("FERRY_API_FINGERPRINT").ok(),
            };
            remote::delete_volume(&conn, &cli.global.data_dir, name, json)
        }
        Command::Volume(cmd) => {
            volume_command(&VolumeStore::open(&cli.global.data_dir)?, cmd, json)
        }
        Command::Export(args) => export::run(&VolumeStore::open(&cli.global.data_dir)?, args, json),
        Command::Demo(args) => demo::run(args, json),
        Command::Agent { config } => {
            agent::run(config, |l, ctx| Box::pin(api::server::serve(l, ctx)))
        }
        Command::Node(cmd) => remote::node(cmd, &cli.global.data_dir, json),
        Command::Nbd(cli::NbdCommand::ClientCert { name, out, days }) => {
            agent::nbd_tls::client_cert(&cli.global.data_dir, name, out.as_deref(), *days, json)
        }
        Command::Replicate(cmd) => remote::replicate(cmd, &cli.global.data_dir, json),
        Command::Workload(cmd) => remote::workload(cmd, &cli.global.data_dir, json),
        Command::Migrate(cmd) => remote::migrate(cmd, &cli.global.data_dir, json),
        Command::Cluster(cmd) => remote::cluster(cmd, &cli.global.data_dir, json),
        Command::Share(cmd) => remote::share(cmd, &cli.global.data_dir, json),
        Command::Token(cmd) => remote::token_cmd(cmd, &cli.global.data_dir, json),
        Command::Audit(cmd) => remote::audit(cmd, &cli.global.data_dir, json),
        Command::Events { follow, conn } => {
            remote::events(conn, &cli.global.data_dir, *follow, json)
        }
        Command::Stats(args) => remote::stats(args, &cli.global.data_dir, json),
        Command::Estimate(cmd) => cli::estimate::run(cmd, &cli.global.data_dir, json),
        Command::Archive(cmd) => cli::archive::run(cmd, &cli.global.data_dir, json),
        Command::P2v(cmd) => cli::p2v::run(cmd, &cli.global.data_dir, json),
        Command::Api(cli::ApiCommand::Openapi) => remote::openapi(),
        Command::Api(cli::ApiCommand::Routes) => {
            // The served router is built from this table (api::server::routes).
            let routes: Vec<serde_json::Value> = ferry_api::ROUTES
                .iter()
                .map(|r| {
                    serde_json::json!({"method": r.method.as_str(), "path": r.path,
                        "need": r.need.as_str(), "allowed_in": r.allowed_in.names(),
                        "action": r.kind.name()})
                })
                .collect();
            if json {
                print_json(&routes)
            } else {
                for r in ferry_api::ROUTES {
                    println!(
                        "{:<7} {:<60} {:<9} {}",
                        r.method.as_str(),
                        r.path,
                        r.need.as_str(),
                        r.allowed_in.names().join(",")
                    );
                }
                println!("{:<7} /metrics (no token)", "GET");
                Ok(())
            }
        }
        Command::Witness { listen, key_file } => {
            cluster::witness::run(*listen, &cli.global.data_dir, key_file.as_deref())
        }
    }
}

fn volume_command(store: &VolumeStore, cmd: &VolumeCommand, json: bool) -> Result<()> {
    match cmd {
        VolumeCommand::Verify { name, conn } => {
            return remote::verify(name, conn, store.data_dir(), json);
        }
        VolumeCommand::Create { name, size } => {
            store.create(name, size.bytes())?;
            let info = store.info(name)?;
            if json {
                print_json(&info)?;
            } else {
                println!(
                    "created volume {} ({}) at {}",
                    info.name,
                    ByteSize(info.size_bytes),
                    info.path.display()
                );
            }
        }
        VolumeCommand::List => {
            let list = store.list()?;
            if json {
                print_json(&list)?;
            } else if list.is_empty() {
                println!("no volumes (create one with `ferry volume create NAME --size 10GiB`)");
            } else {
                println!(
                    "{:<24} {:>12} {:>12}  EXPORTED",
                    "NAME", "SIZE", "ALLOCATED"
                );
                for v in &list {
                    println!(
                        "{:<24} {:>12} {:>12}  {}",
                        v.name,
                        ByteSize(v.size_bytes).to_string(),
                        ByteSize(v.allocated_bytes).to_string(),
                        if v.exported { "yes" } else { "no" }
                    );
                }
            }
        }
        VolumeCommand::Show { name } => {
            let v = store.info(name)?;
            if json {
                print_json(&v)?;
            } else {
                println!("name:      {}", v.name);
                println!("id:        {}", v.id);
                println!(
                    "size:      {} ({} bytes)",
                    ByteSize(v.size_bytes),
                    v.size_bytes
                );
                println!("allocated: {}", ByteSize(v.allocated_bytes));
                println!("exported:  {}", if v.exported { "yes" } else { "no" });
                println!("image:     {}", v.path.display());
            }
        }
        VolumeCommand::Resize { name, size, shrink } => {
            store.resize(name, size.bytes(), *shrink)?;
            let info = store.info(name)?;
            if json {
                print_json(&info)?;
            } else {
                println!(
                    "resized volume {} to {}",
                    info.name,
                    ByteSize(info.size_bytes)
                );
            }
        }
        VolumeCommand::Delete { name, yes } => {
            store.delete(name, *yes)?;
            if json {
                print_json(&serde_json::json!({ "deleted": name }))?;
            } else {
                println!("deleted volume {name}");
            }
        }
    }
    Ok(())
}

pub use sys::out::{flush_stdout, print_json};
