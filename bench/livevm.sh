#!/usr/bin/env bash
# Benchmark: live migration of a QEMU VM (issue 23), the guest pause.
#
# The guest: crates/ferry/tests/guest/live.sh (TCG, --memory-mib of RAM,
# 16 MiB raw disk): it appends fsynced records to its disk and prints a TICK
# line every ~11 ms; with `ferry.busy=1` (the "busy" rows) it also rewrites a
# 64 MiB tmpfs file of random data in place in a loop (a high dirty rate).
#
# Rows (--rows, comma-separated):
#   floor  QEMU's own plain `migrate` with SHARED storage: both QEMUs on this
#          host on one raw file, no ferry (bench/livevm.py floor): source with
#          QMP, target `-S -incoming defer`; auto-converge and downtime-limit
#          at the source, late-block-activate at the target; migrate
#          unix:…; on `completed`: `cont` the target, `quit` the source.
#          What no live move on this machine can beat.
#   live   `ferry migrate cutover W` (live, the default for a VM workload)
#          between two ferry agents on 127.0.0.1 (as bench/migration.sh).
#   cold   `ferry migrate cutover W --cold` (stop and boot; its outage_ms).
# Each row runs idle and busy, --reps times each.
# Measures per run:
#   pause    source QMP STOP → target QMP RESUME (event timestamps, host wall
#            clock; floor only: ferry's own figure for the ferry rows)
#   max gap  the largest gap between consecutive TICK lines across both
#            console files, as this host sees them (polled every ~1 ms): the
#            guest's pause as seen from outside (the guest's clock stands
#            still while paused under TCG, its own stamps do not show it).
#   and QEMU's query-migrate figures (downtime, total-time, transferred,
#   dirty-sync-count) for the floor.
# Usage: bench/livevm.sh [--rows floor] [--reps 5] [--memory-mib 256]
#                        [--downtime-limit-ms 300] [--max-bandwidth-mib N]
#                        [--warmup-s 5]
# Results: bench/out/livevm-DATE.md (tables), raw JSON lines on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

rows=floor
reps=5
memory_mib=256
downtime_limit_ms=300
max_bandwidth_mib=0  # 0: QEMU's default (128 MiB/s in 7.2)
warmup_s=5
while (($#)); do
  case "$1" in
    --rows) rows="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --memory-mib) memory_mib="$2"; shift 2 ;;
    --downtime-limit-ms) downtime_limit_ms="$2"; shift 2 ;;
    --max-bandwidth-mib) max_bandwidth_mib="$2"; shift 2 ;;
    --warmup-s) warmup_s="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
has() { [[ ",$rows," == *",$1,"* ]]; }

