//! `tollgate agent`: the agent on its own, without the datapath.
//!
//! * `--kubernetes`: the Kubernetes source — watch the policy kinds, Pods and Namespaces,
//!   allocate cluster-wide identities, write TollgatePolicy status and Events, and compile every
//!   change into kernel map contents (`plan::compile`), printing one line per revision and every
//!   problem. With `--rule-socket SOCK` every revision is also served to proxies as rule sets
//!   (each policy object its own, named `Kind ns/name`, and the inventory).
//! * `--policies DIR --endpoints FILE --rule-socket SOCK`: serve the files as versioned rule
//!   sets to proxies (`tollgate proxy --agent SOCK`), watching them for changes, and print every
//!   proxy's ACK/NACK. Enforcing on a node with the kernel datapath is `tollgate up` (with
//!   `--kubernetes` for the Kubernetes source).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use tollgate_agent::kubernetes::node;
use tollgate_agent::kubernetes::source::{self, Identities, Options, Snapshot};
use tollgate_agent::metrics::{AgentMetrics, Applied};
use tollgate_agent::plan::{ProxyPorts, compile};
use tollgate_agent::rulesets::{RuleSetServer, describe, rule_sets};
use tollgate_proxy::state::Sources;
use tollgate_proxy::watch::FileWatch;

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Take policy and endpoints from the Kubernetes API.
    #[arg(
        long,
        required_unless_present = "policies",
        conflicts_with = "policies"
    )]
    pub kubernetes: bool,
    /// Policy files or directories (watched), served as rule sets on `--rule-socket`.
    #[arg(long, num_args = 1.., requires_all = ["endpoints", "rule_socket"])]
    pub policies: Vec<PathBuf>,
    /// Endpoints inventory (watched).
    #[arg(long)]
    pub endpoints: Option<PathBuf>,
    /// Serve rule sets to proxies on this Unix socket (`tollgate proxy --agent SOCK`).
    #[arg(long)]
    pub rule_socket: Option<PathBuf>,
    /// Fallback check of the files (milliseconds); inotify sees changes at once.
    #[arg(long, default_value_t = 1000)]
    pub poll_ms: u64,
    /// Serve the agent's Prometheus metrics on this address (`/metrics`; with `--rule-socket`).
    #[arg(long)]
    pub metrics: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Print the first revision and exit: 0 without problems, 1 with.
    #[arg(long)]
    pub once: bool,
}

/// How to reach the Kubernetes API and what this node is (`agent --kubernetes`, `up
/// --kubernetes`).
#[derive(Debug, Clone, clap::Args)]
pub struct KubeArgs {
    /// Kubeconfig file (default: in-cluster service account, $KUBECONFIG, ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name: `tollgate up --kubernetes` enforces for the pods whose spec.nodeName
    /// it is; also the name in Events (default: $NODE_NAME, else the host name).
    #[arg(long)]
    pub node: Option<String>,
    /// `cluster`: TollgateIdentity objects shared by all nodes; `local`: numbered by this agent.
    #[arg(long, default_value = "cluster", value_parser = ["cluster", "local"])]
    pub identities: String,
    /// Seconds an identity no pod uses is kept before its object is deleted.
    #[arg(long, default_value_t = 300)]
    pub identity_gc_seconds: u64,
    /// Write neither TollgatePolicy status nor Events.
    #[arg(long)]
    pub no_status: bool,
}

impl KubeArgs {
    /// `--node`, else $NODE_NAME, else the host name.
    pub fn node_name(&self) -> String {
        self.node
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok())
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "tollgate-agent".to_string())
    }

    /// The Kubernetes source's options.
    pub fn options(&self) -> Options {
        Options {
            identities: match self.identities.as_str() {
                "local" => Identities::Local,
                _ => Identities::Cluster {
                    gc_grace: Duration::from_secs(self.identity_gc_seconds),
                },
            },
            write_status: !self.no_status,
            instance: self.node_name(),
            ..Options::default()
        }
    }

    /// Connect and start the source; returns once the first snapshot is compiled.
    pub async fn start(&self) -> Result<source::Running> {
        let client = tollgate_agent::kubernetes::client(self.kubeconfig.as_deref()).await?;
        source::start(client, self.options()).await
    }
}

