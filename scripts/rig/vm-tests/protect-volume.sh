#!/bin/sh
# Inside the real-kernel VM (scripts/rig/kernel-vm.sh): `ferry protect-volume`
# slides the interceptor under a mounted dm volume and `ferry
# unprotect-volume` takes it back out, while a workload writes and a sidecar
# replicates to a target in the same VM.
#
# The stack: vol (dm-linear, mounted ext4) -> lw (dm-log-writes over /dev/vda,
# its log on /dev/vdb: every write that reaches the disk, in completion order,
# an independent record) -> /dev/vda. Once protected: vol -> /dev/nbdN ->
# ferry filter -> ferry-base-vol (vol's old table) -> lw -> /dev/vda.
#
# The host checks afterwards (tests/tests/kernel_vm.rs): every recovery point
# on the site disk equals the disk as it was at some instant of the
# dm-log-writes record, in order; the last one equals it at the mark
# "before-unprotect"; the log replays to the final disk.
# Needs: --disk data=64M --disk log=256M --disk site=512M, --bin mkfs.ext4
# --bin e2fsck --bin dmsetup.
set -eu
# shellcheck source=scripts/rig/vm-tests/lib.sh # the guest has it at /test-lib.sh
. /test-lib.sh
state=/run/ferry/vol
say() { echo "protect-volume: $*"; }
fail() {
    say "FAIL: $*"
    for f in /tmp/pv.log /tmp/sidecar.log /tmp/target.log; do
        echo "--- $f"; tail -n 30 "$f" 2>/dev/null || true
    done
    dmesg | tail -n 30
    exit 1
}
write_files() { # write_files PREFIX COUNT
    i=0
    while [ "$i" -lt "$2" ]; do
        i=$((i + 1))
        dd if=/dev/urandom of="/mnt/$1$i" bs=4k count=$((i % 8 + 1)) conv=fsync 2>/dev/null ||
            { echo "write of $1$i failed" >>/tmp/workload.err; return 1; }
        md5sum "/mnt/$1$i" >>/tmp/sums
    done
}
# A writer running in the background until /tmp/stop-NAME exists.
start_writer() { # start_writer NAME
    rm -f "/tmp/stop-$1"
    (
        n=0 # not i: write_files uses i (sh has no local variables)
        while [ ! -e "/tmp/stop-$1" ]; do
            n=$((n + 1))
            write_files "$1-$n-" 1 || exit 1
            echo "$n" >"/tmp/count-$1"
        done
    ) &
    echo $! >"/tmp/writer-$1.pid"
}
count_of() { cat "/tmp/count-$1" 2>/dev/null || echo 0; }
writer_at_least() { [ "$(count_of "$1")" -ge "$2" ]; }
stop_writer() { # stop_writer NAME: stop it and fail if it saw an error
    touch "/tmp/stop-$1"
    wait "$(cat "/tmp/writer-$1.pid")" || fail "writer $1 saw an error: $(cat /tmp/workload.err 2>/dev/null)"
}
start_protect() {
    ferry protect-volume /dev/mapper/vol --state "$state" --name data --nbd-timeout 5 \
        --ring-size 8M >>/tmp/pv.log 2>&1 &
    echo $! >/tmp/pv.pid
}
serving() {
    pid=$(cat /tmp/pv.pid)
    grep -q "\"pid\": $pid," "$state/filter.json" 2>/dev/null
}
threads_of() { # name, state and wait channel of each thread, for a stuck process
    for t in /proc/"$1"/task/*; do
        echo "$(cat "$t/comm") $(cut -d' ' -f3 "$t/stat") $(cat "$t/wchan" 2>/dev/null)"
    done
}
table_of() { dmsetup table "$1" | awk '{ print $3 }'; }
# The highest sequence the filter has given out.
filter_seq() { ferry filter status --state "$state" --json | sed -n 's/^  "seq": \([0-9]*\),*$/\1/p'; }
# consistent_after SEQ: the target holds a point the sidecar tagged itself
# after SEQ. It tags one once a resync is complete, so the replica is
# consistent again and a tag taken from now on becomes a recovery point.
# (A tag taken while the resync still runs is recorded but is no point:
# the replica never held the disk as it was at that tag.) Sequences are
# compared as strings of digits: awk's numbers are doubles.
consistent_after() {
    ferry points vm01 --data /site/data 2>/dev/null | awk -v after="$1" '
        function later(s, a) { return length(s) > length(a) || (length(s) == length(a) && s "" > a ""); }
        $NF ~ /^ferry-consistent-/ && later($(NF - 1), after) { found = 1 }
        END { exit !found }'
}

# If a step hangs (an I/O that never completes has no timeout of its own),
# say where, with every ferry thread's state, before the VM's time runs out.
(
    sleep 400
    echo "protect-volume: WATCHDOG: still running after 400 s"
    ps | grep -v ' \[' # user processes only
    dmsetup info -c
    for pid in $(pidof ferry); do echo "--- ferry $pid"; threads_of "$pid"; done
    ferry sidecar status --state "$state"
    for f in /tmp/pv.log /tmp/sidecar.log /tmp/target.log; do echo "--- $f"; tail -n 20 "$f"; done
) &
watchdog=$!

sectors=$(blockdev --getsz /dev/vda)
dmsetup create lw --table "0 $sectors log-writes /dev/vda /dev/vdb"
dmsetup create vol --table "0 $sectors linear /dev/mapper/lw 0"
dmsetup message lw 0 mark start
mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/vol
mkdir -p /mnt /site
mount -o noatime /dev/mapper/vol /mnt
vol_dev=$(stat -L -c %t:%T /dev/mapper/vol)
own_table=$(dmsetup table vol)
: >/tmp/sums
write_files before 20 || fail "writes before protection failed"

say "a plain disk is refused, with the supported ways"
if ferry protect-volume /dev/vdc --state /run/ferry/plain >/tmp/plain.out 2>&1; then
    fail "protect-volume accepted a plain disk"
fi
for word in "not a device-mapper volume" LVM dm-mod.create= --nbd-device; do
    grep -q -- "$word" /tmp/plain.out || { cat /tmp/plain.out; fail "the refusal does not mention $word"; }
done

say "a target and credentials on the site disk"
mkfs.ext4 -q /dev/vdc
mount /dev/vdc /site
ferry credentials init /site/creds --host vm01 >/dev/null
ferry target --data /site/data --listen 127.0.0.1:0 --credentials /site/creds 2>/tmp/target.log &
target_pid=$!
wait_for 60 grep -q "^ferry target: listening on " /tmp/target.log || fail "the target did not start"
addr=$(sed -n 's/^ferry target: listening on //p' /tmp/target.log | head -n 1)

say "slide the filter under the mounted volume while a writer runs"
start_writer in
wait_for 60 writer_at_least in 3 || fail "the writer did not start"
start_protect
wait_for 120 grep -q "runs through /dev/nbd" /tmp/pv.log || fail "protect-volume did not slide in"
written=$(count_of in)
wait_for 120 writer_at_least in $((written + 5)) || fail "the writer did not go on through the slide"
stop_writer in
[ "$(table_of vol)" = linear ] || fail "vol's table is not linear"
dmsetup table vol | grep -q " 43:" || fail "vol does not point at an NBD device: $(dmsetup table vol)"
[ "$(stat -L -c %t:%T /dev/mapper/vol)" = "$vol_dev" ] || fail "the volume's device number changed"
dmsetup info ferry-base-vol >/dev/null || fail "no base device"
slid_at=$(filter_seq)
ferry sidecar --state "$state" --target "$addr" --credentials /site/creds 2>/tmp/sidecar.log &
sidecar_pid=$!

say "a workload with recovery points, and a kill -9 of protect-volume"
point=0
wait_for 300 consistent_after "$slid_at" || fail "the replica did not become consistent after the slide-in"
tag_once() { ferry filter tag "p$point" --state "$state" >/tmp/tag.out 2>&1; }
tag() { point=$((point + 1)); wait_for 300 tag_once || { cat /tmp/tag.out; fail "tag p$point failed"; }; }
write_files a 15 || fail "writes failed"
tag
write_files b 15 || fail "writes failed"
tag
kill -9 "$(cat /tmp/pv.pid)"
write_files c 5 &
writer=$!
start_protect
wait_for 120 serving || fail "protect-volume did not come back"
grep -q "reattached to the kernel's NBD device" /tmp/pv.log || fail "the restart did not reattach"
wait "$writer" || fail "writes across the restart failed"

say "the table replaced behind the filter (as lvchange --refresh does): it stops, a restart slides in again"
pv_pid=$(cat /tmp/pv.pid)
dmsetup reload vol --table "$own_table"
dmsetup resume vol
write_files around 5 || fail "writes around the filter failed"
# Exited: gone, or a zombie waiting for `wait`.
pv_exited() { ! grep -q '^State:[[:space:]]*[RSDT]' "/proc/$pv_pid/status" 2>/dev/null; }
wait_for 90 pv_exited || { threads_of "$pv_pid"; fail "protect-volume did not stop after the table swap"; }
wait "$pv_pid" && fail "protect-volume exited 0 after losing the volume"
grep -q "table was replaced" /tmp/pv.log || fail "no message about the replaced table"
start_protect
wait_for 120 serving || fail "protect-volume did not come back"
wait_for 60 sh -c "dmsetup table vol | grep -q ' 43:'" || fail "the restart did not slide in again"
slid_at=$(filter_seq)
write_files d 15 || fail "writes failed"
wait_for 300 consistent_after "$slid_at" || fail "the replica did not become consistent after sliding in again"
tag
sync
tag
final=p$point
has_point() { ferry points vm01 --data /site/data --json 2>/dev/null | grep -q "\"name\": \"$1\""; }
wait_for 300 has_point "$final" || fail "the last point did not reach the target"
dmsetup message lw 0 mark before-unprotect

say "slide back out while a writer runs"
start_writer out
wait_for 60 writer_at_least out 3 || fail "the writer did not start"
ferry unprotect-volume /dev/mapper/vol --state "$state" >/tmp/unprotect.log 2>&1 ||
    { cat /tmp/unprotect.log; fail "unprotect-volume failed"; }
written=$(count_of out)
wait_for 120 writer_at_least out $((written + 5)) || fail "the writer did not go on after the slide out"
stop_writer out
[ "$(dmsetup table vol)" = "$own_table" ] ||
    fail "vol is not back on its own table: $(dmsetup table vol)"
[ "$(stat -L -c %t:%T /dev/mapper/vol)" = "$vol_dev" ] || fail "the volume's device number changed"
kill -0 "$(cat /tmp/pv.pid)" 2>/dev/null && fail "protect-volume still runs"
write_files after 5 || fail "writes after unprotect failed"

say "verify"
[ ! -e /tmp/workload.err ] || fail "the workload saw an error: $(cat /tmp/workload.err)"
sync
echo 3 >/proc/sys/vm/drop_caches
md5sum -c /tmp/sums >/tmp/md5.out 2>&1 || { tail /tmp/md5.out; fail "a file does not read back"; }
if dmesg | grep -E "I/O error|EXT4-fs error|Buffer I/O" >/tmp/errors; then
    cat /tmp/errors
    fail "the kernel logged I/O errors"
fi
umount /mnt
e2fsck -fn /dev/mapper/vol >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck found errors"; }
kill -TERM "$sidecar_pid" "$target_pid"
wait "$sidecar_pid" "$target_pid" || true
# The sidecar held the base device open: its deferred removal is done now.
base_gone() { ! dmsetup info ferry-base-vol >/dev/null 2>&1; }
wait_for 30 base_gone || fail "the base device was left behind"
dmsetup remove vol
# Removing lw writes the log's closing mark and its entry count.
dmsetup remove lw
ferry points vm01 --data /site/data
umount /site
kill "$watchdog" 2>/dev/null || true
echo "$final" >/tmp/final
say "points p1..$final; ok"
