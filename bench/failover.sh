#!/usr/bin/env bash
# Benchmark: HA failover in network namespaces (DESIGN.md "Several hosts").
#   nodes a and b, a witness w and a client c, each in its own namespace on
#   one bridge (198.18.0.0/24); a workload with one sync volume and a VIP.
#   1. failover time, median of --reps: crash the node serving the VIP
#      (kill -9 + veth down) → the VIP answers TCP from the other node
#      (polled every 20 ms from c) → an NBD read through the VIP works
#      (the "application check"); with the defaults (250 ms / 2000 ms) and
#      tuned (50 ms / 250 ms). The crashed node returns as replica between
#      reps, so reps alternate direction.
#   2. no false failover: tuned settings, --busy seconds with both cores
#      busy (2 spinning processes + a writer through the VIP) and the disk
#      holding the data dirs under fsync load (fio 4 KiB randwrite,
#      fsync=1, in the same work dir), counting fences/promotions. With
#      --churn SECS, a second HA workload (db, 16 MiB) is switched over
#      every SECS seconds meanwhile: its state changes are persisted while
#      web must keep its heartbeats (only web's events are counted then).
#   3. resync after an outage: crash the primary, write --outage-mib MiB
#      through the VIP on the survivor during --outage seconds, bring the
#      old primary back, compare bytes resent with the bytes changed.
#   4. planned switchover under load (defaults): fio writes 4 KiB random at
#      20 MiB/s through the serving node's NBD socket for --steady seconds,
#      then `cluster switchover`; its downtime_ms (freeze → the peer serves)
#      and verified_ms (freeze → drained and compared), median of
#      --switchover-reps, alternating direction.
# NBD crosses the network here, so it is TLS with a client certificate
# (nbds://, libnbd's tls-certificates=): both nodes share one NBD CA, and the
# VIP is in their server certificates (nbd.tls_names).
# (Background processes are started with `ip netns exec` directly, never
# through a shell function, so $! is the process itself and kill reaches it.)
# Usage: bench/failover.sh [--parts 1,2,3,4] [--reps 10] [--busy 60] [--outage 60]
#                          [--outage-mib 100] [--switchover-reps 5] [--steady 10] [--churn 0]
# FERRY_BIN=PATH runs that binary instead of building this tree's (A/B runs).
set -euo pipefail
cd "$(dirname "$0")/.."

reps=10
busy=60
outage=60
outage_mib=100
parts=1,2,3,4
switchover_reps=5
steady=10
churn=0
while (($#)); do
  case "$1" in
    --churn) churn="$2"; shift 2 ;;
    --parts) parts="$2"; shift 2 ;;
    --switchover-reps) switchover_reps="$2"; shift 2 ;;
    --steady) steady="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --busy) busy="$2"; shift 2 ;;
    --outage) outage="$2"; shift 2 ;;
    --outage-mib) outage_mib="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

has() { [[ ",$parts," == *",$1,"* ]]; }
scripts/install-deps >/dev/null
if [[ -n ${FERRY_BIN:-} ]]; then
  ferry=$(realpath "$FERRY_BIN")
else
  cargo build --release --quiet -p ferry
  ferry="${CARGO_TARGET_DIR:-$PWD/target}/release/ferry"
fi
work=$(mktemp -d /var/tmp/ferry-fbench.XXXXXX)
tag="fb$$"
vip=198.18.0.100
declare -A ADDR=([a]=198.18.0.1 [b]=198.18.0.2 [w]=198.18.0.3 [c]=198.18.0.4)
declare -A PID
busy_pids=()

