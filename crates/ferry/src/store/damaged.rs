//! Objects the agent found damaged and set aside: one bad record must not
//! take the node (or every other object of its kind) down. Each is logged
//! once, listed in `GET /api/v1/node` and `cluster status` as `damaged`,
//! and left on disk untouched for the operator.

use std::sync::Mutex;

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DamagedObject {
    /// `volume`, `share`, `workload`, `migration`, `cluster-record`, `peers`.
    pub kind: &'static str,
    pub name: String,
    pub path: String,
    pub error: String,
}

#[derive(Debug, Default)]
pub struct Damaged(Mutex<Vec<DamagedObject>>);

impl Damaged {
    /// Records `name` of `kind` as damaged (once; a later report replaces
    /// the error).
    pub fn report(&self, kind: &'static str, name: &str, path: &std::path::Path, error: String) {
        let mut list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let obj = DamagedObject {
            kind,
            name: name.to_string(),
            path: path.display().to_string(),
            error,
        };
        match list.iter_mut().find(|o| o.kind == kind && o.name == name) {
            Some(o) if *o == obj => return,
            Some(o) => *o = obj.clone(),
            None => list.push(obj.clone()),
        }
        tracing::error!(kind, name, path = %obj.path, error = %obj.error,
            "agent.damaged: set aside, the rest is served; repair or remove it");
    }

    /// `name` of `kind` loaded fine after all (repaired, or made anew).
    pub fn clear(&self, kind: &'static str, name: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|o| !(o.kind == kind && o.name == name));
    }

    pub fn list(&self) -> Vec<DamagedObject> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
