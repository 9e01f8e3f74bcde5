#!/usr/bin/env bash
# Benchmark: the estimator's forecast error against real migrations. Runs
# tests/estimate_accuracy.rs's converging case (96 MiB allocated of 256 MiB,
# fio 64k randwrite over 32 MiB at RATE, --max-rate 4 MiB/s, probe under the
# load) for each write rate and mode, and the not-converging case once; prints
# each forecast vs measured figure, then the median and worst relative error
# of the initial sync and of the time to ready.
# Usage: [ACCURACY_TEST_BIN=target/debug/deps/estimate_accuracy-…] bench/estimate_accuracy.sh [--rates "1m 2m 3m"] [--modes "async sync"]
set -euo pipefail
cd "$(dirname "$0")/.."
rates="1m 2m 3m"
modes="async sync"
while (($#)); do
  case "$1" in
    --rates) rates="$2"; shift 2 ;;
    --modes) modes="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
out=$(mktemp /var/tmp/ferry-estacc.XXXXXX)
trap 'rm -f "$out"' EXIT
# ACCURACY_TEST_BIN: an already built test binary (else built now).
if [[ -n ${ACCURACY_TEST_BIN:-} ]]; then
  run_test() { "$ACCURACY_TEST_BIN" "$1" --nocapture; }
else
  cargo build --quiet -p ferry --test estimate_accuracy --bin ferry
  run_test() { cargo test --quiet -p ferry --test estimate_accuracy "$1" -- --nocapture; }
fi
for mode in $modes; do
  for rate in $rates; do
    echo "== $mode, writes at $rate/s" >&2
    FERRY_ACCURACY_MODE=$mode FERRY_ACCURACY_WRITE_RATE=$rate \
      run_test converging_migration 2>/dev/null \
      | grep '^ACCURACY' | sed "s/^ACCURACY converging/ACCURACY $mode@$rate/" | tee -a "$out" || true
  done
done
run_test hot_writer 2>/dev/null \
  | grep '^ACCURACY' | tee -a "$out" || true
python3 - "$out" <<'PY'
import re, statistics, sys
errs = {"initial_sync": [], "ready": []}
for line in open(sys.argv[1]):
    m = re.match(r"ACCURACY (\S+) (\S+) forecast=.* error=([+-][\d.]+)%", line)
    if m:
        errs["initial_sync" if m[2] == "initial_sync" else "ready"].append(abs(float(m[3])))
for k, v in errs.items():
    if v:
        print(f"{k}: {len(v)} runs, median |error| {statistics.median(v):.1f} %, worst {max(v):.1f} %")
PY
