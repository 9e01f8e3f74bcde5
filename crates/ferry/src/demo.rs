//! `ferry demo`: the main job on an embedded default. Today: a fresh sparse volume
//! served over NBD on 127.0.0.1, with the commands to try it. Later issues grow
//! this into the live-migration demo.

use anyhow::{Context, Result};
use ferry_core::ByteSize;
use ferry_nbd::{ListenAddr, ServerLimits};

use crate::cli::DemoArgs;
use crate::signals;
use crate::volume::VolumeStore;

const DEMO_VOLUME: &str = "demo";

pub fn run(args: &DemoArgs, json: bool) -> Result<()> {
    let signals = signals::Signals::block()?;
    let dir = tempfile_dir()?;
    let result = serve(&dir, args, json, &signals);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let base = std::env::temp_dir();
    let dir = base.join(format!("ferry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn serve(
    dir: &std::path::Path,
    args: &DemoArgs,
    json: bool,
    signals: &signals::Signals,
) -> Result<()> {
    let store = VolumeStore::open(dir)?;
    store.create(DEMO_VOLUME, args.size.bytes())?;
    let started = crate::export::start(
        &store,
        DEMO_VOLUME,
        std::slice::from_ref(&args.listen),
        false,
        ServerLimits::default(),
    );
    let running = match (started, &args.listen) {
        (Ok(r), _) => r,
        (Err(e), ListenAddr::Tcp(addr)) if addr.port() != 0 => {
            tracing::warn!(listen = %addr, error = %format!("{e:#}"), "demo.port_busy: picking a free port");
            let mut any = *addr;
            any.set_port(0);
            crate::export::start(
                &store,
                DEMO_VOLUME,
                &[ListenAddr::Tcp(any)],
                false,
                ServerLimits::default(),
            )?
        }
        (Err(e), _) => return Err(e),
    };
    let uri = running.listening.uris[0].clone();
    if json {
        crate::print_json(&running.listening)?;
    } else {
        println!(
            "ferry demo: volume {DEMO_VOLUME:?} ({}) in {}",
            ByteSize(args.size.bytes()),
            dir.display()
        );
        println!("serving it over NBD at {uri}");
        println!();
        println!("try, from another terminal:");
        println!("  nbdinfo {uri}");
        println!("  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' {uri}");
        println!("  nbdinfo --map {uri}");
        println!("  qemu-img convert -p -O qcow2 {uri} demo.qcow2");
        println!();
        println!("Ctrl-C stops the demo and removes its data.");
    }
    crate::flush_stdout();
    signals.wait()?;
    running.stop();
    Ok(())
}
