#!/usr/bin/env bash
# Group-consistent points: how long a round takes and how long it holds the
# members' writes, taken by the control-plane server over the hosts' group
# ports (TCP, mutual TLS) next to the same round taken locally over the
# filters' unix control sockets (the reference: no network, no TLS). Two
# registered hosts with one disk each, replicating to one target, and a
# write load on both disks (qemu-io) while the rounds run.
#
# Usage: scripts/bench/group.sh [WORKDIR] [ROUNDS]   (default: a temp dir, 50)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$(mktemp -d /tmp/ferry-bench-group.XXXXXX)}
rounds=${2:-50}
source "$root/scripts/bench/lib.sh"
bench_ferry
trap stop_all EXIT
mkdir -p "$work"; cd "$work"
rm -rf server site-b h1 h2 d1.img d2.img ./*.log
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }

"$ferry" server init --data server >/dev/null
api=$(port)
"$ferry" server run --data server --listen "127.0.0.1:$api" 2>server.log & pids+=($!)
export FERRY_SERVER="https://127.0.0.1:$api" FERRY_CA="$work/server/credentials/ca.crt"
FERRY_TOKEN=$(cat server/admin.token); export FERRY_TOKEN
for _ in $(seq 100); do "$ferry" host list >/dev/null 2>&1 && break; sleep 0.1; done
register() { # ROLE NAME DIR [ADDRESS]
    local t; t=$("$ferry" "$1" token --name "$2" --json)
    local flag=--state; [ "$1" = target ] && flag=--data
    "$ferry" "$1" register --server "$FERRY_SERVER" --token "$(echo "$t" | field token)" \
        --ca-fingerprint "$(echo "$t" | field ca_fingerprint)" --name "$2" "$flag" "$3" ${4:+--address "$4"} >/dev/null
}
tport=$(port)
register target site-b site-b "127.0.0.1:$tport"
"$ferry" target --data site-b --listen "127.0.0.1:$tport" 2>target.log & pids+=($!)
"$ferry" policy create gold --app-interval off --crash-interval 1h >/dev/null
for h in h1 h2; do
    truncate -s 1G "$h.img"
    register host "$h" "$h"
    "$ferry" filter --disk "data=$work/$h.img" --listen "unix:$work/$h/nbd.sock" --state "$h" \
        --group-listen "127.0.0.1:$(port)" 2>"$h-filter.log" & pids+=($!)
    "$ferry" sidecar --state "$h" 2>"$h-sidecar.log" & pids+=($!)
done
for h in h1 h2; do
    for _ in $(seq 150); do "$ferry" host show "$h" --json | grep '"name": "data"' >/dev/null && break; sleep 0.2; done
    "$ferry" protect "$h" --policy gold --target site-b --wait 5m >/dev/null
done
"$ferry" group create pair --host h1 --host h2 >/dev/null
for _ in $(seq 50); do "$ferry" group take pair --name warmup-$RANDOM --json >/dev/null 2>&1 && break; sleep 0.2; done

load() { # writes on both disks for the whole measurement
    for h in h1 h2; do
        ( while :; do qemu-io -f raw "nbd+unix:///data?socket=$work/$h/nbd.sock" \
            -c "write -P 7 0 64M" >/dev/null 2>&1 || exit 0; done ) & pids+=($!)
    done
}
load
summary() { # LABEL FILE-OF-JSON-LINES
    python3 - "$1" "$2" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
taken = [r for r in rows if r["result"] == "taken"]
el = sorted(r["elapsed_us"] for r in taken)
held = sorted(max(m.get("held_us") or 0 for m in r["members"]) for r in taken)
q = lambda v, p: v[min(len(v) - 1, int(p * len(v)))] if v else float("nan")
print(f"{sys.argv[1]:<34} {len(taken):>3}/{len(rows):<3} taken   round p50 {q(el,.5)/1000:7.2f} ms  p90 {q(el,.9)/1000:7.2f} ms   writes held p50 {q(held,.5)/1000:6.2f} ms  max {held[-1]/1000 if held else float('nan'):6.2f} ms")
PY
}
: >local.jsonl; : >server.jsonl
for i in $(seq "$rounds"); do
    "$ferry" group point "local-$i" --member h1 --member h2 --json | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' >>local.jsonl || true
    "$ferry" group take pair --name "tls-$i" --json | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' >>server.jsonl || true
done
echo "group rounds, 2 hosts under write load, $rounds rounds each (timeout 300 ms):"
summary "local (unix sockets, ferry group point)" local.jsonl
summary "server (TCP + mutual TLS, group take)" server.jsonl
