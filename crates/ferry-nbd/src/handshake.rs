//! Fixed-newstyle option negotiation, sans I/O.
//!
//! ```text
//!  server                                   client
//!  NBDMAGIC IHAVEOPT hflags  ───────────▶
//!                            ◀───────────  client flags
//!                            ◀───────────  IHAVEOPT opt len data   ┐ repeated:
//!  reply* (magic opt type len data) ────▶                          ┘ LIST, INFO, ...
//!                            ◀───────────  GO / EXPORT_NAME
//!  INFO* ACK  (or size+flags) ──────────▶  → transmission
//! ```
//!
//! [`Negotiator`] receives each option already framed (the I/O layer reads the
//! 16-byte header, checks it with [`Negotiator::option_header`], reads `len` bytes)
//! and appends its replies to an output buffer. Every option ferry does not
//! implement gets `NBD_REP_ERR_UNSUP`, never a dropped connection; only the
//! conditions the spec lets a server end a session on (bad magic, unknown client
//! flags, an unknown name in `EXPORT_NAME`, a denial-of-service sized option) do.
//!
//! With [`TlsMode::Required`] the negotiator is the spec's FORCEDTLS server:
//! until `NBD_OPT_STARTTLS` has been answered and the TLS session is up, every
//! option but `STARTTLS` and `ABORT` — `LIST` and `INFO` included — gets
//! `NBD_REP_ERR_TLS_REQD`, so nothing about the exports (not even their names)
//! is told to a client that has not authenticated; `NBD_OPT_EXPORT_NAME`
//! cannot fail with an error reply and ends the session.

use crate::proto::*;

/// What a client sees of one export during negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    /// Block sizes advertised with `NBD_INFO_BLOCK_SIZE`.
    pub min_block_bytes: u32,
    pub preferred_block_bytes: u32,
    pub max_block_bytes: u32,
}

/// Bounds on what a client may send before transmission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NegotiationLimits {
    /// Largest option payload accepted; larger ones end the session.
    pub option_bytes_max: u32,
    /// Most options one connection may send before it must pick an export.
    pub handshake_options_max: u32,
}

impl Default for NegotiationLimits {
    fn default() -> Self {
        NegotiationLimits {
            option_bytes_max: 64 * 1024,
            handshake_options_max: 256,
        }
    }
}

/// Whether a connection must upgrade to TLS before anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// NOTLS: `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_UNSUP` (a Unix socket, whose
    /// directory's permissions are the authentication).
    Off,
    /// FORCEDTLS: every option but `STARTTLS` and `ABORT` gets
    /// `NBD_REP_ERR_TLS_REQD` until the TLS session is up.
    Required,
}

/// A session ends during negotiation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("client sent unknown client flags {0:#x}")]
    BadClientFlags(u32),
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("option {option} carries {length} bytes, above option_bytes_max {max}")]
    OptionTooLong { option: u32, length: u32, max: u32 },
    #[error("client sent more than handshake_options_max ({0}) options")]
    TooManyOptions(u32),
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("client sent NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS; this listener requires TLS")]
    TlsRequired,
    #[error("client did not set NBD_FLAG_C_FIXED_NEWSTYLE, without which there is no TLS; this listener requires TLS")]
    TlsNeedsFixedNewstyle,
}

/// What negotiation agreed for the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Index of the chosen export in the list given to the negotiator.
    pub export: usize,
    pub transmission_flags: u16,
    pub structured_replies: bool,
    /// `base:allocation` was selected for this export with SET_META_CONTEXT.
    pub base_allocation: bool,
}

/// What the I/O layer does after an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write the replies and read the next option.
    Continue,
    /// Write the replies and close (the client sent `NBD_OPT_ABORT`).
    Abort,
    /// Write the replies and enter transmission.
    Transmission(Session),
    /// Write the replies (an `NBD_REP_ACK`), then run the TLS handshake and
    /// go on negotiating inside it ([`Negotiator::tls_started`]).
    StartTls,
}

