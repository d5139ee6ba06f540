//! Listeners, per-connection dispatch (L4 splice or L7 HTTP), per-request verdicts, deny
//! replies and forwarding.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::upstream::MarkedConnector;
use anyhow::{Context, Result};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tollgate_parsers::path::{Options, normalize};
use tollgate_policy::eval::{Decision, L7Request, Verdict};
use tollgate_policy::l7::{GrpcCall, HttpRequest};
use tollgate_policy::model::Direction;

use crate::audit::{self, AuditSink, GrpcFields, HttpFields, Record, TlsFields};
use crate::flow::Flow;
use crate::state::PolicyHandle;

type Body = BoxBody<Bytes, hyper::Error>;

/// Where a listener's connections go.
#[derive(Debug, Clone)]
enum Destination {
    /// Fixed mode: one destination endpoint; `policy_port` is the port policy sees (the
    /// destination's port as the workload addresses it).
    Fixed {
        name: String,
        policy_port: u16,
        upstream: SocketAddr,
    },
    /// Transparent mode: the datapath assigned the flow to this socket; the accepted socket's
    /// local address is the original destination, and the destination endpoint is whoever
    /// owns that address.
    Transparent,
}

/// A bound listener and where it forwards.
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    dest: Destination,
    state: PolicyHandle,
    metrics: Arc<crate::metrics::Metrics>,
    sink: AuditSink,
    deny_body: Bytes,
    node: String,
    h1: Client<MarkedConnector, Incoming>,
    h2: Client<MarkedConnector, Incoming>,
    /// Mark of every upstream connection ([`crate::upstream`]).
    upstream_mark: Option<u32>,
    audit_headers: AuditHeaders,
}

impl Listener {
    /// `dest` is `ENDPOINT` or `ENDPOINT:PORT` (the port policy rules name; default: the
    /// upstream's port).
    pub async fn bind(
        addr: SocketAddr,
        dest: &str,
        upstream: SocketAddr,
        state: impl Into<PolicyHandle>,
        sink: AuditSink,
        deny_body: &str,
    ) -> Result<Listener> {
        let state = state.into();
        let (name, policy_port) = crate::state::split_destination(dest, upstream.port())?;
        if state.load().endpoint_index(name).is_none() {
            anyhow::bail!("destination `{name}` is not in the endpoints inventory");
        };
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr}"))?;
        let dest = Destination::Fixed {
            name: name.to_string(),
            policy_port,
            upstream,
        };
        Ok(Listener::new(tcp, dest, state, sink, deny_body))
    }

    /// A transparent listener (`IP_TRANSPARENT`) for flows the datapath redirects to `addr`
    /// (`bpf_sk_assign`); needs CAP_NET_ADMIN.
    pub async fn bind_transparent(
        addr: SocketAddr,
        state: impl Into<PolicyHandle>,
        sink: AuditSink,
        deny_body: &str,
    ) -> Result<Listener> {
        let domain = if addr.is_ipv4() {
            socket2::Domain::IPV4
        } else {
            socket2::Domain::IPV6
        };
        let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        sock.set_reuse_address(true)?;
        if addr.is_ipv4() {
            sock.set_ip_transparent_v4(true)
                .context("IP_TRANSPARENT (needs CAP_NET_ADMIN)")?;
        } else {
            sock.set_ip_transparent_v6(true)
                .context("IPV6_TRANSPARENT (needs CAP_NET_ADMIN)")?;
        }
        sock.set_nonblocking(true)?;
        sock.bind(&addr.into())
            .with_context(|| format!("bind transparent listener {addr}"))?;
        sock.listen(1024)?;
        let tcp = TcpListener::from_std(sock.into())?;
        Ok(Listener::new(
            tcp,
            Destination::Transparent,
            state.into(),
            sink,
            deny_body,
        ))
    }

    fn new(
        tcp: TcpListener,
        dest: Destination,
        state: PolicyHandle,
        sink: AuditSink,
        deny_body: &str,
    ) -> Listener {
        let mut body = deny_body.to_string();
        if !body.ends_with("\r\n") {
            body.push_str("\r\n");
        }
        Listener {
            tcp,
            dest,
            state,
            metrics: Arc::new(crate::metrics::Metrics::new()),
            sink,
            deny_body: Bytes::from(body),
            node: audit::node_name(),
            h1: Client::builder(TokioExecutor::new()).build(MarkedConnector::default()),
            h2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(MarkedConnector::default()),
            upstream_mark: None,
            audit_headers: AuditHeaders::default(),
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Mark every upstream connection with `mark` (behind the datapath: the kernel admits
    /// marked flows as judged by the proxy).
    pub fn with_upstream_mark(mut self, mark: Option<u32>) -> Listener {
        let connector = MarkedConnector { mark };
        self.h1 = Client::builder(TokioExecutor::new()).build(connector);
        self.h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        self.upstream_mark = mark;
        self
    }

    /// Which headers audit records show (see [`AuditHeaders`]).
    pub fn with_audit_headers(mut self, headers: AuditHeaders) -> Listener {
        self.audit_headers = headers;
        self
    }

    /// Count this listener's decisions in `metrics` (shared by all listeners of a proxy).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Listener {
        self.metrics = metrics;
        self
    }

    /// The fixed destination endpoint, or `None` for a transparent listener.
    pub fn destination(&self) -> Option<&str> {
        match &self.dest {
            Destination::Fixed { name, .. } => Some(name),
            Destination::Transparent => None,
        }
    }
}

/// Accept connections forever, one task each.
pub async fn serve_listener(l: Listener) -> Result<()> {
    let l = Arc::new(l);
    loop {
        let (stream, peer) = l.tcp.accept().await?;
        let _ = stream.set_nodelay(true);
        let l = l.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_connection(l, stream, peer).await {
                tracing::debug!("connection from {peer}: {e:#}");
            }
        });
    }
}

