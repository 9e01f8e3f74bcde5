//! A live VM move, the target's side: the VM waiting for its RAM on
//! standby exports of the replicas ([`crate::volume::standby`]), the
//! one-time token its stream presents, and the rollback that ends it.
//! The source's side is [`crate::vm::live`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Result};
use ferry_api::reply::{VmIncoming, VmIncomingCancelled};
use ferry_api::ActionError;

use super::AgentCtx;
use crate::volume::standby::StandbyDevice;

/// A VM waiting here for a live move's RAM.
#[derive(Debug)]
struct Waiting {
    /// The token the source's stream must present (taken by its first use).
    token: Option<String>,
    /// The move's token as the commit presents it (kept).
    move_token: String,
    /// QEMU's `-incoming` socket.
    socket: PathBuf,
    /// The node the VM moves from.
    source: String,
}

/// The target's side of live moves: waiting VMs, standby exports.
#[derive(Debug, Default)]
pub struct IncomingVms {
    waiting: Mutex<HashMap<String, Waiting>>,
    /// Standby exports by volume, until the promotion takes them over.
    standby: Mutex<HashMap<String, Arc<StandbyDevice>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl IncomingVms {
    /// The standby export of `volume`, if one waits to be promoted: the
    /// promotion hands it the primary instead of exporting anew (the VM's
    /// NBD connection survives).
    pub fn take_standby(&self, volume: &str) -> Option<Arc<StandbyDevice>> {
        lock(&self.standby).remove(volume)
    }
}

impl AgentCtx {
    /// `POST /api/v1/workloads/W/vm-incoming` (from the source): the VM of
    /// `workload` starts here paused, waiting for its RAM, on standby
    /// exports of its replicas.
    pub fn prepare_vm_incoming(
        self: &Arc<Self>,
        workload: &str,
        source: &str,
    ) -> Result<VmIncoming> {
        let _one = self.admin();
        let spec = crate::workload::load_workload(&self.cfg.data_dir, workload)?
            .ok_or_else(|| ActionError::not_found(format!("no workload {workload:?} here")))?;
        let vm = spec
            .vm
            .as_ref()
            .ok_or_else(|| ActionError::bad_input(format!("workload {workload:?} has no VM")))?;
        if self.peers.get(source).is_none() {
            bail!(ActionError::bad_input(format!(
                "node {source:?} is not registered here"
            )));
        }
        // A VM left waiting by an earlier attempt is ended first.
        if self.vms.is_incoming(workload) {
            tracing::warn!(
                workload,
                "vm.incoming.stale: ending the VM an earlier move left waiting"
            );
            self.end_incoming(workload, &spec.volumes);
        }
        if self.vms.is_running(workload) {
            bail!(ActionError::conflict(format!(
                "the VM of {workload:?} already runs on {}: it cannot receive a live move",
                self.identity.node_name
            )));
        }
        let volumes = crate::workload::names(&spec.volumes);
        let mut exported = Vec::new();
        let set_up = (|| -> Result<PathBuf> {
            for v in &volumes {
                let replica = self.replica(v).ok_or_else(|| {
                    ActionError::conflict(format!(
                        "volume {v:?} is not a replica on {}: the VM cannot wait for its RAM here",
                        self.identity.node_name
                    ))
                })?;
                let dev = Arc::new(StandbyDevice::new(replica));
                self.nbd.add_export(ferry_nbd::Export {
                    name: v.clone(),
                    description: format!("ferry volume {v} (standby for a live VM move)"),
                    // Writable: see volume::standby (EPERM until the commit).
                    read_only: false,
                    device: dev.clone(),
                })?;
                lock(&self.incoming_vms.standby).insert(v.clone(), dev);
                exported.push(v.clone());
            }
            self.vms.start_incoming(
                &self.cfg.data_dir,
                &self.nbd_uri_base,
                workload,
                &volumes,
                vm,
                &self.cfg.vm,
            )
        })();
        let socket = match set_up {
            Ok(s) => s,
            Err(e) => {
                self.end_incoming(workload, &spec.volumes);
                return Err(e);
            }
        };
        let token = crate::transport::identity::random_hex(32)
            .map_err(|_| anyhow!("the system random generator failed"))?;
        lock(&self.incoming_vms.waiting).insert(
            workload.to_string(),
            Waiting {
                token: Some(token.clone()),
                move_token: token.clone(),
                socket,
                source: source.to_string(),
            },
        );
        tracing::info!(workload, source, exports = ?exported, "vm.incoming.waiting");
        Ok(VmIncoming {
            workload: workload.to_string(),
            token,
            exports: exported,
        })
    }

