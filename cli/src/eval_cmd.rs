//! `tollgate eval`: what-if for one connection or request, printing verdict, policy and rule.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use tollgate_policy::api::StringLike;
use tollgate_policy::check::{CheckResult, PeerSpec};
use tollgate_policy::endpoints::Inventory;
use tollgate_policy::eval::{Decision, Evaluator, Verdict};
use tollgate_policy::model::Protocol;

use crate::files::load_policies;
use crate::request::{DnsSpec, GrpcSpec, HttpSpec, KafkaSpec, RequestSpec, check_request};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Policy files or directories.
    #[arg(short = 'f', long = "file", required = true, num_args = 1..)]
    files: Vec<PathBuf>,
    /// Endpoints inventory (YAML).
    #[arg(long)]
    endpoints: Option<PathBuf>,
    /// Source: endpoint name | world | host | cidr:IP | fqdn:NAME.
    #[arg(long)]
    from: String,
    /// Destination: endpoint name | world | host | cidr:IP | fqdn:NAME.
    #[arg(long)]
    to: String,
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "TCP")]
    protocol: String,
    #[arg(long)]
    http_method: Option<String>,
    #[arg(long)]
    http_path: Option<String>,
    #[arg(long)]
    http_host: Option<String>,
    /// HTTP header, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// gRPC call, `package.Service/Method`.
    #[arg(long)]
    grpc: Option<String>,
    /// Kafka API key: a name (produce, fetch, …) or a number.
    #[arg(long)]
    kafka_api_key: Option<String>,
    #[arg(long)]
    kafka_api_version: Option<i16>,
    #[arg(long)]
    kafka_client_id: Option<String>,
    #[arg(long)]
    kafka_topic: Vec<String>,
    #[arg(long)]
    kafka_group_id: Option<String>,
    #[arg(long)]
    kafka_transactional_id: Option<String>,
    #[arg(long)]
    dns_qname: Option<String>,
    #[arg(long)]
    dns_qtype: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl EvalArgs {
    fn request(&self) -> Result<Option<RequestSpec>> {
        let mut spec = RequestSpec::default();
        let http = self.http_method.is_some()
            || self.http_path.is_some()
            || self.http_host.is_some()
            || !self.headers.is_empty();
        if http {
            let mut h = HttpSpec {
                method: self
                    .http_method
                    .clone()
                    .unwrap_or_else(|| "GET".to_string()),
                path: self.http_path.clone().unwrap_or_else(|| "/".to_string()),
                host: self.http_host.clone(),
                ..Default::default()
            };
            for hv in &self.headers {
                let Some((k, v)) = hv.split_once(':') else {
                    bail!("-H `{hv}`: expected `Name: value`");
                };
                h.headers
                    .insert(k.trim().to_string(), StringLike(v.trim().to_string()));
            }
            spec.http = Some(h);
        }
        if let Some(g) = &self.grpc {
            let Some((service, method)) = g.trim_start_matches('/').split_once('/') else {
                bail!("--grpc `{g}`: expected `package.Service/Method`");
            };
            spec.grpc = Some(GrpcSpec {
                service: service.to_string(),
                method: method.to_string(),
                host: self.http_host.clone(),
            });
        }
        if let Some(k) = &self.kafka_api_key {
            spec.kafka = Some(KafkaSpec {
                api_key: StringLike(k.clone()),
                api_version: self.kafka_api_version,
                client_id: self.kafka_client_id.clone(),
                topics: self.kafka_topic.clone(),
                group_id: self.kafka_group_id.clone(),
                transactional_id: self.kafka_transactional_id.clone(),
            });
        }
        if let Some(q) = &self.dns_qname {
            spec.dns = Some(DnsSpec {
                qname: q.clone(),
                _qtype: self.dns_qtype.clone(),
            });
        }
        let n = [
            spec.http.is_some(),
            spec.grpc.is_some(),
            spec.kafka.is_some(),
            spec.dns.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        match n {
            0 => Ok(None),
            1 => Ok(Some(spec)),
            _ => bail!("give the flags of one request kind only (http, grpc, kafka or dns)"),
        }
    }
}

pub fn run(args: &EvalArgs) -> Result<bool> {
    let set = load_policies(&args.files)?;
    for d in &set.diagnostics {
        eprintln!("warning: {d} (this rule was not loaded)");
    }
    let inv = match &args.endpoints {
        None => Inventory::default(),
        Some(p) => {
            let src = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
            Inventory::from_yaml(&src).with_context(|| format!("{}", p.display()))?
        }
    };
    let from = PeerSpec::parse(&args.from).map_err(|e| anyhow::anyhow!("--from {e}"))?;
    let to = PeerSpec::parse(&args.to).map_err(|e| anyhow::anyhow!("--to {e}"))?;
    let protocol = Protocol::parse(&args.protocol)
        .ok_or_else(|| anyhow::anyhow!("--protocol: unknown `{}`", args.protocol))?;
    let eval = Evaluator::new(set.rules);
    let request = args.request()?;
    let result = check_request(
        &eval,
        &inv,
        &from,
        &to,
        args.port,
        protocol,
        request.as_ref(),
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print_result(&result);
    }
    Ok(result.decision != Decision::Deny)
}

fn print_result(r: &CheckResult) {
    println!("{}", r.decision.as_str().to_uppercase());
    print_verdict("decided by", &r.deciding);
    if r.egress.is_none() && r.ingress.is_none() {
        return;
    }
    for (name, v) in [("egress ", &r.egress), ("ingress", &r.ingress)] {
        match v {
            Some(v) => println!(
                "  {name}: {:<10} {} — {}",
                v.decision.as_str(),
                v.rule_ref().unwrap_or_else(|| "-".to_string()),
                v.reason.describe()
            ),
            None => println!("  {name}: not checked (the peer is not a managed endpoint)"),
        }
    }
}

fn print_verdict(label: &str, v: &Verdict) {
    println!(
        "  {label}: {} ({}, {} mode{})",
        v.rule_ref().unwrap_or_else(|| "no rule".to_string()),
        v.reason.describe(),
        v.enforcement.as_str(),
        v.log
            .as_ref()
            .map(|l| format!(", log: {l}"))
            .unwrap_or_default()
    );
    if let Some(d) = &v.detail {
        println!("  detail: {d}");
    }
    if !v.denied_topics.is_empty() {
        println!("  denied topics: {}", v.denied_topics.join(", "));
    }
}
