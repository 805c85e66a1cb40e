#!/usr/bin/env bash
# The main job on an embedded default: a recovery site on loopback (ferry
# target, mutual TLS), a protected disk (ferry filter) whose every write
# ferry sidecar ships compressed and encrypted to the target, which keeps a
# journal and a replica (dynamic VHD). Then what failover and test failover
# do with the replica: a writable test-failover overlay (differencing VHD)
# that leaves the replica untouched, and failover exports for Azure (fixed
# VHD) and VMware (stream-optimized VMDK, sparse VMDK). (Recovery points and
# `ferry failover` come with the next issues.)
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
rm -rf disk.raw protected.img state web01 site-b creds nbd.sock replica.vhd test-failover.vhd azure.vhd vmware.vmdk vmware-sparse.vmdk

step "a 256 MiB protected disk with some data and many zeros (disk.raw)"
truncate -s 256M disk.raw
for mib in 0 3 17 64 130 255; do
    head -c 1M /dev/urandom | dd of=disk.raw bs=1M seek=$mib conv=notrunc status=none
done
echo "ferry demo: the payroll database lives here" | dd of=disk.raw bs=512 seek=8192 conv=notrunc status=none

step "a recovery site on loopback: credentials (mutual TLS 1.3) and ferry target"
rm -rf creds site-b web01 "$work"/*.log
"$ferry" credentials init ./creds --host web01 >/dev/null
"$ferry" target --data ./site-b --listen 127.0.0.1:0 --credentials ./creds 2>"$work/target.log" &
target_pid=$!
pids="$target_pid"
trap 'kill $pids 2>/dev/null || true' EXIT
addr=""
for _ in $(seq 200); do
    addr=$(sed -n 's/^ferry target: listening on //p' "$work/target.log" | head -1)
    [ -n "$addr" ] && break; sleep 0.05
done
[ -n "$addr" ] || { cat "$work/target.log"; exit 1; }
echo "target listening on $addr"

step "protect a disk: ferry filter serves it over NBD and records every write; ferry sidecar ships them"
truncate -s 256M protected.img
mkdir -p web01
"$ferry" filter --disk "data=$work/protected.img" --listen "unix:$work/web01/nbd.sock" --state "$work/web01" \
    --ring-size 64M 2>"$work/filter.log" &
pids="$pids $!"
for _ in $(seq 200); do [ -S "$work/web01/nbd.sock" ] && break; sleep 0.05; done
"$ferry" sidecar --state "$work/web01" --target "$addr" --credentials ./creds 2>"$work/sidecar.log" &
pids="$pids $!"
uri="nbd+unix:///data?socket=$work/web01/nbd.sock"
if command -v nbdcopy >/dev/null; then
    nbdcopy disk.raw "$uri"          # the application's writes, through the filter
else
    echo "(nbdcopy missing: run scripts/install-deps.sh)"; exit 1
fi
"$ferry" filter tag demo-point --state "$work/web01"
replica=site-b/hosts/web01/data/replica.vhd
for _ in $(seq 600); do   # until the replica holds every write and is a consistent point
    "$ferry" image compare disk.raw "$replica" >/dev/null 2>&1 &&
        "$ferry" target status --data ./site-b --json | grep -q '"state": "consistent"' && break
    sleep 0.1
done
sleep 1   # one more metrics interval, so that the sidecar's status below is current
"$ferry" filter status --state "$work/web01"
"$ferry" sidecar status --state "$work/web01"
"$ferry" target status --data ./site-b
kill -TERM $pids; wait $pids 2>/dev/null || true
trap - EXIT
cmp protected.img disk.raw && echo "protected disk holds every write"

step "the replica at the recovery site: dynamic VHD (zero blocks stay unallocated)"
"$ferry" image compare disk.raw "$replica" && echo "replica equals the protected disk"
cp "$replica" replica.vhd
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
