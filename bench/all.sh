#!/usr/bin/env bash
# Regression guard: one short rep of every benchmark row, printed as one
# table in the format of docs/BENCHMARKS.md's summary table (row, command,
# date, result, target). Short reps are noisier than the full runs the
# summary records: a row far off its recorded figure is the cue to run its
# full command. Not part of CI (too long for it); run it before resolving an
# issue that touches the data path or a default. Each script's own output is
# kept in bench/out/all-DATE/.
# Usage: bench/all.sh --quick [--only nbd,nbd-tls,sync,resync,fio,cutover,writeback,failover,switchover,shares]
set -euo pipefail
cd "$(dirname "$0")/.."

quick=no
only=nbd,nbd-tls,sync,resync,fio,cutover,writeback,failover,switchover,shares
while (($#)); do
  case "$1" in
    --quick) quick=yes; shift ;;
    --only) only="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
if [[ $quick != yes ]]; then
  echo "bench/all.sh runs one short rep of every row: pass --quick (the full figures come from each script's own command in docs/BENCHMARKS.md)" >&2
  exit 2
fi
want() { [[ ",$only," == *",$1,"* ]]; }

scripts/install-deps >/dev/null
cargo build --release --quiet -p ferry
date=$(date -u +%Y-%m-%d)
dir="bench/out/all-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$dir"
rows=()

# run NAME COMMAND...: the script's stdout to $dir/NAME.out, stderr to .log.
run() {
  local name=$1; shift
  echo "== $name: $*" >&2
  local t0=$SECONDS
  if "$@" >"$dir/$name.out" 2>"$dir/$name.log"; then
    echo "   done in $((SECONDS - t0)) s" >&2
  else
    echo "   FAILED after $((SECONDS - t0)) s (see $dir/$name.log)" >&2
    echo "FAILED" >>"$dir/$name.out"
  fi
}

# row OUTPUT "LABEL" "COMMAND" "TARGET" PYTHON-EXPRESSION (over the output)
row() {
  local name=$1 label=$2 cmd=$3 target=$4 expr=$5 result
  result=$(python3 - "$dir/$name.out" "$expr" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def cells(prefix):
    """The cells of the first table row starting with `| prefix`."""
    for line in t.splitlines():
        if line.startswith("| " + prefix):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    return None
def grab(pattern, group=1):
    m = re.search(pattern, t)
    return m.group(group) if m else "?"
if "FAILED" in t:
    print("**failed** (see its log)")
else:
    try:
        print(eval(sys.argv[2]))
    except Exception as e:
        print(f"? (could not read the output: {e})")
PY
)
  rows+=("| $label | \`$cmd\` | $date | $result | $target |")
}

if want nbd; then
  run nbd bench/nbd.sh --runtime 3 --reps 1
  row nbd "NBD export vs nbdkit, Unix socket" "bench/nbd.sh --runtime 3 --reps 1" "≥ 1.0× nbdkit" \
    '", ".join(f"{r[0]} {r[3]}" for r in (cells("randwrite 4k"), cells("randread 4k"), cells("write 1M")) if r)'
fi
if want nbd-tls; then
  run nbd-tls bench/nbd.sh --runtime 3 --reps 1 --tls
  row nbd-tls "NBD export vs nbdkit, TCP + TLS" "bench/nbd.sh --runtime 3 --reps 1 --tls" "≥ 1.0× nbdkit" \
    '", ".join(f"{r[0]} {r[3]}" for r in (cells("randwrite 4k"), cells("randread 4k"), cells("write 1M")) if r)'
fi
if want sync || want resync; then
  run replication bench/replication.sh --parts 1,2 --reps 1
  want sync && row replication "Block replication: initial sync 1 GiB" "bench/replication.sh --parts 1,2 --reps 1" "initial sync ≥ 1.0× the faster peer" \
    '"initial sync " + cells("initial sync")[1] + ", " + cells("initial sync")[3]'
  want resync && row replication "Block replication: resync 160 × 64 KiB" "bench/replication.sh --parts 1,2 --reps 1" "resync ≥ 20× rsync, ≤ 1.2× changed bytes" \
    '"resync " + cells("resync 160")[1] + " = " + cells("resync 160")[3] + "; bytes " + cells("resync bytes")[3]'
fi
if want fio; then
  run fio bench/replication.sh --parts 3 --runtime 3 --reps 1
  row fio "Block replication: fio 4k randwrite QD16" "bench/replication.sh --parts 3 --runtime 3 --reps 1" "see BENCHMARKS" \
    '"; ".join(r[0] + " " + r[1] + " IOPS (" + r[2] + "), durable " + r[4] for r in (cells("sync link"), cells("async link")) if r)'
fi
if want cutover; then
  run cutover bench/migration.sh --parts 1 --reps 1
  row cutover "Cutover downtime, 1 GiB under 20 MiB/s writes" "bench/migration.sh --parts 1 --reps 1" "≤ 50 ms, no rep > 100 ms" \
    '"downtime " + cells("downtime")[1] + ", outage " + cells("app-visible")[1]'
fi
if want writeback; then
  run writeback bench/migration.sh --parts 4 --reps 1 --runtime 5
  row writeback "Replica early writeback: sync IOPS while ready" "bench/migration.sh --parts 4 --reps 1 --runtime 5" "default / off ≥ 0.95" \
    '"sync 4k IOPS while ready, writeback default / off: " + cells("ratio")[1] + " (durable " + cells("ratio")[2] + ")"'
fi
if want failover || want switchover; then
  parts=""
  want failover && parts+="1,"
  want switchover && parts+="4,"
  run failover bench/failover.sh --parts "${parts%,}" --reps 1 --switchover-reps 1 --steady 3
  want failover && row failover "HA failover, kill -9 of the serving node" "bench/failover.sh --parts 1 --reps 1" "≤ 3 s / ≤ 0.35 s" \
    '"defaults " + cells("defaults")[2] + ", tuned " + cells("tuned")[2] + " (crash → NBD read)"'
  want switchover && row failover "HA switchover under 20 MiB/s writes" "bench/failover.sh --parts 4 --switchover-reps 1 --steady 3" "≤ 50 ms" \
    'grab(r"\| (downtime [^|]*)\|")'
fi
if want shares; then
  run shares bench/shares.sh --parts 1,3 --reps 1 --small 20000
  row shares "Shares: initial sync, FUSE mount" "bench/shares.sh --parts 1,3 --reps 1 --small 20000" "≥ 1.0× rsync; ≥ 1.0× bindfs" \
    '"initial sync " + grab(r"ferry speed ratio ([0-9.]+)x") + "× rsync daemon; FUSE ferry/bindfs: " + grab(r"ratios ferry/bindfs: ([^\n]*)")'
fi

{
  echo "bench/all.sh --quick, $(nproc) cores, $(uname -r), one short rep each (outputs in $dir)"
  echo
  echo "| benchmark | command | date | latest result | target |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee "$dir/summary.md"
