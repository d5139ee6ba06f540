#!/usr/bin/env bash
# Writes the DNS benchmarks' policy and inventory into DIR: policy.yaml (1,000 matchPattern
# rules, the one matching the benchmark names last) and endpoints.yaml (dnsperf -> kube-dns).
# Usage: bench/dns/write-policy.sh DIR     (used by run.sh and ab.sh)
set -euo pipefail
# 999 patterns that never match the benchmark names, then the one that does.
{
  cat <<EOF
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns-bench, namespace: bench}
spec:
  endpointSelector: {matchLabels: {app: dnsperf}}
  egress:
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
    toPorts:
    - ports: [{port: "53", protocol: UDP}]
      rules:
        dns:
EOF
  for i in $(seq 1 999); do echo "        - {matchPattern: \"*.svc$i.cluster$((i % 7)).example.com\"}"; done
  echo '        - {matchPattern: "*.bench.test"}'
} > "$1/policy.yaml"
cat > "$1/endpoints.yaml" <<EOF
endpoints:
  - {name: dnsperf, namespace: bench, labels: {app: dnsperf}, ips: [127.0.0.1]}
  - {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}, ips: [127.0.0.53]}
EOF
