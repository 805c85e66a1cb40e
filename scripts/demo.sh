#!/usr/bin/env bash
# The main job on an embedded default. Until replication lands this protects
# a disk with `ferry filter` (every write recorded in write order, a tag, the
# ring drained by a stand-in consumer) and walks the image library through
# what failover, test failover and failback do with disks: the replica as a
# dynamic VHD, a writable test-failover overlay (differencing VHD) that
# leaves the replica untouched, and failover exports for Azure (fixed VHD)
# and VMware (stream-optimized VMDK, sparse VMDK).
#
# Usage: scripts/demo.sh [WORKDIR]   (default: a fresh temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=${1:-$(mktemp -d /tmp/ferry-demo.XXXXXX)}
mkdir -p "$work"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "build ferry (release)"
cargo build --release --locked -p ferry 2>&1 | tail -1
ferry="$root/target/release/ferry"
cd "$work"
rm -rf disk.raw protected.img state nbd.sock replica.vhd test-failover.vhd azure.vhd vmware.vmdk vmware-sparse.vmdk

step "a 256 MiB protected disk with some data and many zeros (disk.raw)"
truncate -s 256M disk.raw
for mib in 0 3 17 64 130 255; do
    head -c 1M /dev/urandom | dd of=disk.raw bs=1M seek=$mib conv=notrunc status=none
done
echo "ferry demo: the payroll database lives here" | dd of=disk.raw bs=512 seek=8192 conv=notrunc status=none

step "protect a disk: ferry filter serves it over NBD and records every write"
truncate -s 256M protected.img
"$ferry" filter --disk "data=$work/protected.img" --listen "unix:$work/nbd.sock" --state "$work/state" \
    --ring-size 64M 2>"$work/filter.log" &
filter_pid=$!
trap 'kill $filter_pid 2>/dev/null || true' EXIT
for _ in $(seq 200); do [ -S "$work/nbd.sock" ] && break; sleep 0.05; done
uri="nbd+unix:///data?socket=$work/nbd.sock"
if command -v nbdcopy >/dev/null; then
    nbdcopy disk.raw "$uri"          # the application's writes, through the filter
else
    echo "(nbdcopy missing: run scripts/install-deps.sh)"; exit 1
fi
"$ferry" filter tag demo-point --state "$work/state"
"$ferry" filter status --state "$work/state"
echo "-- the sidecar's view: records in write order (first 5)"
"$ferry" filter drain --state "$work/state" --print | head -5
"$ferry" filter drain --state "$work/state" >/dev/null 2>&1 || true
kill -TERM "$filter_pid"; wait "$filter_pid" 2>/dev/null || true
trap - EXIT
cmp protected.img disk.raw && echo "protected disk holds every write"

step "replica at the recovery site: dynamic VHD (zero blocks stay unallocated)"
"$ferry" image convert --format vhd-dynamic protected.img replica.vhd
"$ferry" image info replica.vhd
"$ferry" image check replica.vhd

step "test failover: a writable differencing overlay; the replica is untouched"
"$ferry" image create --format vhd-diff --parent replica.vhd test-failover.vhd
"$ferry" image info test-failover.vhd
"$ferry" image compare disk.raw test-failover.vhd
echo "scribble from the test VM" > note.txt
"$ferry" image convert --format raw test-failover.vhd tf.raw >/dev/null 2>&1
dd if=note.txt of=tf.raw bs=512 seek=100 conv=notrunc status=none
rm -f test-failover.vhd
"$ferry" image convert --format vhd-diff --parent replica.vhd tf.raw test-failover.vhd
"$ferry" image compare disk.raw test-failover.vhd || echo "(the overlay differs, as the test VM wrote to it)"
"$ferry" image compare disk.raw replica.vhd
rm -f tf.raw note.txt

step "failover export for Azure: fixed VHD, whole MiB, force_size geometry"
"$ferry" image convert --format vhd-fixed replica.vhd azure.vhd
"$ferry" image info azure.vhd

step "failover export for VMware: stream-optimized VMDK (OVA transport) and sparse VMDK"
"$ferry" image convert --format vmdk-stream replica.vhd vmware.vmdk
"$ferry" image convert --format vmdk-sparse replica.vhd vmware-sparse.vmdk
"$ferry" image info vmware.vmdk
"$ferry" image compare disk.raw vmware.vmdk
"$ferry" image compare disk.raw vmware-sparse.vmdk

if command -v qemu-img >/dev/null; then
    step "second opinion from qemu-img"
    qemu-img compare -f raw -F vpc disk.raw azure.vhd
    qemu-img compare -f raw -F vmdk disk.raw vmware.vmdk
    qemu-img check -f vmdk vmware-sparse.vmdk
fi

step "done: images are in $work"
ls -ls "$work"