/// What every request of one connection shares.
struct Conn {
    l: Arc<Listener>,
    /// This connection's own upstream HTTP/1 connections (no pool shared between downstream
    /// connections: no global lock, no pool key, no absolute URI per request). An HTTP/1
    /// downstream's requests are sequential, so it uses one; an HTTP/2 downstream uses as many
    /// as it has streams in flight at once, reused as they become free.
    upstream_h1: std::sync::Mutex<Vec<UpstreamH1>>,
    flow: Flow,
}

impl std::ops::Deref for Conn {
    type Target = Flow;
    fn deref(&self) -> &Flow {
        &self.flow
    }
}

impl Conn {
    fn decide(&self, request: Option<&L7Request<'_>>) -> Verdict {
        self.flow.decide(request)
    }

    fn record(
        &self,
        v: &Verdict,
        protocol: &'static str,
        http: Option<HttpFields>,
        grpc: Option<GrpcFields>,
        trace_id: Option<String>,
    ) {
        self.record_with_tls(v, protocol, http, grpc, None, trace_id)
    }

    fn record_with_tls(
        &self,
        v: &Verdict,
        protocol: &'static str,
        http: Option<HttpFields>,
        grpc: Option<GrpcFields>,
        tls: Option<TlsFields>,
        trace_id: Option<String>,
    ) {
        self.l.metrics.observe(v, protocol);
        let (source, destination) = self.audit_peers();
        let Some(mut r) = Record::of_verdict(
            v,
            protocol,
            source,
            destination,
            &self.l.node,
            self.state.revision,
        ) else {
            return;
        };
        r.http = http;
        r.grpc = grpc;
        r.tls = tls;
        r.trace_id = trace_id;
        self.l.sink.record(r);
    }
}

