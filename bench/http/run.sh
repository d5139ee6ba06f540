#!/usr/bin/env bash
# HTTP benchmark, one run, same rules everywhere (../shared/peers: the last of NACL
# method+path regex rules matches). wrk/h2load pinned to CPU 0, the system under test to CPU 1
# (tollgate with one current-thread tokio runtime). Bounded; loopback only.
#   h1:   wrk -t1 -c50 -dD  vs direct nginx, HAProxy, nginx-proxy, Envoy, tollgate (100 rules)
#   h2c:  h2load -c50 -m1 -DD vs direct, HAProxy, tollgate; and the issue's shape, 10
#         connections x 10 streams (-c10 -m10), vs direct, HAProxy, nginx-proxy, Envoy, tollgate
#   1000: tollgate with 1,000 rules (h1)
#   mem:  tollgate RSS with 1,000 idle client connections
#   CPU:  per row, user+system CPU of the process(es) listening on the target port (the system
#         under test; for "nginx direct" the origin itself) per request and as % of one core
# Usage: bench/http/run.sh [DURATION_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
DUR=${1:-10}
P=../shared/peers
bash $P/install-apt.sh >/dev/null
bash $P/install-envoy.sh >/dev/null
NACL=100 bash $P/gen-configs.sh >/dev/null
NACL=100 bash $P/gen-envoy.sh >/dev/null
# shellcheck disable=SC1091
source $P/env.sh
FEAS=${FEAS:-${TMPDIR:-/tmp}/tollgate-peers}
bash $P/peer.sh start nginx nginx-proxy haproxy envoy >/dev/null
cargo build --release -q -p tollgate
TG=18140
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; bash $P/peer.sh stop nginx nginx-proxy haproxy envoy >/dev/null; }
trap cleanup EXIT

start_tollgate() { # rules
  NACL=$1 bash $P/gen-cnp.sh >/dev/null
  cp "$FEAS/conf/bench-policy/bench.yaml" "$FEAS/conf/bench-policy/bench-$1.yaml"
  TOKIO_WORKER_THREADS=1 taskset -c 1 target/release/tollgate proxy \
    --policies "$FEAS/conf/bench-policy/bench-$1.yaml" --endpoints "$FEAS/conf/bench-endpoints.yaml" \
    --listen 127.0.0.1:$TG --to bench-origin:18080@127.0.0.1:$PORT_NGINX_H1 \
    --audit-log /dev/null >/dev/null 2>&1 &
  PIDS+=($!)
  sleep 0.7
}
stop_tollgate() { kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'; }

# CPU ticks (user + system, all threads) of every process listening on port $1: the system
# under test of a row (for nginx: master and workers).
cpu_ticks() {
  local t=0 pid
  for pid in $(ss -Htlnp "sport = :$1" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
    t=$(( t + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0) ))
  done
  echo "$t"
}
# CPU per request and CPU use of the SUT over a row: ticks before/after, requests/s, seconds.
cpu_cols() { # ticks_before ticks_after rps
  python3 -c "import os,sys; b,a,r,d=map(float,sys.argv[1:]); hz=os.sysconf('SC_CLK_TCK'); cpu=(a-b)/hz; print(f'{cpu/(r*d)*1e6:.1f} | {100*cpu/d:.0f}%')" "$1" "$2" "$3" "$DUR"
}
h1() { # label port
  local b a out rps; b=$(cpu_ticks "$2")
  out=$(taskset -c 0 wrk -t1 -c50 -d"${DUR}s" --latency "http://127.0.0.1:$2$BENCH_PATH")
  a=$(cpu_ticks "$2"); rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  printf '| h1 | %s | %s | %s | %s | %s |\n' "$1" "$rps" \
    "$(awk '$1=="50%" {print $2}' <<<"$out")" "$(awk '$1=="99%" {print $2}' <<<"$out")" "$(cpu_cols "$b" "$a" "$rps")"
}
h2() { # label port [connections streams]
  local b a out rps c=${3:-50} m=${4:-1} proto=h2c; b=$(cpu_ticks "$2")
  [ "$c/$m" = 50/1 ] || proto="h2c ${c}×${m}"
  out=$(taskset -c 0 h2load -t1 -c"$c" -m"$m" -D"$DUR" "http://127.0.0.1:$2$BENCH_PATH" 2>&1)
  a=$(cpu_ticks "$2"); rps=$(awk '/^finished in/ {print $4}' <<<"$out")
  printf '| %s | %s | %s | %s | - | %s |\n' "$proto" "$1" "$rps" \
    "$(awk '/^time for request:/ {print $6}' <<<"$out")" "$(cpu_cols "$b" "$a" "$rps")"
}

printf '| proto | target | req/s | p50 (h2c: mean) | p99 | SUT CPU µs/req | SUT CPU |\n|---|---|---|---|---|---|---|\n'
start_tollgate 100
h1 "nginx direct" "$PORT_NGINX_H1"
h1 "HAProxy, 100 ACLs" "$PORT_HAPROXY_H1"
h1 "nginx proxy, 100 rules" "$PORT_NGXPROXY_H1"
h1 "Envoy, 100 RBAC rules" "$PORT_ENVOY_H1"
h1 "tollgate, 100 rules" "$TG"
h2 "nginx direct" "$PORT_NGINX_H2C"
h2 "HAProxy, 100 ACLs" "$PORT_HAPROXY_H2C"
h2 "tollgate, 100 rules" "$TG"
h2 "nginx direct" "$PORT_NGINX_H2C" 10 10
h2 "HAProxy, 100 ACLs" "$PORT_HAPROXY_H2C" 10 10
h2 "nginx proxy, 100 rules" "$PORT_NGXPROXY_H2C" 10 10
h2 "Envoy, 100 RBAC rules" "$PORT_ENVOY_H2C" 10 10
h2 "tollgate, 100 rules" "$TG" 10 10
# Memory per idle connection: 1,000 idle HTTP/1.1 connections (one request each, then idle).
pid=${PIDS[-1]}
before=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
rm -f /tmp/tollgate-idle-ready
python3 - "$TG" "$BENCH_PATH" <<'PY' &
import socket, sys, time
port, path = int(sys.argv[1]), sys.argv[2]
conns = []
for _ in range(1000):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
    s.recv(4096)
    conns.append(s)
time.sleep(1)
open("/tmp/tollgate-idle-ready", "w").write("1")
time.sleep(3)
PY
idle=$!
for _ in $(seq 100); do [ -e /tmp/tollgate-idle-ready ] && break; sleep 0.1; done
after=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
wait $idle
stop_tollgate
start_tollgate 1000
h1 "tollgate, 1,000 rules" "$TG"
stop_tollgate
echo
echo "tollgate RSS: ${before} KiB before, ${after} KiB with 1,000 idle connections: $(( (after - before) * 1024 / 1000 )) bytes per idle connection"
