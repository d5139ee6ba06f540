//! `tollgate up` on the real kernel: "pods" are network namespaces wired through a node
//! namespace; `tollgate up` runs in the node namespace from a policy directory and an
//! inventory, attaches the datapath, starts the proxy and watches the files. The test sends
//! real HTTP (curl) and changes the policy files under it, measuring how long each change takes
//! to be enforced. Needs root (skipped loudly otherwise; CI runs as root).

#[path = "../../redirector-ebpf/loader/tests/harness/mod.rs"]
mod harness;
#[path = "common/kernel.rs"]
mod kernel;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Reaped, write_atomic};
use harness::{Topology, require_root};
use kernel::{
    WebServer, curl, curl_quick, http_server, http_server_at, start_proxy, start_proxy_with, until,
    wait_for_log,
};

mod common;

const CLIENT_EGRESS: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{method: GET, path: PATHS}]
"#;

const SERVER_INGRESS: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{method: GET, path: /allowed.txt}]
"#;

#[test]
fn tollgate_up_enforces_policy_files_and_applies_changes_while_running() {
    if !require_root("tollgate_up_enforces_policy_files_and_applies_changes_while_running") {
        return;
    }
    let t = Topology::new();
    let web = WebServer::start(&t);
    let url = |path: &str| web.url(path);

    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let client_policy = policies.join("client.yaml");
    write_atomic(
        &client_policy,
        &CLIENT_EGRESS.replace("PATHS", "/allowed.txt"),
    );
    let line = |name: &str, h: &harness::Host| {
        format!(
            "  - {{name: {name}, namespace: prod, labels: {{app: {name}}}, ips: [{}, '{}'], interface: {}}}\n",
            h.v4, h.v6, h.host_if
        )
    };
    let inventory = dir.path().join("endpoints.yaml");
    std::fs::write(
        &inventory,
        format!(
            "endpoints:\n{}{}{}",
            line("client", &t.client),
            line("server", &t.server),
            line("other", &t.other)
        ),
    )
    .unwrap();
    let log = dir.path().join("up.log");
    let audit = dir.path().join("audit.jsonl");
    let _up = start_up(&t, &policies, &inventory, &log, &audit);
    wait_for_log(&log, "revision 1:");

    // L7 through the redirect: the proxy judges each request.
    let status = || {
        let st = t.in_node(|| tollgate_datapath::status(&t.pin_root));
        format!(
            "{}\n{st:?}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    assert_eq!(
        curl(&t.client.netns, &url("/allowed.txt")),
        200,
        "{}",
        status()
    );
    assert_eq!(curl(&t.client.netns, &url("/secret.txt")), 403);
    // Nothing selects `other`: open.
    assert_eq!(curl(&t.other.netns, &url("/secret.txt")), 200);

    // Change 1 (L7): allow /secret.txt too.
    write_atomic(
        &client_policy,
        &CLIENT_EGRESS.replace("PATHS", "\"/(allowed|secret).txt\""),
    );
    let l7_change = until(200, || curl(&t.client.netns, &url("/secret.txt")));
    wait_for_log(&log, "revision 2 applied");

    // Change 2 (the server's ingress, L3 and L7): only the client, and only GET /allowed.txt.
    // `other` is now dropped in the kernel; the client's requests are redirected on the
    // client's own interface so that the proxy applies the server's ingress HTTP rules, and
    // the proxy's marked upstream connection is admitted by the server's interface.
    write_atomic(&policies.join("server.yaml"), SERVER_INGRESS);
    let l3_change = until(0, || curl_quick(&t.other.netns, &url("/allowed.txt")));
    wait_for_log(&log, "revision 3 applied");
    assert_eq!(
        curl(&t.client.netns, &url("/allowed.txt")),
        200,
        "client still allowed"
    );
    assert_eq!(
        curl(&t.client.netns, &url("/secret.txt")),
        403,
        "the server's ingress L7 rule, although the client's egress allows it"
    );

    // A broken file keeps the last good policy in force and says why.
    write_atomic(
        &policies.join("broken.yaml"),
        "apiVersion: cilium.io/v2\nkind: [\n",
    );
    let logged = wait_for_log(&log, "keeping revision 3");
    assert!(logged.contains("broken.yaml:3"), "{logged}");
    assert_eq!(curl(&t.client.netns, &url("/secret.txt")), 403);
    assert_eq!(curl(&t.client.netns, &url("/allowed.txt")), 200);
    assert_eq!(curl(&t.other.netns, &url("/allowed.txt")), 0);

    let recs = std::fs::read_to_string(&audit).unwrap();
    assert!(
        recs.lines()
            .any(|l| l.contains("\"/secret.txt\"") && l.contains("\"egress\"")),
        "the client's egress denial: {recs}"
    );
    assert!(
        recs.lines()
            .any(|l| l.contains("\"/secret.txt\"") && l.contains("\"ingress\"")),
        "the server's ingress denial: {recs}"
    );
    eprintln!(
        "policy change to enforcement (inotify; L3/L4 includes one 100 ms connect timeout): \
         L7 {l7_change:?}, L3/L4 {l3_change:?}\n{logged}"
    );
    assert!(l7_change < Duration::from_secs(3) && l3_change < Duration::from_secs(3));
}

#[test]
fn tofqdns_allows_an_address_as_soon_as_its_name_is_resolved_through_the_proxy() {
    if !require_root("tofqdns_allows_an_address_as_soon_as_its_name_is_resolved_through_the_proxy")
    {
        return;
    }
    let t = Topology::new();
    // `other` plays a host outside the cluster (not in the inventory): the world.
    let outside = t.other.v4.to_string();
    let _http = http_server(&t.other, &[("index.html", "outside\n")]);
    let resolver = t.server.v4.to_string();
    let _dnsmasq = resolver_in(&t.server, &[("api.example.com", &outside)], 300);
    let url = format!("http://{outside}:8080/index.html");
    until(200, || curl(&t.client.netns, &url));

    let dir = tempfile::tempdir().unwrap();
    let (policies, inventory) = fqdn_policy(&t, dir.path());
    let log = dir.path().join("up.log");
    let _up = start_up(
        &t,
        &policies,
        &inventory,
        &log,
        &dir.path().join("audit.jsonl"),
    );
    wait_for_log(&log, "revision 1:");

    assert_eq!(
        curl_quick(&t.client.netns, &url),
        0,
        "the address is the world until a DNS answer names it"
    );
    assert_eq!(dig(&t.client.netns, &resolver, "api.example.com"), outside);
    // The very first connection after the answer, with no time for a SYN retry (100 ms
    // connect timeout): the kernel entry was written before the answer was released.
    assert_eq!(
        curl_quick(&t.client.netns, &url),
        200,
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert_eq!(
        curl_quick(&t.client.netns, &format!("http://{outside}:8081/")),
        0,
        "toFQDNs opened port 8080 only"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("1 learned IP(s)"), "{logged}");
}

/// dnsmasq on port 53 of `host`'s IPv4 address, answering `records` (name, address) with TTL
/// `ttl` and nothing else.
fn resolver_in(host: &harness::Host, records: &[(&str, &str)], ttl: u32) -> Reaped {
    Reaped(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &host.netns,
                "dnsmasq",
                "--keep-in-foreground",
            ])
            .args(["-C", "/dev/null", "--port=53", "--bind-interfaces"])
            .args(["--no-resolv", "--no-hosts", "--user=root", "--pid-file="])
            .arg(format!("--local-ttl={ttl}"))
            .arg(format!("--listen-address={}", host.v4))
            .args(
                records
                    .iter()
                    .map(|(name, addr)| format!("--host-record={name},{addr}")),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// `dig +short` from `netns` asking `resolver` (2 s, one try): the answer's lines.
fn dig(netns: &str, resolver: &str, name: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns", "exec", netns, "dig", "+short", "+tries=1", "+time=2",
        ])
        .arg(format!("@{resolver}"))
        .arg(name)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The rcode `dig` from `netns` got for `name` (type `qtype`) from `resolver` (`NO-ANSWER`
/// when nothing came back in 2 s).
fn dig_rcode(netns: &str, resolver: &str, name: &str, qtype: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "dig", "+tries=1", "+time=2"])
        .args(["+noall", "+comments", &format!("@{resolver}"), name, qtype])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("NO-ANSWER")
        .to_string()
}

/// In `dir`: a policy directory where the client may ask the resolver (`server`) about
/// `*.example.com` and reach `api.example.com` on port 8080 (toFQDNs), and the inventory of
/// client and resolver. (policies dir, inventory file).
fn fqdn_policy(t: &Topology, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let policies = dir.join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("client.yaml"),
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: resolver}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.example.com"}]
  - toFQDNs: [{matchName: api.example.com}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
"#,
    )
    .unwrap();
    let inventory = dir.join("endpoints.yaml");
    std::fs::write(
        &inventory,
        format!(
            "endpoints:\n  - {{name: client, namespace: prod, labels: {{app: client}}, ips: [{}], interface: {}}}\n  - {{name: resolver, namespace: prod, labels: {{app: resolver}}, ips: [{}], interface: {}}}\n",
            t.client.v4, t.client.host_if, t.server.v4, t.server.host_if
        ),
    )
    .unwrap();
    (policies, inventory)
}

