#!/bin/sh
# The cluster simulation's long run: FERRY_SIM_SEEDS seeded schedules
# (default 100,000) of the real ClusterNode and Witness state machines under
# crashes, pauses, partitions, loss, replays, forced promotions, split
# brains and their policies, failback and async accept-loss
# (crates/ferry-core/tests/cluster_sim.rs). The normal suite runs 1,000.
# A failure prints its seed: FERRY_SIM_SEED=N cargo test -p ferry-core --test cluster_sim
# (FERRY_SIM_TRACE=1 adds the witness traffic); FERRY_SIM_FIRST=K resumes at seed K.
set -eu
cd "$(dirname "$0")/.."
seeds="${FERRY_SIM_SEEDS:-100000}"
start=$(date +%s)
FERRY_SIM_SEEDS="$seeds" cargo test -p ferry-core --release --test cluster_sim \
    seeded_schedules -- --nocapture
echo "sim: $seeds schedules passed in $(( $(date +%s) - start )) s"
