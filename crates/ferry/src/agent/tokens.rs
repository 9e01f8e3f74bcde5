//! Named API tokens with roles (`ferry token create NAME --role R`).
//!
//! A token is `NAME.SECRET` (SECRET: 64 hex digits from the system's
//! random generator), shown once when it is made. The node keeps only the
//! BLAKE3 hash of SECRET, in `DATA_DIR/tokens.json` (0600, written
//! atomically, versioned): a copy of the data directory does not hold a
//! usable token. A token is valid on the node that made it only; a node
//! that forwards an action to its peer does so with its own certificate,
//! after checking the caller's role here.
//!
//! `DATA_DIR/api.token` (made at first start, `ferry token rotate`) stays
//! what it was — the local admin credential the CLI reads by default — and
//! is listed as the admin token `api.token`.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use ferry_api::Role;
use ferry_core::Name;
use serde::{Deserialize, Serialize};

/// The name the api.token file is listed under (not a valid token name:
/// it cannot be created or revoked).
pub const FILE_TOKEN_NAME: &str = "api.token";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: {why}; fix or move the file aside (the agent does not overwrite it)")]
    Corrupt { path: PathBuf, why: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a token named {0:?} exists: revoke it first, or choose another name")]
    Exists(String),
    #[error("no token named {0:?} (`ferry token list`)")]
    Unknown(String),
    #[error("{0:?} is the node's api.token: replace it with `ferry token rotate`")]
    FileToken(String),
    #[error("the system random generator failed")]
    Random,
}

/// One token as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    name: Name,
    role: Role,
    /// BLAKE3 of the secret part, hex.
    blake3: String,
    created_unix: u64,
}

/// `tokens.json`'s body (a [`crate::store`] record).
#[derive(Debug, Serialize, Deserialize)]
struct File {
    tokens: Vec<Entry>,
}

impl crate::store::Record for File {
    const KIND: &'static str = "tokens";
}

/// A token as `ferry token list` shows it (never its secret).
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub created_unix: Option<u64>,
    /// Where it is valid: this node only.
    pub scope: &'static str,
}

