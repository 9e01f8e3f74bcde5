#!/usr/bin/env bash
# Benchmark: ferry's NBD export vs nbdkit's file plugin, same image, same machine,
# same run. fio (nbd ioengine) 4k randwrite QD16, 4k randread QD16 and 1 MiB
# sequential write QD16; each test is repeated (servers alternating) and the
# median is reported with the ferry/nbdkit ratio.
# Transport (both servers alike): a Unix socket (default: ferry's default
# listener), or --tls: TCP on 127.0.0.1 with TLS and client certificates
# (ferry's own NBD CA; nbdkit gets a server certificate signed by it).
#
# Usage: bench/nbd.sh [--runtime SECONDS] [--reps N] [--size 1G] [--sparse] [--tls]
# Output: a markdown table on stdout (also saved under bench/out/).
set -euo pipefail
cd "$(dirname "$0")/.."

runtime=10
reps=3
size=1G
fill=yes
tls=no
while (($#)); do
  case "$1" in
    --runtime) runtime="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --size) size="$2"; shift 2 ;;
    --sparse) fill=no; shift ;;
    --tls) tls=yes; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

scripts/install-deps
cargo build --release --quiet -p ferry
ferry="$PWD/target/release/ferry"

work=$(mktemp -d /var/tmp/ferry-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

export FERRY_DATA_DIR="$work/data" FERRY_LOG=warn
"$ferry" volume create bench --size "${size}iB" >/dev/null
image="$FERRY_DATA_DIR/volumes/bench/data.raw"
# Fill the image once, so both servers read and overwrite allocated data
# (--sparse: leave it a hole; writes then allocate and reads see holes).
if [[ $fill == yes ]]; then
  fio --name=fill --filename="$image" --rw=write --bs=1M --size="$size" --ioengine=psync \
      --end_fsync=1 --output=/dev/null
fi
sync

certs="$work/client"   # the client's certificates (--tls)
fio_as=()
if [[ $tls == yes ]]; then
  "$ferry" nbd client-cert bench --out "$certs" >/dev/null
  # nbdkit's server certificate, signed by the same CA (GnuTLS layout).
  mkdir -p "$work/nbdkit-tls"
  cp "$certs/ca-cert.pem" "$work/nbdkit-tls/"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$work/nbdkit-tls/server-key.pem" -subj /CN=127.0.0.1 -out "$work/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$work/ext.cnf"
  openssl x509 -req -in "$work/server.csr" -CA "$FERRY_DATA_DIR/tls/nbd-ca.crt" \
    -CAkey "$FERRY_DATA_DIR/tls/nbd-ca.key" -CAcreateserial -days 2 -extfile "$work/ext.cnf" \
    -out "$work/nbdkit-tls/server-cert.pem" 2>/dev/null
  # fio's nbd engine refuses tls-certificates= in a URI (a local file), so it
  # runs as uid 65534 with the certificates in libnbd's default directory
  # for non-root users, $HOME/.pki/libnbd.
  mkdir -p "$work/fio-home/.pki/libnbd"
  cp "$certs"/*.pem "$work/fio-home/.pki/libnbd/"
  chown -R 65534:65534 "$work/fio-home"
  chmod 711 "$work"
  fio_as=(setpriv --reuid=65534 --regid=65534 --clear-groups env HOME="$work/fio-home")
fi

start_ferry() {
  local listen=()
  [[ $tls == yes ]] && listen=(--listen 127.0.0.1:0)
  "$ferry" --json export bench "${listen[@]}" >"$work/ferry.out" &
  pids+=($!)
  for _ in $(seq 100); do [[ -s "$work/ferry.out" ]] && break; sleep 0.05; done
  uri=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["uris"][0])' "$work/ferry.out")
}
start_nbdkit() {
  local port
  if [[ $tls == yes ]]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    nbdkit --exit-with-parent -f -i 127.0.0.1 -p "$port" --tls=require \
      --tls-certificates="$work/nbdkit-tls" --tls-verify-peer file "$image" &
    uri="nbds://127.0.0.1:$port/"
  else
    rm -f "$work/nbdkit.sock"
    nbdkit --exit-with-parent -f -U "$work/nbdkit.sock" file "$image" &
    uri="nbd+unix:///?socket=$work/nbdkit.sock"
  fi
  pids+=($!)
  local check=$uri
  [[ $tls == yes ]] && check="$uri?tls-certificates=$certs"
  for _ in $(seq 100); do nbdinfo --size "$check" >/dev/null 2>&1 && break; sleep 0.05; done
}
stop_server() {
  local p="${pids[-1]}"
  kill "$p"; wait "$p" 2>/dev/null || true
  unset 'pids[-1]'
}

# run_fio URI RW BS -> prints "iops bw_bytes p99_us"
run_fio() {
  "${fio_as[@]}" fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth=16 --size="$size" \
      --time_based --runtime="$runtime" --ramp_time=1 --randrepeat=0 --output-format=json \
      >"$work/fio.json"
  python3 - "$work/fio.json" "$2" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]  # fio may print notes before the JSON
side = "read" if "read" in sys.argv[2] else "write"
s = j[side]
p99 = s["clat_ns"]["percentile"].get("99.000000", 0) / 1000
print(f'{s["iops"]:.0f} {s["bw_bytes"]} {p99:.0f}')
PY
}

tests=("randwrite 4k" "randread 4k" "write 1M")
declare -A results
for rep in $(seq "$reps"); do
  for server in ferry nbdkit; do
    "start_$server"
    for t in "${tests[@]}"; do
      read -r rw bs <<<"$t"
      # Sparse mode: every run starts from an all-hole image, so neither server
      # benefits from blocks the other one allocated.
      if [[ $fill == no ]]; then fallocate --punch-hole --offset 0 --length "$(stat -c %s "$image")" "$image"; fi
      sync
      results["$server|$t|$rep"]=$(run_fio "$uri" "$rw" "$bs")
      echo "rep $rep $server $t: ${results["$server|$t|$rep"]}" >&2
    done
    stop_server
  done
done

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mkdir -p bench/out
out="bench/out/nbd-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "fio nbd engine, QD16, ${size} image ($([[ $fill == yes ]] && echo filled || echo sparse)), $([[ $tls == yes ]] && echo "TCP 127.0.0.1 + TLS with client certificates" || echo "Unix socket"), ${runtime}s per run, median of ${reps} runs, $(nproc) cores, $(uname -r)"
  echo
  echo "| test | ferry | nbdkit file | ratio ferry/nbdkit | p99 ferry | p99 nbdkit |"
  echo "|---|---|---|---|---|---|"
  for t in "${tests[@]}"; do
    read -r rw bs <<<"$t"
    for server in ferry nbdkit; do
      vals=()
      for rep in $(seq "$reps"); do vals+=("${results["$server|$t|$rep"]}"); done
      iops=$(printf '%s\n' "${vals[@]}" | awk '{print $1}' | median)
      bw=$(printf '%s\n' "${vals[@]}" | awk '{print $2}' | median)
      p99=$(printf '%s\n' "${vals[@]}" | awk '{print $3}' | median)
      declare "${server}_iops=$iops" "${server}_bw=$bw" "${server}_p99=$p99"
    done
    if [[ "$bs" == "1M" ]]; then
      f=$(awk -v b="$ferry_bw" 'BEGIN{printf "%.2f GB/s", b/1e9}')
      n=$(awk -v b="$nbdkit_bw" 'BEGIN{printf "%.2f GB/s", b/1e9}')
      ratio=$(awk -v a="$ferry_bw" -v b="$nbdkit_bw" 'BEGIN{printf "%.2f×", a/b}')
    else
      f=$(awk -v i="$ferry_iops" 'BEGIN{printf "%.1fk IOPS", i/1000}')
      n=$(awk -v i="$nbdkit_iops" 'BEGIN{printf "%.1fk IOPS", i/1000}')
      ratio=$(awk -v a="$ferry_iops" -v b="$nbdkit_iops" 'BEGIN{printf "%.2f×", a/b}')
    fi
    echo "| $rw $bs | $f | $n | $ratio | ${ferry_p99} µs | ${nbdkit_p99} µs |"
  done
} | tee "$out"
