//! `tollgate agent --kubernetes`: the agent's Kubernetes source on its own — watch the policy
//! kinds, Pods and Namespaces, allocate cluster-wide identities, write TollgatePolicy status
//! and Events, and compile every change into kernel map contents (`plan::compile`), printing one
//! line per revision and every problem. It does not load the datapath or run the proxy yet:
//! enforcing on a node is `tollgate up`, from files, today.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use tollgate_agent::kubernetes::source::{self, Identities, Options, Snapshot};
use tollgate_agent::plan::{ProxyPorts, compile};

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Take policy and endpoints from the Kubernetes API (the only source of `agent` today).
    #[arg(long, required = true)]
    pub kubernetes: bool,
    /// Kubeconfig file (default: in-cluster service account, $KUBECONFIG, ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This agent's name in Events (default: $NODE_NAME, else the host name).
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
    /// Print the first revision and exit: 0 without problems, 1 with.
    #[arg(long)]
    pub once: bool,
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
    let instance = args
        .node
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "tollgate-agent".to_string());
    let opts = Options {
        identities: match args.identities.as_str() {
            "local" => Identities::Local,
            _ => Identities::Cluster {
                gc_grace: Duration::from_secs(args.identity_gc_seconds),
            },
        },
        write_status: !args.no_status,
        instance,
        ..Options::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = tollgate_agent::kubernetes::client(args.kubeconfig.as_deref()).await?;
        let mut running = source::start(client, opts).await?;
        loop {
            let snap = running.snapshots.borrow_and_update().clone();
            print(&snap);
            if args.once {
                return Ok(snap.problems.is_empty());
            }
            if running.snapshots.changed().await.is_err() {
                anyhow::bail!("the Kubernetes source stopped");
            }
        }
    })
}
