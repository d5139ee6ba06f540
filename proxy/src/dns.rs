//! DNS policy: UDP and TCP listeners that judge every query's name against the source's
//! `rules.dns` (`matchName` / `matchPattern`), answer denied queries themselves (`REFUSED`, or
//! `NXDOMAIN` when configured) and forward the rest, learning the answers' IPs into the FQDN
//! cache before the answer is released.
//!
//! What Cilium's DNS proxy is criticised for, and what this does instead
//! (reference/user-needs.md §2–§3):
//! * one upstream socket per query → a fixed set of connected UDP sockets and persistent,
//!   pipelined TCP connections to the upstream; queries are multiplexed by a random message ID
//!   the proxy assigns (the client's ID is restored on the way back), so there is no per-query
//!   socket churn and no source-port exhaustion;
//! * silence on upstream timeouts → `SERVFAIL` after `--dns-upstream-timeout`;
//! * large answers timing out → answers bigger than the client's EDNS buffer (512 without
//!   EDNS) come back truncated (TC bit), the client retries over TCP, and TCP goes upstream over
//!   TCP;
//! * an agent restart taking DNS down → the proxy decides alone from the last policy it has;
//! * answers held for the agent stalling all DNS → only an answer that teaches IPs the agent
//!   does not have yet waits (`--agent` mode, `fqdn_link.rs`), in a task of its own and at most
//!   `--fqdn-max-hold-ms`; every other answer goes out as soon as it arrives.
//!
//! Nothing is dropped silently: malformed queries get `FORMERR`, load beyond
//! `--dns-max-in-flight` gets `SERVFAIL`, and each of these, timeouts and upstream errors are
//! counted in `tollgate_proxy_events_total{protocol="dns"}`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tollgate_parsers::dns::{self, Query, rcode, rtype};
use tollgate_policy::check::combine;
use tollgate_policy::eval::{Decision, L7Request, PortPolicy, Verdict};
use tollgate_policy::model::{Direction, Protocol};
use tollgate_policy::peer::Remote;

use crate::audit::{self, AuditSink, DnsFields, Record};
use crate::fqdn::Release;
use crate::metrics::Metrics;
use crate::sockets;
use crate::state::{PolicyHandle, PolicyState};
use crate::udp_batch::{RecvBatch, SendBatch};

const PROTOCOL: &str = "dns";
/// A client TCP connection idle this long is closed.
const CLIENT_TCP_IDLE: Duration = Duration::from_secs(30);
/// Queries in flight per upstream socket or connection at most (IDs are 16 bits).
const MAX_PENDING_PER_UPSTREAM: usize = 60_000;
/// How often UDP queries are checked for upstream timeouts (the SERVFAIL comes at most this
/// late).
const SWEEP_EVERY: Duration = Duration::from_millis(50);
/// Clients whose endpoint and port policies a listener remembers.
const MAX_CACHED_SOURCES: usize = 65_536;

/// [`DnsOptions::fqdn_max_hold`] unless configured: Cilium's
/// `--tofqdns-proxy-response-max-delay`. Long enough for the agent's usual work on a learned IP
/// (a recompile and a few map writes: milliseconds), short against resolver timeouts (1–5 s):
/// a slow agent costs a first connection, never the lookup.
pub const DEFAULT_FQDN_MAX_HOLD: Duration = Duration::from_millis(100);

/// Tunables of the DNS listeners.
#[derive(Debug, Clone)]
pub struct DnsOptions {
    /// The rcode of a denied query: `REFUSED` (default) or `NXDOMAIN`.
    pub deny_rcode: u8,
    pub upstream_timeout: Duration,
    pub upstream_udp_sockets: usize,
    pub upstream_tcp_connections: usize,
    /// Queries being answered at once, per listener; beyond it queries get `SERVFAIL`.
    pub max_in_flight: usize,
    /// Mark of the upstream sockets ([`crate::upstream`]).
    pub upstream_mark: Option<u32>,
    /// Longest an answer that teaches new IPs waits for the agent to have them in the kernel
    /// (`--agent` mode; see `fqdn_link.rs`).
    pub fqdn_max_hold: Duration,
    /// UDP receive loops of a fixed listener: that many sockets share its address
    /// (`SO_REUSEPORT`; the kernel spreads clients over them by address and port), each with a
    /// loop of its own, so one listener can use as many cores as the runtime has. One loop
    /// runs at most one core: at ~5 µs of CPU per query (mostly the kernel's), ~200k qps.
    pub udp_receive_loops: usize,
}

/// [`DnsOptions::udp_receive_loops`] unless configured: one per core this process may run
/// on (what the runtime's worker count is), at most 16.
pub fn default_udp_receive_loops() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(16))
}

impl Default for DnsOptions {
    fn default() -> Self {
        DnsOptions {
            deny_rcode: rcode::REFUSED,
            upstream_timeout: Duration::from_secs(5),
            upstream_udp_sockets: 4,
            upstream_tcp_connections: 2,
            max_in_flight: 10_000,
            upstream_mark: None,
            fqdn_max_hold: DEFAULT_FQDN_MAX_HOLD,
            udp_receive_loops: default_udp_receive_loops(),
        }
    }
}

