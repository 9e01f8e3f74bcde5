//! Request validation for the transmission phase, sans I/O.
//!
//! [`validate`] is the single gate between a client's request header and the
//! device: it decides the error the spec names for every malformed request
//! (unknown command or flag → `EINVAL`, write to a read-only export → `EPERM`,
//! write past the end → `ENOSPC`, read past the end → `EINVAL`, payload above
//! `max_request_bytes` → `EOVERFLOW`/`EINVAL`), so the device only ever sees ranges
//! inside it.

use ferry_core::Extent;

use crate::device::ZeroMode;
use crate::handshake::Session;
use crate::proto::*;

/// What the transmission phase knows about its export and limits.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub size: u64,
    pub read_only: bool,
    pub session: Session,
    /// Largest READ or WRITE payload accepted.
    pub max_request_bytes: u32,
}

/// A request that passed validation; ranges are inside the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        length: u32,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        mode: ZeroMode,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        one: bool,
    },
}

/// A refused request: reply with this error (and, for WRITE, skip its payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub errno: Errno,
    pub reason: &'static str,
}

fn refuse(errno: Errno, reason: &'static str) -> Refusal {
    Refusal { errno, reason }
}

/// Bytes of payload that follow this header on the wire, whatever its validity.
pub fn payload_bytes(h: &RequestHeader) -> u32 {
    if h.kind == CMD_WRITE {
        h.length
    } else {
        0
    }
}

