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

/// The shared peers test bed (`../shared/peers`): its scripts, and `$FEAS` (default
/// `/tmp/tollgate-peers`) where tansu and the Python venv are installed.
pub fn peers_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers")
}

pub fn feas_dir() -> std::path::PathBuf {
    std::env::var_os("FEAS")
        .map(Into::into)
        .unwrap_or_else(|| "/tmp/tollgate-peers".into())
}

/// Fail (never skip) unless the venv with the Kafka clients and kcat are there.
pub fn need_kafka_clients() -> std::path::PathBuf {
    let py = feas_dir().join("venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import confluent_kafka, aiokafka, kafka"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{} cannot import confluent_kafka, aiokafka and kafka: run scripts/setup-proxy.sh",
        py.display()
    );
    need("kcat");
    py
}

/// A tansu broker (Kafka API, in-memory storage) on its own loopback port, killed on drop.
pub struct Tansu {
    pub addr: std::net::SocketAddr,
    pub log: std::path::PathBuf,
    _child: Reaped,
    _dir: tempfile::TempDir,
}

impl Tansu {
    /// The broker's log so far (for assertion messages).
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        s[s.len().saturating_sub(2000)..].to_string()
    }
}

/// Start tansu 0.6.0 (fails, never skips, when it is not installed), advertising its own
/// address, and wait (bounded) until it answers a Kafka ApiVersions request.
pub fn tansu() -> Tansu {
    let bin = feas_dir().join("opt/bin/tansu");
    assert!(
        bin.exists(),
        "{} is not installed: run scripts/setup-proxy.sh",
        bin.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("tansu.log");
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let mut cmd = Command::new(&bin);
    cmd.args(["broker", "--cluster-id", "tollgate", "--listener-url", &url])
        .args(["--advertised-listener-url", &url])
        .args(["--storage-engine", "memory://tansu/"])
        .env("RUST_LOG", "warn")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("tansu.err")).unwrap());
    // Reaped kills it on drop; a test binary that aborts (or is killed) runs no destructors,
    // so the broker also gets SIGKILL when the thread that started it is gone. Call this from
    // the test's own thread (as #[tokio::test] bodies run), not from a short-lived one.
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let t = Tansu {
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        log,
        _child: Reaped(child),
        _dir: dir,
    };
    for _ in 0..100 {
        if kafka_api_versions_ok(t.addr) {
            return t;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!(
        "tansu does not answer ApiVersions on {}: {}",
        t.addr,
        t.log_tail()
    );
}

/// One ApiVersions v0 round trip (plain socket): true when the answer has our correlation id
/// and error 0.
pub fn kafka_api_versions_ok(addr: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(1)));
    let req = [0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 7, 0xff, 0xff];
    if s.write_all(&req).is_err() {
        return false;
    }
    let mut head = [0u8; 10];
    s.read_exact(&mut head).is_ok() && head[4..8] == [0, 0, 0, 7] && head[8..10] == [0, 0]
}

/// Run one scenario of `proxy/tests/kafka/clients.py` with the venv's Python and return the
/// JSON object it printed (what the real client observed). Bounded by the script's own
/// timeouts and watchdog.
pub fn kafka_client(
    scenario: &str,
    bootstrap: std::net::SocketAddr,
    args: &[&str],
) -> serde_json::Value {
    let py = need_kafka_clients();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kafka/clients.py");
    let out = Command::new(py)
        .arg(script)
        .arg(scenario)
        .args(["--bootstrap", &bootstrap.to_string()])
        .args(args)
        .env("TOLLGATE_PEERS", peers_dir())
        .output()
        .unwrap();
    client_json(&out, &format!("clients.py {scenario} {args:?}"))
}

/// Create topics through confluent-kafka's AdminClient (tansu does not auto-create them);
/// asserts each one was created with its partitions.
pub fn kafka_create_topics(bootstrap: std::net::SocketAddr, topics: &[&str], partitions: u32) {
    let v = kafka_client(
        "create-topics",
        bootstrap,
        &[
            "--topics",
            &topics.join(","),
            "--partitions",
            &partitions.to_string(),
        ],
    );
    for t in topics {
        assert_eq!(v["created"][t], "ok", "create {t}: {v}");
        assert_eq!(v["partitions"][t], partitions, "partitions of {t}: {v}");
    }
}

/// [`kafka_client`], run inside network namespace `netns` (`ip netns exec`), the whole run
/// also bounded by `timeout(1)` (the script has its own watchdog; this is the backstop).
pub fn kafka_client_in(
    netns: &str,
    scenario: &str,
    bootstrap: std::net::SocketAddr,
    args: &[&str],
) -> serde_json::Value {
    let py = need_kafka_clients();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kafka/clients.py");
    let out = Command::new("timeout")
        .args(["-k", "5", "150", "ip", "netns", "exec", netns])
        .arg(py)
        .arg(script)
        .arg(scenario)
        .args(["--bootstrap", &bootstrap.to_string()])
        .args(args)
        .env("TOLLGATE_PEERS", peers_dir())
        .output()
        .unwrap();
    client_json(&out, &format!("clients.py {scenario} {args:?} in {netns}"))
}

/// The last JSON object a `clients.py` run printed (what the client observed).
fn client_json(out: &std::process::Output, what: &str) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "{what} printed no JSON (exit {:?}); stderr: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap()
}
