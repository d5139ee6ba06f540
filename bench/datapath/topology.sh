# Sourced by bench/datapath/run.sh and prog-cost.sh: the bench binary and the topology.
#
# bench_bin: sets BIN. TOLLGATE_BENCH_BIN names a datapath_bench binary built earlier (e.g. a
# saved copy of the previous program, for a before/after comparison in one session); by
# default it is built from this tree.
bench_bin() {
  if [ -n "${TOLLGATE_BENCH_BIN:-}" ]; then
    BIN=$TOLLGATE_BENCH_BIN
  else
    cargo build -q --release -p tollgate-datapath --example datapath_bench
    BIN=${CARGO_TARGET_DIR:-target}/release/examples/datapath_bench
  fi
}

# make_topology NET: namespaces $NODE, $CLI, $SRV; veths $CIF (client) and $SIF (server) in the
# node namespace, NET.1.1/24 and NET.2.1/24 there, NET.1.2 and NET.2.2 in the endpoints, routed
# through the node.
make_topology() {
  local net=$1 ns ifn n
  for ns in "$NODE" "$CLI" "$SRV"; do
    ip netns add "$ns"
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
    ip -n "$ns" link set lo up
  done
  ip netns exec "$NODE" sysctl -qw net.ipv4.ip_forward=1
  for spec in "$CLI:$CIF:1" "$SRV:$SIF:2"; do
    IFS=: read -r ns ifn n <<<"$spec"
    ip -n "$NODE" link add "$ifn" type veth peer name eth0 netns "$ns"
    ip -n "$NODE" addr add "$net.$n.1/24" dev "$ifn"; ip -n "$NODE" link set "$ifn" up
    ip -n "$ns" addr add "$net.$n.2/24" dev eth0; ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$net.$n.1"
  done
}
