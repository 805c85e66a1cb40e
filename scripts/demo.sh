#!/usr/bin/env bash
# The main job on an embedded default. Until replication lands this walks the
# image library through what failover, test failover and failback do with
# disks: a protected disk's replica as a dynamic VHD, a writable test-failover
# overlay (differencing VHD) that leaves the replica untouched, and failover
# exports for Azure (fixed VHD) and VMware (stream-optimized VMDK, sparse VMDK).
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
rm -f disk.raw replica.vhd test-failover.vhd azure.vhd vmware.vmdk vmware-sparse.vmdk

step "a 256 MiB protected disk with some data and many zeros (disk.raw)"
truncate -s 256M disk.raw
for mib in 0 3 17 64 130 255; do
    head -c 1M /dev/urandom | dd of=disk.raw bs=1M seek=$mib conv=notrunc status=none
done
echo "ferry demo: the payroll database lives here" | dd of=disk.raw bs=512 seek=8192 conv=notrunc status=none

step "replica at the recovery site: dynamic VHD (zero blocks stay unallocated)"
"$ferry" image convert --format vhd-dynamic disk.raw replica.vhd
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
