//! The policy routing that turns the redirect mark into local delivery: `ip rule fwmark M/M
//! lookup T` and `ip route local default dev lo table T`, for IPv4 and IPv6. Without it a
//! packet assigned to the proxy's socket would still be forwarded towards its original
//! destination. Installed with iproute2 (idempotent: existing rules are left alone).
use std::process::Command;

use crate::DatapathError;

/// Where redirected packets are routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedirectRouting {
    /// The redirect mark (must equal `Config::redirect_mark`).
    pub mark: u32,
    /// Routing table holding the `local default` route.
    pub table: u32,
    /// Priority of the `ip rule`.
    pub priority: u32,
}

impl Default for RedirectRouting {
    fn default() -> Self {
        Self {
            mark: tollgate_datapath_common::Config::default().redirect_mark,
            table: 2_571,
            priority: 90,
        }
    }
}

fn ip(args: &[&str]) -> Result<String, DatapathError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| DatapathError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(DatapathError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

impl RedirectRouting {
    fn rule_args(&self) -> [String; 6] {
        [
            "fwmark".to_owned(),
            format!("{:#x}/{:#x}", self.mark, self.mark),
            "lookup".to_owned(),
            self.table.to_string(),
            "priority".to_owned(),
            self.priority.to_string(),
        ]
    }

    /// Installs the rule and route for both families (in the caller's network namespace).
    pub fn install(&self) -> Result<(), DatapathError> {
        let table = self.table.to_string();
        for fam in ["-4", "-6"] {
            let rules = ip(&[fam, "rule", "show", "priority", &self.priority.to_string()])?;
            if !rules.contains(&format!("lookup {table}")) {
                let rule = self.rule_args();
                let mut args = vec![fam, "rule", "add"];
                args.extend(rule.iter().map(String::as_str));
                ip(&args)?;
            }
            ip(&[
                fam, "route", "replace", "local", "default", "dev", "lo", "table", &table,
            ])?;
        }
        Ok(())
    }

    /// Removes the rule and the table's routes; absent ones are ignored.
    pub fn remove(&self) {
        let table = self.table.to_string();
        for fam in ["-4", "-6"] {
            let rule = self.rule_args();
            let mut args = vec![fam, "rule", "del"];
            args.extend(rule.iter().map(String::as_str));
            let _ = ip(&args);
            let _ = ip(&[fam, "route", "flush", "table", &table]);
        }
    }
}
