#!/usr/bin/python3
"""Status sampler for bench/soak.sh: every INTERVAL_MS, asks both nodes at
once for `ferry --json cluster status` and `ferry --json replicate status
VOLUME` and appends one JSON line per round to OUT:

  {"t0": start, "t1": end (unix s), "a": {...} or null, "b": {...} or null}

A node's entry holds its view of the workload (role, primary, replica state,
peer_alive, candidate, writes_held, split_brain) and of the volume (vrole,
link, vstate, dirty_bytes, copy_bytes_sent, bytes_sent); null when it did not
answer within TIMEOUT_S (killed, paused, cut off). A round in which both
nodes say they are the primary is a dual primary.

Usage: sample.py OUT INTERVAL_MS FERRY WORKLOAD VOLUME NODE=API=TOKEN_FILE...
"""

import json
import os
import signal
import subprocess
import sys
import time

TIMEOUT_S = 1.5


def ferry(ferry_bin, api, token_file, args):
    """One CLI call against a node's API (the one place that says how)."""
    with open(token_file) as f:
        token = f.read().strip()
    # The data dir beside the token holds the node's certificate, which the
    # CLI pins (the API is HTTPS).
    env = dict(
        os.environ,
        FERRY_API=api,
        FERRY_TOKEN=token,
        FERRY_DATA_DIR=os.path.dirname(os.path.abspath(token_file)),
    )
    return subprocess.Popen(
        [ferry_bin, "--json"] + args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def collect(p, deadline):
    try:
        out, _ = p.communicate(timeout=max(0.01, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return None
    if p.returncode != 0:
        return None
    try:
        return json.loads(out)
    except ValueError:
        return None


def main():
    out, interval, ferry_bin, workload, volume = sys.argv[1:6]
    nodes = [a.split("=", 2) for a in sys.argv[6:]]
    interval = int(interval) / 1000.0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with open(out, "a") as f:
        while True:
            t0 = time.time()
            deadline = time.monotonic() + TIMEOUT_S
            procs = {
                name: (
                    ferry(ferry_bin, api, tok, ["cluster", "status"]),
                    ferry(ferry_bin, api, tok, ["replicate", "status", volume]),
                )
                for name, api, tok in nodes
            }
            row = {"t0": round(t0, 3)}
            for name, (pc, pr) in procs.items():
                c, r = collect(pc, deadline), collect(pr, deadline)
                w = None
                if c is not None:
                    w = next((x for x in c.get("workloads", []) if x.get("workload") == workload), None)
                if w is None:
                    row[name] = None
                    continue
                reps = w.get("replicas") or [{}]
                e = {
                    "role": w.get("role"),
                    "primary": w.get("primary"),
                    "replica": reps[0].get("state"),
                    "peer_alive": w.get("peer_alive"),
                    "candidate": w.get("candidate"),
                    "writes_held": w.get("writes_held"),
                    "split_brain": w.get("split_brain"),
                    "epoch": w.get("epoch"),
                }
                if r is not None:
                    e.update(
                        vrole=r.get("role"),
                        link=r.get("link"),
                        vstate=r.get("state"),
                        dirty_bytes=r.get("dirty_bytes"),
                        copy_bytes_sent=r.get("copy_bytes_sent"),
                        bytes_sent=r.get("bytes_sent"),
                    )
                row[name] = e
            row["t1"] = round(time.time(), 3)
            f.write(json.dumps(row) + "\n")
            f.flush()
            left = t0 + interval - time.time()
            if left > 0:
                time.sleep(left)


if __name__ == "__main__":
    main()