/// `refused` | `nxdomain`.
pub fn parse_deny_rcode(s: &str) -> Result<u8> {
    match s.to_ascii_lowercase().as_str() {
        "refused" => Ok(rcode::REFUSED),
        "nxdomain" | "nameerror" => Ok(rcode::NXDOMAIN),
        _ => anyhow::bail!("--dns-deny-rcode `{s}`: expected `refused` or `nxdomain`"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn protocol(self) -> Protocol {
        match self {
            Transport::Udp => Protocol::Udp,
            Transport::Tcp => Protocol::Tcp,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Who the destination is, as policy sees it.
#[derive(Debug)]
enum Target {
    /// A managed endpoint, by name (fixed mode).
    Endpoint(String),
    /// The world (fixed mode, `world@ADDR`).
    World,
    /// Whoever owns the upstream address (transparent mode: the original destination).
    Owner,
}

/// Where queries go: `upstream`; `policy_port` is the port rules name.
#[derive(Debug)]
struct Destination {
    target: Target,
    policy_port: u16,
    upstream: SocketAddr,
}

/// One destination's view of one version of the policy; rebuilt when the policy is swapped,
/// so a query is judged entirely by one version.
#[derive(Debug)]
struct View {
    state: Arc<PolicyState>,
    dst_idx: Option<usize>,
    /// The destination endpoint's ingress port policies (UDP, TCP).
    ingress: [Option<Arc<PortPolicy>>; 2],
    sources: Mutex<foldhash::HashMap<IpAddr, Arc<Source>>>,
}

impl View {
    fn new(state: Arc<PolicyState>, dest: &Destination) -> View {
        let dst_idx = match &dest.target {
            Target::Endpoint(name) => state.endpoint_index(name),
            Target::World => None,
            Target::Owner => state.endpoint_by_ip(dest.upstream.ip()),
        };
        let ingress = [Transport::Udp, Transport::Tcp].map(|t| {
            dst_idx.map(|i| {
                state.port_policy_for(i, Direction::Ingress, dest.policy_port, t.protocol())
            })
        });
        View {
            state,
            dst_idx,
            ingress,
            sources: Mutex::new(foldhash::HashMap::default()),
        }
    }
}

#[derive(Debug)]
enum UpstreamError {
    Timeout,
    Busy,
    Closed,
    Io(std::io::Error),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Timeout => write!(f, "upstream timed out"),
            UpstreamError::Busy => write!(f, "all upstream message IDs in use"),
            UpstreamError::Closed => write!(f, "upstream connection closed"),
            UpstreamError::Io(e) => write!(f, "upstream: {e}"),
        }
    }
}

/// Queries waiting for their answer on one upstream socket or connection, by the ID the proxy
/// gave them. The token tells a query's own entry from a later one that reuses its ID.
#[derive(Debug)]
struct Pending<T> {
    /// foldhash, not SipHash: looked up twice per query; the IDs are ours and random.
    waiting: foldhash::HashMap<u16, (u64, T)>,
    rng: u64,
    next_token: u64,
}

impl<T> Pending<T> {
    fn new(seed: u64) -> Pending<T> {
        Pending {
            waiting: foldhash::HashMap::default(),
            rng: seed | 1,
            next_token: 0,
        }
    }

    /// A fresh random ID (xorshift64*): predictable IDs would make the upstream leg easy to
    /// spoof. `Err` gives the value back when every ID is taken.
    fn register(&mut self, value: T) -> Result<(u16, u64), Box<T>> {
        if self.waiting.len() >= MAX_PENDING_PER_UPSTREAM {
            return Err(Box::new(value));
        }
        let id = loop {
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            let id = (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 48) as u16;
            if !self.waiting.contains_key(&id) {
                break id;
            }
        };
        self.next_token += 1;
        self.waiting.insert(id, (self.next_token, value));
        Ok((id, self.next_token))
    }

    /// The entry waiting for `msg`'s ID.
    fn take(&mut self, msg: &[u8]) -> Option<T> {
        let id = dns::message_id(msg)?;
        self.waiting.remove(&id).map(|(_, v)| v)
    }
}

type Waiters = Pending<oneshot::Sender<Vec<u8>>>;

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    static SALT: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    t ^ SALT.fetch_add(0x6a09_e667_f3bc_c909, Ordering::Relaxed) ^ u64::from(std::process::id())
}

/// Removes a query's entry when its waiter goes away (timeout, cancellation), unless the ID
/// already serves a newer query.
struct PendingGuard<'a> {
    pending: &'a Mutex<Waiters>,
    id: u16,
    token: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock()
            && p.waiting
                .get(&self.id)
                .is_some_and(|(t, _)| *t == self.token)
        {
            p.waiting.remove(&self.id);
        }
    }
}

/// Hands an answer to whoever waits for its ID; `false` when nobody does (late or stray).
fn deliver(pending: &Mutex<Waiters>, msg: &[u8]) -> bool {
    let waiter = pending.lock().ok().and_then(|mut p| p.take(msg));
    match waiter {
        Some(tx) => tx.send(msg.to_vec()).is_ok(),
        None => false,
    }
}

/// Registers a query, sends it with `send`, waits for the answer, restores the client's ID.
async fn exchange_on<F, Fut>(
    pending: &Mutex<Waiters>,
    msg: &[u8],
    timeout: Duration,
    send: F,
) -> Result<Vec<u8>, UpstreamError>
where
    F: FnOnce(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<(), UpstreamError>>,
{
    let (tx, rx) = oneshot::channel();
    let (id, token) = pending
        .lock()
        .ok()
        .and_then(|mut p| p.register(tx).ok())
        .ok_or(UpstreamError::Busy)?;
    let _guard = PendingGuard { pending, id, token };
    let client_id = dns::message_id(msg).unwrap_or(0);
    let mut out = msg.to_vec();
    dns::set_message_id(&mut out, id);
    send(out).await?;
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(mut answer)) => {
            dns::set_message_id(&mut answer, client_id);
            Ok(answer)
        }
        Ok(Err(_)) => Err(UpstreamError::Closed),
        Err(_) => Err(UpstreamError::Timeout),
    }
}

/// A UDP query forwarded upstream and not answered yet. The UDP path spawns no task and
/// allocates no channel per query: the receive loop registers the query here and sends it; the
/// upstream socket's reader finishes it and replies to the client; a sweeper answers the ones
/// that time out.
#[derive(Debug)]
struct InFlight {
    client: SocketAddr,
    started: Instant,
    query: Vec<u8>,
    q: Query,
    deadline: Instant,
    /// Set when the decision must be audited (audit mode would deny): audited with the
    /// rcode the client finally gets.
    audit: Option<Box<AuditLater>>,
}

/// What becomes of one UDP query.
enum UdpStep {
    /// Answered here (denied, malformed, shed).
    Reply(Vec<u8>),
    /// Registered on the batch's upstream socket under `id`: the query goes out with that ID.
    Upstream { id: u16 },
    /// Dropped (not even a DNS header).
    Nothing,
}

/// A parsed query and the decision on it.
struct Judged {
    q: Query,
    view: Arc<View>,
    src: Arc<Source>,
    dst: Remote,
    v: Verdict,
}

/// What the queries of one receive share: the policy view, the clock reading, and the last
/// client's port policies (a busy client sends many queries per `recvmmsg`). Taken once per
/// batch instead of once per query: the view and the source cache each cost a lock.
struct Turn {
    view: Arc<View>,
    now: Instant,
    last_source: Option<(IpAddr, Arc<Source>)>,
    /// The upstream socket this batch's queries go out on: one `sendmmsg` for all of them
    /// (the sockets take turns from batch to batch).
    slot: usize,
}

impl Turn {
    fn new(ctx: &Ctx) -> Turn {
        Turn {
            view: ctx.view(),
            now: Instant::now(),
            last_source: None,
            slot: ctx.next_slot.fetch_add(1, Ordering::Relaxed) % ctx.udp_up.len(),
        }
    }
}

/// What an audit record written when a forwarded query completes needs from its decision.
#[derive(Debug)]
struct AuditLater {
    v: Verdict,
    src: Remote,
    dst: Remote,
    state: Arc<PolicyState>,
}

