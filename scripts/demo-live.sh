#!/usr/bin/env bash
# Part 3 of the demo (root): sidecarless enforcement for real. Each "pod" is a network
# namespace with a veth into a node namespace; `tollgate up` attaches the eBPF datapath to the
# pods' veths, redirects HTTP and DNS flows that have L7 rules to its proxy, and enforces
# conformance/policies/gateway plus a DNS policy and Kafka rules (a real tansu broker in a "kafka"
# pod, when scripts/setup-proxy.sh installed it). The pods send real requests (curl, dig, kcat);
# the audit records are shown with `tollgate observe`, then everything is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/demo-live.sh needs root (network namespaces, eBPF)"; exit 0; }
cargo build -q --release -p tollgate
tg=$(pwd)/target/release/tollgate
ID=$$
NODE=tgd$ID-node
PIN=/sys/fs/bpf/tollgate-demo-$ID
work=$(mktemp -d)
pids=()
pods=(frontend api-server admin unauthorized resolver kafka billing)
# Kafka: the broker (tansu) and clients (kcat, confluent-kafka) of the peers test bed.
FEAS=${FEAS:-/tmp/tollgate-peers}
tansu=$FEAS/opt/bin/tansu; py=$FEAS/venv/bin/python; kcat=$(cd .. && pwd)/shared/peers/kcat.sh
kafka_ok=1 kafka_why="tansu, kcat or confluent-kafka is missing: run scripts/setup-proxy.sh"
{ [ -x "$tansu" ] && [ -x "$kcat" ] && "$py" -c "import confluent_kafka" 2>/dev/null; } || kafka_ok=0

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for p in "${pods[@]}"; do ip netns del "tgd$ID-$p" 2>/dev/null || true; done
  ip netns del "$NODE" 2>/dev/null || true
  rm -rf "$PIN" "$work"
}
trap cleanup EXIT
say() { printf '\n\033[1m%s\033[0m\n' "$*"; }

say "== 3. Sidecarless: pods as network namespaces, tollgate up on the node =="
ip netns add "$NODE"
ip netns exec "$NODE" sysctl -qw net.ipv4.ip_forward=1
ip -n "$NODE" link set lo up
{
  echo "endpoints:"
  i=0
  for p in "${pods[@]}"; do
    i=$((i + 1)); ns=tgd$ID-$p; ifn=tgd${ID}p$i
    ip netns add "$ns"; ip -n "$ns" link set lo up
    ip -n "$NODE" link add "$ifn" type veth peer name eth0 netns "$ns"
    ip -n "$NODE" addr add "10.210.$i.1/24" dev "$ifn"; ip -n "$NODE" link set "$ifn" up
    ip -n "$ns" addr add "10.210.$i.2/24" dev eth0; ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "10.210.$i.1"
    case $p in
      frontend) labels="{app: frontend}" ;;
      api-server) labels="{app: api-server}" ;;
      admin) labels="{app: admin, role: ops}" ;;
      unauthorized) labels="{app: intruder}" ;;
      resolver) labels="{k8s-app: kube-dns}" ;;
      kafka) labels="{app: kafka}" ;;
      billing) labels="{app: billing}" ;;
    esac
    nsname=prod; [ "$p" = resolver ] && nsname=kube-system
    echo "  - {name: $p, namespace: $nsname, labels: $labels, ips: [10.210.$i.2], interface: $ifn}"
  done
} > "$work/endpoints.yaml"
api=10.210.2.2; dns=10.210.5.2; kafka=10.210.6.2
cat "$work/endpoints.yaml"

# The api-server: a real HTTP server with the paths the gateway policy talks about.
mkdir -p "$work/www/public" "$work/www/api/v1/users" "$work/www/admin/debug"
echo "hello" > "$work/www/public/index.html"; echo '{"id":7}' > "$work/www/api/v1/users/7"
echo "alice,bob" > "$work/www/admin/users"; echo "goroutines..." > "$work/www/admin/debug/pprof"
ip netns exec "tgd$ID-api-server" python3 -m http.server 8080 --bind $api --directory "$work/www" \
  >/dev/null 2>&1 & pids+=($!)
