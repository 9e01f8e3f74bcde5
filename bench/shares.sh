#!/usr/bin/env bash
# Benchmark: shares (file-level replication) between two agents on 127.0.0.1,
# with the peers measured in the same run.
#   1. initial sync of a tree of 100k x 4 KiB files + 4 x 256 MiB files
#      (an async share created on the existing directory, until `share wait`
#      says up to date — the replica's syncfs included) vs an rsync daemon
#      (`rsync -a --whole-file` over loopback, without and with a final sync);
#   2. change-to-replica latency of an async share, p50/p99: one change a
#      second, and markers while 1,000 files a second change; the same for
#      lsyncd (default.rsync, delay = 0) in the same run;
#   3. a sync share's FUSE mount (replicating to the other agent) vs bindfs
#      (another FUSE passthrough) vs the bare filesystem: fio sequential 1 MiB
#      writes and 4 KiB writes with an fsync each (end_fsync=1), pgbench TPS,
#      and sequential 1 MiB reads of a read-only (0444) 1 GiB file, page cache
#      warm (a sync share passes such reads through to the backing file);
#   4. 100,000 files in one directory: an async share's initial sync of it,
#      and the same directory made through a sync share's FUSE mount, listed
#      (`ls -f`, `find`) through the mount; both replicas compared (diff -r).
# Usage: bench/shares.sh [--parts 1,2,3,4] [--reps 3] [--small N] [--big-mib M]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

parts=1,2,3,4
reps=3
small=100000
big_mib=256
while (($#)); do
  case "$1" in
    --parts) parts="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --small) small="$2"; shift 2 ;;
    --big-mib) big_mib="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
has() { [[ ",$parts," == *",$1,"* ]]; }

scripts/install-deps
for p in bindfs lsyncd; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
    || { apt-get update -qq && apt-get install -y -qq "$p"; }
done
cargo build --release --quiet -p ferry
ferry="$PWD/target/release/ferry"
work=$(mktemp -d /var/tmp/ferry-sbench.XXXXXX)
chmod 755 "$work"
pids=()
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
export FERRY_LOG=warn

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }

declare -A API PID DIR
start_agent() { # name [data dir]
  local n=$1 api repl
  DIR[$n]=${2:-$work/$n}
  api=$(port); repl=$(port)
  mkdir -p "${DIR[$n]}"
  cat >"$work/$n.toml" <<EOT
node_name = "$n"
data_dir = "${DIR[$n]}"
api_listen = "127.0.0.1:$api"
replication_listen = "127.0.0.1:$repl"
EOT
  : >"$work/$n.out"
  "$ferry" agent --config "$work/$n.toml" >"$work/$n.out" 2>"$work/$n.log" &
  PID[$n]=$!; pids+=($!)
  for _ in $(seq 100); do [[ -s "$work/$n.out" ]] && break; sleep 0.05; done
  API[$n]="127.0.0.1:$api"
}
on() { local n=$1; shift; FERRY_API="${API[$n]}" FERRY_DATA_DIR="${DIR[$n]}" "$ferry" "$@"; }
pair() { # [suffix]: fresh data dirs (ext4 avoids recently freed inodes:
  # deleting 100k files between runs would slow the next run's creates)
  local sfx=${1:-}
  for n in a b; do rm -rf "${work:?}/$n$sfx"; done
  start_agent a "$work/a$sfx"; start_agent b "$work/b$sfx"
  cp "${DIR[b]}/api.token" "$work/b.token"
  on a node add b --api "${API[b]}" --token-file "$work/b.token" --fingerprint "$(on b node id)" >/dev/null
}
stop_agents() {
  kill "${PID[a]}" "${PID[b]}" 2>/dev/null || true
  wait "${PID[a]}" "${PID[b]}" 2>/dev/null || true
  pids=()
}