/// One connected UDP socket to the upstream and its queries in flight.
#[derive(Debug)]
struct UdpSlot {
    sock: UdpSocket,
    pending: Mutex<Pending<InFlight>>,
}

async fn udp_slots(upstream: SocketAddr, n: usize, mark: Option<u32>) -> Result<Vec<UdpSlot>> {
    let mut slots = Vec::new();
    for _ in 0..n.max(1) {
        let sock = crate::upstream::udp_socket(upstream, mark)?;
        sock.connect(upstream)
            .await
            .with_context(|| format!("connect UDP upstream {upstream}"))?;
        sockets::grow_receive_buffer(&sock, sockets::DNS_RCVBUF);
        slots.push(UdpSlot {
            sock,
            pending: Mutex::new(Pending::new(seed())),
        });
    }
    Ok(slots)
}

/// Answers arriving on upstream socket `slot`: finish the query and reply to its client.
async fn udp_upstream_reader(ctx: Arc<Ctx>, slot: usize) {
    let sock = &ctx.udp_up[slot].sock;
    // Every answer that is queued is taken in one `recvmmsg`, and their replies leave in one
    // `sendmmsg`.
    let mut rb = RecvBatch::new();
    let mut replies = SendBatch::default();
    loop {
        let n = match sock
            .async_io(tokio::io::Interest::READABLE, || rb.recv(sock))
            .await
        {
            Ok(n) => n,
            // ICMP errors (upstream down) surface here on a connected socket; the queries
            // concerned time out and are answered SERVFAIL by the sweeper.
            Err(_) => {
                ctx.metrics.event(PROTOCOL, "upstream_udp_error");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let now = Instant::now();
        for i in 0..n {
            let answer = rb.get_mut(i);
            let entry = ctx.udp_up[slot]
                .pending
                .lock()
                .ok()
                .and_then(|mut p| p.take(answer));
            let Some(e) = entry else {
                ctx.metrics.event(PROTOCOL, "upstream_late_or_stray_answer");
                continue;
            };
            let (own, release) = ctx.finish(&e.query, &e.q, answer, Transport::Udp, now);
            let reply = own.as_deref().unwrap_or(answer);
            match release {
                Release::Now => ctx.udp_done_later(e, reply, now, &mut replies),
                // It taught IPs the agent does not have yet: it waits in a task of its own,
                // the other answers of this batch and the next ones go on.
                Release::Hold(ticket) => {
                    let ctx = ctx.clone();
                    let reply = reply.to_vec();
                    tokio::spawn(async move {
                        ticket
                            .wait(ctx.opts.fqdn_max_hold, &e.q.question.name)
                            .await;
                        ctx.udp_done(e, reply).await;
                    });
                }
            }
        }
        ctx.flush_replies(&ctx.udp, &mut replies).await;
    }
}

/// Answers SERVFAIL to the UDP queries whose upstream did not answer in time, and counts
/// what the kernel dropped on this destination's sockets (full receive queues).
async fn udp_sweeper(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    let mut drops_seen = [0u64; 2];
    let mut ticks = 0u64;
    loop {
        tick.tick().await;
        ticks += 1;
        if ticks.is_multiple_of(20) {
            let client_side = sockets::kernel_drops(&*ctx.udp).unwrap_or(0);
            let upstream_side: u64 = ctx
                .udp_up
                .iter()
                .filter_map(|s| sockets::kernel_drops(&s.sock))
                .sum();
            for (i, (now, event)) in [
                (client_side, "kernel_drops_client_socket"),
                (upstream_side, "kernel_drops_upstream_sockets"),
            ]
            .into_iter()
            .enumerate()
            {
                if now > drops_seen[i] {
                    ctx.metrics.events_n(PROTOCOL, event, now - drops_seen[i]);
                    drops_seen[i] = now;
                }
            }
        }
        let now = Instant::now();
        for slot in &ctx.udp_up {
            let expired: Vec<InFlight> = match slot.pending.lock() {
                Ok(mut p) => p
                    .waiting
                    .extract_if(|_, (_, e)| e.deadline <= now)
                    .map(|(_, (_, e))| e)
                    .collect(),
                Err(_) => continue,
            };
            for e in expired {
                ctx.metrics.event(PROTOCOL, "upstream_timeout");
                let reply = dns::reply_with_rcode(&e.query, &e.q, rcode::SERVFAIL);
                ctx.udp_done(e, reply).await;
            }
        }
    }
}

/// One persistent, pipelined TCP connection to the upstream.
#[derive(Debug)]
struct TcpConn {
    tx: mpsc::Sender<Vec<u8>>,
    pending: Arc<Mutex<Waiters>>,
    alive: Arc<AtomicBool>,
}

#[derive(Debug)]
struct TcpUpstream {
    upstream: SocketAddr,
    slots: Vec<tokio::sync::Mutex<Option<Arc<TcpConn>>>>,
    next: AtomicUsize,
    metrics: Arc<Metrics>,
    mark: Option<u32>,
}

impl TcpUpstream {
    fn new(
        upstream: SocketAddr,
        n: usize,
        metrics: Arc<Metrics>,
        mark: Option<u32>,
    ) -> TcpUpstream {
        TcpUpstream {
            upstream,
            mark,
            slots: (0..n.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            metrics,
        }
    }

    async fn conn(&self, slot: usize, timeout: Duration) -> Result<Arc<TcpConn>, UpstreamError> {
        let mut g = self.slots[slot].lock().await;
        if let Some(c) = g.as_ref()
            && c.alive.load(Ordering::Acquire)
        {
            return Ok(c.clone());
        }
        let stream =
            tokio::time::timeout(timeout, crate::upstream::connect(self.upstream, self.mark))
                .await
                .map_err(|_| UpstreamError::Timeout)?
                .map_err(UpstreamError::Io)?;
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::channel(1024);
        let pending = Arc::new(Mutex::new(Pending::new(seed())));
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(tcp_writer(wr, rx, alive.clone()));
        tokio::spawn(tcp_reader(
            rd,
            pending.clone(),
            alive.clone(),
            self.metrics.clone(),
        ));
        let c = Arc::new(TcpConn { tx, pending, alive });
        *g = Some(c.clone());
        Ok(c)
    }

    /// Sends on a pooled connection; a query caught by the connection closing (upstreams
    /// close idle connections) is retried once on a fresh one.
    async fn exchange(&self, msg: &[u8], timeout: Duration) -> Result<Vec<u8>, UpstreamError> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let deadline = Instant::now() + timeout;
        let mut attempt = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let c = self.conn(slot, left).await?;
            let tx = c.tx.clone();
            let r = exchange_on(&c.pending, msg, left, |out| async move {
                tx.send(out).await.map_err(|_| UpstreamError::Closed)
            })
            .await;
            match r {
                Err(UpstreamError::Closed) if attempt == 0 => attempt += 1,
                r => return r,
            }
        }
    }
}

async fn tcp_writer(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Vec<u8>>,
    alive: Arc<AtomicBool>,
) {
    while let Some(msg) = rx.recv().await {
        let Ok(len) = u16::try_from(msg.len()) else {
            continue;
        };
        let mut frame = Vec::with_capacity(msg.len() + 2);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&msg);
        if wr.write_all(&frame).await.is_err() {
            break;
        }
    }
    alive.store(false, Ordering::Release);
}

