//! DNS policy end to end with real parts: unbound and dnsmasq as upstream resolvers (local zones
//! only, nothing leaves loopback), dig as the client (UDP, TCP, EDNS sizes, truncation), and the
//! proxy's DNS listener in between. Each case picks its own ports; the servers are children
//! killed on drop.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Reaped, free_port, need};
use tollgate_policy::endpoints::Inventory;
use tollgate_policy::load::PolicySet;
use tollgate_proxy::PolicyState;
use tollgate_proxy::audit::{AuditSink, Output};
use tollgate_proxy::dns::{DnsListener, DnsOptions};
use tollgate_proxy::fqdn_link::FqdnLink;
use tollgate_proxy::metrics::Metrics;

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns-egress, namespace: apps}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints:
    - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns:
        - {matchName: api.example.com}
        - {matchPattern: "*.example.com"}
        - {matchPattern: "**.cdn.example.net"}
  - toFQDNs:
    - {matchName: api.example.com}
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
"#;

const INVENTORY: &str = "
endpoints:
  - {name: client, namespace: apps, labels: {app: client}, ips: [127.0.0.10, '::1']}
  - {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}, ips: [127.0.0.53]}
";

fn unbound(port: u16) -> (Reaped, tempfile::TempDir) {
    need("unbound");
    let dir = tempfile::tempdir().unwrap();
    let txt: String = (1..=4)
        .map(|i| {
            format!(
                "  local-data: \"big.example.com. 300 IN TXT \\\"{}{i}\\\"\"\n",
                "a".repeat(200)
            )
        })
        .collect();
    let conf = format!(
        r#"server:
  interface: 127.0.0.1@{port}
  interface: ::1@{port}
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{dir}"
  pidfile: ""
  use-syslog: no
  logfile: ""
  num-threads: 1
  module-config: "iterator"
  access-control: 127.0.0.0/8 allow
  access-control: ::1 allow
  local-zone: "." refuse
  local-zone: "example.com." static
  local-zone: "example.org." static
  local-data: "api.example.com. 300 IN A 192.0.2.10"
  local-data: "api.example.com. 300 IN AAAA 2001:db8::10"
  local-data: "web.example.com. 30 IN A 192.0.2.11"
  local-data: "evil.example.org. 300 IN A 192.0.2.66"
{txt}"#,
        dir = dir.path().display()
    );
    let path = dir.path().join("unbound.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new("unbound")
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let r = Reaped(child);
    wait_for_dns(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        "api.example.com",
    );
    (r, dir)
}

fn dnsmasq(port: u16) -> Reaped {
    need("dnsmasq");
    let child = Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "-C",
            "/dev/null",
            &format!("--port={port}"),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--pid-file=",
            "--local-ttl=120",
            "--host-record=edge.cdn.example.net,192.0.2.20,2001:db8::20",
            "--cname=www.example.com,edge.cdn.example.net",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let r = Reaped(child);
    wait_for_dns(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        "www.example.com",
    );
    r
}

/// Bounded wait (5 s) until `server` answers a query for `name`.
fn wait_for_dns(server: &SocketAddr, name: &str) {
    for _ in 0..100 {
        if dig(server, None, &[name, "+tries=1", "+time=1"]).status == "NOERROR" {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no DNS server answers on {server}");
}

#[derive(Debug)]
struct Dig {
    status: String,
    flags: String,
    answers: Vec<String>,
}

/// Runs dig against `server` (from `source` when given) and reads status, flags and the
/// answer section.
fn dig(server: &SocketAddr, source: Option<&str>, args: &[&str]) -> Dig {
    need("dig");
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args(["+noall", "+comments", "+answer"]);
    if let Some(s) = source {
        cmd.args(["-b", s]);
    }
    let out = cmd.args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("NO-ANSWER")
        .to_string();
    let flags = text
        .split(";; flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or("")
        .to_string();
    let answers = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    Dig {
        status,
        flags,
        answers,
    }
}

struct Proxy {
    addr: SocketAddr,
    state: Arc<PolicyState>,
    audit: std::path::PathBuf,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Audit records are written by a task: wait (bounded) for `n`.
    async fn wait_records(&self, n: usize) -> Vec<serde_json::Value> {
        for _ in 0..100 {
            let r = self.records();
            if r.len() >= n {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.records()
    }

    fn event_count(&self, event: &str) -> u64 {
        let sink = AuditSink::start(Output::Stdout, 1);
        self.metrics
            .render(&sink)
            .lines()
            .find(|l| l.contains(&format!("event=\"{event}\"")) && l.contains("protocol=\"dns\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

async fn start_proxy(listen: &str, upstream: SocketAddr, opts: DnsOptions) -> Proxy {
    let mut set = PolicySet::default();
    set.load_str("policy.yaml", POLICY);
    assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
    let inv = Inventory::from_yaml(INVENTORY).unwrap();
    let state = Arc::new(PolicyState::new(set, inv, 7));
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let metrics = Arc::new(Metrics::new());
    let l = DnsListener::bind(
        listen.parse().unwrap(),
        "kube-dns",
        upstream,
        state.clone(),
        AuditSink::start(Output::File(audit.clone()), 64),
        metrics.clone(),
        opts,
    )
    .await
    .unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(l.serve());
    Proxy {
        addr,
        state,
        audit,
        metrics,
        _dir: dir,
    }
}

async fn dig_async(
    server: SocketAddr,
    source: Option<&'static str>,
    args: Vec<&'static str>,
) -> Dig {
    tokio::task::spawn_blocking(move || dig(&server, source, &args))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_names_are_answered_denied_names_refused_over_udp_and_tcp_with_audit_records() {
    let port = free_port();
    let (_unbound, _d) = unbound(port);
    let up: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = start_proxy("127.0.0.1:0", up, DnsOptions::default()).await;
    let client = Some("127.0.0.10");

    let ok = dig_async(p.addr, client, vec!["api.example.com", "A"]).await;
    assert_eq!(ok.status, "NOERROR", "{ok:?}");
    assert_eq!(ok.answers, vec!["api.example.com. 300 IN A 192.0.2.10"]);

    // Case-insensitive, and the pattern `*.example.com` covers one label.
    let ok = dig_async(p.addr, client, vec!["WEB.Example.COM", "A"]).await;
    assert_eq!(ok.status, "NOERROR", "{ok:?}");
    assert_eq!(ok.answers.len(), 1, "{ok:?}");

    // Denied: the upstream has an answer, the client gets REFUSED.
    let denied = dig_async(p.addr, client, vec!["evil.example.org", "A"]).await;
    assert_eq!(denied.status, "REFUSED", "{denied:?}");
    assert!(denied.answers.is_empty());

    // Same over TCP (the policy port is ANY, so TCP/53 is covered too).
    let ok = dig_async(p.addr, client, vec!["+tcp", "api.example.com", "AAAA"]).await;
    assert_eq!(
        ok.answers,
        vec!["api.example.com. 300 IN AAAA 2001:db8::10"]
    );
    let denied = dig_async(p.addr, client, vec!["+tcp", "a.b.example.com", "A"]).await;
    assert_eq!(
        denied.status, "REFUSED",
        "`*` never crosses a dot: {denied:?}"
    );

    let recs = p.wait_records(2).await;
    assert_eq!(recs.len(), 2, "one record per denied query: {recs:?}");
    let r = &recs[0];
    assert_eq!(r["protocol"], "dns");
    assert_eq!(r["verdict"], "denied");
    assert_eq!(r["dns"]["qname"], "evil.example.org.");
    assert_eq!(r["dns"]["qtype"], "A");
    assert_eq!(r["dns"]["rcode"], "REFUSED");
    assert_eq!(r["dns"]["transport"], "udp");
    assert_eq!(r["source"]["name"], "client");
    assert_eq!(r["source"]["ip"], "127.0.0.10");
    assert_eq!(r["destination"]["name"], "kube-dns");
    assert_eq!(r["destination"]["port"], 53);
    assert_eq!(r["policy_revision"], 7);
    assert_eq!(recs[1]["dns"]["transport"], "tcp");
    assert_eq!(recs[1]["dns"]["qname"], "a.b.example.com.");

    // Learned before the answer was released: the allowed names' IPs are in the cache and
    // toFQDNs now matches them; the denied name taught nothing.
    let api: IpAddr = "192.0.2.10".parse().unwrap();
    assert_eq!(p.state.fqdn.names_of(api), vec!["api.example.com."]);
    assert!(
        p.state
            .fqdn
            .names_of("2001:db8::10".parse().unwrap())
            .contains(&"api.example.com.".to_string())
    );
    assert!(
        p.state
            .fqdn
            .names_of("192.0.2.66".parse().unwrap())
            .is_empty()
    );
    let remote = p.state.remote(api);
    let idx = p.state.endpoint_index("client").unwrap();
    let pp = p
        .state
        .port_policy(idx, tollgate_policy::model::Direction::Egress, 443);
    assert!(
        pp.evaluate(&remote, None).is_allowed(),
        "toFQDNs allows 443 to the learned IP"
    );
    let web = p.state.remote("192.0.2.11".parse().unwrap());
    assert!(
        !pp.evaluate(&web, None).is_allowed(),
        "a name outside toFQDNs stays denied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cname_chain_is_learned_under_the_asked_name_with_the_lowest_ttl() {
    let port = free_port();
    let _dnsmasq = dnsmasq(port);
    let up: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = start_proxy("127.0.0.1:0", up, DnsOptions::default()).await;
    let d = dig_async(p.addr, Some("127.0.0.10"), vec!["www.example.com", "A"]).await;
    assert_eq!(d.status, "NOERROR", "{d:?}");
    assert_eq!(
        d.answers,
        vec![
            "www.example.com. 120 IN CNAME edge.cdn.example.net.",
            "edge.cdn.example.net. 120 IN A 192.0.2.20"
        ]
    );
    let list = p.state.fqdn.list(Instant::now());
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].name, "www.example.com.");
    assert_eq!(list[0].ip, "192.0.2.20".parse::<IpAddr>().unwrap());
    assert!(list[0].ttl_remaining_secs <= 120 && list[0].ttl_remaining_secs >= 118);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_is_truncated_over_udp_and_complete_over_tcp() {
    let port = free_port();
    let (_unbound, _d) = unbound(port);
    let up: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = start_proxy("127.0.0.1:0", up, DnsOptions::default()).await;
    let c = Some("127.0.0.10");
    // Without EDNS the client takes 512 bytes: the UDP answer carries TC and no records.
    let tc = dig_async(
        p.addr,
        c,
        vec!["+noedns", "+ignore", "big.example.com", "TXT"],
    )
    .await;
    assert!(tc.flags.split_whitespace().any(|f| f == "tc"), "{tc:?}");
    // dig then retries over TCP by itself, through the proxy's TCP listener.
    let full = dig_async(p.addr, c, vec!["+noedns", "big.example.com", "TXT"]).await;
    assert_eq!(full.status, "NOERROR");
    assert_eq!(full.answers.len(), 4, "{full:?}");
    // With a large EDNS buffer the whole answer fits in one UDP datagram.
    let edns = dig_async(
        p.addr,
        c,
        vec!["+bufsize=4096", "+ignore", "big.example.com", "TXT"],
    )
    .await;
    assert_eq!(edns.answers.len(), 4, "{edns:?}");
    assert!(!edns.flags.contains("tc"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_gets_servfail_not_silence() {
    // A socket that is bound but never read: the upstream that hangs.
    let hole = UdpSocket::bind("127.0.0.1:0").unwrap();
    let opts = DnsOptions {
        upstream_timeout: Duration::from_millis(300),
        ..DnsOptions::default()
    };
    let p = start_proxy("127.0.0.1:0", hole.local_addr().unwrap(), opts).await;
    let t = Instant::now();
    let d = dig_async(
        p.addr,
        Some("127.0.0.10"),
        vec!["+tries=1", "+time=3", "api.example.com"],
    )
    .await;
    assert_eq!(d.status, "SERVFAIL", "{d:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(p.event_count("upstream_timeout"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_listener_and_upstream_answer_aaaa_and_learn_it() {
    let port = free_port();
    let (_unbound, _d) = unbound(port);
    let up: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let p = start_proxy("[::1]:0", up, DnsOptions::default()).await;
    let d = dig_async(p.addr, Some("::1"), vec!["-6", "api.example.com", "AAAA"]).await;
    assert_eq!(
        d.answers,
        vec!["api.example.com. 300 IN AAAA 2001:db8::10"],
        "{d:?}"
    );
    let denied = dig_async(
        p.addr,
        Some("::1"),
        vec!["-6", "+tcp", "evil.example.org", "AAAA"],
    )
    .await;
    assert_eq!(denied.status, "REFUSED");
    assert_eq!(
        p.state.fqdn.names_of("2001:db8::10".parse().unwrap()),
        vec!["api.example.com."]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_can_replace_refused_and_malformed_queries_get_formerr() {
    let port = free_port();
    let (_unbound, _d) = unbound(port);
    let up: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let opts = DnsOptions {
        deny_rcode: tollgate_parsers::dns::rcode::NXDOMAIN,
        ..DnsOptions::default()
    };
    let p = start_proxy("127.0.0.1:0", up, opts).await;
    let d = dig_async(p.addr, Some("127.0.0.10"), vec!["evil.example.org"]).await;
    assert_eq!(d.status, "NXDOMAIN", "{d:?}");

    // Two questions in one query (RFC 9619 forbids it; a policy check of the first alone
    // would let the second through): FORMERR, nothing forwarded.
    let s = UdpSocket::bind("127.0.0.10:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut q = vec![0xab, 0xcd, 1, 0, 0, 2, 0, 0, 0, 0, 0, 0];
    for name in [
        &b"\x03api\x07example\x03com\x00"[..],
        b"\x04evil\x07example\x03org\x00",
    ] {
        q.extend_from_slice(name);
        q.extend_from_slice(&[0, 1, 0, 1]);
    }
    s.send_to(&q, p.addr).unwrap();
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf).unwrap();
    assert_eq!(&buf[..2], &[0xab, 0xcd]);
    assert_eq!(buf[3] & 0x0f, 1, "FORMERR: {:?}", &buf[..n]);
    assert_eq!(p.event_count("malformed_query"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_queries_pipelined_on_one_tcp_connection_are_all_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = free_port();
    let (_unbound, _d) = unbound(port);
    let up: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = start_proxy("127.0.0.1:0", up, DnsOptions::default()).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.10:0".parse().unwrap()).unwrap();
    let mut c = sock.connect(p.addr).await.unwrap();
    let n = 200u16;
    let mut out = Vec::new();
    for id in 0..n {
        let name: &[u8] = if id % 2 == 0 {
            b"\x03api\x07example\x03com\x00"
        } else {
            b"\x04evil\x07example\x03org\x00"
        };
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        q.extend_from_slice(name);
        q.extend_from_slice(&[0, 1, 0, 1]);
        out.extend_from_slice(&(q.len() as u16).to_be_bytes());
        out.extend_from_slice(&q);
    }
    c.write_all(&out).await.unwrap();
    let mut seen = vec![None; usize::from(n)];
    for _ in 0..n {
        let len = tokio::time::timeout(Duration::from_secs(5), c.read_u16())
            .await
            .unwrap()
            .unwrap();
        let mut m = vec![0u8; usize::from(len)];
        c.read_exact(&mut m).await.unwrap();
        let id = u16::from_be_bytes([m[0], m[1]]);
        seen[usize::from(id)] = Some(m[3] & 0x0f);
    }
    for (id, rc) in seen.iter().enumerate() {
        let want = if id % 2 == 0 { 0 } else { 5 };
        assert_eq!(*rc, Some(want), "query {id}");
    }
}

/// A raw A query for `name` (wire form) with `id`.
fn raw_query(id: u16, name: &[u8]) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(name);
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_udp_receive_loops_share_the_address_and_every_one_answers_its_clients() {
    let port = free_port();
    let (_unbound, _d) = unbound(port);
    let up: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let opts = DnsOptions {
        udp_receive_loops: 4,
        ..DnsOptions::default()
    };
    let p = start_proxy("127.0.0.1:0", up, opts).await;
    // Four sockets on the listener's port, as the kernel sees them.
    let hex_port = format!(":{:04X} ", p.addr.port());
    let bound = std::fs::read_to_string("/proc/net/udp")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with(hex_port.trim()))
        })
        .count();
    assert_eq!(bound, 4, "UDP sockets bound to {}", p.addr);
    // 32 clients (source ports): the kernel spreads them over the four sockets by address and
    // port, so a loop that did not serve would leave its clients unanswered.
    let mut clients = Vec::new();
    for _ in 0..32 {
        let c = tokio::net::UdpSocket::bind("127.0.0.10:0").await.unwrap();
        c.connect(p.addr).await.unwrap();
        clients.push(c);
    }
    for (i, c) in clients.iter().enumerate() {
        let id = i as u16 * 2;
        c.send(&raw_query(id, b"\x03api\x07example\x03com\x00"))
            .await
            .unwrap();
        c.send(&raw_query(id + 1, b"\x04evil\x07example\x03org\x00"))
            .await
            .unwrap();
    }
    for (i, c) in clients.iter().enumerate() {
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while got.len() < 2 {
            let n = tokio::time::timeout(Duration::from_secs(3), c.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("client {i}: no answer"))
                .unwrap();
            assert!(
                n >= 12 && buf[2] & 0x80 != 0,
                "client {i}: not a DNS response"
            );
            got.push((u16::from_be_bytes([buf[0], buf[1]]), buf[3] & 0x0f));
        }
        got.sort();
        let id = i as u16 * 2;
        assert_eq!(
            got,
            vec![(id, 0), (id + 1, 5)],
            "client {i}: NOERROR, REFUSED"
        );
    }
}

/// Stands in for the agent's side of the `Fqdn` stream (on a Unix socket): acks every message
/// `delay` after it arrives (never, with `None`) and counts messages and (name, IP) pairs.
#[derive(Clone)]
struct StandInAgent {
    delay: Option<Duration>,
    messages: Arc<std::sync::atomic::AtomicUsize>,
    pairs: Arc<std::sync::atomic::AtomicUsize>,
}

type Acks = std::pin::Pin<
    Box<
        dyn tokio_stream::Stream<Item = Result<tollgate_api::v1::LearnedAck, tonic::Status>> + Send,
    >,
>;

#[tonic::async_trait]
impl tollgate_api::v1::fqdn_server::Fqdn for StandInAgent {
    type LearnStream = Acks;

    async fn learn(
        &self,
        request: tonic::Request<tonic::Streaming<tollgate_api::v1::Learned>>,
    ) -> Result<tonic::Response<Acks>, tonic::Status> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut incoming = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = incoming.message().await {
                me.messages.fetch_add(1, Relaxed);
                me.pairs.fetch_add(m.changes.len(), Relaxed);
                let Some(delay) = me.delay else {
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let ack = tollgate_api::v1::LearnedAck {
                        seq: m.seq,
                        ..Default::default()
                    };
                    let _ = tx.send(Ok(ack)).await;
                });
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The stand-in agent on a socket in a fresh directory, and the proxy's FQDN link to it,
/// once the link has sent its first (full) message.
async fn link_to_stand_in(p: &Proxy, delay: Option<Duration>) -> (StandInAgent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let listener = tollgate_api::bind_unix(&sock).unwrap();
    let agent = StandInAgent {
        delay,
        messages: Arc::default(),
        pairs: Arc::default(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(tollgate_api::v1::fqdn_server::FqdnServer::new(
                agent.clone(),
            ))
            .serve_with_incoming(tollgate_api::incoming(listener)),
    );
    let link = FqdnLink::new(p.metrics.clone());
    p.state.fqdn.set_link(link.clone());
    tokio::spawn(link.run(sock, Arc::downgrade(&p.state.fqdn)));
    for _ in 0..250 {
        if agent.messages.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return (agent, dir);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the FQDN link did not reach the stand-in agent in 5 s");
}

/// unbound on a free port and a proxy in front of it that holds an answer teaching new IPs for
/// at most `max_hold` (the FQDN tests below).
async fn proxy_to_unbound(max_hold: Duration) -> (Proxy, (Reaped, tempfile::TempDir)) {
    let port = free_port();
    let unbound = unbound(port);
    let up: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let opts = DnsOptions {
        fqdn_max_hold: max_hold,
        ..DnsOptions::default()
    };
    (start_proxy("127.0.0.1:0", up, opts).await, unbound)
}

/// `tollgate_proxy_fqdn_answers_total{outcome}` of `p`.
fn fqdn_answers(p: &Proxy, outcome: &str) -> u64 {
    let series = format!("tollgate_proxy_fqdn_answers_total{{outcome=\"{outcome}\"}} ");
    p.metrics
        .render_plain()
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_teaching_new_ips_waits_for_the_agent_and_other_queries_do_not() {
    let (p, _unbound) = proxy_to_unbound(Duration::from_secs(5)).await;
    let ack_after = Duration::from_millis(800);
    let (agent, _dir) = link_to_stand_in(&p, Some(ack_after)).await;
    let client = Some("127.0.0.10");
    let q = |name: &'static str| vec!["+tries=1", "+time=4", name, "A"];

    // A new IP: the answer waits for the agent's ack.
    let t = Instant::now();
    let d = dig_async(p.addr, client, q("web.example.com")).await;
    assert_eq!(
        d.answers,
        vec!["web.example.com. 30 IN A 192.0.2.11"],
        "{d:?}"
    );
    let first = t.elapsed();
    assert!(first >= ack_after - Duration::from_millis(50), "{first:?}");

    // Another new one is held; meanwhile a known answer and a denied query go out at once.
    let addr = p.addr;
    let held = tokio::spawn(async move {
        let t = Instant::now();
        let d = dig_async(addr, client, q("api.example.com")).await;
        (d, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    let known = dig_async(p.addr, client, q("web.example.com")).await;
    let denied = dig_async(p.addr, client, q("evil.example.org")).await;
    let others = t.elapsed();
    assert!(
        !held.is_finished(),
        "the held answer is still waiting ({others:?} later)"
    );
    assert_eq!(known.status, "NOERROR", "{known:?}");
    assert_eq!(denied.status, "REFUSED", "{denied:?}");
    let (d, waited) = held.await.unwrap();
    assert_eq!(
        d.answers,
        vec!["api.example.com. 300 IN A 192.0.2.10"],
        "{d:?}"
    );
    assert!(
        waited >= ack_after - Duration::from_millis(50),
        "{waited:?}"
    );

    assert_eq!(fqdn_answers(&p, "confirmed"), 2);
    assert_eq!(fqdn_answers(&p, "timeout"), 0);
    assert_eq!(
        agent.pairs.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "one (name, IP) pair each, the repeat sent nothing"
    );
    eprintln!(
        "held answers: {first:?} and {waited:?} with the agent acking after {ack_after:?}; a known \
         answer and a denied query meanwhile: {others:?} for both"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_too_an_answer_teaching_a_new_ip_waits_for_the_agent() {
    let (p, _unbound) = proxy_to_unbound(Duration::from_secs(5)).await;
    let ack_after = Duration::from_millis(500);
    let (_agent, _dir) = link_to_stand_in(&p, Some(ack_after)).await;
    let q = |name: &'static str| vec!["+tcp", "+tries=1", "+time=4", name, "AAAA"];
    let t = Instant::now();
    let d = dig_async(p.addr, Some("127.0.0.10"), q("api.example.com")).await;
    let held = t.elapsed();
    assert_eq!(
        d.answers,
        vec!["api.example.com. 300 IN AAAA 2001:db8::10"],
        "{d:?}"
    );
    assert!(held >= ack_after - Duration::from_millis(50), "{held:?}");
    // Confirmed now: the same answer goes out at once.
    let t = Instant::now();
    let d = dig_async(p.addr, Some("127.0.0.10"), q("api.example.com")).await;
    assert_eq!(d.status, "NOERROR", "{d:?}");
    assert!(t.elapsed() < ack_after, "{:?}", t.elapsed());
    assert_eq!(fqdn_answers(&p, "confirmed"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_agent_s_ack_the_answer_goes_out_at_the_hold_limit_and_is_counted() {
    let (p, _unbound) = proxy_to_unbound(Duration::from_millis(150)).await;
    let (_agent, _dir) = link_to_stand_in(&p, None).await;
    let t = Instant::now();
    let d = dig_async(
        p.addr,
        Some("127.0.0.10"),
        vec!["+tries=1", "+time=3", "api.example.com"],
    )
    .await;
    let took = t.elapsed();
    assert_eq!(
        d.answers,
        vec!["api.example.com. 300 IN A 192.0.2.10"],
        "{d:?}"
    );
    assert!(
        took >= Duration::from_millis(140) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(fqdn_answers(&p, "timeout"), 1);
    assert_eq!(fqdn_answers(&p, "confirmed"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_agent_to_tell_answers_go_out_at_once_and_are_counted() {
    let port = free_port();
    let (_unbound, _d) = unbound(port);
    let up: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = start_proxy("127.0.0.1:0", up, DnsOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let link = FqdnLink::new(p.metrics.clone());
    p.state.fqdn.set_link(link.clone());
    tokio::spawn(link.run(
        dir.path().join("nobody.sock"),
        Arc::downgrade(&p.state.fqdn),
    ));
    let d = dig_async(
        p.addr,
        Some("127.0.0.10"),
        vec!["+tries=1", "+time=3", "api.example.com"],
    )
    .await;
    assert_eq!(d.status, "NOERROR", "{d:?}");
    assert_eq!(fqdn_answers(&p, "agent_away"), 1);
    assert_eq!(
        fqdn_answers(&p, "confirmed") + fqdn_answers(&p, "timeout"),
        0
    );
    assert_eq!(
        p.state.fqdn.names_of("192.0.2.10".parse().unwrap()),
        vec!["api.example.com."],
        "still learned: sent to the agent when it comes"
    );
}
