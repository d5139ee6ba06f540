//! Helpers shared by the CLI's end-to-end tests (each test file uses some of them).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed and reaped when dropped.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fail (never skip) when a real tool the test drives is missing.
pub fn need(tools: &[&str]) {
    for tool in tools {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} missing: run scripts/setup-proxy.sh"
        );
    }
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The rcode dig saw asking `name` from 127.0.0.10 at 127.0.0.1:`port` (`NO-ANSWER` when
/// nothing answered within 1 s).
pub fn dig_status(port: u16, name: &str) -> String {
    let out = Command::new("dig")
        .args(["-b", "127.0.0.10", "@127.0.0.1", "-p", &port.to_string()])
        .args(["+tries=1", "+time=1", "+noall", "+comments", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("NO-ANSWER")
        .to_string()
}

/// dnsmasq on 127.0.0.1:`port` answering api.example.com (192.0.2.10) and db.example.org
/// (192.0.2.20), nothing else.
pub fn dnsmasq(port: u16) -> Reaped {
    Reaped(
        Command::new("dnsmasq")
            .args(["--keep-in-foreground", "-C", "/dev/null"])
            .args([
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
            ])
            .args(["--no-hosts", "--user=root", "--pid-file="])
            .arg(format!("--port={port}"))
            .args([
                "--host-record=api.example.com,192.0.2.10",
                "--host-record=db.example.org,192.0.2.20",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A DNS egress policy for `app: client` towards kube-dns; `PATTERNS` is replaced by the
/// caller with the `rules.dns` items.
pub const DNS_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns, namespace: apps}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [PATTERNS]
"#;

/// The inventory that goes with [`DNS_POLICY`]: client 127.0.0.10, kube-dns 127.0.0.53.
pub const DNS_ENDPOINTS: &str = "endpoints:\n  - {name: client, namespace: apps, labels: {app: client}, ips: [127.0.0.10]}\n  - {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}, ips: [127.0.0.53]}\n";

/// Replace `path` in one step (readers never see half a file).
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Wait (at most `limit`) until `log` contains `needle`; the log's text.
pub fn wait_for_log(log: &Path, needle: &str, limit: Duration) -> String {
    let t = Instant::now();
    loop {
        let s = std::fs::read_to_string(log).unwrap_or_default();
        if s.contains(needle) {
            return s;
        }
        assert!(
            t.elapsed() < limit,
            "`{needle}` not in {} after {limit:?}:\n{s}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
