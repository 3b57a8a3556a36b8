#!/usr/bin/env bash
# Runs the same workloads against a single-member keelson and a single-member
# etcd 3.4 (Debian's etcd-server) on this machine, one server at a time, and
# appends a table to perf/RESULTS.md.
#
#   perf/compare.sh [--total N] [--duration-secs S] [--memory] [--memory-keys N]
#                   [--watch | --watch-only] [--watch-drain-secs S] [--members N]
#                   [--member-cores N] [--workloads "put txn-put ..."]
#
# --members 3 runs every server as a cluster of 3 members on loopback (the
# load spread over all members' client ports; CPU is the sum over members).
# --member-cores N gives every member N cores, the same way for both:
# keelson `--cores N`, etcd `GOMAXPROCS=N` (default: each takes all cores,
# so 3 members on 2 cores run 3x oversubscribed).
#
# Workload: 64 clients over 8 HTTP/2 connections, 8-byte keys, 256-byte
# values (the issue's target shape). CPU per op is utime+stime of the server
# process over the measured phase divided by operations.
# Kernel workers: the CPU of every `kworker` thread over the measured phase
# per op (keelson-bench reads it), whoever it worked for; keelson's WAL
# writes (RWF_DSYNC) have the kernel's direct-I/O completion worker issue
# their flushes, work not counted in keelson's own CPU, where etcd's
# fdatasync runs on its own thread. The ratio with it adds it to both. Host steal is the
# time the hypervisor ran something else on this machine's CPUs during the
# measured phase (/proc/stat): a run with much of it was disturbed from
# outside, and its figures should not be compared.
#
# --watch adds a second table: the watch workload (watchers on one prefix,
# puts under it, each event timed from the put's send) for each case in
# $watch_cases, every case on a freshly started server so that the RSS
# growth per watcher starts from a clean process. --watch-only runs just
# that table. Each bench run is bounded: puts by --duration-secs, watcher
# creation by the bench's 600 s, event drain by --watch-drain-secs, the
# whole run by `timeout`; a run that fails or times out shows as "-".
set -euo pipefail
cd "$(dirname "$0")/.."
total=200000
duration=60
memory=0
memory_keys=1000000
watch=0
watch_only=0
watch_drain=60
# Seconds after the watchers are created that RSS is read a second time
# (memory freed after the burst: Go's scavenger, keelson's collector).
watch_settle=3
members=1
member_cores=""
workloads_arg=""
# Watch cases, watchers:streams:conns:puts-in-flight:puts. The first
# measures delivery latency at light load (etcd 3.4 keeps up with 100
# watchers at one put in flight, not with 1000), the other two fan-out
# under a closed-loop put load (the server falls behind; latency is then
# the backlog). 100000 watchers x 200 puts = 20M events: etcd 3.4 on 2
# cores creates the watchers in ~2.5 s and delivers the events in ~9 s.
# WATCH_CASES in the environment replaces the list.
watch_cases=${WATCH_CASES:-"100:8:1:1:2000 1000:8:8:64:10000 100000:100:8:64:200"}
while [ $# -gt 0 ]; do
  case "$1" in
    --total) total=$2; shift 2 ;;
    --duration-secs) duration=$2; shift 2 ;;
    --memory) memory=1; shift ;;
    --memory-keys) memory_keys=$2; shift 2 ;;
    --watch) watch=1; shift ;;
    --watch-only) watch=1; watch_only=1; shift ;;
    --watch-drain-secs) watch_drain=$2; shift 2 ;;
    --members) members=$2; shift 2 ;;
    --member-cores) member_cores=$2; shift 2 ;;
    --workloads) workloads_arg=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
# shellcheck source=perf/setup.sh
. perf/setup.sh
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
workloads=${workloads_arg:-"put range-serializable range txn-put mixed lease-keepalive"}

