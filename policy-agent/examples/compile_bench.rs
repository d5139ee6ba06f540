//! Compile-time and memory benchmark of the agent: N policies over M endpoints (defaults
//! 10,000 and 1,000, the scale), then one policy changed and recompiled.
//!
//! `cargo run --release -p tollgate-agent --example compile_bench -- [POLICIES] [ENDPOINTS]`
//!
//! Each endpoint is its own app (its own identity); policy i selects app (i mod M) and allows
//! ingress from app (i+1 mod M) on port 8000 + (i mod 50) with two HTTP rules, so every
//! endpoint has ~N/M policies and the remote set is all M identities.
#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]

use std::time::Instant;

use tollgate_agent::plan::{
    FIRST_FQDN_IDENTITY, LearnedIp, PlanCache, ProxyPorts, compile, compile_local_cached,
};
use tollgate_policy::endpoints::Inventory;
use tollgate_policy::eval::Evaluator;
use tollgate_policy::load::PolicySet;

fn max_rss_mib() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (n, m) = (
        args.first().copied().unwrap_or(10_000),
        args.get(1).copied().unwrap_or(1_000),
    );
    let mut inv = String::from("endpoints:\n");
    for j in 0..m {
        inv.push_str(&format!(
            "  - {{name: app{j}, namespace: prod, labels: {{app: app{j}}}, ips: [10.{}.{}.{}]}}\n",
            j / 65536,
            (j / 256) % 256,
            j % 256
        ));
    }
    let mut src = String::new();
    for i in 0..n {
        src.push_str(&format!(
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{i}, namespace: prod}}\nspec:\n  endpointSelector: {{matchLabels: {{app: app{}}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: app{}}}}}]\n    toPorts:\n    - ports: [{{port: \"{}\", protocol: TCP}}]\n      rules:\n        http:\n        - {{method: GET, path: \"/api/v{}/items/[0-9]+\"}}\n        - {{method: POST, path: \"/api/v1/orders\"}}\n",
            i % m,
            (i + 1) % m,
            8000 + i % 50,
            i % 7
        ));
        if i % 100 == 0 {
            // One policy in a hundred also lets its endpoint reach names by toFQDNs.
            src.push_str(
                "  egress:\n  - toFQDNs: [{matchPattern: \"*.example.com\"}]\n    toPorts:\n    - ports: [{port: \"443\", protocol: TCP}]\n",
            );
        }
    }
    let ports = ProxyPorts {
        l7: 15001,
        dns: 15053,
    };
    let inv = Inventory::from_yaml(&inv).expect("inventory");

    let t = Instant::now();
    let mut set = PolicySet::default();
    set.load_str("bench.yaml", &src);
    assert!(set.diagnostics.is_empty());
    let load = t.elapsed();
    let eval = Evaluator::new(set.rules);
    let t = Instant::now();
    let plan = compile(&eval, &inv, ports);
    let full = t.elapsed();
    println!(
        "{n} policies over {m} endpoints: load+validate {:.0} ms, compile to kernel entries {:.0} ms \
         ({} policy entries, {} ipcache entries), peak RSS {:.0} MiB",
        load.as_secs_f64() * 1000.0,
        full.as_secs_f64() * 1000.0,
        plan.policy.len(),
        plan.ipcache.len(),
        max_rss_mib()
    );

    // FQDN learning: the DNS proxy learns addresses one answer at a time; each learned batch is
    // a new plan. With the plan cache, endpoints none of whose peers match the new address
    // take it as a delta; the ones with a matching toFQDNs peer are compiled again.
    let mut cache = PlanCache::default();
    let local = |_: &tollgate_policy::endpoints::Endpoint| true;
    compile_local_cached(&eval, &inv, ports, &[], &local, &mut cache);
    let mut learned = Vec::new();
    for (k, name) in ["www.example.com.", "cdn.example.net.", "api.example.com."]
        .iter()
        .enumerate()
    {
        learned.push(LearnedIp {
            identity: FIRST_FQDN_IDENTITY + k as u32,
            ip: format!("203.0.113.{}", k + 1).parse().expect("address"),
            names: vec![name.to_string()],
        });
        let before = cache.recompiled;
        let t = Instant::now();
        let plan = compile_local_cached(&eval, &inv, ports, &learned, &local, &mut cache);
        println!(
            "learned {name} ({} addresses in all): plan in {:.1} ms, {} of {m} endpoints compiled again, {} policy entries",
            learned.len(),
            t.elapsed().as_secs_f64() * 1000.0,
            cache.recompiled - before,
            plan.policy.len()
        );
    }
}
