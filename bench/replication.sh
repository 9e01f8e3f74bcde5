#!/usr/bin/env bash
# Benchmark: block replication between two agents on 127.0.0.1, with the peers
# measured in the same run.
#   1. initial sync of a 1 GiB random image A → B vs nbdcopy (nbdkit file → nbdkit
#      file, over Unix sockets) and an rsync daemon whole-file copy; agent RSS
#      during the sync;
#   2. resync after 160 random 64 KiB-aligned writes (~1%) vs
#      rsync --inplace --no-whole-file -I; bytes sent vs bytes changed;
#   3. fio 4k randwrite QD16 over NBD (the agent's Unix socket) on fresh sparse volumes: unreplicated vs
#      sync vs async link (IOPS over the run, durable IOPS with --end_fsync=1,
#      CPU-seconds per GiB on A and B), and p99 latency at 50% of the
#      unreplicated peak (durable) IOPS; reps interleaved.
# Usage: bench/replication.sh [--parts 1,2,3] [--size 1G] [--runtime 10] [--reps 3]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
has() { [[ ",$parts," == *",$1,"* ]]; }

size_mib=1024
runtime=10
reps=3
parts=1,2,3
while (($#)); do
  case "$1" in
    --parts) parts="$2"; shift 2 ;;
    --size) size_mib=$(( $(numfmt --from=iec "$2") / 1048576 )); shift 2 ;;
    --runtime) runtime="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

