#!/usr/bin/env bash
# Datapath benchmark: iperf3 throughput, TCP connection rate and 1-byte request/response
# latency between two network namespaces routed through a third ("node"), with the tollgate TC
# programs attached (allow path, 1,000 policy entries, both directions enforced) vs detached,
# in one run; plus the redirect path's added latency (client -> transparent listener in the
# node namespace via sk_assign, vs the same listener reached without redirect).
#
# Usage (root): [TOLLGATE_BENCH_BIN=PATH] bench/datapath/run.sh [SECONDS_PER_MEASUREMENT] [ROUNDS]
# Needs: scripts/setup-datapath.sh (toolchain, iperf3, iproute2). Touches only namespaces it
# creates (names carry this shell's pid) and removes them on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
DUR=${1:-10}
ROUNDS=${2:-2}
ENTRIES=1000
ID=$$
NODE=tgb-$ID-node; CLI=tgb-$ID-c; SRV=tgb-$ID-s
CIF=tgb${ID}c; SIF=tgb${ID}s
PIN=/sys/fs/bpf/tollgate-bench-$ID
[ "$(id -u)" = 0 ] || { echo "bench/datapath/run.sh needs root" >&2; exit 1; }
command -v iperf3 >/dev/null || { echo "iperf3 missing: run scripts/setup-datapath.sh" >&2; exit 1; }

# shellcheck source=bench/datapath/topology.sh
. bench/datapath/topology.sh
bench_bin

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  "$BIN" detach "$PIN" 2>/dev/null || true
  for n in "$CLI" "$SRV" "$NODE"; do ip netns del "$n" 2>/dev/null || true; done
}
trap cleanup EXIT

make_topology 10.201

bg() { "$@" >/dev/null 2>&1 & PIDS+=($!); }
bg ip netns exec "$SRV" iperf3 -s -p 5201
bg ip netns exec "$SRV" "$BIN" serve 0.0.0.0:7000
bg ip netns exec "$NODE" "$BIN" serve-transparent 127.0.0.1:15001
bg ip netns exec "$NODE" "$BIN" serve 10.201.1.1:7002
sleep 1

measure() { # prints: gbps conn_per_s rr_mean rr_p50 rr_p99
  local gbps cps rr
  gbps=$(ip netns exec "$CLI" iperf3 -c 10.201.2.2 -p 5201 -t "$DUR" -J | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))')
  cps=$(ip netns exec "$CLI" "$BIN" connrate 10.201.2.2:7000 "$DUR")
  rr=$(ip netns exec "$CLI" "$BIN" rr 10.201.2.2:7000 20000)
  echo "$gbps $cps $rr"
}

declare -a DET ATT
for r in $(seq "$ROUNDS"); do
  DET+=("$(measure)")
  "$BIN" attach "$NODE" "$PIN" "$ENTRIES" "$CIF" 10.201.1.2 "$SIF" 10.201.2.2 7001 15001 >/dev/null
  ATT+=("$(measure)")
  # Redirect path: same listener process family, same hop count, with vs without sk_assign.
  REDIR=$(ip netns exec "$CLI" "$BIN" rr 10.201.2.2:7001 20000)
  PLAIN=$(ip netns exec "$CLI" "$BIN" rr 10.201.1.1:7002 20000)
  "$BIN" detach "$PIN"
  echo "round $r: detached [${DET[-1]}] attached [${ATT[-1]}] redirect-rr [$REDIR] same-hop-plain-rr [$PLAIN]" >&2
  REDIRS+=("$REDIR"); PLAINS+=("$PLAIN")
done

# Cost per program run, from the kernel's own BPF statistics (kernel.bpf_stats_enabled), over
# one extra iperf3 run with the programs attached. Kept out of the rounds above: the statistics
# add two clock reads per run.
PROFILE="n/a (bpftool missing)"
if command -v bpftool >/dev/null; then
  "$BIN" attach "$NODE" "$PIN" "$ENTRIES" "$CIF" 10.201.1.2 "$SIF" 10.201.2.2 7001 15001 >/dev/null
  old_stats=$(sysctl -n kernel.bpf_stats_enabled); sysctl -qw kernel.bpf_stats_enabled=1
  ip netns exec "$CLI" iperf3 -c 10.201.2.2 -p 5201 -t "$DUR" >/dev/null
  PROFILE=$(bpftool -j prog show | python3 -c '
import json, sys
progs = [p for p in json.load(sys.stdin) if p.get("name", "").startswith("tollgate_") and p.get("run_cnt")]
print("; ".join("%s %.0f ns/run over %d runs" % (p["name"], p["run_time_ns"] / p["run_cnt"], p["run_cnt"]) for p in progs))')
  sysctl -qw kernel.bpf_stats_enabled="$old_stats"
  "$BIN" detach "$PIN"
fi

python3 - "$DUR" "$ENTRIES" "${#DET[@]}" "${DET[@]}" "${ATT[@]}" "${REDIRS[@]}" "${PLAINS[@]}" <<'PY'
import sys, statistics as st
dur, entries, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [list(map(float, r.split())) for r in sys.argv[4:]]
det, att, red, pla = rows[:n], rows[n:2*n], rows[2*n:3*n], rows[3*n:4*n]
col = lambda rs, i: st.median(r[i] for r in rs)
print(f"| metric ({n} rounds, {dur}s each, median) | detached | attached ({entries} entries) | ratio |")
print("|---|---|---|---|")
for name, i, fmt in [("iperf3 throughput (Gbit/s)", 0, "%.2f"), ("TCP connections/s (connect+1B echo+close)", 1, "%.0f"),
                     ("1-byte RR latency mean (us)", 2, "%.1f"), ("1-byte RR latency p99 (us)", 4, "%.1f")]:
    d, a = col(det, i), col(att, i)
    print(f"| {name} | {fmt % d} | {fmt % a} | {a/d:.3f} |")
print()
print("| redirect path (1-byte RR, us) | mean | p50 | p99 |")
print("|---|---|---|---|")
print(f"| client -> node listener, plain (allowed, no redirect) | {col(pla,0):.1f} | {col(pla,1):.1f} | {col(pla,2):.1f} |")
print(f"| client -> server:7001 redirected (sk_assign) to node listener | {col(red,0):.1f} | {col(red,1):.1f} | {col(red,2):.1f} |")
print(f"| added by redirect | {col(red,0)-col(pla,0):+.1f} | {col(red,1)-col(pla,1):+.1f} | {col(red,2)-col(pla,2):+.1f} |")
PY
echo
echo "program cost during iperf3 (kernel bpf_stats): $PROFILE"
