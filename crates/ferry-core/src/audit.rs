//! The audit chain: append-only records, each carrying the BLAKE3 hash of
//! the one before, and the pure checks over them (sans-IO: bytes in,
//! verdicts out; the agent's `audit` module does the file and the disk).
//!
//! **Frame** (one record in the log file, little-endian):
//! `magic "FAUD" | kind u8 | len u32 | seq u64 | prev [32] | hash [32] | payload [len]`
//! (81 bytes of header). `kind` 0 is a chained record: `hash` =
//! BLAKE3(`"ferry audit v1"` ‖ seq ‖ prev ‖ payload) and `prev` is the hash
//! of record `seq − 1`. `kind` 1 is the **checkpoint** that opens a pruned
//! log: `seq` and `hash` are the head of the pruned prefix (the last record
//! removed), so the first record kept must have `seq + 1` and `prev = hash`;
//! a log that was never pruned starts at seq 1 with `prev` all zeros.
//!
//! A head (`seq`, `hash`) commits to every record up to `seq`: a holder of
//! an old head (the peer, the witness) reveals any rewrite of the prefix,
//! however consistent (every hash recomputed), because the rewritten
//! record `seq` no longer has that hash.

use std::fmt;

/// The bytes that start every frame.
pub const MAGIC: [u8; 4] = *b"FAUD";
/// Header bytes before the payload.
pub const HEADER_BYTES: usize = 4 + 1 + 4 + 8 + 32 + 32;
/// Largest payload accepted (a record is a request and its result, not
/// data): larger lengths are damage.
pub const PAYLOAD_BYTES_MAX: usize = 1 << 20;

const KIND_RECORD: u8 = 0;
const KIND_CHECKPOINT: u8 = 1;
const DOMAIN: &[u8] = b"ferry audit v1";

/// A BLAKE3 hash.
pub type Hash = [u8; 32];

/// Hex of a hash.
pub fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// A hash from 64 hex digits.
pub fn parse_hex(s: &str) -> Option<Hash> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut h = [0u8; 32];
    for (i, b) in h.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(h)
}

/// The hash of record `seq` with `prev` and `payload`.
pub fn record_hash(seq: u64, prev: &Hash, payload: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(DOMAIN);
    h.update(&seq.to_le_bytes());
    h.update(prev);
    h.update(payload);
    *h.finalize().as_bytes()
}

/// A chain's head: its last record's sequence number and hash (seq 0 and
/// zeros: the empty chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    pub seq: u64,
    pub hash: Hash,
}

impl fmt::Display for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, hex(&self.hash))
    }
}

/// One frame as read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Byte offset of the frame in the log.
    pub offset: u64,
    pub checkpoint: bool,
    pub seq: u64,
    pub prev: Hash,
    /// The hash stored in the frame (not recomputed).
    pub hash: Hash,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The hash its content gives (equal to `hash` unless it was changed).
    pub fn computed(&self) -> Hash {
        record_hash(self.seq, &self.prev, &self.payload)
    }

    pub fn head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.hash,
        }
    }
}

/// Encodes chained record `seq` after `prev`; returns its bytes and hash.
pub fn encode_record(seq: u64, prev: &Hash, payload: &[u8]) -> (Vec<u8>, Hash) {
    let hash = record_hash(seq, prev, payload);
    (encode(KIND_RECORD, seq, prev, &hash, payload), hash)
}

/// Encodes the checkpoint that opens a log whose prefix up to `pruned` was
/// removed; `payload` says when and why (informative, not hashed).
pub fn encode_checkpoint(pruned: Head, payload: &[u8]) -> Vec<u8> {
    encode(KIND_CHECKPOINT, pruned.seq, &[0; 32], &pruned.hash, payload)
}

fn encode(kind: u8, seq: u64, prev: &Hash, hash: &Hash, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_BYTES + payload.len());
    v.extend_from_slice(&MAGIC);
    v.push(kind);
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(prev);
    v.extend_from_slice(hash);
    v.extend_from_slice(payload);
    v
}