fn print(snap: &Snapshot) {
    let plan = compile(
        &snap.evaluator(),
        &snap.inventory,
        ProxyPorts {
            l7: 15001,
            dns: 15053,
        },
    );
    println!(
        "revision {}: {} policies, {} rules, {} endpoints, {} identities; kernel: {} ipcache, {} policy entries; {} problem(s)",
        snap.revision,
        snap.policies.policies.len(),
        snap.policies.rules.len(),
        snap.inventory.endpoints.len(),
        snap.inventory
            .endpoints
            .iter()
            .map(|e| e.identity)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        plan.ipcache.len(),
        plan.policy.len(),
        snap.problems.len() + plan.warnings.len(),
    );
    for k in &snap.not_served {
        println!("  not served by this cluster (not watched): {k}");
    }
    for p in snap.problems.iter().chain(&plan.warnings) {
        println!("  {p}");
    }
}

pub fn run(args: &AgentArgs) -> Result<bool> {
    if let (Some(endpoints), Some(socket)) = (&args.endpoints, &args.rule_socket)
        && !args.kubernetes
    {
        return serve_files(args, endpoints, socket);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut running = args.kube.start().await?;
        let mut server: Option<RuleSetServer> = None;
        loop {
            let snap = running.snapshots.borrow_and_update().clone();
            print(&snap);
            if args.once {
                return Ok(snap.problems.is_empty());
            }
            match (&server, &args.rule_socket) {
                (Some(server), _) => {
                    let v = server.publish(node::rule_sets(&snap));
                    println!("  rule sets: version {v}");
                }
                (None, Some(socket)) => {
                    let s = log_acks(RuleSetServer::new(node::rule_sets(&snap)), "tollgate agent");
                    tokio::spawn(s.clone().serve_unix(socket.clone()));
                    println!("  rule sets: version 1 on {}", socket.display());
                    server = Some(s);
                }
                (None, None) => {}
            }
            if running.snapshots.changed().await.is_err() {
                anyhow::bail!("the Kubernetes source stopped");
            }
        }
    })
}

/// Rule sets of the policy sources read now.
pub fn rule_sets_of(sources: &Sources) -> Vec<tollgate_api::v1::RuleSet> {
    rule_sets(
        sources
            .policies
            .iter()
            .map(|(n, c)| (n.as_str(), c.as_str())),
        (sources.inventory.0.as_str(), sources.inventory.1.as_str()),
    )
}

/// Print every proxy's ACK, and each rejected rule set with its problems.
pub fn log_acks(server: RuleSetServer, who: &'static str) -> RuleSetServer {
    server.on_ack(move |proxy, ack| {
        for line in describe(proxy, ack) {
            eprintln!("{who}: {line}");
        }
    })
}

fn serve_files(args: &AgentArgs, endpoints: &Path, socket: &Path) -> Result<bool> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut files = FileWatch::new(
            &args.policies,
            endpoints,
            Duration::from_millis(args.poll_ms.max(10)),
        );
        let sources = Sources::read(&args.policies, endpoints)?;
        let server = log_acks(RuleSetServer::new(rule_sets_of(&sources)), "tollgate agent");
        let metrics = std::sync::Arc::new(AgentMetrics::new());
        let published = |version: u64, sources: &Sources, took: Duration| {
            metrics.applied(&Applied {
                revision: version,
                policies: sources.policies.len(),
                seconds: took.as_secs_f64(),
                ..Applied::default()
            });
        };
        published(1, &sources, Duration::ZERO);
        if let Some(addr) = args.metrics {
            let (m, rs) = (metrics.clone(), server.clone());
            tokio::spawn(tollgate_proxy::metrics::serve_pages(addr, move |path| {
                (path == "/metrics").then(|| (m.render(Some(&rs)), "text/plain; version=0.0.4"))
            }));
        }
        eprintln!(
            "tollgate agent: version 1: {} policy file(s); rule sets on {}",
            sources.policies.len(),
            socket.display()
        );
        tokio::spawn(server.clone().serve_unix(socket.to_path_buf()));
        loop {
            files.changed().await;
            match Sources::read(&args.policies, endpoints) {
                Ok(sources) => {
                    let started = std::time::Instant::now();
                    let v = server.publish(rule_sets_of(&sources));
                    published(v, &sources, started.elapsed());
                    eprintln!(
                        "tollgate agent: version {v}: {} policy file(s)",
                        sources.policies.len()
                    );
                }
                Err(e) => {
                    metrics.rejected_reload();
                    eprintln!(
                        "tollgate agent: keeping version {}: {e:#}",
                        server.version()
                    );
                }
            }
        }
    })
}