/// Decides what to do with one request header.
pub fn validate(h: &RequestHeader, ctx: &Context) -> Result<Command, Refusal> {
    let allowed_flags = match h.kind {
        CMD_READ if ctx.session.structured_replies => CMD_FLAG_DF,
        CMD_READ => 0,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        CMD_DISC => return Ok(Command::Disconnect),
        CMD_FLUSH | CMD_CACHE => 0,
        _ => return Err(refuse(Errno::Inval, "unknown command")),
    };
    if h.flags & !allowed_flags != 0 {
        return Err(refuse(Errno::Inval, "flag not valid for this command"));
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && ctx.read_only {
        return Err(refuse(Errno::Perm, "export is read-only"));
    }
    if h.kind == CMD_FLUSH {
        if h.offset != 0 || h.length != 0 {
            return Err(refuse(Errno::Inval, "flush with non-zero offset or length"));
        }
        return Ok(Command::Flush);
    }
    if h.length == 0 {
        return Err(refuse(Errno::Inval, "zero-length request"));
    }
    if matches!(h.kind, CMD_READ | CMD_WRITE) && h.length > ctx.max_request_bytes {
        let errno = if ctx.session.structured_replies {
            Errno::Overflow
        } else {
            Errno::Inval
        };
        return Err(refuse(errno, "request longer than max_request_bytes"));
    }
    if h.kind == CMD_BLOCK_STATUS && !ctx.session.base_allocation {
        return Err(refuse(
            Errno::Inval,
            "block status without a negotiated base:allocation context",
        ));
    }
    if Extent::within(h.offset, u64::from(h.length), ctx.size).is_err() {
        let errno = if writes { Errno::NoSpc } else { Errno::Inval };
        return Err(refuse(errno, "request range is outside the export"));
    }
    let (offset, length) = (h.offset, h.length);
    Ok(match h.kind {
        CMD_READ => Command::Read { offset, length },
        CMD_WRITE => Command::Write {
            offset,
            length,
            fua,
        },
        CMD_TRIM => Command::Trim {
            offset,
            length,
            fua,
        },
        CMD_CACHE => Command::Cache { offset, length },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            length,
            mode: ZeroMode {
                may_punch: h.flags & CMD_FLAG_NO_HOLE == 0,
                fast_only: h.flags & CMD_FLAG_FAST_ZERO != 0,
            },
            fua,
        },
        // Only BLOCK_STATUS is left: every other kind returned above.
        _ => Command::BlockStatus {
            offset,
            length,
            one: h.flags & CMD_FLAG_REQ_ONE != 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ctx(read_only: bool, structured: bool) -> Context {
        Context {
            size: 1 << 20,
            read_only,
            session: Session {
                export: 0,
                transmission_flags: 0,
                structured_replies: structured,
                base_allocation: structured,
            },
            max_request_bytes: 65536,
        }
    }

    fn h(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            length,
        }
    }

    fn errno(r: Result<Command, Refusal>) -> Option<Errno> {
        r.err().map(|r| r.errno)
    }

    #[test]
    fn spec_error_codes() {
        let c = ctx(false, true);
        assert_eq!(errno(validate(&h(99, 0, 0, 1), &c)), Some(Errno::Inval));
        assert_eq!(
            errno(validate(&h(CMD_READ, CMD_FLAG_FUA, 0, 1), &c)),
            Some(Errno::Inval)
        );
        assert_eq!(
            errno(validate(&h(CMD_READ, 0, 1 << 20, 1), &c)),
            Some(Errno::Inval)
        );
        assert_eq!(
            errno(validate(&h(CMD_WRITE, 0, (1 << 20) - 1, 2), &c)),
            Some(Errno::NoSpc)
        );
        assert_eq!(
            errno(validate(&h(CMD_WRITE, 0, u64::MAX, 2), &c)),
            Some(Errno::NoSpc)
        );
        assert_eq!(
            errno(validate(&h(CMD_READ, 0, u64::MAX - 1, 4), &c)),
            Some(Errno::Inval)
        );
        assert_eq!(
            errno(validate(&h(CMD_READ, 0, 0, 65537), &c)),
            Some(Errno::Overflow)
        );
        assert_eq!(
            errno(validate(&h(CMD_READ, 0, 0, 65537), &ctx(false, false))),
            Some(Errno::Inval)
        );
        assert_eq!(
            errno(validate(&h(CMD_FLUSH, 0, 1, 0), &c)),
            Some(Errno::Inval)
        );
        assert_eq!(
            errno(validate(&h(CMD_WRITE, 0, 0, 1), &ctx(true, true))),
            Some(Errno::Perm)
        );
        assert_eq!(
            errno(validate(&h(CMD_TRIM, 0, 0, 1), &ctx(true, true))),
            Some(Errno::Perm)
        );
        assert_eq!(
            errno(validate(&h(CMD_BLOCK_STATUS, 0, 0, 1), &ctx(false, false))),
            Some(Errno::Inval)
        );
        assert_eq!(validate(&h(CMD_DISC, 0, 0, 0), &c), Ok(Command::Disconnect));
        assert_eq!(
            validate(
                &h(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
                    4096,
                    4096
                ),
                &c
            ),
            Ok(Command::WriteZeroes {
                offset: 4096,
                length: 4096,
                mode: ZeroMode {
                    may_punch: false,
                    fast_only: false
                },
                fua: true
            })
        );
    }

    proptest! {
        /// Whatever a client sends, an accepted command's range is inside the export.
        #[test]
        fn accepted_ranges_are_inside(kind in 0u16..10, flags: u16, offset: u64, length: u32, ro: bool, st: bool) {
            let c = ctx(ro, st);
            let hdr = h(kind, flags, offset, length);
            match validate(&hdr, &c) {
                Ok(Command::Read { offset, length } | Command::Write { offset, length, .. }) => {
                    prop_assert!(!(ro && kind == CMD_WRITE), "write accepted on read-only");
                    prop_assert!(offset + u64::from(length) <= c.size);
                    prop_assert!(length <= c.max_request_bytes);
                }
                Ok(Command::Trim { offset, length, .. } | Command::Cache { offset, length }
                    | Command::WriteZeroes { offset, length, .. } | Command::BlockStatus { offset, length, .. }) => {
                    prop_assert!(offset + u64::from(length) <= c.size);
                }
                _ => {}
            }
        }
    }
}