start_server() { # kind port -> sets server_pid (comma list) and endpoints
  local kind=$1 port=$2 i cluster="" names=()
  server_pid=""; endpoints=""
  for i in $(seq 0 $(( members - 1 ))); do
    cluster+="${cluster:+,}m$i=http://127.0.0.1:$(( port + 10 * i + 1 ))"
  done
  for i in $(seq 0 $(( members - 1 ))); do
    local cport=$(( port + 10 * i )) peer=$(( port + 10 * i + 1 ))
    local dir="$tmp/$kind-data-$i"
    rm -rf "$dir"
    local args=(--name "m$i" --data-dir "$dir"
      --listen-client-urls "http://127.0.0.1:$cport" --advertise-client-urls "http://127.0.0.1:$cport"
      --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer"
      --initial-cluster "$cluster" --initial-cluster-token "perf-$kind")
    if [ "$kind" = etcd ]; then
      if [ -n "$member_cores" ]; then
        GOMAXPROCS=$member_cores etcd "${args[@]}" >"$tmp/$kind-$i.log" 2>&1 &
      else
        etcd "${args[@]}" >"$tmp/$kind-$i.log" 2>&1 &
      fi
    else
      target/release/keelson "${args[@]}" ${member_cores:+--cores "$member_cores"} >"$tmp/$kind-$i.log" 2>&1 &
    fi
    pids+=("$!")
    server_pid+="${server_pid:+,}$!"
    endpoints+="${endpoints:+,}127.0.0.1:$cport"
  done
  for _ in $(seq 1 200); do
    if ETCDCTL_API=3 etcdctl --endpoints="$endpoints" --command-timeout=1s endpoint health >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "$kind did not start:" >&2; cat "$tmp/$kind"-*.log >&2; exit 1
}

stop_server() {
  local p
  for p in ${server_pid//,/ }; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}

# Ports: below the kernel's ephemeral range (32768-60999 here), so no
# outgoing connection of one member can hold a port another member is about
# to listen on.
run_all() { # kind port
  local kind=$1 port=$2
  start_server "$kind" "$port"
  for w in $workloads; do
    local extra=()
    case $w in range*|mixed) extra=(--prefill 100000) ;; esac
    "$bench" --endpoints "$endpoints" --workload "$w" --clients 64 --conns 8 \
      --key-size 8 --val-size 256 --key-space 100000 --total "$total" --duration-secs "$duration" \
      --server-pid "$server_pid" --json "${extra[@]}" 2>/dev/null | grep '^{' > "$tmp/$kind-$w.json"
    echo "$kind $w: $(cat "$tmp/$kind-$w.json")" >&2
  done
  stop_server
}

field() { # file key
  sed -e "s/.*\"$2\":\([^,}]*\).*/\1/" "$1"
}

run_watch() { # kind port
  local kind=$1 port=$2 c nw ns nconn ncl np out
  for c in $watch_cases; do
    IFS=: read -r nw ns nconn ncl np <<<"$c"
    out="$tmp/$kind-watch-$c"
    start_server "$kind" "$port"
    timeout $(( duration + watch_drain + 700 )) "$bench" --endpoints "$endpoints" --workload watch \
      --watchers "$nw" --watch-streams "$ns" --conns "$nconn" --clients "$ncl" --total "$np" \
      --key-size 8 --val-size 256 --key-space 100000 --duration-secs "$duration" \
      --drain-secs "$watch_drain" --watch-settle-secs "$watch_settle" --server-pid "$server_pid" --json 2>"$out.err" \
      | grep '^{' > "$out.json" || true
    echo "$kind watch $c: $(cat "$out.json") $(cat "$out.err")" >&2
    stop_server
  done
}

wfield() { # file key -> the field, or - when the run left no result
  if [ -s "$1" ]; then field "$1" "$2"; else echo -; fi
}

wratio() { # a b -> a/b, or - when either is missing
  awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b > 0) printf "%.2f", a/b; else print "-" }'
}

