//! End-to-end through the proxy with real parts on loopback: nginx as the origin, curl and
//! h2load as clients (each "pod" is its own 127.0.0.x source address via `--interface`).
//! The proxy runs in-process from the library, exactly as `tollgate proxy` runs it.
//!
//! Needs `nginx`, `curl` and `h2load` (installed by `scripts/setup-proxy.sh`). Missing tools
//! fail the test with a message naming the script — they are never a silent pass.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{free_port, need};
use tollgate_policy::endpoints::Inventory;
use tollgate_policy::load::PolicySet;
use tollgate_proxy::audit::{AuditSink, Output};
use tollgate_proxy::{AuditHeaders, Listener, PolicyState, serve_listener};

struct Nginx {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start() -> Nginx {
        Self::start_with(
            "location / { return 200 \"origin $request_method $request_uri\\n\"; }",
            "",
        )
    }

    /// nginx with `location` in the server on the returned port, plus `extra` server blocks.
    fn start_with(location: &str, extra: &str) -> Nginx {
        need("nginx");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            "daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{ access_log off; client_body_temp_path {d}/b; proxy_temp_path {d}/p;\n\
               fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n\
               client_max_body_size 0;\n\
               server {{ listen 127.0.0.1:{port}; {location} }} {extra} }}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("nginx")
            .args(["-c", path.to_str().unwrap()])
            .spawn()
            .expect("start nginx");
        let nginx = Nginx {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return nginx;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nginx did not start on {port}");
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM, not KILL: the master then stops its workers too.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

const ENDPOINTS: &str = "
endpoints:
  - {name: frontend, namespace: prod, labels: {app: frontend}, ips: [127.0.0.10]}
  - {name: api-server, namespace: prod, labels: {app: api-server}, ips: [127.0.0.20]}
  - {name: admin, namespace: prod, labels: {app: admin, role: ops}, ips: [127.0.0.30]}
  - {name: unauthorized, namespace: prod, labels: {app: intruder}, ips: [127.0.0.40]}
";

struct Proxy {
    addr: SocketAddr,
    audit: PathBuf,
    sink: AuditSink,
    _dir: tempfile::TempDir,
}

/// Start the proxy for `dest` (ENDPOINT:PORT) in front of `origin`, with the gateway example.
async fn start_proxy(extra_policy: Option<&str>, dest: &str, origin: u16) -> Proxy {
    start_proxy_with_queue(extra_policy, dest, origin, 1024).await
}

/// [`start_proxy`] with an audit queue of `queue` records.
async fn start_proxy_with_queue(
    extra_policy: Option<&str>,
    dest: &str,
    origin: u16,
    queue: usize,
) -> Proxy {
    start_proxy_full(extra_policy, dest, origin, queue, AuditHeaders::default()).await
}

async fn start_proxy_full(
    extra_policy: Option<&str>,
    dest: &str,
    origin: u16,
    queue: usize,
    headers: AuditHeaders,
) -> Proxy {
    let mut set = PolicySet::default();
    let p = repo().join("conformance/policies/gateway/policies.yaml");
    set.load_str("gateway.yaml", &std::fs::read_to_string(p).unwrap());
    if let Some(extra) = extra_policy {
        set.load_str("extra.yaml", extra);
    }
    assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
    let state = Arc::new(PolicyState::new(
        set,
        Inventory::from_yaml(ENDPOINTS).unwrap(),
        7,
    ));
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let sink = AuditSink::start(Output::File(audit.clone()), queue);
    let upstream: SocketAddr = format!("127.0.0.1:{origin}").parse().unwrap();
    let l = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        dest,
        upstream,
        state,
        sink.clone(),
        "Access denied",
    )
    .await
    .unwrap()
    .with_audit_headers(headers);
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve_listener(l));
    Proxy {
        addr,
        audit,
        sink,
        _dir: dir,
    }
}

/// curl from a pod address; returns (status, body).
async fn curl(from: &str, args: &[&str], url: &str) -> (u16, String) {
    need("curl");
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args([
        "-s",
        "--max-time",
        "10",
        "--interface",
        from,
        "-w",
        "\n%{http_code}",
    ]);
    cmd.args(args).arg(url);
    let out = cmd.output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap_or(0), body.to_string())
}

