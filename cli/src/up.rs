//! `tollgate up`: datapath, agent and proxy on this host, from a policy directory and an
//! endpoints inventory (whose endpoints name their host-side interface), or from the
//! Kubernetes API (`--kubernetes`: this node's pods, their interfaces from the kernel's routes;
//! `crate::up_kube`).
//!
//! Start: load and compile the policy, write the kernel maps and attach the TC programs, install
//! the redirect routing, start the proxy's transparent listeners (L7 and DNS) on the ports the
//! redirect entries name. Then follow the input ([`Input`]: the files, watched with inotify
//! and a fallback check of size and mtime, or the Kubernetes source's snapshots): on a change, reload and recompile; a policy
//! that does not load keeps the last good one in force (and says why); a good one is written to
//! the kernel as a diff and swapped into the proxy atomically (and published to proxies as rule
//! sets with `--rule-socket`). Each applied change is logged with its revision and how long it
//! took.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use std::sync::Mutex;

use tollgate_agent::apply::{Updated, apply, update};
use tollgate_agent::kubernetes::node::attached_here;
use tollgate_agent::learned::{Change, LOCAL, LearnedBook, LearnedServer, LearnedSink};
use tollgate_agent::metrics::{AgentMetrics, Applied};
use tollgate_agent::plan::{
    FIRST_FQDN_IDENTITY, LearnedIp, Plan, PlanCache, ProxyPorts, compile_local_cached,
};
use tollgate_agent::rulesets::RuleSetServer;
use tollgate_api::v1::RuleSet;
use tollgate_datapath::{Datapath, DatapathOptions, RedirectRouting};
use tollgate_policy::endpoints::Endpoint;
use tollgate_proxy::audit::{AuditSink, Output};
use tollgate_proxy::dns::{DnsListener, DnsOptions};
use tollgate_proxy::fqdn::{FqdnCache, FqdnConfig, FqdnUpdate};
use tollgate_proxy::metrics::Metrics;
use tollgate_proxy::state::Sources;
use tollgate_proxy::watch::FileWatch;
use tollgate_proxy::{Listener, PolicyHandle, PolicyState, serve_listener};

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Policy files or directories (watched).
    #[arg(long = "policies", num_args = 1.., required_unless_present = "kubernetes")]
    pub policies: Vec<PathBuf>,
    /// Endpoints inventory (watched); each endpoint's `interface` is where the datapath
    /// attaches.
    #[arg(long, required_unless_present = "kubernetes")]
    pub endpoints: Option<PathBuf>,
    /// Take policy and endpoints from the Kubernetes API instead of files (CNP, CCNP,
    /// NetworkPolicy, TollgatePolicy, Pods, Namespaces; as `tollgate agent --kubernetes`). The
    /// pods of this node (`--node`) are the endpoints the datapath attaches to, each on the
    /// interface the kernel's route to its IP leads to (or its `tollgate.io/interface`
    /// annotation); every pod is a known peer. A local pod whose interface cannot be found is
    /// reported as not enforced, and looked for again.
    #[arg(long, conflicts_with_all = ["policies", "endpoints"])]
    pub kubernetes: bool,
    #[command(flatten)]
    pub kube: crate::agent_cmd::KubeArgs,
    /// Port of the proxy's transparent L7 listener (HTTP, gRPC, TLS) on 127.0.0.1.
    #[arg(long, default_value_t = 15001)]
    pub l7_port: u16,
    /// Port of the proxy's transparent DNS listener (UDP and TCP) on 127.0.0.1.
    #[arg(long, default_value_t = 15053)]
    pub dns_port: u16,
    /// Where the datapath pins its maps and links.
    #[arg(long, default_value = tollgate_datapath::DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
    /// Audit log: a file path, or `-` for stdout.
    #[arg(long, default_value = "-")]
    pub audit_log: String,
    /// Rotate the audit log file when it would grow past this many bytes (0: never).
    #[arg(long, default_value_t = 0)]
    pub audit_max_bytes: u64,
    /// Rotated audit log files kept.
    #[arg(long, default_value_t = 5)]
    pub audit_keep: usize,
    /// Serve Prometheus metrics (and `/fqdn`) on this address.
    #[arg(long)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Fallback check of the files (milliseconds; inotify sees changes at once); with
    /// `--kubernetes`, how often a local pod whose interface was not found is looked for again.
    #[arg(long, default_value_t = 200)]
    pub poll_ms: u64,
    /// Serve the policy as versioned rule sets to proxies on this Unix socket
    /// (`tollgate proxy --agent SOCK`): one per policy file, or per Kubernetes policy object
    /// (`Kind ns/name`), and the inventory; and take the IPs they learn from DNS answers into
    /// the kernel (toFQDNs).
    #[arg(long)]
    pub rule_socket: Option<PathBuf>,
    /// Run no proxy in this process: a separate `tollgate proxy --agent SOCK --transparent
    /// 127.0.0.1:L7_PORT --dns-transparent 127.0.0.1:DNS_PORT` serves the redirected flows
    /// (needs `--rule-socket`). While it is not running, redirected flows are dropped. The IPs
    /// it learns from DNS answers (toFQDNs) come back on the same socket and are written to the
    /// kernel before it releases the answer.
    #[arg(long, requires = "rule_socket")]
    pub external_proxy: bool,
}