rss_of() { # field -> the server's (summed) /proc status field in MiB
  local p sum=0
  for p in ${server_pid//,/ }; do sum=$(( sum + $(awk -v f="$1:" '$1 == f {print $2}' "/proc/$p/status") )); done
  echo $(( sum / 1024 ))
}

rss_after_keys() { # kind port -> "VmRSS RssAnon RssFile" in MiB after the puts, then the same after reading every key once
  local kind=$1 port=$2
  start_server "$kind" "$port"
  "$bench" --endpoints "$endpoints" --workload put --sequential-keys --key-space "$memory_keys" \
    --total "$memory_keys" --clients 64 --conns 8 --key-size 8 --val-size 256 --duration-secs 600 >/dev/null
  sleep 2
  echo "$(rss_of VmRSS) $(rss_of RssAnon) $(rss_of RssFile)"
  "$bench" --endpoints "$endpoints" --workload range-serializable --sequential-keys --key-space "$memory_keys" \
    --total "$memory_keys" --clients 64 --conns 8 --key-size 8 --val-size 256 --duration-secs 600 >/dev/null
  sleep 2
  echo "$(rss_of VmRSS) $(rss_of RssAnon) $(rss_of RssFile)"
  stop_server
}

if [ "$watch_only" = 0 ]; then
  run_all etcd 26379
  run_all keelson 27379
fi
if [ "$watch" = 1 ]; then
  run_watch etcd 26379
  run_watch keelson 27379
fi

{
  echo
  echo "## $(date -u +%Y-%m-%d) $([ "$members" = 1 ] && echo "single member" || echo "$members members"): keelson vs etcd $(etcd --version | awk '/etcd Version/ {print $3}')"
  echo
  echo "Command: \`perf/compare.sh --total $total --duration-secs $duration$([ $memory = 1 ] && echo " --memory --memory-keys $memory_keys")$([ $watch_only = 1 ] && echo " --watch-only" || { [ $watch = 1 ] && echo " --watch"; })$([ $watch = 1 ] && echo " --watch-drain-secs $watch_drain")$([ "$members" != 1 ] && echo " --members $members")$([ -n "$member_cores" ] && echo " --member-cores $member_cores")$([ -n "$workloads_arg" ] && echo " --workloads \"$workloads_arg\"")\`"
  echo "Machine: $(nproc) cores, $(uname -sr), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo).$([ $watch_only = 0 ] && echo " Load: 64 clients over 8 connections, 8-byte keys, 256-byte values, 1 bench thread sharing the cores.")"
  if [ "$watch_only" = 0 ]; then
    echo
    echo "| workload | etcd ops/s | keelson ops/s | ratio | etcd p99 µs | keelson p99 µs | etcd server CPU µs/op | keelson server CPU µs/op | CPU ratio | kernel workers µs/op (etcd / keelson run) | CPU ratio with kernel workers | bench CPU µs/op (etcd / keelson run) | host steal ms (etcd / keelson run) |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for w in $workloads; do
      e="$tmp/etcd-$w.json"; k="$tmp/keelson-$w.json"
      eo=$(field "$e" ops_per_s); ko=$(field "$k" ops_per_s)
      ep=$(field "$e" p99_us); kp=$(field "$k" p99_us)
      ec=$(field "$e" server_cpu_us_per_op); kc=$(field "$k" server_cpu_us_per_op)
      eb=$(field "$e" bench_cpu_us_per_op); kb=$(field "$k" bench_cpu_us_per_op)
      ee=$(field "$e" errors); ke=$(field "$k" errors)
      ratio=$(awk -v a="$ko" -v b="$eo" 'BEGIN { printf "%.2fx", a/b }')
      cratio=$(awk -v a="$kc" -v b="$ec" 'BEGIN { printf "1/%.1f", b/a }')
      ew=$(field "$e" kworker_cpu_us_per_op); kw=$(field "$k" kworker_cpu_us_per_op)
      wratio=$(awk -v a="$kc" -v b="$ec" -v x="$kw" -v y="$ew" 'BEGIN { printf "1/%.1f", (b+y)/(a+x) }')
      note=""
      if [ "$ee" != 0 ] || [ "$ke" != 0 ]; then note=" (errors: etcd $ee, keelson $ke)"; fi
      es=$(field "$e" host_steal_ms); ks=$(field "$k" host_steal_ms)
      echo "| $w$note | ${eo%.*} | ${ko%.*} | $ratio | $ep | $kp | $ec | $kc | $cratio | $ew / $kw | $wratio | $eb / $kb | $es / $ks |"
    done
    if [ "$memory" = 1 ]; then
      read -r -d '' em < <(rss_after_keys etcd 26379) || true
      read -r -d '' km < <(rss_after_keys keelson 27379) || true
      # shellcheck disable=SC2086
      set -- $em; e1=$1 e1a=$2 e1f=$3 e2=$4 e2a=$5 e2f=$6
      # shellcheck disable=SC2086
      set -- $km; k1=$1 k1a=$2 k1f=$3 k2=$4 k2a=$5 k2f=$6
      r() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a/b; else print "-" }'; }
      echo
      echo "Memory after putting $memory_keys distinct 8-byte keys with 256-byte values: etcd RSS ${e1} MiB, keelson RSS ${k1} MiB (ratio $(r "$k1" "$e1")); anonymous / file-backed: etcd ${e1a} / ${e1f}, keelson ${k1a} / ${k1f} MiB."
      echo "After then reading every key once (serializable ranges of one key): etcd RSS ${e2} MiB, keelson RSS ${k2} MiB (ratio $(r "$k2" "$e2")); anonymous / file-backed: etcd ${e2a} / ${e2f}, keelson ${k2a} / ${k2f} MiB (ratio of anonymous memory $(r "$k2a" "$e2a"))."
    fi
  fi
  if [ "$watch" = 1 ]; then
    echo
    echo "Watch: watchers on one prefix spread over Watch streams, then puts (8-byte keys under the prefix, 256-byte values carrying their send time); event latency is receive time minus send time, events/s is events received over the time from the first put to the last event. Bytes per watcher: server RSS after all watchers are created minus before, over the watchers, on a fresh server, measured after the connections are up and before the streams open, so it includes per-stream costs (which dominate at 1000 watchers; the 100000-watcher row is the per-watcher figure); settled: the same, RSS read again ${watch_settle} s later, before any put. Ratios are keelson / etcd. Drain bound ${watch_drain} s."
    echo
    echo "| watchers / streams / conns / puts in flight / puts | etcd events/s | keelson events/s | ratio | etcd event p50 µs | keelson event p50 µs | etcd event p99 µs | keelson event p99 µs | p99 ratio | etcd bytes/watcher | keelson bytes/watcher | memory ratio | bytes/watcher settled (etcd / keelson) | events received of expected (etcd; keelson) | server CPU µs/event (etcd / keelson) | watcher setup s (etcd / keelson) |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for c in $watch_cases; do
      e="$tmp/etcd-watch-$c.json"; k="$tmp/keelson-watch-$c.json"
      eo=$(wfield "$e" events_per_s); ko=$(wfield "$k" events_per_s)
      e50=$(wfield "$e" event_p50_us); k50=$(wfield "$k" event_p50_us)
      e99=$(wfield "$e" event_p99_us); k99=$(wfield "$k" event_p99_us)
      em=$(wfield "$e" bytes_per_watcher); km=$(wfield "$k" bytes_per_watcher)
      echo "| ${c//:/ \/ } | ${eo%.*} | ${ko%.*} | $(wratio "$ko" "$eo") | $e50 | $k50 | $e99 | $k99 | $(wratio "$k99" "$e99") | $em | $km | $(wratio "$km" "$em") | $(wfield "$e" bytes_per_watcher_settled) / $(wfield "$k" bytes_per_watcher_settled) | $(wfield "$e" events_received) of $(wfield "$e" events_expected); $(wfield "$k" events_received) of $(wfield "$k" events_expected) | $(wfield "$e" server_cpu_us_per_event) / $(wfield "$k" server_cpu_us_per_event) | $(wfield "$e" watch_setup_s) / $(wfield "$k" watch_setup_s) |"
    done
  fi
} >> perf/RESULTS.md
tail -20 perf/RESULTS.md
