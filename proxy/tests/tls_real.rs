//! TLS without termination: the proxy reads the ClientHello, enforces `serverNames`, then
//! splices the encrypted bytes. Real parts: `openssl s_server` as the origin, curl as the
//! client (certificate made by `openssl req` for the test).

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{free_port, need};
use tollgate_policy::endpoints::Inventory;
use tollgate_policy::load::PolicySet;
use tollgate_proxy::audit::{AuditSink, Output};
use tollgate_proxy::{Listener, PolicyState, serve_listener};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: tls, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: secure}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts:\n    - ports: [{port: \"443\", protocol: TCP}]\n      serverNames: [api.example.com, \"*.svc.example.com\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_names_are_enforced_without_termination() {
    need("openssl");
    need("curl");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    let ok = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=api.example.com", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    let port = free_port();
    let _server = Server(
        Command::new("openssl")
            .args([
                "s_server",
                "-quiet",
                "-www",
                "-accept",
                &port.to_string(),
                "-cert",
            ])
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let mut set = PolicySet::default();
    set.load_str("tls.yaml", POLICY);
    assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
    let inv = Inventory::from_yaml(
        "- {name: client, namespace: prod, labels: {app: client}, ips: [127.0.0.1]}\n- {name: secure, namespace: prod, labels: {app: secure}, ips: [127.0.0.80]}\n",
    )
    .unwrap();
    let audit = dir.path().join("audit.jsonl");
    let upstream: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let l = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        "secure:443",
        upstream,
        Arc::new(PolicyState::new(set, inv, 1)),
        AuditSink::start(Output::File(audit.clone()), 64),
        "Access denied",
    )
    .await
    .unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve_listener(l));
    let curl = |name: &'static str| async move {
        let out = tokio::process::Command::new("curl")
            .args([
                "-sk",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg("--resolve")
            .arg(format!("{name}:{}:127.0.0.1", addr.port()))
            .arg(format!("https://{name}:{}/", addr.port()))
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(
        curl("api.example.com").await,
        "200",
        "allowed name: TLS spliced end to end"
    );
    assert_eq!(
        curl("x.svc.example.com").await,
        "200",
        "`*` within one label"
    );
    assert_eq!(
        curl("evil.example.com").await,
        "000",
        "denied name: connection closed"
    );
    assert_eq!(
        curl("a.b.svc.example.com").await,
        "000",
        "`*` never spans labels"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(recs[0]["protocol"], "tls");
    assert_eq!(recs[0]["tls"]["sni"], "evil.example.com");
    assert_eq!(recs[0]["reason"], "default-deny");
    assert_eq!(recs[1]["tls"]["sni"], "a.b.svc.example.com");
}
