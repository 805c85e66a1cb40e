#!/bin/sh
# /init of the initramfs that scripts/rig/kernel-vm.sh builds (busybox sh, PID 1
# in the guest). Not meant to run on the host.
#
# Mounts the pseudo file systems, loads the modules listed in
# /etc/ferry-vm/modules ("RELPATH [PARAMS...]" per line, already in dependency
# order, relative to /lib/modules/VERSION), links each virtio disk as
# /dev/disk/by-id/virtio-SERIAL, then runs /test.sh and reports its status as
# "FERRY-VM: exit N" on the console before powering off. If this script ever
# ends, the kernel panics and (panic=-1, qemu -no-reboot) the VM stops.
export PATH=/usr/bin:/bin HOME=/root TMPDIR=/tmp FERRY_VM=1 FERRY_BIN=/bin/ferry
# No udev in the guest: libdevmapper makes the /dev/mapper nodes itself.
export DM_DISABLE_UDEV=1

/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/shm /dev/pts /dev/mapper /dev/disk/by-id
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/mounts /etc/mtab
ip link set lo up

finish() { # finish CODE: report, flush the disks, power off
    echo "FERRY-VM: exit $1"
    sync
    poweroff -f
}

load_modules() {
    kver=$(uname -r)
    while read -r path params; do
        [ -n "$path" ] || continue
        # shellcheck disable=SC2086 # params are split on purpose
        insmod "/lib/modules/$kver/$path" $params || {
            echo "FERRY-VM: insmod $path $params failed"
            return 1
        }
    done </etc/ferry-vm/modules
}

link_disks() {
    for serial in /sys/block/vd*/serial; do
        [ -e "$serial" ] || continue
        dev=${serial%/serial}
        ln -sf "../../${dev##*/}" "/dev/disk/by-id/virtio-$(cat "$serial")"
    done
}

load_modules || finish 125
# devtmpfs normally makes this node when dm-mod loads.
[ -e /dev/mapper/control ] || mknod /dev/mapper/control c 10 236
link_disks

echo "FERRY-VM: up $(uname -r) (uptime $(cut -d' ' -f1 /proc/uptime)s)"
cd /
sh /test.sh </dev/null
finish $?
