# Sourced by the benchmarks (needs $root, the repository): the ferry binary
# they run and the processes they start, every one stopped on exit.

# Sets $ferry (and exports FERRY for helpers): $FERRY_BIN if given (e.g. a
# binary built from a clean checkout), else target/release/ferry built now.
bench_ferry() {
    if [ -n "${FERRY_BIN:-}" ]; then
        ferry=$FERRY_BIN
    else
        cargo build --release --locked -p ferry >/dev/null 2>&1 || cargo build --release --locked -p ferry
        ferry="$root/target/release/ferry"
    fi
    export FERRY=$ferry NO_COLOR=1
    export BENCH_DIR="$root/scripts/bench" # for ferry_status.py
}

pids=()
stop_pid() { # PID: TERM, wait up to 10 s, then KILL
    local p=$1
    kill "$p" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$p" 2>/dev/null; then
        echo "warning: pid $p ignored SIGTERM for 10 s; killing it" >&2
        kill -9 "$p" 2>/dev/null || true
    fi
    wait "$p" 2>/dev/null || true
}
# Stop every process in $pids, the last started first.
stop_all() {
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_pid "${pids[$i]}"; done
    pids=()
}
