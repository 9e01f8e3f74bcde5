#!/usr/bin/env bash
# Benchmark: live migration between two agents on 127.0.0.1.
#   1. cutover downtime (freeze → target serving) of a 1 GiB volume of random
#      data under a steady 20 MiB/s random-write load (fio, 4 KiB writes over
#      NBD; the workload's stop hook stops it, as an application would be),
#      median of --reps;
#   2. total migration time (start → ready → cutover done) against volume
#      size (256 MiB, 1 GiB, 4 GiB of random data), no load;
#   3. cutover downtime of a workload with a share (async, used in place) of
#      --share-files × 4 KiB files + 4 × 256 MiB, moved there and back
#      --share-reps times each way, with the share digest cache on and off
#      (off: both trees are read whole inside the downtime).
#   4. what the replica's early writeback (replication.replica_writeback_bytes,
#      issue 18) costs the workload: fio 4k randwrite QD16 for --runtime s on
#      a 1 GiB volume whose migration is ready, sync link, one replica agent
#      with the default and one with it off (0), runs interleaved; IOPS over
#      the run and durable IOPS (--end_fsync=1), median of --reps.
# Part 1 waits --steady s at ready under the load before it cuts over (how
# much the replica holds unflushed depends on it).
# Usage: bench/migration.sh [--parts 1,2,3,4] [--reps 5] [--steady 3] [--sizes "256M 1G 4G"]
#                           [--share-files 20000] [--share-reps 2] [--runtime 10]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

reps=5
sizes="256M 1G 4G"
share_files=20000
share_reps=2
parts=1,2,3
steady=3
runtime=10
while (($#)); do
  case "$1" in
    --steady) steady="$2"; shift 2 ;;
    --runtime) runtime="$2"; shift 2 ;;
    --parts) parts="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --sizes) sizes="$2"; shift 2 ;;
    --share-files) share_files="$2"; shift 2 ;;
    --share-reps) share_reps="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

