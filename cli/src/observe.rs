//! `tollgate observe`: read audit records (JSON lines) with filters, like `hubble observe`.
//! Reads the proxy's `--audit-log` file (`--follow` keeps reading as records are appended), or
//! with `--server SOCK` the proxy's `Observe` gRPC stream (`tollgate proxy --observe-socket`),
//! where the proxy applies the filter.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::Value;
use tollgate_api::v1::ObserveRequest;
use tollgate_api::v1::observe_client::ObserveClient;
use tollgate_proxy::observe::RecordFilter;

#[derive(Debug, Args)]
pub struct ObserveArgs {
    /// The audit log the proxy writes (`tollgate proxy --audit-log FILE`).
    #[arg(long, short = 'f', default_value = "/var/log/tollgate/audit.jsonl")]
    file: PathBuf,
    /// Read from the proxy's Observe stream on this Unix socket instead of a file
    /// (`tollgate proxy --observe-socket SOCK`).
    #[arg(long, conflicts_with = "file")]
    server: Option<PathBuf>,
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
    if r["type"] == "observer_lagged" {
        println!(
            "{}  THIS STREAM LOST {} RECORDS (observer too slow; the log has them)",
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
    let filter = RecordFilter {
        verdict: args.verdict.clone(),
        protocol: args.protocol.clone(),
        from: args.from.clone(),
        to: args.to.clone(),
        http_path: args
            .http_path
            .as_deref()
            .map(RecordFilter::path_regex)
            .transpose()
            .context("--http-path")?,
        since: args.since.map(|d| SystemTime::now() - Duration::from(d)),
    };
    let json = match args.output.as_str() {
        "json" => true,
        "table" => false,
        o => anyhow::bail!("-o {o}: expected json or table"),
    };
    if let Some(socket) = &args.server {
        return from_server(args, socket, json);
    }
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

/// Follow the proxy's Observe stream; the proxy filters.
fn from_server(args: &ObserveArgs, socket: &std::path::Path, json: bool) -> Result<bool> {
    let req = ObserveRequest {
        follow: args.follow,
        since_seconds: args.since.map_or(0, |d| Duration::from(d).as_secs().max(1)),
        verdict: args.verdict.clone().unwrap_or_default(),
        protocol: args.protocol.clone().unwrap_or_default(),
        from: args.from.clone().unwrap_or_default(),
        to: args.to.clone().unwrap_or_default(),
        http_path: args.http_path.clone().unwrap_or_default(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut client = ObserveClient::new(tollgate_api::unix_channel(socket));
        let mut stream = client
            .observe(req)
            .await
            .with_context(|| format!("Observe on {}", socket.display()))?
            .into_inner();
        while let Some(rec) = stream.message().await? {
            match serde_json::from_str::<Value>(&rec.json) {
                Ok(r) => print(&r, json),
                Err(e) => eprintln!("skipping a record that is not JSON: {e}"),
            }
        }
        Ok(true)
    })
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
