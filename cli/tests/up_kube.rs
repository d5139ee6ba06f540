//! `tollgate up --kubernetes` on the real kernel, fed by the agent's in-process fake API server
//! (policy-agent/tests/fake_api; no real API server runs where these tests run). "Pods" are
//! network namespaces wired through a node namespace (the datapath's test harness); the fake
//! lists them as Pods with their IPs, some on this node and one on another, and serves the
//! CiliumNetworkPolicies. The real binary runs in the node namespace with a kubeconfig that
//! points at the fake (which listens in that namespace), finds each local pod's interface by
//! the kernel's route to its IP, and curl between the namespaces shows what is enforced; the
//! policy and the pods are then changed through the fake while it runs, and the time until the
//! change is enforced is printed. Needs root (skipped loudly otherwise; CI runs as root).

#[path = "../../policy-agent/tests/fake_api/mod.rs"]
mod fake_api;
#[path = "../../redirector-ebpf/loader/tests/harness/mod.rs"]
mod harness;
#[path = "common/kernel.rs"]
mod kernel;

mod common;

use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Reaped;
use fake_api::{FakeApi, namespace, pod, policy};
use harness::{Topology, require_root};
use kernel::{WebServer, curl, curl_quick, start_proxy, until, wait_for_log};
use serde_json::{Value, json};

/// This node's name; the fake's other node is `node-b`.
const NODE: &str = "node-a";