# ---------- 1. initial sync ----------
if has 1; then
  echo "preparing $small x 4 KiB + 4 x $big_mib MiB files" >&2
  python3 - "$work/src" "$small" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, "d%03d" % (i // 1000))
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%06d" % i), "wb") as f:
        f.write(os.urandom(4096))
EOF
  for i in 1 2 3 4; do head -c $((big_mib << 20)) /dev/urandom >"$work/src/big$i"; done
  sync
  total=$(du -sb "$work/src" | cut -f1)
  mkdir -p "$work/rsyncd"
  rport=$(port)
  cat >"$work/rsyncd.conf" <<EOT
use chroot = no
uid = root
gid = root
[dst]
path = $work/rsyncd
read only = no
EOT
  rsync --daemon --no-detach --address=127.0.0.1 --port="$rport" --config="$work/rsyncd.conf" & rs=$!
  sleep 0.3
  # Interleaved, and nothing deleted until the end (see pair).
  ferry_t=(); rsync_t=(); rsync_sync_t=()
  for rep in $(seq "$reps"); do
    pair "-$rep"
    sync
    t0=$(now)
    on a share create tree --path "$work/src" --mode async --to b >/dev/null
    on a share wait tree --timeout 900s >/dev/null
    t1=$(now)
    ferry_t+=("$(echo "$t1 - $t0" | bc)")
    diff -rq "$work/src" "${DIR[b]}/shares/tree/data" >/dev/null || { echo "replica differs!" >&2; exit 1; }
    echo "rep $rep: ferry initial sync ${ferry_t[-1]} s" >&2
    stop_agents
    mkdir -p "$work/rsyncd/$rep"; sync
    t0=$(now); rsync -a --whole-file "$work/src" "rsync://127.0.0.1:$rport/dst/$rep/"; t1=$(now); sync; t2=$(now)
    rsync_t+=("$(echo "$t1 - $t0" | bc)"); rsync_sync_t+=("$(echo "$t2 - $t0" | bc)")
    echo "rep $rep: rsync daemon ${rsync_t[-1]} s (${rsync_sync_t[-1]} s with sync)" >&2
  done
  kill $rs 2>/dev/null || true; wait $rs 2>/dev/null || true
  f=$(printf '%s\n' "${ferry_t[@]}" | median)
  r=$(printf '%s\n' "${rsync_t[@]}" | median)
  rs_=$(printf '%s\n' "${rsync_sync_t[@]}" | median)
  echo "== initial sync of $small x 4 KiB + 4 x $big_mib MiB ($((total >> 20)) MiB), median of $reps"
  echo "ferry async share (incl. replica syncfs): $f s"
  echo "rsync daemon -a --whole-file:            $r s  (ferry speed ratio $(ratio "$r" "$f")x)"
  echo "rsync daemon + sync:                     $rs_ s  (ferry speed ratio $(ratio "$rs_" "$f")x)"
  rm -rf "$work/src" "$work/rsyncd" "$work"/a-* "$work"/b-*
fi

# ---------- 2. async change-to-replica latency ----------
# latency.py SRC DST RATE_BG SECONDS: one marker a second (or ten a second
# under background load), each timed from its write until the replica has it.
cat >"$work/latency.py" <<'EOF'
import os, sys, time, threading
src, dst, bg, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
stop = False
def background():
    os.makedirs(os.path.join(src, "bg"), exist_ok=True)
    i = 0
    t0 = time.time()
    while not stop:
        with open(os.path.join(src, "bg", "f%d" % (i % 5000)), "w") as f:
            f.write("x" * 100 + str(i))
        i += 1
        ahead = i / bg - (time.time() - t0)
        if ahead > 0:
            time.sleep(ahead)
if bg:
    threading.Thread(target=background, daemon=True).start()
    time.sleep(1)
lat = []
end = time.time() + secs
n = 0
period = 1.0 if not bg else 0.1
while time.time() < end:
    name = "m%d" % n
    body = ("marker %d" % n).encode()
    t0 = time.time()
    with open(os.path.join(src, name), "wb") as f:
        f.write(body)
    while True:
        try:
            with open(os.path.join(dst, name), "rb") as f:
                if f.read() == body:
                    break
        except OSError:
            pass
        if time.time() - t0 > 30:
            break
        time.sleep(0.0005)
    lat.append((time.time() - t0) * 1000)
    n += 1
    time.sleep(max(0, period - (time.time() - t0)))
stop = True
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))]
print("%.1f %.1f %d" % (p(0.5), p(0.99), len(lat)))
EOF
if has 2; then
  secs=30
  declare -A LAT
  for load in 0 1000; do
    pair
    mkdir -p "$work/asrc"
    on a share create lat --path "$work/asrc" --mode async --to b >/dev/null
    on a share wait lat --timeout 60s >/dev/null
    LAT[ferry-$load]=$(python3 "$work/latency.py" "$work/asrc" "${DIR[b]}/shares/lat/data" "$load" "$secs")
    echo "ferry async, background $load files/s: p50 p99 n = ${LAT[ferry-$load]}" >&2
    stop_agents
    rm -rf "$work/asrc"
    mkdir -p "$work/lsrc" "$work/ldst"
    cat >"$work/lsyncd.conf" <<EOT
