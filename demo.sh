#!/usr/bin/env bash
# Sets everything up on a fresh machine and boots the default two-node VM: see README.md.
set -euo pipefail
cd "$(dirname "$0")"
command -v cargo >/dev/null || { echo "demo.sh: cargo is missing: install a Rust toolchain first" >&2; exit 1; }
# Debian packages, guest kernel (cached outside the checkout), initramfs, nested test host.
images/build.sh all >/dev/null
exec cargo run --release -q -p mempower-tests --bin mempower-demo
