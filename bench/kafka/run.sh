#!/usr/bin/env bash
# Kafka benchmark: produce and consume throughput with kcat and confluent-kafka
# (../shared/peers/bench-kafka.sh, 100-byte messages) direct to tansu vs through tollgate's Kafka
# listener, in one run, alternating direct / tollgate each round; then the produce round trip
# one message at a time (bench/kafka/latency.py, acks=1) for p50/p99 and the latency tollgate adds.
#
# Usage: bench/kafka/run.sh [ROUNDS] [N]        (defaults 3, 200000; SIZE=100 LAT_N=2000)
# Needs: scripts/setup-proxy.sh (tansu, kcat, the venv with confluent-kafka) and ../shared/peers.
# Layout on a 2-core box, as ../shared/peers does: the system under test on CPU 1 — tansu in the
# direct runs, tollgate in the proxied runs (then tansu shares CPU 0 with the clients).
# Bounded: every client run has a timeout; everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
ROUNDS=${1:-3}
N=${2:-200000}
SIZE=${SIZE:-100}
LAT_N=${LAT_N:-2000}
PEERS="$ROOT/../shared/peers"
# shellcheck disable=SC1091
. "$PEERS/env.sh"
[ -x "$OPT/bin/tansu" ] || { echo "tansu missing: run scripts/setup-proxy.sh" >&2; exit 1; }
command -v kcat >/dev/null || { echo "kcat missing: run scripts/setup-proxy.sh" >&2; exit 1; }
"$PY" -c "import confluent_kafka" || { echo "confluent-kafka missing: run scripts/setup-proxy.sh" >&2; exit 1; }

