//! `tollgate datapath …`: inspect the kernel datapath from what is pinned under the pin root.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum DatapathCommand {
    /// Attached programs, map fill levels and per-verdict counters.
    Status {
        /// Where the datapath pins its maps and links.
        #[arg(long, default_value = tollgate_datapath::DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
    },
}

pub fn run(cmd: &DatapathCommand) -> Result<bool> {
    match cmd {
        DatapathCommand::Status { pin_root } => {
            let status = tollgate_datapath::status(pin_root).with_context(|| {
                format!("reading the datapath pinned under {}", pin_root.display())
            })?;
            print!("{status}");
            Ok(true)
        }
    }
}
