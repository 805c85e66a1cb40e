#!/bin/sh
# Inside the real-kernel VM (scripts/rig/kernel-vm.sh): the kernel's own NBD
# client in front of ferry.
#   0. scripts/install.sh installs ferry on the VM's root (no systemd as PID
#      1: it says so); the rest uses the installed binary;
#   1. `ferry filter --nbd-device` attaches /dev/vda as /dev/nbd0 over netlink;
#   2. ext4 on /dev/nbd0, mounted, a workload writing files with fsync;
#   3. kill -9 of the filter mid-workload, a new filter reattaches
#      (NBD_CMD_RECONFIGURE): the workload sees no error, the kernel logs no
#      I/O error;
#   4. a clean stop while mounted leaves the device configured, and the next
#      filter reattaches;
#   5. every file reads back with its checksum after the caches are dropped,
#      e2fsck finds the file system clean, and a clean stop once unmounted
#      detaches the device;
#   6. scripts/uninstall.sh --purge removes what install.sh put there, twice.
# Needs: --disk data=SIZE (/dev/vda), --bin mkfs.ext4 --bin e2fsck, the
# repository's scripts/ at /src/scripts.
set -eu
# shellcheck source=scripts/rig/vm-tests/lib.sh # the guest has it at /test-lib.sh
. /test-lib.sh
state=/run/ferry/data
log=/tmp/filter.log

say() { echo "kernel-nbd: $*"; }
fail() {
    say "FAIL: $*"
    say "files written: $(files_written 2>&1); workload errors: $(cat /tmp/workload.err 2>/dev/null)"
    ps
    tail -n 40 "$log" 2>/dev/null || true
    dmesg | tail -n 40
    exit 1
}

start_filter() {
    "$ferry" filter --disk data=/dev/vda --nbd-device data=/dev/nbd0 --nbd-timeout 5 \
        --nbd-dead-timeout 120 --state "$state" >>"$log" 2>&1 &
    echo $! >/tmp/filter.pid
}
# The running filter (its pid in filter.json) has attached /dev/nbd0.
serving() {
    pid=$(cat /tmp/filter.pid)
    grep -q "\"pid\": $pid," "$state/filter.json" 2>/dev/null &&
        grep -q '"nbd_device": "/dev/nbd0"' "$state/filter.json"
}
backend() { cat /sys/block/nbd0/backend 2>/dev/null || true; }
files_written() { cat /tmp/written 2>/dev/null || echo 0; }
written_at_least() { [ "$(files_written)" -ge "$1" ]; }

workload() { # (re)writes 200 files in turn until /tmp/stop exists; any failure is recorded
    i=0
    mkdir -p /tmp/sums
    while [ ! -e /tmp/stop ]; do
        i=$((i + 1))
        f=f$((i % 200))
        if ! dd if=/dev/urandom of="/mnt/w/$f" bs=4k count=$((i % 16 + 1)) conv=fsync 2>/dev/null; then
            echo "write $i ($f) failed" >/tmp/workload.err
            return 1
        fi
        md5sum "/mnt/w/$f" >"/tmp/sums/$f"
        echo "$i" >/tmp/written
    done
}

say "install"
sh /src/scripts/install.sh --bin /bin/ferry >/tmp/install.out 2>&1 || { cat /tmp/install.out; fail "install.sh failed"; }
sh /src/scripts/install.sh --bin /bin/ferry >/tmp/install2.out 2>&1 || { cat /tmp/install2.out; fail "a second install.sh failed"; }
ferry=/usr/local/bin/ferry
"$ferry" --version >/dev/null || fail "the installed ferry does not run"
for f in /etc/systemd/system/ferry-filter.service /etc/modules-load.d/ferry.conf \
    /etc/modprobe.d/ferry.conf /etc/ferry/filter.toml /var/lib/ferry/.install-manifest; do
    [ -f "$f" ] || fail "install.sh did not install $f"
done
grep -q "^ExecStart=/usr/local/bin/ferry " /etc/systemd/system/ferry-filter.service || fail "ExecStart does not name the installed binary"
grep -q "systemd is not PID 1" /tmp/install.out || fail "install.sh did not say systemd is not running"