/// The first bytes the server sends.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Transmission flags of an export.
pub fn transmission_flags(info: &ExportInfo, structured_replies: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE;
    if info.read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if structured_replies {
        f |= TFLAG_SEND_DF;
    }
    f
}

/// Longest string (export name, query) accepted, per the spec.
const STRING_BYTES_MAX: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
struct MetaSelection {
    export: String,
    base_allocation: bool,
}

/// The option-haggling state of one connection.
#[derive(Debug)]
pub struct Negotiator<'a> {
    exports: &'a [ExportInfo],
    limits: NegotiationLimits,
    no_zeroes: bool,
    structured: bool,
    meta: Option<MetaSelection>,
    options_seen: u32,
    tls: TlsMode,
    /// The TLS session is up (STARTTLS was answered and the handshake done).
    tls_active: bool,
}

/// A malformed option: the reply is `NBD_REP_ERR_INVALID` with this message.
struct Invalid(&'static str);

/// A little reader over an option payload that never panics.
struct Cursor<'b> {
    data: &'b [u8],
}

impl<'b> Cursor<'b> {
    fn take(&mut self, n: usize) -> Result<&'b [u8], Invalid> {
        if self.data.len() < n {
            return Err(Invalid("option data is shorter than its fields say"));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, Invalid> {
        self.take(2).map(be_u16)
    }
    fn u32(&mut self) -> Result<u32, Invalid> {
        self.take(4).map(be_u32)
    }
    fn string(&mut self) -> Result<&'b str, Invalid> {
        let len = self.u32()? as usize;
        if len > STRING_BYTES_MAX {
            return Err(Invalid("string longer than 4096 bytes"));
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|_| Invalid("string is not UTF-8"))
    }
    fn finish(&self) -> Result<(), Invalid> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(Invalid("option data is longer than its fields say"))
        }
    }
}

impl<'a> Negotiator<'a> {
    /// A negotiator without TLS ([`TlsMode::Off`]).
    pub fn new(exports: &'a [ExportInfo], limits: NegotiationLimits) -> Self {
        Negotiator::with_tls(exports, limits, TlsMode::Off)
    }

    pub fn with_tls(exports: &'a [ExportInfo], limits: NegotiationLimits, tls: TlsMode) -> Self {
        Negotiator {
            exports,
            limits,
            no_zeroes: false,
            structured: false,
            meta: None,
            options_seen: 0,
            tls,
            tls_active: false,
        }
    }

    /// Whether options are refused with `NBD_REP_ERR_TLS_REQD` right now.
    fn tls_pending(&self) -> bool {
        self.tls == TlsMode::Required && !self.tls_active
    }