async fn handle_connection(
    l: Arc<Listener>,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Result<()> {
    // The policy in force when the connection starts decides all of it.
    let state = l.state.load();
    let (dest_idx, port, upstream) = match &l.dest {
        Destination::Fixed {
            name,
            policy_port,
            upstream,
        } => (state.endpoint_index(name), *policy_port, *upstream),
        Destination::Transparent => {
            let orig = stream.local_addr()?;
            (state.endpoint_by_ip(orig.ip()), orig.port(), orig)
        }
    };
    let flow = Flow::open(state, dest_idx, port, upstream, peer);
    if flow.l7_kind() == Some("kafka") {
        let kafka = crate::kafka::Shared::transparent(
            l.state.clone(),
            l.sink.clone(),
            l.metrics.clone(),
            l.upstream_mark,
            l.node.clone(),
        );
        return crate::kafka::serve_flow(kafka, flow, stream).await;
    }
    let conn = Arc::new(Conn {
        upstream_h1: std::sync::Mutex::new(Vec::new()),
        flow,
        l: l.clone(),
    });
    let has_l7 = conn.has_l7();
    if !has_l7 {
        let sni_rules = conn.egress.as_ref().is_some_and(|p| p.has_server_names())
            || conn.ingress.as_ref().is_some_and(|p| p.has_server_names());
        // L4 (or TLS server-name) decision for the whole connection, then splice.
        let mut first = Vec::new();
        let v = if sni_rules {
            let sni = read_client_hello(&mut stream, &mut first).await;
            let v = conn.decide(Some(&L7Request::Tls {
                sni: sni.as_deref(),
            }));
            let tls = Some(TlsFields { sni: sni.clone() });
            conn.record_with_tls(&v, "tls", None, None, tls, None);
            v
        } else {
            let v = conn.decide(None);
            conn.record(&v, "tcp", None, None, None);
            v
        };
        if v.decision == Decision::Deny {
            return Ok(());
        }
        let mut up = crate::upstream::connect(conn.upstream, conn.l.upstream_mark)
            .await
            .with_context(|| format!("connect {}", conn.upstream))?;
        let _ = up.set_nodelay(true);
        tokio::io::AsyncWriteExt::write_all(&mut up, &first).await?;
        tokio::io::copy_bidirectional(&mut stream, &mut up).await?;
        return Ok(());
    }
    let rejecter = conn.clone();
    let stream = crate::framing::FramingGuard::new(stream, move |e| {
        let v = Verdict::malformed(
            Direction::Ingress,
            format!("request smuggling defence: {e}"),
        );
        rejecter.record(&v, "http", None, None, None);
    });
    let svc = service_fn(move |req| {
        let conn = conn.clone();
        async move {
            let started = std::time::Instant::now();
            let resp = handle_request(conn.clone(), req).await;
            conn.l.metrics.observe_duration("http", started.elapsed());
            Ok::<_, Infallible>(resp)
        }
    });
    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Read the start of a TLS connection until its ClientHello is complete (bounded in size and
/// time) and return its server name. Everything read is kept in `buf` to be replayed upstream.
/// A connection that is not TLS, or whose hello is malformed or late, has no server name —
/// so no `serverNames` rule can allow it (fail closed).
async fn read_client_hello(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    use tollgate_parsers::tls::{MAX_HELLO, TlsError, parse_client_hello};
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut chunk = [0u8; 4096];
    loop {
        match parse_client_hello(buf) {
            Ok(h) => return h.sni,
            Err(TlsError::Incomplete) if buf.len() <= MAX_HELLO + 5 * 8 => {}
            Err(_) => return None,
        }
        let read =
            tokio::time::timeout_at(deadline, tokio::io::AsyncReadExt::read(stream, &mut chunk));
        match read.await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// Which request headers an audit record shows. A header in `logged` appears with its value; a
/// header in `redacted` appears as `"[redacted]"` (so a reader sees it was sent, never what it
/// held); every other header is left out. Names are lowercase.
#[derive(Debug, Clone)]
pub struct AuditHeaders {
    pub logged: Vec<String>,
    pub redacted: Vec<String>,
}

impl Default for AuditHeaders {
    fn default() -> Self {
        AuditHeaders {
            logged: ["user-agent", "content-type", "x-request-id", "traceparent"]
                .map(String::from)
                .to_vec(),
            redacted: [
                "authorization",
                "proxy-authorization",
                "cookie",
                "x-api-key",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl AuditHeaders {
    /// The defaults plus `log` (values shown) and `redact` (presence only; wins over `log`).
    pub fn with(log: &[String], redact: &[String]) -> AuditHeaders {
        let mut h = AuditHeaders::default();
        let lower = |v: &[String]| v.iter().map(|s| s.to_ascii_lowercase()).collect::<Vec<_>>();
        h.logged.extend(lower(log));
        h.redacted.extend(lower(redact));
        let redacted = h.redacted.clone();
        h.logged.retain(|n| !redacted.contains(n));
        h
    }

    fn fields(&self, headers: &HeaderMap) -> serde_json::Map<String, serde_json::Value> {
        headers
            .iter()
            .filter_map(|(k, v)| {
                let name = k.as_str();
                if self.redacted.iter().any(|r| r == name) {
                    Some((name.to_string(), "[redacted]".into()))
                } else if self.logged.iter().any(|l| l == name) {
                    Some((name.to_string(), v.to_str().ok()?.into()))
                } else {
                    None
                }
            })
            .collect()
    }
}

fn trace_id(headers: &HeaderMap) -> Option<String> {
    let tp = headers.get("traceparent")?.to_str().ok()?;
    let id = tp.split('-').nth(1)?;
    (id.len() == 32).then(|| id.to_string())
}

async fn handle_request(conn: Arc<Conn>, req: Request<Incoming>) -> Response<Body> {
    let is_grpc = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let version = format!("{:?}", req.version());
    let http_fields = |path: &str| HttpFields {
        method: req.method().to_string(),
        host: host.clone(),
        path: path.to_string(),
        version: version.clone(),
        headers: conn.l.audit_headers.fields(req.headers()),
    };
    let trace = trace_id(req.headers());
    // CONNECT has no path: it is judged on method CONNECT and host = the requested authority.
    let connect = req.method() == http::Method::CONNECT;
    let norm = if connect {
        None
    } else {
        match normalize(&target, Options::default()) {
            Ok(n) => Some(n),
            Err(e) => {
                let v = Verdict::malformed(Direction::Ingress, format!("path `{target}`: {e}"));
                conn.record(&v, "http", Some(http_fields(&target)), None, trace);
                return text_reply(
                    StatusCode::BAD_REQUEST,
                    Bytes::from_static(b"Bad request\r\n"),
                );
            }
        }
    };
    let policy_path = norm.as_ref().map(|n| n.as_str()).unwrap_or("");
    // What is sent upstream: the normalised path, or the CONNECT authority.
    let forward_target = if connect { host.as_str() } else { policy_path };
    let grpc_call = if is_grpc {
        // A path that is not `/Service/Method` leaves the request a plain HTTP one, where gRPC
        // rules never match.
        tollgate_parsers::grpc::parse_path(norm.as_ref().map(|n| n.path()).unwrap_or(""))
            .ok()
            .map(|g| (g.service, g.method))
    } else {
        None
    };
    let verdict = {
        let hdrs: Vec<(&str, &str)> = req
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
            .collect();
        let l7 = L7Request::Http {
            request: HttpRequest {
                method: req.method().as_str(),
                path: policy_path,
                host: &host,
                headers: &hdrs,
            },
            grpc: grpc_call.map(|(service, method)| GrpcCall { service, method }),
        };
        conn.decide(Some(&l7))
    };
    let protocol = if is_grpc { "grpc" } else { "http" };
    if verdict.decision == Decision::Allow && verdict.log.is_none() {
        // Allowed by a rule without `log`: counted, not recorded.
        conn.l.metrics.observe(&verdict, protocol);
    } else {
        let grpc = grpc_call.map(|(s, m)| GrpcFields {
            service: s.to_string(),
            method: m.to_string(),
        });
        conn.record(
            &verdict,
            protocol,
            Some(http_fields(forward_target)),
            grpc,
            trace,
        );
    }
    if verdict.decision == Decision::Deny {
        return if is_grpc {
            grpc_permission_denied(&conn.l.deny_body)
        } else {
            text_reply(StatusCode::FORBIDDEN, conn.l.deny_body.clone())
        };
    }
    let mut req = req;
    apply_header_edits(req.headers_mut(), &verdict.header_edits);
    let forward_target = forward_target.to_string();
    forward(&conn, req, &forward_target, is_grpc).await
}

/// Cilium's `headerMatches` mismatch actions (§7.3), decided by the evaluator.
fn apply_header_edits(headers: &mut HeaderMap, edits: &[tollgate_policy::l7::HeaderEdit]) {
    use tollgate_policy::l7::HeaderEditAction;
    for e in edits {
        let Ok(name) = http::HeaderName::from_bytes(e.name.as_bytes()) else {
            continue;
        };
        match &e.action {
            HeaderEditAction::Log => tracing::info!("header `{}` did not match policy", e.name),
            HeaderEditAction::Delete => {
                headers.remove(&name);
            }
            HeaderEditAction::Add(v) => {
                if let Ok(v) = HeaderValue::from_str(v) {
                    headers.append(name, v);
                }
            }
            HeaderEditAction::Replace(v) => {
                if let Ok(v) = HeaderValue::from_str(v) {
                    headers.insert(name, v);
                }
            }
        }
    }
}

fn text_reply(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// A trailers-only gRPC response: HTTP 200, `grpc-status: 7` (PERMISSION_DENIED).
fn grpc_permission_denied(body: &Bytes) -> Response<Body> {
    let msg: String = String::from_utf8_lossy(body)
        .trim_end()
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b' ' || b == b'-' || b == b'.' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from_static("7"));
    if let Ok(v) = HeaderValue::from_str(&msg) {
        h.insert("grpc-message", v);
    }
    resp
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// Forward upstream: gRPC over HTTP/2 (prior knowledge), everything else over HTTP/1.1
/// (an HTTP/2 client is downgraded, as Envoy does by default).
async fn forward(
    conn: &Conn,
    mut req: Request<Incoming>,
    path: &str,
    grpc: bool,
) -> Response<Body> {
    let l = &conn.l;
    // An allowed `Upgrade` (WebSocket…) keeps its Upgrade/Connection headers and, when the
    // origin answers 101, both sides are spliced.
    // CONNECT likewise: a 2xx from upstream turns both connections into a tunnel.
    let connect = req.method() == http::Method::CONNECT;
    let upgrade = connect
        || (req.version() == Version::HTTP_11 && req.headers().contains_key(http::header::UPGRADE));
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    for h in HOP_BY_HOP {
        if upgrade && (*h == "upgrade" || *h == "connection") {
            continue;
        }
        parts.headers.remove(*h);
    }
    // HTTP/2 CONNECT keeps the shared client (an authority-form request, tunnelled after it).
    let h2_connect = connect && parts.version == Version::HTTP_2;
    let dedicated = !grpc && !h2_connect;
    let target = if dedicated {
        path.to_string()
    } else {
        format!("http://{}{path}", conn.upstream)
    };
    let Ok(uri) = target.parse::<Uri>() else {
        return text_reply(
            StatusCode::BAD_REQUEST,
            Bytes::from_static(b"Bad request\r\n"),
        );
    };
    if dedicated && !parts.headers.contains_key(http::header::HOST) {
        // An HTTP/2 request names its host in `:authority`; HTTP/1.1 needs a Host header.
        let host = match parts.uri.authority() {
            Some(a) => HeaderValue::from_str(a.as_str()).ok(),
            None => HeaderValue::from_str(&conn.upstream.to_string()).ok(),
        };
        if let Some(h) = host {
            parts.headers.insert(http::header::HOST, h);
        }
    }
    parts.uri = uri;
    let result = if dedicated {
        let sequential = parts.version != Version::HTTP_2;
        parts.version = Version::HTTP_11;
        send_dedicated(conn, Request::from_parts(parts, body), sequential).await
    } else {
        let client = if grpc {
            parts.version = Version::HTTP_2;
            &l.h2
        } else {
            parts.version = Version::HTTP_11;
            &l.h1
        };
        client
            .request(Request::from_parts(parts, body))
            .await
            .map_err(|e| anyhow::anyhow!(e))
    };
    match result {
        Ok(mut resp) => {
            if let Some(down) = downstream_upgrade
                && (resp.status() == StatusCode::SWITCHING_PROTOCOLS
                    || (connect && resp.status().is_success()))
            {
                let up = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    if let (Ok(down), Ok(up)) = (down.await, up.await) {
                        let mut down = TokioIo::new(down);
                        let mut up = TokioIo::new(up);
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
            resp.map(|b| b.boxed())
        }
        Err(e) => {
            tracing::debug!("upstream {}: {e:#}", conn.upstream);
            text_reply(
                StatusCode::BAD_GATEWAY,
                Bytes::from_static(b"Upstream unavailable\r\n"),
            )
        }
    }
}

type UpstreamH1 = hyper::client::conn::http1::SendRequest<Incoming>;

/// Idle upstream connections a downstream connection keeps (more are opened when more of its
/// streams are in flight, and closed after their request).
const MAX_IDLE_UPSTREAM_PER_CONNECTION: usize = 16;

/// Send on one of the connection's own upstream HTTP/1 connections: a free one (its last
/// response complete), else a new one. A `sequential` (HTTP/1) downstream waits for its one
/// upstream connection instead: its previous response has been sent, and the upstream
/// connection's task may just not have marked itself free yet — opening another connection
/// then cost a connect per request (found by bench/http/run.sh: h1 0.71× HAProxy).
async fn send_dedicated(
    conn: &Conn,
    req: Request<Incoming>,
    sequential: bool,
) -> Result<Response<Incoming>> {
    let free = {
        let mut idle = conn
            .upstream_h1
            .lock()
            .map_err(|_| anyhow::anyhow!("upstream connections poisoned"))?;
        idle.retain(|s| !s.is_closed());
        match idle.iter().position(|s| s.is_ready()) {
            Some(i) => Some(idle.swap_remove(i)),
            None if sequential => idle.pop(),
            None => None,
        }
    };
    let mut sender = match free {
        Some(s) => s,
        None => {
            let stream = crate::upstream::connect(conn.upstream, conn.l.upstream_mark).await?;
            let _ = stream.set_nodelay(true);
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = connection.with_upgrades().await;
            });
            sender
        }
    };
    sender.ready().await?;
    let response = sender.send_request(req);
    // Back among the idle ones at once: it becomes free when this response has been read,
    // and is skipped until then.
    if let Ok(mut idle) = conn.upstream_h1.lock()
        && idle.len() < MAX_IDLE_UPSTREAM_PER_CONNECTION
    {
        idle.push(sender);
    }
    Ok(response.await?)
}
