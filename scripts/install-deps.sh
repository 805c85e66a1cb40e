#!/usr/bin/env bash
# Install the Debian packages ferry's build, demo and tests use. Idempotent;
# needs root (CI and the build machines run as root).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
packages=(qemu-utils libnbd-bin nbdkit fio xfsprogs e2fsprogs util-linux python3-libnbd)
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
command -v cargo >/dev/null || { echo "cargo (Rust toolchain) is required" >&2; exit 1; }
