"""The soak's record format, shared by writer.py and check.py.

A record is one 4 KiB block: magic (8 bytes), its index and the run id (two
little-endian u64), filler derived from those (so a record can be rebuilt
from its index alone), and a SHA-256 of everything before it (its checksum).
Record i lives in slot i % slots of the volume (block i % slots).
"""

import hashlib
import struct

RECORD_BYTES = 4096
MAGIC = b"ferrysk1"
_HEAD = struct.Struct("<8sQQ")
_SUM_BYTES = 32


def record(i, run):
    head = _HEAD.pack(MAGIC, i, run)
    filler = hashlib.shake_256(head).digest(RECORD_BYTES - len(head) - _SUM_BYTES)
    body = head + filler
    return body + hashlib.sha256(body).digest()


def parse(block):
    """(index, run) of an intact record, or None (zeros, torn, foreign)."""
    if len(block) != RECORD_BYTES or block[:8] != MAGIC:
        return None
    body, tail = block[:-_SUM_BYTES], block[-_SUM_BYTES:]
    if hashlib.sha256(body).digest() != tail:
        return None
    _, i, run = _HEAD.unpack_from(block)
    return i, run
