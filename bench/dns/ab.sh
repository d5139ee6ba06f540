#!/usr/bin/env bash
# A/B of saved tollgate builds on the DNS path: per build and round, dnsperf at full speed
# through the proxy (run.sh's layout and policy: proxy on CPU 1, unbound and dnsperf on CPU 0)
# and the proxy's CPU time per answered query (utime + stime from /proc/PID/stat over the
# middle SECONDS of the run, divided by its tollgate_requests_total delta).
#
# Usage: bench/dns/ab.sh [-r ROUNDS] [-s SECONDS] BIN...     (defaults 2 rounds, 6 s)
# Needs: scripts/setup-proxy.sh (unbound, dnsperf) and ../shared/peers.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=2
SECS=6
while getopts "r:s:" o; do
  case $o in r) ROUNDS=$OPTARG ;; s) SECS=$OPTARG ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "usage: $0 [-r ROUNDS] [-s SECONDS] BIN..." >&2; exit 2; }
PEERS="$(pwd)/../shared/peers"
# shellcheck disable=SC1091
. "$PEERS/env.sh"
bash "$PEERS/gen-configs.sh" >/dev/null
WORK=$(mktemp -d)
PORT=15300
METRICS=15309
PID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  bash "$PEERS/peer.sh" stop unbound >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
bash bench/dns/write-policy.sh "$WORK"
bash "$PEERS/peer.sh" start unbound >/dev/null
taskset -a -pc 0 "$(pid_of unbound)" >/dev/null
answered() { curl -s "127.0.0.1:$METRICS/metrics" | awk '/^tollgate_requests_total.*protocol="dns"/{n+=$2} END{print n+0}'; }
perf_run() { taskset -c 0 dnsperf -s 127.0.0.1 -p "$PORT" -d "$CONF/dnsperf-queries.txt" -l "$1" -t 2 -c 8 -T 1 -q 200; }
for round in $(seq "$ROUNDS"); do
  for bin in "$@"; do
    taskset -c "$CPU_SUT" "$bin" proxy --policies "$WORK/policy.yaml" --endpoints "$WORK/endpoints.yaml" \
      --dns-listen "127.0.0.1:$PORT" --dns-to "kube-dns@127.0.0.1:$PORT_UNBOUND" \
      --metrics "127.0.0.1:$METRICS" 2>"$WORK/proxy.log" &
    PID=$!
    for _ in $(seq 50); do dig +short +tries=1 +time=1 @127.0.0.1 -p "$PORT" h0001.bench.test | grep -q 127.1 && break; sleep 0.1; done
    perf_run 2 >/dev/null 2>&1   # warm-up
    perf_run $((SECS + 4)) >"$WORK/out" 2>&1 &
    DP=$!
    sleep 2
    c0=$(cpu_ticks "$PID"); q0=$(answered)
    sleep "$SECS"
    c1=$(cpu_ticks "$PID"); q1=$(answered)
    wait $DP
    awk -v c=$((c1 - c0)) -v q=$((q1 - q0)) -v hz="$HZ" -v s="$SECS" -v r="$round" -v b="$bin" \
      '/Queries per second/{qps=$4} /Queries lost/{l=$3}
       END{printf "round %s %s: %.0f qps, %s lost, proxy CPU %.2f us/query (%.0f %% of a core)\n", r, b, qps, l, c/hz*1e6/q, 100*c/hz/s}' "$WORK/out"
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
  done
done