# The resolver: dnsmasq with two names.
ip netns exec "tgd$ID-resolver" dnsmasq --keep-in-foreground -C /dev/null --port=53 \
  --listen-address=$dns --bind-interfaces --no-resolv --no-hosts --user=root --pid-file= \
  --host-record=api.example.com,192.0.2.10 --host-record=evil.example.org,192.0.2.66 \
  >/dev/null 2>&1 & pids+=($!)

for _ in $(seq 50); do
  ip netns exec "tgd$ID-api-server" curl -s -o /dev/null "http://$api:8080/public/index.html" && break
  sleep 0.1
done
# The kafka pod: tansu on the pod's own address (in memory; it creates no topic by itself, so the
# topics are created here, inside the pod, straight at the broker).
if [ $kafka_ok = 1 ]; then
  ip netns exec "tgd$ID-kafka" env RUST_LOG=warn "$tansu" broker --cluster-id demo \
    --listener-url "tcp://$kafka:9092" --advertised-listener-url "tcp://$kafka:9092" \
    --storage-engine memory://tansu/ >"$work/tansu.log" 2>&1 & pids+=($!)
  for _ in $(seq 50); do
    ip netns exec "tgd$ID-kafka" timeout 1 bash -c "exec 3<>/dev/tcp/$kafka/9092" 2>/dev/null && break
    sleep 0.1
  done
  ip netns exec "tgd$ID-kafka" timeout 30 "$py" - "$kafka:9092" <<'EOF' \
    || { kafka_ok=0; kafka_why="the broker did not start or create its topics: $(tail -c 300 "$work/tansu.log")"; }
import sys
from confluent_kafka.admin import AdminClient, NewTopic
a = AdminClient({"bootstrap.servers": sys.argv[1]})
fs = a.create_topics([NewTopic(t, num_partitions=1, replication_factor=1)
                      for t in ("orders-eu", "orders-secret", "payments")], request_timeout=10)
for t, f in fs.items():
    f.result(15)
print("kafka pod: tansu on %s, topics %s" % (sys.argv[1], ", ".join(sorted(fs))))
EOF
fi
mkdir "$work/policies"
cp conformance/policies/gateway/policies.yaml "$work/policies/gateway.yaml"
cat > "$work/policies/dns.yaml" <<'EOF'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: frontend-egress, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
  - toEndpoints: [{matchLabels: {app: api-server}}]
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.example.com"}]
EOF
cat > "$work/policies/kafka.yaml" <<'EOF'
apiVersion: tollgate.io/v1alpha1
kind: TollgatePolicy
metadata: {name: orders-kafka, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: billing}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
        - {role: produce, topic: "orders-*"}
        - {role: consume, topic: "orders-*", groupID: "billing-*"}
        # Fetch and ListOffsets name no consumer group, so the groupID rule cannot cover them.
        - {apiKey: fetch, topic: "orders-*"}
        - {apiKey: listoffsets, topic: "orders-*"}
        - {topic: orders-secret, action: deny}
EOF
say "\$ tollgate up --policies policies/ --endpoints endpoints.yaml   (in the node namespace)"
nsenter --net="/run/netns/$NODE" "$tg" up --policies "$work/policies" --endpoints "$work/endpoints.yaml" \
  --pin-root "$PIN" --audit-log "$work/audit.jsonl" 2>"$work/up.log" & pids+=($!)
for _ in $(seq 100); do grep -q "revision 1:" "$work/up.log" 2>/dev/null && break; sleep 0.1; done
cat "$work/up.log"

req() { # pod method path [curl args]
  local pod=$1 m=$2 p=$3; shift 3
  printf '  %-13s %-7s %-26s -> ' "$pod" "$m" "$p"
  show "$(ip netns exec "tgd$ID-$pod" curl -s --path-as-is --max-time 3 -X "$m" "$@" -o /dev/null \
    -w '%{http_code}' "http://$api:8080$p" || true)"
}
show() { if [ "$1" = 000 ]; then echo "dropped (no connection)"; else echo "$1"; fi; }
say "HTTP from the pods to the api-server (its ingress rules are L7):"
req frontend GET /public/index.html
req frontend GET /api/v1/users/7 -H 'Authorization: Bearer x'
req frontend GET /api/v1/users/7
req unauthorized GET /public/index.html
req unauthorized GET /admin/users
req admin GET /admin/users
req admin GET /admin/debug/pprof
say "DNS from the frontend to the resolver (its egress DNS rules):"
for name in api.example.com evil.example.org; do
  printf '  %-13s dig %-20s -> ' frontend "$name"
  ip netns exec "tgd$ID-frontend" dig +tries=1 +time=2 +noall +comments @$dns "$name" \
    | grep -o 'status: [A-Z]*' || echo "no answer"
