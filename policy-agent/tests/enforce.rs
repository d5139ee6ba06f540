//! Policy YAML to kernel enforcement on the real kernel: the agent compiles a policy set and an
//! inventory (whose endpoints are network namespaces wired through a node namespace), writes the
//! plan through the datapath loader, and real TCP connections are allowed or dropped as the
//! policy says — including a port with HTTP rules, which is redirected to the proxy and, with no
//! proxy listening, fails closed. Needs root (skipped loudly otherwise; CI runs as root).

#[path = "../../redirector-ebpf/loader/tests/harness/mod.rs"]
mod harness;

use std::net::{IpAddr, SocketAddr};

use harness::{Topology, require_root, spawn_echo_server, tcp_ok};
use tollgate_agent::apply::apply;
use tollgate_agent::plan::{ProxyPorts, compile};
use tollgate_datapath::Datapath;
use tollgate_policy::endpoints::Inventory;
use tollgate_policy::eval::Evaluator;
use tollgate_policy::load::PolicySet;

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "8081", protocol: TCP}]
      rules:
        http: [{method: GET, path: /}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
"#;

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[test]
fn compiled_policy_is_enforced_by_the_kernel() {
    if !require_root("compiled_policy_is_enforced_by_the_kernel") {
        return;
    }
    let t = Topology::new();
    for port in [8080, 8081, 9090] {
        spawn_echo_server(&t.server.netns, port);
    }
    spawn_echo_server(&t.other.netns, 8080);
    let line = |name: &str, h: &harness::Host| {
        format!(
            "  - {{name: {name}, namespace: prod, labels: {{app: {name}}}, ips: [{}, '{}'], interface: {}}}\n",
            h.v4, h.v6, h.host_if
        )
    };
    let inv = Inventory::from_yaml(&format!(
        "endpoints:\n{}{}{}",
        line("client", &t.client),
        line("server", &t.server),
        line("other", &t.other)
    ))
    .unwrap();
    let mut set = PolicySet::default();
    set.load_str("policy.yaml", POLICY);
    assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
    let plan = compile(
        &Evaluator::new(set.rules),
        &inv,
        ProxyPorts {
            l7: 15001,
            dns: 15053,
        },
    );
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);

    // Before: everything open.
    assert!(tcp_ok(&t.other.netns, sa(t.server.v4, 8080)));
    let dp = t.in_node(|| {
        let mut dp = Datapath::load(&t.options()).expect("load");
        let applied = apply(&mut dp, &plan).expect("apply");
        assert_eq!(applied.endpoints, 3, "{applied:?}");
        assert!(applied.unattached.is_empty(), "{applied:?}");
        dp
    });
    assert!(
        tcp_ok(&t.client.netns, sa(t.server.v4, 8080)),
        "allowed port"
    );
    assert!(
        tcp_ok(&t.client.netns, sa(t.server.v6, 8080)),
        "allowed port, IPv6"
    );
    assert!(
        !tcp_ok(&t.client.netns, sa(t.server.v4, 9090)),
        "port no rule names"
    );
    assert!(
        !tcp_ok(&t.other.netns, sa(t.server.v4, 8080)),
        "peer no rule names"
    );
    assert!(
        !tcp_ok(&t.client.netns, sa(t.other.v4, 8080)),
        "client egress allows only the server"
    );
    assert!(
        tcp_ok(&t.server.netns, sa(t.other.v4, 8080)),
        "unselected egress is open"
    );
    // The HTTP port is redirected to the proxy; none listens, so it fails closed.
    assert!(!tcp_ok(&t.client.netns, sa(t.server.v4, 8081)));
    let st = t.in_node(|| tollgate_datapath::status(&t.pin_root).unwrap());
    let unavailable = st
        .counters
        .iter()
        .find(|c| c.name == "proxy_unavailable")
        .unwrap();
    assert!(unavailable.packets > 0, "redirect attempted: {st}");
    drop(dp);
}