scripts/install-deps
cargo build --release --quiet -p ferry
ferry="$PWD/target/release/ferry"
work=$(mktemp -d /var/tmp/ferry-rbench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
export FERRY_LOG=warn

now() { date +%s.%N; }
cpu_s() { awk '{print ($14+$15)/100}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

declare -A API NBD PID
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
  API[$n]="127.0.0.1:$api"; NBD[$n]="$work/$n/run/nbd.sock"  # the agent's NBD Unix socket
}
on() { local n=$1; shift; FERRY_API="${API[$n]}" FERRY_DATA_DIR="$work/$n" "$ferry" "$@"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "preparing a ${size_mib} MiB random image" >&2
head -c $((size_mib << 20)) /dev/urandom >"$work/random.img"

# ---------- 1. initial sync ----------
# The three copies take turns (ferry, nbdcopy, rsync, ferry, …): filling fresh
# page cache on this VM costs 0.3–1.9 s per GiB from one minute to the next,
# so drift must hit all three alike.
mkdir -p "$work/rsyncd/dst"
rport=$(port)
cat >"$work/rsyncd.conf" <<EOT
use chroot = no
uid = root
gid = root
[dst]
path = $work/rsyncd/dst
read only = no
EOT
rsync --daemon --no-detach --address=127.0.0.1 --port="$rport" --config="$work/rsyncd.conf" & rs=$!; pids+=($rs)
sleep 0.3
if has 1; then
sync_times=(); rss_peaks=(); nbdcopy_times=(); rsync_times=()
for rep in $(seq "$reps"); do
  for n in a b; do rm -rf "${work:?}/$n"; done
  FERRY_DATA_DIR="$work/a" "$ferry" volume create vol --size "${size_mib}MiB" >/dev/null
  cp "$work/random.img" "$work/a/volumes/vol/data.raw"
  sync
  start_agent a; start_agent b
  cp "$work/b/api.token" "$work/b.token"
  on a node add b --api "${API[b]}" --token-file "$work/b.token" --fingerprint "$(on b node id)" >/dev/null
  ( peak=0; while kill -0 "${PID[a]}" 2>/dev/null; do r=$(rss_kib "${PID[a]}" 2>/dev/null || echo 0); ((r > peak)) && peak=$r && echo "$peak" >"$work/rss.peak"; sleep 0.1; done ) &
  sampler=$!
  t0=$(now)
  on a replicate start vol --to b --mode sync >/dev/null
  on a replicate wait vol --timeout 600s >/dev/null
  t1=$(now)
  kill $sampler 2>/dev/null || true; wait $sampler 2>/dev/null || true
  peak=$(cat "$work/rss.peak")
  sync_times+=("$(echo "$t1 - $t0" | bc)"); rss_peaks+=("$peak")
  on a volume verify vol >/dev/null
  echo "rep $rep: ferry initial sync ${sync_times[-1]} s, A RSS peak $((peak / 1024)) MiB" >&2
  kill "${PID[a]}" "${PID[b]}"; wait "${PID[a]}" "${PID[b]}" 2>/dev/null || true; pids=("$rs")

  truncate -s 0 "$work/dst.img"; truncate -s "${size_mib}M" "$work/dst.img"; sync
  rm -f "$work/k1.sock" "$work/k2.sock"
  nbdkit --exit-with-parent -f -U "$work/k1.sock" file "$work/random.img" & k1=$!
  nbdkit --exit-with-parent -f -U "$work/k2.sock" file "$work/dst.img" & k2=$!
  sleep 0.3
  t0=$(now); nbdcopy --flush "nbd+unix:///?socket=$work/k1.sock" "nbd+unix:///?socket=$work/k2.sock"; t1=$(now)
  nbdcopy_times+=("$(echo "$t1 - $t0" | bc)")
  kill $k1 $k2; wait $k1 $k2 2>/dev/null || true

  rm -f "$work/rsyncd/dst/random.img"; sync
  t0=$(now); rsync --whole-file "$work/random.img" "rsync://127.0.0.1:$rport/dst/random.img"; t1=$(now)
  rsync_times+=("$(echo "$t1 - $t0" | bc)")
done
ferry_sync=$(printf '%s\n' "${sync_times[@]}" | median)
ferry_rss=$(( $(printf '%s\n' "${rss_peaks[@]}" | median) / 1024 ))
nbdcopy_sync=$(printf '%s\n' "${nbdcopy_times[@]}" | median)
rsync_sync=$(printf '%s\n' "${rsync_times[@]}" | median)
fi

# ---------- 2. resync after ~1% change ----------
if has 2 || has 3; then
for n in a b; do rm -rf "${work:?}/$n"; done
FERRY_DATA_DIR="$work/a" "$ferry" volume create vol --size "${size_mib}MiB" >/dev/null
cp "$work/random.img" "$work/a/volumes/vol/data.raw"
start_agent a; start_agent b
cp "$work/b/api.token" "$work/b.token"
on a node add b --api "${API[b]}" --token-file "$work/b.token" --fingerprint "$(on b node id)" >/dev/null
on a replicate start vol --to b >/dev/null
on a replicate wait vol --timeout 300s >/dev/null
fi
if has 2; then
resync_times=(); resync_bytes=()
blocks=$((size_mib * 16))
for rep in $(seq "$reps"); do
  on a replicate stop vol >/dev/null
  cmds=()
  for off in $(python3 -c "import random; r=random.Random($rep); print(' '.join(str(b*65536) for b in r.sample(range($blocks), 160)))"); do
    cmds+=(-c "write -P $((rep + 16)) $off 64k")
  done
  qemu-io -f raw "${cmds[@]}" "nbd+unix:///vol?socket=${NBD[a]}" >/dev/null
  before=$(on a --json replicate status vol | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_sent"])')
  t0=$(now)
  on a replicate start vol --to b >/dev/null
  on a replicate wait vol --timeout 300s >/dev/null
  t1=$(now)
  after=$(on a --json replicate status vol | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_sent"])')
  resync_times+=("$(echo "$t1 - $t0" | bc)"); resync_bytes+=("$((after - before))")
  echo "rep $rep: ferry resync $(echo "$t1 - $t0" | bc) s, $((after - before)) bytes" >&2
done
on a volume verify vol >/dev/null
ferry_resync=$(printf '%s\n' "${resync_times[@]}" | median)
ferry_resync_bytes=$(printf '%s\n' "${resync_bytes[@]}" | median)
changed=$((160 * 65536))

rsync_resync_times=()
for rep in $(seq "$reps"); do
  cp "$work/random.img" "$work/rsyncd/dst/random.img"
  cp "$work/random.img" "$work/changed.img"
  python3 - "$work/changed.img" "$rep" "$blocks" <<'PY'
import os, random, sys
path, rep, blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(rep)
with open(path, "r+b") as f:
    for b in r.sample(range(blocks), 160):
        f.seek(b * 65536); f.write(bytes([rep + 16]) * 65536)
PY
  sync
  t0=$(now); rsync --inplace --no-whole-file -I "$work/changed.img" "rsync://127.0.0.1:$rport/dst/random.img"; t1=$(now)
  rsync_resync_times+=("$(echo "$t1 - $t0" | bc)")
done
rsync_resync=$(printf '%s\n' "${rsync_resync_times[@]}" | median)
fi

if has 3; then
# ---------- 3. fio over NBD: unreplicated vs sync vs async ----------
# Every run gets a fresh sparse 1 GiB volume (the same kind of export for all
# three), and the reps are interleaved (plain, sync, async, plain, …) so that
# drift of this shared machine hits all three alike. Two figures per run:
#  - IOPS over the run (fio's default: data may still be in page caches);
#  - durable IOPS: the same with --end_fsync=1, whose final flush fio counts
#    in the run time. Without it the unreplicated run leaves all its writeback
#    to after the window, while the replica writes back inside it (link
#    flushes), so this is the like-for-like figure.
fio_run() { # uri [extra] -> "iops p99_us"
  fio --name=b --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=16 --size=1G \
      --time_based --runtime="$runtime" --ramp_time=1 --output-format=json ${2:-} >"$work/fio.json"
  python3 - "$work/fio.json" <<'PY'
import json, sys
t = open(sys.argv[1]).read(); j = json.loads(t[t.index("{"):])["jobs"][0]["write"]
print(f'{j["iops"]:.0f} {j["clat_ns"]["percentile"].get("99.000000", 0) / 1000:.0f}')
PY
}
fresh() { # target rep -> volume name, replicated as the target says
  local v="$1$2"
  on a volume create "$v" --size 1GiB >/dev/null
  case $1 in
    sync) on a replicate start "$v" --to b --mode sync >/dev/null ;;
    async) on a replicate start "$v" --to b --mode async >/dev/null ;;
  esac
  [[ $1 == plain ]] || on a replicate wait "$v" --timeout 60s >/dev/null
  echo "$v"
}
drop() { # target volume: delete it on A (and its replica on B)
  [[ $1 == plain ]] || on a replicate stop "$2" >/dev/null
  on a volume delete "$2" --yes >/dev/null
  [[ $1 == plain ]] || on b volume delete "$2" --yes >/dev/null
}
declare -A RUNS DURABLE CPUA CPUB P99S
n=0
for rep in $(seq "$reps"); do
  for target in plain sync async; do
    for variant in run durable; do
      n=$((n + 1)); v=$(fresh "$target" "$n")
      extra=""; [[ $variant == durable ]] && extra="--end_fsync=1"
      ca=$(cpu_s "${PID[a]}"); cb=$(cpu_s "${PID[b]}")
      read -r iops _ < <(fio_run "nbd+unix:///$v?socket=${NBD[a]}" "$extra")
      if [[ $variant == run ]]; then
        RUNS[$target]+="$iops "
        # CPU-seconds per GiB written, A and B.
        g=$(echo "scale=6; $iops * 4096 * $runtime / 1073741824" | bc)
        CPUA[$target]+="$(echo "scale=1; ($(cpu_s "${PID[a]}") - $ca) / $g" | bc) "
        CPUB[$target]+="$(echo "scale=1; ($(cpu_s "${PID[b]}") - $cb) / $g" | bc) "
      else
        DURABLE[$target]+="$iops "
      fi
      echo "rep $rep $target $variant: $iops IOPS" >&2
      drop "$target" "$v"
    done
  done
done
med() { printf '%s\n' $1 | median; }
half=$(( $(med "${DURABLE[plain]}") / 2 ))
for rep in $(seq "$reps"); do
  for target in plain sync async; do
    n=$((n + 1)); v=$(fresh "$target" "$n")
    # Steady state: 3 s at the same rate first (fio drops them from the
    # figures), so every activity-log extent of the fresh volume is hot.
    read -r _ p99 < <(fio_run "nbd+unix:///$v?socket=${NBD[a]}" "--rate_iops=$half --ramp_time=3")
    P99S[$target]+="$p99 "
    echo "rep $rep $target at $half IOPS: p99 $p99 us" >&2
    drop "$target" "$v"
  done
done
on a volume verify vol >/dev/null
declare -A IOPS DIOPS P99
for t in plain sync async; do
  IOPS[$t]=$(med "${RUNS[$t]}"); DIOPS[$t]=$(med "${DURABLE[$t]}"); P99[$t]=$(med "${P99S[$t]}")
done
fi

out="bench/out/replication-$(date -u +%Y%m%dT%H%M%SZ).md"
mkdir -p bench/out
{
  echo "2 agents on 127.0.0.1 (TLS 1.3), ${size_mib} MiB random image, median of $reps runs, $(nproc) cores, $(uname -r)"
  echo
  if has 1 || has 2; then
    echo "| test | ferry | peer | ratio | target |"
    echo "|---|---|---|---|---|"
  fi
  if has 1; then
    faster=$(printf '%s\n%s\n' "$nbdcopy_sync" "$rsync_sync" | sort -n | head -1)
    echo "| initial sync ${size_mib} MiB | ${ferry_sync} s | nbdcopy ${nbdcopy_sync} s, rsync daemon ${rsync_sync} s | $(echo "scale=2; $faster / $ferry_sync" | bc)× the faster | ≥ 1.0× |"
  fi
  if has 2; then
    echo "| resync 160 × 64 KiB | ${ferry_resync} s | rsync -I --inplace ${rsync_resync} s | $(echo "scale=1; $rsync_resync / $ferry_resync" | bc)× faster | ≥ 20× |"
    echo "| resync bytes sent | ${ferry_resync_bytes} B | changed ${changed} B | $(echo "scale=2; $ferry_resync_bytes / $changed" | bc)× changed | ≤ 1.2× |"
  fi
  if has 1; then
    echo "| agent A RSS peak during sync | ${ferry_rss} MiB | | | ≤ 64 MiB + backlog (64 MiB) |"
    echo
    echo "raw initial sync s: ferry ${sync_times[*]} / nbdcopy ${nbdcopy_times[*]} / rsync ${rsync_times[*]}"
  fi
  if has 3; then
    echo
    echo "| fio 4k randwrite QD16 | IOPS (run) | vs unreplicated | durable IOPS | vs unreplicated | p99 at ${half} IOPS | p99 ratio | CPU-s/GiB A | CPU-s/GiB B |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for t in plain sync async; do
      label=$([[ $t == plain ]] && echo unreplicated || echo "$t link")
      echo "| $label | ${IOPS[$t]} | $(echo "scale=2; ${IOPS[$t]} / ${IOPS[plain]}" | bc)× | ${DIOPS[$t]} | $(echo "scale=2; ${DIOPS[$t]} / ${DIOPS[plain]}" | bc)× | ${P99[$t]} µs | $(echo "scale=2; ${P99[$t]} / ${P99[plain]}" | bc)× | $(med "${CPUA[$t]}") | $(med "${CPUB[$t]}") |"
    done
    echo
    echo "raw IOPS (run): plain ${RUNS[plain]}/ sync ${RUNS[sync]}/ async ${RUNS[async]}"
    echo "raw durable IOPS: plain ${DURABLE[plain]}/ sync ${DURABLE[sync]}/ async ${DURABLE[async]}"
    echo "raw p99 µs: plain ${P99S[plain]}/ sync ${P99S[sync]}/ async ${P99S[async]}"
  fi
} | tee "$out"
