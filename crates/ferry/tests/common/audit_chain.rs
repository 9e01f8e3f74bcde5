//! The audit log's chain as a root user with the file could rewrite it.

use std::path::Path;

use ferry_core::audit as chain;

/// Rewrites the audit log at `path` consistently: in the first record whose payload
/// holds `from`, `from` becomes `to`, and every hash from there on is
/// recomputed (what a root user with the file, and nothing else, can do).
/// Returns the rewritten record's seq.
pub fn rewrite_consistently(path: &Path, from: &str, to: &str) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let p = chain::parse(&bytes);
    assert!(p.tail.is_none());
    let at = p
        .frames
        .iter()
        .position(|f| String::from_utf8_lossy(&f.payload).contains(from))
        .expect("a record to rewrite");
    let mut out = Vec::new();
    let mut prev = [0u8; 32];
    for (i, f) in p.frames.iter().enumerate() {
        assert!(!f.checkpoint);
        if i < at {
            out.extend_from_slice(
                &bytes
                    [f.offset as usize..f.offset as usize + chain::HEADER_BYTES + f.payload.len()],
            );
            prev = f.hash;
            continue;
        }
        let payload = if i == at {
            String::from_utf8(f.payload.clone())
                .unwrap()
                .replacen(from, to, 1)
                .into_bytes()
        } else {
            f.payload.clone()
        };
        let (frame, h) = chain::encode_record(f.seq, &prev, &payload);
        out.extend(frame);
        prev = h;
    }
    std::fs::write(path, &out).unwrap();
    // Alone, the rewritten chain is whole.
    chain::verify(&chain::parse(&out), &[]).expect("a consistent rewrite");
    p.frames[at].seq
}