/// The client's egress: GET of `paths` (a regex) on the server's port 8080, nothing else.
fn client_egress(paths: &str) -> Value {
    policy(
        "CiliumNetworkPolicy",
        Some("prod"),
        "client",
        json!({"endpointSelector": {"matchLabels": {"app": "client"}},
               "egress": [{"toEndpoints": [{"matchLabels": {"app": "server"}}],
                           "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                                        "rules": {"http": [{"method": "GET", "path": paths}]}}]}]}),
    )
}

/// The server's ingress: from `app: client` pods (wherever they run) on port 8080, at L3/L4.
fn server_ingress() -> Value {
    policy(
        "CiliumNetworkPolicy",
        Some("prod"),
        "server",
        json!({"endpointSelector": {"matchLabels": {"app": "server"}},
               "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                            "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}),
    )
}

/// A pod of namespace `prod` on `node` with `ip`, labelled `app: <app>`.
fn pod_on(node: &str, name: &str, ip: Ipv4Addr, app: &str) -> Value {
    let mut p = pod("prod", name, &ip.to_string(), json!({"app": app}));
    p["spec"]["nodeName"] = json!(node);
    p
}

/// One more "pod" namespace wired to the node namespace (10.200.`n`.2, gateway .1), removed
/// when dropped.
struct ExtraPod {
    netns: String,
    v4: Ipv4Addr,
}

impl ExtraPod {
    fn new(t: &Topology, tag: &str, n: u8) -> ExtraPod {
        let netns = format!("tg-{}-{tag}", t.id);
        let host_if = format!("tg{}{tag}", t.id);
        harness::ip(&["netns", "add", &netns]);
        let pod = ExtraPod {
            netns: netns.clone(),
            v4: Ipv4Addr::new(10, 200, n, 2),
        };
        harness::ip(&[
            "-n", &t.node, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
            "netns", &netns,
        ]);
        let gw = format!("10.200.{n}.1");
        harness::ip(&[
            "-n",
            &t.node,
            "addr",
            "add",
            &format!("{gw}/24"),
            "dev",
            &host_if,
        ]);
        harness::ip(&["-n", &t.node, "link", "set", &host_if, "up"]);
        harness::ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/24", pod.v4),
            "dev",
            "eth0",
        ]);
        harness::ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        harness::ip(&["-n", &netns, "link", "set", "lo", "up"]);
        harness::ip(&["-n", &netns, "route", "add", "default", "via", &gw]);
        pod
    }
}

impl Drop for ExtraPod {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

/// The fake API server, listening on 127.0.0.1 *in the node namespace* (where `tollgate up`
/// runs), on a runtime of its own; and a kubeconfig file pointing at it.
fn fake_in_node(
    t: &Topology,
    dir: &Path,
) -> (tokio::runtime::Runtime, FakeApi, std::path::PathBuf) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = t.in_node(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let fake = {
        let _in_rt = rt.enter();
        FakeApi::start_on(listener)
    };
    let kubeconfig = dir.join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig);
    (rt, fake, kubeconfig)
}

/// `tollgate up --kubernetes` in the node namespace (nsenter switches only the network
/// namespace, keeping the BPF filesystem in view).
fn start_up_kube(
    t: &Topology,
    kubeconfig: &Path,
    log: &Path,
    audit: &Path,
    extra: &[&OsStr],
) -> Reaped {
    Reaped(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", t.node))
            .args([
                env!("CARGO_BIN_EXE_tollgate"),
                "up",
                "--kubernetes",
                "--node",
                NODE,
            ])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--pin-root")
            .arg(&t.pin_root)
            .arg("--audit-log")
            .arg(audit)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// The interfaces the datapath has programs on (in the node namespace).
fn attached(t: &Topology) -> Vec<String> {
    let st = t
        .in_node(|| tollgate_datapath::status(&t.pin_root))
        .unwrap();
    let mut ifs: Vec<String> = st.attachments.into_iter().map(|a| a.ifname).collect();
    ifs.sort();
    ifs.dedup();
    ifs
}

#[test]
fn tollgate_up_enforces_the_kubernetes_source_on_this_nodes_pods() {
    if !require_root("tollgate_up_enforces_the_kubernetes_source_on_this_nodes_pods") {
        return;
    }
    let t = Topology::new();
    let web = WebServer::start(&t);
    let url = |path: &str| web.url(path);
    harness::spawn_echo_server(&t.server.netns, 7000);
    let echo = SocketAddr::new(t.server.v4.into(), 7000);
    assert!(harness::tcp_ok(&t.client.netns, echo), "open before");

    let dir = tempfile::tempdir().unwrap();
    let (_rt, fake, kubeconfig) = fake_in_node(&t, dir.path());
    fake.put(namespace("prod", json!({"team": "a"})));
    fake.put(pod_on(NODE, "client", t.client.v4, "client"));
    fake.put(pod_on(NODE, "server", t.server.v4, "server"));
    // `other` plays a client pod on another node: a known identity here, not attached.
    fake.put(pod_on("node-b", "remote-client", t.other.v4, "client"));
    // A pod of this node whose IP no route leads to: reported, not enforced.
    fake.put(pod_on(
        NODE,
        "ghost",
        Ipv4Addr::new(10, 200, 99, 2),
        "ghost",
    ));
    fake.put(client_egress("/allowed.txt"));
    fake.put(server_ingress());

    let log = dir.path().join("up.log");
    let audit = dir.path().join("audit.jsonl");
    let _up = start_up_kube(&t, &kubeconfig, &log, &audit, &[]);
    let logged = wait_for_log(&log, "revision 1:");
    let context = || {
        format!(
            "{}\nattached: {:?}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            attached(&t)
        )
    };

    // The local client's egress: L7 through the redirect.
    assert_eq!(
        curl(&t.client.netns, &url("/allowed.txt")),
        200,
        "{}",
        context()
    );
    assert_eq!(curl(&t.client.netns, &url("/secret.txt")), 403);
    // L3/L4: the client's egress allows port 8080 only.
    assert!(
        !harness::tcp_ok(&t.client.netns, echo),
        "port 7000 is dropped at the client's interface"
    );
    // The pod on node-b: the server's ingress knows its identity (an `app: client` pod) and
    // admits it; its own egress is node-b's to enforce, so nothing redirects it here.
    assert_eq!(
        curl(&t.other.netns, &url("/secret.txt")),
        200,
        "{}",
        context()
    );
    let mut want = vec![t.client.host_if.clone(), t.server.host_if.clone()];
    want.sort();
    assert_eq!(attached(&t), want, "this node's pods only");
    assert!(
        logged
            .contains("not enforced: Pod prod/ghost: no route to its IP 10.200.99.2 on this node"),
        "{logged}"
    );
    let recs = std::fs::read_to_string(&audit).unwrap_or_default();
    assert!(
        recs.lines().any(|l| l.contains("\"/secret.txt\"")
            && l.contains("\"egress\"")
            && l.contains("\"name\":\"client\"")),
        "an audit record of the client's denied request: {recs}"
    );

    // Change 1: the CNP, through the API.
    let t0 = Instant::now();
    fake.put(client_egress("/(allowed|secret).txt"));
    until(200, || curl(&t.client.netns, &url("/secret.txt")));
    let cnp_change = t0.elapsed();
    assert_eq!(curl(&t.client.netns, &url("/other.txt")), 403);

    // Change 2: a pod of this node appears in the API before its interface exists (the CNI
    // has not wired it yet): reported, then enforced once the route to it appears.
    let newcomer_ip = Ipv4Addr::new(10, 200, 4, 2);
    fake.put(pod_on(NODE, "newcomer", newcomer_ip, "client"));
    wait_for_log(
        &log,
        "not enforced: Pod prod/newcomer: no route to its IP 10.200.4.2",
    );
    let wired = Instant::now();
    let newcomer = ExtraPod::new(&t, "n", 4);
    assert_eq!(newcomer.v4, newcomer_ip);
    // Enforced: its egress L7 rules answer 403 for a path they do not allow (the server
    // would say 404), and the server's ingress admits it as an `app: client` pod.
    until(403, || curl_quick(&newcomer.netns, &url("/other.txt")));
    let pod_added = wired.elapsed();
    assert_eq!(curl(&newcomer.netns, &url("/secret.txt")), 200);
    assert!(
        attached(&t).contains(&format!("tg{}n", t.id)),
        "{}",
        context()
    );

    // The newcomer's "pod" is deleted and created again under its name (the CNI gives the new
    // veth the old name): no API change, but a new interface, which is attached again.
    drop(newcomer);
    let recreated = Instant::now();
    let newcomer = ExtraPod::new(&t, "n", 4);
    until(403, || curl_quick(&newcomer.netns, &url("/other.txt")));
    let reattached = recreated.elapsed();

    // Change 3: the other node's pod goes away: its IP is the world now, which the server's
    // ingress drops (L3).
    let t0 = Instant::now();
    fake.remove("Pod", "prod", "remote-client");
    until(0, || curl_quick(&t.other.netns, &url("/allowed.txt")));
    let pod_removed = t0.elapsed();
    let logged = wait_for_log(&log, "0 ipcache written, 1 removed");
    let applied = logged
        .lines()
        .find(|l| l.contains("0 ipcache written, 1 removed"))
        .unwrap();
    assert!(
        applied.contains("0 endpoints written, 0 removed"),
        "another node's pod going away renumbers none of this node's endpoints: {applied}"
    );

    let logged = std::fs::read_to_string(&log).unwrap();
    eprintln!(
        "Kubernetes change to enforcement (after the source's debounce; L3 includes one 100 ms connect \
         timeout): CNP L7 change {cnp_change:?}; new local pod, interface appearing to \
         enforced {pod_added:?} (retry every 200 ms); its veth recreated under the same name to \
         enforced again {reattached:?}; remote pod deleted to dropped {pod_removed:?}\n{logged}"
    );
    for (what, took) in [
        ("CNP change", cnp_change),
        ("new pod", pod_added),
        ("recreated veth", reattached),
        ("pod deleted", pod_removed),
    ] {
        assert!(took < Duration::from_secs(5), "{what}: {took:?}");
    }
}

#[test]
fn kubernetes_snapshots_feed_a_separate_proxy_as_rule_sets() {
    if !require_root("kubernetes_snapshots_feed_a_separate_proxy_as_rule_sets") {
        return;
    }
    let t = Topology::new();
    let web = WebServer::start(&t);
    let url = |path: &str| web.url(path);
    let dir = tempfile::tempdir().unwrap();
    let (_rt, fake, kubeconfig) = fake_in_node(&t, dir.path());
    fake.put(namespace("prod", json!({})));
    fake.put(pod_on(NODE, "client", t.client.v4, "client"));
    fake.put(pod_on(NODE, "server", t.server.v4, "server"));
    fake.put(client_egress("/allowed.txt"));
    fake.put(server_ingress());
    let socket = dir.path().join("rules.sock");
    let audit = dir.path().join("audit.jsonl");
    let log = dir.path().join("up.log");
    let _up = start_up_kube(
        &t,
        &kubeconfig,
        &log,
        &audit,
        &[
            OsStr::new("--external-proxy"),
            OsStr::new("--rule-socket"),
            socket.as_os_str(),
        ],
    );
    wait_for_log(&log, "revision 1:");
    let plog = dir.path().join("proxy.log");
    let _proxy = start_proxy(&t, &socket, &plog, &audit);
    // The inventory and the two objects, each its own rule set, all accepted.
    let acked = wait_for_log(&log, "3 rule set(s) accepted, 0 rejected");
    until(200, || curl_quick(&t.client.netns, &url("/allowed.txt")));
    assert_eq!(
        curl(&t.client.netns, &url("/secret.txt")),
        403,
        "{acked}\n{}",
        std::fs::read_to_string(&plog).unwrap_or_default()
    );
    fake.put(client_egress("/(allowed|secret).txt"));
    let change = until(200, || curl(&t.client.netns, &url("/secret.txt")));
    wait_for_log(&plog, "agent version 2 in force");
    // The proxy's audit records carry the cluster's identity numbers (TollgateIdentity
    // objects), as the kernel's entries do: it loaded the agent's inventory as it was.
    let ids: Vec<u64> = fake
        .list("TollgateIdentity")
        .iter()
        .filter_map(|o| o["metadata"]["name"].as_str()?.parse().ok())
        .collect();
    let recs = std::fs::read_to_string(&audit).unwrap_or_default();
    let denied = recs
        .lines()
        .find(|l| l.contains("\"/secret.txt\""))
        .unwrap_or_else(|| panic!("no audit record of the denial: {recs}"));
    let rec: Value = serde_json::from_str(denied).unwrap();
    let source = rec["source"]["identity"].as_u64().unwrap();
    assert!(ids.contains(&source), "{source} not in {ids:?}: {denied}");
    eprintln!("separate proxy fed by the Kubernetes source: CNP change to enforced {change:?}");
}
