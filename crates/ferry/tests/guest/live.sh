# Guest program for live VM moves (busybox sh; scripts/build-guest).
#
# In the background, the records of records.sh, with the same console lines
# (common::records::guest_console parses them): record i lives in 512-byte
# sector i of /dev/vda as "FERRYREC <i> <md5 of i>"; first every record
# already on the disk is verified ("VERIFIED n", or "CORRUPT i: ..."), then new
# ones are appended, each written with fsync, "WROTE i" after each.
#
# In the foreground, every ~10 ms (read -t on a FIFO nobody writes: no fork
# in the loop), one line on the serial console:
#   TICK <seq> <guest uptime s, /proc/uptime> <boot_id> <pid of this shell>
# A live move shows one boot_id and one pid throughout, and seq without a
# hole; the pause is measured from outside (the guest's clock stands still
# while the VM is paused under TCG, so the uptimes do not show it).
#
# With `ferry.busy=1` on the kernel command line, a busy writer also rewrites
# a file of `ferry.busy_mib=N` MiB (default 64) of random data on the
# initramfs' tmpfs in place, in a loop, so RAM pre-copy sees a high dirty
# rate of pages that are not zero (QEMU sends zero pages almost for free).
mkdir -p /run/live

records() {
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
}

busy() {
  f=/run/live/busy
  dd if=/dev/urandom of=$f bs=1M count=$1 2>/dev/null
  echo "BUSY $1 MiB"
  # Each 1 MiB block is read and written back in place: every page of the
  # file is dirtied again on each pass, with the same (random) contents.
  while true; do
    dd if=$f of=$f bs=1M count=$1 conv=notrunc 2>/dev/null
  done
}

read cmdline </proc/cmdline
busy_mib=64
for arg in $cmdline; do
  case $arg in
    ferry.busy_mib=*) busy_mib=${arg#ferry.busy_mib=} ;;
  esac
done
case " $cmdline " in
  *" ferry.busy=1 "*) busy $busy_mib & ;;
esac

records &

read boot_id </proc/sys/kernel/random/boot_id
mkfifo /run/live/never
exec 3<>/run/live/never
seq=0
while true; do
  read up idle </proc/uptime
  echo "TICK $seq $up $boot_id $$"
  seq=$((seq + 1))
  read -t 0.01 -u 3 _
done
