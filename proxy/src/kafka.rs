//! Kafka L7 enforcement: per-request verdicts on a Kafka connection, denials answered the way
//! a broker with ACLs answers them, and the rewrites a proxy in the middle must make.
//!
//! Each connection runs two halves. The request half reads frames from the client
//! ([`tollgate_parsers::kafka`]), judges each request (key, version, client id, topics,
//! consumer groups, transactional ids) against the source's egress and the destination's
//! ingress, forwards what is allowed as the client sent it (no re-encoding) and queues, in
//! request order, either "a broker response comes for this one" or the locally built denial.
//! The response half walks that queue, so a denial never overtakes the responses to earlier
//! requests: Kafka clients pipeline and match responses by order as well as correlation id.
//! Broker responses are streamed through unbuffered, except the few the proxy must rewrite:
//! `ApiVersions` (each API capped to what tollgate decodes, so a conforming client never sends
//! a request the proxy cannot judge) and, for fixed listeners, the broker addresses in
//! Metadata / FindCoordinator / DescribeCluster (each broker reached through a listener of
//! ours; a broker no listener serves yet gets one on the fly, as kafka-proxy does).
//!
//! What is refused is never lost: every denial is an audit record with the API, version,
//! client id, topics, groups and transactional ids, and the error code sent. A request that
//! cannot be judged (malformed, an unknown API key, a version tollgate never advertised, an
//! API whose denial has no response tollgate can build) ends the connection, as a broker does
//! with a request it cannot serve, and is recorded too.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tollgate_parsers::kafka::{self as kp, KafkaError, PolicyFields, Request, RequestHeader};
use tollgate_policy::eval::{Decision, L7Request, Verdict};
use tollgate_policy::l7::KafkaRequest;
use tollgate_policy::model::Direction;

use crate::audit::{AuditSink, KafkaFields, Record};
use crate::flow::Flow;
use crate::metrics::Metrics;
use crate::state::PolicyHandle;

/// Requests queued per connection before the request half waits for responses.
const PIPELINE: usize = 1024;

/// What the listeners of one proxy share.
#[derive(Debug)]
pub struct Shared {
    state: PolicyHandle,
    sink: AuditSink,
    metrics: Arc<Metrics>,
    node: String,
    upstream_mark: Option<u32>,
    max_frame: usize,
    /// Fixed listeners only: which broker is reached through which listener.
    fixed: Option<Fixed>,
}

#[derive(Debug)]
struct Fixed {
    dest: String,
    policy_port: u16,
    listen_ip: IpAddr,
    routes: Mutex<HashMap<(String, i32), SocketAddr>>,
}

impl Shared {
    /// For flows the datapath redirects: the client already addresses the real brokers.
    /// `node` is the listener's node name (read once at start-up, not per connection).
    pub fn transparent(
        state: PolicyHandle,
        sink: AuditSink,
        metrics: Arc<Metrics>,
        upstream_mark: Option<u32>,
        node: String,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            state,
            sink,
            metrics,
            node,
            upstream_mark,
            max_frame: kp::DEFAULT_MAX_FRAME,
            fixed: None,
        })
    }

    /// The address clients should use for a broker advertised as `host:port`: the listener
    /// that reaches it, started now if there is none yet. `None` leaves the address as is.
    fn route(self: &Arc<Self>, host: &str, port: i32) -> Option<(String, i32)> {
        let fixed = self.fixed.as_ref()?;
        let key = (host.to_string(), port);
        let mut routes = fixed.routes.lock().ok()?;
        if let Some(addr) = routes.get(&key) {
            return Some((addr.ip().to_string(), i32::from(addr.port())));
        }
        let upstream = (host, u16::try_from(port).ok()?)
            .to_socket_addrs()
            .ok()?
            .next()?;
        let std = std::net::TcpListener::bind((fixed.listen_ip, 0)).ok()?;
        std.set_nonblocking(true).ok()?;
        let tcp = TcpListener::from_std(std).ok()?;
        let addr = tcp.local_addr().ok()?;
        routes.insert(key, addr);
        eprintln!(
            "tollgate proxy: Kafka {addr} -> {}@{upstream} (broker {host}:{port} learned from the cluster)",
            fixed.dest
        );
        let l = KafkaListener {
            tcp,
            upstream,
            shared: self.clone(),
        };
        tokio::spawn(l.serve());
        Some((addr.ip().to_string(), i32::from(addr.port())))
    }
}