    /// The socket of the VM waiting for `workload`'s stream, if `token` is
    /// its token (used once) and `from` is the node it moves from.
    pub fn incoming_vm_socket(
        &self,
        workload: &str,
        token: &str,
        from: &str,
    ) -> std::result::Result<PathBuf, String> {
        let mut w = lock(&self.incoming_vms.waiting);
        let Some(entry) = w.get_mut(workload) else {
            return Err(format!(
                "no VM of {workload:?} waits for a live move on {}",
                self.identity.node_name
            ));
        };
        if entry.source != from {
            return Err(format!(
                "the VM of {workload:?} waits for a move from {}, not from {from}",
                entry.source
            ));
        }
        match entry.token.take() {
            Some(t)
                if crate::transport::identity::constant_time_eq(t.as_bytes(), token.as_bytes()) =>
            {
                Ok(entry.socket.clone())
            }
            Some(t) => {
                entry.token = Some(t);
                Err("wrong stream token for this live move".into())
            }
            None => Err("this live move's stream was already opened".into()),
        }
    }

    /// At a cutover's commit here: a VM waiting for `workload` continues at
    /// the workload's start only if the commit names its move (`vm_token`);
    /// any other waiting VM holds a state that may be stale and is ended.
    pub fn settle_incoming_at_commit(&self, workload: &str, vm_token: Option<&str>) {
        if !self.vms.is_incoming(workload) {
            return;
        }
        let matches = {
            let w = lock(&self.incoming_vms.waiting);
            match (w.get(workload), vm_token) {
                (Some(e), Some(t)) => crate::transport::identity::constant_time_eq(
                    e.move_token.as_bytes(),
                    t.as_bytes(),
                ),
                _ => false,
            }
        };
        if matches {
            self.vms.arm_incoming(workload);
            lock(&self.incoming_vms.waiting).remove(workload);
            tracing::info!(
                workload,
                "vm.incoming.armed: the committed move's VM continues at the start"
            );
        } else {
            tracing::warn!(
                workload,
                "vm.incoming.stale: the commit does not name the move this VM waits for; ended"
            );
            let volumes = crate::workload::load_workload(&self.cfg.data_dir, workload)
                .ok()
                .flatten()
                .map(|s| s.volumes)
                .unwrap_or_default();
            self.end_incoming(workload, &volumes);
        }
    }

    /// `DELETE /api/v1/workloads/W/vm-incoming` (from the source, a
    /// rollback): the waiting VM ends, the standby exports go. Refused once
    /// a volume was promoted (the commit happened: the VM belongs here).
    pub fn cancel_vm_incoming(&self, workload: &str) -> Result<VmIncomingCancelled> {
        let _one = self.admin();
        let spec = crate::workload::load_workload(&self.cfg.data_dir, workload)?
            .ok_or_else(|| ActionError::not_found(format!("no workload {workload:?} here")))?;
        if spec.volumes.iter().any(|v| self.primary(v).is_some()) {
            bail!(ActionError::conflict(format!(
                "{} took {workload:?} over (the commit happened): its VM is not cancelled",
                self.identity.node_name
            )));
        }
        let (vm_ended, exports_removed) = self.end_incoming(workload, &spec.volumes);
        Ok(VmIncomingCancelled {
            workload: workload.to_string(),
            vm_ended,
            exports_removed,
        })
    }

    /// Ends the waiting VM of `workload` and removes its standby exports
    /// (those not promoted).
    fn end_incoming(&self, workload: &str, volumes: &[ferry_core::Name]) -> (bool, Vec<String>) {
        lock(&self.incoming_vms.waiting).remove(workload);
        let vm_ended = self.vms.is_incoming(workload) && self.vms.kill(workload);
        let mut removed = Vec::new();
        for v in volumes {
            let v = v.to_string();
            let standby = lock(&self.incoming_vms.standby).remove(&v);
            if let Some(dev) = standby {
                if !dev.is_promoted() && self.nbd.remove_export(&v) {
                    removed.push(v);
                }
            }
        }
        tracing::info!(workload, vm_ended, exports = ?removed, "vm.incoming.ended");
        (vm_ended, removed)
    }
}
