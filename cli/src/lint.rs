//! `tollgate lint PATH...`: validate policy files; exit 1 with precise messages on problems.

use std::path::PathBuf;

use anyhow::Result;

use crate::files::load_policies;

pub fn run(paths: &[PathBuf], json: bool) -> Result<bool> {
    let set = load_policies(paths)?;
    if json {
        let out = serde_json::json!({
            "policies": set.policies.len(),
            "rules": set.rules.len(),
            "errors": set.diagnostics,
            "skipped": set.skipped,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for d in &set.diagnostics {
            println!("{d}");
        }
        let skipped = if set.skipped.is_empty() {
            String::new()
        } else {
            format!(", {} non-policy documents skipped", set.skipped.len())
        };
        println!(
            "{} policies, {} rules loaded, {} errors{skipped}",
            set.policies.len(),
            set.rules.len(),
            set.diagnostics.len()
        );
    }
    Ok(set.diagnostics.is_empty())
}