/// A fixed Kafka listener: clients bootstrap here and reach the broker `upstream`, the
/// inventory endpoint `dest`.
#[derive(Debug)]
pub struct KafkaListener {
    tcp: TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
}

impl KafkaListener {
    /// `dest` is `ENDPOINT` or `ENDPOINT:PORT` (the port rules name; default the broker's).
    pub async fn bind(
        addr: SocketAddr,
        dest: &str,
        upstream: SocketAddr,
        state: impl Into<PolicyHandle>,
        sink: AuditSink,
        metrics: Arc<Metrics>,
    ) -> Result<KafkaListener> {
        let state = state.into();
        let (name, policy_port) = crate::state::split_destination(dest, upstream.port())?;
        if state.load().endpoint_index(name).is_none() {
            bail!("destination `{name}` is not in the endpoints inventory");
        }
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr}"))?;
        let local = tcp.local_addr()?;
        let routes = HashMap::from([(
            (upstream.ip().to_string(), i32::from(upstream.port())),
            local,
        )]);
        let shared = Arc::new(Shared {
            state,
            sink,
            metrics,
            node: crate::audit::node_name(),
            upstream_mark: None,
            max_frame: kp::DEFAULT_MAX_FRAME,
            fixed: Some(Fixed {
                dest: name.to_string(),
                policy_port,
                listen_ip: local.ip(),
                routes: Mutex::new(routes),
            }),
        });
        Ok(KafkaListener {
            tcp,
            upstream,
            shared,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Accept connections forever, one task each.
    pub async fn serve(self) -> Result<()> {
        loop {
            let (stream, peer) = self.tcp.accept().await?;
            let shared = self.shared.clone();
            let upstream = self.upstream;
            tokio::spawn(async move {
                let Some(fixed) = &shared.fixed else { return };
                let state = shared.state.load();
                let dest = state.endpoint_index(&fixed.dest);
                let flow = Flow::open(state, dest, fixed.policy_port, upstream, peer);
                if let Err(e) = serve_flow(shared.clone(), flow, stream).await {
                    tracing::debug!("kafka connection from {peer}: {e:#}");
                }
            });
        }
    }
}

/// What the response half does next, in request order.
#[derive(Debug)]
enum Pending {
    /// The broker answers this request; pass its response on (rewritten if need be).
    Broker {
        api_key: i16,
        api_version: i16,
        correlation_id: i32,
        rewrite: Rewrite,
        /// When the request arrived (its round trip is the `kafka` latency metric).
        started: std::time::Instant,
    },
    /// The proxy answers it (a denial, or the KIP-511 answer).
    Local(Vec<u8>),
    /// End the connection once everything before has been answered.
    Close,
}

#[derive(Debug)]
enum Rewrite {
    None,
    /// Cap versions; for a judged connection also leave out the keys this client's policy
    /// never allows and whose denial has no answer (`client_id` is the request's).
    ApiVersions {
        client_id: Option<String>,
    },
    /// Map broker addresses to our listeners (fixed mode).
    Brokers,
    /// The request went on without its denied topics: answer those in the response.
    Merge(Box<kp::Split>),
    /// A Metadata request for all topics: hide the topics the client may not see, and record
    /// them under `verdict` (the whole request's denial).
    Filter {
        header: RequestHeader,
        verdict: Box<Verdict>,
    },
}

/// Serve one Kafka connection whose flow is `flow`.
pub(crate) async fn serve_flow(shared: Arc<Shared>, flow: Flow, client: TcpStream) -> Result<()> {
    let flow = Arc::new(flow);
    let _ = client.set_nodelay(true);
    let judged = flow.has_l7();
    if !judged {
        // No Kafka rules here: one L3/L4 verdict for the connection.
        let v = flow.decide(None);
        record(&shared, &flow, &v, None);
        if v.decision == Decision::Deny {
            return Ok(());
        }
    }
    let broker = crate::upstream::connect(flow.upstream, shared.upstream_mark)
        .await
        .with_context(|| format!("connect {}", flow.upstream))?;
    let _ = broker.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (broker_r, broker_w) = broker.into_split();
    let (tx, rx) = mpsc::channel(PIPELINE);
    let mut down = tokio::spawn(responses(
        shared.clone(),
        flow.clone(),
        judged,
        rx,
        broker_r,
        client_w,
    ));
    let mut conn = Requests {
        shared: &shared,
        flow: &flow,
        judged,
        fetch_session: None,
    };
    tokio::select! {
        r = conn.run(client_r, broker_w, tx) => {
            // The client is done (or was refused): deliver what is owed, then close.
            let d = down.await.context("response half")?;
            r.and(d)
        }
        d = &mut down => d.context("response half")?,
    }
}

struct Requests<'a> {
    shared: &'a Arc<Shared>,
    flow: &'a Arc<Flow>,
    /// Kafka rules apply: every request is judged.
    judged: bool,
    /// The topics of this connection's fetch session (KIP-227), once a full fetch opened it:
    /// incremental fetches name only what changed, and are judged on the whole session.
    fetch_session: Option<HashSet<String>>,
}

/// What one request frame leads to.
enum Step {
    Forward(Option<Pending>),
    /// Forward this frame instead of the client's (the request without its denied topics).
    ForwardEdited(Vec<u8>, Option<Pending>),
    Answer(Pending),
    Nothing,
    Close,
}

impl Requests<'_> {
    async fn run(
        &mut self,
        mut client: OwnedReadHalf,
        broker: OwnedWriteHalf,
        tx: mpsc::Sender<Pending>,
    ) -> Result<()> {
        let mut broker = BufWriter::with_capacity(64 * 1024, broker);
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            loop {
                let len = match kp::frame_len(&buf, self.shared.max_frame) {
                    Ok(Some(n)) => n,
                    Ok(None) => break,
                    Err(e) => {
                        self.refuse_unparsed(&e.to_string());
                        send(&tx, &mut broker, Pending::Close).await?;
                        return Ok(());
                    }
                };
                let frame = buf.split_to(len).freeze();
                match self.step(&frame) {
                    Step::Forward(pending) => {
                        if let Some(p) = pending {
                            send(&tx, &mut broker, p).await?;
                        }
                        broker.write_all(&frame).await?;
                    }
                    Step::ForwardEdited(edited, pending) => {
                        if let Some(p) = pending {
                            send(&tx, &mut broker, p).await?;
                        }
                        broker.write_all(&edited).await?;
                    }
                    Step::Answer(p) => send(&tx, &mut broker, p).await?,
                    Step::Nothing => {}
                    Step::Close => {
                        send(&tx, &mut broker, Pending::Close).await?;
                        broker.flush().await?;
                        return Ok(());
                    }
                }
            }
            broker.flush().await?;
            // Room for the rest of a frame whose size is known, or for the next read.
            let want = match kp::frame_len(&buf, self.shared.max_frame) {
                Ok(None) if buf.len() >= 4 => {
                    i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize + 4
                }
                _ => 0,
            };
            buf.reserve(want.saturating_sub(buf.len()).max(16 * 1024));
            if client.read_buf(&mut buf).await? == 0 {
                broker.shutdown().await.ok();
                return Ok(());
            }
        }
    }

    fn step(&mut self, frame: &Bytes) -> Step {
        let body = frame.slice(4..);
        let mut req = match kp::decode_request(body) {
            Ok(r) => r,
            Err(e) => return self.undecodable(frame, e),
        };
        let fields = req.policy_fields();
        let rewrite = match req.header.api_key {
            18 => Rewrite::ApiVersions {
                client_id: req.header.client_id.clone(),
            },
            k if self.shared.fixed.is_some() && kp::carries_brokers(k) => Rewrite::Brokers,
            _ => Rewrite::None,
        };
        let (api_key, api_version, correlation_id) = (
            req.header.api_key,
            req.header.api_version,
            req.header.correlation_id,
        );
        let expects_response = fields.expects_response;
        let started = std::time::Instant::now();
        let pending_with = |rewrite| {
            expects_response.then_some(Pending::Broker {
                api_key,
                api_version,
                correlation_id,
                rewrite,
                started,
            })
        };
        if !self.judged {
            return Step::Forward(pending_with(rewrite));
        }
        // A fetch session continued on a connection that did not open it cannot be judged
        // (the session's topics are unknown): the client is told to start a new one.
        let session_topics = match (req.fetch_session(), &self.fetch_session) {
            (Some((_, epoch)), None) if epoch > 0 => {
                self.shared.metrics.event("kafka", "fetch_session_reset");
                return match kp::deny_response(&req, kp::FETCH_SESSION_ID_NOT_FOUND) {
                    Ok(Some(b)) => Step::Answer(Pending::Local(b)),
                    _ => Step::Close,
                };
            }
            (Some((_, epoch)), Some(open)) if epoch > 0 => {
                let forgotten = req.fetch_forgotten();
                let mut all: HashSet<String> = open
                    .iter()
                    .filter(|t| !forgotten.contains(t))
                    .cloned()
                    .collect();
                all.extend(fields.topics.iter().cloned());
                Some(all)
            }
            (Some(_), _) => Some(fields.topics.iter().cloned().collect()),
            (None, _) => None,
        };
        let mut judged_fields = fields.clone();
        if let Some(all) = &session_topics {
            judged_fields.topics = all.iter().cloned().collect();
            judged_fields.topics.sort();
        }
        let v = self.judge(&req.header, &judged_fields);
        if v.decision == Decision::Deny {
            // A broker with ACLs answers Produce and Metadata per topic: forward what is
            // allowed, answer the rest (cnp-semantics §8.3 judges the whole request; see
            // docs/policy-model.md for why tollgate answers per topic here).
            let all_topics = req.header.api_key == 3
                && (fields.topics.is_empty() || req.header.api_version == 0);
            if all_topics {
                let filter = Rewrite::Filter {
                    header: req.header.clone(),
                    verdict: Box::new(v),
                };
                return Step::Forward(pending_with(filter));
            }
            let header = req.header.clone();
            let mut allowed = |t: &str| {
                let one = PolicyFields {
                    topics: vec![t.to_string()],
                    ..judged_fields.clone()
                };
                self.judge(&header, &one).decision != Decision::Deny
            };
            if let Some(split) = req.split_topics(&mut allowed) {
                let denied = split.topics();
                match req.encode_frame() {
                    Ok(edited) => {
                        let part = PolicyFields {
                            topics: denied,
                            ..fields.clone()
                        };
                        let v = with_detail(v, "the request's other topics were forwarded");
                        self.record_request(&v, &req, &part, Some(kp::TOPIC_AUTHORIZATION_FAILED));
                        let rewrite = Rewrite::Merge(Box::new(split));
                        return Step::ForwardEdited(edited, pending_with(rewrite));
                    }
                    Err(e) => {
                        let v = with_detail(v, format!("{e}: connection closed"));
                        self.record_request(&v, &req, &fields, None);
                        return Step::Close;
                    }
                }
            }
            let error = req.deny_error(!v.denied_topics.is_empty());
            return match kp::deny_response(&req, error) {
                Ok(Some(b)) => {
                    self.record_request(&v, &req, &fields, Some(error));
                    Step::Answer(Pending::Local(b))
                }
                Ok(None) if !fields.expects_response => {
                    self.record_request(&v, &req, &fields, None);
                    Step::Nothing
                }
                Ok(None) => {
                    let v = with_detail(
                        v,
                        "no error response of this API is built: connection closed",
                    );
                    self.record_request(&v, &req, &fields, None);
                    Step::Close
                }
                Err(e) => {
                    let v = with_detail(v, format!("{e}: connection closed"));
                    self.record_request(&v, &req, &fields, None);
                    Step::Close
                }
            };
        }
        if session_topics.is_some() {
            self.fetch_session = session_topics;
        }
        self.record_request(&v, &req, &fields, None);
        Step::Forward(pending_with(rewrite))
    }

    /// One verdict for the request: every consumer group and transactional id it names is
    /// judged (with all its topics), and the strictest outcome wins.
    fn judge(&self, header: &RequestHeader, f: &PolicyFields) -> Verdict {
        judge(
            self.flow,
            header.api_key,
            header.api_version,
            header.client_id.as_deref(),
            f,
        )
    }
}

