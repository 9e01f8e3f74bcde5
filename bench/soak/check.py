#!/usr/bin/python3
"""Checks and figures for bench/soak.sh.

  check.py settled SINCE ROUNDS < samples        primary name if the last ROUNDS
                                                 rounds (all after SINCE) agree:
                                                 one primary, the other its
                                                 up-to-date replica, link in sync
  check.py claims SINCE NODE < samples           exit 0 if NODE said it is the
                                                 primary in a round after SINCE
  check.py acked-after LOG T                     exit 0 if LOG has an ack after T
  check.py records IMAGE RUN SLOTS LOG...        every acknowledged record intact
                                                 in IMAGE (JSON; exit 1 if not)
  check.py cycle --samples F ... (see below)     one cycle's figures (JSON)
  check.py report CYCLES_JSONL                   the summary (markdown-ish text)
"""

import argparse
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import RECORD_BYTES, parse  # noqa: E402

NODES = ("a", "b")


def rows(lines):
    for line in lines:
        try:
            yield json.loads(line)
        except ValueError:
            continue  # the line being written


def claims(row, n):
    e = row.get(n)
    return bool(e) and e.get("role") == "primary" and e.get("primary") == n


def settled_row(row):
    """The primary if this round shows a settled cluster, else None."""
    for x, y in (("a", "b"), ("b", "a")):
        p, s = row.get(x), row.get(y)
        if not p or not s:
            return None
        if not claims(row, x):
            continue
        ok = (
            p.get("replica") == "up-to-date"
            and p.get("peer_alive")
            and not p.get("writes_held")
            and not p.get("split_brain")
            and p.get("vrole") == "primary"
            and p.get("link") == "connected"
            and p.get("vstate") == "up-to-date"
            and p.get("dirty_bytes") == 0
            and s.get("role") == "secondary"
            and s.get("primary") == x
            and s.get("replica") == "up-to-date"
            and s.get("peer_alive")
            and not s.get("candidate")
            and not s.get("split_brain")
        )
        return x if ok else None
    return None


def cmd_settled(a):
    since, need = float(a[0]), int(a[1])
    recent = [r for r in rows(sys.stdin) if r["t0"] >= since][-need:]
    if len(recent) < need:
        return 1
    who = {settled_row(r) for r in recent}
    if len(who) == 1 and None not in who:
        print(who.pop())
        return 0
    return 1


def cmd_claims(a):
    since, node = float(a[0]), a[1]
    for r in rows(sys.stdin):
        if r["t0"] >= since and claims(r, node):
            return 0
    return 1


def acks(path):
    out = []
    with open(path) as f:
        for line in f:
            p = line.split()
            if len(p) >= 3 and p[0] == "ack":
                out.append((int(p[1]), float(p[2])))
    return out


def cmd_acked_after(a):
    t = float(a[1])
    return 0 if any(ts > t for _, ts in acks(a[0])) else 1


def cmd_records(a):
    image, run, slots, logs = a[0], int(a[1]), int(a[2]), a[3:]
    last = {}  # slot -> newest acknowledged index
    used = -1  # highest index the writer may have written
    acked = 0
    for path in logs:
        with open(path) as f:
            for line in f:
                p = line.split()
                if len(p) < 2:
                    continue
                if p[0] == "ack":
                    i = int(p[1])
                    acked += 1
                    s = i % slots
                    if i > last.get(s, -1):
                        last[s] = i
                    used = max(used, i)
                elif p[0] in ("fail", "connected"):
                    used = max(used, int(p[1]))
                elif p[0] == "next":
                    used = max(used, int(p[1]) - 1)
    lost = []
    newer = 0
    fd = os.open(image, os.O_RDONLY)
    try:
        for s, i in sorted(last.items()):
            got = parse(os.pread(fd, RECORD_BYTES, s * RECORD_BYTES))
            # The slot holds the newest acknowledged record, or a newer one
            # the writer sent (it may have reached the disk unacknowledged).
            if got is None or got[1] != run or got[0] % slots != s or not i <= got[0] <= used:
                lost.append({"slot": s, "acked": i, "found": got})
            elif got[0] > i:
                newer += 1
    finally:
        os.close(fd)
    print(json.dumps({"acked_total": acked, "slots": len(last), "lost": len(lost),
                      "lost_examples": lost[:5], "newer_unacked": newer}))
    return 1 if lost else 0