/// What reading a log's bytes found: its frames, and what follows the last
/// whole one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    pub frames: Vec<Frame>,
    /// Bytes after the last whole frame that do not make one: a torn
    /// append (a crash mid-write) — or damage, see `tail_kind`.
    pub tail: Option<Tail>,
}

/// The bytes after the last whole frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    pub offset: u64,
    pub bytes: u64,
    pub kind: TailKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailKind {
    /// A frame's start whose header or payload runs past the end, or only
    /// zero bytes (a crash after the file grew, before the data landed):
    /// what an interrupted append leaves. Truncated at start, and a record
    /// saying so is appended.
    Torn,
    /// Bytes that are not a frame (bad magic, kind or length) with more
    /// after them: damage, never truncated silently (verify reports it).
    Damaged,
}

/// Splits a log's bytes into frames (structure only: no hash is checked
/// here; [`verify`] does that).
pub fn parse(bytes: &[u8]) -> Parsed {
    let mut p = Parsed::default();
    let mut at = 0usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let torn = |p: &mut Parsed, kind| {
            p.tail = Some(Tail {
                offset: at as u64,
                bytes: rest.len() as u64,
                kind,
            })
        };
        if rest.iter().all(|b| *b == 0) {
            torn(&mut p, TailKind::Torn);
            break;
        }
        let magic_ok = rest.len() < 4 && MAGIC.starts_with(rest) || rest.starts_with(&MAGIC);
        if !magic_ok {
            torn(&mut p, TailKind::Damaged);
            break;
        }
        if rest.len() < HEADER_BYTES {
            torn(&mut p, TailKind::Torn);
            break;
        }
        let kind = rest[4];
        let len = u32::from_le_bytes(rest[5..9].try_into().expect("4 bytes")) as usize;
        if kind > KIND_CHECKPOINT || len > PAYLOAD_BYTES_MAX {
            torn(&mut p, TailKind::Damaged);
            break;
        }
        if rest.len() < HEADER_BYTES + len {
            torn(&mut p, TailKind::Torn);
            break;
        }
        let seq = u64::from_le_bytes(rest[9..17].try_into().expect("8 bytes"));
        let prev: Hash = rest[17..49].try_into().expect("32 bytes");
        let hash: Hash = rest[49..81].try_into().expect("32 bytes");
        p.frames.push(Frame {
            offset: at as u64,
            checkpoint: kind == KIND_CHECKPOINT,
            seq,
            prev,
            hash,
            payload: rest[HEADER_BYTES..HEADER_BYTES + len].to_vec(),
        });
        at += HEADER_BYTES + len;
    }
    p
}

/// A head someone else holds of this chain (the peer, the witness).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldHead {
    /// Who holds it: `peer b`, `witness 127.0.0.1:9000`.
    pub holder: String,
    pub head: Head,
}

/// What [`verify`] proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The pruned prefix's head, if the log was pruned.
    pub checkpoint: Option<Head>,
    /// The first and last record kept.
    pub first_seq: u64,
    pub head: Head,
    pub records: u64,
    /// Held heads that matched the chain.
    pub heads_matched: u64,
    /// Held heads older than the checkpoint (the records they name were
    /// pruned; only the checkpoint's own head can be compared).
    pub heads_pruned: u64,
}

/// The first thing wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error("record {seq} (byte {offset}) was changed: its content no longer gives the hash stored with it")]
    Changed { seq: u64, offset: u64 },
    #[error("record {seq} (byte {offset}) does not follow record {prev_seq}: its prev hash is not that record's hash (record {prev_seq} changed, or records between were removed)")]
    Unlinked {
        seq: u64,
        prev_seq: u64,
        offset: u64,
    },
    #[error("record {seq} (byte {offset}) comes after record {after}: records were removed or reordered (expected {expected})")]
    Sequence {
        seq: u64,
        after: u64,
        expected: u64,
        offset: u64,
    },
    #[error("a checkpoint at byte {offset} that does not open the log: the log was spliced")]
    MisplacedCheckpoint { offset: u64 },
    #[error("{bytes} bytes at byte {offset} are not a record: the log is damaged there")]
    Damaged { offset: u64, bytes: u64 },
    #[error("{holder} holds head {held} but record {seq} here has hash {here}: the chain was rewritten at or before record {seq}")]
    HeadMismatch {
        holder: String,
        seq: u64,
        held: String,
        here: String,
    },
    #[error("{holder} holds head {held} but this log ends at record {last}: records were removed from its end")]
    HeadBeyondEnd {
        holder: String,
        held: String,
        last: u64,
    },
}

