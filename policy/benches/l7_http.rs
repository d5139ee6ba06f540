//! HttpRuleSet matching cost on one port: 1,000 and 100 method+path rules where only the last
//! matches (the worst case for a per-rule loop; the set runs one `RegexSet` per field).
//! Run: `cargo bench -p tollgate-policy --bench l7_http`.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tollgate_policy::api::HttpRule;
use tollgate_policy::l7::{HttpRequest, HttpRuleSet, compile_http_rule};

fn rule_set(n: usize) -> HttpRuleSet {
    let rules = (0..n)
        .map(|i| {
            let path = if i + 1 == n {
                "/bench/target".to_string()
            } else {
                format!("/route{i}/[0-9]+")
            };
            let r: HttpRule = serde_json::from_value(serde_json::json!({
                "method": if i % 2 == 0 { "GET" } else { "POST|PUT" },
                "path": path,
            }))
            .expect("valid rule");
            compile_http_rule(&r, false).expect("compiles")
        })
        .collect();
    HttpRuleSet::new(rules).expect("set compiles")
}

fn bench(c: &mut Criterion) {
    for n in [100usize, 1000] {
        let set = rule_set(n);
        let headers = [("user-agent", "bench"), ("accept", "*/*")];
        let req = HttpRequest {
            method: if n % 2 == 1 { "GET" } else { "POST" },
            path: "/bench/target",
            host: "api.example",
            headers: &headers,
        };
        let mut out = Vec::with_capacity(4);
        set.matching(&req, &mut out);
        assert_eq!(out, vec![n - 1], "only the last rule matches");
        c.bench_function(&format!("l7_http_matching_{n}_rules_last_matches"), |b| {
            b.iter(|| {
                out.clear();
                set.matching(black_box(&req), &mut out);
                black_box(out.len())
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