async fn tcp_reader(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    pending: Arc<Mutex<Waiters>>,
    alive: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) {
    let mut buf = vec![0u8; 65_535];
    while let Ok(len) = rd.read_u16().await {
        let len = usize::from(len);
        if rd.read_exact(&mut buf[..len]).await.is_err() {
            break;
        }
        if !deliver(&pending, &buf[..len]) {
            metrics.event(PROTOCOL, "upstream_late_or_stray_answer");
        }
    }
    alive.store(false, Ordering::Release);
    // Wake every waiter: their queries are retried once or answered SERVFAIL.
    if let Ok(mut p) = pending.lock() {
        p.waiting.clear();
    }
}

/// A client as a listener sees it: its endpoint (if managed), how policy sees it, and its
/// egress port policies for UDP and TCP. Cached per IP so that a query costs no label copies
/// and no shared-cache lock.
#[derive(Debug)]
struct Source {
    remote: Remote,
    egress: [Option<Arc<PortPolicy>>; 2],
}

/// What every destination of a listener shares.
#[derive(Debug, Clone)]
struct Shared {
    state: PolicyHandle,
    sink: AuditSink,
    metrics: Arc<Metrics>,
    node: String,
    opts: DnsOptions,
}

/// What every query to one destination shares: the destination's policy, the upstream
/// sockets and connections, and the socket replies are sent from.
#[derive(Debug)]
struct Ctx {
    policy: PolicyHandle,
    view: Mutex<Arc<View>>,
    sink: AuditSink,
    metrics: Arc<Metrics>,
    node: String,
    dest: Destination,
    opts: DnsOptions,
    /// Replies leave from here: the listener itself (fixed mode), or a transparent socket
    /// bound to the original destination, so the client hears back from the address it asked.
    udp: Arc<UdpSocket>,
    udp_up: Vec<UdpSlot>,
    next_slot: AtomicUsize,
    tcp_up: TcpUpstream,
    tcp_in_flight: Arc<Semaphore>,
}

impl Ctx {
    /// Opens the upstream sockets for `dest` and starts their readers and the timeout sweeper
    /// (which live as long as the process).
    async fn create(shared: &Shared, dest: Destination, reply: Arc<UdpSocket>) -> Result<Arc<Ctx>> {
        let Shared {
            state,
            sink,
            metrics,
            node,
            opts,
        } = shared.clone();
        let udp_up =
            udp_slots(dest.upstream, opts.upstream_udp_sockets, opts.upstream_mark).await?;
        sockets::grow_receive_buffer(&*reply, sockets::DNS_RCVBUF);
        let tcp_up = TcpUpstream::new(
            dest.upstream,
            opts.upstream_tcp_connections,
            metrics.clone(),
            opts.upstream_mark,
        );
        let view = Mutex::new(Arc::new(View::new(state.load(), &dest)));
        let ctx = Arc::new(Ctx {
            policy: state,
            view,
            sink,
            metrics,
            node,
            dest,
            tcp_in_flight: Arc::new(Semaphore::new(opts.max_in_flight.max(1))),
            opts,
            udp: reply,
            udp_up,
            next_slot: AtomicUsize::new(0),
            tcp_up,
        });
        for slot in 0..ctx.udp_up.len() {
            tokio::spawn(udp_upstream_reader(ctx.clone(), slot));
        }
        tokio::spawn(udp_sweeper(ctx.clone()));
        Ok(ctx)
    }
}

/// Original destinations a transparent listener serves at most (each has its own upstream
/// sockets); queries to further ones are answered `SERVFAIL` and counted.
const MAX_TRANSPARENT_DESTINATIONS: usize = 256;

#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per listener, never moved on the request path"
)]
enum Mode {
    Fixed(Arc<Ctx>),
    /// Flows the datapath assigned to this listener: per original destination a [`Ctx`],
    /// made on first use.
    Transparent {
        udp: UdpSocket,
        shared: Shared,
        ctxs: tokio::sync::Mutex<HashMap<SocketAddr, Arc<Ctx>>>,
    },
}

/// A DNS listener: one UDP socket and one TCP listener on the same address.
#[derive(Debug)]
pub struct DnsListener {
    tcp: TcpListener,
    local: SocketAddr,
    mode: Mode,
    /// Fixed mode: the UDP sockets bound to `local`, one receive loop each (the first is the
    /// one replies of forwarded queries leave from).
    udp: Vec<Arc<UdpSocket>>,
}

impl DnsListener {
    /// A fixed listener. `dest` is `ENDPOINT[:PORT]` (an endpoint of the inventory, e.g. the
    /// cluster resolver) or `world[:PORT]`; PORT is what rules name (default 53).
    pub async fn bind(
        addr: SocketAddr,
        dest: &str,
        upstream: SocketAddr,
        state: impl Into<PolicyHandle>,
        sink: AuditSink,
        metrics: Arc<Metrics>,
        opts: DnsOptions,
    ) -> Result<DnsListener> {
        let (name, policy_port) = crate::state::split_destination(dest, 53)?;
        let state: PolicyHandle = state.into();
        let target = if name == "world" {
            Target::World
        } else {
            state.load().endpoint_index(name).with_context(|| {
                format!("DNS destination `{name}` is not in the endpoints inventory (or `world`)")
            })?;
            Target::Endpoint(name.to_string())
        };
        let (udp, tcp) = bind_pair(addr, opts.udp_receive_loops).await?;
        let local = udp[0].local_addr()?;
        let shared = Shared {
            state,
            sink,
            metrics,
            node: audit::node_name(),
            opts,
        };
        let dest = Destination {
            target,
            policy_port,
            upstream,
        };
        let ctx = Ctx::create(&shared, dest, udp[0].clone()).await?;
        for extra in &udp[1..] {
            sockets::grow_receive_buffer(&**extra, sockets::DNS_RCVBUF);
        }
        Ok(DnsListener {
            tcp,
            local,
            mode: Mode::Fixed(ctx),
            udp,
        })
    }

