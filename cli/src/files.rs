//! Finding and reading the YAML files users point the CLI at.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tollgate_policy::load::PolicySet;

/// Expand files and directories (recursively: `*.yaml`, `*.yml`) in a stable order.
pub fn yaml_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
    Ok(())
}

/// Load every policy document of `paths` into one set (documents of other kinds are skipped
/// and listed in `PolicySet::skipped`).
pub fn load_policies(paths: &[PathBuf]) -> Result<PolicySet> {
    let mut set = PolicySet::default();
    for f in yaml_files(paths)? {
        let src = std::fs::read_to_string(&f).with_context(|| format!("{}", f.display()))?;
        set.load_str(&f.display().to_string(), &src);
    }
    Ok(set)
}
