//! The node's NBD certificate authority: who may use an NBD export over TCP.
//!
//! NBD clients (QEMU's `tls-creds-x509`, libnbd's `tls-certificates=`, both
//! GnuTLS) verify the server against a CA certificate (CA:TRUE) and refuse a
//! self-signed leaf used as its own CA, so each node has a small CA of its own:
//! `DATA_DIR/tls/nbd-ca.key` (0600) and `nbd-ca.crt`, made on first use. It
//! signs
//! - the NBD server's certificate, made afresh in memory at every start (its
//!   key never touches the disk) with the node's name, the TCP listener's
//!   address and `nbd.tls_names` as subject alternative names;
//! - client certificates, issued by `ferry nbd client-cert NAME`.
//!
//! The TCP listener requires a client certificate signed by this CA. Two nodes
//! that serve one workload's volumes behind a virtual IP share one CA: copy
//! both files to the other node before its first start (or replace them and
//! restart). Revoking a client = making a new CA (remove both files and
//! restart) and issuing the remaining clients again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

/// How long the CA is valid from its creation.
const CA_VALID_DAYS: i64 = 20 * 365;
/// How long the server's certificate is valid from each start.
const SERVER_VALID_DAYS: i64 = 10 * 365;
/// Certificates are valid from the day before they are made (clock skew).
const BACKDATE_DAYS: i64 = 1;

/// Files a client needs, in the layout QEMU's `tls-creds-x509,dir=` and
/// libnbd's `tls-certificates=` read.
pub const CLIENT_CA_FILE: &str = "ca-cert.pem";
pub const CLIENT_CERT_FILE: &str = "client-cert.pem";
pub const CLIENT_KEY_FILE: &str = "client-key.pem";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn ca_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let tls = data_dir.join("tls");
    (tls.join("nbd-ca.key"), tls.join("nbd-ca.crt"))
}

/// A loaded NBD CA.
pub struct NbdCa {
    key: rcgen::KeyPair,
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    /// The CA's subject (a single common name, as ferry makes it).
    common_name: String,
}

impl std::fmt::Debug for NbdCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdCa")
            .field("common_name", &self.common_name)
            .finish_non_exhaustive()
    }
}

/// The date `days` from today (UTC), as rcgen wants it.
macro_rules! date_from_today {
    ($days:expr) => {{
        let (y, m, d) = ymd_from_today($days);
        rcgen::date_time_ymd(y, m, d)
    }};
}

/// (year, month, day) `days` from today (UTC).
fn ymd_from_today(days: i64) -> (i32, u8, u8) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    civil_from_days(now.div_euclid(86_400) + days)
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m, d)
}

fn ca_params(common_name: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, common_name.to_string());
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p
}