/// One verdict for a request: every consumer group and transactional id it names is judged
/// (with all its topics), and the strictest outcome wins.
fn judge(
    flow: &Flow,
    api_key: i16,
    api_version: i16,
    client_id: Option<&str>,
    f: &PolicyFields,
) -> Verdict {
    let topics: Vec<&str> = f.topics.iter().map(String::as_str).collect();
    let groups: Vec<Option<&str>> = if f.groups.is_empty() {
        vec![None]
    } else {
        f.groups.iter().map(|g| Some(g.as_str())).collect()
    };
    let txns: Vec<Option<&str>> = if f.transactional_ids.is_empty() {
        vec![None]
    } else {
        f.transactional_ids
            .iter()
            .map(|t| Some(t.as_str()))
            .collect()
    };
    let mut worst: Option<Verdict> = None;
    for g in &groups {
        for t in &txns {
            let kreq = KafkaRequest {
                api_key,
                api_version,
                client_id,
                topics: &topics,
                group_id: *g,
                transactional_id: *t,
            };
            let v = flow.decide(Some(&L7Request::Kafka(kreq)));
            let rank = |d: Decision| match d {
                Decision::Deny => 2,
                Decision::AuditDeny => 1,
                Decision::Allow => 0,
            };
            if worst
                .as_ref()
                .is_none_or(|w| rank(v.decision) > rank(w.decision))
            {
                worst = Some(v);
            }
        }
    }
    worst.unwrap_or_else(|| flow.decide(None))
}

