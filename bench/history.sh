#!/usr/bin/env bash
# Benchmark: the cost of recording statistics history (issue 20).
#   Two agents a and b on 127.0.0.1, paired; on a, --workloads workloads
#   (default 100), each with one --size MiB volume replicated (sync) to b;
#   a writer (qemu-io, 4 KiB writes in a loop) on the first volume so that
#   rates, IOPS and latency series move.
#   1. CPU: the sampler thread (`ferry-history`, found by name in
#      /proc/PID/task/*/comm) — its utime + stime from
#      /proc/PID/task/TID/stat over --seconds (default 60), as % of one
#      core; the whole agent's too, for scale. Target: ≤ 1 % of one core.
#   2. Bytes: the series recorded, and per series the records written over
#      the run (24 bytes each, counted by reading the ring files: a record
#      is written when it is not all zeros), extrapolated to a day; the
#      allocated size of the history directory; the bound per series
#      (1,454,400 bytes) and what the rings' sizes say a day adds.
# Usage: bench/history.sh [--workloads 100] [--seconds 60] [--size 16]
# FERRY_BIN=PATH runs that binary instead of building this tree's.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

workloads=100
seconds=60
size=16
while (($#)); do
  case "$1" in
    --workloads) workloads="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --size) size="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

bench_ferry
work=$(mktemp -d /var/tmp/ferry-hbench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
export FERRY_LOG=warn

declare -A API PID
start_agent() { # name
  local n=$1 api repl
  api=$(port); repl=$(port)
  mkdir -p "$work/$n"
  cat >"$work/$n.toml" <<EOT
node_name = "$n"
data_dir = "$work/$n"
api_listen = "127.0.0.1:$api"
replication_listen = "127.0.0.1:$repl"
EOT
  "$ferry" agent --config "$work/$n.toml" >"$work/$n.out" 2>"$work/$n.log" &
  PID[$n]=$!; pids+=($!)
  for _ in $(seq 100); do [[ -s "$work/$n.out" ]] && break; sleep 0.05; done
  API[$n]="127.0.0.1:$api"
}
on() { local n=$1; shift; FERRY_API="${API[$n]}" FERRY_DATA_DIR="$work/$n" "$ferry" "$@"; }

start_agent a; start_agent b
cp "$work/b/api.token" "$work/b.token"
on a node add b --api "${API[b]}" --token-file "$work/b.token" --fingerprint "$(on b node id)" >/dev/null

echo "setting up $workloads workloads of one ${size} MiB volume each, replicated to b…" >&2
for i in $(seq "$workloads"); do
  on a volume create "v$i" --size "${size}MiB" >/dev/null
  on a workload create "w$i" --volume "v$i" >/dev/null
  on a replicate start "v$i" --to b >/dev/null
done
# Until every link is up to date (or 120 s).
for _ in $(seq 1200); do
  n=$(on a --json replicate status | python3 -c 'import json,sys; print(sum(1 for r in json.load(sys.stdin) if r.get("state")=="up-to-date"))')
  [[ $n -ge $workloads ]] && break
  sleep 0.1
done
echo "$n of $workloads replicas up to date" >&2
# Two sampler ticks: every series exists (and has its rate counters) before t0.
sleep 21

# A writer on v1 for the whole run.
sock="$work/a/run/nbd.sock"
( i=0; while :; do qemu-io -f raw -c "write -P $((i % 200 + 1)) $(( (i % 1024) * 4096 )) 4k" \
    "nbd+unix:///v1?socket=$sock" >/dev/null 2>&1 || true; i=$((i + 1)); done ) &
pids+=($!)

pid=${PID[a]}
tid=""
for t in /proc/"$pid"/task/*; do
  if [[ $(cat "$t/comm") == ferry-history ]]; then tid=${t##*/}; fi
done
[[ -n $tid ]] || { echo "no ferry-history thread in agent $pid" >&2; exit 1; }
ticks() { awk '{print $14 + $15}' "$1"; }
hz=$(getconf CLK_TCK)
# Records written so far, per series file (JSON {path: [tier0, tier1, tier2]}).
count_records() {
  python3 - "$work/a/history" <<'EOF'
import json, os, sys
root = sys.argv[1]
sizes = [8640 * 24, 43200 * 24, 8760 * 24]
out = {}
for dp, _, files in os.walk(root):
    for f in files:
        if not f.endswith(".ring"):
            continue
        with open(os.path.join(dp, f), "rb") as fh:
            data = fh.read()
        counts, off = [], 0
        for size in sizes:
            ring = data[off:off + size]
            counts.append(sum(1 for i in range(0, len(ring), 24) if ring[i:i + 24] != bytes(24)))
            off += size
        out[os.path.join(dp, f)] = counts
print(json.dumps(out))
EOF
}
c0=$(date +%s.%N); count_records >"$work/records0.json"
w0=$(awk '/^wchar/ {print $2}' /proc/"$pid"/task/"$tid"/io)
t0=$(ticks /proc/"$pid"/task/"$tid"/stat); p0=$(awk '{print $14 + $15}' /proc/"$pid"/stat)
if [[ -n ${FERRY_BENCH_PERF:-} ]]; then
  # Where the sampler's time goes: perf report -i $FERRY_BENCH_PERF
  perf record -q -g -t "$tid" -o "$FERRY_BENCH_PERF" -- sleep "$seconds" >/dev/null 2>&1
else
  sleep "$seconds"
fi
t1=$(ticks /proc/"$pid"/task/"$tid"/stat); p1=$(awk '{print $14 + $15}' /proc/"$pid"/stat)
w1=$(awk '/^wchar/ {print $2}' /proc/"$pid"/task/"$tid"/io)
c1=$(date +%s.%N); count_records >"$work/records1.json"

python3 - "$t0" "$t1" "$p0" "$p1" "$hz" "$seconds" "$w0" "$w1" "$c0" "$c1" "$work/records0.json" "$work/records1.json" "$(du -sb --apparent-size "$work/a/history" | cut -f1)" "$(du -sB1 "$work/a/history" | cut -f1)" "$workloads" <<'EOF'
import json, sys
t0, t1, p0, p1, hz, secs, w0, w1 = map(int, sys.argv[1:9])
c0, c1 = map(float, sys.argv[9:11])
r0, r1 = (json.load(open(p)) for p in sys.argv[11:13])
apparent, alloc, wl = map(int, sys.argv[13:])
sampler = (t1 - t0) / hz / secs * 100
agent = (p1 - p0) / hz / secs * 100
# Series that existed for the whole run: records they gained, per tier.
both = [k for k in r1 if k in r0]
gained = [sum(r1[k][t] - r0[k][t] for k in both) for t in range(3)]
per_series = [g / max(len(both), 1) for g in gained]
# Each file is read at the same offset into both counts: the window is
# the time between their starts.
window = c1 - c0
per_day = sum(per_series) * 24 * 86400 / window
written_per_day = (w1 - w0) / max(len(r1), 1) * 86400 / secs
print(f"workloads: {wl}; series recorded: {len(r1)} ({len(both)} for the whole run)")
print(f"sampler thread CPU: {sampler:.3f} % of one core over {secs} s ({t1 - t0} ticks at {hz} Hz); whole agent: {agent:.2f} %")
print(f"written by the sampler thread (wchar): {w1 - w0:,} bytes in {secs} s = {written_per_day:,.0f} per series per day (each sample rewrites the open points of the three tiers: 3 × 24 B)")
print(f"records gained per series in {window:.1f} s: 10 s tier {per_series[0]:.2f}, 1 min {per_series[1]:.2f}, 1 h {per_series[2]:.2f}")
print(f"bytes per series per day (first day, rings filling): {per_day:,.0f} (from the rings' sizes: 242,496; 0 once full)")
print(f"history dir: {alloc:,} bytes allocated, {apparent:,} apparent ({len(r1)} × 1,454,400 bound)")
EOF