def log_lines_since(path, offset):
    with open(path, errors="replace") as f:
        for n, line in enumerate(f):
            if n >= offset:
                yield line


def cmd_cycle(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples")
    ap.add_argument("--t-begin", type=float)
    ap.add_argument("--t-fault", type=float)
    ap.add_argument("--t-end", type=float)
    ap.add_argument("--primary", help="the serving node at the end")
    ap.add_argument("--log", help="that node's agent log")
    ap.add_argument("--log-offset", type=int, help="its line count at the fault")
    ap.add_argument("--events", nargs="+")
    ap.add_argument("--writer-log")
    ap.add_argument("--volume-bytes", type=int)
    ap.add_argument("--slots", type=int)
    ap.add_argument("--granularity", type=int, default=64 << 10)
    a = ap.parse_args(argv)
    x = a.primary

    rounds = dual = silent = 0
    dual_at = []
    resent = 0
    prev = None
    max_dirty = 0
    with open(a.samples) as f:
        for r in rows(f):
            if not a.t_begin <= r["t0"] < a.t_end:
                continue
            rounds += 1
            if all(claims(r, n) for n in NODES):
                dual += 1
                dual_at.append(r["t0"])
            if not any(r.get(n) for n in NODES):
                silent += 1
            e = r.get(x)
            if r["t0"] >= a.t_fault and e and e.get("vrole") == "primary" and e.get("copy_bytes_sent") is not None:
                c = e["copy_bytes_sent"]
                # A counter that went down belongs to a new link (restart,
                # promotion): count it from zero.
                if prev is not None:
                    resent += c - prev if c >= prev else c
                prev = c
                max_dirty = max(max_dirty, e.get("dirty_bytes") or 0)

    # The serving node's links that came up since the fault, with the bytes
    # they had to resync (its dirty map, plus an old primary's suspect
    # blocks) at that moment.
    resync_at_connect = 0
    suspect = 0
    for line in log_lines_since(a.log, a.log_offset):
        if "replication.link.up" in line:
            m = re.search(r"resync_bytes=(\d+)", line)
            resync_at_connect += int(m.group(1)) if m else 0
        if "replication.peer_suspect_blocks" in line:
            m = re.search(r"suspect_bytes=(\d+)", line)
            suspect += int(m.group(1)) if m else 0

    promoted = []
    for path in a.events:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for e in rows(f):
                if e.get("event") == "promoted" and a.t_begin <= e.get("at_unix_ms", 0) / 1000 < a.t_end:
                    promoted.append({k: e.get(k) for k in ("node", "detection_ms", "failover_ms", "at_unix_ms")})

    ack = acks(a.writer_log)
    gaps = [t2 - t1 for (_, t1), (_, t2) in zip(ack, ack[1:])]
    # What the writer changed from the fault on (acknowledged or not: a
    # failed write may have reached a disk), in dirty-map blocks: the
    # writer's own measure of what a resync has to move.
    fails = 0
    touched = set()
    with open(a.writer_log) as f:
        prev = None
        for line in f:
            p = line.split()
            if len(p) < 3 or p[0] not in ("ack", "fail"):
                continue
            fails += p[0] == "fail"
            i, t = int(p[1]), float(p[2])
            if t >= a.t_fault:
                if prev is not None and not touched:
                    touched.add((prev % a.slots) * RECORD_BYTES // a.granularity)  # in flight at the fault
                touched.add((i % a.slots) * RECORD_BYTES // a.granularity)
            prev = i
    changed = len(touched) * a.granularity

    # Only changed blocks move: what the copier sent is bounded by what was
    # dirty when the link came up (plus blocks written again while it ran).
    bound = int(resync_at_connect * 1.25) + (4 << 20)
    # And that map held what changed: the writer's blocks plus, after a
    # primary's crash or pause, the blocks it may have written alone (its
    # suspect map: dirty map and activity-log extents).
    bound_changed = int((changed + suspect) * 1.25) + (4 << 20)
    ok_resync = resent <= bound and resent <= bound_changed
    print(json.dumps({
        "rounds": rounds, "dual_primaries": dual, "dual_at": dual_at[:5], "silent_rounds": silent,
        "promoted": promoted,
        "resent_bytes": resent, "resync_bytes_at_connect": resync_at_connect,
        "suspect_bytes": suspect, "max_dirty_sampled": max_dirty, "resent_bound": min(bound, bound_changed),
        "changed_bytes": changed,
        "resync_ok": ok_resync,
        "acked": len(ack), "write_failures": fails,
        "write_gap_max_s": round(max(gaps), 3) if gaps else None,
    }))
    return 0


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def cmd_report(a):
    cs = list(rows(open(a[0])))
    kinds = {}
    for c in cs:
        kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
    fo = [p["failover_ms"] for c in cs for p in c["promoted"] if p.get("failover_ms") is not None]
    det = [p["detection_ms"] for c in cs for p in c["promoted"] if p.get("detection_ms") is not None]
    by_kind_gap = {}
    for c in cs:
        if c.get("write_gap_max_s") is not None:
            by_kind_gap.setdefault(c["kind"], []).append(c["write_gap_max_s"])
    failed = [c for c in cs if c["failures"]]
    resent = sum(c["resent_bytes"] for c in cs)
    at_connect = sum(c["resync_bytes_at_connect"] for c in cs)
    changed = sum(c["changed_bytes"] for c in cs)
    suspect = sum(c["suspect_bytes"] for c in cs)
    print("cycles: %d" % len(cs))
    print("faults by kind: %s" % ", ".join("%s %d" % kv for kv in sorted(kinds.items())))
    print("acknowledged records: %d written, %d lost" % (sum(c["acked"] for c in cs), sum(c["lost"] for c in cs)))
    print("dual primaries: %d (in %d sampled rounds)" % (sum(c["dual_primaries"] for c in cs), sum(c["rounds"] for c in cs)))
    if fo:
        print("failovers: %d; failover_ms median %d max %d; detection_ms median %d max %d"
              % (len(fo), statistics.median(fo), max(fo), statistics.median(det), max(det)))
    else:
        print("failovers: 0")
    print("promotions by fault: %s" % ", ".join(
        "%s %d" % (k, sum(len(c["promoted"]) for c in cs if c["kind"] == k)) for k in sorted(kinds)))
    print("longest pause between two acknowledged writes, median/max by fault: %s" % "; ".join(
        "%s %.2f/%.2f s" % (k, statistics.median(v), max(v)) for k, v in sorted(by_kind_gap.items())))
    print("resync (sum over cycles): copier sent %d B; dirty when the links came up %d B; the writer changed %d B"
          " (64 KiB blocks) + old primaries' suspect blocks %d B; volume %d B"
          % (resent, at_connect, changed, suspect, cs[0]["volume_bytes"] if cs else 0))
    worst = max(cs, key=lambda c: c["resent_bytes"], default=None)
    if worst:
        print("largest resync: cycle %d (%s): %d B sent, %d B changed + %d B suspect"
              % (worst["cycle"], worst["kind"], worst["resent_bytes"], worst["changed_bytes"], worst["suspect_bytes"]))
    settle = [c["settle_s"] for c in cs if c.get("settle_s") is not None]
    if settle:
        print("heal → settled: median %.1f s, max %.1f s" % (statistics.median(settle), max(settle)))
    print("failed cycles: %d%s" % (len(failed), "".join(
        "\n  cycle %d (%s): %s" % (c["cycle"], c["kind"], "; ".join(c["failures"])) for c in failed)))
    return 1 if failed else 0


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    return {
        "settled": cmd_settled,
        "claims": cmd_claims,
        "acked-after": cmd_acked_after,
        "records": cmd_records,
        "cycle": cmd_cycle,
        "report": cmd_report,
    }[cmd](args)


if __name__ == "__main__":
    sys.exit(main())