/// `tollgate up` in the node namespace (nsenter switches only the network namespace: `ip
/// netns exec` would also remount /sys, hiding the BPF filesystem the datapath pins to).
fn start_up(t: &Topology, policies: &Path, inventory: &Path, log: &Path, audit: &Path) -> Reaped {
    start_up_with(t, policies, inventory, log, audit, &[])
}

fn start_up_with(
    t: &Topology,
    policies: &Path,
    inventory: &Path,
    log: &Path,
    audit: &Path,
    extra: &[&std::ffi::OsStr],
) -> Reaped {
    Reaped(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", t.node))
            .args([env!("CARGO_BIN_EXE_tollgate"), "up"])
            .args(extra)
            .arg("--policies")
            .arg(policies)
            .arg("--endpoints")
            .arg(inventory)
            .arg("--pin-root")
            .arg(&t.pin_root)
            .arg("--audit-log")
            .arg(audit)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn a_restart_keeps_enforcing_fails_closed_for_l7_and_keeps_established_connections() {
    use std::io::{Read, Write};
    if !require_root(
        "a_restart_keeps_enforcing_fails_closed_for_l7_and_keeps_established_connections",
    ) {
        return;
    }
    let t = Topology::new();
    harness::spawn_echo_server(&t.server.netns, 7000);
    harness::spawn_echo_server(&t.server.netns, 7001);
    let not_allowed = SocketAddr::new(t.server.v4.into(), 7001);
    assert!(harness::tcp_ok(&t.client.netns, not_allowed), "open before");
    let server = t.server.v4.to_string();
    let _http = http_server(&t.server, &[("allowed.txt", "public\n")]);
    let url = format!("http://{server}:8080/allowed.txt");
    until(200, || curl(&t.client.netns, &url));
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("client.yaml"),
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts:
    - ports: [{port: "7000", protocol: TCP}]
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{method: GET, path: /allowed.txt}]
"#,
    )
    .unwrap();
    let inventory = dir.path().join("endpoints.yaml");
    std::fs::write(
        &inventory,
        format!(
            "endpoints:\n  - {{name: client, namespace: prod, labels: {{app: client}}, ips: [{}], interface: {}}}\n  - {{name: server, namespace: prod, labels: {{app: server}}, ips: [{}], interface: {}}}\n",
            t.client.v4, t.client.host_if, t.server.v4, t.server.host_if
        ),
    )
    .unwrap();
    let log1 = dir.path().join("up1.log");
    let audit = dir.path().join("audit.jsonl");
    let up = start_up(&t, &policies, &inventory, &log1, &audit);
    wait_for_log(&log1, "revision 1:");
    assert_eq!(curl(&t.client.netns, &url), 200);
    let echo_at = SocketAddr::new(t.server.v4.into(), 7000);
    let mut live = harness::in_netns(&t.client.netns, || {
        std::net::TcpStream::connect_timeout(&echo_at, Duration::from_secs(2)).unwrap()
    });
    live.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let echo = |s: &mut std::net::TcpStream, m: &[u8]| {
        s.write_all(m).unwrap();
        let mut b = vec![0u8; m.len()];
        s.read_exact(&mut b).map(|_| b).ok()
    };
    assert_eq!(echo(&mut live, b"one").as_deref(), Some(&b"one"[..]));

    // The agent and proxy go away; the kernel programs and maps stay pinned.
    drop(up);
    assert_eq!(
        echo(&mut live, b"two").as_deref(),
        Some(&b"two"[..]),
        "an established L4 flow outlives the agent"
    );
    assert!(
        harness::tcp_ok(&t.client.netns, echo_at),
        "new L4 flows are still judged and allowed by the kernel"
    );
    assert_eq!(
        curl_quick(&t.client.netns, &url),
        0,
        "a flow that needs the proxy is dropped while it is away, never passed"
    );
    assert!(
        !harness::tcp_ok(&t.client.netns, not_allowed),
        "still default-deny for what the policy does not allow"
    );

    let log2 = dir.path().join("up2.log");
    let _up = start_up(&t, &policies, &inventory, &log2, &audit);
    wait_for_log(&log2, "revision 1:");
    assert_eq!(curl(&t.client.netns, &url), 200, "L7 resumes");
    assert_eq!(
        echo(&mut live, b"three").as_deref(),
        Some(&b"three"[..]),
        "the flow established before the restart is untouched"
    );
}

