//! Helpers of the CLI's real-kernel tests (`up.rs`, `up_kube.rs`): curl between network
//! namespaces, bounded waits, an HTTP server in a "pod", a separate proxy in the node namespace.
//! Included with `#[path]` next to the datapath's test harness, whose topology they use.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::Reaped;
use crate::harness::{Host, Topology};

/// `curl` from `netns`: the HTTP status, or 0 when no connection could be made.
pub fn curl(netns: &str, url: &str) -> u16 {
    curl_with(netns, url, &[])
}

/// Like [`curl`] but giving up on a connection after 100 ms, so that timing a change to
/// "dropped" is not dominated by the client's own timeout.
pub fn curl_quick(netns: &str, url: &str) -> u16 {
    curl_with(netns, url, &["--connect-timeout", "0.1"])
}

fn curl_with(netns: &str, url: &str, options: &[&str]) -> u16 {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-s", "-o", "/dev/null"])
        .args(options)
        .args(["--max-time", "2", "-w", "%{http_code}", url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Polls `f` (bounded, 10 s) until it returns `want`; how long that took.
pub fn until(want: u16, f: impl Fn() -> u16) -> Duration {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if f() == want {
            return t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("not {want} after 10 s (last {})", f());
}

/// [`crate::common::wait_for_log`] with 30 s.
pub fn wait_for_log(log: &Path, needle: &str) -> String {
    crate::common::wait_for_log(log, needle, Duration::from_secs(30))
}

/// python3 http.server on port 8080 of `host`'s IPv4 address, serving `files`.
pub fn http_server(host: &Host, files: &[(&str, &str)]) -> (Reaped, tempfile::TempDir) {
    http_server_at(host, &host.v4.to_string(), files)
}

/// python3 http.server on port 8080 of `bind` (`::`: every IPv4 and IPv6 address) in `host`'s
/// namespace, serving `files`.
pub fn http_server_at(
    host: &Host,
    bind: &str,
    files: &[(&str, &str)],
) -> (Reaped, tempfile::TempDir) {
    let www = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(www.path().join(name), text).unwrap();
    }
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &host.netns,
            "python3",
            "-m",
            "http.server",
            "8080",
        ])
        .args(["--bind", bind, "--directory"])
        .arg(www.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (Reaped(child), www)
}

/// python3 http.server in the server's namespace with `allowed.txt` and `secret.txt`, once the
/// client reaches it (no policy is in force yet).
pub struct WebServer {
    _http: (Reaped, tempfile::TempDir),
    base: String,
}

impl WebServer {
    pub fn start(t: &Topology) -> WebServer {
        let web = WebServer {
            _http: http_server(
                &t.server,
                &[("allowed.txt", "public\n"), ("secret.txt", "secret\n")],
            ),
            base: format!("http://{}:8080", t.server.v4),
        };
        until(200, || curl(&t.client.netns, &web.url("/allowed.txt")));
        web
    }

    /// The URL of `path` on it.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// `tollgate proxy --agent SOCK` in the node namespace, serving the redirect ports.
pub fn start_proxy(t: &Topology, socket: &Path, log: &Path, audit: &Path) -> Reaped {
    start_proxy_with(t, socket, log, audit, &[])
}

pub fn start_proxy_with(
    t: &Topology,
    socket: &Path,
    log: &Path,
    audit: &Path,
    extra: &[&str],
) -> Reaped {
    Reaped(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", t.node))
            .args([env!("CARGO_BIN_EXE_tollgate"), "proxy", "--agent"])
            .arg(socket)
            .args(extra)
            .args(["--transparent", "127.0.0.1:15001"])
            .args(["--dns-transparent", "127.0.0.1:15053"])
            .arg("--audit-log")
            .arg(audit)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}