/// One revision of what `tollgate up` enforces, as its input gave it.
pub(crate) struct Loaded {
    /// The policy and the inventory (revision and FQDN cache are set by the caller); the
    /// endpoints the datapath attaches to have their interface.
    pub state: PolicyState,
    /// What proxies are served with `--rule-socket`.
    pub rule_sets: Vec<RuleSet>,
    /// Endpoints this revision should enforce and cannot, one line each with the reason.
    pub not_enforced: Vec<String>,
    /// When the change was first seen (for the applied-in figure).
    pub since: Instant,
}

/// What an [`Input`] saw next.
pub(crate) enum Next {
    /// A change to apply.
    Apply(Box<Loaded>),
    /// A change that is not applied, and why: the last good revision stays in force.
    Keep(anyhow::Error),
}

/// Where `tollgate up` takes its policy and endpoints from.
pub(crate) trait Input {
    /// The node whose endpoints the datapath attaches to ([`attached_here`]); `None`: every
    /// endpoint (directory mode).
    fn node(&self) -> Option<String>;
    /// Wait for the next change and load it; an error ends `tollgate up` (the input is gone).
    async fn next(&mut self) -> Result<Next>;
}

/// The policy files and the inventory file, watched ([`FileWatch`]: inotify, and a check
/// every `--poll-ms` for what inotify cannot see).
struct Files {
    policies: Vec<PathBuf>,
    endpoints: PathBuf,
    watch: FileWatch,
}

impl Files {
    fn start(args: &UpArgs) -> Result<(Files, Loaded)> {
        let endpoints = args
            .endpoints
            .clone()
            .context("--endpoints is needed without --kubernetes")?;
        let files = Files {
            watch: FileWatch::new(
                &args.policies,
                &endpoints,
                Duration::from_millis(args.poll_ms.max(10)),
            ),
            policies: args.policies.clone(),
            endpoints,
        };
        let first = files.load(Instant::now())?;
        Ok((files, first))
    }

    /// Load (see [`PolicyState::load_strict`]); item-level diagnostics are printed, never
    /// dropped.
    fn load(&self, since: Instant) -> Result<Loaded> {
        let sources = Sources::read(&self.policies, &self.endpoints)?;
        let state = PolicyState::from_sources(&sources)?.strict()?;
        for d in &state.diagnostics {
            eprintln!("tollgate up: {d} (this item was not loaded; see docs/policy-model.md)");
        }
        Ok(Loaded {
            state,
            rule_sets: crate::agent_cmd::rule_sets_of(&sources),
            not_enforced: Vec::new(),
            since,
        })
    }
}

impl Input for Files {
    fn node(&self) -> Option<String> {
        None
    }

    async fn next(&mut self) -> Result<Next> {
        self.watch.changed().await;
        Ok(match self.load(Instant::now()) {
            Ok(l) => Next::Apply(Box::new(l)),
            Err(e) => Next::Keep(e),
        })
    }
}