/// The node's named tokens.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    entries: RwLock<Vec<Entry>>,
}

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("tokens.json")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Tokens {
    /// Loads `DATA_DIR/tokens.json` (none yet: no named tokens). A file
    /// others can read, a corrupt one or one of a newer format is an error
    /// naming it.
    pub fn load(data_dir: &Path) -> Result<Tokens, TokenError> {
        let path = path(data_dir);
        let entries = match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(TokenError::Io { path, source }),
            Ok(_) => {
                let text = crate::transport::identity::read_secret(&path).map_err(|e| {
                    TokenError::Corrupt {
                        path: path.clone(),
                        why: format!("{e:#}"),
                    }
                })?;
                let d = crate::store::decode::<File>(&path, text.as_bytes()).map_err(|e| {
                    TokenError::Corrupt {
                        path: path.clone(),
                        why: e.to_string(),
                    }
                })?;
                if d.upgraded_from.is_some() {
                    crate::store::save(&path, &d.record).map_err(|e| TokenError::Corrupt {
                        path: path.clone(),
                        why: e.to_string(),
                    })?;
                    tracing::info!(path = %path.display(), "store.upgraded");
                }
                let f = d.record;
                for e in &f.tokens {
                    if blake3::Hash::from_hex(&e.blake3).is_err() {
                        return Err(TokenError::Corrupt {
                            path,
                            why: format!("token {:?} has no valid hash", e.name.as_str()),
                        });
                    }
                }
                f.tokens
            }
        };
        Ok(Tokens {
            path,
            entries: RwLock::new(entries),
        })
    }

    fn save(&self, entries: &[Entry]) -> Result<(), TokenError> {
        let f = File {
            tokens: entries.to_vec(),
        };
        crate::store::save(&self.path, &f).map_err(|e| TokenError::Corrupt {
            path: self.path.clone(),
            why: e.to_string(),
        })
    }

    /// A new token `NAME.SECRET` with `role`; the secret is returned once
    /// and only its hash is kept.
    pub fn create(&self, name: &Name, role: Role) -> Result<String, TokenError> {
        if name.as_str() == FILE_TOKEN_NAME {
            return Err(TokenError::FileToken(name.to_string()));
        }
        let secret = crate::transport::identity::random_hex(32).map_err(|_| TokenError::Random)?;
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if entries.iter().any(|e| e.name == *name) {
            return Err(TokenError::Exists(name.to_string()));
        }
        let mut next = entries.clone();
        next.push(Entry {
            name: name.clone(),
            role,
            blake3: blake3::hash(secret.as_bytes()).to_hex().to_string(),
            created_unix: unix_now(),
        });
        // Durable before it is usable.
        self.save(&next)?;
        *entries = next;
        Ok(format!("{name}.{secret}"))
    }

    /// Removes a token: it stops working at once.
    pub fn revoke(&self, name: &str) -> Result<(), TokenError> {
        if name == FILE_TOKEN_NAME {
            return Err(TokenError::FileToken(name.to_string()));
        }
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if !entries.iter().any(|e| e.name.as_str() == name) {
            return Err(TokenError::Unknown(name.to_string()));
        }
        let next: Vec<Entry> = entries
            .iter()
            .filter(|e| e.name.as_str() != name)
            .cloned()
            .collect();
        self.save(&next)?;
        *entries = next;
        Ok(())
    }

    /// Every token, the api.token file first.
    pub fn list(&self) -> Vec<TokenInfo> {
        let mut out = vec![TokenInfo {
            name: FILE_TOKEN_NAME.into(),
            role: Role::Admin,
            created_unix: None,
            scope: "node",
        }];
        out.extend(
            self.entries
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|e| TokenInfo {
                    name: e.name.to_string(),
                    role: e.role,
                    created_unix: Some(e.created_unix),
                    scope: "node",
                }),
        );
        out
    }

    /// The named token `presented` is, if it is one: (name, role). The
    /// hash comparison is constant-time (`blake3::Hash`'s equality).
    pub fn authenticate(&self, presented: &str) -> Option<(String, Role)> {
        let (name, secret) = presented.rsplit_once('.')?;
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let e = entries.iter().find(|e| e.name.as_str() == name)?;
        let want = blake3::Hash::from_hex(&e.blake3).ok()?;
        (blake3::hash(secret.as_bytes()) == want).then(|| (e.name.to_string(), e.role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_kept_hashed_and_work_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tokens::load(dir.path()).unwrap();
        let name = Name::parse("ops").unwrap();
        let secret = t.create(&name, Role::Operator).unwrap();
        assert!(secret.starts_with("ops."));
        assert_eq!(
            t.authenticate(&secret),
            Some(("ops".into(), Role::Operator))
        );
        assert_eq!(t.authenticate("ops.00"), None);
        assert_eq!(t.authenticate(&secret.replace("ops.", "other.")), None);
        assert!(matches!(
            t.create(&name, Role::Admin),
            Err(TokenError::Exists(_))
        ));
        let stored = std::fs::read_to_string(dir.path().join("tokens.json")).unwrap();
        let (_, plain) = secret.rsplit_once('.').unwrap();
        assert!(!stored.contains(plain), "the secret is stored in clear");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tokens.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        // Survives a reload; revoked, it stops working at once.
        let t = Tokens::load(dir.path()).unwrap();
        assert_eq!(
            t.authenticate(&secret),
            Some(("ops".into(), Role::Operator))
        );
        t.revoke("ops").unwrap();
        assert_eq!(t.authenticate(&secret), None);
        assert!(matches!(t.revoke("ops"), Err(TokenError::Unknown(_))));
        assert!(matches!(
            t.revoke(FILE_TOKEN_NAME),
            Err(TokenError::FileToken(_))
        ));
        assert_eq!(
            Tokens::load(dir.path()).unwrap().authenticate(&secret),
            None
        );
    }

    #[test]
    fn a_bad_file_is_an_error_naming_it_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens.json");
        for bad in [
            "{",
            r#"{"ferry_record": "tokens", "version": 2, "blake3": "00", "body": {"tokens": []}}"#,
            r#"{"version": 1, "tokens": [{"name": "../x", "role": "admin", "blake3": "00", "created_unix": 0}]}"#,
            r#"{"version": 1, "tokens": [{"name": "x", "role": "root", "blake3": "00", "created_unix": 0}]}"#,
        ] {
            crate::store::write_private(&p, bad.as_bytes()).unwrap();
            let e = Tokens::load(dir.path()).unwrap_err().to_string();
            assert!(e.contains("tokens.json"), "{e}");
            assert_eq!(std::fs::read_to_string(&p).unwrap(), bad);
        }
    }
}