done
if [ $kafka_ok = 1 ]; then
  say "Kafka from the billing pod to the broker (its ingress rules are Kafka rules; kcat on confluent-kafka's librdkafka):"
  sed -n '/^  ingress:/,$p' "$work/policies/kafka.yaml"
  kc() { # pod kcat-args... : what kcat printed (errors included) and its exit status, bounded
    local pod=$1 rc=0; shift
    ip netns exec "tgd$ID-$pod" timeout 15 "$kcat" -b "$kafka:9092" -X client.id="$pod" \
      -X socket.timeout.ms=4000 "$@" >"$work/kcat.out" 2>&1 || rc=$?
    { grep -v '|OFFSET|' "$work/kcat.out" || true; } | head -8 | sed 's/^/      /'
    echo "      (kcat exit $rc)"
  }
  for t in orders-eu payments orders-secret; do
    echo "  billing: kcat -P -t $t   (3 messages)"
    printf 'm1\nm2\nm3\n' | kc billing -P -t "$t" -X message.timeout.ms=4000
  done
  for g in billing-eu analytics; do
    echo "  billing: kcat -G $g orders-eu   (consumer group, until the end of the topic)"
    kc billing -G "$g" -X auto.offset.reset=earliest -e orders-eu
  done
  printf '  unauthorized -> kafka %s:9092 (no rule for it: dropped in the kernel) -> ' "$kafka"
  if ip netns exec "tgd$ID-unauthorized" timeout 2 bash -c "exec 3<>/dev/tcp/$kafka/9092" 2>/dev/null; then
    echo connected; else echo "no connection"; fi
  echo "  what the broker holds (read inside the kafka pod, not through tollgate):"
  for t in orders-eu payments orders-secret; do
    n=$(ip netns exec "tgd$ID-kafka" timeout 15 "$kcat" -b "$kafka:9092" -C -t "$t" -o beginning -e -q \
      -X socket.timeout.ms=4000 2>/dev/null | wc -l || true)
    echo "      $t: $n messages"
  done
fi
say "The frontend's egress is enforced in the kernel: it may reach the api-server and the resolver, nothing else:"
printf '  frontend -> admin 10.210.3.2:22 -> '
show "$(ip netns exec "tgd$ID-frontend" curl -s --connect-timeout 1 "http://10.210.3.2:22" \
  -o /dev/null -w '%{http_code}' || true)"
sleep 1
say "\$ tollgate observe -f audit.jsonl"
"$tg" observe -f "$work/audit.jsonl" || true
if [ $kafka_ok = 1 ]; then
  say "\$ tollgate observe -f audit.jsonl --protocol kafka -o json   (the Kafka fields of each record)"
  "$tg" observe -f "$work/audit.jsonl" --protocol kafka -o json >"$work/kafka.jsonl" || true
  python3 - "$work/kafka.jsonl" <<'EOF' || true
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    k, s, d = r.get("kafka", {}), r["source"], r["destination"]
    what = " ".join(f"{f}={','.join(k[f])}" for f in ("topics", "groups") if k.get(f))
    err = f"error_code={k['error_code']}" if "error_code" in k else f"({r.get('detail', 'no answer')})"
    print(f"  {r['verdict']} {s.get('name')} {s['ip']} -> {d.get('name')} {d['ip']}:{d['port']}"
          f"  {k.get('api_key')} v{k.get('api_version')} {what} {err}  [{r['reason']}] {r.get('rule', '')}")
EOF
else
  say "(Kafka part skipped: $kafka_why)"
fi
say "\$ tollgate datapath status"
nsenter --net="/run/netns/$NODE" "$tg" datapath status --pin-root "$PIN" | head -30 || true