/// What the agent keeps between changes: the kernel, what it holds, and the learned IPs.
struct Agent {
    dp: Datapath,
    plan: Plan,
    state: Arc<PolicyState>,
    /// IPs learned from DNS answers (by the in-process proxy and by separate ones) and the
    /// identity each was given.
    learned: LearnedBook,
    ports: ProxyPorts,
    /// The node whose endpoints are attached (`None`: all of them).
    node: Option<String>,
    /// What the last compile can lend the next: endpoints whose inputs did not change.
    cache: PlanCache,
}

impl Agent {
    /// Recompile `state` with the learned IPs and write the difference to the kernel.
    fn converge(&mut self, state: Arc<PolicyState>) -> Result<Updated> {
        let learned = self.learned.learned();
        let plan = compile_here(
            &state,
            self.ports,
            &learned,
            self.node.as_deref(),
            &mut self.cache,
        );
        for w in &plan.warnings {
            eprintln!("tollgate up: warning: {w}");
        }
        let u = update(&mut self.dp, &self.plan, &plan)?;
        self.plan = plan;
        self.state = state;
        Ok(u)
    }

    /// DNS answers changed what names resolve to (`source`: [`LOCAL`], or a separate proxy on
    /// stream `conn`; `full`: its whole cache): give new IPs an identity, drop forgotten ones,
    /// and converge — before the answer is released to the client (the in-process proxy calls
    /// this synchronously, a separate one waits for the ack sent after it). The number of
    /// learned IPs in force.
    fn learned_changed(
        &mut self,
        source: &str,
        conn: u64,
        full: bool,
        changes: &[Change],
    ) -> Result<usize> {
        if self
            .learned
            .apply(source, conn, full, changes, Instant::now())
        {
            self.converge_learned(source)?;
        }
        Ok(self.learned.len())
    }

    /// Write the learned IPs to the kernel (they changed because of `why`).
    fn converge_learned(&mut self, why: &str) -> Result<()> {
        let started = Instant::now();
        let u = self
            .converge(self.state.clone())
            .context("applying learned IPs")?;
        eprintln!(
            "tollgate up: {} learned IP(s): {} policy entries written, {} removed in {:.1} ms \
             ({why})",
            self.learned.len(),
            u.policy_written,
            u.policy_removed,
            started.elapsed().as_secs_f64() * 1000.0
        );
        Ok(())
    }
}

/// A change of the in-process FQDN cache, as the agent's book takes it.
fn change_of(u: &FqdnUpdate) -> Change {
    match u {
        FqdnUpdate::Added { name, ip, ttl_secs } => Change {
            name: name.clone(),
            ip: *ip,
            ttl: Duration::from_secs(*ttl_secs),
            removed: false,
        },
        FqdnUpdate::Removed { name, ip } => Change {
            name: name.clone(),
            ip: *ip,
            ttl: Duration::ZERO,
            removed: true,
        },
    }
}

/// Separate proxies' learned IPs (the `Fqdn` stream on the rule socket) into the agent.
struct SharedAgent(Arc<Mutex<Agent>>);

impl LearnedSink for SharedAgent {
    fn learned(
        &self,
        source: &str,
        conn: u64,
        full: bool,
        changes: Vec<Change>,
    ) -> Result<usize, String> {
        let mut a = self
            .0
            .lock()
            .map_err(|_| "agent state poisoned".to_string())?;
        if full {
            eprintln!(
                "tollgate up: proxy {source} sent its FQDN cache ({} pair(s))",
                changes.len()
            );
        }
        a.learned_changed(source, conn, full, &changes)
            .map_err(|e| format!("{e:#}"))
    }

    fn closed(&self, source: &str, conn: u64) {
        if let Ok(mut a) = self.0.lock() {
            a.learned.closed(source, conn);
        }
        eprintln!(
            "tollgate up: FQDN stream of proxy {source} closed; what it taught stays until its TTL"
        );
    }
}

/// Once a second: drop what closed proxy streams taught once its TTL has run out.
async fn expire_learned(agent: Arc<Mutex<Agent>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Ok(mut a) = agent.lock() else {
            return;
        };
        if a.learned.expire(Instant::now())
            && let Err(e) = a.converge_learned("TTL ran out after a proxy left")
        {
            eprintln!("tollgate up: {e:#}");
        }
    }
}

