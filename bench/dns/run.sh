#!/usr/bin/env bash
# DNS benchmark: dnsperf direct to unbound vs through tollgate's DNS listener (1,000 matchPattern
# rules, the matching one last), in one run; then both at a fixed 20,000 qps with per-query
# latencies (dnsperf -v) for p50/p99 and the latency tollgate adds.
#
# Usage: bench/dns/run.sh [SECONDS] [ROUNDS]          (defaults 10, 3)
# Needs: scripts/setup-proxy.sh (unbound, dnsperf) and ../shared/peers (zone + query file).
# Layout on a 2-core box: the system under test (unbound direct, tollgate proxied) on CPU 1;
# dnsperf on CPU 0, and unbound too when tollgate is in the path.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
DUR=${1:-10}
ROUNDS=${2:-3}
RATE=${RATE:-20000}
PEERS="$ROOT/../shared/peers"
# shellcheck disable=SC1091
. "$PEERS/env.sh"
bash "$PEERS/gen-configs.sh" >/dev/null
command -v dnsperf >/dev/null || { echo "dnsperf missing: run scripts/setup-proxy.sh" >&2; exit 1; }

# TOLLGATE_BENCH_BIN=path: bench a saved build (A/B runs) instead of building this tree.
if [ -n "${TOLLGATE_BENCH_BIN:-}" ]; then
  BIN=$TOLLGATE_BENCH_BIN
else
  cargo build -q --release --bin tollgate
  BIN=${CARGO_TARGET_DIR:-target}/release/tollgate
