#!/usr/bin/env bash
# The main job, runnable on a fresh machine: builds tollgate and walks through what a platform
# team does first with L7 policy YAML — lint it, ask what-if questions, run the policy test
# tables. (The live demo in network namespaces replaces this once the agent lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
cargo build -q -p tollgate
tg=target/debug/tollgate
ex=conformance/policies/gateway

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@" || true; }

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
run $tg test conformance/policies/
