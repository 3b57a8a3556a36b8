# Sourced by the perf scripts after they parse their arguments: installs
# what they need, builds the release binaries, lets glommio lock its
# io_uring memory, and sets $bench and a scratch directory $tmp (each
# script removes it in its own EXIT trap).
bash scripts/install-deps.sh
cargo build --release --bins -q
ulimit -l unlimited 2>/dev/null || true
bench=target/release/keelson-bench
tmp=$(mktemp -d)