    /// The TLS session is up: negotiation goes on inside it. Nothing
    /// negotiated before carries over (the spec: structured replies and meta
    /// contexts must be asked again).
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.meta = None;
    }

    /// Checks the client's flags (the 4 bytes after the greeting).
    pub fn client_flags(&mut self, flags: u32) -> Result<(), HandshakeError> {
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(HandshakeError::BadClientFlags(flags));
        }
        if self.tls == TlsMode::Required && flags & FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(HandshakeError::TlsNeedsFixedNewstyle);
        }
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        Ok(())
    }

    /// Checks a 16-byte option header; returns `(option, length)`.
    pub fn option_header(
        &mut self,
        header: &[u8; OPTION_HEADER_BYTES],
    ) -> Result<(u32, u32), HandshakeError> {
        let magic = be_u64(&header[0..8]);
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        let option = be_u32(&header[8..12]);
        let length = be_u32(&header[12..16]);
        if length > self.limits.option_bytes_max {
            return Err(HandshakeError::OptionTooLong {
                option,
                length,
                max: self.limits.option_bytes_max,
            });
        }
        self.options_seen += 1;
        if self.options_seen > self.limits.handshake_options_max {
            return Err(HandshakeError::TooManyOptions(
                self.limits.handshake_options_max,
            ));
        }
        Ok((option, length))
    }

    /// Handles one option with its payload, appending replies to `out`.
    pub fn option(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Step, HandshakeError> {
        if self.tls_pending() {
            return self.before_tls(option, data, out);
        }
        let result = match option {
            OPT_EXPORT_NAME => return self.export_name(data, out),
            OPT_ABORT => {
                option_reply(out, option, REP_ACK, &[]);
                return Ok(Step::Abort);
            }
            OPT_LIST => self.list(data, out),
            OPT_INFO | OPT_GO => self.info_or_go(option, data, out),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    Err(Invalid("NBD_OPT_STRUCTURED_REPLY takes no data"))
                } else {
                    self.structured = true;
                    option_reply(out, option, REP_ACK, &[]);
                    Ok(Step::Continue)
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data, out),
            OPT_STARTTLS if self.tls_active => Err(Invalid("TLS is already active")),
            _ => {
                // STARTTLS without TLS, EXTENDED_HEADERS and anything newer or unknown.
                option_reply(out, option, REP_ERR_UNSUP, b"option not supported by ferry");
                Ok(Step::Continue)
            }
        };
        match result {
            Ok(step) => Ok(step),
            Err(Invalid(msg)) => {
                option_reply(out, option, REP_ERR_INVALID, msg.as_bytes());
                Ok(Step::Continue)
            }
        }
    }

    /// FORCEDTLS before the upgrade: nothing but STARTTLS and ABORT.
    fn before_tls(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Step, HandshakeError> {
        match option {
            OPT_STARTTLS if !data.is_empty() => {
                option_reply(
                    out,
                    option,
                    REP_ERR_INVALID,
                    b"NBD_OPT_STARTTLS takes no data",
                );
                Ok(Step::Continue)
            }
            OPT_STARTTLS => {
                option_reply(out, option, REP_ACK, &[]);
                Ok(Step::StartTls)
            }
            OPT_ABORT => {
                option_reply(out, option, REP_ACK, &[]);
                Ok(Step::Abort)
            }
            // Cannot be answered with an error: the spec says end the session.
            OPT_EXPORT_NAME => Err(HandshakeError::TlsRequired),
            _ => {
                option_reply(
                    out,
                    option,
                    REP_ERR_TLS_REQD,
                    b"this server requires TLS with a client certificate: send NBD_OPT_STARTTLS first",
                );
                Ok(Step::Continue)
            }
        }
    }

    fn find(&self, name: &str) -> Option<usize> {
        if let Some(i) = self.exports.iter().position(|e| e.name == name) {
            return Some(i);
        }
        // The empty name is the default export: the only one, when there is one.
        (name.is_empty() && self.exports.len() == 1).then_some(0)
    }

    fn session(&self, export: usize, name: &str) -> Session {
        let base_allocation = self.structured
            && self
                .meta
                .as_ref()
                .is_some_and(|m| m.base_allocation && m.export == name);
        Session {
            export,
            transmission_flags: transmission_flags(&self.exports[export], self.structured),
            structured_replies: self.structured,
            base_allocation,
        }
    }

    fn export_name(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<Step, HandshakeError> {
        let name = String::from_utf8_lossy(data).into_owned();
        let Some(idx) = self.find(&name) else {
            return Err(HandshakeError::UnknownExport(name));
        };
        let session = self.session(idx, &name);
        out.extend_from_slice(&self.exports[idx].size.to_be_bytes());
        out.extend_from_slice(&session.transmission_flags.to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        Ok(Step::Transmission(session))
    }

    fn list(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<Step, Invalid> {
        if !data.is_empty() {
            return Err(Invalid("NBD_OPT_LIST takes no data"));
        }
        for e in self.exports {
            let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
            d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
            d.extend_from_slice(e.name.as_bytes());
            d.extend_from_slice(e.description.as_bytes());
            option_reply(out, OPT_LIST, REP_SERVER, &d);
        }
        option_reply(out, OPT_LIST, REP_ACK, &[]);
        Ok(Step::Continue)
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Result<Step, Invalid> {
        let mut c = Cursor { data };
        let name = c.string()?;
        let count = c.u16()?;
        let mut requests = Vec::with_capacity(usize::from(count).min(16));
        for _ in 0..count {
            requests.push(c.u16()?);
        }
        c.finish()?;
        let Some(idx) = self.find(name) else {
            let msg = format!("no export named {name:?}");
            option_reply(out, option, REP_ERR_UNKNOWN, msg.as_bytes());
            return Ok(Step::Continue);
        };
        let e = &self.exports[idx];
        let session = self.session(idx, name);

        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&e.size.to_be_bytes());
        d.extend_from_slice(&session.transmission_flags.to_be_bytes());
        option_reply(out, option, REP_INFO, &d);

        if requests.contains(&INFO_NAME) {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(e.name.as_bytes());
            option_reply(out, option, REP_INFO, &d);
        }
        if requests.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(e.description.as_bytes());
            option_reply(out, option, REP_INFO, &d);
        }
        // Always sent: ferry's minimum block size is 1, so unaligned clients are fine.
        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        d.extend_from_slice(&e.min_block_bytes.to_be_bytes());
        d.extend_from_slice(&e.preferred_block_bytes.to_be_bytes());
        d.extend_from_slice(&e.max_block_bytes.to_be_bytes());
        option_reply(out, option, REP_INFO, &d);

        option_reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            Ok(Step::Transmission(session))
        } else {
            Ok(Step::Continue)
        }
    }

    fn meta_context(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Step, Invalid> {
        let set = option == OPT_SET_META_CONTEXT;
        if set && !self.structured {
            return Err(Invalid(
                "NBD_OPT_SET_META_CONTEXT needs NBD_OPT_STRUCTURED_REPLY first",
            ));
        }
        let mut c = Cursor { data };
        let name = c.string()?;
        let count = c.u32()?;
        let mut queries = Vec::new();
        for _ in 0..count {
            queries.push(c.string()?);
        }
        c.finish()?;
        if self.find(name).is_none() {
            let msg = format!("no export named {name:?}");
            option_reply(out, option, REP_ERR_UNKNOWN, msg.as_bytes());
            return Ok(Step::Continue);
        }
        let matches = |q: &str| q == META_BASE_ALLOCATION || (!set && q == "base:");
        let selected = if !set && queries.is_empty() {
            true
        } else {
            queries.iter().any(|q| matches(q))
        };
        if selected {
            let mut d = META_BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            option_reply(out, option, REP_META_CONTEXT, &d);
        }
        if set {
            self.meta = Some(MetaSelection {
                export: name.to_string(),
                base_allocation: selected,
            });
        }
        option_reply(out, option, REP_ACK, &[]);
        Ok(Step::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports() -> Vec<ExportInfo> {
        vec![ExportInfo {
            name: "vol".into(),
            description: "a volume".into(),
            size: 1 << 20,
            read_only: false,
            min_block_bytes: 1,
            preferred_block_bytes: 4096,
            max_block_bytes: 32 << 20,
        }]
    }

    /// Splits a buffer of option replies into (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            assert_eq!(be_u64(&b[0..8]), OPTION_REPLY_MAGIC);
            let len = be_u32(&b[16..20]) as usize;
            v.push((
                be_u32(&b[8..12]),
                be_u32(&b[12..16]),
                b[20..20 + len].to_vec(),
            ));
            b = &b[20 + len..];
        }
        v
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn unknown_options_get_unsup_not_a_hangup() {
        let ex = exports();
        let mut n = Negotiator::new(&ex, NegotiationLimits::default());
        for opt in [OPT_STARTTLS, OPT_EXTENDED_HEADERS, 4, 0xdead_beef] {
            let mut out = Vec::new();
            assert_eq!(n.option(opt, b"junk", &mut out), Ok(Step::Continue));
            let r = replies(&out);
            assert_eq!(r.len(), 1);
            assert_eq!((r[0].0, r[0].1), (opt, REP_ERR_UNSUP));
        }
    }

    #[test]
    fn go_with_base_allocation() {
        let ex = exports();
        let mut n = Negotiator::new(&ex, NegotiationLimits::default());
        let mut out = Vec::new();
        n.option(OPT_STRUCTURED_REPLY, &[], &mut out).unwrap();
        n.option(
            OPT_SET_META_CONTEXT,
            &meta_data("vol", &["base:allocation", "qemu:dirty-bitmap:x"]),
            &mut out,
        )
        .unwrap();
        let r = replies(&out);
        assert_eq!(r[1].1, REP_META_CONTEXT);
        assert_eq!(&r[1].2[4..], META_BASE_ALLOCATION.as_bytes());
        assert_eq!(r[2].1, REP_ACK);
        out.clear();
        let step = n
            .option(OPT_GO, &go_data("vol", &[INFO_NAME]), &mut out)
            .unwrap();
        let Step::Transmission(s) = step else {
            panic!("{step:?}")
        };
        assert!(s.structured_replies && s.base_allocation);
        assert_eq!(
            s.transmission_flags & TFLAG_CAN_MULTI_CONN,
            TFLAG_CAN_MULTI_CONN
        );
        let types: Vec<_> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(types, vec![REP_INFO, REP_INFO, REP_INFO, REP_ACK]);
    }

    #[test]
    fn meta_context_for_another_export_is_not_applied() {
        let mut ex = exports();
        ex.push(ExportInfo {
            name: "other".into(),
            ..ex[0].clone()
        });
        let mut n = Negotiator::new(&ex, NegotiationLimits::default());
        let mut out = Vec::new();
        n.option(OPT_STRUCTURED_REPLY, &[], &mut out).unwrap();
        n.option(
            OPT_SET_META_CONTEXT,
            &meta_data("other", &["base:allocation"]),
            &mut out,
        )
        .unwrap();
        let Step::Transmission(s) = n.option(OPT_GO, &go_data("vol", &[]), &mut out).unwrap()
        else {
            panic!()
        };
        assert!(!s.base_allocation);
    }

    #[test]
    fn malformed_and_unknown_names() {
        let ex = exports();
        let mut n = Negotiator::new(&ex, NegotiationLimits::default());
        let mut out = Vec::new();
        // Name length claims more than there is.
        n.option(OPT_GO, &[0, 0, 1, 0, b'v'], &mut out).unwrap();
        n.option(OPT_INFO, &go_data("nope", &[]), &mut out).unwrap();
        n.option(OPT_SET_META_CONTEXT, &meta_data("vol", &[]), &mut out)
            .unwrap();
        let types: Vec<_> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(
            types,
            vec![REP_ERR_INVALID, REP_ERR_UNKNOWN, REP_ERR_INVALID]
        );
        assert_eq!(
            n.option(OPT_EXPORT_NAME, b"nope", &mut out),
            Err(HandshakeError::UnknownExport("nope".into()))
        );
    }

    #[test]
    fn limits_are_enforced() {
        let ex = exports();
        let limits = NegotiationLimits {
            option_bytes_max: 100,
            handshake_options_max: 2,
        };
        let mut n = Negotiator::new(&ex, limits);
        let mut h = [0u8; 16];
        h[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        h[8..12].copy_from_slice(&OPT_LIST.to_be_bytes());
        h[12..16].copy_from_slice(&101u32.to_be_bytes());
        assert!(matches!(
            n.option_header(&h),
            Err(HandshakeError::OptionTooLong { .. })
        ));
        h[12..16].copy_from_slice(&0u32.to_be_bytes());
        assert!(n.option_header(&h).is_ok());
        assert!(n.option_header(&h).is_ok());
        assert_eq!(n.option_header(&h), Err(HandshakeError::TooManyOptions(2)));
        assert_eq!(
            n.client_flags(1 << 5),
            Err(HandshakeError::BadClientFlags(32))
        );
    }

    #[test]
    fn forced_tls_refuses_everything_but_starttls_and_abort() {
        let ex = exports();
        let mut n = Negotiator::with_tls(&ex, NegotiationLimits::default(), TlsMode::Required);
        assert_eq!(
            n.client_flags(0),
            Err(HandshakeError::TlsNeedsFixedNewstyle)
        );
        n.client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .unwrap();
        let mut out = Vec::new();
        for (opt, data) in [
            (OPT_LIST, vec![]),
            (OPT_INFO, go_data("vol", &[INFO_NAME])),
            (OPT_GO, go_data("vol", &[])),
            (OPT_GO, go_data("nope", &[])),
            (OPT_STRUCTURED_REPLY, vec![]),
            (OPT_LIST_META_CONTEXT, meta_data("vol", &[])),
            (OPT_SET_META_CONTEXT, meta_data("vol", &["base:allocation"])),
            (OPT_EXTENDED_HEADERS, vec![]),
            (0xdead_beef, b"junk".to_vec()),
        ] {
            out.clear();
            assert_eq!(n.option(opt, &data, &mut out), Ok(Step::Continue));
            let r = replies(&out);
            assert_eq!(r.len(), 1, "{opt:#x}");
            assert_eq!((r[0].0, r[0].1), (opt, REP_ERR_TLS_REQD), "{opt:#x}");
            // Not a byte of an export's name or size before TLS.
            assert!(!out.windows(3).any(|w| w == b"vol"), "{opt:#x}");
        }
        assert_eq!(
            n.option(OPT_EXPORT_NAME, b"vol", &mut out),
            Err(HandshakeError::TlsRequired)
        );
        out.clear();
        n.option(OPT_STARTTLS, b"x", &mut out).unwrap();
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        out.clear();
        assert_eq!(n.option(OPT_STARTTLS, &[], &mut out), Ok(Step::StartTls));
        assert_eq!(replies(&out)[0].1, REP_ACK);
        n.tls_started();
        out.clear();
        n.option(OPT_STARTTLS, &[], &mut out).unwrap();
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID, "a second STARTTLS");
        out.clear();
        n.option(OPT_LIST, &[], &mut out).unwrap();
        let types: Vec<_> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(types, vec![REP_SERVER, REP_ACK]);
        out.clear();
        assert!(matches!(
            n.option(OPT_GO, &go_data("vol", &[]), &mut out),
            Ok(Step::Transmission(_))
        ));
    }

    #[test]
    fn starttls_forgets_what_was_negotiated_before() {
        let ex = exports();
        let mut n = Negotiator::with_tls(&ex, NegotiationLimits::default(), TlsMode::Required);
        let mut out = Vec::new();
        n.option(OPT_STARTTLS, &[], &mut out).unwrap();
        n.tls_started();
        n.option(OPT_STRUCTURED_REPLY, &[], &mut out).unwrap();
        assert!(n.structured);
        // A plain negotiator answers STARTTLS with UNSUP (NOTLS mode).
        let mut plain = Negotiator::new(&ex, NegotiationLimits::default());
        out.clear();
        assert_eq!(
            plain.option(OPT_STARTTLS, &[], &mut out),
            Ok(Step::Continue)
        );
        assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
        // tls_started resets structured replies and meta contexts.
        n.tls_started();
        assert!(!n.structured && n.meta.is_none());
    }

    #[test]
    fn default_export_and_export_name() {
        let ex = exports();
        let mut n = Negotiator::new(&ex, NegotiationLimits::default());
        n.client_flags(FLAG_C_FIXED_NEWSTYLE).unwrap();
        let mut out = Vec::new();
        let step = n.option(OPT_EXPORT_NAME, b"", &mut out).unwrap();
        assert!(matches!(
            step,
            Step::Transmission(Session { export: 0, .. })
        ));
        assert_eq!(out.len(), 8 + 2 + 124);
    }
}