impl Broken {
    /// The sequence number of the first bad record, where one is known.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Broken::Changed { seq, .. }
            | Broken::Unlinked { seq, .. }
            | Broken::Sequence { seq, .. }
            | Broken::HeadMismatch { seq, .. } => Some(*seq),
            Broken::HeadBeyondEnd { last, .. } => Some(last + 1),
            Broken::MisplacedCheckpoint { .. } | Broken::Damaged { .. } => None,
        }
    }
}

/// Checks a parsed log: every record's hash, each one's link to the one
/// before, sequence numbers without gap, the checkpoint (only first), a
/// damaged tail; then every held head against the record of its seq. A
/// torn tail is not an error here (the agent truncates it at start and
/// records that it did).
pub fn verify(parsed: &Parsed, held: &[HeldHead]) -> Result<Verified, Broken> {
    if let Some(t) = &parsed.tail {
        if t.kind == TailKind::Damaged {
            // Records before it are still checked first: the first bad
            // record is the earliest problem.
            verify_frames(&parsed.frames, held)?;
            return Err(Broken::Damaged {
                offset: t.offset,
                bytes: t.bytes,
            });
        }
    }
    verify_frames(&parsed.frames, held)
}

fn verify_frames(frames: &[Frame], held: &[HeldHead]) -> Result<Verified, Broken> {
    let mut it = frames.iter().peekable();
    let mut checkpoint = None;
    let mut last = Head::default();
    if let Some(f) = it.peek() {
        if f.checkpoint {
            checkpoint = Some(f.head());
            last = f.head();
            it.next();
        }
    }
    let mut first_seq = None;
    let mut records = 0u64;
    // (seq → hash) is increasing in seq: a binary search finds a head's.
    let mut index: Vec<(u64, Hash)> = Vec::with_capacity(frames.len());
    for f in it {
        if f.checkpoint {
            return Err(Broken::MisplacedCheckpoint { offset: f.offset });
        }
        if f.computed() != f.hash {
            return Err(Broken::Changed {
                seq: f.seq,
                offset: f.offset,
            });
        }
        if f.seq != last.seq + 1 {
            return Err(Broken::Sequence {
                seq: f.seq,
                after: last.seq,
                expected: last.seq + 1,
                offset: f.offset,
            });
        }
        if f.prev != last.hash {
            return Err(Broken::Unlinked {
                seq: f.seq,
                prev_seq: last.seq,
                offset: f.offset,
            });
        }
        first_seq.get_or_insert(f.seq);
        records += 1;
        last = f.head();
        index.push((f.seq, f.hash));
    }
    let mut heads_matched = 0;
    let mut heads_pruned = 0;
    let mut sorted: Vec<&HeldHead> = held.iter().collect();
    sorted.sort_by_key(|h| h.head.seq);
    for h in sorted {
        let seq = h.head.seq;
        let here = if seq == 0 {
            Some([0u8; 32])
        } else if let Some(c) = checkpoint.filter(|c| seq <= c.seq) {
            if seq < c.seq {
                heads_pruned += 1;
                continue;
            }
            Some(c.hash)
        } else {
            index
                .binary_search_by_key(&seq, |(s, _)| *s)
                .ok()
                .map(|i| index[i].1)
        };
        match here {
            Some(x) if x == h.head.hash => heads_matched += 1,
            Some(x) => {
                return Err(Broken::HeadMismatch {
                    holder: h.holder.clone(),
                    seq,
                    held: h.head.to_string(),
                    here: hex(&x),
                })
            }
            None => {
                return Err(Broken::HeadBeyondEnd {
                    holder: h.holder.clone(),
                    held: h.head.to_string(),
                    last: last.seq,
                })
            }
        }
    }
    Ok(Verified {
        checkpoint,
        first_seq: first_seq.unwrap_or(last.seq + 1),
        head: last,
        records,
        heads_matched,
        heads_pruned,
    })
}