impl NbdCa {
    /// Loads `DATA_DIR/tls/nbd-ca.{key,crt}`, making them when both are missing.
    pub fn load_or_create(data_dir: &Path) -> Result<NbdCa> {
        let (key_path, crt_path) = ca_paths(data_dir);
        match (key_path.exists(), crt_path.exists()) {
            (false, false) => {
                if let Some(dir) = key_path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                }
                let key = rcgen::KeyPair::generate().context("cannot generate a key")?;
                let cn = format!("ferry NBD CA {}", crate::transport::identity::random_hex(6)?);
                let mut p = ca_params(&cn);
                p.not_before = date_from_today!(-BACKDATE_DAYS);
                p.not_after = date_from_today!(CA_VALID_DAYS);
                let cert = p.self_signed(&key).context("cannot make the NBD CA")?;
                crate::store::write_private(&key_path, key.serialize_pem().as_bytes())?;
                crate::store::write_private(&crt_path, cert.pem().as_bytes())?;
                tracing::info!(path = %crt_path.display(), "nbd.ca.created");
            }
            (true, true) => {}
            _ => bail!(
                "only one of {} and {} exists: restore the other, or remove both to make a new NBD CA (client certificates must then be issued again)",
                key_path.display(),
                crt_path.display()
            ),
        }
        let key_pem = crate::transport::identity::read_secret(&key_path)?;
        let key = rcgen::KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{} is not a PEM private key", key_path.display()))?;
        let cert_pem = std::fs::read_to_string(&crt_path)
            .with_context(|| format!("cannot read {}", crt_path.display()))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .with_context(|| format!("{} is not a PEM certificate", crt_path.display()))?;
        let common_name = subject_common_name(&cert_der).with_context(|| {
            format!(
                "{} is not an NBD CA made by ferry (one common name expected in its subject)",
                crt_path.display()
            )
        })?;
        let ca = NbdCa {
            key,
            cert_pem,
            cert_der,
            common_name,
        };
        // The key and the certificate must belong together.
        ca.server_config(&["ferry-self-check".to_string()])
            .with_context(|| {
                format!(
                    "{} and {} do not make a working CA",
                    key_path.display(),
                    crt_path.display()
                )
            })?;
        Ok(ca)
    }

    fn issuer(&self) -> rcgen::Issuer<'static, &rcgen::KeyPair> {
        rcgen::Issuer::new(ca_params(&self.common_name), &self.key)
    }

    /// A certificate signed by this CA for a new key: (cert DER, cert PEM, key).
    fn issue(
        &self,
        common_name: &str,
        sans: &[String],
        eku: rcgen::ExtendedKeyUsagePurpose,
        days: i64,
    ) -> Result<(CertificateDer<'static>, String, rcgen::KeyPair)> {
        let key = rcgen::KeyPair::generate().context("cannot generate a key")?;
        let mut p = rcgen::CertificateParams::new(sans.to_vec())
            .with_context(|| format!("bad certificate names {sans:?}"))?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, common_name.to_string());
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![eku];
        p.not_before = date_from_today!(-BACKDATE_DAYS);
        p.not_after = date_from_today!(days);
        let serial = crate::transport::identity::random_u64().to_be_bytes();
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial[1..]));
        let cert = p
            .signed_by(&key, &self.issuer())
            .context("cannot sign a certificate")?;
        Ok((cert.der().clone(), cert.pem(), key))
    }

    /// The TLS config of a TCP listener: a fresh server certificate for
    /// `names` (DNS names or IP addresses), and only clients with a
    /// certificate of this CA get in.
    pub fn server_config(&self, names: &[String]) -> Result<Arc<rustls::ServerConfig>> {
        let cn = names.first().cloned().unwrap_or_else(|| "ferry".into());
        let (leaf, _, key) = self.issue(
            &format!("ferry NBD server {cn}"),
            names,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            SERVER_VALID_DAYS,
        )?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .context("the NBD CA certificate is not usable as a trust anchor")?;
        let roots = Arc::new(roots);
        // What a client will do: the new certificate must chain to the CA.
        let check =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .context("cannot build a certificate verifier")?;
        let name = ServerName::try_from(cn.clone())
            .with_context(|| format!("{cn:?} is not a DNS name or an IP address"))?;
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            &*check,
            &leaf,
            &[],
            &name,
            &[],
            UnixTime::now(),
        )
        .context("the server certificate made by the NBD CA does not verify against it")?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .context("cannot build the client certificate verifier")?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![leaf], key)
            .context("cannot use the NBD server certificate")?;
        // Every connection makes a full handshake; nothing to remember.
        cfg.send_tls13_tickets = 0;
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Arc::new(cfg))
    }

    /// A client certificate for `name`, valid `days`: (cert PEM, key PEM).
    pub fn issue_client(&self, name: &str, days: u32) -> Result<(String, String)> {
        let (_, pem, key) = self.issue(
            name,
            &[],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            i64::from(days),
        )?;
        Ok((pem, key.serialize_pem()))
    }
}

/// The one common name in a certificate's subject, read from its DER (the
/// CA's subject must be repeated exactly as the issuer of what it signs).
fn subject_common_name(der: &[u8]) -> Option<String> {
    /// (tag, contents, rest) of the DER element at the start of `b`.
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&first, mut b) = b.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let mut len = 0usize;
            for &x in &b[..n] {
                len = (len << 8) | usize::from(x);
            }
            b = &b[n..];
            len
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    let (SEQUENCE, cert, _) = tlv(der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = tlv(cert)? else {
        return None;
    };
    let mut rest = tbs;
    // [0] version (optional), serial, signature, issuer, validity, subject.
    let (tag, _, r) = tlv(rest)?;
    rest = if tag == 0xa0 { r } else { rest };
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (SEQUENCE, mut name, _) = tlv(rest)? else {
        return None;
    };
    let mut cn = None;
    while !name.is_empty() {
        let (SET, mut set, r) = tlv(name)? else {
            return None;
        };
        name = r;
        while !set.is_empty() {
            let (SEQUENCE, atv, r) = tlv(set)? else {
                return None;
            };
            set = r;
            let (0x06, oid, r) = tlv(atv)? else {
                return None;
            };
            let (kind, value, _) = tlv(r)?;
            if oid != OID_CN || cn.is_some() || !matches!(kind, 0x0c | 0x13) {
                return None;
            }
            cn = Some(std::str::from_utf8(value).ok()?.to_string());
        }
    }
    cn
}

/// Writes a client's files into `dir` (made 0700): the CA certificate, the
/// client certificate and its key (0600). An existing key is not replaced.
pub fn write_client_dir(dir: &Path, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let key = dir.join(CLIENT_KEY_FILE);
    if key.exists() {
        bail!(
            "{} exists: remove it, or pick another --out directory",
            key.display()
        );
    }
    crate::store::write_private(&key, key_pem.as_bytes())?;
    crate::store::write_private(&dir.join(CLIENT_CERT_FILE), cert_pem.as_bytes())?;
    crate::store::write_private(&dir.join(CLIENT_CA_FILE), ca_pem.as_bytes())?;
    Ok(())
}