impl Requests<'_> {
    /// A frame that did not decode.
    fn undecodable(&self, frame: &Bytes, e: KafkaError) -> Step {
        let header = kp::parse_request_header(&frame[4..]).ok();
        // KIP-511: a client may open with an ApiVersions newer than we know; answer in v0.
        if let (KafkaError::UnsupportedVersion { .. }, Some(h)) = (&e, &header)
            && let Some(answer) = kp::unsupported_version_response(h)
        {
            self.shared
                .metrics
                .event("kafka", "api_versions_unsupported_version");
            return Step::Answer(Pending::Local(answer));
        }
        let v = Verdict::malformed(Direction::Ingress, format!("{e}: connection closed"));
        match header {
            Some(h) => {
                let fields = PolicyFields::default();
                let req = Request {
                    header: h,
                    body: kp::Body::Other,
                };
                self.record_request(&v, &req, &fields, None);
            }
            None => record(self.shared, self.flow, &v, None),
        }
        Step::Close
    }

    fn refuse_unparsed(&self, why: &str) {
        let v = Verdict::malformed(Direction::Ingress, format!("{why}: connection closed"));
        record(self.shared, self.flow, &v, None);
    }

    fn record_request(&self, v: &Verdict, req: &Request, f: &PolicyFields, error: Option<i16>) {
        let fields = kafka_fields(
            &req.header,
            f.topics.clone(),
            f.groups.clone(),
            f.transactional_ids.clone(),
            error,
        );
        record(self.shared, self.flow, v, Some(fields));
    }
}

