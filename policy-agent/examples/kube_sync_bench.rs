//! Kubernetes source at scale, against the tests' fake API server (no real API server runs
//! here): time from start to the first snapshot (list of every kind, load, cluster identities
//! created through the API), then the latency from one changed CNP to the snapshot that has it,
//! over many changes (p50/p99), with the default debounce; and the agent's memory.
//!
//! `cargo run --release -p tollgate-agent --example kube_sync_bench -- PODS POLICIES CHANGES`
//!
//! The fake API server runs in a child process (this program with `--serve`, driven over its
//! stdin/stdout), so the memory figures are the agent's alone: peak and current RSS from
//! `/proc/self/status`, and the heap in use (bytes allocated and not freed, counted by this
//! program's global allocator) after the first snapshot and at the end. `--in-process` runs the
//! fake server in this process instead (how the first figures were taken: RSS then includes the
//! server and its copy of every object and event).
#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]

#[path = "../tests/fake_api/mod.rs"]
mod fake_api;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fake_api::{FakeApi, namespace, pod, policy};
use serde_json::json;
use tollgate_agent::kubernetes::source::{self, Options};
use tollgate_agent::plan::{PlanCache, ProxyPorts, compile_local_cached};

/// Nodes the pods are spread over.
const NODES: usize = 33;