/// Makes the directory of an NBD Unix socket safe: only its owner (the
/// agent's user) may enter it, so no other local user can connect. A
/// missing directory is made 0700; an existing one ferry made (`ours`, e.g.
/// `DATA_DIR/run`) is set to 0700; one the operator chose must already be
/// (ferry does not change the mode of, say, `/run`).
pub fn private_socket_dir(dir: &Path, ours: bool) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            // The mode asked for is masked by the umask: set it exactly.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot make {} 0700", dir.display()))?;
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.display())),
        Ok(m) => {
            // SAFETY: geteuid(2) cannot fail and touches no memory.
            let me = unsafe { libc::geteuid() };
            if !m.is_dir() {
                bail!(
                    "{} (the NBD socket's directory) is not a directory",
                    dir.display()
                );
            }
            if m.uid() != me {
                bail!(
                    "{} (the NBD socket's directory) belongs to uid {}, not to the agent's user {me}: pick a directory of its own",
                    dir.display(),
                    m.uid()
                );
            }
            if m.mode() & 0o077 != 0 {
                if !ours {
                    bail!(
                        "{} (the NBD socket's directory) has mode {:o}: other users could connect to the NBD socket; make it 0700 or put the socket in a directory of its own",
                        dir.display(),
                        m.mode() & 0o777
                    );
                }
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .with_context(|| format!("cannot make {} 0700", dir.display()))?;
            }
            Ok(())
        }
    }
}

/// Binds a Unix socket for NBD in a private directory (see
/// [`private_socket_dir`]); the socket itself is made 0600 as well.
pub fn bind_private_socket(path: &Path, ours: bool) -> Result<ferry_nbd::Listener> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .with_context(|| format!("{} has no directory", path.display()))?;
    private_socket_dir(dir, ours)?;
    let listener = ferry_nbd::Listener::bind(&ferry_nbd::ListenAddr::Unix(path.to_path_buf()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} 0600", path.display()))?;
    Ok(listener)
}

/// Names in the TLS server certificate of a TCP listener on `addr`: the
/// given names, and the address unless it is a wildcard.
pub fn server_names(first: &str, addr: &std::net::SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec![first.to_string()];
    if !addr.ip().is_unspecified() {
        names.push(addr.ip().to_string());
    }
    for n in extra {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

/// `ferry nbd client-cert NAME [--out DIR] [--days N]`.
pub fn client_cert(
    data_dir: &Path,
    name: &str,
    out: Option<&Path>,
    days: u32,
    json: bool,
) -> Result<()> {
    crate::volume::validate_name(name).map_err(|_| {
        anyhow::anyhow!(
            "{name:?} is not a valid client name (letters, digits, '.', '_', '-'; not starting with '.' or '-')"
        )
    })?;
    if days == 0 {
        bail!("--days must be at least 1");
    }
    let dir = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(name));
    let ca = NbdCa::load_or_create(data_dir)?;
    let (cert, key) = ca.issue_client(name, days)?;
    write_client_dir(&dir, &ca.cert_pem, &cert, &key)?;
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    let (y, m, d) = ymd_from_today(i64::from(days));
    let v = serde_json::json!({
        "name": name,
        "dir": dir,
        "files": [CLIENT_CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE],
        "not_after": format!("{y:04}-{m:02}-{d:02}"),
        "ca_fingerprint": crate::transport::identity::fingerprint(&ca.cert_der),
    });
    if json {
        crate::sys::out::print_json(&v)?;
    } else {
        let shown = dir.display();
        println!("client certificate {name} (valid until {y:04}-{m:02}-{d:02}) in {shown}/:");
        println!("  {CLIENT_CA_FILE} {CLIENT_CERT_FILE} {CLIENT_KEY_FILE}");
        println!("use it with, e.g.:");
        println!("  nbdinfo --list 'nbds://HOST:PORT/?tls-certificates={shown}'");
        println!("  qemu-img info --object tls-creds-x509,id=tls0,dir={shown},endpoint=client \\");
        println!("    --image-opts driver=nbd,host=HOST,port=PORT,export=VOLUME,tls-creds=tls0,tls-hostname=NODE");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn ca_reloads_and_signs_what_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let ca = NbdCa::load_or_create(dir.path()).unwrap();
        let again = NbdCa::load_or_create(dir.path()).unwrap();
        assert_eq!(ca.cert_der, again.cert_der, "the CA is made once");
        assert!(ca.common_name.starts_with("ferry NBD CA "));
        // A server config for names and addresses (checked against the CA inside).
        again
            .server_config(&["node-a".into(), "127.0.0.1".into()])
            .unwrap();
        // A group-readable key is refused.
        use std::os::unix::fs::PermissionsExt;
        let (key, _) = ca_paths(dir.path());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = NbdCa::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(e.contains("readable by others"), "{e}");
    }

    #[test]
    fn common_name_of_a_foreign_subject_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = ca_params("x");
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "o");
        let der = p.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(subject_common_name(&der), None);
        let der = ca_params("just me")
            .self_signed(&key)
            .unwrap()
            .der()
            .to_vec();
        assert_eq!(subject_common_name(&der).as_deref(), Some("just me"));
    }
}