    /// A transparent listener (UDP and TCP, `IP_TRANSPARENT`) for the DNS flows the datapath
    /// redirects to `addr`: each query goes to its original destination, the destination
    /// endpoint is whoever owns that address, and rules name its port. Needs CAP_NET_ADMIN.
    pub async fn bind_transparent(
        addr: SocketAddr,
        state: impl Into<PolicyHandle>,
        sink: AuditSink,
        metrics: Arc<Metrics>,
        opts: DnsOptions,
    ) -> Result<DnsListener> {
        let udp = sockets::transparent(addr, socket2::Type::DGRAM, true)
            .with_context(|| format!("transparent DNS UDP {addr} (needs CAP_NET_ADMIN)"))?;
        let tcp = sockets::transparent(addr, socket2::Type::STREAM, false)
            .with_context(|| format!("transparent DNS TCP {addr} (needs CAP_NET_ADMIN)"))?;
        tcp.listen(1024)?;
        let udp = UdpSocket::from_std(udp.into())?;
        sockets::grow_receive_buffer(&udp, sockets::DNS_RCVBUF);
        let tcp = TcpListener::from_std(tcp.into())?;
        Ok(DnsListener {
            tcp,
            local: udp.local_addr()?,
            udp: Vec::new(),
            mode: Mode::Transparent {
                udp,
                shared: Shared {
                    state: state.into(),
                    sink,
                    metrics,
                    node: audit::node_name(),
                    opts,
                },
                ctxs: tokio::sync::Mutex::new(HashMap::new()),
            },
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }

    /// How many UDP sockets (each with its receive loop) serve the listener's address.
    pub fn udp_receive_loops(&self) -> usize {
        self.udp.len().max(1)
    }

    /// Serve UDP and TCP until the process stops.
    pub async fn serve(self) -> Result<()> {
        let this = Arc::new(self);
        let tcp_side = this.clone();
        let tcp_task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = tcp_side.tcp.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let ctx = match &tcp_side.mode {
                    Mode::Fixed(ctx) => Some(ctx.clone()),
                    Mode::Transparent { .. } => match stream.local_addr() {
                        Ok(orig) => tcp_side.ctx_for(orig).await,
                        Err(_) => None,
                    },
                };
                if let Some(ctx) = ctx {
                    tokio::spawn(serve_tcp_client(ctx, stream, peer));
                }
            }
        });
        let r = match &this.mode {
            Mode::Fixed(ctx) => {
                let mut loops = tokio::task::JoinSet::new();
                for sock in &this.udp {
                    loops.spawn(serve_udp(ctx.clone(), sock.clone()));
                }
                // A loop only ends on an error: the first one ends the listener (dropping the
                // set stops the others).
                match loops.join_next().await {
                    Some(Ok(r)) => r,
                    Some(Err(e)) => Err(anyhow::anyhow!("DNS receive loop: {e}")),
                    None => Ok(()),
                }
            }
            Mode::Transparent { udp, .. } => this.serve_transparent_udp(udp).await,
        };
        tcp_task.abort();
        r
    }

    /// The context of original destination `orig` (transparent mode), made on first use.
    async fn ctx_for(&self, orig: SocketAddr) -> Option<Arc<Ctx>> {
        let Mode::Transparent { shared, ctxs, .. } = &self.mode else {
            return None;
        };
        let mut map = ctxs.lock().await;
        if let Some(c) = map.get(&orig) {
            return Some(c.clone());
        }
        if map.len() >= MAX_TRANSPARENT_DESTINATIONS {
            shared.metrics.event(PROTOCOL, "too_many_destinations");
            return None;
        }
        let made = async {
            let reply = sockets::transparent(orig, socket2::Type::DGRAM, false)?;
            let reply = Arc::new(UdpSocket::from_std(reply.into())?);
            let dest = Destination {
                target: Target::Owner,
                policy_port: orig.port(),
                upstream: orig,
            };
            Ctx::create(shared, dest, reply).await
        }
        .await;
        match made {
            Ok(c) => {
                map.insert(orig, c.clone());
                Some(c)
            }
            Err(e) => {
                shared.metrics.event(PROTOCOL, "destination_setup_error");
                tracing::warn!("DNS to {orig}: {e:#}");
                None
            }
        }
    }

    /// The transparent UDP receive loop, batched like [`serve_udp`]: one `recvmmsg` takes what
    /// is queued, each datagram goes to the context of its original destination, and each
    /// destination's forwarded queries and replies leave in one `sendmmsg` each.
    async fn serve_transparent_udp(&self, udp: &UdpSocket) -> Result<()> {
        let Mode::Transparent { shared, .. } = &self.mode else {
            return Ok(());
        };
        let mut rb = RecvBatch::new();
        // Per destination seen by this loop: its context and outbox (the contexts live as long
        // as the listener, so this only saves the shared map's lock per datagram).
        let mut dests: HashMap<SocketAddr, (Arc<Ctx>, Outbox)> = HashMap::new();
        let (mut received, mut drops_seen) = (0u64, 0u64);
        loop {
            let n = receive_queries(udp, &mut rb, &shared.metrics).await;
            let before = received;
            received += n as u64;
            if before / 4096 != received / 4096
                && let Some(now) = sockets::kernel_drops(udp)
                && now > drops_seen
            {
                shared
                    .metrics
                    .events_n(PROTOCOL, "kernel_drops_client_socket", now - drops_seen);
                drops_seen = now;
            }
            // This batch's destinations, in the order first seen, each with its turn.
            let mut turns: Vec<(SocketAddr, Turn)> = Vec::new();
            for i in 0..n {
                let (msg, peer) = rb.get(i);
                let (Some(peer), Some(orig)) = (peer, rb.orig_dst(i)) else {
                    shared.metrics.event(PROTOCOL, "udp_receive_error");
                    continue;
                };
                let (ctx, out) = match dests.entry(orig) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        match self.ctx_for(orig).await {
                            Some(ctx) => e.insert((ctx, Outbox::default())),
                            None => {
                                if let Ok(q) = dns::parse_query(msg) {
                                    let reply = dns::reply_with_rcode(msg, &q, rcode::SERVFAIL);
                                    let _ = udp.try_send_to(&reply, peer);
                                }
                                continue;
                            }
                        }
                    }
                };
                let turn = match turns.iter().position(|(o, _)| *o == orig) {
                    Some(t) => &mut turns[t].1,
                    None => {
                        turns.push((orig, Turn::new(ctx)));
                        &mut turns.last_mut().expect("just pushed").1
                    }
                };
                ctx.take_query(turn, out, msg, peer);
            }
            for (orig, turn) in &turns {
                if let Some((ctx, out)) = dests.get_mut(orig) {
                    let ctx = ctx.clone();
                    ctx.send_out(turn, out, &ctx.udp).await;
                }
            }
        }
    }
}

