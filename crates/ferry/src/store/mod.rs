//! Typed, versioned, checksummed records: every JSON record the agent keeps
//! in its data directory (workloads, migrations, HA state, shares, the
//! takeover commit, peers, volumes, tokens) goes through here.
//!
//! On disk a record is an envelope:
//!
//! ```json
//! {"ferry_record": "migration", "version": 1, "blake3": "…", "body": {…}}
//! ```
//!
//! `blake3` is the hash of the body's canonical JSON (keys sorted, no
//! whitespace: serde_json's own map order). Written atomically (a temporary
//! file, fsync, rename, directory fsync), mode 0600.
//!
//! Reading: a record of another kind, a body that does not match its hash,
//! a version newer than this ferry reads, or a body that does not fit the
//! type is an error naming the file ([`StoreError`]), and the file is left
//! exactly as it is (the agent sets such records aside and lists them under
//! `damaged`). A file without the envelope is a record written before issue
//! 19 (version 0): it is read as it is and rewritten in the envelope at once
//! (logged `store.upgraded`), so a data directory of the previous release
//! upgrades itself at first start.

pub mod damaged;

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A kind of record and its current format version.
pub trait Record: Serialize + DeserializeOwned {
    /// Names the kind in the envelope (`workload`, `migration`, …).
    const KIND: &'static str;
    /// The format this ferry writes; it reads this and every older one.
    const VERSION: u32 = 1;

