//! TLS 1.3 with mutual authentication between registered nodes (rustls, ring).
//!
//! There is no CA: each node's self-signed certificate is pinned by its SHA-256
//! fingerprint when the nodes are paired (`ferry node add`). The verifiers below
//! accept exactly the pinned certificates — and still check every handshake
//! signature, so holding a copy of a certificate without its key gets nowhere.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::identity::{fingerprint, Identity};
use super::peers::Peers;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts a certificate whose fingerprint is allowed right now.
struct Pinned {
    allowed: Box<dyn Fn(&str) -> bool + Send + Sync>,
    provider: Arc<CryptoProvider>,
    /// A client must present a certificate (the replication listener); the
    /// API lets operators in without one (they present a token).
    mandatory: bool,
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pinned")
    }
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), Error> {
        let fp = fingerprint(cert);
        if (self.allowed)(&fp) {
            Ok(())
        } else {
            Err(Error::General(format!(
                "certificate {fp} is not a pinned one (a registered ferry node, or the fingerprint given)"
            )))
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General(
            "TLS 1.2 is not allowed between ferry nodes".into(),
        ))
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General(
            "TLS 1.2 is not allowed between ferry nodes".into(),
        ))
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// Serves the node's current key: a `ferry node rekey` takes effect at the
/// next handshake.
#[derive(Debug)]
struct CurrentKey(Arc<Identity>);

impl ResolvesServerCert for CurrentKey {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.key().certified.clone())
    }
}

/// The replication listener's config: any registered peer may connect.
pub fn server_config(
    id: &Arc<Identity>,
    peers: Arc<Peers>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let verifier = Arc::new(Pinned {
        allowed: Box::new(move |fp| peers.by_fingerprint(fp).is_some()),
        provider: provider(),
        mandatory: true,
    });
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentKey(id.clone())));
    Ok(Arc::new(cfg))
}

/// The API listener's config (HTTPS): a client may present a certificate
/// (its key is proven by the handshake; a registered peer's certificate
/// authenticates a node-to-node call, another one only identifies the node
/// asking to pair) or none (an operator, authenticated by the API token in
/// each request). `operator`: the certificate `[api] tls_cert_file` names,
/// served to every client whose SNI is not ferry's internal name.
pub fn api_server_config(
    id: &Arc<Identity>,
    operator: Option<Arc<CertifiedKey>>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let verifier = Arc::new(Pinned {
        allowed: Box::new(|_| true),
        provider: provider(),
        mandatory: false,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(ApiKey {
            id: id.clone(),
            operator,
        }));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The operator's certificate and key for `[api]`: readable PEM, a chain
/// with at least one certificate, a private key nobody else can read.
pub fn check_operator_cert(cert: &std::path::Path, key: &std::path::Path) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    use std::os::unix::fs::MetadataExt;
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("key `api.tls_cert_file`: {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("key `api.tls_cert_file`: {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "key `api.tls_cert_file`: {} holds no PEM certificate",
            cert.display()
        ));
    }
    let meta = std::fs::metadata(key)
        .map_err(|e| format!("key `api.tls_key_file`: {}: {e}", key.display()))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "key `api.tls_key_file`: {} is readable or writable by others (mode {mode:03o}): `chmod 600` it, and since others could read it, replace the key and its certificate",
            key.display()
        ));
    }
    rustls_pki_types::PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("key `api.tls_key_file`: {}: {e}", key.display()))?;
    Ok(())
}

/// An operator-supplied certificate for the API could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("the API certificate {cert} / key {key}: {why}")]
pub struct OperatorCertError {
    pub cert: String,
    pub key: String,
    pub why: String,
}

/// Loads `[api] tls_cert_file` and `tls_key_file` (PEM: the chain, leaf
/// first; the key, mode 0600) into a key rustls serves.
pub fn operator_cert(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<CertifiedKey>, OperatorCertError> {
    use rustls_pki_types::pem::PemObject;
    let err = |why: String| OperatorCertError {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        why,
    };
    check_operator_cert(cert, key).map_err(err)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    let der =
        rustls_pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| err(e.to_string()))?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| err(e.to_string()))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| err(format!("the key does not match the certificate: {e}")))?;
    Ok(Arc::new(ck))
}

/// The API's certificate by the client's SNI: ferry's internal name
/// (peers and the CLI, which pin the node's fingerprint) gets the node's
/// own; any other client — a browser — the operator's, if `[api]` names
/// one.
#[derive(Debug)]
struct ApiKey {
    id: Arc<Identity>,
    operator: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ApiKey {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match &self.operator {
            Some(k) if !wants_node_identity(hello.server_name()) => Some(k.clone()),
            _ => Some(self.id.key().certified.clone()),
        }
    }
}

/// Whether a client's handshake asked for ferry's internal name.
pub fn wants_node_identity(sni: Option<&str>) -> bool {
    match (sni, server_name()) {
        (Some(s), ServerName::DnsName(n)) => s.eq_ignore_ascii_case(n.as_ref()),
        _ => false,
    }
}

/// A connecting node's config: only `peer_fingerprint` is accepted, and
/// this node authenticates with its current certificate.
pub fn client_config(
    id: &Identity,
    peer_fingerprint: String,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let verifier = Arc::new(Pinned {
        allowed: Box::new(move |fp| fp == peer_fingerprint),
        provider: provider(),
        mandatory: true,
    });
    let key = id.key();
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![key.cert_der.clone()], key.key_der.clone_key())?;
    Ok(Arc::new(cfg))
}

/// A client config with no certificate of its own, accepting the server
/// certificates `allowed` accepts.
fn anonymous_client(
    allowed: Box<dyn Fn(&str) -> bool + Send + Sync>,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let verifier = Arc::new(Pinned {
        allowed,
        provider: provider(),
        mandatory: true,
    });
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// An operator's config (the CLI): the agent's certificate must have
/// `fingerprint`; no client certificate (the token authenticates).
pub fn cli_client_config(fingerprint: String) -> Result<Arc<rustls::ClientConfig>, Error> {
    anonymous_client(Box::new(move |fp| fp == fingerprint))
}

/// A config that accepts any certificate and remembers the fingerprint it
/// saw: `ferry node add` without `--fingerprint` shows it to the operator to
/// confirm, and sends nothing over such a connection.
pub fn probe_config(
    seen: Arc<std::sync::Mutex<Option<String>>>,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    anonymous_client(Box::new(move |fp| {
        *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(fp.to_string());
        true
    }))
}

/// The name presented in SNI; certificates are pinned, not matched by name.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("ferry-node")
        .unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
}
