//! A node's identity, made on first start: a TLS key and self-signed
//! certificate (`DATA_DIR/tls/node.{key,crt}`, the key 0600; valid
//! [`CERT_VALID_DAYS`], replaced by `ferry node rekey`) and the REST API
//! bearer token (`DATA_DIR/api.token`, 0600; `ferry token rotate`). Peers pin
//! the certificate by its SHA-256 fingerprint; there is no CA. The same
//! certificate serves the replication listener and the API (HTTPS).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A node's key and certificate. Replaced whole by `ferry node rekey`.
pub struct NodeKey {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub key_der: PrivateKeyDer<'static>,
    pub fingerprint: String,
    /// What the TLS servers present (see [`NodeKey::new`]).
    pub certified: Arc<rustls::sign::CertifiedKey>,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The node's identity: its name, its current key (swapped in place by a
/// rekey: every TLS config reads it per handshake) and the API token
/// (swapped by `ferry token rotate`).
pub struct Identity {
    pub node_name: String,
    data_dir: PathBuf,
    key: RwLock<Arc<NodeKey>>,
    api_token: RwLock<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node_name", &self.node_name)
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// SHA-256 of a DER certificate, as `sha256:` and lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

pub fn random_hex(bytes: usize) -> Result<String> {
    let mut b = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b).max(1)
}

/// Reads a secret (a key, a token), refusing one that is not a regular file
/// (a symlink is not followed), that others can read, or that is empty — as
/// ssh refuses a private key others can read: a secret that leaked must be
/// replaced, not used.
pub fn read_secret(path: &Path) -> Result<String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot read secret {}", path.display()))?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        anyhow::bail!("secret {} is not a regular file", path.display());
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "secret {} is readable by others or writable by them (mode {mode:03o}): run `chmod 600 {}`, and since others could read it, replace it (`ferry token rotate` for the API token, `ferry node rekey` for the node key)",
            path.display(),
            path.display()
        );
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let me = unsafe { libc::getuid() };
    if meta.uid() != me && meta.uid() != 0 {
        anyhow::bail!(
            "secret {} belongs to uid {}, not to this user ({me}) or root: `chown` it or replace it",
            path.display(),
            meta.uid()
        );
    }
    let mut text = String::new();
    f.by_ref()
        .take(1024 * 1024)
        .read_to_string(&mut text)
        .with_context(|| format!("secret {} is not text", path.display()))?;
    if text.trim().is_empty() {
        anyhow::bail!(
            "secret {} is empty: delete it and restart to make a new one",
            path.display()
        );
    }
    Ok(text)
}

pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("api.token")
}

fn tls_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let tls = data_dir.join("tls");
    (tls.join("node.key"), tls.join("node.crt"))
}

/// A new key and a certificate for `node_name`, valid for
/// [`CERT_VALID_DAYS`] from now.
fn make_key(node_name: &str) -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate().context("cannot generate a key")?;
    let mut params = rcgen::CertificateParams::new(vec![node_name.to_string()])
        .context("bad node name for a certificate")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("ferry node {node_name}"));
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(86_400)).into();
    params.not_after = (now + std::time::Duration::from_secs(CERT_VALID_DAYS * 86_400)).into();
    let cert = params
        .self_signed(&key)
        .context("cannot make a certificate")?;
    Ok((key.serialize_pem(), cert.pem()))
}

/// How long a node certificate made here is valid (`ferry node rekey`
/// makes a new one).
pub const CERT_VALID_DAYS: u64 = 825;

fn load_key(key_path: &Path, crt_path: &Path) -> Result<NodeKey> {
    let cert_pem = fs::read_to_string(crt_path)
        .with_context(|| format!("cannot read {}", crt_path.display()))?;
    let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .with_context(|| format!("{} is not a PEM certificate", crt_path.display()))?;
    let key_der = PrivateKeyDer::from_pem_slice(read_secret(key_path)?.as_bytes())
        .with_context(|| format!("{} is not a PEM private key", key_path.display()))?;
    NodeKey::new(cert_pem, cert_der, key_der)
}

impl NodeKey {
    /// The key with its certificate, and the signing key every TLS server
    /// config serves (loaded once here, not at each handshake).
    fn new(
        cert_pem: String,
        cert_der: CertificateDer<'static>,
        key_der: PrivateKeyDer<'static>,
    ) -> Result<NodeKey> {
        let signer = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key_der.clone_key())
            .map_err(|e| anyhow::anyhow!("the node key cannot sign: {e}"))?;
        Ok(NodeKey {
            fingerprint: fingerprint(&cert_der),
            certified: Arc::new(rustls::sign::CertifiedKey::new(
                vec![cert_der.clone()],
                signer,
            )),
            cert_pem,
            cert_der,
            key_der,
        })
    }
}

