#!/usr/bin/env bash
# Benchmark: the estimator's cost per write (ferry-core's Observation fed
# 5,000,000 random 4 KiB writes at 100 and 100,000 writes/s of clock time).
# Usage: bench/estimate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release --quiet -p ferry-core --example estimate_cost