/// Binds `udp_sockets` UDP sockets (sharing the address with `SO_REUSEPORT` when more than
/// one) and a TCP listener on the same address; with port 0 the kernel picks the UDP port and
/// TCP takes the same one (retried when that port is busy for TCP).
async fn bind_pair(
    addr: SocketAddr,
    udp_sockets: usize,
) -> Result<(Vec<Arc<UdpSocket>>, TcpListener)> {
    let n = udp_sockets.max(1);
    for _ in 0..20 {
        let first = bind_udp(addr, n > 1).with_context(|| format!("bind DNS UDP {addr}"))?;
        let mut bound = addr;
        bound.set_port(first.local_addr()?.port());
        let mut udp = vec![Arc::new(first)];
        for _ in 1..n {
            let more = bind_udp(bound, true)
                .with_context(|| format!("bind DNS UDP {bound} (SO_REUSEPORT)"))?;
            udp.push(Arc::new(more));
        }
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() != 0 => {
                return Err(e).with_context(|| format!("bind DNS TCP {bound}"));
            }
            Err(_) => continue,
        }
    }
    anyhow::bail!("no port free for both UDP and TCP on {addr}")
}

/// A non-blocking UDP socket bound to `addr`, with `SO_REUSEPORT` when it shares it.
fn bind_udp(addr: SocketAddr, reuse_port: bool) -> std::io::Result<UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

/// The UDP receive loop: each query is judged and answered (denied) or sent upstream
/// (allowed) right here; answers come back through [`udp_upstream_reader`].
///
/// Under load one `recvmmsg` takes every queued query (up to [`crate::udp_batch::BATCH`]); the
/// forwarded ones leave in one `sendmmsg` on the batch's upstream socket and the immediate
/// replies in one `sendmmsg`, so the system calls per query fall from four to a fraction when
/// busy (an idle listener still answers each query as it comes: a receive never waits for a
/// batch).
async fn serve_udp(ctx: Arc<Ctx>, udp: Arc<UdpSocket>) -> Result<()> {
    let mut rb = RecvBatch::new();
    let mut out = Outbox::default();
    let udp = &*udp;
    loop {
        let n = receive_queries(udp, &mut rb, &ctx.metrics).await;
        let mut turn = Turn::new(&ctx);
        for i in 0..n {
            let (msg, peer) = rb.get(i);
            let Some(peer) = peer else {
                ctx.metrics.event(PROTOCOL, "udp_receive_error");
                continue;
            };
            ctx.take_query(&mut turn, &mut out, msg, peer);
        }
        ctx.send_out(&turn, &mut out, udp).await;
    }
}

/// Waits for the next batch of queries on a listener's socket: how many arrived (at least
/// one). A failed receive is counted and the wait goes on.
async fn receive_queries(udp: &UdpSocket, rb: &mut RecvBatch, metrics: &Metrics) -> usize {
    loop {
        match udp
            .async_io(tokio::io::Interest::READABLE, || rb.recv(udp))
            .await
        {
            Ok(n) => return n,
            Err(_) => metrics.event(PROTOCOL, "udp_receive_error"),
        }
    }
}

/// What one receive makes a destination send: the forwarded queries (all on the batch's
/// upstream socket) and the immediate replies. Kept from batch to batch: the buffers stay.
#[derive(Debug, Default)]
struct Outbox {
    upstream: SendBatch,
    replies: SendBatch,
}

/// One client TCP connection: queries are read as they come and answered concurrently, each
/// answer written when ready (RFC 7766 §6.2.1.1 allows out-of-order answers).
async fn serve_tcp_client(ctx: Arc<Ctx>, stream: TcpStream, peer: SocketAddr) {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let Ok(len) = u16::try_from(msg.len()) else {
                continue;
            };
            let mut frame = Vec::with_capacity(msg.len() + 2);
            frame.extend_from_slice(&len.to_be_bytes());
            frame.extend_from_slice(&msg);
            if wr.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    loop {
        let len = match tokio::time::timeout(CLIENT_TCP_IDLE, rd.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            _ => break,
        };
        let mut msg = vec![0u8; len];
        if rd.read_exact(&mut msg).await.is_err() {
            break;
        }
        let Ok(permit) = ctx.tcp_in_flight.clone().try_acquire_owned() else {
            ctx.metrics.event(PROTOCOL, "shed");
            if let Ok(q) = dns::parse_query(&msg) {
                let _ = tx
                    .send(dns::reply_with_rcode(&msg, &q, rcode::SERVFAIL))
                    .await;
            }
            continue;
        };
        let ctx = ctx.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            if let Some(reply) = ctx.tcp_answer(msg, peer).await {
                ctx.metrics.observe_duration(PROTOCOL, started.elapsed());
                let _ = tx.send(reply).await;
            }
            drop(permit);
        });
    }
    drop(tx);
    let _ = writer.await;
}

impl Ctx {
    /// The view of the policy in force (rebuilt once after each swap).
    fn view(&self) -> Arc<View> {
        let current = self.policy.load();
        let Ok(mut v) = self.view.lock() else {
            return Arc::new(View::new(current, &self.dest));
        };
        if !Arc::ptr_eq(&v.state, &current) {
            *v = Arc::new(View::new(current, &self.dest));
        }
        v.clone()
    }

    /// The client at `ip`, and whether it may be remembered (an endpoint; see below).
    fn source(&self, view: &View, ip: IpAddr) -> (Arc<Source>, bool) {
        if let Some(s) = view.sources.lock().ok().and_then(|c| c.get(&ip).cloned()) {
            return (s, true);
        }
        let state = &view.state;
        let idx = state.endpoint_by_ip(ip);
        let port = self.dest.policy_port;
        let s = Arc::new(Source {
            remote: state.remote(ip),
            egress: [Transport::Udp, Transport::Tcp].map(|t| {
                idx.map(|i| state.port_policy_for(i, Direction::Egress, port, t.protocol()))
            }),
        });
        // World clients are not cached: the names their IP was learned under change.
        if idx.is_some()
            && let Ok(mut c) = view.sources.lock()
        {
            if c.len() >= MAX_CACHED_SOURCES {
                c.clear();
            }
            c.insert(ip, s.clone());
        }
        (s, idx.is_some())
    }

    fn destination(&self, view: &View) -> Remote {
        match view.dst_idx {
            Some(i) => Remote::endpoint(view.state.endpoint(i)),
            None => view.state.remote(self.dest.upstream.ip()),
        }
    }