cargo build -q --release -p tollgate
WORK=$(mktemp -d)
PROXY_PORT=${PROXY_PORT:-15400}
METRICS_PORT=${METRICS_PORT:-15409}
BOOT_DIRECT=127.0.0.1:$PORT_KAFKA
BOOT_TG=127.0.0.1:$PROXY_PORT
STARTED_TANSU=
cleanup() {
  [ -n "${TG_PID:-}" ] && kill "$TG_PID" 2>/dev/null && wait "$TG_PID" 2>/dev/null || true
  [ -n "$STARTED_TANSU" ] && bash "$PEERS/peer.sh" stop tansu >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The policy: produce and consume on `bench-*` topics (the benchmark's), topic creation, and 98
# topic rules for other services before them (every Produce/Fetch topic is checked against the set).
{
  cat <<EOF
apiVersion: tollgate.io/v1alpha1
kind: TollgatePolicy
metadata: {name: kafka-bench, namespace: bench}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: bench-client}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
EOF
  for i in $(seq 1 49); do
    echo "        - {role: produce, topic: \"svc$i-events-*\"}"
    echo "        - {role: consume, topic: \"svc$i-events-*\", groupID: \"svc$i-*\"}"
  done
  echo '        - {apiKey: createtopics}'
  echo '        - {role: produce, topic: "bench-*"}'
  echo '        - {role: consume, topic: "bench-*"}'
} > "$WORK/policy.yaml"
cat > "$WORK/endpoints.yaml" <<EOF
endpoints:
  - {name: bench-client, namespace: bench, labels: {app: bench-client}, ips: [127.0.0.1]}
  - {name: kafka, namespace: bench, labels: {app: kafka}, ips: [127.0.0.2]}
EOF
cargo run -q --release -p tollgate -- lint "$WORK/policy.yaml" >/dev/null

if ! pid_of tansu >/dev/null; then
  bash "$PEERS/peer.sh" start tansu >/dev/null
  STARTED_TANSU=1
fi
TANSU=$(pid_of tansu)

taskset -c "$CPU_SUT" cargo run -q --release -p tollgate -- proxy \
  --policies "$WORK/policy.yaml" --endpoints "$WORK/endpoints.yaml" \
  --kafka-listen "$BOOT_TG" --kafka-to "kafka:9092@$BOOT_DIRECT" \
  --metrics "127.0.0.1:$METRICS_PORT" --audit-log "$WORK/audit.jsonl" 2>"$WORK/proxy.log" &
TG_PID=$!
# cargo run may wait for the shared target dir's lock or rebuild first: wait (bounded) for
# the listener while the process lives.
for _ in $(seq 600); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PROXY_PORT") 2>/dev/null && break
  kill -0 "$TG_PID" 2>/dev/null || { cat "$WORK/proxy.log" >&2; echo "tollgate exited" >&2; exit 1; }
  sleep 0.5
done
wait_port "$PROXY_PORT" || { cat "$WORK/proxy.log" >&2; exit 1; }
# Probes: clients bootstrapped at tollgate are told that the broker is tollgate (fixed-listener
# rewrite), and the policy is applied (a topic outside bench-* is refused).
md=$(timeout 20 bash "$PEERS/kcat.sh" -L -b "$BOOT_TG" -m 5 2>&1 || true)
grep -q "at $BOOT_TG" <<<"$md" || { echo "metadata through tollgate does not name tollgate as the broker:" >&2; echo "$md" >&2; exit 1; }
den=$(echo x | timeout 20 bash "$PEERS/kcat.sh" -P -b "$BOOT_TG" -t not-a-bench-topic -X message.timeout.ms=3000 2>&1 || true)
grep -qi "authorization" <<<"$den" || { echo "policy not applied (a non-bench topic was not refused):" >&2; echo "$den" >&2; exit 1; }

# One bench-kafka.sh round (RUNS=1) against $2 with CSV rows in $WORK/$1; $3 = CPU for tansu.
round() {
  mkdir -p "$WORK/$1"
  CPU_SUT=$3 RESULTS="$WORK/$1" BOOT=$2 RUNS=1 N=$N SIZE=$SIZE bash "$PEERS/bench-kafka.sh" \
    >"$WORK/$1/out-$r.txt" 2>&1 || { cat "$WORK/$1/out-$r.txt" >&2; exit 1; }
}
# CPU seconds (utime+stime of all threads) each process spent in each kind of round: the
# per-row percentages of bench-kafka.sh are too coarse (10 ms ticks) for sub-second runs.
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
TANSU_D=0; TANSU_T=0; TG_T=0
for r in $(seq "$ROUNDS"); do
  b0=$(cpu_ticks "$TANSU")
  round direct "$BOOT_DIRECT" "$CPU_SUT"
  b1=$(cpu_ticks "$TANSU"); c0=$(cpu_ticks "$TG_PID")
  round tollgate "$BOOT_TG" "$CPU_LOAD"
  b2=$(cpu_ticks "$TANSU"); c1=$(cpu_ticks "$TG_PID")
  TANSU_D=$((TANSU_D + b1 - b0)); TANSU_T=$((TANSU_T + b2 - b1)); TG_T=$((TG_T + c1 - c0))
  echo "round $r done" >&2
done
CPU_S="$(echo "$TANSU_D / $HZ / $ROUNDS" | bc -l) $(echo "$TANSU_T / $HZ / $ROUNDS" | bc -l) $(echo "$TG_T / $HZ / $ROUNDS" | bc -l)"

# Produce round trip, one message at a time: tansu on CPU 1 direct, tollgate on CPU 1 proxied.
"$PY" -c "from confluent_kafka.admin import AdminClient,NewTopic; a=AdminClient({'bootstrap.servers':'$BOOT_DIRECT'}); [f.result(10) for f in a.create_topics([NewTopic('bench-lat-$$',1,1)]).values()]"
: >"$WORK/lat-direct.txt"; : >"$WORK/lat-tollgate.txt"
for r in $(seq "$ROUNDS"); do
  taskset -a -pc "$CPU_SUT" "$TANSU" >/dev/null
  timeout 120 taskset -c "$CPU_LOAD" "$PY" bench/kafka/latency.py "$BOOT_DIRECT" "bench-lat-$$" "$LAT_N" "$SIZE" >>"$WORK/lat-direct.txt"
  taskset -a -pc "$CPU_LOAD" "$TANSU" >/dev/null
  timeout 120 taskset -c "$CPU_LOAD" "$PY" bench/kafka/latency.py "$BOOT_TG" "bench-lat-$$" "$LAT_N" "$SIZE" >>"$WORK/lat-tollgate.txt"
done
taskset -a -pc "$CPU_SUT" "$TANSU" >/dev/null

EVENTS=$(curl -s "http://127.0.0.1:$METRICS_PORT/metrics" | grep -E '^tollgate_(proxy_events|requests)_total' | grep -i kafka || true)
DENIED=$(grep -c '"verdict":"denied"' "$WORK/audit.jsonl" 2>/dev/null || true)

LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$WORK" "$ROUNDS" "$N" "$SIZE" "$LAT_N" $CPU_S <<'PY'
import csv, statistics as st, sys
work, rounds, n, size, lat_n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
cpu_td, cpu_tt, cpu_tg = (float(x) for x in sys.argv[6:9])
def rows(side):
    out = {}
    for r in csv.DictReader(open(f"{work}/{side}/kafka.csv")):
        out.setdefault((r["tool"], r["op"]), []).append(r)
    return out
d, t = rows("direct"), rows("tollgate")
med = lambda rs, k: st.median(float(r[k]) for r in rs)
print(f"| {rounds} rounds, median; N={n} x {size} B | direct (tansu) | tollgate -> tansu | ratio |")
print("|---|---|---|---|")
short = []
for key, label in [(("kcat", "produce"), "kcat produce"), (("kcat", "consume"), "kcat consume"),
                   (("confluent", "produce"), "confluent-kafka produce"), (("confluent", "consume"), "confluent-kafka consume")]:
    a, b = d[key], t[key]
    print(f"| {label} msgs/s | {med(a,'msgs_per_s'):,.0f} | {med(b,'msgs_per_s'):,.0f} | {med(b,'msgs_per_s')/med(a,'msgs_per_s'):.2f} |")
    print(f"| {label} MB/s | {med(a,'MB_per_s'):.2f} | {med(b,'MB_per_s'):.2f} | |")
    for side, rs in (("direct", a), ("tollgate", b)):
        for r in rs:
            if int(float(r["n"])) != n:
                short.append(f"{side} {label} run {r['run']}: n={r['n']} of {n}")
print(f"| tansu CPU s per round (4 runs) | {cpu_td:.2f} | {cpu_tt:.2f} | |")
print(f"| tollgate CPU s per round (4 runs) | - | {cpu_tg:.2f} | |")
def lat(side):
    vals = [dict(kv.split("=") for kv in l.split()) for l in open(f"{work}/lat-{side}.txt") if l.strip()]
    return vals
ld, lt = lat("direct"), lat("tollgate")
for q in ("p50_ms", "p99_ms"):
    a, b = st.median(float(v[q]) for v in ld), st.median(float(v[q]) for v in lt)
    print(f"| produce round trip {q[:3]} (ms, {lat_n} x 1 msg, acks=1) | {a:.3f} | {b:.3f} | +{b-a:.3f} |")
fails = sum(int(v["failed"]) for v in ld + lt)
print()
for side, vs in (("direct", ld), ("tollgate", lt)):
    print(f"latency rounds {side}: " + "; ".join(f"p50 {v['p50_ms']} p99 {v['p99_ms']} max {v['max_ms']}" for v in vs))
print("every message acked/consumed in every run" if not short else "SHORT RUNS: " + "; ".join(short))
print(f"latency runs: {fails} failed deliveries")
PY
echo
echo "load average (1/5/15 min) before the throughput rounds: $LOAD0; after everything: $LOAD1"
echo "audit records (denied) written during the run: ${DENIED:-0} (the policy probe is one)"
echo "proxy Kafka counters after the run:"
echo "$EVENTS"
