#!/usr/bin/env bash
# Interleaved put-only runs: a fresh single-member keelson, then a fresh etcd
# 3.4 (Debian's etcd-server), N times, each 30k puts to warm up and then a
# measured phase. Prints one markdown table row per run, with the host's
# steal time over the measured phase, so that runs the hypervisor disturbed
# can be told apart (this project's machines are VMs whose speed varies).
#
#   perf/pairs.sh [--rounds N] [--total PUTS] [--clients C] [--keelson BIN] [-- keelson args...]
#
# Load: --clients (default 64) over 8 connections, 8-byte keys, 256-byte
# values, 100000 distinct keys, at most 20 s per measured phase.
#
# Besides each server's own CPU, the kernel's worker threads' CPU over the
# measured phase, as keelson-bench reads it (every `kworker`, whoever it worked for: direct-I/O
# completions, the block layer's flushes, writeback) is shown per put, and a
# ratio with it added to both sides: keelson's WAL writes (RWF_DSYNC) have
# the kernel's direct-I/O completion worker issue their flushes, work that
# is not counted in keelson's own CPU, where etcd's fdatasync runs on its
# own thread.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=4
total=150000
clients=64
keelson=target/release/keelson
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --total) total=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --keelson) keelson=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
# shellcheck source=perf/setup.sh
. perf/setup.sh
pid=""
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

field() { # json key
  sed -e "s/.*\"$2\":\([^,}]*\).*/\1/" <<<"$1"
}

run() { # kind port -> one row
  local kind=$1 port=$2 dir="$tmp/$1-data"
  rm -rf "$dir"
  local args=(--name m0 --data-dir "$dir"
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port"
    --listen-peer-urls "http://127.0.0.1:$((port + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))"
    --initial-cluster "m0=http://127.0.0.1:$((port + 1))")
  if [ "$kind" = etcd ]; then
    etcd "${args[@]}" >"$tmp/$kind.log" 2>&1 &
  else
    "$keelson" "${args[@]}" "${extra[@]}" >"$tmp/$kind.log" 2>&1 &
  fi
  pid=$!
  local up=0
  for _ in $(seq 1 200); do
    kill -0 "$pid" 2>/dev/null || break
    if ETCDCTL_API=3 etcdctl --endpoints="127.0.0.1:$port" --command-timeout=1s endpoint health >/dev/null 2>&1; then up=1; break; fi
    sleep 0.1
  done
  if [ "$up" = 0 ]; then echo "$kind did not start:" >&2; cat "$tmp/$kind.log" >&2; exit 1; fi
  local load=(--endpoints "127.0.0.1:$port" --workload put --clients "$clients" --conns 8
    --key-size 8 --val-size 256 --key-space 100000 --duration-secs 20)
  "$bench" "${load[@]}" --total 30000 >/dev/null 2>&1
  local out
  out=$("$bench" "${load[@]}" --total "$total" --server-pid "$pid" --json 2>/dev/null | grep '^{')
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  pid=""
  echo "$(field "$out" ops_per_s) $(field "$out" server_cpu_us_per_op) $(field "$out" p99_us) $(field "$out" host_steal_ms) $(field "$out" kworker_cpu_us_per_op)"
}

echo "| run | keelson puts/s | keelson CPU µs/put | keelson p99 µs | etcd puts/s | etcd CPU µs/put | etcd p99 µs | CPU ratio | kernel workers µs/put (keelson / etcd run) | CPU ratio with kernel workers | host steal ms (keelson / etcd run) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for i in $(seq 1 "$rounds"); do
  k=$(run keelson 27379)
  e=$(run etcd 26379)
  read -r ko kc kp ks kw <<<"$k"
  read -r eo ec ep es ew <<<"$e"
  ratio=$(awk -v a="$kc" -v b="$ec" 'BEGIN { printf "1/%.2f", b/a }')
  ratio_kw=$(awk -v a="$kc" -v b="$ec" -v x="$kw" -v y="$ew" 'BEGIN { printf "1/%.2f", (b+y)/(a+x) }')
  echo "| $i | ${ko%.*} | $kc | $kp | ${eo%.*} | $ec | $ep | $ratio | $kw / $ew | $ratio_kw | $ks / $es |"
done
