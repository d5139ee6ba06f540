//! Helpers shared by the proxy's end-to-end tests.
#![allow(dead_code)]

use std::process::Command;

/// Fail (never skip) when a real tool the test drives is missing.
pub fn need(tool: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "`{tool}` is not installed: run scripts/setup-proxy.sh");
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed and reaped when dropped.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait (bounded, 5 s) until something listens on the loopback `port`.
pub fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("nothing listens on 127.0.0.1:{port}");
}

/// A proxy listener started in-process from policy and inventory YAML.
pub struct Started {
    pub addr: std::net::SocketAddr,
    pub audit: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Started {
    /// The audit records written so far.
    pub fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Start a fixed listener for `dest` (`ENDPOINT:PORT`) in front of `127.0.0.1:upstream_port`.
pub async fn start(policy: &str, inventory: &str, dest: &str, upstream_port: u16) -> Started {
    use std::sync::Arc;
    let mut set = tollgate_policy::load::PolicySet::default();
    set.load_str("policy.yaml", policy);
    assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
    let inv = tollgate_policy::endpoints::Inventory::from_yaml(inventory).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let l = tollgate_proxy::Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        dest,
        format!("127.0.0.1:{upstream_port}").parse().unwrap(),
        Arc::new(tollgate_proxy::PolicyState::new(set, inv, 1)),
        tollgate_proxy::audit::AuditSink::start(
            tollgate_proxy::audit::Output::File(audit.clone()),
            64,
        ),
        "Access denied",
    )
    .await
    .unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(tollgate_proxy::serve_listener(l));
    Started {
        addr,
        audit,
        _dir: dir,
    }
}
