#!/bin/sh
# Smoke test for scripts/rig/kernel-vm.sh, run inside the guest: the kernel
# modules are loaded, and dmsetup, mkfs.ext4, e2fsck and ferry work there.
#
#   scripts/rig/kernel-vm.sh run --script scripts/rig/vm-tests/smoke.sh --disk data=256M \
#       --bin mkfs.ext4 --bin e2fsck --bin dmsetup
#
# Leaves a clean ext4 file system on the data disk holding /smoke (4 MiB) and
# /smoke.md5, so the host can check OUT/data.img after the run.
set -eu
fail() { echo "smoke: $*"; exit 1; }
echo "smoke: start"

for m in nbd dm_mod dm_log_writes dm_era dm_flakey ext4 virtio_blk; do
    [ -d "/sys/module/$m" ] || fail "module $m not loaded"
done
[ "$(cat /sys/module/nbd/parameters/nbds_max)" = 4 ] || fail "nbds_max is not 4"
[ -b /dev/nbd3 ] || fail "no /dev/nbd3"
[ ! -e /dev/nbd4 ] || fail "/dev/nbd4 exists (nbds_max=4 ignored?)"
[ -c /dev/mapper/control ] || fail "no /dev/mapper/control"
touch /dev/shm/probe || fail "/dev/shm not writable"

targets=$(dmsetup targets)
for t in linear log-writes era flakey; do
    echo "$targets" | grep -q "^$t " || fail "dm target $t missing: $targets"
done

disk=$(readlink -f /dev/disk/by-id/virtio-data)
[ "$disk" = /dev/vda ] || fail "virtio-data is $disk, not /dev/vda"
sectors=$(blockdev --getsz "$disk")
dmsetup create smoke --table "0 $sectors linear $disk 0"
[ -b /dev/mapper/smoke ] || fail "no /dev/mapper/smoke"

mkfs.ext4 -q /dev/mapper/smoke
mkdir -p /mnt
mount /dev/mapper/smoke /mnt
dd if=/dev/urandom of=/mnt/smoke bs=1M count=4 2>/dev/null
sync
(cd /mnt && md5sum smoke >smoke.md5)
umount /mnt

e2fsck -fn /dev/mapper/smoke >/dev/null 2>&1 || fail "e2fsck found errors"
mount -o ro /dev/mapper/smoke /mnt
(cd /mnt && md5sum -c smoke.md5)
umount /mnt
dmsetup remove smoke

ferry --version
echo "smoke: ok"
