# Guest program (busybox sh): record i lives in 512-byte sector i as
# "FERRYREC <i> <md5 of i>". First verify every record already on the disk,
# in order, and say how many; then append new ones, each written with fsync
# (so "WROTE i" on the console means the disk acknowledged it), until the VM
# is stopped.
n=0
while true; do
  set -- $(dd if=/dev/vda bs=512 skip=$n count=1 2>/dev/null | tr -d '\000' | head -n 1)
  [ "$1" = "FERRYREC" ] || break
  want=$(echo $n | md5sum | cut -c1-32)
  if [ "$2" != "$n" ] || [ "$3" != "$want" ]; then
    echo "CORRUPT $n: $*"
    exit 1
  fi
  n=$((n + 1))
done
echo "VERIFIED $n"
i=$n
while [ $i -lt 100000 ]; do
  printf 'FERRYREC %d %s\n' $i $(echo $i | md5sum | cut -c1-32) |
    dd of=/dev/vda bs=512 seek=$i count=1 conv=notrunc,sync,fsync 2>/dev/null || { echo "WRITEFAIL $i"; exit 1; }
  echo "WROTE $i"
  i=$((i + 1))
done
