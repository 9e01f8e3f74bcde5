//! A TLS-required listener over real TCP, driven by a rustls client: nothing
//! is answered before STARTTLS, only a certificate of the right CA gets in,
//! the handshake deadline covers the TLS handshake, a flood of idle
//! connections cannot keep an authenticated client out, and requests and
//! replies (the worker pool over one shared TLS session) arrive intact.
//! (The real clients — nbdinfo, nbdcopy, qemu-io — are tested in the ferry
//! crate against `ferry export` and the agent.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_nbd::device::MemDevice;
use ferry_nbd::proto::*;
use ferry_nbd::{Export, ListenAddr, Listener, Server, ServerLimits};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Pki {
    ca_der: CertificateDer<'static>,
    server: (CertificateDer<'static>, PrivateKeyDer<'static>),
    client: (CertificateDer<'static>, PrivateKeyDer<'static>),
}

fn ca(
    name: &str,
) -> (
    rcgen::CertificateParams,
    rcgen::KeyPair,
    CertificateDer<'static>,
) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let der = p.self_signed(&key).unwrap().der().clone();
    (p, key, der)
}

fn leaf(
    issuer: &rcgen::Issuer<'_, &rcgen::KeyPair>,
    sans: &[&str],
    eku: rcgen::ExtendedKeyUsagePurpose,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    p.extended_key_usages = vec![eku];
    let cert = p.signed_by(&key, issuer).unwrap();
    (
        cert.der().clone(),
        PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    )
}

fn make_pki(ca_name: &str) -> Pki {
    let (params, key, ca_der) = ca(ca_name);
    let issuer = rcgen::Issuer::from_params(&params, &key);
    Pki {
        server: leaf(
            &issuer,
            &["127.0.0.1"],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        ),
        client: leaf(
            &issuer,
            &["client"],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ),
        ca_der,
    }
}

fn server_config(pki: &Pki) -> Arc<rustls::ServerConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![pki.server.0.clone()], pki.server.1.clone_key())
            .unwrap(),
    )
}

fn client_config(trust: &Pki, me: Option<&Pki>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.ca_der.clone()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match me {
        Some(p) => b
            .with_client_auth_cert(vec![p.client.0.clone()], p.client.1.clone_key())
            .unwrap(),
        None => b.with_no_client_auth(),
    })
}

/// A server with one 4 MiB export "vol" on a TLS-required 127.0.0.1 listener.
fn start(pki: &Pki, limits: ServerLimits) -> (Server, String) {
    let server = Server::new(
        vec![Export {
            name: "vol".into(),
            description: "a volume".into(),
            read_only: false,
            device: Arc::new(MemDevice::new(4 << 20)),
        }],
        limits,
    )
    .unwrap();
    let l = Listener::bind(&"127.0.0.1:0".parse::<ListenAddr>().unwrap())
        .unwrap()
        .require_tls(server_config(pki));
    let addr = l.local_addr().to_string();
    assert!(
        l.uri("vol").starts_with("nbds://127.0.0.1:"),
        "{}",
        l.uri("vol")
    );
    server.serve(l).unwrap();
    (server, addr)
}

fn option<S: Write>(s: &mut S, opt: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
    s.flush().unwrap();
}

/// (option, reply type, data)
fn reply<S: Read>(s: &mut S) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be_u64(&h[0..8]), OPTION_REPLY_MAGIC);
    let mut d = vec![0u8; be_u32(&h[16..20]) as usize];
    s.read_exact(&mut d).unwrap();
    (be_u32(&h[8..12]), be_u32(&h[12..16]), d)
}

fn plain(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    s
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// STARTTLS and the TLS handshake.
fn starttls(addr: &str, cfg: Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    let mut s = plain(addr);
    option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(reply(&mut s).1, REP_ACK);
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut s)?;
    }
    let mut tls = rustls::StreamOwned::new(conn, s);
    // TLS 1.3: a refused client certificate shows at the first read.
    option(&mut tls, OPT_LIST, &[]);
    let mut h = [0u8; 20];
    tls.read_exact(&mut h)?;
    let mut d = vec![0u8; be_u32(&h[16..20]) as usize];
    tls.read_exact(&mut d)?;
    assert_eq!(be_u32(&h[12..16]), REP_SERVER);
    assert_eq!(reply(&mut tls).1, REP_ACK);
    Ok(tls)
}

fn request<S: Write>(s: &mut S, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    s.write_all(&b).unwrap();
}