fn kafka_fields(
    h: &RequestHeader,
    topics: Vec<String>,
    groups: Vec<String>,
    transactional_ids: Vec<String>,
    error_code: Option<i16>,
) -> KafkaFields {
    KafkaFields {
        api_key: h.api_name().unwrap_or("unknown").to_string(),
        api_key_id: h.api_key,
        api_version: h.api_version,
        correlation_id: h.correlation_id,
        client_id: h.client_id.clone(),
        topics,
        groups,
        transactional_ids,
        error_code,
    }
}

/// The versions of `key` advertised to a client: all of `min..=max`, except on a judged
/// connection for a key whose denial tollgate cannot answer — there only the versions this
/// client's policy allows (rules can name no topic or group of such keys, so the header alone
/// decides), and the key is left out when none is.
fn offer_versions(
    flow: &Flow,
    judged: bool,
    client_id: Option<&str>,
    key: i16,
    min: i16,
    max: i16,
) -> Option<(i16, i16)> {
    if !judged || kp::has_deny_response(key) {
        return Some((min, max));
    }
    let none = PolicyFields::default();
    let allowed: Vec<i16> = (min..=max)
        .filter(|&v| judge(flow, key, v, client_id, &none).decision != Decision::Deny)
        .collect();
    Some((*allowed.first()?, *allowed.last()?))
}

fn with_detail(mut v: Verdict, detail: impl Into<String>) -> Verdict {
    v.detail = Some(detail.into());
    v
}

/// Count the decision and write its audit record (if it gets one).
fn record(shared: &Shared, flow: &Flow, v: &Verdict, kafka: Option<KafkaFields>) {
    let protocol = if kafka.is_some() { "kafka" } else { "tcp" };
    shared.metrics.observe(v, protocol);
    let (source, destination) = flow.audit_peers();
    if let Some(mut r) = Record::of_verdict(
        v,
        protocol,
        source,
        destination,
        &shared.node,
        flow.state.revision,
    ) {
        r.kafka = kafka;
        shared.sink.record(r);
    }
}

/// Queue `p` for the response half; when the queue is full, flush the requests written so
/// far first (the responses the response half waits for may be to them).
async fn send(
    tx: &mpsc::Sender<Pending>,
    broker: &mut BufWriter<OwnedWriteHalf>,
    p: Pending,
) -> Result<()> {
    match tx.try_send(p) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(p)) => {
            broker.flush().await?;
            tx.send(p).await.context("response half ended")
        }
        Err(mpsc::error::TrySendError::Closed(_)) => bail!("response half ended"),
    }
}

