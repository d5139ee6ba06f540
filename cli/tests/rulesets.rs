//! The agent → proxy rule-set stream between two real processes: `tollgate agent --policies
//! DIR --rule-socket SOCK` and `tollgate proxy --agent SOCK`, judging real DNS queries (dig) to a
//! real resolver (dnsmasq) on loopback. Covers: no listener before the first version (nothing
//! is served unjudged), changes applied live and measured, a rejected rule set reported with
//! its file, line and path while the other changes apply, agent restart (the proxy keeps
//! answering, then re-syncs), proxy restart (re-synced on connect), and the proxy's `Observe`
//! stream read by `tollgate observe --server`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{DNS_ENDPOINTS, DNS_POLICY, Reaped, dig_status as status, write_atomic};

/// Polls until `name` gets `want` (bounded); how long that took.
fn until(port: u16, name: &str, want: &str, log: &Path) -> Duration {
    let t = Instant::now();
    while status(port, name) != want {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{name} not {want} after 15 s:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

fn wait_for_log(log: &Path, needle: &str) -> String {
    common::wait_for_log(log, needle, Duration::from_secs(15))
}

const OTHER_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: other, namespace: apps}
spec:
  endpointSelector: {matchLabels: {app: batch}}
  egress:
  - toEndpoints: [{matchLabels: {app: db}}]
"#;

#[test]
fn the_proxy_enforces_what_the_agent_streams_through_restarts_of_either() {
    common::need(&["dig", "dnsmasq"]);
    let up = common::free_udp_port();
    let _dnsmasq = common::dnsmasq(up);
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let dns_file = policies.join("dns.yaml");
    let other_file = policies.join("other.yaml");
    write_atomic(
        &dns_file,
        &DNS_POLICY.replace("PATTERNS", "{matchPattern: \"*.example.com\"}"),
    );
    write_atomic(&other_file, OTHER_POLICY);
    let endpoints = dir.path().join("endpoints.yaml");
    std::fs::write(&endpoints, DNS_ENDPOINTS).unwrap();
    let rules = dir.path().join("rules.sock");
    let observe = dir.path().join("observe.sock");
    let port = common::free_udp_port();
    let metrics_port = common::free_tcp_port();
    let agent_metrics_port = common::free_tcp_port();
    let scrape_port = |p: u16| {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "2"])
            .arg(format!("http://127.0.0.1:{p}/metrics"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let scrape = || scrape_port(metrics_port);
    let proxy_log = dir.path().join("proxy.log");
    let start_proxy = |log: &Path| {
        Reaped(
            Command::new(env!("CARGO_BIN_EXE_tollgate"))
                .args(["proxy", "--audit-log", "/dev/null", "--agent"])
                .arg(&rules)
                .arg("--observe-socket")
                .arg(&observe)
                .args(["--dns-listen", &format!("127.0.0.1:{port}")])
                .args(["--dns-to", &format!("kube-dns@127.0.0.1:{up}")])
                .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let agent_log = dir.path().join("agent.log");
    let start_agent = |log: &Path| {
        Reaped(
            Command::new(env!("CARGO_BIN_EXE_tollgate"))
                .args(["agent", "--poll-ms", "50", "--policies"])
                .arg(&policies)
                .arg("--endpoints")
                .arg(&endpoints)
                .arg("--rule-socket")
                .arg(&rules)
                .args(["--metrics", &format!("127.0.0.1:{agent_metrics_port}")])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log).unwrap())
                .spawn()
                .unwrap(),
        )
    };

    // The proxy first: without a version from the agent it has no listener — a query gets
    // no answer rather than an unjudged one.
    let proxy = start_proxy(&proxy_log);
    wait_for_log(&proxy_log, "waiting for the agent");
    assert_eq!(status(port, "api.example.com"), "NO-ANSWER");

    let mut agent = start_agent(&agent_log);
    let first = until(port, "api.example.com", "NOERROR", &proxy_log);
    assert_eq!(status(port, "db.example.org"), "REFUSED");
    wait_for_log(&agent_log, "3 rule set(s) accepted, 0 rejected");

    // One change the proxy accepts (db.example.org allowed) and, in the same version, one it
    // rejects (a whole rule lost to an unknown field): the good one applies, the bad one is
    // reported with file, line and path, and its previous version stays in force.
    write_atomic(
        &other_file,
        &OTHER_POLICY.replace("  egress:", "  egres:\n  egress:"),
    );
    write_atomic(
        &dns_file,
        &DNS_POLICY.replace(
            "PATTERNS",
            "{matchPattern: \"*.example.com\"}, {matchName: db.example.org}",
        ),
    );
    let change = until(port, "db.example.org", "NOERROR", &proxy_log);
    let logged = wait_for_log(&agent_log, "1 rejected");
    let other = other_file.display().to_string();
    assert!(
        logged.contains(&format!(
            "rejected {other} (its previous version stays in force)"
        )) && logged.contains(&format!("{other}:6: spec.egres")),
        "{logged}"
    );
    let m = scrape();
    assert!(
        m.contains("tollgate_rule_sets{outcome=\"rejected\"} 1")
            && m.contains("tollgate_rule_sets{outcome=\"accepted\"} 2")
            && m.contains("tollgate_agent_connected 1"),
        "{m}"
    );
    let am = scrape_port(agent_metrics_port);
    assert!(
        am.contains("tollgate_agent_proxies{outcome=\"rejecting\"} 1")
            && am.contains("tollgate_agent_proxies{outcome=\"connected\"} 1")
            && am.contains("tollgate_agent_revision 2"),
        "agent metrics:\n{am}"
    );
    write_atomic(&other_file, OTHER_POLICY);
    wait_for_log(&agent_log, "3 rule set(s) accepted, 0 rejected");

    // Agent away: the proxy keeps answering with what it has, every query.
    drop(agent);
    wait_for_log(&proxy_log, "serving revision");
    assert!(scrape().contains("tollgate_agent_connected 0"));
    for _ in 0..20 {
        assert_eq!(status(port, "db.example.org"), "NOERROR");
    }
    // A change made while the agent is away reaches the proxy when it is back.
    write_atomic(
        &dns_file,
        &DNS_POLICY.replace("PATTERNS", "{matchPattern: \"*.example.com\"}"),
    );
    let agent_log2 = dir.path().join("agent2.log");
    agent = start_agent(&agent_log2);
    let resync = until(port, "db.example.org", "REFUSED", &proxy_log);
    wait_for_log(&proxy_log, "reconnected to the agent");

    // Proxy restart: the new process gets the whole set on connect.
    drop(proxy);
    let proxy_log2 = dir.path().join("proxy2.log");
    let started = Instant::now();
    let _proxy = start_proxy(&proxy_log2);
    until(port, "api.example.com", "NOERROR", &proxy_log2);
    let restart = started.elapsed();
    assert_eq!(status(port, "db.example.org"), "REFUSED");
    wait_for_log(&agent_log2, "version 1 in force as revision 1");

    // The proxy's Observe stream: the denial just made, filtered in the proxy.
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "observe",
            "-o",
            "json",
            "--verdict",
            "denied",
            "--protocol",
            "dns",
        ])
        .arg("--server")
        .arg(&observe)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!recs.is_empty(), "no records: {text}");
    assert!(
        recs.iter()
            .all(|r| r["verdict"] == "denied" && r["protocol"] == "dns"),
        "{text}"
    );
    assert!(
        recs.iter()
            .any(|r| r["dns"]["qname"].as_str() == Some("db.example.org.")),
        "{text}"
    );
    // Following: a record written after the call starts arrives on the open stream.
    let mut follow = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["observe", "-o", "json", "--follow", "--verdict", "denied"])
        .arg("--server")
        .arg(&observe)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("followed.example.net"))
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status(port, "followed.example.net"), "REFUSED");
    let t = Instant::now();
    while !lines.is_finished() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        lines.join().unwrap().is_some(),
        "the followed stream did not show the new denial"
    );
    eprintln!(
        "first version in force {first:?} after the agent started; change {change:?} (agent \
         polls every 50 ms); agent restart to re-sync {resync:?}; proxy restart to answering \
         {restart:?}"
    );
    drop(agent);
}