cleanup() {
  for p in "${busy_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for n in a b w c br; do
    for p in $(ip netns pids "$tag-$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$tag-$n" 2>/dev/null || true
  done
  [[ -n ${KEEP:-} ]] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
in_ns() { local n=$1; shift; ip netns exec "$tag-$n" "$@"; }

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

mkdir -p "$work/w"
(umask 077; head -c 32 /dev/urandom | base64 >"$work/witness.key")
FERRY_DATA_DIR="$work/w" FERRY_LOG=warn ip netns exec "$tag-w" "$ferry" witness --listen "${ADDR[w]}:7380" --key-file "$work/witness.key" >/dev/null 2>"$work/w.log" &
PID[w]=$!

start_agent() { # node interval timeout
  local n=$1 peer
  peer=$([[ $1 == a ]] && echo b || echo a)
  mkdir -p "$work/$n"
  cat >"$work/$n.toml" <<EOT
node_name = "$n"
data_dir = "$work/$n"
api_listen = "${ADDR[$n]}:7360"
replication_listen = "${ADDR[$n]}:7361"
nbd_listen = "0.0.0.0:10809"
[nbd]
tls_names = ["$vip"]
[replication]
reconnect_backoff_max_ms = 500
[cluster]
peer = "$peer"
heartbeat = ["${ADDR[$n]}:7370"]
witness = "${ADDR[w]}:7380"
witness_key_file = "$work/witness.key"
heartbeat_interval_ms = $2
failure_timeout_ms = $3
EOT
  ip -n "$tag-$n" link set eth0 up
  ip -n "$tag-$n" neigh flush dev eth0 2>/dev/null || true
  FERRY_LOG=info NO_COLOR=1 ip netns exec "$tag-$n" "$ferry" agent --config "$work/$n.toml" >"$work/$n.out" 2>>"$work/$n.log" &
  PID[$n]=$!
  for _ in $(seq 100); do [[ -s "$work/$n.out" ]] && break; sleep 0.05; done
}
on() { local n=$1; shift; FERRY_API="${ADDR[$n]}:7360" FERRY_DATA_DIR="$work/$n" in_ns c "$ferry" "$@"; }
crash() { kill -9 "${PID[$1]}" 2>/dev/null || true; wait "${PID[$1]}" 2>/dev/null || true; ip -n "$tag-$1" link set eth0 down; }
primary_of() { on "$1" --json cluster status 2>/dev/null | python3 -c 'import json,sys; w=json.load(sys.stdin)["workloads"]; print(w[0]["primary"] if w else "")' 2>/dev/null || true; }
replica_state() { on "$1" --json cluster status 2>/dev/null | python3 -c 'import json,sys; w=json.load(sys.stdin)["workloads"]; print(w[0]["role"], w[0]["replicas"][0]["state"])' 2>/dev/null || true; }
wait_for() { # secs cmd...
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@"; do (( $(date +%s) < deadline )) || { echo "timed out: $*" >&2; tail -n 20 "$work/a.log" "$work/b.log" >&2; exit 1; }; sleep 0.1; done
}
serves() { [[ $(primary_of "$1") == "$1" ]]; }
is_replica() { [[ $(replica_state "$1") == "secondary up-to-date" ]]; }

# The client's certificate, and the NBD CA both nodes share (made at a,
# copied to b before either starts).
certs="$work/nbd-client"
nbd_uri="nbds://$vip:10809/vol?tls-certificates=$certs"
shared_nbd_ca() {
  rm -rf "$certs"; mkdir -p "$work/a" "$work/b/tls"
  FERRY_DATA_DIR="$work/a" FERRY_LOG=warn "$ferry" nbd client-cert c --out "$certs" >/dev/null
  cp "$work/a/tls/nbd-ca.key" "$work/a/tls/nbd-ca.crt" "$work/b/tls/"
}

# The poller: from c, TCP to VIP:10809 every 20 ms; then an NBD read (TLS).
cat >"$work/poll.py" <<'PY'
import socket, sys, time, nbd
vip, start, uri = sys.argv[1], float(sys.argv[2]), sys.argv[3]
def give_up():  # no failover within 60 s: fail the run rather than hang
    if time.time() - start > 60:
        print("no failover within 60 s", file=sys.stderr); sys.exit(1)
while True:
    give_up()
    s = socket.socket(); s.settimeout(0.02)
    try:
        s.connect((vip, 10809)); s.close(); t_vip = time.time(); break
    except OSError:
        s.close(); time.sleep(0.02)
while True:
    try:
        h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(uri); h.pread(4096, 0); t_app = time.time(); break
    except Exception:
        give_up(); time.sleep(0.02)
print("%.3f %.3f" % (t_vip - start, t_app - start))
PY

setup() { # interval timeout
  for n in a b; do [[ -n ${PID[$n]:-} ]] && { kill -9 "${PID[$n]}" 2>/dev/null || true; wait "${PID[$n]}" 2>/dev/null || true; }; rm -rf "${work:?}/$n"; done
  kill "${PID[w]}" 2>/dev/null || true; wait "${PID[w]}" 2>/dev/null || true
  rm -rf "$work/w/records"
  shared_nbd_ca
  FERRY_DATA_DIR="$work/w" FERRY_LOG=warn ip netns exec "$tag-w" "$ferry" witness --listen "${ADDR[w]}:7380" --key-file "$work/witness.key" >/dev/null 2>>"$work/w.log" &
  PID[w]=$!
  start_agent a "$1" "$2"; start_agent b "$1" "$2"
  cp "$work/b/api.token" "$work/b.token"
  on a node add b --api "${ADDR[b]}:7360" --token-file "$work/b.token" --fingerprint "$(on b node id)" >/dev/null
  on a volume create vol --size 256MiB >/dev/null
  on a workload create web --volume vol --vip "$vip/24" --vip-interface eth0 >/dev/null
  on a replicate start vol --to b --mode sync >/dev/null
  on a replicate wait vol --timeout 60s >/dev/null
  on a cluster add web --preferred a >/dev/null
  wait_for 30 serves a
  wait_for 30 is_replica b
}

failovers() { # label interval timeout -> appends "vip app" lines to $work/$label.times
  setup "$2" "$3"
  local holder=a other=b
  : >"$work/$1.times"
  for rep in $(seq "$reps"); do
    t0=$(now)
    ip netns exec "$tag-c" /usr/bin/python3 "$work/poll.py" "$vip" "$t0" "$nbd_uri" >"$work/poll.out" &
    poller=$!
    crash "$holder"
    wait "$poller"
    read -r tv ta <"$work/poll.out"
    echo "$tv $ta" >>"$work/$1.times"
    echo "$1 rep $rep: $holder → $other: VIP answers after $tv s, NBD read after $ta s" >&2
    wait_for 30 serves "$other"
    start_agent "$holder" "$2" "$3"
    wait_for 60 is_replica "$holder"
    local t=$holder; holder=$other; other=$t
  done
}

if has 1; then
failovers defaults 250 2000
failovers tuned 50 250
fi

# ---------- 2. false failovers under load ----------
if has 2; then
setup 50 250
if ((churn > 0)); then
  on a volume create vol2 --size 16MiB >/dev/null
  on a workload create db --volume vol2 >/dev/null
  on a replicate start vol2 --to b --mode sync >/dev/null
  on a replicate wait vol2 --timeout 60s >/dev/null
  on a cluster add db --preferred a >/dev/null
  sleep 2
fi
: >"$work/churn.out"
lines_a=$(wc -l <"$work/a.log"); lines_b=$(wc -l <"$work/b.log")
# The disk the data dirs are on, under fsync load: every 4 KiB write synced
# (its file laid out first, so the load spans the whole window).
mkdir -p "$work/fsync"
fio_fs=(fio --name=fs --rw=randwrite --bs=4k --fsync=1 --size=256M --directory="$work/fsync")
"${fio_fs[@]}" --create_only=1 >/dev/null
"${fio_fs[@]}" --time_based --runtime="$busy" --output-format=json --output="$work/fsync.json" >/dev/null 2>&1 &
fio_pid=$!; busy_pids+=($fio_pid)
for _ in 1 2; do ( while :; do :; done ) & busy_pids+=($!); done
switchovers=0
if ((churn > 0)); then
  ( holder=a
    while :; do
      sleep "$churn"
      if on "$holder" cluster switchover db >/dev/null 2>>"$work/churn.err"; then
        echo ok >>"$work/churn.out"; holder=$([[ $holder == a ]] && echo b || echo a)
      fi
    done ) & busy_pids+=($!)
fi
cat >"$work/load.py" <<'PY'
import nbd, os, sys, time
h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(sys.argv[1]); end = time.time() + float(sys.argv[2]); buf = os.urandom(65536); i = 0
region = int(sys.argv[3]) << 20 if len(sys.argv) > 3 else 255 << 20
while time.time() < end:
    h.pwrite(buf, (i * 65536) % region); i += 1
print(i)
PY
in_ns c /usr/bin/python3 "$work/load.py" "$nbd_uri" "$busy" >"$work/load.out"
wait "$fio_pid" 2>/dev/null || true
for p in "${busy_pids[@]}"; do kill "$p" 2>/dev/null || true; done; busy_pids=()
# fio's synced writes: how many, and its fsync latency (median / p99 / max).
fsync_load=$(python3 - "$work/fsync.json" <<'PY'
import json, sys
try:
    j = json.load(open(sys.argv[1]))["jobs"][0]
    s = j["sync"]["lat_ns"]; p = s.get("percentile", {})
    ms = lambda ns: "%.1f" % (ns / 1e6)
    print("%d synced 4 KiB writes, fsync %s / %s / %s ms (median / p99 / max)" % (
        j["write"]["total_ios"], ms(p.get("50.000000", 0)), ms(p.get("99.000000", 0)), ms(s["max"])))
except Exception as e:
    print("fio: no figures (%s)" % e)
PY
)
false_events=$( { tail -n +"$((lines_a + 1))" "$work/a.log"; tail -n +"$((lines_b + 1))" "$work/b.log"; } | grep 'workload="web"' | grep -c '"event":"\(fenced\|promoted\|failover-started\|peer-lost\)"' || true)
switchovers=$(wc -l <"$work/churn.out")
((churn > 0)) && churn_note=", while a second workload was switched over $switchovers times (every ${churn} s)"
load_writes=$(cat "$work/load.out")
echo "busy ${busy}s: $load_writes 64 KiB writes, $fsync_load; fence/promote/failover events: $false_events" >&2
fi

# ---------- 3. resync after an outage ----------
if has 3; then
setup 50 250
# The primary crashes while it writes, so its activity log holds extents.
# (in its first 32 MiB: an application's hot region, 8 activity-log extents).
ip netns exec "$tag-c" /usr/bin/python3 "$work/load.py" "$nbd_uri" 3 32 >/dev/null 2>&1 &
loader=$!
sleep 1.5
crash a
wait "$loader" 2>/dev/null || true
wait_for 30 serves b
cat >"$work/outage.py" <<'PY'
import nbd, os, random, sys, time
h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(sys.argv[1]); mib = int(sys.argv[2]); secs = float(sys.argv[3])
random.seed(7); blocks = random.sample(range(255 * 16), mib * 16)  # 64 KiB blocks
start = time.time(); buf = os.urandom(65536)
for n, b in enumerate(blocks):
    h.pwrite(buf, b * 65536)
    left = start + secs * (n + 1) / len(blocks) - time.time()
    if left > 0: time.sleep(left)
h.flush(); print(len(blocks) * 65536)
PY
changed=$(in_ns c /usr/bin/python3 "$work/outage.py" "$nbd_uri" "$outage_mib" "$outage")
start_agent a 50 250
wait_for 120 is_replica a
sent=$(( $(on b --json replicate status vol | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_sent"])') ))
suspect=$(grep -o 'suspect_bytes=[0-9]*' "$work/a.log" | tail -1 | cut -d= -f2)
suspect=${suspect:-0}
on b volume verify vol >/dev/null
fi

# ---------- 4. switchover under load ----------
if has 4; then
setup 250 2000
holder=a; other=b
sw_down=(); sw_ver=()
for rep in $(seq "$switchover_reps"); do
  fio --name=load --ioengine=nbd --uri="nbd+unix:///vol?socket=$work/$holder/run/nbd.sock" --rw=randwrite \
      --bs=4k --rate=20m --iodepth=4 --size=256M --time_based --runtime=600 --output=/dev/null \
      >/dev/null 2>&1 &
  fio_pid=$!; busy_pids+=($fio_pid)
  sleep "$steady"
  r=$(on "$holder" --json cluster switchover web)
  kill "$fio_pid" 2>/dev/null || true; wait "$fio_pid" 2>/dev/null || true
  d=$(echo "$r" | python3 -c 'import json,sys; print(json.load(sys.stdin)["downtime_ms"])')
  vms=$(echo "$r" | python3 -c 'import json,sys; print(json.load(sys.stdin)["verified_ms"])')
  sw_down+=("$d"); sw_ver+=("$vms")
  echo "switchover rep $rep: $holder → $other: downtime $d ms (frozen → verified $vms ms)" >&2
  wait_for 30 serves "$other"
  wait_for 60 is_replica "$holder"
  t=$holder; holder=$other; other=$t
done
sw_down_med=$(printf '%s\n' "${sw_down[@]}" | median)
sw_ver_med=$(printf '%s\n' "${sw_ver[@]}" | median)
fi

# ---------- report ----------
fmt() { awk '{print $1}' "$work/$1.times" | median; }
fmta() { awk '{print $2}' "$work/$1.times" | median; }
echo "HA in network namespaces, $(nproc) cores, $(uname -r)"
echo
if has 1; then
d_vip=$(fmt defaults); d_app=$(fmta defaults); t_vip=$(fmt tuned); t_app=$(fmta tuned)
cat <<EOT
HA failover in network namespaces (kill -9 + veth down of the node serving the VIP), median of $reps, $(nproc) cores, $(uname -r)

| settings | crash → VIP answers (TCP from a third namespace) | crash → NBD read through the VIP | target | keepalived here (issue) |
|---|---|---|---|---|
| defaults (heartbeat 250 ms, failure timeout 2000 ms) | $d_vip s | $d_app s | ≤ 3 s | 3.29 s (advert 1 s) |
| tuned (heartbeat 50 ms, failure timeout 250 ms) | $t_vip s | $t_app s | ≤ 0.35 s | 0.374 s (VRRPv3 0.1 s) |

raw defaults (vip app): $(tr '\n' ';' <"$work/defaults.times")
raw tuned (vip app): $(tr '\n' ';' <"$work/tuned.times")

EOT
fi
if has 2 || has 3 || has 4; then
  echo "| check | result | target |"
  echo "|---|---|---|"
fi
has 2 && echo "| false failovers, tuned settings, ${busy} s with both cores busy ($load_writes × 64 KiB writes meanwhile) and fsync load on the data dirs' disk (fio: $fsync_load)${churn_note:-} | $false_events fence/promotion events | 0 |"
has 3 && echo "| resync after a ${outage} s outage of the primary, $outage_mib MiB written on the survivor | sent $sent B (b's link to a, new since the failover); changed $changed B + crashed primary's suspect blocks $suspect B | ≤ 1.2 × (changed + suspect) = $(( (changed + suspect) * 12 / 10 )) B |"
if has 4; then
  echo "| switchover under 20 MiB/s 4 KiB random writes (${steady} s steady), median of $switchover_reps | downtime $sw_down_med ms (freeze → peer serves), of which freeze → verified $sw_ver_med ms | ≤ 50 ms |"
  echo
  echo "raw switchover downtimes ms: ${sw_down[*]}; freeze → verified ms: ${sw_ver[*]}"
fi
