#!/usr/bin/env python3
"""Helpers of bench/livevm.sh (stdlib only).

  livevm.py floor --guest DIR --work DIR [--busy] [--memory-mib 256]
      [--downtime-limit-ms 300] [--max-bandwidth-mib N] [--warmup-s 5]
      [--timeout-s 300]
    One run of QEMU's own `migrate` with SHARED storage, both QEMUs on this
    host on one raw disk file: the source boots the live.sh guest with a QMP
    socket; the target waits with `-S -incoming defer`; auto-converge and a
    downtime-limit at the source, late-block-activate at the target; on the
    target's `completed` the target gets `cont` and the source `quit`.
    Prints one JSON line: the pause (source STOP event → target RESUME event,
    both QMP timestamps: host wall clock), the largest gap between TICK lines
    across both console files (stamped by this host's monotonic clock, files
    polled every ~1 ms), boot ids / pids / seq holes seen, and the source's
    query-migrate figures.

  livevm.py ticks CONSOLE... [--since-line N]
    The same TICK analysis of console files already written (the ferry rows
    run the watcher with `watch` around a cutover instead).

  livevm.py watch OUT.json CONSOLE...
    Tails the console files until SIGTERM/SIGINT, then writes the analysis
    to OUT.json: for the ferry rows (bench/livevm.sh runs it around
    `ferry migrate cutover`).

  livevm.py median FIELD < lines-of-json
"""
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time


# ---------------------------------------------------------------- TICK lines


def parse_tick(line):
    """(seq, uptime_s, boot_id, pid) of a `TICK` line, or None."""
    parts = line.strip().split()
    if len(parts) != 5 or parts[0] != "TICK":
        return None
    try:
        return int(parts[1]), float(parts[2]), parts[3], int(parts[4])
    except ValueError:
        return None


class ConsoleWatch:
    """Tails console files on a thread (every ~1 ms); every new TICK line is
    stamped with time.monotonic() when it is first seen."""

    def __init__(self, paths, poll_s=0.001, from_end=False):
        self.paths = list(paths)
        # from_end: lines already in the files are skipped (their stamps
        # would all be the same moment).
        self.start_at = [os.path.getsize(p) if from_end and os.path.exists(p) else 0
                         for p in self.paths]
        self.poll_s = poll_s
        self.ticks = []  # (host_monotonic_s, file_index, seq, uptime, boot, pid)
        self.lines = [[] for _ in self.paths]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        files = [None] * len(self.paths)
        partial = [b""] * len(self.paths)
        while True:
            stopping = self._stop.is_set()
            for i, p in enumerate(self.paths):
                if files[i] is None:
                    try:
                        files[i] = open(p, "rb")
                        files[i].seek(self.start_at[i])
                    except FileNotFoundError:
                        continue
                data = files[i].read()
                if not data:
                    continue
                now = time.monotonic()
                data = partial[i] + data
                *whole, partial[i] = data.split(b"\n")
                with self._lock:
                    for raw in whole:
                        line = raw.decode("utf-8", "replace").strip("\r")
                        self.lines[i].append(line)
                        t = parse_tick(line)
                        if t:
                            self.ticks.append((now, i) + t)
            if stopping:
                break
            time.sleep(self.poll_s)
        for f in files:
            if f:
                f.close()

    def count(self, index=None, tag=None):
        with self._lock:
            if tag is not None:
                return sum(1 for l in self.lines[index] if l.startswith(tag))
            return sum(1 for t in self.ticks if index is None or t[1] == index)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return analyse(self.ticks)


def analyse(ticks, since_s=None):
    """The figures of a list of stamped ticks (host time order)."""
    ticks = sorted(ticks, key=lambda t: t[0])
    out = {"ticks": len(ticks)}
    if len(ticks) < 2:
        return out
    gaps = [(b[0] - a[0], a, b) for a, b in zip(ticks, ticks[1:])]
    g, a, b = max(gaps, key=lambda x: x[0])
    out["max_gap_ms"] = round(g * 1000, 2)
    out["max_gap_between"] = [[a[1], a[2]], [b[1], b[2]]]  # [file, seq]
    steady = sorted(x[0] for x in gaps)
    out["median_period_ms"] = round(statistics.median(steady) * 1000, 3)
    span = ticks[-1][0] - ticks[0][0]
    out["mean_period_ms"] = round(span * 1000 / (len(ticks) - 1), 3)
    # The gap where the ticks move from one file to the next (source's
    # console → target's): the pause itself, without pre-copy hiccups.
    switch = [x[0] for x in gaps if x[1][1] != x[2][1]]
    if switch:
        out["switch_gap_ms"] = round(max(switch) * 1000, 2)
    out["boot_ids"] = sorted({t[4] for t in ticks})
    out["pids"] = sorted({t[5] for t in ticks})
    seqs = [t[2] for t in ticks]
    out["seq_holes"] = sum(1 for x, y in zip(seqs, seqs[1:]) if y != x + 1)
    out["first_seq"], out["last_seq"] = seqs[0], seqs[-1]
    return out