say "without the nbd module the filter says how to load it"
rmmod nbd
if "$ferry" filter --disk data=/dev/vda --nbd-device data=auto --state /run/ferry/nomod >/tmp/nomod.out 2>&1; then
    fail "the filter started without the nbd module"
fi
grep -q "modprobe nbd" /tmp/nomod.out || { cat /tmp/nomod.out; fail "no modprobe hint"; }
modprobe nbd nbds_max=4 || fail "modprobe nbd failed"
wait_for 10 test -b /dev/nbd0 || fail "no /dev/nbd0 after modprobe"

say "attach"
start_filter
wait_for 60 serving || fail "the filter did not attach /dev/nbd0"
grep -q "attached to the kernel's NBD client" "$log" || fail "no attach line in the log"
first_backend=$(backend)
case "$first_backend" in ferry:data:*) ;; *) fail "backend identifier is '$first_backend'" ;; esac
[ "$(cat /sys/block/nbd0/queue/logical_block_size)" = 512 ] || fail "logical block size is not the disk's"
[ "$(cat /sys/block/nbd0/size)" = "$(cat /sys/block/vda/size)" ] || fail "size differs from the disk's"

say "ext4 and a workload"
mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/nbd0
mkdir -p /mnt
mount -o noatime /dev/nbd0 /mnt
mkdir /mnt/w
workload &
workload_pid=$!
wait_for 120 written_at_least 20 || fail "the workload did not start"

say "kill -9 of the filter while the workload runs"
kill -9 "$(cat /tmp/filter.pid)"
before=$(files_written)
start_filter
wait_for 120 serving || fail "the restarted filter did not reattach"
grep -q "reattached to the kernel's NBD device" "$log" || fail "the new filter did not reconfigure the device"
[ "$(backend)" = "$first_backend" ] || fail "the backend identifier changed"
wait_for 120 written_at_least $((before + 20)) || fail "the workload did not go on after the reattach"

say "clean stop while mounted: the device stays for the next filter"
kill -TERM "$(cat /tmp/filter.pid)"
wait_for 60 sh -c "! kill -0 $(cat /tmp/filter.pid) 2>/dev/null" || fail "the filter did not stop"
grep -q "the NBD device is in use: left configured" "$log" || fail "a busy device was not left configured"
before=$(files_written)
start_filter
wait_for 120 serving || fail "the filter did not reattach after a clean stop"
wait_for 120 written_at_least $((before + 10)) || fail "the workload did not go on"

touch /tmp/stop
wait "$workload_pid" || true
[ ! -e /tmp/workload.err ] || fail "the workload saw an error: $(cat /tmp/workload.err)"
say "$(files_written) files written across two filter restarts"

say "verify"
sync
echo 3 >/proc/sys/vm/drop_caches
cat /tmp/sums/* | md5sum -c >/tmp/md5.out 2>&1 || { tail /tmp/md5.out; fail "a file does not read back"; }
if dmesg | grep -E "I/O error|EXT4-fs error|Buffer I/O" >/tmp/errors; then
    cat /tmp/errors
    fail "the kernel logged I/O errors"
fi
umount /mnt
e2fsck -fn /dev/nbd0 >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck found errors"; }

say "clean stop when unused detaches"
kill -TERM "$(cat /tmp/filter.pid)"
wait_for 60 sh -c "! kill -0 $(cat /tmp/filter.pid) 2>/dev/null" || fail "the filter did not stop"
grep -q "detached from the kernel's NBD client" "$log" || fail "no detach"
[ -z "$(backend)" ] || fail "the device still names a backend after the detach"
[ ! -e "$state/disks/data/kernel-nbd" ] || fail "the device record was left behind"

say "uninstall"
sh /src/scripts/uninstall.sh --purge >/tmp/uninstall.out 2>&1 || { cat /tmp/uninstall.out; fail "uninstall.sh failed"; }
sh /src/scripts/uninstall.sh --purge >/tmp/uninstall2.out 2>&1 || { cat /tmp/uninstall2.out; fail "a second uninstall.sh failed"; }
for f in /usr/local/bin/ferry /etc/systemd/system/ferry-filter.service /etc/modules-load.d/ferry.conf /etc/ferry; do
    [ ! -e "$f" ] || fail "uninstall.sh left $f"
done
say "ok"
