#!/usr/bin/python3
"""Acknowledged-record writer for bench/soak.sh.

Writes record i (record.py: numbered, checksummed 4 KiB) to block i % SLOTS
of the export, then flushes, and logs `ack I UNIX_TIME` only once both the
write and the flush were acknowledged. Any error, or a request unanswered for
OP_TIMEOUT_S (a paused primary keeps its TCP socket open and never answers),
drops the connection: the record is logged `fail I` and never retried under
the same number (so a late write of it can only put that very record in its
slot), and the writer reconnects, as an application would, until stopped.

SIGTERM stops it between two records (a request in flight is answered or
times out first, so nothing it sent lands after it exited); it then prints
`next I`, the first index it did not use.

Usage: writer.py URI START RUN SLOTS
"""

import os
import signal
import sys
import time

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import RECORD_BYTES, record  # noqa: E402

OP_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 2.0
RETRY_PAUSE_S = 0.05


class Stop(Exception):
    pass


stopping = False


def on_term(_sig, _frame):
    global stopping
    stopping = True


def wait(h, done, timeout_s, stoppable=False):
    """Runs libnbd's state machine until done() or the timeout (TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if stoppable and stopping:
            raise Stop()
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer within %.1f s" % timeout_s)
        h.poll(int(min(left, 0.1) * 1000) + 1)


# ---------------------------------------------------------------------------
# The writer's one connection to the export. Everything about how the export
# is reached (URI, transport, TLS and client certificate) lives here and in
# the URI soak.sh passes (its NBD_URI): nbds:// to the VIP, with the client
# certificate directory in the URI (tls-certificates=).
# ---------------------------------------------------------------------------
def connect(uri):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)  # tls-certificates= in the URI
    h.aio_connect_uri(uri)
    wait(h, lambda: not h.aio_is_connecting(), CONNECT_TIMEOUT_S, stoppable=True)
    if not h.aio_is_ready():
        raise ConnectionError("handshake did not complete")
    return h


def complete(h, cookie):
    wait(h, lambda: h.aio_command_completed(cookie), OP_TIMEOUT_S)


def log(line):
    # One write(2) per line: a line is in the log whole or not at all.
    os.write(1, (line + "\n").encode())


def main():
    uri, start, run, slots = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    signal.signal(signal.SIGTERM, on_term)
    h = None
    i = start
    try:
        while not stopping:
            if h is None:
                try:
                    h = connect(uri)
                    log("connected %d %.3f" % (i, time.time()))
                except Stop:
                    break
                except Exception:
                    h = None
                    time.sleep(RETRY_PAUSE_S)
                    continue
            try:
                buf = record(i, run)
                complete(h, h.aio_pwrite(buf, (i % slots) * RECORD_BYTES))
                complete(h, h.aio_flush())
                log("ack %d %.3f" % (i, time.time()))
            except Exception as e:
                log("fail %d %.3f %s" % (i, time.time(), str(e).replace("\n", " ")[:200]))
                h = None  # closes the socket; a late answer goes nowhere
                time.sleep(RETRY_PAUSE_S)
            i += 1
    finally:
        log("next %d" % i)


if __name__ == "__main__":
    main()
