//! A node's identity, made on first start: a TLS key and self-signed
//! certificate (`DATA_DIR/tls/node.{key,crt}`, the key 0600) and the REST API
//! bearer token (`DATA_DIR/api.token`, 0600). Peers pin the certificate by its
//! SHA-256 fingerprint; there is no CA.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub struct Identity {
    pub node_name: String,
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub key_der: PrivateKeyDer<'static>,
    pub fingerprint: String,
    pub api_token: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node_name", &self.node_name)
            .field("fingerprint", &self.fingerprint)
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
            "secret {} is readable or writable by group or others (mode {mode:03o}): run `chmod 600 {}`, and since others could read it, replace it (`ferry token rotate` for the API token, `ferry node rekey` for the node key)",
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

impl Identity {
    /// Loads the identity from `data_dir`, making whatever is missing.
    pub fn load_or_create(data_dir: &Path, node_name: &str) -> Result<Identity> {
        let tls = data_dir.join("tls");
        fs::create_dir_all(&tls).with_context(|| format!("cannot create {}", tls.display()))?;
        let (key_path, crt_path) = (tls.join("node.key"), tls.join("node.crt"));
        if !key_path.exists() || !crt_path.exists() {
            let key = rcgen::KeyPair::generate().context("cannot generate a key")?;
            let mut params = rcgen::CertificateParams::new(vec![node_name.to_string()])
                .context("bad node name for a certificate")?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, format!("ferry node {node_name}"));
            params.not_before = rcgen::date_time_ymd(2024, 1, 1);
            params.not_after = rcgen::date_time_ymd(2124, 1, 1);
            let cert = params
                .self_signed(&key)
                .context("cannot make a certificate")?;
            super::write_atomic_private(&key_path, key.serialize_pem().as_bytes())?;
            super::write_atomic_private(&crt_path, cert.pem().as_bytes())?;
        }
        let token_file = token_path(data_dir);
        if !token_file.exists() {
            super::write_atomic_private(&token_file, format!("{}\n", random_hex(32)?).as_bytes())?;
        }
        let cert_pem = fs::read_to_string(&crt_path)?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .with_context(|| format!("{} is not a PEM certificate", crt_path.display()))?;
        let key_der = PrivateKeyDer::from_pem_slice(read_secret(&key_path)?.as_bytes())
            .with_context(|| format!("{} is not a PEM private key", key_path.display()))?;
        let api_token = read_secret(&token_file)?.trim().to_string();
        if api_token.len() < 16 {
            anyhow::bail!(
                "the API token in {} is shorter than 16 characters: delete the file and restart to make a new one",
                token_file.display()
            );
        }
        Ok(Identity {
            node_name: node_name.to_string(),
            fingerprint: fingerprint(&cert_der),
            cert_pem,
            cert_der,
            key_der,
            api_token,
        })
    }
}