/// Where to cut a log of `frames` to keep at most about `keep_bytes` of its
/// newest records: the index of the first record kept (never the last
/// record: a log keeps at least one), or `None` if nothing need go.
pub fn prune_point(frames: &[Frame], keep_bytes: u64) -> Option<usize> {
    let size = |f: &Frame| (HEADER_BYTES + f.payload.len()) as u64;
    let mut kept = 0u64;
    let mut first = frames.len();
    for (i, f) in frames.iter().enumerate().rev() {
        if f.checkpoint {
            break;
        }
        if kept + size(f) > keep_bytes && first < frames.len() {
            break;
        }
        kept += size(f);
        first = i;
    }
    let starts_with_checkpoint = frames.first().is_some_and(|f| f.checkpoint);
    let nothing_to_drop = first == 0 || (first == 1 && starts_with_checkpoint);
    (!nothing_to_drop && first < frames.len()).then_some(first)
}

/// Keeps a bounded history of the heads a holder was sent: the newest
/// `recent` heads, plus older ones spaced out (each kept one at least
/// twice as old in seq as the next) so that flooding with new heads
/// cannot push every old one out. Returns whether `head` was taken (a
/// head not newer than the last one is refused: a holder keeps what it
/// already has).
pub fn keep_head(history: &mut Vec<Head>, head: Head, recent: usize) -> bool {
    if history.last().is_some_and(|l| head.seq <= l.seq) {
        return false;
    }
    history.push(head);
    let recent = recent.max(1);
    if history.len() <= 2 * recent {
        return true;
    }
    // Thin the older part: keep a head only if its seq is at most half the
    // seq of the next older one kept (from the newest old head down).
    let split = history.len() - recent;
    let (old, new) = history.split_at(split);
    let mut kept: Vec<Head> = Vec::new();
    for h in old.iter().rev() {
        match kept.last() {
            Some(k) if h.seq * 2 > k.seq && h.seq != old[0].seq => {}
            _ => kept.push(*h),
        }
    }
    kept.reverse();
    kept.truncate(recent);
    kept.extend_from_slice(new);
    *history = kept;
    true
}

/// The witness protocol's audit messages (a datagram of its own: a
/// witness of an earlier release does not parse it and answers nothing,
/// which the node reports as "keeps no heads").
pub mod wire {
    use serde::{Deserialize, Serialize};