    /// The combined verdict of the source's egress and the destination's ingress.
    fn decide(
        &self,
        view: &View,
        src: &Source,
        dst: &Remote,
        transport: Transport,
        qname: &str,
    ) -> Verdict {
        let request = L7Request::Dns { qname };
        let t = transport as usize;
        let egress = src.egress[t]
            .as_ref()
            .map(|pp| pp.evaluate(dst, Some(&request)));
        let ingress = view.ingress[t]
            .as_ref()
            .map(|pp| pp.evaluate(&src.remote, Some(&request)));
        let v = combine(egress.as_ref(), ingress.as_ref());
        self.metrics.observe(&v, PROTOCOL);
        v
    }

    /// Parse and judge one query; `Err` carries the reply to a malformed one (FORMERR, or
    /// nothing when there is not even a header).
    fn judge(
        &self,
        turn: &mut Turn,
        msg: &[u8],
        peer: SocketAddr,
        transport: Transport,
    ) -> Result<Judged, Option<Vec<u8>>> {
        let q = dns::parse_query(msg).map_err(|e| {
            self.metrics.event(PROTOCOL, "malformed_query");
            tracing::debug!("DNS query from {peer}: {e}");
            dns::formerr(msg)
        })?;
        let view = turn.view.clone();
        let src = match &turn.last_source {
            Some((ip, s)) if *ip == peer.ip() => s.clone(),
            _ => {
                let (s, cacheable) = self.source(&view, peer.ip());
                if cacheable {
                    turn.last_source = Some((peer.ip(), s.clone()));
                }
                s
            }
        };
        let dst = self.destination(&view);
        let v = self.decide(&view, &src, &dst, transport, &q.question.name);
        Ok(Judged {
            q,
            view,
            src,
            dst,
            v,
        })
    }

    /// Judges a UDP query and queues what it leads to: the query to the batch's upstream
    /// socket, or the immediate reply (denied, malformed, shed).
    fn take_query(&self, turn: &mut Turn, out: &mut Outbox, msg: &[u8], peer: SocketAddr) {
        match self.udp_step(turn, msg, peer) {
            UdpStep::Reply(reply) => {
                out.replies.push(&reply, Some(peer));
            }
            UdpStep::Upstream { id } => {
                dns::set_message_id(out.upstream.push(msg, None), id);
            }
            UdpStep::Nothing => {}
        }
    }

    /// Sends what `out` holds: the queries on `turn`'s upstream socket (one the kernel refuses
    /// is answered SERVFAIL), then the replies from `reply_from`.
    async fn send_out(&self, turn: &Turn, out: &mut Outbox, reply_from: &UdpSocket) {
        if !out.upstream.is_empty() {
            let mut failed = Vec::new();
            out.upstream
                .flush(&self.udp_up[turn.slot].sock, |q| failed.push(q.to_vec()))
                .await;
            for q in failed {
                if let Some((reply, client)) = self.upstream_send_failed(turn.slot, &q) {
                    out.replies.push(&reply, Some(client));
                }
            }
        }
        self.flush_replies(reply_from, &mut out.replies).await;
    }

    /// A query that could not be sent upstream: its entry is removed and its client gets
    /// `SERVFAIL` (the reply and the client, or `None` when the entry is already gone).
    fn upstream_send_failed(&self, slot: usize, out: &[u8]) -> Option<(Vec<u8>, SocketAddr)> {
        self.metrics.event(PROTOCOL, "upstream_error");
        let id = dns::message_id(out)?;
        let e = self.udp_up[slot]
            .pending
            .lock()
            .ok()
            .and_then(|mut p| p.waiting.remove(&id))
            .map(|(_, e)| e)?;
        let reply = dns::reply_with_rcode(&e.query, &e.q, rcode::SERVFAIL);
        self.finish_audit(&e, &reply);
        Some((reply, e.client))
    }

    /// Judge a UDP query and, when allowed, register it on an upstream socket: what to send
    /// where, or the immediate reply.
    fn udp_step(&self, turn: &mut Turn, msg: &[u8], peer: SocketAddr) -> UdpStep {
        let Judged {
            q,
            view,
            src,
            dst,
            v,
        } = match self.judge(turn, msg, peer, Transport::Udp) {
            Ok(j) => j,
            Err(Some(reply)) => return UdpStep::Reply(reply),
            Err(None) => return UdpStep::Nothing,
        };
        if v.decision == Decision::Deny {
            let reply = dns::reply_with_rcode(msg, &q, self.opts.deny_rcode);
            self.audit(
                &view.state,
                &v,
                &src.remote,
                &dst,
                peer,
                &q,
                self.opts.deny_rcode,
                Transport::Udp,
            );
            return UdpStep::Reply(reply);
        }
        let audit = (v.decision != Decision::Allow || v.log.is_some()).then(|| {
            Box::new(AuditLater {
                v,
                src: src.remote.clone(),
                dst,
                state: view.state.clone(),
            })
        });
        let slot = &self.udp_up[turn.slot];
        let entry = InFlight {
            client: peer,
            started: turn.now,
            query: msg.to_vec(),
            q,
            deadline: turn.now + self.opts.upstream_timeout,
            audit,
        };
        let registered = slot.pending.lock().ok().map(|mut p| p.register(entry));
        let id = match registered {
            Some(Ok((id, _))) => id,
            Some(Err(e)) => {
                // Every ID of this socket is in flight: shed (answered, counted).
                self.metrics.event(PROTOCOL, "shed");
                let reply = dns::reply_with_rcode(&e.query, &e.q, rcode::SERVFAIL);
                self.finish_audit(&e, &reply);
                return UdpStep::Reply(reply);
            }
            None => return UdpStep::Nothing,
        };
        UdpStep::Upstream { id }
    }

    /// [`Ctx::udp_done`] with the reply queued in `replies` (sent by [`Ctx::flush_replies`]).
    fn udp_done_later(&self, e: InFlight, reply: &[u8], now: Instant, replies: &mut SendBatch) {
        self.finish_audit(&e, reply);
        self.metrics
            .observe_duration(PROTOCOL, now.saturating_duration_since(e.started));
        replies.push(reply, Some(e.client));
    }

    /// Sends the queued replies from the listener's socket; each one the kernel refuses is
    /// counted.
    async fn flush_replies(&self, from: &UdpSocket, replies: &mut SendBatch) {
        if replies.is_empty() {
            return;
        }
        let mut failed = 0;
        replies.flush(from, |_| failed += 1).await;
        if failed > 0 {
            self.metrics.events_n(PROTOCOL, "udp_send_error", failed);
        }
    }

