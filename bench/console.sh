#!/usr/bin/env bash
# Benchmark: the web console with 100 workloads on a node pair (issue 20).
#   Two agents a and b on 127.0.0.1 under HA with a witness, paired; on a,
#   --workloads workloads (default 100), each with one --size MiB volume:
#   half of them under HA (replicated sync to b, `cluster add`), half
#   migrating to b (`migrate start`, left at ready). Then headless Chromium
#   (Debian's, through Playwright's Python client) logs in to a's console
#   as an admin (bench/console_bench.py):
#   1. Server time: every answer carries `Server-Timing: app;dur=MS` (the
#      agent's time from request to answer, authentication included); the
#      page's Resource Timing entries give it per request. The first load
#      (the page, its scripts and style, the login and the first data) and
#      each view (its requests when it is opened) are measured --rounds
#      times (default 5): the median of the largest single request and of
#      the sum over the view's requests, and the wall time until the view
#      is drawn. Target: ≤ 200 ms server time.
#   2. SSE to screen: a switchover of one HA workload is made with the CLI
#      (alternately from a and back from a, which forwards it to b); the
#      time from the CLI's return to the Cluster view showing the new
#      serving node, without reload (the event stream sends snapshots at
#      most once per second). --rounds times; median and max. Target: ≤ 1 s.
# Usage: bench/console.sh [--workloads 100] [--size 4] [--rounds 5]
# FERRY_BIN=PATH runs that binary instead of building this tree's.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

workloads=100
size=4
rounds=5
while (($#)); do
  case "$1" in
    --workloads) workloads="$2"; shift 2 ;;
    --size) size="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
python=/opt/ferry-venv/bin/python
[[ -x $python && -x /usr/bin/chromium ]] || { echo "needs scripts/install-deps (chromium, the Playwright venv)" >&2; exit 1; }

bench_ferry
work=$(mktemp -d /var/tmp/ferry-cbench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
export FERRY_LOG=warn

(umask 077; head -c 32 /dev/urandom | base64 >"$work/witness.key")
wport=$(udp_port)
mkdir -p "$work/w"
FERRY_DATA_DIR="$work/w" "$ferry" witness --listen "127.0.0.1:$wport" --key-file "$work/witness.key" \
  >"$work/w.out" 2>"$work/w.log" &
pids+=($!)

declare -A API PID
start_agent() { # name peer
  local n=$1 peer=$2 api repl hb
  api=$(port); repl=$(port); hb=$(udp_port)
  mkdir -p "$work/$n"
  cat >"$work/$n.toml" <<EOT
node_name = "$n"
data_dir = "$work/$n"
api_listen = "127.0.0.1:$api"
replication_listen = "127.0.0.1:$repl"

[migration]
migrations_max = $workloads

[cluster]
peer = "$peer"
heartbeat = ["127.0.0.1:$hb"]
witness = "127.0.0.1:$wport"
witness_key_file = "$work/witness.key"
EOT
  "$ferry" agent --config "$work/$n.toml" >"$work/$n.out" 2>"$work/$n.log" &
  PID[$n]=$!; pids+=($!)
  for _ in $(seq 200); do [[ -s "$work/$n.out" ]] && break; sleep 0.05; done
  [[ -s "$work/$n.out" ]] || { echo "agent $n did not start:" >&2; cat "$work/$n.log" >&2; exit 1; }
  API[$n]="127.0.0.1:$api"
}
on() { local n=$1; shift; FERRY_API="${API[$n]}" FERRY_DATA_DIR="$work/$n" "$ferry" "$@"; }

start_agent a b; start_agent b a
cp "$work/b/api.token" "$work/b.token"
on a node add b --api "${API[b]}" --token-file "$work/b.token" --fingerprint "$(on b node id)" >/dev/null

ha=$((workloads / 2))
echo "setting up $workloads workloads (one ${size} MiB volume each): $ha under HA, $((workloads - ha)) migrating to b…" >&2
for i in $(seq "$workloads"); do
  on a volume create "v$i" --size "${size}MiB" >/dev/null
  on a workload create "w$i" --volume "v$i" >/dev/null
  if ((i <= ha)); then
    on a replicate start "v$i" --to b --mode sync >/dev/null
  else
    on a migrate start "w$i" --to b >/dev/null
  fi
done
for i in $(seq "$ha"); do
  on a replicate wait "v$i" --timeout 120s >/dev/null
  on a cluster add "w$i" --preferred a >/dev/null
done
# Until every HA workload is served with its replica up to date and every
# migration is ready (or 180 s).
for _ in $(seq 360); do
  served=$(on a --json cluster status | python3 -c 'import json,sys; print(sum(1 for w in json.load(sys.stdin)["workloads"] if w["primary"]=="a" and w["replicas"] and w["replicas"][0]["state"]=="up-to-date"))')
  ready=$(on a --json migrate status | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d if isinstance(d,list) else d.get("migrations",[]); print(sum(1 for m in d if m.get("phase")=="ready"))')
  [[ $served -ge $ha && $ready -ge $((workloads - ha)) ]] && break
  sleep 0.5
done
echo "$served of $ha HA workloads served by a with b up to date; $ready of $((workloads - ha)) migrations ready" >&2

admin=$(on a token create bench --role admin | head -1)
env FERRY_BIN="$ferry" FERRY_DATA_DIR="$work/a" FERRY_API="${API[a]}" FERRY_LOG=warn \
  "$python" bench/console_bench.py --base "https://${API[a]}" --token "$admin" \
  --workload w1 --here a --peer b --rounds "$rounds" --workloads "$workloads"