settings { nodaemon = true, logfile = "$work/lsyncd.log", statusFile = "$work/lsyncd.status" }
sync { default.rsync, source = "$work/lsrc", target = "$work/ldst", delay = 0 }
EOT
    lsyncd "$work/lsyncd.conf" >/dev/null 2>&1 & ls_pid=$!; pids+=($ls_pid)
    sleep 2
    LAT[lsyncd-$load]=$(python3 "$work/latency.py" "$work/lsrc" "$work/ldst" "$load" "$secs")
    echo "lsyncd delay=0, background $load files/s: p50 p99 n = ${LAT[lsyncd-$load]}" >&2
    kill $ls_pid 2>/dev/null || true; wait $ls_pid 2>/dev/null || true; pids=()
    rm -rf "$work/lsrc" "$work/ldst"
  done
  echo "== async change-to-replica latency, ms (p50 p99 samples), ${secs} s each"
  for k in ferry-0 lsyncd-0 ferry-1000 lsyncd-1000; do echo "$k: ${LAT[$k]}"; done
fi

# ---------- 3. FUSE mount vs bindfs vs bare ----------
fio_job() { # dir name -> "MiB/s iops"
  local dir=$1 name=$2 out
  case "$name" in
    seq) out=$(fio --name=seq --directory="$dir" --rw=write --bs=1M --size=1G --end_fsync=1 \
                 --ioengine=psync --output-format=json 2>/dev/null) ;;
    fsync) out=$(fio --name=fsync --directory="$dir" --rw=write --bs=4k --size=64M --fsync=1 \
                 --runtime=10 --time_based=0 --end_fsync=1 --ioengine=psync --output-format=json 2>/dev/null) ;;
  esac
  rm -f "$dir"/seq.* "$dir"/fsync.*
  echo "$out" | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["write"]; print("%.1f %.0f" % (j["bw_bytes"]/1048576, j["iops"]))'
}
pg_tps() { # dir -> tps
  local dir=$1 bin pgport
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort | tail -1)
  pgport=$(port)
  mkdir -p "$dir/pg"; chown postgres:postgres "$dir/pg"
  [[ -e "$work/pg.log" ]] || { : >"$work/pg.log"; chmod 666 "$work/pg.log"; }
  runuser -u postgres -- "$bin/initdb" -N -A trust -D "$dir/pg/data" >/dev/null
  runuser -u postgres -- "$bin/pg_ctl" -D "$dir/pg/data" -l "$work/pg.log" -w \
    -o "-p $pgport -k /tmp -c shared_buffers=64MB" start >/dev/null
  pgbench -i -s 5 -q -h /tmp -p "$pgport" -U postgres postgres >/dev/null 2>&1
  local tps
  tps=$(pgbench -c 4 -j 2 -T 15 -n -h /tmp -p "$pgport" -U postgres postgres 2>/dev/null \
        | awk '/^tps/ {print $3; exit}')
  runuser -u postgres -- "$bin/pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null
  rm -rf "$dir/pg"
  echo "$tps"
}
if has 3; then
  declare -A R
  mkdir -p "$work/bare" "$work/bindsrc" "$work/bindmnt" "$work/mnt"
  pair
  on a share create fs --path "$work/mnt" --mode sync --to b >/dev/null
  on a share wait fs --timeout 60s >/dev/null
  mounts+=("$work/mnt")
  bindfs -o allow_other "$work/bindsrc" "$work/bindmnt"; mounts+=("$work/bindmnt")
  for rep in $(seq "$reps"); do
    for t in bare bindmnt mnt; do
      for job in seq fsync; do
        R[$t-$job-$rep]=$(fio_job "$work/$t" "$job")
      done
      echo "rep $rep $t: seq ${R[$t-seq-$rep]} fsync ${R[$t-fsync-$rep]}" >&2
    done
  done
  for t in bare bindmnt mnt; do
    R[$t-pg]=$(pg_tps "$work/$t")
    echo "$t: pgbench ${R[$t-pg]} tps" >&2
  done
  for t in bare bindmnt mnt; do
    dd if=/dev/urandom of="$work/$t/ro" bs=1M count=1024 status=none
    chmod 444 "$work/$t/ro"
    cat "$work/$t/ro" >/dev/null
    for rep in $(seq "$reps"); do
      R[$t-read-$rep]=$(fio --name=read --filename="$work/$t/ro" --rw=read --bs=1M --readonly \
        --ioengine=psync --output-format=json 2>/dev/null \
        | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["read"]; print("%.1f" % (j["bw_bytes"]/1048576))')
      echo "rep $rep $t: read-only file read ${R[$t-read-$rep]} MiB/s" >&2
    done
    rm -f "$work/$t/ro"
  done
  med() { local t=$1 job=$2 col=$3; for rep in $(seq "$reps"); do echo "${R[$t-$job-$rep]}" | cut -d' ' -f"$col"; done | median; }
  echo "== FUSE: ferry sync share (replicating to b) vs bindfs vs bare, median of $reps"
  printf "%-8s %14s %16s %12s %16s\n" target "seq MiB/s" "4k+fsync IOPS" "pgbench tps" "ro read MiB/s"
  for t in bare bindmnt mnt; do
    printf "%-8s %14s %16s %12s %16s\n" "$t" "$(med $t seq 1)" "$(med $t fsync 2)" "${R[$t-pg]}" "$(med $t read 1)"
  done
  echo "read-only file reads: ferry/bare $(ratio "$(med mnt read 1)" "$(med bare read 1)"), ferry/bindfs $(ratio "$(med mnt read 1)" "$(med bindmnt read 1)")"
  echo "ratios ferry/bare: seq $(ratio "$(med mnt seq 1)" "$(med bare seq 1)"), fsync $(ratio "$(med mnt fsync 2)" "$(med bare fsync 2)"), pgbench $(ratio "${R[mnt-pg]}" "${R[bare-pg]}")"
  echo "ratios ferry/bindfs: seq $(ratio "$(med mnt seq 1)" "$(med bindmnt seq 1)"), fsync $(ratio "$(med mnt fsync 2)" "$(med bindmnt fsync 2)"), pgbench $(ratio "${R[mnt-pg]}" "${R[bindmnt-pg]}")"
  stop_agents
fi

# ---------- 4. 100,000 files in one directory ----------
make_flat() { # dir n: n small files in one directory
  python3 - "$1" "$2" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
os.makedirs(d)
for i in range(n):
    with open(os.path.join(d, "file-%06d" % i), "wb") as f:
        f.write(b"%d\n" % i)
EOF
}
if has 4; then
  nfiles=100000 # (not n: pair() loops with a global n)
  echo "preparing $nfiles files in one directory" >&2
  make_flat "$work/flat/one" "$nfiles"
  sync
  pair "-flat"
  t0=$(now)
  on a share create flat --path "$work/flat" --mode async --to b >/dev/null
  on a share wait flat --timeout 900s >/dev/null
  t1=$(now)
  diff -rq "$work/flat" "${DIR[b]}/shares/flat/data" >/dev/null || { echo "async replica differs!" >&2; exit 1; }
  async_flat=$(echo "$t1 - $t0" | bc)
  mkdir -p "$work/mnt4"
  on a share create many --path "$work/mnt4" --mode sync --to b >/dev/null
  on a share wait many --timeout 60s >/dev/null
  mounts+=("$work/mnt4")
  t0=$(now); make_flat "$work/mnt4/one" "$nfiles"; t1=$(now)
  listed=$(ls -f "$work/mnt4/one" | wc -l); t2=$(now)
  found=$(find "$work/mnt4/one" -type f | wc -l); t3=$(now)
  [[ $listed == $((nfiles + 2)) && $found == "$nfiles" ]] || { echo "listed $listed, found $found of $nfiles" >&2; exit 1; }
  diff -rq "$work/mnt4" "${DIR[b]}/shares/many/data" >/dev/null || { echo "sync replica differs!" >&2; exit 1; }
  echo "== 100,000 files in one directory"
  echo "async share initial sync: $async_flat s (replica equal)"
  echo "sync share (FUSE, replicating): created in $(echo "$t1 - $t0" | bc) s, ls -f $(echo "$t2 - $t1" | bc) s, find $(echo "$t3 - $t2" | bc) s (replica equal)"
  stop_agents
fi
