#!/usr/bin/env bash
# Cost of one run of each tollgate TC program on the established-flow paths, measured by the
# kernel itself with BPF_PROG_TEST_RUN (`bpftool prog run … repeat N`: average ns per run over N
# runs of the same packet, on one CPU, no network stack around it). Much less noisy than the
# iperf3 figures of run.sh on a shared machine, and it separates the four per-packet paths:
#
#   egress-fwd   client -> server data on the client's veth (tollgate_from_endpoint, CT hit)
#   ingress-fwd  the same packet on the server's veth       (tollgate_to_endpoint, CT hit)
#   egress-reply server -> client reply on the server's veth (tollgate_from_endpoint)
#   ingress-reply the reply on the client's veth            (tollgate_to_endpoint)
#
# Same setup as run.sh (1,000 policy entries, both directions enforced). The first run of each
# forward packet is judged by policy and creates the flow; the timed runs then hit it.
#
# Usage (root): [TOLLGATE_BENCH_BIN=PATH] bench/datapath/prog-cost.sh [REPEAT] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
REPEAT=${1:-1000000}
ROUNDS=${2:-5}
ID=$$
NODE=tgc-$ID-node; CLI=tgc-$ID-c; SRV=tgc-$ID-s
CIF=tgc${ID}c; SIF=tgc${ID}s
PIN=/sys/fs/bpf/tollgate-cost-$ID
[ "$(id -u)" = 0 ] || { echo "bench/datapath/prog-cost.sh needs root" >&2; exit 1; }
command -v bpftool >/dev/null || { echo "bpftool missing: run scripts/setup-datapath.sh" >&2; exit 1; }

# shellcheck source=bench/datapath/topology.sh
. bench/datapath/topology.sh
bench_bin

cleanup() {
  "$BIN" detach "$PIN" 2>/dev/null || true
  for n in "$CLI" "$SRV" "$NODE"; do ip netns del "$n" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
TMP=$(mktemp -d)

make_topology 10.203
"$BIN" attach "$NODE" "$PIN" 1000 "$CIF" 10.203.1.2 "$SIF" 10.203.2.2 7001 15001 >/dev/null

# Packets (Ethernet + IPv4 + TCP ACK + 64 bytes) and __sk_buff contexts naming the interface.
python3 - "$TMP" "$(ip netns exec "$NODE" cat /sys/class/net/"$CIF"/ifindex)" \
  "$(ip netns exec "$NODE" cat /sys/class/net/"$SIF"/ifindex)" <<'PY'
import struct, sys
tmp, cif, sif = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
def pkt(src, dst, sport, dport):
    payload = b"x" * 64
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x10, 65535, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                     bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp
open(f"{tmp}/fwd", "wb").write(pkt("10.203.1.2", "10.203.2.2", 40000, 5201))
open(f"{tmp}/reply", "wb").write(pkt("10.203.2.2", "10.203.1.2", 5201, 40000))
for name, ifindex in (("cif", cif), ("sif", sif)):
    ctx = bytearray(44)
    struct.pack_into("<I", ctx, 40, ifindex)  # __sk_buff.ifindex
    open(f"{tmp}/ctx-{name}", "wb").write(bytes(ctx))
PY

prog_id() { # IFNAME HOOK(ingress|egress): the program behind the link the loader pinned
  bpftool -j link show pinned "$PIN/links/$1@$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["prog_id"])'
}
FROM_C=$(prog_id "$CIF" ingress); TO_S=$(prog_id "$SIF" egress)
FROM_S=$(prog_id "$SIF" ingress); TO_C=$(prog_id "$CIF" egress)

run() { # PROG_ID PACKET CTX REPEAT -> average ns
  ip netns exec "$NODE" bpftool -j prog run id "$1" data_in "$TMP/$2" ctx_in "$TMP/$3" repeat "$4" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["duration"]) if r.get("retval") == 0 else sys.exit("prog run: %s" % r)'
}
# Create the flow at both ends (first packets: policy, CT insert).
run "$FROM_C" fwd ctx-cif 1 >/dev/null; run "$TO_S" fwd ctx-sif 1 >/dev/null

declare -A ALL
for r in $(seq "$ROUNDS"); do
  line="round $r:"
  for c in "egress-fwd $FROM_C fwd ctx-cif" "ingress-fwd $TO_S fwd ctx-sif" \
           "egress-reply $FROM_S reply ctx-sif" "ingress-reply $TO_C reply ctx-cif"; do
    read -r name id p ctx <<<"$c"
    ns=$(run "$id" "$p" "$ctx" "$REPEAT")
    ALL[$name]+="$ns "; line+=" $name ${ns}ns"
  done
  echo "$line" >&2
done
echo "| path (ns/run, BPF_PROG_TEST_RUN x $REPEAT, median of $ROUNDS) | median | min | max |"
echo "|---|---|---|---|"
for name in egress-fwd ingress-fwd egress-reply ingress-reply; do
  python3 -c 'import sys, statistics as st; v=[int(x) for x in sys.argv[2:]]; print("| %s | %d | %d | %d |" % (sys.argv[1], st.median(v), min(v), max(v)))' "$name" ${ALL[$name]}
done
