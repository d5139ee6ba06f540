//! `tollgate test FILE|DIR...`: run PolicyTest files, one line per case, then exactly
//! `N passed, M failed`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use tollgate_policy::check::PeerSpec;
use tollgate_policy::endpoints::{EndpointSpec, Inventory, NamespaceSpec};
use tollgate_policy::eval::{Decision, Evaluator};
use tollgate_policy::load::PolicySet;
use tollgate_policy::model::Protocol;
use tollgate_policy::yaml;

use crate::files::yaml_files;
use crate::request::{RequestSpec, check_request};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyTest {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    #[serde(default)]
    policies: Vec<PolicyRef>,
    #[serde(default)]
    endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    namespaces: Vec<NamespaceSpec>,
    #[serde(default)]
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyRef {
    path: Option<String>,
    inline: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    from: String,
    to: String,
    port: u16,
    protocol: Option<String>,
    request: Option<RequestSpec>,
    expect: String,
    rule: Option<String>,
}

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
}

pub fn run(paths: &[PathBuf], verbose: bool) -> Result<bool> {
    let mut tally = Tally::default();
    let mut files = 0;
    for f in yaml_files(paths)? {
        let src = std::fs::read_to_string(&f).with_context(|| format!("{}", f.display()))?;
        let docs = match yaml::parse_documents(&src) {
            Ok(d) => d,
            Err(e) => {
                println!(
                    "FAIL {}:{}: invalid YAML: {}",
                    f.display(),
                    e.line,
                    e.message
                );
                tally.failed += 1;
                continue;
            }
        };
        for doc in docs {
            if doc.value.get("kind").and_then(|k| k.as_str()) != Some("PolicyTest") {
                continue;
            }
            files += 1;
            if let Err(e) = run_file(&f, &doc, &mut tally, verbose) {
                println!("FAIL {}: {e:#}", f.display());
                tally.failed += 1;
            }
        }
    }
    if files == 0 {
        bail!("no PolicyTest documents found in the given paths");
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    Ok(tally.failed == 0)
}

fn run_file(file: &Path, doc: &yaml::Document, tally: &mut Tally, verbose: bool) -> Result<()> {
    let t: PolicyTest = serde_path_to_error::deserialize(doc.value.clone()).map_err(|e| {
        let p = e.path().to_string();
        anyhow::anyhow!("line {}: {p}: {}", doc.line_of(&p), e.inner())
    })?;
    let _ = &t.metadata;
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut set = PolicySet::default();
    for (i, p) in t.policies.iter().enumerate() {
        match (&p.path, &p.inline) {
            (Some(path), None) => {
                let full = dir.join(path);
                let files = yaml_files(std::slice::from_ref(&full))
                    .with_context(|| format!("policies[{i}].path"))?;
                for pf in files {
                    let src = std::fs::read_to_string(&pf)
                        .with_context(|| format!("policies[{i}].path: {}", pf.display()))?;
                    set.load_str(&pf.display().to_string(), &src);
                }
            }
            (None, Some(src)) => {
                set.load_str(&format!("{}#policies[{i}]", file.display()), src);
            }
            _ => bail!("policies[{i}]: exactly one of `path` or `inline` is needed"),
        }
    }
    if !set.diagnostics.is_empty() {
        for d in &set.diagnostics {
            println!("FAIL {}: policy error: {d}", file.display());
        }
        tally.failed += 1;
    }
    let inv = Inventory::new(t.endpoints.clone(), t.namespaces.clone())
        .map_err(|e| anyhow::anyhow!("endpoints: {e}"))?;
    let eval = Evaluator::new(set.rules);
    for (i, c) in t.cases.iter().enumerate() {
        let label = format!("{}: {}", file.display(), c.name);
        match run_case(&eval, &inv, c) {
            Ok((true, detail)) => {
                tally.passed += 1;
                if verbose {
                    println!("PASS {label} ({detail})");
                } else {
                    println!("PASS {label}");
                }
            }
            Ok((false, detail)) => {
                tally.failed += 1;
                println!("FAIL {label}: {detail}");
            }
            Err(e) => {
                tally.failed += 1;
                println!("FAIL {label}: cases[{i}]: {e:#}");
            }
        }
    }
    Ok(())
}

fn run_case(eval: &Evaluator, inv: &Inventory, c: &Case) -> Result<(bool, String)> {
    let from = PeerSpec::parse(&c.from).map_err(|e| anyhow::anyhow!("from: {e}"))?;
    let to = PeerSpec::parse(&c.to).map_err(|e| anyhow::anyhow!("to: {e}"))?;
    let protocol = match c.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(p) => Protocol::parse(p).ok_or_else(|| anyhow::anyhow!("protocol: unknown `{p}`"))?,
    };
    let expect = match c.expect.as_str() {
        "allow" => Decision::Allow,
        "deny" => Decision::Deny,
        "audit-deny" => Decision::AuditDeny,
        other => bail!("expect: `{other}` is not allow, deny or audit-deny"),
    };
    let result = check_request(eval, inv, &from, &to, c.port, protocol, c.request.as_ref())?;
    let got_rule = result.deciding.rule_ref();
    let detail = format!(
        "{} by {} ({}{})",
        result.decision.as_str(),
        got_rule.as_deref().unwrap_or("no rule"),
        result.deciding.reason.describe(),
        result
            .deciding
            .detail
            .as_ref()
            .map(|d| format!(": {d}"))
            .unwrap_or_default()
    );
    let mut ok = result.decision == expect;
    let mut msg = if ok {
        detail.clone()
    } else {
        format!("expected {}, got {detail}", expect.as_str())
    };
    if ok
        && let Some(want) = &c.rule
        && got_rule.as_deref() != Some(want.as_str())
    {
        ok = false;
        msg = format!(
            "expected rule `{want}`, got `{}` ({detail})",
            got_rule.as_deref().unwrap_or("none")
        );
    }
    Ok((ok, msg))
}