    /// The record from a body of an older `version` (0: before the
    /// envelope). The default reads it as today's type (fields added since
    /// have serde defaults).
    fn upgrade(version: u32, body: Value) -> Result<Self, String> {
        let _ = version;
        serde_json::from_value(body).map_err(|e| e.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is damaged: {why}; it was left as it is (repair it, or move it aside)")]
    Corrupt { path: PathBuf, why: String },
    #[error("{path} is a {kind} record of format version {version}, newer than this ferry reads ({supported}): upgrade ferry; the file was left as it is")]
    Newer {
        path: PathBuf,
        kind: &'static str,
        version: u32,
        supported: u32,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    ferry_record: String,
    version: u32,
    blake3: String,
    body: Value,
}

fn digest(body: &Value) -> String {
    // serde_json's map is ordered by key: this is canonical.
    blake3::hash(&serde_json::to_vec(body).unwrap_or_default())
        .to_hex()
        .to_string()
}

/// The bytes `r` is stored as.
pub fn encode<R: Record>(r: &R) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_value(r)?;
    let env = Envelope {
        ferry_record: R::KIND.to_string(),
        version: R::VERSION,
        blake3: digest(&body),
        body,
    };
    serde_json::to_vec_pretty(&env)
}

/// Writes `r` to `path` atomically, mode 0600.
pub fn save<R: Record>(path: &Path, r: &R) -> Result<(), StoreError> {
    let bytes = encode(r).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        why: format!("cannot encode: {e}"),
    })?;
    write_atomic_private(path, &bytes).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a file atomically and durably, mode 0600: a temporary file
/// beside it (made private before anything is written to it), fsync,
/// rename over the old one, fsync of the directory (the rename itself is
/// durable only then).
pub fn write_atomic_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // A stale temp file keeps its old mode: make it private before writing.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// [`write_atomic_private`] with the path in its error.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    write_atomic_private(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// A record decoded: whether it was in an older format.
#[derive(Debug)]
pub struct Decoded<R> {
    pub record: R,
    pub upgraded_from: Option<u32>,
}

/// Decodes the bytes of the record file `path`.
pub fn decode<R: Record>(path: &Path, bytes: &[u8]) -> Result<Decoded<R>, StoreError> {
    let corrupt = |why: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    let v: Value = serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not JSON: {e}")))?;
    let enveloped = v
        .as_object()
        .is_some_and(|o| o.contains_key("ferry_record"));
    if !enveloped {
        let record =
            R::upgrade(0, v).map_err(|e| corrupt(format!("not a {} record: {e}", R::KIND)))?;
        return Ok(Decoded {
            record,
            upgraded_from: Some(0),
        });
    }
    let env: Envelope =
        serde_json::from_value(v).map_err(|e| corrupt(format!("bad envelope: {e}")))?;
    if env.ferry_record != R::KIND {
        return Err(corrupt(format!(
            "a {} record where a {} record belongs",
            env.ferry_record,
            R::KIND
        )));
    }
    if env.version > R::VERSION {
        return Err(StoreError::Newer {
            path: path.to_path_buf(),
            kind: R::KIND,
            version: env.version,
            supported: R::VERSION,
        });
    }
    if digest(&env.body) != env.blake3 {
        return Err(corrupt(
            "its checksum does not match its contents (changed by hand, or the disk damaged it)"
                .into(),
        ));
    }
    if env.version == R::VERSION {
        let record = serde_json::from_value(env.body)
            .map_err(|e| corrupt(format!("does not fit a {} record: {e}", R::KIND)))?;
        return Ok(Decoded {
            record,
            upgraded_from: None,
        });
    }
    let from = env.version;
    let record = R::upgrade(from, env.body)
        .map_err(|e| corrupt(format!("cannot upgrade from version {from}: {e}")))?;
    Ok(Decoded {
        record,
        upgraded_from: Some(from),
    })
}

/// Reads the record at `path` (`None` if there is none); one in an older
/// format is rewritten in today's at once.
pub fn load<R: Record>(path: &Path) -> Result<Option<R>, StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let d = decode::<R>(path, &bytes)?;
    if let Some(from) = d.upgraded_from {
        save(path, &d.record)?;
        tracing::info!(path = %path.display(), kind = R::KIND, from, to = R::VERSION, "store.upgraded");
    }
    Ok(Some(d.record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Thing {
        name: String,
        #[serde(default)]
        n: u64,
    }
    impl Record for Thing {
        const KIND: &'static str = "thing";
    }

    #[test]
    fn records_round_trip_and_old_ones_upgrade_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.json");
        let t = Thing {
            name: "x".into(),
            n: 7,
        };
        save(&p, &t).unwrap();
        assert_eq!(load::<Thing>(&p).unwrap(), Some(t));
        // Before the envelope: read, then rewritten in it.
        std::fs::write(&p, br#"{"name": "old"}"#).unwrap();
        assert_eq!(
            load::<Thing>(&p).unwrap(),
            Some(Thing {
                name: "old".into(),
                n: 0
            })
        );
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"ferry_record\": \"thing\""), "{text}");
        assert_eq!(load::<Thing>(&dir.path().join("none.json")).unwrap(), None);
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Rates {
        r: Vec<f64>,
    }
    impl Record for Rates {
        const KIND: &'static str = "rates";
    }

    /// The checksum is over the body as parsed back: floats must come back
    /// bit for bit (serde_json's `float_roundtrip`), or a record with rates
    /// in it (a migration's) would now and then read as damaged.
    #[test]
    fn floats_survive_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let r: Vec<f64> = (0..20_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 1_000_000_007) as f64 / 7.3 * 1e-3 + (x >> 40) as f64 * 1.1e5
            })
            .collect();
        let rec = Rates { r };
        save(&p, &rec).unwrap();
        assert_eq!(load::<Rates>(&p).unwrap(), Some(rec));
    }

    #[test]
    fn damage_a_newer_format_or_another_kind_is_an_error_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.json");
        save(
            &p,
            &Thing {
                name: "x".into(),
                n: 1,
            },
        )
        .unwrap();
        let good = std::fs::read_to_string(&p).unwrap();
        let cases = [
            good.replace("\"n\": 1", "\"n\": 2"),
            good.replace("\"version\": 1", "\"version\": 9"),
            good.replace("\"ferry_record\": \"thing\"", "\"ferry_record\": \"other\""),
            good[..good.len() / 2].to_string(),
            r#"{"name": 5}"#.to_string(),
        ];
        let says = [
            "checksum",
            "newer than this ferry reads",
            "where a thing record belongs",
            "not JSON",
            "not a thing record",
        ];
        for (bad, says) in cases.iter().zip(says) {
            std::fs::write(&p, bad).unwrap();
            let e = load::<Thing>(&p).unwrap_err().to_string();
            assert!(e.contains("t.json") && e.contains(says), "{e}");
            assert_eq!(
                &std::fs::read_to_string(&p).unwrap(),
                bad,
                "the file was changed"
            );
        }
    }
}
