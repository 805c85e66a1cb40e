#!/usr/bin/env bash
# The project's test command (README, .ci/run): `scripts/test.sh [quick|rig|all]`.
#   quick: rustfmt and clippy (lints denied), unit, property and golden-byte
#          tests; no external tools, no root.
#   rig:   end-to-end tests that drive the real `ferry` binary against
#          qemu-img (and later nbdfuse, loop devices, file systems, qemu).
set -euo pipefail
cd "$(dirname "$0")/.."
tier=${1:-all}

# Each tier stops at its first failing step and returns non-zero.
quick() {
    echo "== quick tier: format, lints (the [workspace.lints] table), unit, property and golden tests"
    cargo fmt --all -- --check &&
        cargo clippy --workspace --all-targets --locked -- -D warnings &&
        cargo test --workspace --exclude ferry-tests --locked
}

rig() {
    echo "== rig tier: real binaries against qemu-img, NBD clients, file systems, the daemons"
    command -v qemu-img >/dev/null || { echo "qemu-img missing: apt-get install qemu-utils" >&2; return 1; }
    cargo build --locked -p ferry &&
        FERRY_BIN="$PWD/target/debug/ferry" cargo test --locked -p ferry-tests
}

log=$(mktemp /tmp/ferry-test.XXXXXX)
trap 'rm -f "$log"' EXIT
set +e
case "$tier" in
    quick) quick ;;
    rig) rig ;;
    all) quick; q=$?; rig && exit "$q" ;;
    *) echo "usage: $0 [quick|rig|all]" >&2; exit 2 ;;
esac 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "%s: %d passed, %d failed\n", "'"$tier"'", p, f }' "$log"
exit "$status"
