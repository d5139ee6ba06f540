//! Kubernetes source at scale, against the tests' in-process fake API server (no real API
//! server runs here): time from start to the first snapshot (list of every kind, load, cluster
//! identities created through the API), then the latency from one changed CNP to the snapshot
//! that has it, over many changes (p50/p99), with the default debounce.
//!
//! `cargo run --release -p tollgate-agent --example kube_sync_bench -- PODS POLICIES CHANGES`

#[path = "../tests/fake_api/mod.rs"]
mod fake_api;

use std::time::{Duration, Instant};

use fake_api::{FakeApi, namespace, pod, policy};
use serde_json::json;
use tollgate_agent::kubernetes::source::{self, Options};

fn cnp(i: usize, path: &str) -> serde_json::Value {
    policy(
        "CiliumNetworkPolicy",
        Some(&format!("ns-{}", i % 10)),
        &format!("p-{i}"),
        json!({"endpointSelector": {"matchLabels": {"app": format!("app-{}", i % 50)}},
               "ingress": [{"fromEndpoints": [{"matchLabels": {"app": format!("app-{}", (i + 1) % 50)}}],
                            "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                                         "rules": {"http": [{"method": "GET", "path": path}]}}]}]}),
    )
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (pods, policies, changes) = (
        *args.first().unwrap_or(&1000),
        *args.get(1).unwrap_or(&1000),
        *args.get(2).unwrap_or(&50),
    );
    let fake = FakeApi::start().await;
    fake.atomically(|tx| {
        for n in 0..10 {
            tx.put(namespace(
                &format!("ns-{n}"),
                json!({"team": format!("t{n}")}),
            ));
        }
        for i in 0..pods {
            let ip = format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256);
            tx.put(pod(
                &format!("ns-{}", i % 10),
                &format!("pod-{i}"),
                &ip,
                json!({"app": format!("app-{}", i % 50)}),
            ));
        }
        for i in 0..policies {
            tx.put(cnp(i, "/api/.*"));
        }
    });
    let t = Instant::now();
    let mut running = source::start(fake.client(), Options::default())
        .await
        .expect("start");
    let first = running.snapshots.borrow().clone();
    println!(
        "first snapshot: {:.0} ms ({} endpoints, {} identities created, {} rules, {} problems)",
        t.elapsed().as_secs_f64() * 1000.0,
        first.inventory.endpoints.len(),
        fake.list("TollgateIdentity").len(),
        first.policies.rules.len(),
        first.problems.len()
    );
    let mut lat = Vec::new();
    for c in 0..changes {
        let rev = running.snapshots.borrow_and_update().revision;
        let t = Instant::now();
        fake.put(cnp(c % policies.max(1), &format!("/v{c}/.*")));
        loop {
            tokio::time::timeout(Duration::from_secs(30), running.snapshots.changed())
                .await
                .expect("a new snapshot within 30 s")
                .unwrap();
            if running.snapshots.borrow().revision > rev {
                break;
            }
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "one CNP changed → snapshot ({} changes, debounce 100 ms): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        lat.len(),
        q(0.5),
        q(0.99),
        lat[lat.len() - 1]
    );
    println!(
        "peak RSS (fake API server included): {:.0} MiB",
        peak_rss_mib()
    );
}
