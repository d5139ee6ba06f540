//! `tollgate`: the one binary — policy tools today (`lint`, `eval`, `test`), the proxy, agent
//! and datapath as their issues land.

mod datapath_cmd;
mod eval_cmd;
mod files;
mod lint;
mod normalize;
mod policytest;
mod request;

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
    /// Inspect the kernel datapath.
    #[command(subcommand)]
    Datapath(datapath_cmd::DatapathCommand),
    /// Run PolicyTest files (one line per case, then `N passed, M failed`).
    Test {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Print why each passing case passed.
        #[arg(short, long)]
        verbose: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Lint { paths, json } => lint::run(paths, *json),
        Command::Eval(args) => eval_cmd::run(args),
        Command::Test { paths, verbose } => policytest::run(paths, *verbose),
        Command::Datapath(cmd) => datapath_cmd::run(cmd),
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