/// The system allocator, counting the bytes in use and their peak.
struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` with the caller's arguments; only counters are
// added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = IN_USE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size
                    - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                IN_USE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MIB: f64 = 1024.0 * 1024.0;

/// The `p` quantile (0..=1) of sorted, non-empty samples (nearest rank).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / MIB
}

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

/// `VmHWM` (peak) or `VmRSS` (now) of this process, in MiB.
fn rss_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

/// The cluster of the benchmark: 10 namespaces, `pods` pods over 50 apps, `policies` CNPs.
async fn fill(fake: &FakeApi, pods: usize, policies: usize) {
    fake.atomically(|tx| {
        for n in 0..10 {
            tx.put(namespace(
                &format!("ns-{n}"),
                json!({"team": format!("t{n}")}),
            ));
        }
        for i in 0..pods {
            let ip = format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256);
            let mut p = pod(
                &format!("ns-{}", i % 10),
                &format!("pod-{i}"),
                &ip,
                json!({"app": format!("app-{}", i % 50)}),
            );
            // 33 nodes of ~30 pods: what one node's agent compiles for its kernel.
            p["spec"]["nodeName"] = json!(format!("node-{}", i % NODES));
            tx.put(p);
        }
        for i in 0..policies {
            tx.put(cnp(i, "/api/.*"));
        }
    });
}

/// The fake server, in this process or in a child.
enum Server {
    Local(FakeApi),
    Child {
        child: std::process::Child,
        stdin: std::process::ChildStdin,
        stdout: std::io::BufReader<std::process::ChildStdout>,
        url: String,
    },
}

impl Server {
    fn client(&self) -> kube::Client {
        match self {
            Server::Local(f) => f.client(),
            Server::Child { url, .. } => {
                kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
            }
        }
    }

    /// Send one command to the child and read its one-line answer.
    fn ask(&mut self, cmd: &str) -> String {
        let Server::Child { stdin, stdout, .. } = self else {
            unreachable!()
        };
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    fn put_cnp(&mut self, i: usize, path: &str) {
        match self {
            Server::Local(f) => {
                f.put(cnp(i, path));
            }
            Server::Child { .. } => {
                assert_eq!(self.ask(&format!("put {i} {path}")), "ok");
            }
        }
    }

    fn identities(&mut self) -> usize {
        match self {
            Server::Local(f) => f.list("TollgateIdentity").len(),
            Server::Child { .. } => self.ask("identities").parse().unwrap(),
        }
    }

    fn server_peak_rss(&mut self) -> Option<f64> {
        match self {
            Server::Local(_) => None,
            Server::Child { .. } => self.ask("rss").parse().ok(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Server::Child { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `--serve PODS POLICIES`: the fake server, driven by lines on stdin (`put I PATH`,
/// `identities`, `rss`); it prints its URL first and exits when stdin closes.
async fn serve(pods: usize, policies: usize) {
    let fake = FakeApi::start().await;
    fill(&fake, pods, policies).await;
    println!("{}", fake.url);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["put", i, path] => {
                fake.put(cnp(i.parse().unwrap(), path));
                "ok".to_string()
            }
            ["identities"] => fake.list("TollgateIdentity").len().to_string(),
            ["rss"] => format!("{:.0}", rss_mib("VmHWM:")),
            _ => "?".to_string(),
        };
        println!("{answer}");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let flag = |f: &str| raw.iter().any(|a| a == f);
    let args: Vec<usize> = raw.iter().filter_map(|a| a.parse().ok()).collect();
    let (pods, policies, changes) = (
        *args.first().unwrap_or(&1000),
        *args.get(1).unwrap_or(&1000),
        *args.get(2).unwrap_or(&50),
    );
    if flag("--serve") {
        serve(pods, policies).await;
        return;
    }
    let mut server = if flag("--in-process") {
        let fake = FakeApi::start().await;
        fill(&fake, pods, policies).await;
        Server::Local(fake)
    } else {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--serve", &pods.to_string(), &policies.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the fake API server");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut url = String::new();
        stdout.read_line(&mut url).unwrap();
        Server::Child {
            child,
            stdin,
            stdout,
            url: url.trim().to_string(),
        }
    };
    let heap_before = IN_USE.load(Ordering::Relaxed);
    let t = Instant::now();
    let mut running = source::start(server.client(), Options::default())
        .await
        .expect("start");
    let first_ms = t.elapsed().as_secs_f64() * 1000.0;
    let heap_first = IN_USE.load(Ordering::Relaxed) - heap_before;
    let (endpoints, rules, problems) = {
        let first = running.snapshots.borrow();
        (
            first.inventory.endpoints.len(),
            first.policies.rules.len(),
            first.problems.len(),
        )
    };
    println!(
        "first snapshot: {first_ms:.0} ms ({endpoints} endpoints, {} identities created, {rules} rules, {problems} problems); heap in use {:.0} MiB, peak RSS so far {:.0} MiB",
        server.identities(),
        mib(heap_first),
        rss_mib("VmHWM:"),
    );
    let mut lat = Vec::new();
    let mut enforced = Vec::new();
    let mut compile = Vec::new();
    let mut plan_cache = PlanCache::default();
    let mut local_entries = 0;
    for c in 0..changes {
        let rev = running.snapshots.borrow_and_update().revision;
        let t = Instant::now();
        server.put_cnp(c % policies.max(1), &format!("/v{c}/.*"));
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
        // What `tollgate up --kubernetes` on node-0 does next: this node's kernel entries.
        let snap = running.snapshots.borrow().clone();
        let c0 = Instant::now();
        let plan = compile_local_cached(
            &snap.evaluator(),
            &snap.inventory,
            ProxyPorts {
                l7: 15001,
                dns: 15053,
            },
            &[],
            &|ep| ep.spec.node.as_deref() == Some("node-0"),
            &mut plan_cache,
        );
        local_entries = plan.policy.len();
        compile.push(c0.elapsed().as_secs_f64() * 1000.0);
        enforced.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    enforced.sort_by(f64::total_cmp);
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| percentile(&lat, p);
    if !lat.is_empty() {
        println!(
            "one CNP changed → snapshot ({} changes, debounce {} ms): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            lat.len(),
            Options::default().debounce.as_millis(),
            q(0.5),
            q(0.99),
            lat[lat.len() - 1]
        );
    }
    if !enforced.is_empty() {
        let q = |p: f64| percentile(&enforced, p);
        println!(
            "one CNP changed → snapshot + node-0's kernel plan ({} local pods of {NODES} nodes, {local_entries} policy entries): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            pods.div_ceil(NODES),
            q(0.5),
            q(0.99),
            enforced[enforced.len() - 1]
        );
        compile.sort_by(f64::total_cmp);
        let q = |p: f64| percentile(&compile, p);
        println!(
            "  of which node-0's kernel plan (evaluator + compile_local_cached): p50 {:.0} ms, p99 {:.0} ms",
            q(0.5),
            q(0.99)
        );
        println!(
            "  endpoints reused from the plan cache / recompiled: {} / {}",
            plan_cache.reused, plan_cache.recompiled
        );
    }
    let what = match server.server_peak_rss() {
        Some(s) => format!("agent only; the fake server's peak RSS was {s:.0} MiB"),
        None => "fake API server included".to_string(),
    };
    println!(
        "memory ({what}): peak RSS {:.0} MiB, RSS now {:.0} MiB, heap in use now {:.0} MiB, peak heap {:.0} MiB",
        rss_mib("VmHWM:"),
        rss_mib("VmRSS:"),
        mib(IN_USE.load(Ordering::Relaxed)),
        mib(PEAK.load(Ordering::Relaxed)),
    );
}
