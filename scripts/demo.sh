#!/usr/bin/env bash
# The main job, runnable on a fresh machine. Part 1 walks through what a platform team does
# first with L7 policy YAML (lint, what-if, policy test tables). Part 2 enforces the same
# policies live: tollgate's proxy in front of a real nginx on loopback, curl as three "pods"
# (each its own 127.0.0.x source address), then the audit records via `tollgate observe` and
# the Prometheus counters. Part 3 (root) runs scripts/demo-live.sh, i.e. `tollgate demo`: pods as
# network namespaces, `tollgate up` with the eBPF datapath and a separate `tollgate proxy
# --agent`. Everything it starts, it stops.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
cargo build -q --release -p tollgate
tg=target/release/tollgate
ex=conformance/policies/gateway

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@" || true; }

printf '\n\033[1;34m== 1. Policy as code: lint, what-if, tests ==\033[0m\n'
run $tg lint conformance/policies/
run $tg lint docs/examples/broken.yaml
for args in \
  "--from world --to api-server --port 8080 --http-method GET --http-path /public/index.html" \
  "--from frontend --to api-server --port 8080 --http-method GET --http-path /public/../admin/users" \
  "--from admin --to api-server --port 8080 --http-method GET --http-path /admin/debug/pprof" \
  "--from admin --to api-server --port 8080 --http-method DELETE --http-path /admin/users/7" \
  "--from grpc-client --to greeter --port 50051 --grpc helloworld.Greeter/SayHello"; do
  # shellcheck disable=SC2086
  run $tg eval -f $ex --endpoints $ex/endpoints.yaml $args
done
say "$tg test conformance/policies/ | tail -3"
$tg test conformance/policies/ | tail -3

printf '\n\033[1;34m== 2. Enforcement: the proxy in front of a real nginx ==\033[0m\n'
work=$(mktemp -d)
origin=18480; proxy=18481; metrics=18482
cat > "$work/nginx.conf" <<CONF
daemon off; worker_processes 1; pid $work/nginx.pid; error_log $work/error.log;
events { worker_connections 64; }
http { access_log off; client_body_temp_path $work/b; proxy_temp_path $work/p;
  fastcgi_temp_path $work/f; uwsgi_temp_path $work/u; scgi_temp_path $work/s;
  server { listen 127.0.0.1:$origin; location / { return 200 "nginx says hi to \$request_uri\n"; } } }
CONF
cat > "$work/endpoints.yaml" <<CONF
endpoints:
  - {name: frontend, namespace: prod, labels: {app: frontend}, ips: [127.0.0.10]}
  - {name: api-server, namespace: prod, labels: {app: api-server}, ips: [127.0.0.20]}
  - {name: admin, namespace: prod, labels: {app: admin, role: ops}, ips: [127.0.0.30]}
CONF
nginx -c "$work/nginx.conf" & ngx=$!
$tg proxy --policies $ex/policies.yaml --endpoints "$work/endpoints.yaml" \
  --listen 127.0.0.1:$proxy --to api-server:8080@127.0.0.1:$origin \
  --audit-log "$work/audit.jsonl" --metrics 127.0.0.1:$metrics 2>"$work/proxy.log" & px=$!
trap 'kill $px $ngx 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
sleep 1
req() { # pod-ip method path [curl args]
  local ip=$1 m=$2 p=$3; shift 3
  printf '%-22s %-7s %-28s -> ' "pod $ip" "$m" "$p"
  curl -s --path-as-is --interface "$ip" -X "$m" "$@" -w ' [%{http_code}]\n' "http://127.0.0.1:$proxy$p" | tr -d '\r\n' ; echo
}
req 127.0.0.10 GET /public/index.html
req 127.0.0.10 GET /api/v1/users/7 -H 'Authorization: Bearer x'
req 127.0.0.10 GET /api/v1/users/7
req 127.0.0.10 GET /public/../admin/users
req 127.0.0.10 GET '/public/%2e%2e%2Fadmin'
req 127.0.0.30 GET /admin/users
req 127.0.0.30 GET /admin/debug/pprof
req 127.0.0.30 DELETE /admin/users/7
sleep 1
run $tg observe -f "$work/audit.jsonl"
say "curl -s http://127.0.0.1:$metrics/metrics | grep ^tollgate_"
curl -s "http://127.0.0.1:$metrics/metrics" | grep '^tollgate_' || true

if [ "$(id -u)" = 0 ]; then
  bash scripts/demo-live.sh
else
  printf '\n(part 3, pods as network namespaces with the eBPF datapath, needs root: sudo scripts/demo-live.sh)\n'
fi
