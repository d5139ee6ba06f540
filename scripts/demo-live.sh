#!/usr/bin/env bash
# Part 3 of the demo (root): sidecarless enforcement for real, as `tollgate demo` (cli/src/demo.rs).
# Each "pod" is a network namespace with a veth into a node namespace; `tollgate up
# --external-proxy` (datapath + agent) and a separate `tollgate proxy --agent` enforce
# conformance/policies/gateway (HTTP, gRPC), a DNS policy and Kafka rules (a real tansu broker in a
# "kafka" pod, when scripts/setup-proxy.sh installed it). The pods send real requests (curl, grpcio,
# dig, kcat); each verdict is printed, then the audit records from the proxy's Observe stream, then
# everything is removed. Exits non-zero when an outcome differs from the policy.
# Arguments go to `tollgate demo` (--keep, --skip-kafka).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/demo-live.sh needs root (network namespaces, eBPF)"; exit 0; }
cargo build -q --release -p tollgate
printf '\n\033[1m$ tollgate demo %s\033[0m\n' "$*"
exec target/release/tollgate demo "$@"