/// The plan of `state` for the endpoints of `node` (all without one).
fn compile_here(
    state: &PolicyState,
    ports: ProxyPorts,
    learned: &[LearnedIp],
    node: Option<&str>,
    cache: &mut PlanCache,
) -> Plan {
    let local = |ep: &Endpoint| node.is_none_or(|n| attached_here(n, ep));
    compile_local_cached(
        &state.evaluator,
        &state.inventory,
        ports,
        learned,
        &local,
        cache,
    )
}

pub fn run(args: &UpArgs) -> Result<bool> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        if args.kubernetes {
            let (input, first) = crate::up_kube::Kube::start(args).await?;
            serve(args.clone(), input, first).await
        } else {
            let (input, first) = Files::start(args)?;
            serve(args.clone(), input, first).await
        }
    })?;
    Ok(true)
}

async fn serve(args: UpArgs, mut input: impl Input, first: Loaded) -> Result<()> {
    let fqdn = Arc::new(FqdnCache::new(FqdnConfig::default()));
    tokio::spawn(fqdn.clone().run_expiry());
    let mut revision = 1;
    let agent_metrics = Arc::new(AgentMetrics::new());
    let first_started = first.since;
    let mut state = first.state.with_fqdn(fqdn.clone());
    state.revision = revision;
    let state = Arc::new(state);
    let rule_server = args.rule_socket.as_ref().map(|_| {
        crate::agent_cmd::log_acks(RuleSetServer::new(first.rule_sets.clone()), "tollgate up")
    });
    let ports = ProxyPorts {
        l7: args.l7_port,
        dns: args.dns_port,
    };
    let node = input.node();
    let mut cache = PlanCache::default();
    let plan = compile_here(&state, ports, &[], node.as_deref(), &mut cache);
    for w in &plan.warnings {
        eprintln!("tollgate up: warning: {w}");
    }

    let mut dp = Datapath::load(&DatapathOptions {
        pin_root: args.pin_root.clone(),
        ..DatapathOptions::default()
    })
    .context("loading the datapath (root, bpffs and scripts/setup-datapath.sh needed)")?;
    let applied = apply(&mut dp, &plan)?;
    for u in applied.unattached.iter().chain(&first.not_enforced) {
        eprintln!("tollgate up: not enforced: {u}");
    }
    dp.install_redirect_routing(&RedirectRouting::default())?;
    agent_metrics.applied(&applied_metrics(
        &state,
        &plan,
        revision,
        applied.ipcache + applied.policy + applied.endpoints,
        0,
        first_started.elapsed(),
    ));

    let handle = PolicyHandle::new(state.clone());
    let agent = Arc::new(Mutex::new(Agent {
        dp,
        plan,
        state,
        learned: LearnedBook::new(FIRST_FQDN_IDENTITY),
        ports,
        node,
        cache,
    }));
    {
        let agent = agent.clone();
        fqdn.set_observer(Arc::new(move |changes: &[FqdnUpdate]| {
            let changes: Vec<Change> = changes.iter().map(change_of).collect();
            if let Ok(mut a) = agent.lock()
                && let Err(e) = a.learned_changed(LOCAL, 0, false, &changes)
            {
                eprintln!("tollgate up: {e:#}");
            }
        }));
    }
    if let (Some(server), Some(path)) = (&rule_server, &args.rule_socket) {
        eprintln!(
            "tollgate up: rule sets for proxies, and the IPs they learn, on {}",
            path.display()
        );
        let learned = LearnedServer::new(SharedAgent(agent.clone()));
        tokio::spawn(server.clone().serve_unix_with(path.clone(), Some(learned)));
        tokio::spawn(expire_learned(agent.clone()));
    }
    let sink = AuditSink::start(
        Output::parse_rotating(&args.audit_log, args.audit_max_bytes, args.audit_keep)?,
        65_536,
    );
    let metrics = Arc::new(Metrics::new());
    metrics.set_revision(revision);
    if let Some(addr) = args.metrics {
        let (am, rs) = (agent_metrics.clone(), rule_server.clone());
        let extra: tollgate_proxy::metrics::Page = Arc::new(move || am.render(rs.as_ref()));
        tokio::spawn(tollgate_proxy::metrics::serve(
            addr,
            metrics.clone(),
            sink.clone(),
            Some(fqdn.clone()),
            Some(extra),
        ));
    }
    let l7_addr = std::net::SocketAddr::from(([127, 0, 0, 1], args.l7_port));
    let dns_addr = std::net::SocketAddr::from(([127, 0, 0, 1], args.dns_port));
    if args.external_proxy {
        eprintln!(
            "tollgate up: revision {revision}: {} endpoints, {} ipcache entries, {} policy \
             entries; redirects to an external proxy on {l7_addr} (L7) and {dns_addr} (DNS)",
            applied.endpoints, applied.ipcache, applied.policy
        );
    } else {
        start_proxy(&handle, &sink, &metrics, l7_addr, dns_addr).await?;
        eprintln!(
            "tollgate up: revision {revision}: {} endpoints, {} ipcache entries, {} policy \
             entries; proxy on {l7_addr} (L7) and {dns_addr} (DNS)",
            applied.endpoints, applied.ipcache, applied.policy
        );
    }

    loop {
        let loaded = match input.next().await? {
            Next::Apply(l) => l,
            Next::Keep(e) => {
                eprintln!("tollgate up: keeping revision {revision}: {e:#}");
                agent_metrics.rejected_reload();
                continue;
            }
        };
        let started = loaded.since;
        let mut state = loaded.state.with_fqdn(fqdn.clone());
        state.revision = revision + 1;
        let state = Arc::new(state);
        let (u, plan_stats) = {
            let mut a = agent
                .lock()
                .map_err(|_| anyhow::anyhow!("agent state poisoned"))?;
            let u = a.converge(state.clone())?;
            (
                u,
                applied_metrics(&state, &a.plan, revision + 1, 0, 0, started.elapsed()),
            )
        };
        agent_metrics.applied(&Applied {
            written: u.policy_written + u.ipcache_written + u.endpoints_written,
            removed: u.policy_removed + u.ipcache_removed + u.endpoints_removed,
            ..plan_stats
        });
        handle.store(state);
        if let Some(server) = &rule_server {
            server.publish(loaded.rule_sets);
        }
        revision += 1;
        metrics.set_revision(revision);
        eprintln!(
            "tollgate up: revision {revision} applied in {:.1} ms ({} policy entries written, {} \
             removed; {} ipcache written, {} removed; {} endpoints written, {} removed)",
            started.elapsed().as_secs_f64() * 1000.0,
            u.policy_written,
            u.policy_removed,
            u.ipcache_written,
            u.ipcache_removed,
            u.endpoints_written,
            u.endpoints_removed
        );
        for x in u.unattached.iter().chain(&loaded.not_enforced) {
            eprintln!("tollgate up: not enforced: {x}");
        }
    }
}

