//! DNS rule benchmarks: the per-query check with 1,000 `matchPattern` rules (the matching one
//! last), and what a policy change with 10,000 names costs to compile into a port policy (the
//! work a rule-set swap has to do before it can be applied without pausing queries).
//! Run: `cargo bench -p tollgate-policy --bench l7_dns`.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tollgate_policy::endpoints::{EndpointSpec, Inventory};
use tollgate_policy::eval::{Evaluator, L7Request, Local};
use tollgate_policy::load::PolicySet;
use tollgate_policy::model::{Direction, Protocol};
use tollgate_policy::peer::Remote;

/// One DNS egress rule with `names` `matchName`s and `patterns` `matchPattern`s; the last
/// pattern is `*.bench.test`.
fn policy(names: usize, patterns: usize) -> String {
    let mut s = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: dns, namespace: bench}\nspec:\n  endpointSelector: {matchLabels: {app: client}}\n  egress:\n  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]\n    toPorts:\n    - ports: [{port: \"53\", protocol: UDP}]\n      rules:\n        dns:\n",
    );
    for i in 0..names {
        s.push_str(&format!(
            "        - {{matchName: \"host{i}.svc{}.example.com\"}}\n",
            i % 97
        ));
    }
    for i in 1..patterns {
        s.push_str(&format!(
            "        - {{matchPattern: \"*.svc{i}.cluster{}.example.com\"}}\n",
            i % 7
        ));
    }
    s.push_str("        - {matchPattern: \"*.bench.test\"}\n");
    s
}

fn inventory() -> Inventory {
    let ep = |name: &str, ns: &str, k: &str, v: &str| EndpointSpec {
        name: name.into(),
        namespace: ns.into(),
        labels: [(k.to_string(), v.to_string())].into(),
        ..Default::default()
    };
    Inventory::new(
        vec![
            ep("client", "bench", "app", "client"),
            ep("kube-dns", "kube-system", "k8s-app", "kube-dns"),
        ],
        vec![],
    )
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let inv = inventory();
    let client = inv.by_name("client").unwrap();
    let local = Local {
        labels: &client.labels,
        is_host: false,
        named_ports: &[],
    };
    let dns = Remote::endpoint(inv.by_name("kube-dns").unwrap());

    let mut set = PolicySet::default();
    set.load_str("dns.yaml", &policy(0, 1000));
    assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
    let pp = Evaluator::new(set.rules).port_policy(&local, Direction::Egress, 53, Protocol::Udp);
    let req = L7Request::Dns {
        qname: "h0042.bench.test.",
    };
    assert!(pp.evaluate(&dns, Some(&req)).is_allowed());
    assert!(
        !pp.evaluate(
            &dns,
            Some(&L7Request::Dns {
                qname: "h1.other.test."
            })
        )
        .is_allowed()
    );
    c.bench_function(
        "evaluate DNS query, 1000 matchPattern rules, last matches",
        |b| b.iter(|| pp.evaluate(black_box(&dns), Some(black_box(&req)))),
    );

    let src = policy(10_000, 1);
    c.bench_function(
        "policy change: load + compile 10000 DNS names to a port policy",
        |b| {
            b.iter(|| {
                let mut set = PolicySet::default();
                set.load_str("dns.yaml", black_box(&src));
                assert!(set.diagnostics.is_empty());
                let pp = Evaluator::new(set.rules).port_policy(
                    &local,
                    Direction::Egress,
                    53,
                    Protocol::Udp,
                );
                assert!(
                    pp.evaluate(
                        &dns,
                        Some(&L7Request::Dns {
                            qname: "host9999.svc8.example.com"
                        })
                    )
                    .is_allowed()
                );
                pp
            })
        },
    );

    // bench/dns/run.sh's change: the 1,000 patterns in force plus 10,000 names (the compiled
    // automaton of the unchanged patterns is reused).
    let src = policy(10_000, 1000);
    c.bench_function(
        "policy change: load + compile 1000 patterns + 10000 names to a port policy",
        |b| {
            b.iter(|| {
                let mut set = PolicySet::default();
                set.load_str("dns.yaml", black_box(&src));
                assert!(set.diagnostics.is_empty());
                Evaluator::new(set.rules).port_policy(&local, Direction::Egress, 53, Protocol::Udp)
            })
        },
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
