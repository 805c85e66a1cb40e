#!/usr/bin/env bash
# The main job on an embedded default, managed by the control plane: a
# ferry server, a recovery-site target and a protected host (filter +
# sidecar) on loopback, each registered with a one-time token and
# configured by the server alone. A file-backed disk is protected under a
# policy (its initial copy with a progress bar), a workload writes through
# the filter, two points are taken; a recovery plan tests the host at the
# first point while replication goes on, then the host fails over to it as
# a job on the target, and the failed-over image is checked against the
# disk as it was at that point; then commit.
#
# Usage: scripts/demo.sh [WORKDIR]   (default: a fresh temporary directory)
# The standalone flow (no server): scripts/demo-standalone.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=${1:-$(mktemp -d /tmp/ferry-demo.XXXXXX)}
mkdir -p "$work"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
json_field() { python3 -c "import json,sys; v=json.load(sys.stdin); print(eval('v'+sys.argv[1]))" "$1"; }

step "build ferry (release)"
cargo build --release --locked -p ferry 2>&1 | tail -1
ferry="$root/target/release/ferry"
cd "$work"
rm -rf server site-b web01 disk.raw protected.img at-demo-point.raw more.bin ./*.log

step "the control-plane server (SQLite state, HTTPS API, admin token)"
"$ferry" server init --data ./server >/dev/null
api_port=$(free_port); metrics_port=$(free_port)
"$ferry" server run --data ./server --listen "127.0.0.1:$api_port" \
    --metrics-listen "127.0.0.1:$metrics_port" 2>server.log &
pids="$!"
trap 'kill $pids 2>/dev/null || true' EXIT
export FERRY_SERVER="https://127.0.0.1:$api_port" FERRY_CA="$work/server/credentials/ca.crt"
FERRY_TOKEN=$(cat server/admin.token); export FERRY_TOKEN
for _ in $(seq 100); do "$ferry" host list >/dev/null 2>&1 && break; sleep 0.1; done
echo "server at $FERRY_SERVER (metrics: http://127.0.0.1:$metrics_port/metrics)"

step "a recovery-site target registers with a one-time token and runs with what it received"
target_port=$(free_port)
t=$("$ferry" target token --name site-b --ttl 10m --json)
"$ferry" target register --server "$FERRY_SERVER" --token "$(echo "$t" | json_field '["token"]')" \
    --ca-fingerprint "$(echo "$t" | json_field '["ca_fingerprint"]')" \
    --name site-b --address "127.0.0.1:$target_port" --data ./site-b
"$ferry" target --data ./site-b --listen "127.0.0.1:$target_port" 2>target.log &
pids="$pids $!"

step "a host registers; its filter serves a 256 MiB disk over NBD, its sidecar waits for protection"
truncate -s 256M protected.img
for mib in 0 3 17 64 130 255; do   # data already on the disk: the initial copy
    head -c 1M /dev/urandom | dd of=protected.img bs=1M seek=$mib conv=notrunc status=none
done
h=$("$ferry" host token --name web01 --ttl 10m --json)
"$ferry" host register --server "$FERRY_SERVER" --token "$(echo "$h" | json_field '["token"]')" \
    --ca-fingerprint "$(echo "$h" | json_field '["ca_fingerprint"]')" --name web01 --state ./web01
"$ferry" filter --disk "data=$work/protected.img" --listen "unix:$work/web01/nbd.sock" --state ./web01 \
    --ring-size 64M --group-listen off 2>filter.log &
pids="$pids $!"
"$ferry" sidecar --state ./web01 2>sidecar.log &
pids="$pids $!"
for _ in $(seq 100); do
    "$ferry" host show web01 --json | grep '"name": "data"' >/dev/null && break; sleep 0.2
done
"$ferry" host show web01

step "policy and protection: the initial copy, then protected"
"$ferry" policy create gold --rpo 5m --retention 1d --crash-interval 5m --app-interval off
"$ferry" protect web01 --policy gold --target site-b --wait 10m

step "a workload writes through the filter, then a point"
uri="nbd+unix:///data?socket=$work/web01/nbd.sock"
head -c 32M /dev/urandom >more.bin
qemu-io -f raw "$uri" -c "write -s more.bin 20M 32M" >/dev/null
echo "ferry demo: the payroll database lives here" >note.txt
qemu-io -f raw "$uri" -c "write -s note.txt 4M 512" >/dev/null 2>&1 || qemu-io -f raw "$uri" -c "write -P 0x42 4M 512" >/dev/null
"$ferry" filter tag demo-point --state ./web01
cp --sparse=always protected.img at-demo-point.raw
wait_point() {
    for _ in $(seq 300); do
        "$ferry" points web01 --data ./site-b --json | grep "\"name\": \"$1\"" >/dev/null && return 0
        sleep 0.1
    done
    echo "point $1 not recorded" >&2; exit 1
}
wait_point demo-point
qemu-io -f raw "$uri" -c "write -P 0x5a 0 8M" >/dev/null   # more writes after the point
"$ferry" filter tag after-change --state ./web01
wait_point after-change
"$ferry" points web01 --data ./site-b
"$ferry" status

step "a recovery plan tests web01 at demo-point while replication goes on"
"$ferry" plan create demo --step "hosts=web01;pre=echo drill starting;post=echo drill ready"
"$ferry" plan run demo --test --point demo-point
"$ferry" image compare at-demo-point.raw site-b/test-failover/web01/data.vhd &&
    echo "the drill image is the disk as it was at demo-point"
"$ferry" plan run demo --cleanup

step "failover of web01 to demo-point as a job on the target (fixed VHD for Azure)"
"$ferry" failover web01 --point demo-point --format vhd-fixed
image=site-b/failover/web01/data.vhd
if "$ferry" image compare at-demo-point.raw "$image"; then
    echo "VERIFIED: the failed-over image $image is the source disk as it was at demo-point"
else
    echo "MISMATCH: $image differs from the disk at demo-point" >&2; exit 1
fi
if command -v qemu-img >/dev/null; then
    qemu-img compare -f raw -F vpc at-demo-point.raw "$image"
fi
"$ferry" commit web01
"$ferry" status
"$ferry" job list
kill -TERM $pids; wait $pids 2>/dev/null || true
trap - EXIT
step "done: everything is in $work"
