# Shared by the bench scripts (source it after `cd` to the repository root).

# $ferry: FERRY_BIN if set, else this tree's release build (built now).
bench_ferry() {
  if [[ -n ${FERRY_BIN:-} ]]; then
    ferry=$(realpath "$FERRY_BIN")
  else
    cargo build --release --quiet -p ferry
    ferry="${CARGO_TARGET_DIR:-$PWD/target}/release/ferry"
  fi
}

# A free TCP / UDP port on 127.0.0.1.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
udp_port() { python3 -c 'import socket; s=socket.socket(type=socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
