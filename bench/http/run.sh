#!/usr/bin/env bash
# HTTP/1.1 benchmark: the same 100 method+path regex rules (only the last matches) through
# tollgate and HAProxy, plus the origin direct, in one run. wrk -t1 -c50 pinned to CPU 0; the
# system under test pinned to CPU 1 (tollgate with one tokio worker thread).
# Usage: bench/http/run.sh [DURATION_SECONDS]   (bounded; loopback only)
set -euo pipefail
cd "$(dirname "$0")/../.."
DUR=${1:-10}
P=../shared/peers
bash $P/install-apt.sh >/dev/null
bash $P/gen-configs.sh >/dev/null
bash $P/gen-cnp.sh >/dev/null
# shellcheck disable=SC1091
source $P/env.sh
bash $P/peer.sh start nginx haproxy >/dev/null
cargo build --release -q -p tollgate
FEAS=${FEAS:-${TMPDIR:-/tmp}/tollgate-peers}
TG_PORT=18140
TOKIO_WORKER_THREADS=1 taskset -c 1 target/release/tollgate proxy \
  --policies "$FEAS/conf/bench-policy/bench.yaml" --endpoints "$FEAS/conf/bench-endpoints.yaml" \
  --listen 127.0.0.1:$TG_PORT --to bench-origin:18080@127.0.0.1:$PORT_NGINX_H1 \
  --audit-log /dev/null >/dev/null 2>&1 &
TG=$!
trap 'kill $TG 2>/dev/null; bash $P/peer.sh stop nginx haproxy >/dev/null' EXIT
sleep 0.5
printf '| target | req/s | p50 | p99 |\n|---|---|---|---|\n'
for t in "direct $PORT_NGINX_H1" "haproxy-100-acls $PORT_HAPROXY_H1" "tollgate-100-rules $TG_PORT"; do
  set -- $t
  out=$(taskset -c 0 wrk -t1 -c50 -d"${DUR}s" --latency "http://127.0.0.1:$2$BENCH_PATH")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  printf '| %s | %s | %s | %s |\n' "$1" "$rps" "$p50" "$p99"
done
