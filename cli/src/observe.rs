//! `tollgate observe`: read audit records (JSON lines) with filters, like `hubble observe`.
//! Reads the proxy's `--audit-log` file; `--follow` keeps reading as records are appended.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::Args;
use regex::Regex;
use serde_json::Value;

#[derive(Debug, Args)]
pub struct ObserveArgs {
    /// The audit log the proxy writes (`tollgate proxy --audit-log FILE`).
    #[arg(long, short = 'f', default_value = "/var/log/tollgate/audit.jsonl")]
    file: PathBuf,
    /// Keep reading new records as they are written.
    #[arg(long)]
    follow: bool,
    /// denied | audit-denied | allowed (rules with `log`)
    #[arg(long)]
    verdict: Option<String>,
    /// http | grpc | tls | tcp | dns | kafka
    #[arg(long)]
    protocol: Option<String>,
    /// Source: an endpoint name, `namespace/name`, or a label `key=value`.
    #[arg(long)]
    from: Option<String>,
    /// Destination: an endpoint name, `namespace/name`, or a label `key=value`.
    #[arg(long)]
    to: Option<String>,
    /// Full-match regex on the HTTP path.
    #[arg(long)]
    http_path: Option<String>,
    /// Only records newer than this (e.g. 5m, 1h).
    #[arg(long)]
    since: Option<humantime::Duration>,
    /// json | table
    #[arg(long, short = 'o', default_value = "table")]
    output: String,
}

struct Filter {
    verdict: Option<String>,
    protocol: Option<String>,
    from: Option<String>,
    to: Option<String>,
    path: Option<Regex>,
    since: Option<SystemTime>,
}

fn peer_matches(peer: &Value, want: &str) -> bool {
    let name = peer["name"].as_str().unwrap_or("");
    let ns = peer["namespace"].as_str().unwrap_or("");
    if want == name || want == format!("{ns}/{name}") || want == peer["ip"].as_str().unwrap_or("") {
        return true;
    }
    want.contains('=')
        && peer["labels"].as_array().is_some_and(|ls| {
            ls.iter()
                .any(|l| l.as_str().is_some_and(|l| l.ends_with(&format!(":{want}"))))
        })
}

impl Filter {
    fn keep(&self, r: &Value) -> bool {
        if r["type"] == "records_lost" {
            return true; // never hide lost-record notices
        }
        self.verdict.as_deref().is_none_or(|v| r["verdict"] == v)
            && self.protocol.as_deref().is_none_or(|p| r["protocol"] == p)
            && self
                .from
                .as_deref()
                .is_none_or(|f| peer_matches(&r["source"], f))
            && self
                .to
                .as_deref()
                .is_none_or(|t| peer_matches(&r["destination"], t))
            && self
                .path
                .as_ref()
                .is_none_or(|re| r["http"]["path"].as_str().is_some_and(|p| re.is_match(p)))
            && self.since.is_none_or(|since| {
                r["time"]
                    .as_str()
                    .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
                    .is_some_and(|t| t >= since)
            })
    }
}

fn print(r: &Value, json: bool) {
    if json {
        println!("{r}");
        return;
    }
    if r["type"] == "records_lost" {
        println!(
            "{}  RECORDS LOST: {} so far",
            r["time"].as_str().unwrap_or(""),
            r["count"]
        );
        return;
    }
    let peer = |p: &Value| match (p["namespace"].as_str(), p["name"].as_str()) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        _ => p["ip"].as_str().unwrap_or("?").to_string(),
    };
    let what = match r["protocol"].as_str() {
        Some("http") => format!(
            "{} {}{}",
            r["http"]["method"].as_str().unwrap_or(""),
            r["http"]["host"].as_str().unwrap_or(""),
            r["http"]["path"].as_str().unwrap_or("")
        ),
        Some("grpc") => format!(
            "{}/{}",
            r["grpc"]["service"].as_str().unwrap_or(""),
            r["grpc"]["method"].as_str().unwrap_or("")
        ),
        Some("tls") => format!("sni={}", r["tls"]["sni"].as_str().unwrap_or("-")),
        Some("dns") => format!(
            "{} {} -> {} ({})",
            r["dns"]["qtype"].as_str().unwrap_or(""),
            r["dns"]["qname"].as_str().unwrap_or(""),
            r["dns"]["rcode"].as_str().unwrap_or(""),
            r["dns"]["transport"].as_str().unwrap_or("")
        ),
        Some("kafka") => kafka_summary(&r["kafka"]),
        _ => format!("port {}", r["destination"]["port"]),
    };
    let policy = match (
        r["policy"]["namespace"].as_str(),
        r["policy"]["name"].as_str(),
    ) {
        (Some(ns), Some(n)) => format!("{ns}/{n} {}", r["rule"].as_str().unwrap_or("")),
        (None, Some(n)) => format!("{n} {}", r["rule"].as_str().unwrap_or("")),
        _ => "-".to_string(),
    };
    println!(
        "{}  {:<12} {:<5} {} -> {}  {}  [{}] {}",
        r["time"].as_str().unwrap_or(""),
        r["verdict"].as_str().unwrap_or(""),
        r["protocol"].as_str().unwrap_or(""),
        peer(&r["source"]),
        peer(&r["destination"]),
        what,
        r["reason"].as_str().unwrap_or(""),
        policy
    );
}

pub fn run(args: &ObserveArgs) -> Result<bool> {
    let filter = Filter {
        verdict: args.verdict.clone(),
        protocol: args.protocol.clone(),
        from: args.from.clone(),
        to: args.to.clone(),
        path: args
            .http_path
            .as_deref()
            .map(|p| Regex::new(&format!("^(?:{p})$")))
            .transpose()
            .context("--http-path")?,
        since: args.since.map(|d| SystemTime::now() - Duration::from(d)),
    };
    let json = match args.output.as_str() {
        "json" => true,
        "table" => false,
        o => anyhow::bail!("-o {o}: expected json or table"),
    };
    let file =
        std::fs::File::open(&args.file).with_context(|| format!("open {}", args.file.display()))?;
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            if !args.follow {
                break;
            }
            // Partial line: rewind and wait for the rest.
            if n > 0 {
                reader.seek(SeekFrom::Current(-(n as i64)))?;
            }
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(r) if filter.keep(&r) => print(&r, json),
            Ok(_) => {}
            Err(e) => eprintln!("skipping a line that is not a record: {e}"),
        }
    }
    Ok(true)
}

/// `produce v9 [orders,secret] group=g txn=t client=c -> 29` for a Kafka record.
fn kafka_summary(k: &Value) -> String {
    let list = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    let mut out = format!(
        "{} v{}",
        k["api_key"].as_str().unwrap_or("?"),
        k["api_version"].as_i64().unwrap_or(-1)
    );
    let topics = list(&k["topics"]);
    if !topics.is_empty() {
        out.push_str(&format!(" [{topics}]"));
    }
    for (label, field) in [("group", "groups"), ("txn", "transactional_ids")] {
        let v = list(&k[field]);
        if !v.is_empty() {
            out.push_str(&format!(" {label}={v}"));
        }
    }
    if let Some(c) = k["client_id"].as_str() {
        out.push_str(&format!(" client={c}"));
    }
    match k["error_code"].as_i64() {
        Some(e) => out.push_str(&format!(" -> error {e}")),
        None => out.push_str(" -> closed"),
    }
    out
}
