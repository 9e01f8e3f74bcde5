#!/usr/bin/env bash
# Fault soak (issue 17): nodes a and b, a witness w and a client c, each in
# its own network namespace on one bridge (198.18.0.0/24, as
# bench/failover.sh); one HA workload with a sync volume and a VIP. An
# acknowledged-record writer (bench/soak/writer.py) writes numbered,
# checksummed 4 KiB records through the VIP, each followed by a flush, and
# logs a record only once both were acknowledged. A sampler
# (bench/soak/sample.py) asks both nodes for `cluster status` and `replicate
# status` every 200 ms for the whole run, faults included.
#
# Each cycle: the writer starts, then one fault picked at random (seeded, a
# shuffled bag of the 7 kinds, so every 7 cycles see each kind once):
#   kill-primary     kill -9 of the serving agent + its veth down (a machine
#                    crash); healed once the other node serves, by "rebooting"
#                    it (VIP address gone, veth up, agent started again)
#   kill-replica     the same for the replica
#   kill-witness     the same for the witness
#   cut-replication  nftables in the primary's namespace drop TCP port 7361
#                    (the replication link) to and from the replica
#   cut-heartbeat    the same for UDP port 7370 (the heartbeat path)
#   cut-witness      nftables in the witness's namespace drop everything to
#                    and from both nodes
#   pause-primary    SIGSTOP of the serving agent, longer than the failure
#                    timeout (its kernel keeps the VIP and the TCP sockets),
#                    then SIGCONT
# then healing, then waiting for the cluster to settle (one primary holding
# the VIP, the other its up-to-date replica, the link in sync), then the
# writer must make progress, then it stops and the checks run:
#   - never two nodes saying they are the primary in one sampled round
#   - every acknowledged record present and intact on the serving node
#   - the replica's image equal to the serving node's, `volume verify` passes
#   - the resync's copier sent no more than what was dirty when the link came
#     up (its dirty map plus an old primary's suspect blocks), × 1.25 + 4 MiB,
#     and less than half the volume
# Failover times come from the `promoted` events (detection_ms, failover_ms),
# written by each node's notify hook. Exit status 1 if any check failed.
#
# Usage: bench/soak.sh [--cycles 5] [--seed S]   (KEEP=1 keeps the work dir)
# (Background processes are started with `ip netns exec` directly, never
# through a shell function, so $! is the process itself and kill reaches it.)
set -euo pipefail
cd "$(dirname "$0")/.."

