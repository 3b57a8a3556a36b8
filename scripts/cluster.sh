#!/usr/bin/env bash
# A local 3-member keelson cluster on loopback, like etcd's Procfile:
# infra1..3 serve clients on 127.0.0.1:2379, 22379, 32379 and peers on
# 12380, 22380, 32380; data in ./cluster.keelson/infraN. Ctrl-C stops all
# three. Extra arguments go to every member (e.g. --cores 1).
#
#   bash scripts/cluster.sh
#   etcdctl --endpoints=127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379 endpoint status -w table
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin keelson -q
ulimit -l unlimited 2>/dev/null || ulimit -l 65536 2>/dev/null || true
cluster="infra1=http://127.0.0.1:12380,infra2=http://127.0.0.1:22380,infra3=http://127.0.0.1:32380"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait' EXIT INT TERM
for i in 1 2 3; do
  client=$([ $i = 1 ] && echo 2379 || echo "${i}2379")
  target/release/keelson --name "infra$i" --data-dir "cluster.keelson/infra$i" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:${i}2380" --initial-advertise-peer-urls "http://127.0.0.1:${i}2380" \
    --initial-cluster-token keelson-cluster-1 --initial-cluster "$cluster" \
    --initial-cluster-state new "$@" > >(sed -u "s/^/infra$i | /") 2>&1 &
  pids+=($!)
done
wait