/// The fingerprint of the node certificate in `data_dir`, read without an
/// agent (`ferry node id`, and the CLI pinning its own node's API).
pub fn local_fingerprint(data_dir: &Path) -> Result<String> {
    let (_, crt) = tls_paths(data_dir);
    let pem = fs::read_to_string(&crt).with_context(|| {
        format!(
            "cannot read {} (is this the node's --data-dir?)",
            crt.display()
        )
    })?;
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .with_context(|| format!("{} is not a PEM certificate", crt.display()))?;
    Ok(fingerprint(&der))
}

impl Identity {
    /// Loads the identity from `data_dir`, making whatever is missing.
    pub fn load_or_create(data_dir: &Path, node_name: &str) -> Result<Identity> {
        let tls = data_dir.join("tls");
        fs::create_dir_all(&tls).with_context(|| format!("cannot create {}", tls.display()))?;
        let (key_path, crt_path) = tls_paths(data_dir);
        if !key_path.exists() || !crt_path.exists() {
            let (key, cert) = make_key(node_name)?;
            crate::store::write_private(&key_path, key.as_bytes())?;
            crate::store::write_private(&crt_path, cert.as_bytes())?;
        }
        let token_file = token_path(data_dir);
        if !token_file.exists() {
            crate::store::write_private(&token_file, format!("{}\n", random_hex(32)?).as_bytes())?;
        }
        let key = load_key(&key_path, &crt_path)?;
        let api_token = read_secret(&token_file)?.trim().to_string();
        if api_token.len() < 16 {
            anyhow::bail!(
                "the API token in {} is shorter than 16 characters: delete the file and restart to make a new one",
                token_file.display()
            );
        }
        Ok(Identity {
            node_name: node_name.to_string(),
            data_dir: data_dir.to_path_buf(),
            key: RwLock::new(Arc::new(key)),
            api_token: RwLock::new(api_token),
        })
    }

    /// The current key and certificate.
    pub fn key(&self) -> Arc<NodeKey> {
        self.key.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn fingerprint(&self) -> String {
        self.key().fingerprint.clone()
    }

    pub fn cert_pem(&self) -> String {
        self.key().cert_pem.clone()
    }

    /// Whether `token` is the API token (compared in constant time).
    pub fn token_matches(&self, token: &str) -> bool {
        let t = self.api_token.read().unwrap_or_else(|p| p.into_inner());
        constant_time_eq(token.as_bytes(), t.as_bytes())
    }

    /// `ferry token rotate`: a new API token, written (0600) before it
    /// replaces the old one, which stops working at once.
    pub fn rotate_token(&self) -> Result<()> {
        let token = random_hex(32)?;
        crate::store::write_private(&token_path(&self.data_dir), format!("{token}\n").as_bytes())?;
        *self.api_token.write().unwrap_or_else(|p| p.into_inner()) = token;
        Ok(())
    }

    /// A new key and certificate, not used yet (`ferry node rekey` shows it
    /// to the peers first).
    pub fn new_key(&self) -> Result<(String, NodeKey)> {
        let (key_pem, cert_pem) = make_key(&self.node_name)?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("the new certificate is not PEM: {e}"))?;
        let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("the new key is not PEM: {e}"))?;
        Ok((key_pem, NodeKey::new(cert_pem, cert_der, key_der)?))
    }

    /// Makes `key` the node's key: written (the old pair kept as
    /// `node.{key,crt}.previous`), then used by every new handshake.
    pub fn install_key(&self, key_pem: &str, key: NodeKey) -> Result<()> {
        let (key_path, crt_path) = tls_paths(&self.data_dir);
        let old = self.key();
        crate::store::write_private(
            &key_path.with_extension("key.previous"),
            read_secret(&key_path)?.as_bytes(),
        )?;
        crate::store::write_private(
            &crt_path.with_extension("crt.previous"),
            old.cert_pem.as_bytes(),
        )?;
        crate::store::write_private(&key_path, key_pem.as_bytes())?;
        crate::store::write_private(&crt_path, key.cert_pem.as_bytes())?;
        *self.key.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
        Ok(())
    }
}

/// Compares without an early exit, so the time taken does not leak a secret.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
