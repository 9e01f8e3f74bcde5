#!/usr/bin/env bash
# Benchmark: what an estimate observing a volume costs its writers. One agent
# on 127.0.0.1, a 1 GiB volume (filled), fio (nbd engine, Unix socket) 4k
# randwrite QD16 for --runtime s, alternating runs without and with an
# estimate observing the volume (`ferry estimate start --volume`, deleted
# after each run); median IOPS of --reps runs each, and their ratio.
# Usage: bench/estimate_overhead.sh [--reps 3] [--runtime 10]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

reps=3
runtime=10
while (($#)); do
  case "$1" in
    --reps) reps="$2"; shift 2 ;;
    --runtime) runtime="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
bench_ferry
work=$(mktemp -d /var/tmp/ferry-estov.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
export FERRY_LOG=warn
api=$(port); repl=$(port)
mkdir -p "$work/a"
cat >"$work/a.toml" <<EOT
node_name = "a"
data_dir = "$work/a"
api_listen = "127.0.0.1:$api"
replication_listen = "127.0.0.1:$repl"
EOT
"$ferry" agent --config "$work/a.toml" >"$work/a.out" 2>"$work/a.log" &
pids+=($!)
for _ in $(seq 100); do [[ -s "$work/a.out" ]] && break; sleep 0.05; done
on() { FERRY_API="127.0.0.1:$api" FERRY_DATA_DIR="$work/a" "$ferry" "$@"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
on volume create v --size 1GiB >/dev/null
uri="nbd+unix:///v?socket=$work/a/run/nbd.sock"
fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --size=1G --output=/dev/null
run() { # -> IOPS
  fio --name=b --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=16 --size=1G \
      --time_based --runtime="$runtime" --output-format=json >"$work/fio.json"
  python3 -c 'import json,sys; t=open(sys.argv[1]).read(); print(round(json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"]))' "$work/fio.json"
}
off=(); on_=()
for rep in $(seq "$reps"); do
  off+=("$(run)")
  on estimate start e --volume v --duration 1h >/dev/null
  on_+=("$(run)")
  on --json estimate status e >"$work/est.json"
  on estimate delete e >/dev/null 2>&1 || { on estimate stop e >/dev/null; on estimate delete e >/dev/null; }
  seen=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["write_ios"])' "$work/est.json")
  echo "rep $rep: without ${off[-1]} IOPS, with ${on_[-1]} IOPS (the estimate saw $seen writes)" >&2
done
m_off=$(printf '%s\n' "${off[@]}" | median)
m_on=$(printf '%s\n' "${on_[@]}" | median)
echo "fio nbd engine 4k randwrite QD16, 1 GiB volume (filled) on one agent, Unix socket, ${runtime}s per run, median of ${reps} alternating runs, $(nproc) cores, $(uname -r)"
echo "without an estimate: ${m_off} IOPS (runs: ${off[*]})"
echo "with an estimate observing the volume: ${m_on} IOPS (runs: ${on_[*]})"
python3 -c "print('ratio with/without: %.3f' % ($m_on / $m_off))"
