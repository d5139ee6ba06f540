//! The node-local L7 proxy.
//!
//! One tokio runtime, one task per connection. A fixed listener forwards to one destination
//! endpoint (`--listen 127.0.0.1:15080 --to api-server@127.0.0.1:18080`); a transparent
//! listener (`--transparent 127.0.0.1:15001`) receives the flows the eBPF datapath assigns to
//! it, and the accepted socket's local address is the original destination. The source (and
//! in transparent mode the destination) endpoint is found by IP in the endpoints inventory;
//! anything else is the world. Per connection the proxy takes the [`PortPolicy`] of the source's egress and of
//! the destination's ingress (cached, from the one evaluator in `tollgate-policy`):
//!
//! * no L7 rules on either side: one L3/L4 verdict, then the bytes are spliced
//!   (`copy_bidirectional`) — no parsing;
//! * otherwise HTTP/1.1 and HTTP/2 (h2c prior knowledge) are served by hyper and every request
//!   is judged on its normalised path (`tollgate_parsers::path`), method, authority, headers
//!   and, for gRPC, service/method. Denied: `403 Access denied`, or for gRPC a trailers-only
//!   `grpc-status: 7`; ambiguous paths get `400`. Every denial (and audit-mode would-deny) is
//!   an audit record ([`audit`]).
//!
//! [`PortPolicy`]: tollgate_policy::eval::PortPolicy

pub mod audit;
pub mod dns;
mod flow;
mod forward;
pub mod fqdn;
pub mod fqdn_link;
mod framing;
pub mod kafka;
pub mod metrics;
pub mod observe;
pub mod rulesets;
mod sockets;
pub mod state;
mod udp_batch;
pub mod upstream;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

pub use forward::{AuditHeaders, Listener, serve_listener};
pub use state::{PolicyHandle, PolicyState};