# ---------------------------------------------------------------- QMP


class QMP:
    def __init__(self, path, timeout_s=30):
        deadline = time.time() + timeout_s
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.02)
        self.file = self.sock.makefile("rb")
        self.events = []
        self.replies = []
        self.cond = threading.Condition()
        json.loads(self.file.readline())  # greeting
        threading.Thread(target=self._read, daemon=True).start()
        self.cmd("qmp_capabilities")

    def _read(self):
        try:
            for line in self.file:
                msg = json.loads(line)
                with self.cond:
                    if "event" in msg:
                        self.events.append(msg)
                    else:
                        self.replies.append(msg)
                    self.cond.notify_all()
        except (OSError, ValueError):
            pass  # QEMU quit or was killed
        with self.cond:
            self.replies.append({"error": {"desc": "QMP connection closed"}})
            self.cond.notify_all()

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        with self.cond:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
            while not self.replies:
                if not self.cond.wait(60):
                    raise TimeoutError(name)
            r = self.replies.pop(0)
        if "error" in r:
            raise RuntimeError("%s: %s" % (name, r["error"]))
        return r["return"]

    def wait_event(self, pred, timeout_s):
        deadline = time.time() + timeout_s
        with self.cond:
            while True:
                for e in self.events:
                    if pred(e):
                        return e
                left = deadline - time.time()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def event(self, name, status=None):
        for e in self.events:
            if e["event"] == name and (status is None or e.get("data", {}).get("status") == status):
                return e
        return None


def ts(e):
    return e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6


def qemu(args, console, pidfile):
    f = open(console, "ab")
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
    f.close()
    with open(pidfile, "a") as pf:
        pf.write("%d\n" % p.pid)
    return p