async fn audit_lines(p: &Proxy, at_least: usize) -> Vec<serde_json::Value> {
    for _ in 0..100 {
        let text = std::fs::read_to_string(&p.audit).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= at_least {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "fewer than {at_least} audit records in {}",
        p.audit.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_allowed_denied_and_audited_with_real_curl_and_nginx() {
    let origin = Nginx::start();
    let p = start_proxy(None, "api-server:8080", origin.port).await;
    let url = |path: &str| format!("http://{}{path}", p.addr);

    let (code, body) = curl("127.0.0.10", &[], &url("/public/index.html")).await;
    assert_eq!(
        (code, body.as_str()),
        (200, "origin GET /public/index.html\n")
    );

    let (code, body) = curl("127.0.0.10", &[], &url("/admin/users")).await;
    assert_eq!((code, body.as_str()), (403, "Access denied\r\n"));

    // The deny rule wins over the admin pod's allow; the record names it and its log tag.
    let (code, _) = curl("127.0.0.30", &[], &url("/admin/debug/pprof")).await;
    assert_eq!(code, 403);

    // Dot segments are resolved before policy: this is /admin/users, denied for frontend.
    let (code, _) = curl(
        "127.0.0.10",
        &["--path-as-is"],
        &url("/public/../admin/users"),
    )
    .await;
    assert_eq!(code, 403);

    // Ambiguous encodings never reach policy or the origin.
    let (code, _) = curl("127.0.0.10", &[], &url("/public/a%2Fb")).await;
    assert_eq!(code, 400);

    // Audit mode forwards and records.
    let (code, body) = curl("127.0.0.30", &["-X", "DELETE"], &url("/admin/users/7")).await;
    assert_eq!(
        (code, body.as_str()),
        (200, "origin DELETE /admin/users/7\n")
    );

    let recs = audit_lines(&p, 5).await;
    assert_eq!(recs.len(), 5, "{recs:#?}");
    let r0 = &recs[0];
    assert_eq!(r0["schema"], "tollgate.audit/v1");
    assert_eq!(r0["verdict"], "denied");
    assert_eq!(r0["reason"], "l7-no-match");
    assert_eq!(r0["source"]["name"], "frontend");
    assert_eq!(r0["destination"]["name"], "api-server");
    assert_eq!(r0["destination"]["port"], 8080);
    assert_eq!(r0["http"]["path"], "/admin/users");
    assert_eq!(r0["policy"]["name"], "api-gateway");
    assert_eq!(r0["rule"], "spec.ingress[1].toPorts[0].rules");
    assert_eq!(r0["policy_revision"], 7);
    let r1 = &recs[1];
    assert_eq!(r1["reason"], "l7-deny-rule");
    assert_eq!(r1["policy"]["kind"], "TollgatePolicy");
    assert_eq!(r1["log"], "no-debug-endpoints");
    assert_eq!(recs[2]["http"]["path"], "/admin/users");
    assert_eq!(recs[3]["reason"], "malformed");
    assert_eq!(recs[4]["verdict"], "audit-denied");
    assert_eq!(recs[4]["enforcement"], "audit");
    assert_eq!(recs[4]["policy"]["name"], "preview-admin-writes");
    assert_eq!(p.sink.shed(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denial_keeps_the_http1_connection_alive() {
    let origin = Nginx::start();
    let p = start_proxy(None, "api-server:8080", origin.port).await;
    // Two requests on one connection: the 403 must not close it (num_connects of the second
    // transfer is 0 when the connection was reused).
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "--interface",
            "127.0.0.10",
        ])
        .args(["-w", "%{http_code}:%{num_connects} "])
        .arg(format!("http://{}/admin/x", p.addr))
        .arg(format!("http://{}/public/y", p.addr))
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "403:1 200:0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_requests_are_judged_per_stream() {
    need("h2load");
    let origin = Nginx::start_with(
        "location / { return 200 \"origin $request_method $request_uri host=$http_host\\n\"; }",
        "",
    );
    let p = start_proxy(None, "api-server:8080", origin.port).await;
    let (code, body) = curl(
        "127.0.0.10",
        &["--http2-prior-knowledge"],
        &format!("http://{}/public/h2", p.addr),
    )
    .await;
    // Forwarded as HTTP/1.1: the stream's :authority becomes the Host header.
    assert_eq!(
        (code, body.as_str()),
        (
            200,
            format!("origin GET /public/h2 host={}\n", p.addr).as_str()
        )
    );
    let (code, _) = curl(
        "127.0.0.10",
        &["--http2-prior-knowledge"],
        &format!("http://{}/admin/h2", p.addr),
    )
    .await;
    assert_eq!(code, 403);
    // 10 connections x 10 streams: every allowed stream succeeds through the proxy.
    let out = tokio::process::Command::new("h2load")
        .args(["-n", "500", "-c", "10", "-m", "10"])
        .arg(format!("http://{}/public/load", p.addr))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("500 succeeded, 0 failed"), "{text}");
    assert!(text.contains("500 2xx"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_without_l7_rules_are_spliced_and_checked_at_l4() {
    let origin = Nginx::start();
    // The admin pod may reach port 9000 at L4 only; nobody else may.
    let extra = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: metrics, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: api-server}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: admin}}]\n    toPorts:\n    - ports: [{port: \"9000\", protocol: TCP}]\n";
    let p = start_proxy(Some(extra), "api-server:9000", origin.port).await;
    let (code, body) = curl("127.0.0.30", &[], &format!("http://{}/anything", p.addr)).await;
    assert_eq!(
        (code, body.as_str()),
        (200, "origin GET /anything\n"),
        "spliced bytes"
    );
    let (code, _) = curl("127.0.0.10", &[], &format!("http://{}/anything", p.addr)).await;
    assert_eq!(code, 0, "an L3/L4 denial closes the connection");
    let recs = audit_lines(&p, 1).await;
    assert_eq!(recs[0]["protocol"], "tcp");
    assert_eq!(recs[0]["reason"], "default-deny");
    assert_eq!(recs[0]["source"]["name"], "frontend");
}

/// Raw bytes on one connection: returns the status lines of every response received.
async fn raw_exchange(addr: SocketAddr, from: &str, request: &[u8]) -> Vec<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .map(str::to_string)
        .collect()
}

/// Request smuggling defence: the framing of every request is checked before hyper parses it
/// (`tollgate_parsers::http1`). Earlier requests on the connection are answered; the first
/// request with conflicting framing gets `400` and the connection closes; nothing of it (or
/// behind it) reaches the origin; the rejection is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_framing_is_answered_400_and_never_forwarded() {
    let origin = Nginx::start_with(
        "location / { return 200 \"origin $request_method $request_uri\\n\"; }",
        "",
    );
    let p = start_proxy(None, "api-server:8080", origin.port).await;
    let smuggle = b"GET /public/first HTTP/1.1\r\nHost: a\r\n\r\n\
GET /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
GET /admin/users HTTP/1.1\r\nHost: a\r\n\r\n";
    let statuses = raw_exchange(p.addr, "127.0.0.10", smuggle).await;
    assert_eq!(
        statuses,
        vec!["HTTP/1.1 200 OK", "HTTP/1.1 400 Bad Request"],
        "the request before it is served, then 400 and close"
    );
    let recs = audit_lines(&p, 1).await;
    let r = recs
        .iter()
        .find(|r| r["reason"] == "malformed")
        .expect("the rejection is audited");
    assert!(
        r["detail"]
            .as_str()
            .unwrap()
            .contains("both Content-Length and Transfer-Encoding"),
        "{r}"
    );
    assert!(!recs.iter().any(|r| r.to_string().contains("/admin/users")));
    for bad in [
        &b"POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"[..],
        b"POST /public/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
        b"POST /public/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ] {
        let statuses = raw_exchange(p.addr, "127.0.0.10", bad).await;
        assert_eq!(
            statuses,
            vec!["HTTP/1.1 400 Bad Request"],
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_with_expect_continue_in_bounded_memory() {
    // nginx reads the whole body (proxy_pass to a second server) and answers at the end.
    let inner = free_port();
    let origin = Nginx::start_with(
        &format!("location / {{ proxy_pass http://127.0.0.1:{inner}; }}"),
        &format!(
            "server {{ listen 127.0.0.1:{inner}; location / {{ return 200 \"got it\\n\"; }} }}"
        ),
    );
    let p = start_proxy(None, "api-server:8080", origin.port).await;
    let before = peak_rss_kb();
    // 256 MiB, chunked, from a pipe; curl sends `Expect: 100-continue` first.
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 268435456 /dev/zero | curl -s --interface 127.0.0.10 -X POST -H 'Authorization: x' \
             -H 'Transfer-Encoding: chunked' -H 'Expect: 100-continue' --data-binary @- \
             -w '%{{http_code}} %{{size_upload}}' http://{}/api/v1/users",
            p.addr
        ))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, uploaded) = text.rsplit_once(' ').unwrap();
    assert_eq!(body, "got it\n200");
    // Chunk framing adds a few bytes on top of the 256 MiB payload.
    assert!(uploaded.parse::<u64>().unwrap() >= 268_435_456, "{text}");
    let grown_mb = (peak_rss_kb() - before) / 1024;
    assert!(
        grown_mb < 64,
        "the body was buffered: peak RSS grew by {grown_mb} MiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_mismatch_actions_rewrite_the_forwarded_request() {
    let origin = Nginx::start_with(
        "location / { return 200 \"tenant=$http_x_tenant debug=$http_x_debug\\n\"; }",
        "",
    );
    let extra = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: tenants, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: api-server}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n    toPorts:\n    - ports: [{port: \"7000\", protocol: TCP}]\n      rules:\n        http:\n        - path: /t\n          headerMatches:\n          - {name: X-Tenant, value: acme, mismatch: REPLACE}\n          - {name: X-Debug, value: \"off\", mismatch: DELETE}\n";
    let p = start_proxy(Some(extra), "api-server:7000", origin.port).await;
    let url = format!("http://{}/t", p.addr);
    let (code, body) = curl(
        "127.0.0.10",
        &["-H", "X-Tenant: evil", "-H", "X-Debug: on"],
        &url,
    )
    .await;
    assert_eq!(
        (code, body.as_str()),
        (200, "tenant=acme debug=\n"),
        "REPLACE and DELETE applied"
    );
    let (code, body) = curl("127.0.0.10", &[], &url).await;
    assert_eq!(
        (code, body.as_str()),
        (200, "tenant=acme debug=\n"),
        "REPLACE adds a missing header"
    );
    let (_, body) = curl(
        "127.0.0.10",
        &["-H", "X-Tenant: acme", "-H", "X-Debug: off"],
        &url,
    )
    .await;
    assert_eq!(
        body, "tenant=acme debug=off\n",
        "matching values are left alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_verdicts_and_rule_hits_on_the_metrics_endpoint() {
    use tollgate_proxy::metrics::{Metrics, serve};
    let origin = Nginx::start();
    let mut set = PolicySet::default();
    let p = repo().join("conformance/policies/gateway/policies.yaml");
    set.load_str("gateway.yaml", &std::fs::read_to_string(p).unwrap());
    let state = Arc::new(PolicyState::new(
        set,
        Inventory::from_yaml(ENDPOINTS).unwrap(),
        1,
    ));
    let sink = AuditSink::start(
        Output::File(std::env::temp_dir().join(format!("tg-metrics-{}.jsonl", std::process::id()))),
        64,
    );
    let metrics = Arc::new(Metrics::new());
    let l = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        "api-server:8080",
        format!("127.0.0.1:{}", origin.port).parse().unwrap(),
        state,
        sink.clone(),
        "Access denied",
    )
    .await
    .unwrap()
    .with_metrics(metrics.clone());
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve_listener(l));
    let maddr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    tokio::spawn(serve(maddr, metrics, sink, None, None));
    for path in ["/public/a", "/public/b", "/admin/x"] {
        curl("127.0.0.10", &[], &format!("http://{addr}{path}")).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (code, text) = curl("127.0.0.1", &[], &format!("http://{maddr}/metrics")).await;
    assert_eq!(code, 200);
    assert!(
        text.contains("tollgate_requests_total{verdict=\"allow\",protocol=\"http\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("tollgate_requests_total{verdict=\"deny\",protocol=\"http\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("tollgate_rule_hits_total{policy=\"prod/api-gateway\",rule=\"spec.ingress[0].toPorts[0].rules.http[0]\"} 2"),
        "{text}"
    );
    assert!(text.contains("tollgate_audit_records_written 1"), "{text}");
    assert!(text.contains("tollgate_audit_records_shed 0"), "{text}");
    assert!(text.contains("tollgate_audit_queue_depth 0"), "{text}");
    // Every judged request's latency is in the histogram.
    let count = text
        .lines()
        .find(|l| l.starts_with("tollgate_request_duration_seconds_count{protocol=\"http\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok());
    assert!(count.is_some_and(|c| c >= 2), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_judged_then_tunnelled_through_a_real_forward_proxy() {
    need("tinyproxy");
    let origin = Nginx::start();
    // tinyproxy is the real forward proxy behind tollgate; it allows CONNECT to any port.
    let dir = tempfile::tempdir().unwrap();
    let tp_port = free_port();
    let conf = dir.path().join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "Port {tp_port}\nListen 127.0.0.1\nAllow 127.0.0.1\nMaxClients 16\nLogLevel Critical\n"
        ),
    )
    .unwrap();
    let mut tp = Command::new("tinyproxy")
        .arg("-d")
        .arg("-c")
        .arg(&conf)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", tp_port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let extra = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: egress-proxy, namespace: prod}}\nspec:\n  endpointSelector: {{matchLabels: {{app: api-server}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: frontend}}}}]\n    toPorts:\n    - ports: [{{port: \"3128\", protocol: TCP}}]\n      rules:\n        http: [{{method: CONNECT, host: \"127.0.0.1:{}\"}}]\n",
        origin.port
    );
    let p = start_proxy(Some(&extra), "api-server:3128", tp_port).await;
    let via = |target: String| async move {
        let out = tokio::process::Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "5",
                "--interface",
                "127.0.0.10",
                "-p",
                "-x",
            ])
            .arg(format!("http://{}", p.addr))
            .args(["-w", "\n%{http_connect} %{http_code}"])
            .arg(target)
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(
        via(format!("http://127.0.0.1:{}/through", origin.port)).await,
        "origin GET /through\n\n200 200",
        "CONNECT allowed (200), then the GET inside the tunnel reaches nginx"
    );
    let other = free_port();
    assert_eq!(
        via(format!("http://127.0.0.1:{other}/x")).await,
        "\n403 000",
        "CONNECT to another authority is denied before any tunnel exists"
    );
    let recs = audit_lines(&p, 1).await;
    assert_eq!(recs[0]["http"]["method"], "CONNECT");
    assert_eq!(recs[0]["http"]["host"], format!("127.0.0.1:{other}"));
    let _ = tp.kill();
    let _ = tp.wait();
}

/// No silent loss under load: 50,000 denied requests from a real load generator (h2load,
/// HTTP/1.1, 16 connections) through a deliberately small audit queue. Every denial is either
/// written or counted as shed — exactly — and the file says how many were shed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_denials_are_all_written_or_counted_as_shed() {
    need("h2load");
    let origin = Nginx::start();
    let p = start_proxy_with_queue(None, "api-server:8080", origin.port, 64).await;
    const N: u64 = 50_000;
    let url = format!("http://{}/admin/users", p.addr);
    let out = tokio::task::spawn_blocking(move || {
        Command::new("h2load")
            .args(["--h1", "-n", &N.to_string(), "-c", "16", "-t", "1", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let codes = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or_default()
        .to_string();
    assert!(codes.contains(&format!("{N} 4xx")), "{codes}\n{text}");
    // Let the writer drain and report.
    for _ in 0..300 {
        if p.sink.written() + p.sink.shed() == N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        p.sink.written() + p.sink.shed(),
        N,
        "written + shed = denied"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let file = std::fs::read_to_string(&p.audit).unwrap();
    let mut denied = 0u64;
    let mut lost = 0u64;
    for l in file.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v["type"] == "records_lost" {
            lost = v["count"].as_u64().unwrap();
        } else {
            assert_eq!(v["verdict"], "denied");
            denied += 1;
        }
    }
    assert_eq!(denied, p.sink.written());
    assert_eq!(
        lost,
        p.sink.shed(),
        "the last records_lost record carries the full count"
    );
    eprintln!("{N} denials: {denied} written, {lost} shed (queue of 64)");
}

/// Header values in audit records: credentials are shown only as "[redacted]", headers not
/// configured are left out, and operators can add (or redact) headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_redact_credentials_and_show_only_configured_headers() {
    let origin = Nginx::start();
    let secrets = [
        "-H",
        "Authorization: Bearer s3cr3t-token",
        "-H",
        "Cookie: session=c00kie-value",
        "-H",
        "X-Tenant: tenant-42",
        "-A",
        "curl-audit-test",
    ];
    for (headers, tenant, agent) in [
        (AuditHeaders::default(), None, Some("curl-audit-test")),
        (
            AuditHeaders::with(&["X-Tenant".into()], &["user-agent".into()]),
            Some("tenant-42"),
            Some("[redacted]"),
        ),
    ] {
        let p = start_proxy_full(None, "api-server:8080", origin.port, 64, headers).await;
        let (code, _) = curl(
            "127.0.0.40",
            &secrets,
            &format!("http://{}/admin/users", p.addr),
        )
        .await;
        assert_eq!(code, 403);
        let recs = audit_lines(&p, 1).await;
        let h = &recs[0]["http"]["headers"];
        assert_eq!(h["authorization"], "[redacted]");
        assert_eq!(h["cookie"], "[redacted]");
        assert_eq!(h["x-tenant"].as_str(), tenant);
        assert_eq!(h["user-agent"].as_str(), agent);
        let file = std::fs::read_to_string(&p.audit).unwrap();
        assert!(
            !file.contains("s3cr3t") && !file.contains("c00kie"),
            "{file}"
        );
    }
}

/// Visibility: a rule with `log` set has the requests it allows recorded (verdict `allowed`,
/// with its log tag); requests allowed by rules without `log` are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_with_log_record_what_they_allow() {
    let origin = Nginx::start();
    let visible = "apiVersion: tollgate.io/v1alpha1\nkind: TollgatePolicy\nmetadata: {name: visible, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: api-server}}\n  log: {value: visibility}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n    toPorts:\n    - ports: [{port: \"8080\", protocol: TCP}]\n      rules:\n        http: [{method: GET, path: /api/v1/visible}]\n";
    let p = start_proxy(Some(visible), "api-server:8080", origin.port).await;
    let base = format!("http://{}", p.addr);
    let (code, _) = curl("127.0.0.10", &[], &format!("{base}/public/index.html")).await;
    assert_eq!(code, 200, "allowed by a rule without log: not recorded");
    let (code, _) = curl("127.0.0.10", &[], &format!("{base}/api/v1/visible")).await;
    assert_eq!(code, 200);
    let recs = audit_lines(&p, 1).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["verdict"], "allowed");
    assert_eq!(recs[0]["log"], "visibility");
    assert_eq!(recs[0]["http"]["path"], "/api/v1/visible");
    assert_eq!(recs[0]["policy"]["name"], "visible");
}
