//! The whole sidecarless path on the real kernel: a client in its own network namespace
//! connects to a server's address; the eBPF datapath (TC program on the client's veth)
//! redirects the flow with `bpf_sk_assign` to the proxy's transparent listener in the node
//! namespace; the proxy reads the original destination from the accepted socket, judges each
//! HTTP request with the policy, and forwards allowed ones to the real server (Python's
//! http.server) or answers 403. Needs root (skipped loudly otherwise; CI runs as root).

#[path = "../../redirector-ebpf/loader/tests/harness/mod.rs"]
mod harness;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use harness::{ENFORCE_BOTH, Topology, entry, in_netns, require_root};
use tollgate_datapath::RedirectRouting;
use tollgate_datapath::common::{direction, identity, proto, verdict};
use tollgate_policy::endpoints::Inventory;
use tollgate_policy::load::PolicySet;
use tollgate_proxy::audit::{AuditSink, Output};
use tollgate_proxy::{Listener, PolicyState, serve_listener};

const PROXY_PORT: u16 = 15001;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn redirected_flows_are_judged_with_their_original_destination() {
    if !require_root("redirected_flows_are_judged_with_their_original_destination") {
        return;
    }
    let t = Topology::new();
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("allowed.txt"), "public data\n").unwrap();
    std::fs::write(www.path().join("secret.txt"), "secret data\n").unwrap();
    let server_ip = t.server.v4.to_string();
    let _server = Server(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &t.server.netns,
                "python3",
                "-m",
                "http.server",
                "8080",
            ])
            .args(["--bind", &server_ip, "--directory"])
            .arg(www.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let up = in_netns(&t.server.netns, || {
        (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(25));
            std::net::TcpStream::connect((t.server.v4, 8080)).is_ok()
        })
    });
    assert!(up, "http.server did not start");

    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts:\n    - ports: [{port: \"8080\", protocol: TCP}]\n      rules:\n        http: [{method: GET, path: /allowed.txt}]\n";
    let mut set = PolicySet::default();
    set.load_str("web.yaml", policy);
    assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
    let inv = Inventory::from_yaml(&format!(
        "- {{name: client, namespace: prod, labels: {{app: client}}, ips: [{}]}}\n- {{name: web, namespace: prod, labels: {{app: web}}, ips: [{}]}}\n",
        t.client.v4, t.server.v4
    ))
    .unwrap();
    let state = Arc::new(PolicyState::new(set, inv, 1));
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.jsonl");

    let (client_ns, server_v4) = (t.client.netns.clone(), t.server.v4);
    let curl = move |path: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &client_ns, "curl", "-s", "--max-time", "5"])
            .args(["-w", "\n%{http_code}"])
            .arg(format!("http://{server_v4}:8080{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };

    t.in_node(|| {
        let mut dp = t.load_datapath(ENFORCE_BOTH);
        dp.upsert_policy(&[
            // The client's HTTP to the server goes to the proxy; everything else is open so
            // that only the redirect and the proxy decide.
            entry(
                &t.client,
                t.server.identity,
                8080,
                proto::TCP,
                direction::EGRESS,
                verdict::REDIRECT,
                PROXY_PORT,
            ),
            entry(
                &t.client,
                identity::ANY,
                0,
                proto::ANY,
                direction::EGRESS,
                verdict::ALLOW,
                0,
            ),
            entry(
                &t.client,
                identity::ANY,
                0,
                proto::ANY,
                direction::INGRESS,
                verdict::ALLOW,
                0,
            ),
            entry(
                &t.server,
                identity::ANY,
                0,
                proto::ANY,
                direction::INGRESS,
                verdict::ALLOW,
                0,
            ),
            entry(
                &t.server,
                identity::ANY,
                0,
                proto::ANY,
                direction::EGRESS,
                verdict::ALLOW,
                0,
            ),
        ])
        .expect("policy");
        dp.install_redirect_routing(&RedirectRouting::default())
            .expect("routing");

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = Listener::bind_transparent(
                format!("127.0.0.1:{PROXY_PORT}").parse().unwrap(),
                state.clone(),
                AuditSink::start(Output::File(audit.clone()), 64),
                "Access denied",
            )
            .await
            .expect("transparent listener");
            tokio::spawn(serve_listener(l));
            let allowed = tokio::task::spawn_blocking({
                let curl = curl.clone();
                move || curl("/allowed.txt")
            });
            assert_eq!(allowed.await.unwrap(), "public data\n\n200");
            let denied = tokio::task::spawn_blocking(move || curl("/secret.txt"));
            assert_eq!(denied.await.unwrap(), "Access denied\r\n\n403");
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        let st = tollgate_datapath::status(&t.pin_root).unwrap();
        let redirected = st.counters.iter().find(|c| c.name == "redirected").unwrap();
        assert!(
            redirected.packets > 0,
            "the flows went through the redirect: {st}"
        );
    });

    let recs: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["source"]["name"], "client");
    assert_eq!(recs[0]["source"]["ip"], t.client.v4.to_string());
    assert_eq!(
        recs[0]["destination"]["name"], "web",
        "found from the original destination"
    );
    assert_eq!(recs[0]["destination"]["ip"], t.server.v4.to_string());
    assert_eq!(recs[0]["destination"]["port"], 8080);
    assert_eq!(recs[0]["http"]["path"], "/secret.txt");
}