cycles=5
seed=""
while (($#)); do
  case "$1" in
    --cycles) cycles="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    *) echo "usage: bench/soak.sh [--cycles N] [--seed S]" >&2; exit 2 ;;
  esac
done
[[ -n $seed ]] || seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')

scripts/install-deps >/dev/null
cargo build --release --quiet -p ferry
ferry="${CARGO_TARGET_DIR:-$PWD/target}/release/ferry"
py=/usr/bin/python3 # the Debian python, which has libnbd's bindings
here="$PWD/bench/soak"
work=$(mktemp -d /var/tmp/ferry-soak.XXXXXX)
tag="sk$$"
vip=198.18.0.100
# The writer's way to the export (bench/soak/writer.py connect() is the one
# place that opens it) and the agents' NBD listener: TCP through the VIP
# needs TLS with a client certificate of the NBD CA both nodes share (made
# at a, copied to b before either starts; the VIP is in their server
# certificates, nbd.tls_names).
certs="$work/nbd-client"
NBD_URI="nbds://$vip:10809/vol?tls-certificates=$certs"
NBD_LISTEN="0.0.0.0:10809"
shared_nbd_ca() {
  rm -rf "$certs"; mkdir -p "$work/a" "$work/b/tls"
  FERRY_DATA_DIR="$work/a" FERRY_LOG=warn "$ferry" nbd client-cert c --out "$certs" >/dev/null
  cp "$work/a/tls/nbd-ca.key" "$work/a/tls/nbd-ca.crt" "$work/b/tls/"
}
HEARTBEAT_MS=100
FAILURE_MS=1000
VOLUME_MIB=256
SLOTS=$((VOLUME_MIB * 256)) # 4 KiB records
SETTLE_S=90
declare -A ADDR=([a]=198.18.0.1 [b]=198.18.0.2 [w]=198.18.0.3 [c]=198.18.0.4)
declare -A PID
writer_pid=""
sampler_pid=""

echo "soak: seed $seed, $cycles cycles (replay: bench/soak.sh --cycles $cycles --seed $seed); work dir $work" >&2

cleanup() {
  local rc=$?
  set +e
  [[ -n $writer_pid ]] && kill "$writer_pid" 2>/dev/null
  [[ -n $sampler_pid ]] && kill "$sampler_pid" 2>/dev/null
  for n in a b w; do
    [[ -n ${PID[$n]:-} ]] && { kill -CONT "${PID[$n]}"; kill -9 "${PID[$n]}"; } 2>/dev/null
  done
  wait 2>/dev/null
  for n in a b w c br; do
    # Anything else still running inside our namespaces was started by us
    # (the sampler's CLI calls, notify hooks).
    for p in $(ip netns pids "$tag-$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    ip netns del "$tag-$n" 2>/dev/null
  done
  if [[ -n ${KEEP:-} ]]; then
    echo "kept $work" >&2
  elif ((rc)); then
    rm -rf "$work"/a/volumes "$work"/b/volumes
    echo "soak failed (exit $rc): logs kept in $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
in_ns() { local n=$1; shift; ip netns exec "$tag-$n" "$@"; }
on() { local n=$1; shift; FERRY_API="${ADDR[$n]}:7360" FERRY_DATA_DIR="$work/$n" timeout 60 ip netns exec "$tag-c" "$ferry" "$@"; }
tails() { for f in a b w; do echo "--- last lines of $f.log" >&2; tail -n 25 "$work/$f.log" >&2; done; }
die() { echo "soak: $*" >&2; tails; exit 1; }

# ---------- namespaces ----------
ip netns add "$tag-br"
ip -n "$tag-br" link add br0 type bridge
ip -n "$tag-br" link set br0 up
for n in a b w c; do
  ip netns add "$tag-$n"
  ip -n "$tag-br" link add "p$n" type veth peer name "e$n"
  ip -n "$tag-br" link set "e$n" netns "$tag-$n"
  ip -n "$tag-br" link set "p$n" master br0 up
  ip -n "$tag-$n" link set "e$n" name eth0
  ip -n "$tag-$n" addr add "${ADDR[$n]}/24" dev eth0
  ip -n "$tag-$n" link set eth0 up
  ip -n "$tag-$n" link set lo up
done

# ---------- processes ----------
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/witness.key")

wait_started() { # name pid
  for _ in $(seq 200); do
    [[ -s "$work/$1.out" ]] && return 0
    kill -0 "$2" 2>/dev/null || die "$1 exited at start"
    sleep 0.05
  done
  die "$1 did not start"
}

start_witness() {
  mkdir -p "$work/w"
  FERRY_DATA_DIR="$work/w" FERRY_LOG=info NO_COLOR=1 ip netns exec "$tag-w" "$ferry" witness \
    --listen "${ADDR[w]}:7380" --key-file "$work/witness.key" >"$work/w.out" 2>>"$work/w.log" &
  PID[w]=$!
  wait_started w "${PID[w]}"
}

start_agent() { # node
  local n=$1 peer
  peer=$([[ $n == a ]] && echo b || echo a)
  mkdir -p "$work/$n"
  cat >"$work/$n.toml" <<EOT
node_name = "$n"
data_dir = "$work/$n"
api_listen = "${ADDR[$n]}:7360"
replication_listen = "${ADDR[$n]}:7361"
nbd_listen = "$NBD_LISTEN"
[nbd]
tls_names = ["$vip"]
[replication]
reconnect_backoff_max_ms = 500
peer_ack_timeout_ms = $FAILURE_MS
[cluster]
peer = "$peer"
heartbeat = ["${ADDR[$n]}:7370"]
witness = "${ADDR[w]}:7380"
witness_key_file = "$work/witness.key"
heartbeat_interval_ms = $HEARTBEAT_MS
failure_timeout_ms = $FAILURE_MS
notify = "echo \"\$FERRY_EVENT\" >> $work/$n.events.jsonl"
EOT
  FERRY_LOG=info NO_COLOR=1 ip netns exec "$tag-$n" "$ferry" agent --config "$work/$n.toml" >"$work/$n.out" 2>>"$work/$n.log" &
  PID[$n]=$!
  wait_started "$n" "${PID[$n]}"
}

# A machine crash: every process of it gone, its link down.
crash() { # node
  kill -9 "${PID[$1]}" 2>/dev/null || true
  wait "${PID[$1]}" 2>/dev/null || true
  PID[$1]=""
  ip -n "$tag-$1" link set eth0 down
}

# Its reboot: no VIP left on the interface, link up, fresh neighbours.
reboot() { # node
  ip -n "$tag-$1" addr del "$vip/24" dev eth0 2>/dev/null || true
  ip -n "$tag-$1" link set eth0 up
  ip -n "$tag-$1" neigh flush dev eth0 2>/dev/null || true
  if [[ $1 == w ]]; then start_witness; else start_agent "$1"; fi
}

# nftables table `soak` in node N's namespace dropping packets to and from
# ADDRS (an nft set) that also match WHAT.
cut() { # node addrs what
  cat >"$work/cut.nft" <<EOT
table inet soak {
  chain in { type filter hook input priority 0; ip saddr $2 $3 drop; }
  chain out { type filter hook output priority 0; ip daddr $2 $3 drop; }
}
EOT
  in_ns "$1" nft -f "$work/cut.nft"
}
cut_ports() { # node peer proto port: both directions, either end of the port
  cat >"$work/cut.nft" <<EOT
table inet soak {
  chain in { type filter hook input priority 0; ip saddr $2 $3 dport $4 drop; ip saddr $2 $3 sport $4 drop; }
  chain out { type filter hook output priority 0; ip daddr $2 $3 dport $4 drop; ip daddr $2 $3 sport $4 drop; }
}
EOT
  in_ns "$1" nft -f "$work/cut.nft"
}
uncut() { in_ns "$1" nft delete table inet soak; }

has_vip() { ip -n "$tag-$1" -o addr show dev eth0 | grep -q "inet $vip/"; }

# Settled: the last 3 sampled rounds agree (check.py settled), and the VIP is
# on the serving node only. Sets SERVING.
settled() { # since
  SERVING=$(tail -n 8 "$work/samples.jsonl" | "$py" "$here/check.py" settled "$1" 3) || return 1
  local other
  other=$([[ $SERVING == a ]] && echo b || echo a)
  has_vip "$SERVING" && ! has_vip "$other"
}
wait_settled() { # since timeout_s
  local deadline
  deadline=$(($(date +%s) + $2))
  until settled "$1"; do
    (($(date +%s) < deadline)) || return 1
    sleep 0.2
  done
}

# ---------- the cluster ----------
start_witness
shared_nbd_ca
start_agent a
start_agent b
(umask 077 && cp "$work/b/api.token" "$work/b.token")
on a node add b --api "${ADDR[b]}:7360" --token-file "$work/b.token" --fingerprint "$(on b node id)" >/dev/null
on a volume create vol --size "${VOLUME_MIB}MiB" >/dev/null
on a workload create web --volume vol --vip "$vip/24" --vip-interface eth0 >/dev/null
on a replicate start vol --to b --mode sync >/dev/null
on a replicate wait vol --timeout 60s >/dev/null
on a cluster add web --preferred a >/dev/null

: >"$work/samples.jsonl"
ip netns exec "$tag-c" "$py" "$here/sample.py" "$work/samples.jsonl" 200 "$ferry" web vol \
  "a=${ADDR[a]}:7360=$work/a/api.token" "b=${ADDR[b]}:7360=$work/b/api.token" &
sampler_pid=$!
wait_settled 0 60 || die "the cluster did not settle after setup"
echo "soak: cluster up, $SERVING serves, VIP $vip, volume ${VOLUME_MIB} MiB" >&2

# ---------- the schedule: kind, writes before the fault, fault length ----------
"$py" - "$seed" "$cycles" >"$work/schedule" <<'PY'
import random, sys
r = random.Random(int(sys.argv[1]))
kinds = ["kill-primary", "kill-replica", "kill-witness", "cut-replication",
         "cut-heartbeat", "cut-witness", "pause-primary"]
# seconds the fault lasts (kill-primary: after the other node took over;
# pause-primary: always longer than the 1 s failure timeout)
hold = {"kill-primary": (0.5, 3), "kill-replica": (1.5, 5), "kill-witness": (1.5, 5),
        "cut-replication": (2, 6), "cut-heartbeat": (2, 6), "cut-witness": (2, 6),
        "pause-primary": (1.2, 4)}
bag = []
for _ in range(int(sys.argv[2])):
    if not bag:
        bag = kinds[:]
        r.shuffle(bag)
    k = bag.pop()
    print(k, "%.2f" % r.uniform(1, 3), "%.2f" % r.uniform(*hold[k]))
PY

# ---------- cycles ----------
: >"$work/cycles.jsonl"
next_index=0
failed=0
t_prev_end=$(now)
cycle=0
while read -r kind pre hold <&3; do
  cycle=$((cycle + 1))
  P=$SERVING
  R=$([[ $P == a ]] && echo b || echo a)
  failures=()
  wlog="$work/writer-$cycle.log"
  ip netns exec "$tag-c" "$py" "$here/writer.py" "$NBD_URI" "$next_index" "$seed" "$SLOTS" >"$wlog" 2>"$work/writer-$cycle.err" &
  writer_pid=$!
  sleep "$pre"

  # The serving node's log line count: its link-up lines after the fault
  # say what the resync had to send.
  log_off_a=$(wc -l <"$work/a.log")
  log_off_b=$(wc -l <"$work/b.log")
  t_fault=$(now)
  case $kind in
    kill-primary)
      crash "$P"
      deadline=$(($(date +%s) + 20))
      until tail -n 100 "$work/samples.jsonl" | "$py" "$here/check.py" claims "$t_fault" "$R"; do
        if (($(date +%s) >= deadline)); then failures+=("$R did not take over within 20 s"); break; fi
        sleep 0.1
      done
      sleep "$hold"
      reboot "$P"
      ;;
    kill-replica) crash "$R"; sleep "$hold"; reboot "$R" ;;
    kill-witness) crash w; sleep "$hold"; reboot w ;;
    cut-replication) cut_ports "$P" "${ADDR[$R]}" tcp 7361; sleep "$hold"; uncut "$P" ;;
    cut-heartbeat) cut_ports "$P" "${ADDR[$R]}" udp 7370; sleep "$hold"; uncut "$P" ;;
    cut-witness) cut w "{ ${ADDR[a]}, ${ADDR[b]} }" ""; sleep "$hold"; uncut w ;;
    pause-primary) kill -STOP "${PID[$P]}"; sleep "$hold"; kill -CONT "${PID[$P]}" ;;
  esac
  t_heal=$(now)
  if ! wait_settled "$t_heal" "$SETTLE_S"; then
    tail -n 3 "$work/samples.jsonl" >&2
    die "cycle $cycle ($kind): the cluster did not settle within $SETTLE_S s after healing"
  fi
  t_settled=$(now)
  # Writes flow again through the VIP.
  deadline=$(($(date +%s) + 20))
  until "$py" "$here/check.py" acked-after "$wlog" "$t_settled"; do
    if (($(date +%s) >= deadline)); then failures+=("no write acknowledged within 20 s after settling"); break; fi
    sleep 0.1
  done
  # It stops between two records (a request in flight is answered or times
  # out first); a writer still there after 15 s is killed.
  kill -TERM "$writer_pid"
  for _ in $(seq 150); do kill -0 "$writer_pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$writer_pid" 2>/dev/null || true
  wait "$writer_pid" || true
  writer_pid=""
  n=$(awk '$1 == "next" {print $2}' "$wlog")
  next_index=$((${n:-$next_index} + 1))

  X=$SERVING
  Y=$([[ $X == a ]] && echo b || echo a)
  # The replica holds what the serving node holds (the writer has stopped;
  # verify drains the link first).
  on "$X" volume verify vol >"$work/verify-$cycle.out" 2>&1 || failures+=("volume verify: $(tail -n 1 "$work/verify-$cycle.out")")
  equal=0
  for _ in $(seq 50); do
    cmp -s "$work/$X/volumes/vol/data.raw" "$work/$Y/volumes/vol/data.raw" && { equal=1; break; }
    sleep 0.2
  done
  ((equal)) || failures+=("the replica's image differs from the serving node's")
  rec=$("$py" "$here/check.py" records "$work/$X/volumes/vol/data.raw" "$seed" "$SLOTS" "$work"/writer-*.log) ||
    failures+=("acknowledged records lost on $X: $rec")
  t_end=$(now)
  off_var="log_off_$X"
  fig=$("$py" "$here/check.py" cycle --samples "$work/samples.jsonl" --t-begin "$t_prev_end" --t-fault "$t_fault" \
    --t-end "$t_end" --primary "$X" --log "$work/$X.log" --log-offset "${!off_var}" \
    --events "$work/a.events.jsonl" "$work/b.events.jsonl" --writer-log "$wlog" --volume-bytes $((VOLUME_MIB << 20)) --slots "$SLOTS")
  t_prev_end=$t_end
  [[ -n $fig && -n $rec ]] || die "cycle $cycle: bench/soak/check.py failed"
  dual=$(jq -r .dual_primaries <<<"$fig")
  ((dual == 0)) || failures+=("$dual sampled rounds with two primaries: $(jq -c .dual_at <<<"$fig")")
  [[ $(jq -r .resync_ok <<<"$fig") == true ]] ||
    failures+=("resync sent $(jq -r .resent_bytes <<<"$fig") B, bound $(jq -r .resent_bound <<<"$fig") B")
  lost=$(jq -r .lost <<<"$rec")
  ((${#failures[@]} == 0)) || failed=$((failed + 1))
  jq -c --argjson cycle "$cycle" --arg kind "$kind" --arg from "$P" --arg to "$X" \
    --argjson hold "$hold" --argjson lost "${lost:-0}" --argjson vb $((VOLUME_MIB << 20)) \
    --argjson settle "$(awk -v a="$t_heal" -v b="$t_settled" 'BEGIN{printf "%.2f", b-a}')" \
    --args '. + {cycle: $cycle, kind: $kind, primary_before: $from, primary_after: $to, hold_s: $hold,
      lost: $lost, volume_bytes: $vb, settle_s: $settle, failures: $ARGS.positional}' \
    "${failures[@]}" <<<"$fig" >>"$work/cycles.jsonl"
  fo=$(jq -r '[.promoted[] | "\(.node) \(.failover_ms // "?") ms"] | join(", ")' <<<"$fig")
  printf 'cycle %d/%d %-15s hold %4.1fs  %s→%s  acked %5d lost %s  dual %d  promoted [%s]  resent %s B (dirty at link-up %s B)  settled %.1fs  %s\n' \
    "$cycle" "$cycles" "$kind" "$hold" "$P" "$X" "$(jq -r .acked <<<"$fig")" "${lost:-?}" "$dual" "$fo" \
    "$(jq -r .resent_bytes <<<"$fig")" "$(jq -r '"\(.resync_bytes_at_connect) B; written \(.changed_bytes) + suspect \(.suspect_bytes)"' <<<"$fig")" \
    "$(awk -v a="$t_heal" -v b="$t_settled" 'BEGIN{print b-a}')" \
    "$( ((${#failures[@]})) && echo "FAILED: ${failures[*]}" || echo ok)"
done 3<"$work/schedule"

echo "== fault soak: seed $seed, $(nproc) cores, $(uname -r), heartbeat ${HEARTBEAT_MS} ms, failure timeout ${FAILURE_MS} ms"
"$py" "$here/check.py" report "$work/cycles.jsonl" || true
((failed == 0)) || { echo "soak: $failed of $cycles cycles failed" >&2; exit 1; }
