//! `tollgate`: the one binary — policy tools today (`lint`, `eval`, `test`), the proxy, agent
//! and datapath as their issues land.

mod agent_cmd;
mod crd_cmd;
mod datapath_cmd;
mod demo;
mod eval_cmd;
mod files;
mod fqdn_cmd;
mod lint;
mod normalize;
mod observe;
mod policytest;
mod request;
mod up;
mod up_kube;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Sidecarless L7 network policy for Kubernetes nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate policy files; exit 1 with precise messages when something is wrong.
    Lint {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// What-if: evaluate one connection or request against policies.
    Eval(Box<eval_cmd::EvalArgs>),
    /// Run the L7 proxy standalone from policy files (fixed, transparent and DNS listeners).
    Proxy(Box<tollgate_proxy::ProxyArgs>),
    /// Read audit records with filters (`--follow` to keep reading).
    Observe(Box<observe::ObserveArgs>),
    /// Inspect the kernel datapath.
    #[command(subcommand)]
    Datapath(datapath_cmd::DatapathCommand),
    /// Inspect the proxy's FQDN cache (names learned from DNS answers).
    #[command(subcommand)]
    Fqdn(fqdn_cmd::FqdnCommand),
    /// Datapath + agent + proxy on this host from a policy directory and an endpoints
    /// inventory (reloads on file changes), or from the Kubernetes API (`--kubernetes`: this
    /// node's pods, on the interfaces the kernel routes their IPs to).
    Up(Box<up::UpArgs>),
    /// The agent without the datapath: from the Kubernetes API (`--kubernetes`: watch policies,
    /// pods and namespaces, allocate identities, write status and events, compile each change;
    /// `--rule-socket` serves them to proxies), or files served to proxies as rule sets.
    Agent(Box<agent_cmd::AgentArgs>),
    /// Print tollgate's CustomResourceDefinitions (generated from the Rust types): all, or
    /// the one of KIND (TollgatePolicy, TollgateIdentity; also CiliumNetworkPolicy and
    /// CiliumClusterwideNetworkPolicy, for clusters without Cilium, printed only when named).
    Crd { kind: Option<String> },
    /// The live demo (root): pods as network namespaces, `tollgate up` and `tollgate proxy` on
    /// a node namespace, allowed and denied HTTP, gRPC, DNS and Kafka requests, the audit
    /// records; then everything is removed. Exits 1 when an outcome differs from the policy.
    Demo(demo::DemoArgs),
    /// Run PolicyTest files (one line per case, then `N passed, M failed`).
    Test {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Print why each passing case passed.
        #[arg(short, long)]
        verbose: bool,
    },
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

fn run_proxy(args: &tollgate_proxy::ProxyArgs) -> anyhow::Result<bool> {
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(tollgate_proxy::run(args.clone()))?;
    Ok(true)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Lint { paths, json } => lint::run(paths, *json),
        Command::Eval(args) => eval_cmd::run(args),
        Command::Test { paths, verbose } => policytest::run(paths, *verbose),
        Command::Datapath(cmd) => datapath_cmd::run(cmd),
        Command::Fqdn(cmd) => fqdn_cmd::run(cmd),
        Command::Crd { kind } => crd_cmd::run(kind.as_deref()),
        Command::Proxy(args) => run_proxy(args),
        Command::Up(args) => {
            init_tracing();
            up::run(args)
        }
        Command::Observe(args) => observe::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Agent(args) => {
            init_tracing();
            agent_cmd::run(args)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
