#!/usr/bin/env bash
# A/B of two tollgate builds: CPU per request under h2c and HTTP/1.1 load, alternating.
# Usage (root of the repo): bench/http/ab-cpu.sh BIN_A BIN_B   (release builds of tollgate)
# 3 rounds; in each, per build: 6 s of h2load -c50 -m1 and 6 s of wrk -t1 -c50 through the
# proxy (CPU 1, one tokio worker; clients on CPU 0), nginx from ../shared/peers as the origin,
# the 100-rule bench policy. Prints req/s, CPU µs per request and CPU % of the proxy process.
set -euo pipefail
cd "$(dirname "$0")/../.."
P=../shared/peers
bash $P/install-apt.sh >/dev/null
NACL=100 bash $P/gen-configs.sh >/dev/null
NACL=100 bash $P/gen-cnp.sh >/dev/null
source $P/env.sh
FEAS=${FEAS:-/tmp/tollgate-peers}
bash $P/peer.sh start nginx >/dev/null
trap 'bash $P/peer.sh stop nginx >/dev/null' EXIT
hz=$(getconf CLK_TCK)
for round in 1 2 3; do
for BIN in "$@"; do
  TOKIO_WORKER_THREADS=1 taskset -c 1 $BIN proxy \
    --policies "$FEAS/conf/bench-policy/bench.yaml" --endpoints "$FEAS/conf/bench-endpoints.yaml" \
    --listen 127.0.0.1:18140 --to bench-origin:18080@127.0.0.1:$PORT_NGINX_H1 \
    --audit-log /dev/null >/dev/null 2>&1 &
  TP=$!; sleep 0.8
  for proto in h2c h1; do
    b=$(awk '{print $14+$15}' /proc/$TP/stat)
    if [ $proto = h2c ]; then
      rps=$(taskset -c 0 h2load -c50 -m1 -D6 "http://127.0.0.1:18140$BENCH_PATH" | awk '/finished in/ {print $4}')
    else
      rps=$(taskset -c 0 wrk -t1 -c50 -d6s "http://127.0.0.1:18140$BENCH_PATH" | awk '/Requests\/sec/ {print $2}')
    fi
    a=$(awk '{print $14+$15}' /proc/$TP/stat)
    python3 -c "import sys; b,a,r=map(float,sys.argv[1:4]); print(f'round $round $proto $(basename $BIN): {r:.0f} req/s, {(a-b)/$hz/(r*6)*1e6:.1f} us CPU/req, {100*(a-b)/$hz/6:.0f}% CPU')" $b $a $rps
  done
  kill $TP; wait $TP 2>/dev/null || true
done
done
