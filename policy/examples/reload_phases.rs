//! Where a policy reload's time goes, phase by phase, for the DNS benchmark's change: 1,000
//! `matchPattern`s plus 10,000 `matchName`s in one rule (bench/dns/run.sh's policy-10k.yaml).
//! Run: `cargo run --release -p tollgate-policy --example reload_phases [ROUNDS]`.

use std::time::Instant;
use tollgate_policy::endpoints::{EndpointSpec, Inventory};
use tollgate_policy::eval::{Evaluator, L7Request, Local};
use tollgate_policy::load::PolicySet;
use tollgate_policy::model::{Direction, Protocol};
use tollgate_policy::peer::Remote;

fn policy(names: usize, patterns: usize) -> String {
    let mut s = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: dns-bench, namespace: bench}\nspec:\n  endpointSelector: {matchLabels: {app: client}}\n  egress:\n  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]\n    toPorts:\n    - ports: [{port: \"53\", protocol: UDP}]\n      rules:\n        dns:\n",
    );
    for i in 1..patterns {
        s.push_str(&format!(
            "        - {{matchPattern: \"*.svc{i}.cluster{}.example.com\"}}\n",
            i % 7
        ));
    }
    for i in 1..=names {
        s.push_str(&format!(
            "        - {{matchName: \"host{i}.svc{}.example.com\"}}\n",
            i % 97
        ));
    }
    s.push_str("        - {matchPattern: \"*.bench.test\"}\n");
    s
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let ep = |name: &str, ns: &str, k: &str, v: &str| EndpointSpec {
        name: name.into(),
        namespace: ns.into(),
        labels: [(k.to_string(), v.to_string())].into(),
        ..Default::default()
    };
    let inv = Inventory::new(
        vec![
            ep("client", "bench", "app", "client"),
            ep("kube-dns", "kube-system", "k8s-app", "kube-dns"),
        ],
        vec![],
    )
    .unwrap();
    let client = inv.by_name("client").unwrap();
    let local = Local {
        labels: &client.labels,
        is_host: false,
        named_ports: &[],
    };
    let dns = Remote::endpoint(inv.by_name("kube-dns").unwrap());
    // Before: the policy in force (1,000 patterns), so unchanged patterns can be reused.
    let mut before = PolicySet::default();
    before.load_str("dns.yaml", &policy(0, 1000));
    let _pp0 =
        Evaluator::new(before.rules).port_policy(&local, Direction::Egress, 53, Protocol::Udp);
    let src = policy(10_000, 1000);
    println!("{} bytes, {} lines", src.len(), src.lines().count());
    for _ in 0..rounds {
        let t0 = Instant::now();
        let docs = tollgate_policy::yaml::parse_documents(&src).unwrap();
        let t_yaml = t0.elapsed();
        drop(docs);
        let t1 = Instant::now();
        let mut set = PolicySet::default();
        set.load_str("dns.yaml", &src);
        let t_load = t1.elapsed();
        assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
        let t2 = Instant::now();
        let ev = Evaluator::new(set.rules);
        let t_eval = t2.elapsed();
        let t3 = Instant::now();
        let pp = ev.port_policy(&local, Direction::Egress, 53, Protocol::Udp);
        let t_pp = t3.elapsed();
        assert!(
            pp.evaluate(
                &dns,
                Some(&L7Request::Dns {
                    qname: "host9999.svc8.example.com."
                })
            )
            .is_allowed()
        );
        assert!(
            pp.evaluate(
                &dns,
                Some(&L7Request::Dns {
                    qname: "h1.bench.test."
                })
            )
            .is_allowed()
        );
        assert!(
            !pp.evaluate(
                &dns,
                Some(&L7Request::Dns {
                    qname: "h1.other.test."
                })
            )
            .is_allowed()
        );
        let t4 = Instant::now();
        drop(pp);
        drop(ev);
        let t_drop = t4.elapsed();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        println!(
            "yaml parse {:.1} ms | load_str (parse+validate+compile) {:.1} ms | Evaluator::new {:.1} ms | port_policy {:.1} ms | drop {:.1} ms | total {:.1} ms",
            ms(t_yaml),
            ms(t_load),
            ms(t_eval),
            ms(t_pp),
            ms(t_drop),
            ms(t_load + t_eval + t_pp)
        );
    }
}
