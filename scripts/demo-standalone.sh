#!/usr/bin/env bash
# The main job on an embedded default: a recovery site on loopback (ferry
# target, mutual TLS), a protected disk (ferry filter) whose every write
# ferry sidecar ships compressed and encrypted to the target, which keeps a
# journal, a replica (dynamic VHD) and the history behind its recovery
# points. Two points (the second after more writes), a test failover at the
# first while replication goes on, a failover to the first (fixed VHD for
# Azure), a change of point to the second (stream-optimized VMDK for
# VMware), and the commit; every image is checked against the disk as it
# was at its point.
#
# The same without a control-plane server (daemons configured by flags).
#
# Usage: scripts/demo-standalone.sh [WORKDIR]   (default: a fresh temporary directory)
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
rm -rf disk.raw protected.img state web01 site-b creds nbd.sock at-demo-point.raw more.bin drill failover

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
replica=site-b/hosts/web01/data/replica.vhd
wait_replicated() { # until the replica holds every write of $1 and is a consistent point
    for _ in $(seq 600); do
        "$ferry" image compare "$1" "$replica" >/dev/null 2>&1 &&
            "$ferry" target status --data ./site-b --json | grep '"state": "consistent"' >/dev/null && return 0
        sleep 0.1
    done
    echo "the replica did not catch up" >&2; exit 1
}
wait_point() { # until the target lists point $1
    for _ in $(seq 300); do
        "$ferry" points web01 --data ./site-b --json | grep "\"name\": \"$1\"" >/dev/null && return 0
        sleep 0.1
    done
    echo "point $1 not recorded" >&2; exit 1
}
wait_replicated disk.raw
"$ferry" filter tag demo-point --state "$work/web01"
wait_point demo-point
cp --sparse=always protected.img at-demo-point.raw

step "more writes after the point (a new 8 MiB region, an overwrite), then a second point"
head -c 8M /dev/urandom >more.bin
qemu-io -f raw "$uri" -c "write -s more.bin 100M 8M" >/dev/null
qemu-io -f raw "$uri" -c "write -P 0x5a 0 1M" >/dev/null
"$ferry" filter tag after-change --state "$work/web01"
wait_replicated protected.img
wait_point after-change
sleep 1   # one more metrics interval, so that the sidecar's status below is current
"$ferry" filter status --state "$work/web01"
"$ferry" sidecar status --state "$work/web01"
"$ferry" target status --data ./site-b
"$ferry" points web01 --data ./site-b

step "test failover at demo-point while replication goes on: a writable differencing VHD over a base at the point"
"$ferry" test-failover web01 --data ./site-b --point demo-point --out ./drill
"$ferry" image compare at-demo-point.raw drill/data.vhd && echo "the drill image is the disk as it was at demo-point"
"$ferry" test-failover cleanup web01 --data ./site-b

step "failover to demo-point: replication of web01 stops, a fixed VHD for Azure"
"$ferry" failover web01 --data ./site-b --point demo-point --format vhd-fixed --out ./failover
"$ferry" image compare at-demo-point.raw failover/data.vhd && echo "failed over to the disk as it was at demo-point"

step "change of mind before commit: the newer point, as a stream-optimized VMDK for VMware"
"$ferry" failover web01 --data ./site-b --point after-change --format vmdk-stream --change-point
"$ferry" image compare protected.img failover/data.vmdk && echo "failed over to the disk as it was at after-change"
"$ferry" commit web01 --data ./site-b
cat failover/manifest.json

if command -v qemu-img >/dev/null; then
    step "second opinion from qemu-img"
    qemu-img compare -f raw -F vmdk protected.img failover/data.vmdk
    qemu-img check -f vmdk failover/data.vmdk
fi
kill -TERM $pids; wait $pids 2>/dev/null || true
trap - EXIT

step "done: images are in $work"
ls -ls "$work" "$work/failover"
