# Run by nbdsh (tests/clients.rs): hostile and out-of-range requests against a
# ferry export, checking the error codes the NBD spec names.
import errno
import os
import socket
import struct

import nbd

uri = os.environ["FERRY_URI"]
ro_uri = os.environ["FERRY_RO_URI"]
# unix:PATH (the default export) or HOST:PORT.
addr = os.environ["FERRY_ADDR"]


def expect_errno(code, fn, *args):
    try:
        fn(*args)
    except nbd.Error as e:
        # libnbd gives the symbolic name (e.g. "EINVAL"); older versions the number.
        got = e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), e.errno)
        assert got == code, f"{fn.__name__}{args}: got errno {e.errno}, want {errno.errorcode[code]}"
        return
    raise AssertionError(f"{fn.__name__} unexpectedly succeeded")


h = nbd.NBD()
h.set_strict_mode(0)  # let bad requests reach the server instead of libnbd refusing them
# STARTTLS is an option ferry does not implement: it must answer ERR_UNSUP and carry on.
h.set_tls(nbd.TLS_ALLOW)
h.connect_uri(uri)
assert not h.get_tls_negotiated()
size = h.get_size()
assert size == 4 << 20

expect_errno(errno.EINVAL, h.pread, 512, size)                    # read past the end
expect_errno(errno.EINVAL, h.pread, 4096, size - 512)             # read straddling the end
expect_errno(errno.EINVAL, h.pread, 512, (1 << 64) - 256)         # offset + length overflows
expect_errno(errno.ENOSPC, h.pwrite, b"x" * 512, size - 256)      # write past the end
expect_errno(errno.ENOSPC, h.zero, 8192, size - 4096)
expect_errno(errno.ENOSPC, h.trim, 8192, (1 << 64) - 4096)
expect_errno(errno.EOVERFLOW, h.pread, (32 << 20) + 4096, 0)      # above max_request_bytes
expect_errno(errno.EINVAL, h.pread, 512, 0, nbd.CMD_FLAG_FUA)     # flag not valid for READ
# The connection survives all of that.
h.pwrite(b"ferry" * 100, 4096)
assert h.pread(500, 4096) == b"ferry" * 100
h.flush()
h.shutdown()

# Read-only export: writes are EPERM, reads work.
r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri(ro_uri)
assert r.is_read_only()
expect_errno(errno.EPERM, r.pwrite, b"x" * 512, 0)
expect_errno(errno.EPERM, r.trim, 512, 0)
expect_errno(errno.EPERM, r.zero, 512, 0)
assert r.pread(512, 0) == bytes(512)
r.shutdown()

# Option mode: an unknown export is an error reply, not a hang-up.
o = nbd.NBD()
o.set_opt_mode(True)
o.connect_uri(uri)
o.set_export_name("nope")
try:
    o.opt_info()
    raise AssertionError("opt_info on an unknown export succeeded")
except nbd.Error:
    pass
o.set_export_name("vol")
contexts = []
assert o.opt_list_meta_context(lambda name: contexts.append(name)) == 1
assert contexts == ["base:allocation"], contexts
o.opt_go()
assert o.get_size() == size
o.shutdown()

# A raw client sending an option number nobody defines gets NBD_REP_ERR_UNSUP,
# and can then abort cleanly.
if addr.startswith("unix:"):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(addr[len("unix:"):])
else:
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
s.settimeout(10)


def recv_exact(n):
    b = b""
    while len(b) < n:
        chunk = s.recv(n - len(b))
        assert chunk, "server closed the connection"
        b += chunk
    return b


magic, ihaveopt, hflags = struct.unpack(">QQH", recv_exact(18))
assert magic == 0x4E42444D41474943 and ihaveopt == 0x49484156454F5054
s.sendall(struct.pack(">I", 3))
s.sendall(struct.pack(">QII", ihaveopt, 0x4242, 3) + b"abc")
rmagic, ropt, rtype, rlen = struct.unpack(">QIII", recv_exact(20))
recv_exact(rlen)
assert rmagic == 0x3E889045565A9 and ropt == 0x4242, (hex(rmagic), ropt)
assert rtype == (1 << 31) | 1, f"want NBD_REP_ERR_UNSUP, got {rtype:#x}"
s.sendall(struct.pack(">QII", ihaveopt, 2, 0))  # NBD_OPT_ABORT
rmagic, ropt, rtype, rlen = struct.unpack(">QIII", recv_exact(20))
assert ropt == 2 and rtype == 1
s.close()

print("nbdsh checks passed")