#[test]
fn nothing_before_starttls_then_requests_inside_tls() {
    let pki = make_pki("test CA");
    let (_server, addr) = start(&pki, ServerLimits::default());
    let mut s = plain(&addr);
    for (opt, data) in [
        (OPT_LIST, vec![]),
        (OPT_INFO, go_data("vol")),
        (OPT_GO, go_data("vol")),
        (OPT_STRUCTURED_REPLY, vec![]),
    ] {
        option(&mut s, opt, &data);
        let (o, kind, d) = reply(&mut s);
        assert_eq!((o, kind), (opt, REP_ERR_TLS_REQD));
        assert!(!d.windows(3).any(|w| w == b"vol"), "export name leaked");
    }
    // EXPORT_NAME cannot be refused with an error: the session ends.
    option(&mut s, OPT_EXPORT_NAME, b"vol");
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));

    let mut tls = starttls(&addr, client_config(&pki, Some(&pki))).unwrap();
    option(&mut tls, OPT_GO, &go_data("vol"));
    loop {
        let (_, kind, _) = reply(&mut tls);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_INFO);
    }
    // Many writes in flight (the worker pool sharing the session), then reads.
    let chunk = 256 * 1024;
    let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    for (i, c) in data.chunks(chunk).enumerate() {
        request(
            &mut tls,
            CMD_WRITE,
            i as u64,
            (i * chunk) as u64,
            chunk as u32,
            c,
        );
    }
    tls.flush().unwrap();
    let mut seen = vec![false; data.len() / chunk];
    for _ in 0..seen.len() {
        let mut r = [0u8; 16];
        tls.read_exact(&mut r).unwrap();
        assert_eq!(be_u32(&r[0..4]), SIMPLE_REPLY_MAGIC);
        assert_eq!(be_u32(&r[4..8]), 0);
        seen[be_u64(&r[8..16]) as usize] = true;
    }
    assert!(seen.iter().all(|&x| x));
    // One read of the whole 4 MiB (sent in pieces), compared.
    request(&mut tls, CMD_READ, 99, 0, 4 << 20, &[]);
    tls.flush().unwrap();
    let mut r = [0u8; 16];
    tls.read_exact(&mut r).unwrap();
    assert_eq!((be_u32(&r[4..8]), be_u64(&r[8..16])), (0, 99));
    let mut back = vec![0u8; 4 << 20];
    tls.read_exact(&mut back).unwrap();
    assert!(back == data, "data read back through TLS differs");
    request(&mut tls, CMD_DISC, 100, 0, 0, &[]);
    tls.flush().unwrap();
}

#[test]
fn only_a_certificate_of_the_servers_ca_gets_in() {
    let pki = make_pki("test CA");
    let other = make_pki("another CA");
    let (_server, addr) = start(&pki, ServerLimits::default());
    assert!(
        starttls(&addr, client_config(&pki, None)).is_err(),
        "a client without a certificate got in"
    );
    assert!(
        starttls(&addr, client_config(&pki, Some(&other))).is_err(),
        "a certificate of another CA got in"
    );
    starttls(&addr, client_config(&pki, Some(&pki))).unwrap();
}

#[test]
fn plaintext_sent_with_starttls_is_not_taken_as_tls() {
    let pki = make_pki("test CA");
    let (_server, addr) = start(&pki, ServerLimits::default());
    let mut s = plain(&addr);
    // STARTTLS and, in the same packet, a plaintext option: the server must
    // not answer it as if it had come through the TLS session.
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&OPT_LIST.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&b).unwrap();
    assert_eq!(reply(&mut s).1, REP_ACK);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "the server went on after injected plaintext"
    );
}

#[test]
fn the_deadline_covers_the_tls_handshake_and_idle_floods_do_not_lock_clients_out() {
    let pki = make_pki("test CA");
    let (server, addr) = start(
        &pki,
        ServerLimits {
            max_connections: 8,
            handshake_timeout_ms: 3000,
            ..ServerLimits::default()
        },
    );
    // Half a TLS handshake: STARTTLS, then a ClientHello trickled a byte at a time.
    let mut slow = plain(&addr);
    option(&mut slow, OPT_STARTTLS, &[]);
    assert_eq!(reply(&mut slow).1, REP_ACK);
    let t = Instant::now();
    let mut closed = false;
    for _ in 0..100 {
        if slow.write_all(&[0x16]).is_err() {
            closed = true;
            break;
        }
        let mut b = [0u8; 1];
        slow.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(0) = slow.read(&mut b) {
            closed = true;
            break;
        }
    }
    assert!(closed, "a trickled TLS handshake was never closed");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());

    // 200 idle connections against 8 slots: each new one evicts the oldest.
    let flood: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let a = starttls(&addr, client_config(&pki, Some(&pki))).unwrap();
    let b = starttls(&addr, client_config(&pki, Some(&pki))).unwrap();
    assert!(
        server
            .stats()
            .connections_evicted
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 190
    );
    // More floods do not evict authenticated clients.
    let more: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    for mut c in [a, b] {
        option(&mut c, OPT_LIST, &[]);
        assert_eq!(reply(&mut c).1, REP_SERVER);
        assert_eq!(reply(&mut c).1, REP_ACK);
    }
    drop((flood, more));
}
