#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds, runs unit and
# integration tests against the real binary. Exit status is the verdict.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# glommio locks its io_uring buffers in memory.
ulimit -l unlimited 2>/dev/null || ulimit -l 65536 2>/dev/null || true
export ETCDCTL_API=3
cargo build --release --bins
cargo test --release -- --test-threads="${KEELSON_TEST_THREADS:-4}"
