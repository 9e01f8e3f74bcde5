#!/usr/bin/env python3
"""Writes seed inputs for the nbd_session fuzz target: a client's side of a few
realistic sessions (handshake, then requests), so the fuzzer starts deep."""
import os
import struct
import sys

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "seeds", "nbd_session")
os.makedirs(out, exist_ok=True)
IHAVEOPT = 0x49484156454F5054


def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def go(name, infos=()):
    return opt(7, struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos))


def meta(code, name, queries):
    d = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        d += struct.pack(">I", len(q)) + q
    return opt(code, d)


def req(kind, cookie, offset, length, flags=0, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, kind, cookie, offset, length) + payload


flags = struct.pack(">I", 3)
requests = (
    req(1, 1, 0, 512, 0, b"\xab" * 512)
    + req(1, 2, 4096, 8, 1, b"ferry!!!")
    + req(0, 3, 0, 4096)
    + req(3, 4, 0, 0)
    + req(4, 5, 8192, 4096)
    + req(6, 6, 12288, 4096, 2)
    + req(7, 7, 0, 65536)
    + req(7, 8, 0, 65536, 8)
    + req(5, 9, 0, 4096)
    + req(0, 10, 65535, 2)
    + req(2, 11, 0, 0)
)
seeds = {
    "go_structured": flags + opt(8) + meta(10, b"vol", [b"base:allocation"]) + go(b"vol", (1, 2, 3)) + requests,
    "go_simple": flags + opt(3) + go(b"vol") + requests,
    "export_name": flags + opt(1, b"vol") + requests,
    "read_only": flags + opt(8) + go(b"ro") + requests,
    "options": flags + opt(5) + opt(11) + meta(9, b"vol", [b"base:"]) + opt(6, b"\x00\x00\x00\x03vol\x00\x00") + opt(2),
}
for name, data in seeds.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
