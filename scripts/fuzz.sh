#!/usr/bin/env bash
# Run every cargo-fuzz target for SECONDS each (default 60).
# Needs cargo-fuzz (`cargo install cargo-fuzz`); on a stable toolchain the
# sanitizer flags are allowed through RUSTC_BOOTSTRAP.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
export RUSTC_BOOTSTRAP=1
for target in $(cargo fuzz list); do
    echo "== $target ($seconds s)"
    cargo fuzz run -O "$target" -- -max_total_time="$seconds" 2>&1 | grep -E "^Done|ERROR|panicked" || true
done
