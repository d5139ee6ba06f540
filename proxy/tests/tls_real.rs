//! TLS without termination: the proxy reads the ClientHello, enforces `serverNames`, then
//! splices the encrypted bytes. Real parts: `openssl s_server` as the origin, curl as the
//! client (certificate made by `openssl req` for the test).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Reaped, free_port, need, start, wait_for_port};

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
    let _server = Reaped(
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
    wait_for_port(port);
    let p = start(
        POLICY,
        "- {name: client, namespace: prod, labels: {app: client}, ips: [127.0.0.1]}\n- {name: secure, namespace: prod, labels: {app: secure}, ips: [127.0.0.80]}\n",
        "secure:443",
        port,
    )
    .await;
    let addr = p.addr;
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
    let recs = p.records();
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(recs[0]["protocol"], "tls");
    assert_eq!(recs[0]["tls"]["sni"], "evil.example.com");
    assert_eq!(recs[0]["reason"], "default-deny");
    assert_eq!(recs[1]["tls"]["sni"], "a.b.svc.example.com");
}