/// `tollgate proxy` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Policy files or directories.
    #[arg(long = "policies", num_args = 1.., required_unless_present = "agent", conflicts_with = "agent", requires = "endpoints")]
    pub policies: Vec<PathBuf>,
    /// Endpoints inventory (IP → endpoint and labels).
    #[arg(long, conflicts_with = "agent")]
    pub endpoints: Option<PathBuf>,
    /// Take policy and inventory from the agent's rule-set stream on this Unix socket
    /// (`tollgate agent --rule-socket`, `tollgate up --external-proxy`) instead of files.
    /// Listeners start once the first version is in force; while the agent is away the last
    /// good version is served. The IPs learned from DNS answers go back to the agent, which
    /// writes them to the kernel before the answer is released (`--fqdn-max-hold-ms`; `tollgate
    /// up` does, `tollgate agent` has no datapath and does not take them).
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Mark for the upstream sockets of transparent listeners, by which the datapath admits
    /// flows the proxy already judged (0: none). Default: the datapath's mark.
    #[arg(long, default_value_t = tollgate_datapath_common::PROXY_UPSTREAM_MARK)]
    pub upstream_mark: u32,
    /// Serve the `Observe` gRPC stream of audit records on this Unix socket
    /// (`tollgate observe --server SOCK`).
    #[arg(long)]
    pub observe_socket: Option<PathBuf>,
    /// Fixed listener address (repeatable; pairs with `--to` in order).
    #[arg(long = "listen")]
    pub listen: Vec<SocketAddr>,
    /// Destination of a fixed listener: `ENDPOINT[:PORT]@ADDR` (repeatable).
    #[arg(long = "to")]
    pub to: Vec<String>,
    /// Fixed Kafka listener address (repeatable; pairs with `--kafka-to` in order). Clients
    /// bootstrap here; broker addresses in Metadata/FindCoordinator/DescribeCluster answers
    /// are rewritten to listeners of this proxy (started on the same IP for brokers not named).
    #[arg(long = "kafka-listen")]
    pub kafka_listen: Vec<SocketAddr>,
    /// Destination of a Kafka listener: `ENDPOINT[:PORT]@BROKER` (repeatable).
    #[arg(long = "kafka-to")]
    pub kafka_to: Vec<String>,
    /// Transparent listener for flows the datapath redirects (`IP_TRANSPARENT`; the original
    /// destination is the accepted socket's local address). Repeatable.
    #[arg(long = "transparent")]
    pub transparent: Vec<SocketAddr>,
    /// Audit log: a file path, or `-` for stdout.
    #[arg(long, default_value = "-")]
    pub audit_log: String,
    /// Also show this request header's value in audit records (repeatable). By default only
    /// user-agent, content-type, x-request-id and traceparent values are shown.
    #[arg(long = "audit-header")]
    pub audit_header: Vec<String>,
    /// Show only the presence of this header, as "[redacted]" (repeatable; added to
    /// authorization, proxy-authorization, cookie and x-api-key; wins over --audit-header).
    #[arg(long = "audit-redact")]
    pub audit_redact: Vec<String>,
    /// Rotate the audit log file when it would grow past this many bytes (0: never).
    #[arg(long, default_value_t = 0)]
    pub audit_max_bytes: u64,
    /// Rotated audit log files kept (`FILE.1` … `FILE.N`).
    #[arg(long, default_value_t = 5)]
    pub audit_keep: usize,
    /// Records held in memory when the audit sink falls behind; beyond that they are shed
    /// (and counted).
    #[arg(long, default_value_t = 65536)]
    pub audit_queue: usize,
    /// Serve Prometheus metrics on this address (`/metrics`).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Body of HTTP 403 replies.
    #[arg(long, default_value = "Access denied")]
    pub deny_body: String,
    /// DNS listener address, UDP and TCP (repeatable; pairs with `--dns-to` in order).
    #[arg(long = "dns-listen")]
    pub dns_listen: Vec<SocketAddr>,
    /// Destination of a DNS listener: `ENDPOINT[:PORT]@ADDR` or `world[:PORT]@ADDR` (PORT is
    /// what rules name, default 53; ADDR is the resolver queries go to). Repeatable.
    #[arg(long = "dns-to")]
    pub dns_to: Vec<String>,
    /// Transparent DNS listener (UDP and TCP) for the port-53 flows the datapath redirects;
    /// queries go to their original destination. Repeatable.
    #[arg(long = "dns-transparent")]
    pub dns_transparent: Vec<SocketAddr>,
    /// Answer to a denied DNS query: `refused` or `nxdomain`.
    #[arg(long, default_value = "refused")]
    pub dns_deny_rcode: String,
    /// How long to wait for the upstream resolver before answering SERVFAIL (milliseconds).
    #[arg(long, default_value_t = 5000)]
    pub dns_upstream_timeout_ms: u64,
    /// DNS queries answered at once per listener; beyond it SERVFAIL (counted).
    #[arg(long, default_value_t = 10_000)]
    pub dns_max_in_flight: usize,
    /// UDP receive loops per fixed DNS listener, each on its own socket of the listener's
    /// address (SO_REUSEPORT). 0: one per core the process may run on.
    #[arg(long, default_value_t = 0)]
    pub dns_udp_loops: usize,
    /// Lowest TTL (seconds) a learned FQDN → IP mapping gets.
    #[arg(long, default_value_t = 0)]
    pub fqdn_min_ttl: u64,
    /// Reload the policy files and the inventory when they change (0: never): inotify sees a
    /// change at once; this period is the fallback check (and frees replaced policies).
    #[arg(long, default_value_t = 0)]
    pub watch_ms: u64,
    /// Most IPs kept per learned name (the least recently refreshed go first).
    #[arg(long, default_value_t = 1000)]
    pub fqdn_max_ips: usize,
    /// How long (seconds) an expired IP outlives its last proxied connection.
    #[arg(long, default_value_t = 0)]
    pub fqdn_grace: u64,
    /// With `--agent`: longest a DNS answer that teaches new IPs is held until the agent has
    /// written them to the kernel (milliseconds; Cilium's tofqdns-proxy-response-max-delay).
    /// Past it the answer goes out anyway, counted and logged: the client's first connection to
    /// a new IP may then be dropped (never passed) until the agent catches up.
    #[arg(long, default_value_t = dns::DEFAULT_FQDN_MAX_HOLD.as_millis() as u64)]
    pub fqdn_max_hold_ms: u64,
}