has() { [[ ",$parts," == *",$1,"* ]]; }
scripts/install-deps
cargo build --release --quiet -p ferry
ferry="$PWD/target/release/ferry"
work=$(mktemp -d /var/tmp/ferry-mbench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
export FERRY_LOG=warn

now() { date +%s.%N; }
declare -A API NBD PID
start_agent() { # name [extra config]
  local n=$1 api repl
  api=$(port); repl=$(port)
  mkdir -p "$work/$n"
  cat >"$work/$n.toml" <<EOT
node_name = "$n"
data_dir = "$work/$n"
api_listen = "127.0.0.1:$api"
replication_listen = "127.0.0.1:$repl"
${2:-}
EOT
  "$ferry" agent --config "$work/$n.toml" >"$work/$n.out" 2>"$work/$n.log" &
  PID[$n]=$!; pids+=($!)
  for _ in $(seq 100); do [[ -s "$work/$n.out" ]] && break; sleep 0.05; done
  API[$n]="127.0.0.1:$api"; NBD[$n]="$work/$n/run/nbd.sock"  # the agent's NBD Unix socket
}
on() { local n=$1; shift; FERRY_API="${API[$n]}" FERRY_DATA_DIR="$work/$n" "$ferry" "$@"; }
wait_phase_on() { # node workload phase timeout_s
  local t0; t0=$(now)
  until [[ $(on "$1" --json migrate status "$2" | jget '["phase"]') == "$3" ]]; do
    if (( $(echo "$(now) - $t0 > $4" | bc) )); then echo "timeout waiting for $2 $3 on $1" >&2; return 1; fi
    sleep 0.1
  done
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
jget() { python3 -c "import json,sys; v=json.load(sys.stdin)$1; print(v if v is not None else '')"; }
wait_phase() { # workload phase timeout_s
  local t0; t0=$(now)
  until [[ $(on a --json migrate status "$1" | jget '["phase"]') == "$2" ]]; do
    if (( $(echo "$(now) - $t0 > $3" | bc) )); then echo "timeout waiting for $1 $2" >&2; return 1; fi
    sleep 0.1
  done
}
fill() { # volume size_mib: random data through A's export
  head -c $(($2 << 20)) /dev/urandom >"$work/fill.img"
  nbdcopy --flush "$work/fill.img" "nbd+unix:///$1?socket=${NBD[a]}"
  rm -f "$work/fill.img"
}

start_agent a; start_agent b
cp "$work/b/api.token" "$work/b.token"
on a node add b --api "${API[b]}" --token-file "$work/b.token" --fingerprint "$(on b node id)" >/dev/null

# ---------- 1. downtime under load ----------
downtimes=(); outages=()
reps1=$reps; has 1 || reps1=0
for rep in $(seq "$reps1"); do
  v="load$rep"
  on a volume create "$v" --size 1GiB >/dev/null
  fill "$v" 1024
  fio --name=load --ioengine=nbd --uri="nbd+unix:///$v?socket=${NBD[a]}" --rw=randwrite --bs=4k \
      --rate=20m --iodepth=4 --size=1G --time_based --runtime=600 --output=/dev/null &
  fio_pid=$!; pids+=($fio_pid)
  on a workload create "w$rep" --volume "$v" \
     --stop "kill $fio_pid; while kill -0 $fio_pid 2>/dev/null; do sleep 0.005; done" >/dev/null
  on a migrate start "w$rep" --to b >/dev/null
  wait_phase "w$rep" ready 120
  sleep "$steady"  # steady state under the load
  r=$(on a --json migrate cutover "w$rep")
  wait "$fio_pid" 2>/dev/null || true
  d=$(echo "$r" | jget '["downtime_ms"]'); o=$(echo "$r" | jget '["outage_ms"]')
  downtimes+=("$d"); outages+=("$o")
  echo "rep $rep: downtime $d ms, outage $o ms; steps $(echo "$r" | jget '["steps_us"]')" >&2
done
down_med=$(printf '%s\n' "${downtimes[@]}" | median)
out_med=$(printf '%s\n' "${outages[@]}" | median)

# ---------- 2. total migration time vs size ----------
declare -a curve
has 2 || sizes=""
for s in $sizes; do
  mib=$(( $(numfmt --from=iec "$s") / 1048576 ))
  v="size$mib"
  on a volume create "$v" --size "${mib}MiB" >/dev/null
  fill "$v" "$mib"
  on a workload create "ws$mib" --volume "$v" >/dev/null
  t0=$(now)
  on a migrate start "ws$mib" --to b >/dev/null
  wait_phase "ws$mib" ready 1200
  t1=$(now)
  r=$(on a --json migrate cutover "ws$mib")
  t2=$(now)
  curve+=("| $s | $(echo "$t1 - $t0" | bc) s | $(echo "$r" | jget '["downtime_ms"]') ms | $(echo "$t2 - $t0" | bc) s | $(echo "scale=0; $mib / ($t1 - $t0)" | bc) MiB/s |")
  echo "size $s: ${curve[-1]}" >&2
done

# ---------- 3. a workload with a share: cutover downtime, digest cache on/off ----------
declare -A SHARE_DOWN SHARE_RAW
if has 3; then
echo "preparing a tree of $share_files x 4 KiB + 4 x 256 MiB" >&2
python3 - "$work/tree0" "$share_files" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, "d%03d" % (i // 1000))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%06d" % i), "wb") as f:
        f.write(os.urandom(4096))
for i in range(4):
    with open(os.path.join(root, "big%d" % i), "wb") as f:
        for _ in range(256):
            f.write(os.urandom(1 << 20))
EOF
for mode in on off; do
  c="c$mode"; d="d$mode"
  extra=""
  [[ $mode == off ]] && extra=$'[shares]\ndigest_cache_files_max = 0'
  start_agent "$c" "$extra"; start_agent "$d" "$extra"
  cp "$work/$d/api.token" "$work/$d.token"
  on "$c" node add "$d" --api "${API[$d]}" --token-file "$work/$d.token" --fingerprint "$(on "$d" node id)" >/dev/null
  cp -a "$work/tree0" "$work/tree-$mode"
  # A live workload's bulk is older than the settling time of an async
  # share's digest cache (35 s: files changed more recently are re-read).
  sleep 40
  on "$c" share create "t$mode" --path "$work/tree-$mode" --mode async >/dev/null
  on "$c" workload create "sw$mode" --share "t$mode" >/dev/null
  on "$c" migrate start "sw$mode" --to "$d" >/dev/null
  wait_phase_on "$c" "sw$mode" ready 600
  downs=()
  for rep in $(seq "$share_reps"); do
    r=$(on "$c" --json migrate cutover "sw$mode")
    downs+=("$(echo "$r" | jget '["downtime_ms"]')")
    echo "share cutover ($mode) $c -> $d: $(echo "$r" | jget '["downtime_ms"]') ms; steps $(echo "$r" | jget '["steps_us"]')" >&2
    wait_phase_on "$d" "sw$mode" ready 600
    r=$(on "$c" --json migrate rollback "sw$mode")
    downs+=("$(echo "$r" | jget '["downtime_ms"]')")
    echo "share cutover ($mode) $d -> $c: $(echo "$r" | jget '["downtime_ms"]') ms" >&2
    # The next forward cutover needs the migration ready again.
    on "$c" migrate start "sw$mode" --to "$d" >/dev/null 2>&1 || true
    wait_phase_on "$c" "sw$mode" ready 600
  done
  SHARE_DOWN[$mode]=$(printf '%s\n' "${downs[@]}" | median)
  SHARE_RAW[$mode]="${downs[*]}"
done
fi

# ---------- 4. the replica's early writeback: what it costs the workload ----------
declare -A WB_RUN WB_DUR
if has 4; then
  start_agent c "$(printf '[replication]\nreplica_writeback_bytes = 0')"
  cp "$work/c/api.token" "$work/c.token"
  on a node add c --api "${API[c]}" --token-file "$work/c.token" --fingerprint "$(on c node id)" >/dev/null
  fio_iops() { # volume [extra] -> IOPS over the run
    fio --name=b --ioengine=nbd --uri="nbd+unix:///$1?socket=${NBD[a]}" --rw=randwrite --bs=4k \
        --iodepth=16 --size=1G --time_based --runtime="$runtime" --ramp_time=1 \
        --output-format=json ${2:-} >"$work/fio.json"
    python3 -c 'import json,sys; t=open(sys.argv[1]).read(); print("%.0f" % json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"])' "$work/fio.json"
  }
  for r in b c; do
    on a volume create "wb$r" --size 1GiB >/dev/null
    on a workload create "wwb$r" --volume "wb$r" >/dev/null
    on a migrate start "wwb$r" --to "$r" >/dev/null
    wait_phase "wwb$r" ready 120
    fio_iops "wb$r" >/dev/null  # allocate the volume on both sides first
  done
  for rep in $(seq "$reps"); do
    for r in b c; do
      i=$(fio_iops "wb$r"); WB_RUN[$r]+="$i "
      d=$(fio_iops "wb$r" --end_fsync=1); WB_DUR[$r]+="$d "
      echo "writeback rep $rep, replica $r ($([[ $r == b ]] && echo default || echo off)): $i IOPS, durable $d IOPS" >&2
    done
  done
fi

out="bench/out/migration-$(date -u +%Y%m%dT%H%M%SZ).md"
mkdir -p bench/out
{
  echo "2 agents on 127.0.0.1 (TLS 1.3, sync link), $(nproc) cores, $(uname -r)"
  echo
  if has 1; then
    echo "| cutover of 1 GiB under 20 MiB/s random writes, ${steady} s at ready first | median of $reps | target |"
    echo "|---|---|---|"
    echo "| downtime (freeze → target serving) | $down_med ms | ≤ 50 ms, no rep > 100 ms |"
    echo "| app-visible outage (stop hook → target started) | $out_med ms | |"
    echo
    echo "raw downtimes ms: ${downtimes[*]}"
    echo "raw outages ms: ${outages[*]}"
    echo
  fi
  if has 2; then
    echo "| volume (random data) | start → ready | cutover downtime | start → completed | copy rate |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${curve[@]}"
    echo
  fi
  if has 4; then
    m() { printf '%s\n' $1 | median; }
    echo "| fio 4k randwrite QD16, sync link, migration ready (median of $reps) | IOPS (run) | durable IOPS |"
    echo "|---|---|---|"
    echo "| replica writeback early (default) | $(m "${WB_RUN[b]}") | $(m "${WB_DUR[b]}") |"
    echo "| replica writeback off (replica_writeback_bytes = 0) | $(m "${WB_RUN[c]}") | $(m "${WB_DUR[c]}") |"
    echo "| ratio default / off | $(echo "scale=3; $(m "${WB_RUN[b]}") / $(m "${WB_RUN[c]}")" | bc) | $(echo "scale=3; $(m "${WB_DUR[b]}") / $(m "${WB_DUR[c]}")" | bc) |"
    echo
    echo "raw IOPS default: ${WB_RUN[b]}/ durable ${WB_DUR[b]}; off: ${WB_RUN[c]}/ durable ${WB_DUR[c]}"
    echo
  fi
  has 3 || exit 0
  echo "| workload with an async share ($share_files x 4 KiB + 4 x 256 MiB), cutover there and back | median downtime | raw ms |"
  echo "|---|---|---|"
  echo "| digest cache on (default) | ${SHARE_DOWN[on]} ms | ${SHARE_RAW[on]} |"
  echo "| digest cache off (both trees read whole in the downtime) | ${SHARE_DOWN[off]} ms | ${SHARE_RAW[off]} |"
} | tee "$out"
