#!/usr/bin/env bash
# Failover time, keelson vs etcd 3.4, 3 members on loopback, same settings
# (heartbeat 100 ms, election timeout 1000 ms): the leader is killed -9 and
# the time until the first write acknowledged by a surviving member is
# measured (etcdctl put in a loop, 200 ms per attempt; resolution is that of
# starting etcdctl, ~10-20 ms). Repeated --rounds times per server, each on a
# fresh cluster; appends a table to perf/RESULTS.md.
#
#   perf/failover.sh [--rounds N]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=5
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
# shellcheck source=perf/setup.sh
. perf/setup.sh
export ETCDCTL_API=3
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done; [ -n "${KEEP_TMP:-}" ] || rm -rf "$tmp"; }
trap cleanup EXIT

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

one_round() { # kind port -> prints failover ms
  local kind=$1 port=$2 i cluster="" eps="" mpids=()
  for i in 0 1 2; do cluster+="${cluster:+,}m$i=http://127.0.0.1:$(( port + 10 * i + 1 ))"; done
  for i in 0 1 2; do
    local c=$(( port + 10 * i )) p=$(( port + 10 * i + 1 )) dir="$tmp/$kind-$i"
    rm -rf "$dir"
    local args=(--name "m$i" --data-dir "$dir" --heartbeat-interval 100 --election-timeout 1000
      --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c"
      --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p"
      --initial-cluster "$cluster" --initial-cluster-token "failover-$kind")
    if [ "$kind" = etcd ]; then etcd "${args[@]}" >"$dir.log" 2>&1 & else target/release/keelson "${args[@]}" >"$dir.log" 2>&1 & fi
    mpids+=("$!"); pids+=("$!")
    eps+="${eps:+,}127.0.0.1:$c"
  done
  for _ in $(seq 1 200); do
    etcdctl --endpoints="$eps" --command-timeout=1s put warm up >/dev/null 2>&1 && break
    sleep 0.1
  done
  # Writes for a moment, so the cluster is in steady state.
  for _ in $(seq 1 20); do etcdctl --endpoints="$eps" put k v >/dev/null; done
  local leader=-1
  for i in 0 1 2; do
    if etcdctl --endpoints="127.0.0.1:$(( port + 10 * i ))" endpoint status -w json | grep -q '"leader":\([0-9]*\),.*' &&
       [ "$(etcdctl --endpoints="127.0.0.1:$(( port + 10 * i ))" endpoint status -w json | sed -e 's/.*"member_id":\([0-9]*\).*"leader":\([0-9]*\).*/\1 \2/' | awk '{print ($1==$2)}')" = 1 ]; then
      leader=$i
    fi
  done
  [ "$leader" -ge 0 ] || { echo "no leader found" >&2; exit 1; }
  local others=""
  for i in 0 1 2; do [ "$i" = "$leader" ] || others+="${others:+,}127.0.0.1:$(( port + 10 * i ))"; done
  local t0; t0=$(now_ms)
  kill -9 "${mpids[$leader]}"
  local deadline=$(( t0 + 30000 ))
  until etcdctl --endpoints="$others" --command-timeout=200ms --dial-timeout=200ms put after failover >/dev/null 2>&1; do
    [ "$(now_ms)" -lt "$deadline" ] || { echo "no write within 30 s" >&2; exit 1; }
  done
  echo $(( $(now_ms) - t0 ))
  for p in "${mpids[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}

declare -A res
for kind in etcd keelson; do
  res[$kind]=""
  for r in $(seq 1 "$rounds"); do
    ms=$(one_round "$kind" 45379)
    echo "$kind round $r: $ms ms" >&2
    res[$kind]+="$ms "
  done
done
stats() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {printf "%d / %d / %d", a[1], a[int((NR+1)/2)], a[NR]}'; }
{
  echo
  echo "## $(date -u +%Y-%m-%d) failover, 3 members: keelson vs etcd $(etcd --version | awk '/etcd Version/ {print $3}')"
  echo
  echo "Command: \`perf/failover.sh --rounds $rounds\`"
  echo "Machine: $(nproc) cores, $(uname -sr). Heartbeat 100 ms, election timeout 1000 ms on both; the leader is killed -9 and etcdctl puts (200 ms timeout each) go to the two survivors until one is acknowledged."
  echo
  echo "| server | failover ms min / median / max | rounds (ms) |"
  echo "|---|---|---|"
  echo "| etcd | $(echo "${res[etcd]}" | stats) | ${res[etcd]}|"
  echo "| keelson | $(echo "${res[keelson]}" | stats) | ${res[keelson]}|"
} >> perf/RESULTS.md
tail -6 perf/RESULTS.md