/// The in-process proxy: transparent L7 and DNS listeners on the redirect ports.
async fn start_proxy(
    handle: &PolicyHandle,
    sink: &AuditSink,
    metrics: &Arc<Metrics>,
    l7_addr: std::net::SocketAddr,
    dns_addr: std::net::SocketAddr,
) -> Result<()> {
    let mark = Some(tollgate_datapath::common::PROXY_UPSTREAM_MARK);
    let l7 = Listener::bind_transparent(l7_addr, handle.clone(), sink.clone(), "Access denied")
        .await?
        .with_metrics(metrics.clone())
        .with_upstream_mark(mark);
    tokio::spawn(serve_listener(l7));
    let dns = DnsListener::bind_transparent(
        dns_addr,
        handle.clone(),
        sink.clone(),
        metrics.clone(),
        DnsOptions {
            upstream_mark: mark,
            ..DnsOptions::default()
        },
    )
    .await?;
    tokio::spawn(dns.serve());
    Ok(())
}

/// The agent metrics of revision `revision` of `state` compiled into `plan`.
fn applied_metrics(
    state: &PolicyState,
    plan: &Plan,
    revision: u64,
    written: usize,
    removed: usize,
    took: Duration,
) -> Applied {
    Applied {
        revision,
        policies: state
            .evaluator
            .rules()
            .iter()
            .map(|r| &r.policy.id)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        rules: state.evaluator.rules().len(),
        endpoints: state.inventory.endpoints.len(),
        identities: state
            .inventory
            .endpoints
            .iter()
            .map(|e| e.identity)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        diagnostics: state.diagnostics.len() + plan.warnings.len(),
        written,
        removed,
        seconds: took.as_secs_f64(),
    }
}