#[test]
fn a_separate_proxy_process_is_fed_by_the_agent_and_nothing_passes_unjudged_while_it_is_down() {
    if !require_root(
        "a_separate_proxy_process_is_fed_by_the_agent_and_nothing_passes_unjudged_while_it_is_down",
    ) {
        return;
    }
    let t = Topology::new();
    let web = WebServer::start(&t);
    let url = |path: &str| web.url(path);
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let client_policy = policies.join("client.yaml");
    write_atomic(
        &client_policy,
        &CLIENT_EGRESS.replace("PATHS", "/allowed.txt"),
    );
    let inventory = dir.path().join("endpoints.yaml");
    std::fs::write(
        &inventory,
        format!(
            "endpoints:\n  - {{name: client, namespace: prod, labels: {{app: client}}, ips: [{}], interface: {}}}\n  - {{name: server, namespace: prod, labels: {{app: server}}, ips: [{}], interface: {}}}\n",
            t.client.v4, t.client.host_if, t.server.v4, t.server.host_if
        ),
    )
    .unwrap();
    let socket = dir.path().join("rules.sock");
    let audit = dir.path().join("audit.jsonl");
    let up_args = [
        std::ffi::OsStr::new("--external-proxy"),
        std::ffi::OsStr::new("--rule-socket"),
        socket.as_os_str(),
        std::ffi::OsStr::new("--metrics"),
        std::ffi::OsStr::new("127.0.0.1:19464"),
    ];
    let scrape = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &t.node, "curl", "-s", "--max-time", "2"])
            .arg("http://127.0.0.1:19464/metrics")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let log1 = dir.path().join("up1.log");
    let up = start_up_with(&t, &policies, &inventory, &log1, &audit, &up_args);
    wait_for_log(&log1, "revision 1:");
    assert_eq!(
        curl_quick(&t.client.netns, &url("/allowed.txt")),
        0,
        "no proxy yet: the redirected flow is dropped, not passed"
    );
    assert_eq!(
        curl(&t.other.netns, &url("/secret.txt")),
        200,
        "what no policy selects is not redirected"
    );

    let plog1 = dir.path().join("proxy1.log");
    let proxy = start_proxy(&t, &socket, &plog1, &audit);
    let first = until(200, || curl_quick(&t.client.netns, &url("/allowed.txt")));
    assert_eq!(curl(&t.client.netns, &url("/secret.txt")), 403);
    wait_for_log(&log1, "2 rule set(s) accepted, 0 rejected");

    // A policy change goes agent -> kernel and agent -> proxy.
    write_atomic(
        &client_policy,
        &CLIENT_EGRESS.replace("PATHS", "\"/(allowed|secret).txt\""),
    );
    let change = until(200, || curl(&t.client.netns, &url("/secret.txt")));
    wait_for_log(&plog1, "agent version 2 in force");
    let m = scrape();
    assert!(
        m.contains("tollgate_agent_revision 2")
            && m.contains("tollgate_agent_proxies{outcome=\"connected\"} 1")
            && m.contains("tollgate_agent_proxies{outcome=\"rejecting\"} 0")
            && m.contains("tollgate_agent_loaded{kind=\"endpoints\"} 2")
            && m.contains("tollgate_agent_apply_seconds_count 2"),
        "agent metrics:\n{m}"
    );

    // The agent restarts under live traffic: the proxy keeps judging with what it has, and
    // the kernel keeps redirecting; not one request is lost.
    let client_ns = t.client.netns.clone();
    let allowed = url("/allowed.txt");
    let traffic = std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut codes = Vec::new();
        while t0.elapsed() < Duration::from_secs(3) {
            codes.push(curl(&client_ns, &allowed));
        }
        codes
    });
    std::thread::sleep(Duration::from_millis(300));
    drop(up);
    std::thread::sleep(Duration::from_millis(500));
    let log2 = dir.path().join("up2.log");
    let _up = start_up_with(&t, &policies, &inventory, &log2, &audit, &up_args);
    let codes = traffic.join().unwrap();
    assert!(
        codes.len() >= 5 && codes.iter().all(|c| *c == 200),
        "every request during the agent restart answered 200: {codes:?}"
    );
    wait_for_log(&plog1, "reconnected to the agent");
    wait_for_log(&log2, "2 rule set(s) accepted, 0 rejected");

    // The proxy goes away: redirected flows are dropped (never passed unjudged), while it is
    // down; a new proxy process is re-synced by the agent on connect.
    drop(proxy);
    assert_eq!(curl_quick(&t.client.netns, &url("/secret.txt")), 0);
    let plog2 = dir.path().join("proxy2.log");
    let started = Instant::now();
    let _proxy = start_proxy(&t, &socket, &plog2, &audit);
    until(200, || curl_quick(&t.client.netns, &url("/secret.txt")));
    let resumed = started.elapsed();
    assert_eq!(curl(&t.client.netns, &url("/other.txt")), 403);
    eprintln!(
        "separate proxy: first version enforced {first:?} after it started; policy change \
         {change:?}; {} requests during the agent restart, all 200; proxy restart to enforcing \
         {resumed:?}",
        codes.len()
    );
}

