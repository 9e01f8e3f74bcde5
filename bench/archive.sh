#!/usr/bin/env bash
# Benchmark: the image archive on a random (incompressible) image, against the
# tools one would otherwise use, in the same run, reps interleaved:
#   1. `ferry archive create IMG --to STORE` (a fresh store each rep: every
#      chunk new, hashed, compressed, written, synced) vs
#      `zstd -T0 -3` of the image + `b3sum` of it + `sync` of the output, and
#      vs `qemu-img convert -c -O qcow2` + `sync`;
#   2. `ferry archive restore NAME --to OUT.raw` vs `qemu-img convert -O raw`
#      of that qcow2 + `sync`.
# Every time is wall time, the image in the page cache (one warm-up read),
# after a global `sync` (no step pays for the writeback of the one before);
# the two restores run in alternating order.
# Ratios: the peer's median / ferry's median (≥ 1: ferry is as fast or faster).
# Usage: bench/archive.sh [--size 1G] [--reps 3]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

size=1G
reps=3
while (($#)); do
  case "$1" in
    --size) size="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

scripts/install-deps
bench_ferry
have_b3=1
command -v b3sum >/dev/null || { have_b3=0; echo "b3sum missing: the zstd peer runs without it" >&2; }
work=$(mktemp -d /var/tmp/ferry-abench.XXXXXX)
trap 'rm -rf "$work"' EXIT
export FERRY_LOG=warn

img="$work/img.raw"
head -c "$(numfmt --from=iec "$size")" /dev/urandom >"$img"
cat "$img" >/dev/null

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$1" "$2"; }

declare -a t_ferry t_zstd t_qcow t_restore t_qraw
for ((r = 1; r <= reps; r++)); do
  rm -rf "$work/store" "$work"/out.* "$work"/r.*
  sync; a=$(now); "$ferry" archive create "$img" --to "$work/store" --name a >/dev/null 2>&1; b=$(now)
  t_ferry+=("$(elapsed "$a" "$b")")

  sync; a=$(now)
  zstd -T0 -3 -q -f -o "$work/out.zst" "$img"
  ((have_b3)) && b3sum "$img" >/dev/null
  sync "$work/out.zst"
  b=$(now)
  t_zstd+=("$(elapsed "$a" "$b")")

  sync; a=$(now); qemu-img convert -c -f raw -O qcow2 "$img" "$work/out.qcow2"; sync "$work/out.qcow2"; b=$(now)
  t_qcow+=("$(elapsed "$a" "$b")")

  ferry_restore() {
    sync; a=$(now); "$ferry" archive restore a --store "$work/store" --to "$work/r.raw" >/dev/null 2>&1; b=$(now)
    t_restore+=("$(elapsed "$a" "$b")")
    cmp "$img" "$work/r.raw"
  }
  qemu_restore() {
    sync; a=$(now); qemu-img convert -f qcow2 -O raw "$work/out.qcow2" "$work/r.q.raw"; sync "$work/r.q.raw"; b=$(now)
    t_qraw+=("$(elapsed "$a" "$b")")
  }
  if ((r % 2)); then ferry_restore; qemu_restore; else qemu_restore; ferry_restore; fi
  echo "rep $r: create ${t_ferry[-1]} s, zstd+b3sum ${t_zstd[-1]} s, qemu-img -c qcow2 ${t_qcow[-1]} s; restore ${t_restore[-1]} s, qemu-img → raw ${t_qraw[-1]} s"
done

mf=$(median "${t_ferry[@]}"); mz=$(median "${t_zstd[@]}"); mq=$(median "${t_qcow[@]}")
mr=$(median "${t_restore[@]}"); mqr=$(median "${t_qraw[@]}")
echo
echo "image $size random, $reps reps, medians (s):"
printf '  %-44s %8s\n' "ferry archive create" "$mf"
printf '  %-44s %8s   ratio %s (target >= 1.0)\n' "zstd -T0 -3 + b3sum$( ((have_b3)) || echo ' (no b3sum)') + sync" "$mz" "$(ratio "$mz" "$mf")"
printf '  %-44s %8s   ratio %s (target >= 2.0)\n' "qemu-img convert -c -O qcow2 + sync" "$mq" "$(ratio "$mq" "$mf")"
printf '  %-44s %8s\n' "ferry archive restore (raw)" "$mr"
printf '  %-44s %8s   ratio %s (target >= 1.0)\n' "qemu-img convert qcow2 -> raw + sync" "$mqr" "$(ratio "$mqr" "$mr")"