guest="$PWD/target/guest-live"
scripts/build-guest crates/ferry/tests/guest/live.sh "$guest"
work=$(mktemp -d /var/tmp/ferry-livevm.XXXXXX)
pids=()
cleanup() {
  # Every QEMU bench/livevm.py started (it kills them itself; this is for
  # when it was killed first), then the agents and watchers started here.
  for f in "$work"/*/qemu.pids; do
    [[ -f $f ]] || continue
    while read -r p; do kill -9 "$p" 2>/dev/null || true; done <"$f"
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
export FERRY_LOG=warn

median() { python3 bench/livevm.py median "$1"; }
results="$work/results.jsonl"
: >"$results"

# ---------- floor: QEMU's own migrate, shared storage ----------
floor_run() { # idle|busy rep
  local extra=()
  [[ $1 == busy ]] && extra=(--busy)
  python3 bench/livevm.py floor --guest "$guest" --work "$work/floor-$1-$2" \
    --memory-mib "$memory_mib" --downtime-limit-ms "$downtime_limit_ms" \
    --max-bandwidth-mib "$max_bandwidth_mib" --warmup-s "$warmup_s" "${extra[@]}" |
    python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["row"]="floor"; r["load"]=sys.argv[1]; print(json.dumps(r))' "$1"
}

# ---------- ferry rows: two agents as in bench/migration.sh ----------
now() { date +%s.%N; }
jget() { python3 -c "import json,sys; v=json.load(sys.stdin)$1; print(v if v is not None else '')"; }
declare -A API PID
ferry_agents() { # once: agents a and b, b known to a
  [[ -n ${API[a]:-} ]] && return 0
  bench_ferry
  local n api repl
  for n in a b; do
    api=$(port); repl=$(port)
    mkdir -p "$work/$n"
    cat >"$work/$n.toml" <<EOT
node_name = "$n"
data_dir = "$work/$n"
api_listen = "127.0.0.1:$api"
replication_listen = "127.0.0.1:$repl"

[vm]
# The same QEMU parameters as the floor's: downtime limit, and the RAM
# stream's rate (0 there: QEMU's default of 128 MiB/s).
downtime_limit_ms = $downtime_limit_ms
max_bandwidth_bytes_per_s = $(( max_bandwidth_mib == 0 ? 134217728 : max_bandwidth_mib * 1048576 ))
EOT
    "$ferry" agent --config "$work/$n.toml" >"$work/$n.out" 2>"$work/$n.log" &
    PID[$n]=$!; pids+=($!)
    for _ in $(seq 100); do [[ -s "$work/$n.out" ]] && break; sleep 0.05; done
    API[$n]="127.0.0.1:$api"
  done
  cp "$work/b/api.token" "$work/b.token"
  on a node add b --api "${API[b]}" --token-file "$work/b.token" --fingerprint "$(on b node id)" >/dev/null
}
on() { local n=$1; shift; FERRY_API="${API[$n]}" FERRY_DATA_DIR="$work/$n" "$ferry" "$@"; }
wait_phase() { # workload phase timeout_s
  local t0; t0=$(now)
  until [[ $(on a --json migrate status "$1" | jget '["phase"]') == "$2" ]]; do
    if (( $(echo "$(now) - $t0 > $3" | bc) )); then echo "timeout waiting for $1 $2" >&2; return 1; fi
    sleep 0.1
  done
}
wait_console() { # file tag timeout_s
  local t0; t0=$(now)
  until grep -q "^$2" "$1" 2>/dev/null; do
    if (( $(echo "$(now) - $t0 > $3" | bc) )); then echo "timeout waiting for $2 in $1" >&2; return 1; fi
    sleep 0.1
  done
}
# One cutover of a fresh VM workload from a to b, the console watcher running
# around it. $1: live|cold, $2: idle|busy, $3: rep. Prints one JSON line:
# ferry's reply (as "reply") and the tick analysis (as "ticks").
ferry_run() {
  ferry_agents
  local mode=$1 load=$2 rep=$3 w="vm-$1-$2-$3" append="console=ttyS0 panic=-1 quiet" flags=()
  [[ $load == busy ]] && append+=" ferry.busy=1"
  [[ $mode == cold ]] && flags=(--cold)
  on a volume create "$w" --size 16MiB >/dev/null
  on a workload create "$w" --volume "$w" --vm-kernel "$guest/vmlinuz" \
    --vm-initrd "$guest/initramfs.cpio.gz" --vm-memory "${memory_mib}MiB" \
    --vm-append "$append" --hook-timeout 20s >/dev/null
  on a workload start "$w" >/dev/null
  local con_a="$work/a/vms/$w/console.log" con_b="$work/b/vms/$w/console.log"
  wait_console "$con_a" WROTE 120
  [[ $load == busy ]] && wait_console "$con_a" BUSY 120
  on a migrate start "$w" --to b >/dev/null
  wait_phase "$w" ready 300
  sleep "$warmup_s"
  python3 bench/livevm.py watch "$work/$w.ticks.json" "$con_a" "$con_b" &
  local watcher=$!; pids+=($watcher)
  until [[ -e "$work/$w.ticks.json.ready" ]]; do sleep 0.02; done
  local r; r=$(on a --json migrate cutover "$w" "${flags[@]}")
  wait_console "$con_b" TICK 120 || true
  sleep 2  # ticks at the target after the move
  kill "$watcher"; wait "$watcher" 2>/dev/null || true
  on b workload stop "$w" >/dev/null 2>&1 || true
  python3 - "$mode" "$load" "$work/$w.ticks.json" "$r" <<'EOF'
import json, sys
mode, load, tf, reply = sys.argv[1:5]
print(json.dumps({"row": mode, "load": load, "reply": json.loads(reply),
                  "ticks": json.load(open(tf))}))
EOF
}

for load in idle busy; do
  for rep in $(seq "$reps"); do
    if has floor; then
      floor_run "$load" "$rep" | tee -a "$results" >&2
    fi
    if has live; then ferry_run live "$load" "$rep" | tee -a "$results" >&2; fi
    if has cold; then ferry_run cold "$load" "$rep" | tee -a "$results" >&2; fi
  done
done

out="bench/out/livevm-$(date -u +%Y%m%dT%H%M%SZ).md"
mkdir -p bench/out
sel() { python3 -c 'import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l)
    if r["row"]==sys.argv[2] and r["load"]==sys.argv[3]: print(l.strip())' "$results" "$1" "$2"; }
raw() { sel "$1" "$2" | python3 -c 'import json,sys
f=sys.argv[1].split(".")
vals=[]
for l in sys.stdin:
    v=json.loads(l)
    for k in f: v=v.get(k) if isinstance(v,dict) else None
    vals.append(str(v))
print(" ".join(vals))' "$3"; }
# Per run: boot ids / pids / seq holes seen (a live move: 1/1/0).
bph() { python3 -c 'import json,sys
out=[]
for l in sys.stdin:
    t=json.loads(l)["ticks"]
    out.append("%d/%d/%s" % (len(t.get("boot_ids",[])), len(t.get("pids",[])), t.get("seq_holes")))
print(" ".join(out))'; }
{
  echo "QEMU $(qemu-system-x86_64 --version | head -1 | awk '{print $4}'), TCG, ${memory_mib} MiB guest (live.sh), $(nproc) cores, $(uname -r), $reps runs each, downtime-limit ${downtime_limit_ms} ms, auto-converge, max-bandwidth $( [[ $max_bandwidth_mib == 0 ]] && echo "QEMU default" || echo "$max_bandwidth_mib MiB/s")"
  echo
  if has floor; then
    echo "| floor: QEMU migrate, shared storage | pause STOP → RESUME | TICK gap across the move | max TICK gap of the run | QEMU downtime | total time | transferred | dirty syncs | boot ids / pids / seq holes per run |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for load in idle busy; do
      s=$(sel floor "$load")
      echo "| $load | $(echo "$s" | median pause_ms) ms | $(echo "$s" | median ticks.switch_gap_ms) ms | $(echo "$s" | median ticks.max_gap_ms) ms | $(echo "$s" | median qemu.downtime_ms) ms | $(echo "$s" | median qemu.total_time_ms) ms | $(echo "$s" | median qemu.transferred) B | $(echo "$s" | median qemu.dirty_sync_count) | $(sel floor "$load" | bph) |"
    done
    echo
    for load in idle busy; do
      echo "raw floor $load: pause ms $(raw floor "$load" pause_ms); gap across the move ms $(raw floor "$load" ticks.switch_gap_ms); max gap ms $(raw floor "$load" ticks.max_gap_ms); last source tick → STOP ms $(raw floor "$load" last_src_tick_to_stop_ms); RESUME → first target tick ms $(raw floor "$load" resume_to_first_dst_tick_ms); tick period median ms $(raw floor "$load" ticks.median_period_ms); QEMU total time ms $(raw floor "$load" qemu.total_time_ms); dirty syncs $(raw floor "$load" qemu.dirty_sync_count)"
    done
    echo
  fi
  for mode in live cold; do
    has "$mode" || continue
    echo "| ferry migrate cutover ($mode) | downtime_ms | outage_ms | TICK gap across the move | max TICK gap | QEMU downtime | frozen / verified / committed (ms after STOP) | pre-copy | boot ids / pids / seq holes per run |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for load in idle busy; do
      s=$(sel "$mode" "$load")
      echo "| $load | $(echo "$s" | median reply.downtime_ms) ms | $(echo "$s" | median reply.outage_ms) ms | $(echo "$s" | median ticks.switch_gap_ms) ms | $(echo "$s" | median ticks.max_gap_ms) ms | $(echo "$s" | median reply.vm.qemu.downtime_ms) ms | $(echo "$s" | median reply.vm.freeze_ms) / $(echo "$s" | median reply.vm.verify_ms) / $(echo "$s" | median reply.vm.commit_ms) | $(echo "$s" | median reply.vm.precopy_ms) ms | $(echo "$s" | bph) |"
    done
    echo
    for load in idle busy; do
      echo "raw $mode $load: downtime_ms $(raw "$mode" "$load" reply.downtime_ms); gap across the move ms $(raw "$mode" "$load" ticks.switch_gap_ms); outage_ms $(raw "$mode" "$load" reply.outage_ms)"
    done
    echo
  done
} | tee "$out"
