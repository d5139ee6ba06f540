//! End-to-end policy benchmarks: compile 10,000 policies; evaluate one HTTP request against a
//! port with 1,000 rules (only the last matches). Run: `cargo bench -p tollgate-policy --bench evaluator`.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tollgate_policy::endpoints::{EndpointSpec, Inventory};
use tollgate_policy::eval::{Evaluator, L7Request, Local};
use tollgate_policy::l7::HttpRequest;
use tollgate_policy::load::PolicySet;
use tollgate_policy::model::{Direction, Protocol};
use tollgate_policy::peer::Remote;

/// `n` policies, one per app; their path lists repeat every 100 policies (real policy sets
/// repeat their paths; the compiled-set cache in `l7::http` shares those).
fn policies(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&format!(
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{i}, namespace: ns{}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: app{i}}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client{i}}}}}]\n    toPorts:\n    - ports: [{{port: \"8080\", protocol: TCP}}]\n      rules:\n        http:\n        - {{method: GET, path: \"/api/v{}/items/[0-9]+\"}}\n        - {{method: POST, path: \"/api/v1/orders\", headers: [\"X-Tenant: t{i}\"]}}\n",
            i % 50,
            i % 100
        ));
    }
    s
}

fn one_port_with_rules(n: usize) -> String {
    let mut s = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: big, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: api}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts:\n    - ports: [{port: \"8080\", protocol: TCP}]\n      rules:\n        http:\n",
    );
    for i in 0..n {
        let path = if i + 1 == n {
            "/bench/target".to_string()
        } else {
            format!("/route{i}/.*")
        };
        s.push_str(&format!("        - {{method: GET, path: \"{path}\"}}\n"));
    }
    s
}

fn bench(c: &mut Criterion) {
    let src = policies(10_000);
    c.bench_function("compile 10000 policies", |b| {
        b.iter(|| {
            let mut set = PolicySet::default();
            set.load_str("bench.yaml", black_box(&src));
            assert!(set.diagnostics.is_empty());
            set.rules.len()
        })
    });

    for n in [100, 1000] {
        let mut set = PolicySet::default();
        set.load_str("big.yaml", &one_port_with_rules(n));
        assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
        let inv = Inventory::new(
            vec![
                EndpointSpec {
                    name: "api".into(),
                    namespace: "prod".into(),
                    labels: [("app".to_string(), "api".to_string())].into(),
                    ..Default::default()
                },
                EndpointSpec {
                    name: "web".into(),
                    namespace: "prod".into(),
                    labels: [("app".to_string(), "web".to_string())].into(),
                    ..Default::default()
                },
            ],
            vec![],
        )
        .unwrap();
        let eval = Evaluator::new(set.rules);
        let api = inv.by_name("api").unwrap();
        let local = Local {
            labels: &api.labels,
            is_host: false,
            named_ports: &[],
        };
        let pp = eval.port_policy(&local, Direction::Ingress, 8080, Protocol::Tcp);
        let remote = Remote::endpoint(inv.by_name("web").unwrap());
        let headers = [("user-agent", "bench"), ("accept", "*/*")];
        let req = L7Request::Http {
            request: HttpRequest {
                method: "GET",
                path: "/bench/target",
                host: "api:8080",
                headers: &headers,
            },
            grpc: None,
        };
        let v = pp.evaluate(&remote, Some(&req));
        assert!(v.is_allowed(), "{v:?}");
        c.bench_function(
            &format!("evaluate HTTP request, {n} rules on the port"),
            |b| b.iter(|| pp.evaluate(black_box(&remote), Some(black_box(&req)))),
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