fi
WORK=$(mktemp -d)
PROXY_PORT=15300
METRICS_PORT=15309
cleanup() {
  [ -n "${PPID_TG:-}" ] && kill "$PPID_TG" 2>/dev/null || true
  bash "$PEERS/peer.sh" stop unbound >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

bash bench/dns/write-policy.sh "$WORK"
"$BIN" lint "$WORK/policy.yaml" >/dev/null

bash "$PEERS/peer.sh" start unbound >/dev/null
UNBOUND=$(pid_of unbound)
taskset -c "$CPU_SUT" "$BIN" proxy --policies "$WORK/policy.yaml" --endpoints "$WORK/endpoints.yaml" \
  --dns-listen "127.0.0.1:$PROXY_PORT" --dns-to "kube-dns@127.0.0.1:$PORT_UNBOUND" \
  --metrics "127.0.0.1:$METRICS_PORT" --audit-log "$WORK/audit.jsonl" --watch-ms 100 \
  2>"$WORK/proxy.log" &
PPID_TG=$!
for _ in $(seq 50); do dig +short +tries=1 +time=1 @127.0.0.1 -p "$PROXY_PORT" h0001.bench.test | grep -q 127.1 && break; sleep 0.1; done
[ "$(dig +short @127.0.0.1 -p $PROXY_PORT h0001.bench.test)" = 127.1.0.1 ] || { cat "$WORK/proxy.log"; echo "proxy probe failed" >&2; exit 1; }
[ "$(dig @127.0.0.1 -p "$PROXY_PORT" +noall +comments h0001.other.test | grep -o "status: [A-Z]*")" = "status: REFUSED" ] || { echo "policy not applied" >&2; exit 1; }

# CPU 0's busy and total jiffies (the load side: dnsperf, and unbound in the proxied runs).
cpu0() { awk '/^cpu0 /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
# PORT SUT_PID: runs dnsperf at full speed; prints "qps avg_ms sut_cpu_us_per_query
# cpu0_busy_pct lost" (the system under test's CPU time per answered query, and how busy the
# load side was: when it is near 100 % the run measured the load side, not the SUT).
run_max() {
  local port=$1 pid=$2 out=$WORK/out
  local t0 b0 c0 t1 b1 c1
  read -r b0 t0 < <(cpu0); c0=$(cpu_ticks "$pid")
  taskset -c 0 dnsperf -s 127.0.0.1 -p "$port" -d "$CONF/dnsperf-queries.txt" -l "$DUR" -t 2 -c 8 -T 1 -q 200 >"$out" 2>&1
  read -r b1 t1 < <(cpu0); c1=$(cpu_ticks "$pid")
  awk -v c=$((c1 - c0)) -v hz="$HZ" -v b=$((b1 - b0)) -v t=$((t1 - t0)) \
    '/Queries completed/{n=$3} /Queries per second/{q=$4} /Average Latency/{a=$4*1000} /Queries lost/{l=$3}
     END{printf "%.0f %.3f %.2f %.0f %s\n", q, a, c/hz*1e6/n, 100*b/t, l}' "$out"
}
# Fixed rate with per-query latencies: prints "qps p50_ms p99_ms lost".
run_rate() {
  local port=$1 out=$WORK/out
  taskset -c 0 dnsperf -v -s 127.0.0.1 -p "$port" -d "$CONF/dnsperf-queries.txt" -l "$DUR" -t 2 -c 8 -T 1 -q 200 -Q "$RATE" >"$out" 2>&1
  python3 - "$out" <<'PY'
import sys, re
lat, qps, lost = [], 0.0, "?"
for line in open(sys.argv[1]):
    m = re.match(r"> \S+ .* ([0-9.]+)$", line)
    if m: lat.append(float(m.group(1)) * 1000); continue
    if "Queries per second" in line: qps = float(line.split()[3])
    if "Queries lost" in line: lost = line.split()[2]
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
print(f"{qps:.0f} {p(0.5):.3f} {p(0.99):.3f} {lost}")
PY
}
pin_direct() { taskset -a -pc "$CPU_SUT" "$UNBOUND" >/dev/null; }
pin_proxied() { taskset -a -pc 0 "$UNBOUND" >/dev/null; }

declare -a D T DR TR
for r in $(seq "$ROUNDS"); do
  pin_direct;  D+=("$(run_max "$PORT_UNBOUND" "$UNBOUND")")
  pin_proxied; T+=("$(run_max "$PROXY_PORT" "$PPID_TG")")
  pin_direct;  DR+=("$(run_rate "$PORT_UNBOUND")")
  pin_proxied; TR+=("$(run_rate "$PROXY_PORT")")
  echo "round $r: max direct [${D[-1]}] tollgate [${T[-1]}]; at $RATE qps direct [${DR[-1]}] tollgate [${TR[-1]}]" >&2
done
# Policy change under load: while dnsperf sends $RATE qps through the proxy, the policy file
# is replaced by one with 10,000 matchNames more; the proxy reloads it and swaps it in.
{
  sed '/matchPattern: "\*\.bench\.test"/d' "$WORK/policy.yaml"
  for i in $(seq 1 10000); do echo "        - {matchName: \"host$i.svc$((i % 97)).example.com\"}"; done
  echo '        - {matchPattern: "*.bench.test"}'
} > "$WORK/policy-10k.yaml"
taskset -c 0 dnsperf -v -s 127.0.0.1 -p "$PROXY_PORT" -d "$CONF/dnsperf-queries.txt" -l 6 -t 2 -c 8 -T 1 -q 200 -Q "$RATE" >"$WORK/change.out" 2>&1 &
DP=$!
sleep 2
cp "$WORK/policy-10k.yaml" "$WORK/policy.yaml.new" && mv "$WORK/policy.yaml.new" "$WORK/policy.yaml"
wait $DP
CHANGE=$(grep -o 'revision 2 in force, loaded in [0-9.]* ms' "$WORK/proxy.log" || echo "no reload seen")
CHANGE_STATS=$(python3 - "$WORK/change.out" <<'PY'
import sys, re
lat, lost = [], "?"
for line in open(sys.argv[1]):
    m = re.match(r"> \S+ .* ([0-9.]+)$", line)
    if m: lat.append(float(m.group(1)) * 1000)
    if "Queries lost" in line: lost = line.split()[2]
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
print(f"{len(lat)} answered, {lost} lost, p50 {p(0.5):.3f} ms, p99 {p(0.99):.3f} ms, max {lat[-1] if lat else float('nan'):.3f} ms")
PY
)

EVENTS=$(curl -s "http://127.0.0.1:$METRICS_PORT/metrics" | grep -E '^tollgate_(proxy_events|requests)_total' || true)

python3 - "$DUR" "$ROUNDS" "$RATE" "${D[@]}" "${T[@]}" "${DR[@]}" "${TR[@]}" <<'PY'
import sys, statistics as st
dur, n, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = [r.split() for r in sys.argv[4:]]
d, t, dr, tr = rows[:n], rows[n:2*n], rows[2*n:3*n], rows[3*n:]
med = lambda rs, i: st.median(float(r[i]) for r in rs)
lost = lambda rs: sum(int(r[-1]) for r in rs if r[-1].isdigit())
print(f"| dnsperf -c8 -q200, {n} rounds x {dur}s, median | direct (unbound) | tollgate -> unbound | ratio |")
print("|---|---|---|---|")
print(f"| max qps | {med(d,0):.0f} | {med(t,0):.0f} | {med(t,0)/med(d,0):.2f} |")
print(f"| avg latency at max (ms) | {med(d,1):.3f} | {med(t,1):.3f} | |")
print(f"| CPU of the system under test per query (us) | {med(d,2):.2f} | {med(t,2):.2f} | {med(d,2)/med(t,2):.2f} |")
print(f"| load side (CPU 0) busy at max | {med(d,3):.0f} % | {med(t,3):.0f} % | |")
print(f"| queries lost (all rounds) | {lost(d)} | {lost(t)} | |")
print(f"| qps at -Q {rate} | {med(dr,0):.0f} | {med(tr,0):.0f} | |")
print(f"| p50 at {rate} qps (ms) | {med(dr,1):.3f} | {med(tr,1):.3f} | +{med(tr,1)-med(dr,1):.3f} |")
print(f"| p99 at {rate} qps (ms) | {med(dr,2):.3f} | {med(tr,2):.3f} | +{med(tr,2)-med(dr,2):.3f} |")
print(f"| queries lost at {rate} qps | {lost(dr)} | {lost(tr)} | |")
PY
echo
echo "policy change under load (10,000 matchNames added while dnsperf sends $RATE qps for 6 s):"
echo "  proxy: $CHANGE"
echo "  dnsperf over the 6 s: $CHANGE_STATS"
echo
echo "policy: 1,000 matchPattern rules (the matching one last); proxy counters after the run:"
echo "$EVENTS"