/// The response half: answers in request order, broker responses streamed through or
/// rewritten, local answers in their place.
async fn responses(
    shared: Arc<Shared>,
    flow: Arc<Flow>,
    judged: bool,
    mut rx: mpsc::Receiver<Pending>,
    broker: OwnedReadHalf,
    client: OwnedWriteHalf,
) -> Result<()> {
    let mut broker = BufReader::with_capacity(64 * 1024, broker);
    let mut client = BufWriter::with_capacity(64 * 1024, client);
    loop {
        let p = match rx.try_recv() {
            Ok(p) => p,
            Err(mpsc::error::TryRecvError::Empty) => {
                client.flush().await?;
                match rx.recv().await {
                    Some(p) => p,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        match p {
            Pending::Local(bytes) => client.write_all(&bytes).await?,
            Pending::Close => break,
            Pending::Broker {
                api_key,
                api_version,
                correlation_id,
                rewrite,
                started,
            } => {
                if broker.buffer().is_empty() {
                    // The next response is not here yet: hand the client what it has.
                    client.flush().await?;
                }
                let mut head = [0u8; 8];
                broker.read_exact(&mut head).await?;
                let size = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                if size < 4 || size as usize > shared.max_frame {
                    bail!("broker sent a response frame of {size} bytes");
                }
                let cid = i32::from_be_bytes([head[4], head[5], head[6], head[7]]);
                if cid != correlation_id {
                    bail!("broker answered correlation id {cid}, expected {correlation_id}");
                }
                let rest = size as u64 - 4;
                if matches!(rewrite, Rewrite::None) {
                    client.write_all(&head).await?;
                    let copied =
                        tokio::io::copy_buf(&mut (&mut broker).take(rest), &mut client).await?;
                    if copied != rest {
                        bail!("broker closed inside a response");
                    }
                    shared.metrics.observe_duration("kafka", started.elapsed());
                    continue;
                }
                let mut body = vec![0u8; size as usize];
                body[..4].copy_from_slice(&head[4..]);
                broker.read_exact(&mut body[4..]).await?;
                let body = Bytes::from(body);
                let mut map = |_node: i32, host: &str, port: i32| shared.route(host, port);
                let brokers: Option<&mut dyn kp::BrokerMap> = match shared.fixed {
                    Some(_) => Some(&mut map),
                    None => None,
                };
                let out = match rewrite {
                    Rewrite::ApiVersions { client_id } => {
                        let mut offer = |key: i16, min: i16, max: i16| {
                            offer_versions(&flow, judged, client_id.as_deref(), key, min, max)
                        };
                        kp::cap_api_versions(api_version, body, &mut offer)
                    }
                    Rewrite::Merge(split) => kp::merge_denied(
                        &split,
                        api_version,
                        body,
                        kp::TOPIC_AUTHORIZATION_FAILED,
                        brokers,
                    ),
                    Rewrite::Filter { header, verdict } => {
                        let mut visible = |t: &str| {
                            let one = PolicyFields {
                                topics: vec![t.to_string()],
                                expects_response: true,
                                ..PolicyFields::default()
                            };
                            let v = judge(&flow, 3, api_version, header.client_id.as_deref(), &one);
                            v.decision != Decision::Deny
                        };
                        kp::filter_metadata(api_version, body, &mut visible, brokers).map(
                            |(frame, hidden)| {
                                if !hidden.is_empty() {
                                    let v = with_detail(
                                        *verdict,
                                        "hidden from the answer to a Metadata request for all topics",
                                    );
                                    let fields = kafka_fields(&header, hidden, Vec::new(), Vec::new(), None);
                                    record(&shared, &flow, &v, Some(fields));
                                }
                                frame
                            },
                        )
                    }
                    Rewrite::Brokers | Rewrite::None => {
                        kp::rewrite_brokers(api_key, api_version, body, &mut map)
                    }
                };
                shared.metrics.observe_duration("kafka", started.elapsed());
                match out {
                    Ok(frame) => client.write_all(&frame).await?,
                    // Passing it on unchanged would let the client reach the broker around
                    // the proxy (or use versions the proxy cannot judge): fail closed.
                    Err(e) => {
                        shared.metrics.event("kafka", "response_rewrite_failed");
                        bail!("broker response not rewritten, connection closed: {e}");
                    }
                }
            }
        }
    }
    client.flush().await?;
    client.shutdown().await.ok();
    Ok(())
}