/// The value of the first series of `metrics` that starts with `series` (0 when absent).
fn metric(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn fqdn_ips_learned_by_a_separate_proxy_are_in_the_kernel_before_the_answer_is_released() {
    if !require_root(
        "fqdn_ips_learned_by_a_separate_proxy_are_in_the_kernel_before_the_answer_is_released",
    ) {
        return;
    }
    let t = Topology::new();
    // `other` plays a host outside the cluster (the world): the allowed name resolves to its
    // IPv4 address, a name the policy does not allow to its IPv6 one.
    let outside = t.other.v4.to_string();
    let not_allowed = t.other.v6.to_string();
    let _http = http_server_at(&t.other, "::", &[("index.html", "outside\n")]);
    let resolver = t.server.v4.to_string();
    // TTL 6 s: long enough for the steps up to the agent restart, short enough to see the
    // agent drop what a proxy that went away taught.
    let _dnsmasq = resolver_in(
        &t.server,
        &[
            ("api.example.com", &outside),
            ("blocked.example.org", &not_allowed),
        ],
        6,
    );
    let url = format!("http://{outside}:8080/index.html");
    let blocked_url = format!("http://[{not_allowed}]:8080/index.html");
    until(200, || curl(&t.client.netns, &url));
    until(200, || curl(&t.client.netns, &blocked_url));

    let dir = tempfile::tempdir().unwrap();
    let (policies, inventory) = fqdn_policy(&t, dir.path());
    let socket = dir.path().join("rules.sock");
    let audit = dir.path().join("audit.jsonl");
    let up_args = [
        std::ffi::OsStr::new("--external-proxy"),
        std::ffi::OsStr::new("--rule-socket"),
        socket.as_os_str(),
    ];
    let log1 = dir.path().join("up1.log");
    let up = start_up_with(&t, &policies, &inventory, &log1, &audit, &up_args);
    wait_for_log(&log1, "revision 1:");
    let plog = dir.path().join("proxy.log");
    let proxy = start_proxy_with(
        &t,
        &socket,
        &plog,
        &audit,
        &["--metrics", "127.0.0.1:19465"],
    );
    wait_for_log(&plog, "transparent DNS listener on");
    wait_for_log(&plog, "FQDN stream to the agent open");
    let scrape = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &t.node, "curl", "-s", "--max-time", "2"])
            .arg("http://127.0.0.1:19465/metrics")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let logs = || {
        format!(
            "agent:\n{}\nproxy:\n{}",
            std::fs::read_to_string(&log1).unwrap_or_default(),
            std::fs::read_to_string(&plog).unwrap_or_default()
        )
    };

    assert_eq!(
        curl_quick(&t.client.netns, &url),
        0,
        "the address is the world until a DNS answer names it"
    );
    let asked = Instant::now();
    assert_eq!(dig(&t.client.netns, &resolver, "api.example.com"), outside);
    let held_dig = asked.elapsed();
    // The very first connection after the answer, with no time for a SYN retry (100 ms
    // connect timeout): the separate proxy held the answer until the agent had written the
    // kernel entries.
    assert_eq!(curl_quick(&t.client.netns, &url), 200, "{}", logs());
    assert_eq!(
        curl_quick(&t.client.netns, &format!("http://{outside}:8081/")),
        0,
        "toFQDNs opened port 8080 only"
    );
    // The same answer again teaches nothing new: it is not held.
    let asked = Instant::now();
    assert_eq!(dig(&t.client.netns, &resolver, "api.example.com"), outside);
    let known_dig = asked.elapsed();
    // A name the policy does not allow: refused by the proxy, its address stays the world.
    assert_eq!(
        dig_rcode(&t.client.netns, &resolver, "blocked.example.org", "AAAA"),
        "REFUSED"
    );
    assert_eq!(curl_quick(&t.client.netns, &blocked_url), 0, "{}", logs());
    let m = scrape();
    assert_eq!(
        metric(
            &m,
            "tollgate_proxy_fqdn_answers_total{outcome=\"confirmed\"}"
        ),
        1.0,
        "one answer held and confirmed:\n{m}"
    );
    assert_eq!(
        metric(&m, "tollgate_proxy_fqdn_answers_total{outcome=\"timeout\"}")
            + metric(
                &m,
                "tollgate_proxy_fqdn_answers_total{outcome=\"agent_away\"}"
            ),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "tollgate_proxy_fqdn_hold_seconds_count"),
        1.0,
        "{m}"
    );
    let held = metric(&m, "tollgate_proxy_fqdn_hold_seconds_sum");
    let agent_log = wait_for_log(&log1, "1 learned IP(s)");
    assert!(
        agent_log.contains("sent its FQDN cache (0 pair(s))"),
        "{agent_log}"
    );

    // The agent restarts: the kernel programs and maps stay, but the new agent starts from the
    // policy alone; the proxy re-sends its cache on reconnect and the learned IP is allowed
    // again without another lookup.
    drop(up);
    let log2 = dir.path().join("up2.log");
    let restarted = Instant::now();
    let _up = start_up_with(&t, &policies, &inventory, &log2, &audit, &up_args);
    wait_for_log(&log2, "sent its FQDN cache (1 pair(s))");
    wait_for_log(&log2, "1 learned IP(s)");
    let rebuilt = restarted.elapsed();
    assert_eq!(curl_quick(&t.client.netns, &url), 200, "{}", logs());
    assert_eq!(curl_quick(&t.client.netns, &blocked_url), 0);

    // The proxy goes away: what it taught stays in the kernel (a flow to the learned IP does
    // not need the proxy) until the TTL it reported runs out, then it is dropped.
    drop(proxy);
    wait_for_log(&log2, "closed; what it taught stays until its TTL");
    assert_eq!(curl_quick(&t.client.netns, &url), 200, "{}", logs());
    let gone = until(0, || curl_quick(&t.client.netns, &url));
    let logged = wait_for_log(&log2, "TTL ran out after a proxy left");
    assert!(logged.contains("0 learned IP(s)"), "{logged}");
    eprintln!(
        "separate proxy, toFQDNs: the held answer waited {:.1} ms for the agent (dig {held_dig:?} \
         held vs {known_dig:?} not held); agent restart to the learned IP allowed again \
         {rebuilt:?}; after the proxy left, dropped at its TTL {gone:?} later",
        held * 1000.0
    );
}