    /// A head on the wire: sequence number and hash (hex).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct WireHead {
        pub seq: u64,
        pub hash: String,
    }

    /// Node → witness: `{"audit": {...}}`.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ToWitness {
        pub audit: Ask,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Ask {
        /// The cluster id (as for the witness's records).
        pub cluster: String,
        /// Whose chain.
        pub node: String,
        /// Keep this head (absent: only tell what is held).
        #[serde(default)]
        pub put: Option<WireHead>,
        /// Echoed in the reply: matches it to this request.
        pub nonce: u64,
    }

    /// Witness → node: `{"audit_heads": {...}}`.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct FromWitness {
        pub audit_heads: Held,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Held {
        pub cluster: String,
        pub node: String,
        pub nonce: u64,
        /// Whether `put` was kept (false: not newer than the last head).
        #[serde(default)]
        pub kept: Option<bool>,
        /// The heads held, oldest first.
        pub heads: Vec<WireHead>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut prev = [0u8; 32];
        for seq in 1..=n {
            let (bytes, h) = encode_record(seq, &prev, format!("{{\"n\":{seq}}}").as_bytes());
            out.extend(bytes);
            prev = h;
        }
        out
    }

    fn frames_to_bytes(frames: &[Frame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            let kind = if f.checkpoint { 1 } else { 0 };
            out.extend(encode(kind, f.seq, &f.prev, &f.hash, &f.payload));
        }
        out
    }

    /// Rewrites frames from `from` on with every hash recomputed.
    fn rehash(frames: &mut [Frame], from: usize) {
        let mut prev = if from == 0 {
            [0; 32]
        } else {
            frames[from - 1].hash
        };
        for f in &mut frames[from..] {
            f.prev = prev;
            f.hash = f.computed();
            prev = f.hash;
        }
    }

    fn held(h: Head) -> Vec<HeldHead> {
        vec![HeldHead {
            holder: "peer b".into(),
            head: h,
        }]
    }

    #[test]
    fn a_whole_chain_verifies_and_every_held_head_matches() {
        let bytes = chain(5);
        let p = parse(&bytes);
        assert_eq!(p.frames.len(), 5);
        assert_eq!(p.tail, None);
        let heads: Vec<HeldHead> = p.frames.iter().flat_map(|f| held(f.head())).collect();
        let v = verify(&p, &heads).unwrap();
        assert_eq!(v.head, p.frames[4].head());
        assert_eq!((v.records, v.first_seq, v.heads_matched), (5, 1, 5));
        assert_eq!(verify(&parse(&[]), &[]).unwrap().records, 0);
    }

    #[test]
    fn a_changed_byte_names_its_record() {
        let mut bytes = chain(5);
        let p = parse(&bytes);
        let at = p.frames[2].offset as usize + HEADER_BYTES + 2;
        bytes[at] ^= 1;
        let e = verify(&parse(&bytes), &[]).unwrap_err();
        assert!(matches!(e, Broken::Changed { seq: 3, .. }), "{e}");
        assert_eq!(e.seq(), Some(3));
        // A changed stored hash is the same record changed.
        let mut bytes = chain(5);
        bytes[p.frames[1].offset as usize + 60] ^= 0x80;
        assert!(matches!(
            verify(&parse(&bytes), &[]),
            Err(Broken::Changed { seq: 2, .. })
        ));
    }

    #[test]
    fn a_removed_record_is_found_and_at_the_end_by_a_held_head() {
        let p = parse(&chain(5));
        let mut frames = p.frames.clone();
        frames.remove(2);
        let e = verify(&parse(&frames_to_bytes(&frames)), &[]).unwrap_err();
        assert!(
            matches!(
                e,
                Broken::Sequence {
                    seq: 4,
                    expected: 3,
                    ..
                }
            ),
            "{e}"
        );
        // Removing the newest records leaves a consistent chain; only a
        // head held elsewhere shows it.
        let short = frames_to_bytes(&p.frames[..3]);
        assert!(verify(&parse(&short), &[]).is_ok());
        let e = verify(&parse(&short), &held(p.frames[4].head())).unwrap_err();
        assert!(matches!(e, Broken::HeadBeyondEnd { last: 3, .. }), "{e}");
        assert_eq!(e.seq(), Some(4));
    }

    #[test]
    fn reordered_records_are_found() {
        let p = parse(&chain(5));
        let mut frames = p.frames.clone();
        frames.swap(1, 2);
        let e = verify(&parse(&frames_to_bytes(&frames)), &[]).unwrap_err();
        assert!(matches!(e, Broken::Sequence { seq: 3, .. }), "{e}");
        // Renumbered and relinked, but not rehashed: the content changed.
        frames[1].seq = 2;
        frames[2].seq = 3;
        let e = verify(&parse(&frames_to_bytes(&frames)), &[]).unwrap_err();
        assert!(matches!(e, Broken::Changed { seq: 2, .. }), "{e}");
    }

    #[test]
    fn a_consistent_rewrite_passes_alone_and_fails_against_a_held_head() {
        let p = parse(&chain(6));
        let peer_head = p.frames[4].head();
        let mut frames = p.frames.clone();
        frames[1].payload = b"{\"n\":99}".to_vec();
        rehash(&mut frames, 1);
        let rewritten = parse(&frames_to_bytes(&frames));
        assert!(verify(&rewritten, &[]).is_ok(), "consistent on its own");
        let e = verify(&rewritten, &held(peer_head)).unwrap_err();
        assert!(matches!(e, Broken::HeadMismatch { seq: 5, .. }), "{e}");
        assert!(e.to_string().contains("peer b"), "{e}");
        // A head from before the rewritten record still matches.
        assert!(verify(&rewritten, &held(p.frames[0].head())).is_ok());
    }

    #[test]
    fn a_pruned_log_verifies_from_its_checkpoint() {
        let p = parse(&chain(10));
        let cut = prune_point(&p.frames, 3 * (HEADER_BYTES as u64 + 8)).unwrap();
        assert_eq!(cut, 7, "the newest three kept");
        let mut bytes = encode_checkpoint(p.frames[cut - 1].head(), b"{}");
        bytes.extend(frames_to_bytes(&p.frames[cut..]));
        let pruned = parse(&bytes);
        let heads = vec![
            HeldHead {
                holder: "w".into(),
                head: p.frames[2].head(),
            },
            HeldHead {
                holder: "w".into(),
                head: p.frames[6].head(),
            },
            HeldHead {
                holder: "w".into(),
                head: p.frames[9].head(),
            },
        ];
        let v = verify(&pruned, &heads).unwrap();
        assert_eq!(v.checkpoint, Some(p.frames[6].head()));
        assert_eq!((v.first_seq, v.records), (8, 3));
        assert_eq!((v.heads_matched, v.heads_pruned), (2, 1));
        // Again: the checkpoint is never dropped, the newest kept.
        assert_eq!(prune_point(&pruned.frames, 1), Some(3));
        assert_eq!(prune_point(&pruned.frames, 1 << 20), None);
        // A checkpoint that lies about the prefix breaks the link.
        let mut lie = encode_checkpoint(p.frames[5].head(), b"{}");
        lie.extend(frames_to_bytes(&p.frames[cut..]));
        let e = verify(&parse(&lie), &[]).unwrap_err();
        assert!(matches!(e, Broken::Sequence { seq: 8, .. }), "{e}");
        // One spliced into the middle is refused.
        let mut spliced = frames_to_bytes(&p.frames[..2]);
        spliced.extend(encode_checkpoint(p.frames[1].head(), b"{}"));
        assert!(matches!(
            verify(&parse(&spliced), &[]),
            Err(Broken::MisplacedCheckpoint { .. })
        ));
    }

    #[test]
    fn a_torn_tail_is_told_from_damage() {
        let bytes = chain(3);
        let len = bytes.len();
        for cut in [1, 5, HEADER_BYTES, HEADER_BYTES + 3] {
            let mut b = bytes.clone();
            b.extend_from_slice(&chain(4)[len..len + cut]);
            let p = parse(&b);
            assert_eq!(p.frames.len(), 3, "cut {cut}");
            let t = p.tail.clone().unwrap();
            assert_eq!(
                (t.kind, t.offset, t.bytes),
                (TailKind::Torn, len as u64, cut as u64)
            );
            assert!(verify(&p, &[]).is_ok());
        }
        let mut zeros = bytes.clone();
        zeros.extend([0u8; 100]);
        assert_eq!(parse(&zeros).tail.unwrap().kind, TailKind::Torn);
        let mut junk = bytes.clone();
        junk.extend(
            b"not a frame at all, and long enough to be a header ..........................",
        );
        let p = parse(&junk);
        assert_eq!(p.tail.clone().unwrap().kind, TailKind::Damaged);
        assert!(matches!(verify(&p, &[]), Err(Broken::Damaged { .. })));
    }

    #[test]
    fn held_head_history_is_bounded_and_keeps_old_heads() {
        let mut h = Vec::new();
        for seq in 1..=10_000u64 {
            assert!(keep_head(&mut h, Head { seq, hash: [1; 32] }, 8));
            assert!(h.len() <= 16, "{}", h.len());
        }
        assert!(!keep_head(
            &mut h,
            Head {
                seq: 5,
                hash: [1; 32]
            },
            8
        ));
        assert_eq!(h.last().unwrap().seq, 10_000);
        // The first head ever is still there, and older heads are spread.
        assert_eq!(h[0].seq, 1, "{h:?}");
        assert!(h.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(parse_hex(&hex(&[7; 32])), Some([7; 32]));
        assert_eq!(parse_hex("zz"), None);
    }
}
