//! `tollgate proxy --watch-ms`: a policy file changed under a running proxy takes effect for
//! the next query, without a restart (real dnsmasq upstream, real dig client, loopback only).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn status(port: u16, name: &str) -> String {
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

const POLICY: &str = r#"apiVersion: cilium.io/v2
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

#[test]
fn a_changed_policy_file_applies_to_the_next_query() {
    for tool in ["dig", "dnsmasq"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} missing: run scripts/setup-proxy.sh"
        );
    }
    let up = free_udp_port();
    let _dnsmasq = Reaped(
        Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "-C",
                "/dev/null",
                "--listen-address=127.0.0.1",
            ])
            .args([
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--user=root",
                "--pid-file=",
            ])
            .arg(format!("--port={up}"))
            .args([
                "--host-record=api.example.com,192.0.2.10",
                "--host-record=db.example.org,192.0.2.20",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("dns.yaml");
    std::fs::write(
        &policy,
        POLICY.replace("PATTERNS", "{matchPattern: \"*.example.com\"}"),
    )
    .unwrap();
    let endpoints = dir.path().join("endpoints.yaml");
    std::fs::write(
        &endpoints,
        "endpoints:\n  - {name: client, namespace: apps, labels: {app: client}, ips: [127.0.0.10]}\n  - {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}, ips: [127.0.0.53]}\n",
    )
    .unwrap();
    let port = free_udp_port();
    let log = dir.path().join("proxy.log");
    let _proxy = Reaped(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["proxy", "--watch-ms", "50", "--audit-log", "/dev/null"])
            .arg("--policies")
            .arg(&policy)
            .arg("--endpoints")
            .arg(&endpoints)
            .args(["--dns-listen", &format!("127.0.0.1:{port}")])
            .args(["--dns-to", &format!("kube-dns@127.0.0.1:{up}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while status(port, "api.example.com") != "NOERROR" {
        assert!(t.elapsed() < Duration::from_secs(10), "proxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status(port, "db.example.org"), "REFUSED");

    std::fs::write(
        &policy,
        POLICY.replace(
            "PATTERNS",
            "{matchPattern: \"*.example.com\"}, {matchName: db.example.org}",
        ),
    )
    .unwrap();
    let t = Instant::now();
    while status(port, "db.example.org") != "NOERROR" {
        assert!(t.elapsed() < Duration::from_secs(5), "change not applied");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A file that does not parse keeps the last good policy.
    std::fs::write(&policy, "apiVersion: cilium.io/v2\nkind: [\n").unwrap();
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("keeping revision 2") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status(port, "db.example.org"), "NOERROR");
    assert_eq!(status(port, "api.example.com"), "NOERROR");
}
