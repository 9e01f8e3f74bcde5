#!/usr/bin/env bash
# Benchmark: offline (sneaker-net) seeding against sending everything over a
# link capped at --rate (default 50 MiB/s), two agents on 127.0.0.1.
#   Seeded:  a 1 GiB volume of random data archived live at a barrier
#            (archive create volume/v), --changed-pct of it (default 2%)
#            written afterwards in 1 MiB pieces, the archive restored at B as
#            the replica (--replica-of a; the store stands for the disk carried
#            by hand: same machine here), then `migrate start --seed` at the
#            capped rate until ready.
#   Full:    the same volume migrated with nothing at B, at the same cap.
# Reports, per --reps (median): bytes sent by the seeded sync and the ratio to
# the bytes changed; the seeded times (archive, restore, sync to ready, and
# their sum — shipping the disk itself not counted) and the full migration's
# time; the speed-up of the network part (sync) and of the whole.
# Usage: bench/seed.sh [--size-mib 1024] [--changed-pct 2] [--rate 50MiB/s] [--reps 3]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

size_mib=1024
pct=2
rate=50MiB/s
reps=3
while (($#)); do
  case "$1" in
    --size-mib) size_mib="$2"; shift 2 ;;
    --changed-pct) pct="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

bench_ferry
work=$(mktemp -d /var/tmp/ferry-seedbench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
export FERRY_LOG=warn
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
jget() { python3 -c "import json,sys; v=json.load(sys.stdin)$1; print(v if v is not None else '')"; }
declare -A API NBD
start_agent() {
  local n=$1 api repl
  api=$(port); repl=$(port)
  mkdir -p "$work/$n"
  cat >"$work/$n.toml" <<EOT
node_name = "$n"
data_dir = "$work/$n"
api_listen = "127.0.0.1:$api"
replication_listen = "127.0.0.1:$repl"
[migration]
migrations_max = 64
EOT
  "$ferry" agent --config "$work/$n.toml" >"$work/$n.out" 2>"$work/$n.log" &
  pids+=($!)
  for _ in $(seq 100); do [[ -s "$work/$n.out" ]] && break; sleep 0.05; done
  API[$n]="127.0.0.1:$api"; NBD[$n]="$work/$n/run/nbd.sock"
}
on() { local n=$1; shift; FERRY_API="${API[$n]}" FERRY_DATA_DIR="$work/$n" "$ferry" "$@"; }
wait_ready() { # workload
  until [[ $(on a --json migrate status "$1" | jget '["phase"]') == ready ]]; do sleep 0.05; done
}
start_agent a; start_agent b
cp "$work/b/api.token" "$work/b.token"
on a node add b --api "${API[b]}" --token-file "$work/b.token" --fingerprint "$(on b node id)" >/dev/null
store="$work/store"
changed_mib=$(( size_mib * pct / 100 ))
(( changed_mib >= 1 )) || changed_mib=1

declare -a s_sent s_ratio s_arch s_rest s_sync s_total f_time
for rep in $(seq "$reps"); do
  v="v$rep"; w="w$rep"
  on a volume create "$v" --size "${size_mib}MiB" >/dev/null
  head -c $((size_mib << 20)) /dev/urandom >"$work/fill.img"
  nbdcopy --flush "$work/fill.img" "nbd+unix:///$v?socket=${NBD[a]}"
  rm -f "$work/fill.img"
  on a workload create "$w" --volume "$v" >/dev/null
  # Seeded.
  t0=$(now)
  on a archive create "volume/$v" --to "$store" --name "seed$rep" --json >/dev/null
  t1=$(now)
  for i in $(seq 0 $((changed_mib - 1))); do
    off=$(( (i * 7919 + rep * 131) % size_mib ))
    head -c 1048576 /dev/urandom >"$work/piece"
    qemu-io -f raw -c "write -s $work/piece $((off << 20)) 1M" "nbd+unix:///$v?socket=${NBD[a]}" >/dev/null
  done
  t2=$(now)
  on b archive restore "seed$rep" --store "$store" --volume "$v" --replica-of a --json >/dev/null
  t3=$(now)
  on a migrate start "$w" --to b --seed "seed$rep" --max-rate "$rate" >/dev/null
  wait_ready "$w"
  t4=$(now)
  st=$(on a --json replicate status "$v")
  bytes=$(echo "$st" | jget '["copy_bytes_sent"]')
  s_sent+=("$bytes")
  s_ratio+=("$(echo "scale=4; $bytes / ($changed_mib * 1048576)" | bc)")
  s_arch+=("$(echo "$t1 - $t0" | bc)"); s_rest+=("$(echo "$t3 - $t2" | bc)")
  s_sync+=("$(echo "$t4 - $t3" | bc)"); s_total+=("$(echo "($t1 - $t0) + ($t3 - $t2) + ($t4 - $t3)" | bc)")
  # Full: the same data, nothing at B (a copy of the volume under a new name).
  fv="f$rep"; fw="fw$rep"
  on a volume create "$fv" --size "${size_mib}MiB" >/dev/null
  nbdcopy --flush "nbd+unix:///$v?socket=${NBD[a]}" "nbd+unix:///$fv?socket=${NBD[a]}"
  on a workload create "$fw" --volume "$fv" >/dev/null
  t5=$(now)
  on a migrate start "$fw" --to b --max-rate "$rate" >/dev/null
  wait_ready "$fw"
  t6=$(now)
  f_time+=("$(echo "$t6 - $t5" | bc)")
  echo "rep $rep: seeded sent $bytes B for ${changed_mib} MiB changed (${s_ratio[-1]}x); archive ${s_arch[-1]} s, restore ${s_rest[-1]} s, seeded sync ${s_sync[-1]} s; full ${f_time[-1]} s" >&2
done
m() { printf '%s\n' "$@" | median; }
sync_m=$(m "${s_sync[@]}"); total_m=$(m "${s_total[@]}"); full_m=$(m "${f_time[@]}")
cat <<EOT
offline seeding, ${size_mib} MiB volume, ${pct}% (${changed_mib} MiB) changed after the archive, link capped at $rate, median of $reps:
  seeded sync sent $(m "${s_sent[@]}") B = $(m "${s_ratio[@]}") x the changed bytes
  seeded: archive $(m "${s_arch[@]}") s + restore $(m "${s_rest[@]}") s + sync to ready $sync_m s = $total_m s (shipping the disk not counted)
  full migration to ready: $full_m s
  network part: $(echo "scale=1; $full_m / $sync_m" | bc)x faster; whole seeded path: $(echo "scale=2; $full_m / $total_m" | bc)x
EOT