def floor(opts):
    work, guest = opts["work"], opts["guest"]
    os.makedirs(work, exist_ok=True)
    disk = os.path.join(work, "disk.raw")
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    append = "console=ttyS0 panic=-1 quiet" + (" ferry.busy=1" if opts["busy"] else "")
    base = [
        "qemu-system-x86_64", "-nographic", "-no-reboot", "-accel", "tcg",
        "-m", str(opts["memory_mib"]),
        "-kernel", os.path.join(guest, "vmlinuz"),
        "-initrd", os.path.join(guest, "initramfs.cpio.gz"),
        "-append", append,
        "-drive", "file=%s,format=raw,if=virtio,cache=none" % disk,
    ]
    con_s, con_t = os.path.join(work, "src.console"), os.path.join(work, "dst.console")
    qmp_s, qmp_t = os.path.join(work, "src.qmp"), os.path.join(work, "dst.qmp")
    mig = os.path.join(work, "mig.sock")
    pidfile = os.path.join(work, "qemu.pids")
    procs = []
    result = {"busy": opts["busy"], "memory_mib": opts["memory_mib"]}
    try:
        watch = ConsoleWatch([con_s, con_t])
        procs.append(qemu(base + ["-qmp", "unix:%s,server=on,wait=off" % qmp_s], con_s, pidfile))
        src = QMP(qmp_s)
        # Warm up: the guest writes records (and its busy writer runs).
        deadline = time.time() + 120
        while watch.count(0, "WROTE ") < 1 or (opts["busy"] and watch.count(0, "BUSY ") < 1):
            if time.time() > deadline:
                raise RuntimeError("the guest did not start")
            time.sleep(0.05)
        time.sleep(opts["warmup_s"])
        procs.append(qemu(base + ["-S", "-incoming", "defer",
                                  "-qmp", "unix:%s,server=on,wait=off" % qmp_t], con_t, pidfile))
        dst = QMP(qmp_t)
        dst.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "late-block-activate", "state": True},
            {"capability": "events", "state": True}])
        dst.cmd("migrate-incoming", uri="unix:" + mig)
        src.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "auto-converge", "state": True},
            {"capability": "events", "state": True}])
        params = {"downtime-limit": opts["downtime_limit_ms"]}
        if opts["max_bandwidth_mib"]:
            params["max-bandwidth"] = opts["max_bandwidth_mib"] << 20
        src.cmd("migrate-set-parameters", **params)
        p = src.cmd("query-migrate-parameters")
        result["max_bandwidth_mib"] = p["max-bandwidth"] / 1048576
        result["downtime_limit_ms"] = p["downtime-limit"]
        t0 = time.time()
        src.cmd("migrate", uri="unix:" + mig)
        done = dst.wait_event(
            lambda e: e["event"] == "MIGRATION" and e["data"]["status"] in ("completed", "failed"),
            opts["timeout_s"])
        if done is None or done["data"]["status"] != "completed":
            st = src.cmd("query-migrate")
            result["error"] = "no completion in %d s: %s" % (opts["timeout_s"], json.dumps(st))
            try:
                src.cmd("migrate_cancel")
            except Exception:
                pass
            return result
        dst.cmd("cont")
        resumed = dst.wait_event(lambda e: e["event"] == "RESUME", 30)
        src_done = src.wait_event(
            lambda e: e["event"] == "MIGRATION" and e["data"]["status"] == "completed", 30)
        st = src.cmd("query-migrate")
        try:
            src.cmd("quit")
        except RuntimeError:
            pass
        stopped = src.event("STOP")
        result["migrate_s"] = round(time.time() - t0, 2)
        result["pause_ms"] = round((ts(resumed) - ts(stopped)) * 1000, 2)
        result["stop_to_completed_ms"] = round((ts(done) - ts(stopped)) * 1000, 2)
        result["src_completed_to_dst_completed_ms"] = (
            round((ts(done) - ts(src_done)) * 1000, 2) if src_done else None)
        ram = st.get("ram", {})
        result["qemu"] = {
            "downtime_ms": st.get("downtime"),
            "total_time_ms": st.get("total-time"),
            "setup_time_ms": st.get("setup-time"),
            "transferred": ram.get("transferred"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
            "dirty_pages_rate": ram.get("dirty-pages-rate"),
            "cpu_throttle_percentage": st.get("cpu-throttle-percentage"),
            "mbps": ram.get("mbps"),
        }
        # Ticks after the resume: the guest runs on at the target.
        n = watch.count(1)
        deadline = time.time() + 30
        while watch.count(1) < n + 100 and time.time() < deadline:
            time.sleep(0.05)
        result["ticks"] = watch.stop()
        # Where the pause goes: the source's last tick before its STOP, the
        # target's first tick after its RESUME (host wall clock).
        wall = time.time() - time.monotonic()
        last_src = max((t[0] for t in watch.ticks if t[1] == 0), default=None)
        first_dst = min((t[0] for t in watch.ticks if t[1] == 1), default=None)
        if last_src is not None and first_dst is not None:
            result["last_src_tick_to_stop_ms"] = round((ts(stopped) - last_src - wall) * 1000, 2)
            result["resume_to_first_dst_tick_ms"] = round((first_dst + wall - ts(resumed)) * 1000, 2)
        text = "\n".join(watch.lines[0] + watch.lines[1])
        result["corrupt"] = "CORRUPT" in text or "WRITEFAIL" in text
        return result
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def main():
    a = sys.argv[1:]
    if not a:
        print(__doc__)
        return 2
    cmd, rest = a[0], a[1:]
    if cmd == "floor":
        opts = {"busy": False, "memory_mib": 256, "downtime_limit_ms": 300,
                "max_bandwidth_mib": 0, "warmup_s": 5, "timeout_s": 300}
        i = 0
        while i < len(rest):
            k = rest[i]
            if k == "--busy":
                opts["busy"] = True
                i += 1
                continue
            key = k.lstrip("-").replace("-", "_")
            v = rest[i + 1]
            opts[key] = v if key in ("guest", "work") else (float(v) if key == "warmup_s" else int(v))
            i += 2
        print(json.dumps(floor(opts)), flush=True)
    elif cmd == "ticks":
        ticks = []
        for i, p in enumerate(rest):
            for line in open(p, errors="replace"):
                t = parse_tick(line)
                if t:
                    ticks.append((t[1], i) + t)  # guest time: no pause shown
        print(json.dumps(analyse(ticks)))
    elif cmd == "watch":
        out, paths = rest[0], rest[1:]
        w = ConsoleWatch(paths, from_end=True)
        open(out + ".ready", "w").close()  # the caller waits for this
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        while not stop.is_set():
            stop.wait(0.1)
        res = w.stop()
        with open(out, "w") as f:
            json.dump(res, f)
    elif cmd == "median":
        field = rest[0].split(".")
        vals = []
        for line in sys.stdin:
            try:
                v = json.loads(line)
                for k in field:
                    v = v[k]
            except (ValueError, KeyError, TypeError):
                continue
            if v is not None:
                vals.append(v)
        print(statistics.median(vals) if vals else "")
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