    /// Sends the reply of a forwarded UDP query and writes its audit record, if any.
    async fn udp_done(&self, e: InFlight, reply: Vec<u8>) {
        self.finish_audit(&e, &reply);
        self.metrics.observe_duration(PROTOCOL, e.started.elapsed());
        if self.udp.send_to(&reply, e.client).await.is_err() {
            self.metrics.event(PROTOCOL, "udp_send_error");
        }
    }

    fn finish_audit(&self, e: &InFlight, reply: &[u8]) {
        if let Some(a) = &e.audit {
            let answered = dns::Header::parse(reply).map_or(rcode::SERVFAIL, |h| h.rcode());
            self.audit(
                &a.state,
                &a.v,
                &a.src,
                &a.dst,
                e.client,
                &e.q,
                answered,
                Transport::Udp,
            );
        }
    }

    /// A TCP query: judged, then refused or exchanged over the pooled upstream connections.
    async fn tcp_answer(&self, msg: Vec<u8>, peer: SocketAddr) -> Option<Vec<u8>> {
        let Judged {
            q,
            view,
            src,
            dst,
            v,
        } = match self.judge(&mut Turn::new(self), &msg, peer, Transport::Tcp) {
            Ok(j) => j,
            Err(reply) => return reply,
        };
        let reply = if v.decision == Decision::Deny {
            dns::reply_with_rcode(&msg, &q, self.opts.deny_rcode)
        } else {
            match self.tcp_up.exchange(&msg, self.opts.upstream_timeout).await {
                Ok(mut answer) => {
                    let (own, release) =
                        self.finish(&msg, &q, &mut answer, Transport::Tcp, Instant::now());
                    let reply = own.unwrap_or(answer);
                    if let Release::Hold(ticket) = release {
                        ticket.wait(self.opts.fqdn_max_hold, &q.question.name).await;
                    }
                    reply
                }
                Err(e) => {
                    self.metrics.event(
                        PROTOCOL,
                        match e {
                            UpstreamError::Timeout => "upstream_timeout",
                            UpstreamError::Busy => "shed",
                            UpstreamError::Closed | UpstreamError::Io(_) => "upstream_error",
                        },
                    );
                    tracing::debug!("DNS {}: {e}", q.question.name);
                    dns::reply_with_rcode(&msg, &q, rcode::SERVFAIL)
                }
            }
        };
        if v.decision != Decision::Allow || v.log.is_some() {
            let answered = dns::Header::parse(&reply).map_or(rcode::SERVFAIL, |h| h.rcode());
            self.audit(
                &view.state,
                &v,
                &src.remote,
                &dst,
                peer,
                &q,
                answered,
                Transport::Tcp,
            );
        }
        Some(reply)
    }

    /// The upstream's answer to `q`, checked, learned and sized for the client, and when it
    /// may be sent ([`Release::Hold`]: once the agent has its IPs). The answer gets the
    /// client's ID in place; the reply is that answer, or (`Some`) one made here instead
    /// (SERVFAIL for a mismatch, a truncated reply for a client whose buffer is too small).
    fn finish(
        &self,
        msg: &[u8],
        q: &Query,
        answer: &mut [u8],
        transport: Transport,
        now: Instant,
    ) -> (Option<Vec<u8>>, Release) {
        dns::set_message_id(answer, q.header.id);
        let mut release = Release::Now;
        match dns::parse_response(answer) {
            Ok(r) => {
                if r.question.as_ref() != Some(&q.question) && r.header.qdcount != 0 {
                    // Not an answer to what was asked: never forward (or learn) it.
                    self.metrics.event(PROTOCOL, "upstream_answer_mismatch");
                    let servfail = dns::reply_with_rcode(msg, q, rcode::SERVFAIL);
                    return (Some(servfail), Release::Now);
                }
                // Learn before the client sees the answer: its first connection must match.
                if let Some(l) = r.learned() {
                    release = self.policy.load().fqdn.learn(&l.name, &l.ips, l.ttl, now);
                }
            }
            Err(_) => self.metrics.event(PROTOCOL, "upstream_malformed_answer"),
        }
        if transport == Transport::Udp && answer.len() > q.max_udp_answer() {
            // Too big for the client's buffer: tell it to come back over TCP.
            self.metrics.event(PROTOCOL, "truncated_for_client");
            let mut tc = dns::reply_with_rcode(msg, q, rcode::NOERROR);
            tc[2] |= 0x02;
            return (Some(tc), release);
        }
        (None, release)
    }

    #[allow(clippy::too_many_arguments, reason = "all of it is the record")]
    fn audit(
        &self,
        state: &PolicyState,
        v: &Verdict,
        src: &Remote,
        dst: &Remote,
        peer: SocketAddr,
        q: &Query,
        answered: u8,
        transport: Transport,
    ) {
        let Some(mut r) = Record::of_verdict(
            v,
            PROTOCOL,
            state.audit_peer(src, peer.ip(), peer.port()),
            state.audit_peer(
                dst,
                dst.ip.unwrap_or(self.dest.upstream.ip()),
                self.dest.policy_port,
            ),
            &self.node,
            state.revision,
        ) else {
            return;
        };
        r.dns = Some(DnsFields {
            qname: q.question.name.clone(),
            qtype: rtype::name(q.question.qtype),
            rcode: rcode::name(answered).to_string(),
            transport: transport.as_str(),
        });
        self.sink.record(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_among_waiters_and_guards_only_remove_their_own() {
        let p = Mutex::new(Pending::new(42));
        let mut ids = std::collections::HashSet::new();
        let mut keep = Vec::new();
        for _ in 0..5000 {
            let (tx, rx) = oneshot::channel();
            let (id, _) = p.lock().unwrap().register(tx).unwrap();
            assert!(ids.insert(id), "duplicate id {id}");
            keep.push(rx);
        }
        // A guard whose entry was answered and whose ID was then reused leaves the new entry.
        let (tx, rx) = oneshot::channel();
        let (id, token) = p.lock().unwrap().register(tx).unwrap();
        drop(rx);
        let mut msg = vec![0u8; 12];
        dns::set_message_id(&mut msg, id);
        assert!(!deliver(&p, &msg), "receiver dropped: not delivered");
        let (tx2, _rx2) = oneshot::channel();
        p.lock().unwrap().waiting.insert(id, (token + 1000, tx2));
        drop(PendingGuard {
            pending: &p,
            id,
            token,
        });
        assert!(p.lock().unwrap().waiting.contains_key(&id));
    }

    #[test]
    fn deny_rcode_names() {
        assert_eq!(parse_deny_rcode("REFUSED").unwrap(), rcode::REFUSED);
        assert_eq!(parse_deny_rcode("nxdomain").unwrap(), rcode::NXDOMAIN);
        assert!(parse_deny_rcode("drop").is_err());
    }
}