/// Run the proxy until the process is stopped.
pub async fn run(args: ProxyArgs) -> Result<()> {
    if args.listen.is_empty()
        && args.kafka_listen.is_empty()
        && args.transparent.is_empty()
        && args.dns_listen.is_empty()
        && args.dns_transparent.is_empty()
    {
        bail!(
            "give at least one --listen ADDR --to ENDPOINT@ADDR, --kafka-listen ADDR \
             --kafka-to ENDPOINT@BROKER, --transparent ADDR, \
             --dns-listen ADDR --dns-to DEST@ADDR, or --dns-transparent ADDR"
        );
    }
    if args.dns_listen.len() != args.dns_to.len() {
        bail!(
            "give one --dns-to per --dns-listen ({} listen, {} to)",
            args.dns_listen.len(),
            args.dns_to.len()
        );
    }
    let dns_opts = dns::DnsOptions {
        deny_rcode: dns::parse_deny_rcode(&args.dns_deny_rcode)?,
        upstream_timeout: std::time::Duration::from_millis(args.dns_upstream_timeout_ms),
        max_in_flight: args.dns_max_in_flight,
        fqdn_max_hold: std::time::Duration::from_millis(args.fqdn_max_hold_ms),
        udp_receive_loops: match args.dns_udp_loops {
            0 => dns::default_udp_receive_loops(),
            n => n,
        },
        ..dns::DnsOptions::default()
    };
    let fqdn = Arc::new(fqdn::FqdnCache::new(fqdn::FqdnConfig {
        min_ttl: std::time::Duration::from_secs(args.fqdn_min_ttl),
        max_ips_per_name: args.fqdn_max_ips.max(1),
        grace: std::time::Duration::from_secs(args.fqdn_grace),
    }));
    if args.kafka_listen.len() != args.kafka_to.len() {
        bail!(
            "give one --kafka-to per --kafka-listen ({} listen, {} to)",
            args.kafka_listen.len(),
            args.kafka_to.len()
        );
    }
    if args.listen.len() != args.to.len() {
        bail!(
            "give one --to per --listen ({} listen, {} to)",
            args.listen.len(),
            args.to.len()
        );
    }
    let metrics = Arc::new(metrics::Metrics::new());
    let (handle, files) = match (&args.agent, &args.endpoints) {
        (Some(socket), _) => {
            let link = rulesets::AgentLink {
                socket: socket.clone(),
                fqdn: fqdn.clone(),
                metrics: metrics.clone(),
            };
            (link.start().await?, None)
        }
        (None, Some(endpoints)) => {
            let state =
                Arc::new(PolicyState::load(&args.policies, endpoints)?.with_fqdn(fqdn.clone()));
            for d in &state.diagnostics {
                tracing::warn!("{d} (this rule was not loaded)");
            }
            metrics.set_revision(state.revision);
            (
                PolicyHandle::new(state),
                Some((args.policies.clone(), endpoints.clone())),
            )
        }
        (None, None) => bail!("give --policies DIR --endpoints FILE, or --agent SOCK"),
    };
    let sink = audit::AuditSink::start(
        audit::Output::parse_rotating(&args.audit_log, args.audit_max_bytes, args.audit_keep)?,
        args.audit_queue,
    );
    let mut tasks = Vec::new();
    tokio::spawn(fqdn.clone().run_expiry());
    if let Some(path) = &args.observe_socket {
        eprintln!("tollgate proxy: Observe stream on {}", path.display());
        let service = observe::ObserveService::new(sink.tap());
        let path = path.clone();
        tasks.push(tokio::spawn(async move { service.serve_unix(path).await }));
    }
    if let Some(addr) = args.metrics {
        eprintln!("tollgate proxy: metrics on http://{addr}/metrics, FQDN cache on /fqdn");
        tasks.push(tokio::spawn(metrics::serve(
            addr,
            metrics.clone(),
            sink.clone(),
            Some(fqdn.clone()),
            None,
        )));
    }
    for (addr, to) in args.dns_listen.iter().zip(&args.dns_to) {
        let (dest, upstream) = to
            .split_once('@')
            .with_context(|| format!("--dns-to `{to}`: expected DEST@ADDR"))?;
        let upstream: SocketAddr = upstream
            .parse()
            .with_context(|| format!("--dns-to `{to}`: `{upstream}` is not an address"))?;
        let l = dns::DnsListener::bind(
            *addr,
            dest,
            upstream,
            handle.clone(),
            sink.clone(),
            metrics.clone(),
            dns_opts.clone(),
        )
        .await?;
        eprintln!(
            "tollgate proxy: DNS {} (udp+tcp, {} udp receive loops) -> {dest}@{upstream}",
            l.local_addr()?,
            l.udp_receive_loops()
        );
        tasks.push(tokio::spawn(l.serve()));
    }
    for addr in &args.dns_transparent {
        let l = dns::DnsListener::bind_transparent(
            *addr,
            handle.clone(),
            sink.clone(),
            metrics.clone(),
            dns::DnsOptions {
                upstream_mark: (args.upstream_mark != 0).then_some(args.upstream_mark),
                ..dns_opts.clone()
            },
        )
        .await?;
        eprintln!("tollgate proxy: transparent DNS listener on {addr} (udp+tcp)");
        tasks.push(tokio::spawn(l.serve()));
    }
    for (addr, to) in args.listen.iter().zip(&args.to) {
        let (name, upstream) = parse_to(to, "--to")?;
        let listener = Listener::bind(
            *addr,
            name,
            upstream,
            handle.clone(),
            sink.clone(),
            &args.deny_body,
        )
        .await?
        .with_metrics(metrics.clone())
        .with_audit_headers(AuditHeaders::with(&args.audit_header, &args.audit_redact));
        eprintln!("tollgate proxy: {addr} -> {name}@{upstream}");
        tasks.push(tokio::spawn(serve_listener(listener)));
    }
    for (addr, to) in args.kafka_listen.iter().zip(&args.kafka_to) {
        let (name, upstream) = parse_to(to, "--kafka-to")?;
        let l = kafka::KafkaListener::bind(
            *addr,
            name,
            upstream,
            handle.clone(),
            sink.clone(),
            metrics.clone(),
        )
        .await?;
        eprintln!(
            "tollgate proxy: Kafka {} -> {name}@{upstream}",
            l.local_addr()?
        );
        tasks.push(tokio::spawn(l.serve()));
    }
    for addr in &args.transparent {
        let listener =
            Listener::bind_transparent(*addr, handle.clone(), sink.clone(), &args.deny_body)
                .await?
                .with_metrics(metrics.clone())
                .with_upstream_mark((args.upstream_mark != 0).then_some(args.upstream_mark))
                .with_audit_headers(AuditHeaders::with(&args.audit_header, &args.audit_redact));
        eprintln!("tollgate proxy: transparent listener on {addr}");
        tasks.push(tokio::spawn(serve_listener(listener)));
    }
    if let (Some((policies, endpoints)), true) = (files, args.watch_ms > 0) {
        tokio::spawn(watch(
            policies,
            endpoints,
            args.watch_ms,
            handle,
            metrics.clone(),
        ));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Reload the policy files and the inventory when they change ([`watch::FileWatch`]: inotify,
/// plus a check every `--watch-ms`) and swap the new policy in; a reload that would drop whole files or rules keeps the one in
/// force ([`PolicyState::load_strict`]). Each swap is logged with how long loading took.
async fn watch(
    policies: Vec<PathBuf>,
    endpoints: PathBuf,
    watch_ms: u64,
    handle: PolicyHandle,
    metrics: Arc<metrics::Metrics>,
) {
    let period = std::time::Duration::from_millis(watch_ms);
    let mut files = watch::FileWatch::new(&policies, &endpoints, period);
    // Replaced policies, freed here once nothing else holds them: freeing thousands of rules
    // is work the threads answering queries should not do.
    let mut retired: Vec<Arc<PolicyState>> = Vec::new();
    loop {
        let changed = tokio::select! {
            _ = files.changed() => true,
            _ = tokio::time::sleep(period) => false,
        };
        if retired.iter().any(|s| Arc::strong_count(s) == 1) {
            let (free, keep) = std::mem::take(&mut retired)
                .into_iter()
                .partition(|s| Arc::strong_count(s) == 1);
            retired = keep;
            let free: Vec<Arc<PolicyState>> = free;
            tokio::task::spawn_blocking(move || drop(free));
        }
        if !changed {
            continue;
        }
        let current = handle.load();
        let started = std::time::Instant::now();
        let (policies, endpoints) = (policies.clone(), endpoints.clone());
        // Loading is CPU work: keep it off the threads that answer requests. So is building
        // the port policies the current revision has in use (warm_like).
        let previous = current.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let next = PolicyState::load_strict(&policies, &endpoints)?;
            next.warm_like(&previous);
            Ok::<_, anyhow::Error>(next)
        })
        .await;
        match loaded {
            Ok(Ok(mut next)) => {
                next.revision = current.revision + 1;
                let revision = next.revision;
                handle.store(Arc::new(next.with_fqdn(current.fqdn.clone())));
                retired.push(current);
                metrics.set_revision(revision);
                eprintln!(
                    "tollgate proxy: revision {revision} in force, loaded in {:.1} ms",
                    started.elapsed().as_secs_f64() * 1000.0
                );
            }
            Ok(Err(e)) => eprintln!(
                "tollgate proxy: keeping revision {}: {e:#}",
                current.revision
            ),
            Err(e) => eprintln!("tollgate proxy: reload failed: {e}"),
        }
    }
}

/// `ENDPOINT[:PORT]@ADDR` of a `--to`-style flag.
fn parse_to<'a>(to: &'a str, flag: &str) -> Result<(&'a str, SocketAddr)> {
    let (name, upstream) = to
        .split_once('@')
        .with_context(|| format!("{flag} `{to}`: expected ENDPOINT@ADDR"))?;
    let upstream: SocketAddr = upstream
        .parse()
        .with_context(|| format!("{flag} `{to}`: `{upstream}` is not an address"))?;
    Ok((name, upstream))
}

// The proxy decodes Kafka frames from any workload on the node: every binary linking it runs
// under the allocator that keeps a hostile element count from aborting the process
// (`tollgate_parsers::alloc`).
#[global_allocator]
static ALLOC: tollgate_parsers::alloc::LazyHugeAlloc = tollgate_parsers::alloc::LazyHugeAlloc;
