//! Audit records: one JSON object per line for every denied (or audit-mode would-deny)
//! request or connection. Schema: `docs/audit-log.md` (`"schema": "tollgate.audit/v1"`).
//!
//! The request path never blocks on the sink: records go through a bounded queue with
//! `try_send`; when the queue is full the record is shed and counted. The writer task writes
//! a `records_lost` record with the running count whenever it grew, so nothing is lost
//! silently, and [`AuditSink::shed`] exposes the count for metrics and tests.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;
use tollgate_policy::eval::{Decision, Verdict};
use tollgate_policy::model::Direction;

/// Where records go.
#[derive(Debug, Clone)]
pub enum Output {
    Stdout,
    File(std::path::PathBuf),
    /// A file rotated by size: when the next record would take it past `max_bytes`, `path`
    /// becomes `path.1` (`path.1` becomes `path.2`, …, keeping `keep` old files) and a new
    /// `path` is started. A record is never split across files.
    Rotating {
        path: std::path::PathBuf,
        max_bytes: u64,
        keep: usize,
    },
}

impl Output {
    pub fn parse(s: &str) -> anyhow::Result<Output> {
        Ok(match s {
            "-" | "stdout" => Output::Stdout,
            path => Output::File(path.into()),
        })
    }

    /// A file output rotated at `max_bytes` (0: never) keeping `keep` old files.
    pub fn parse_rotating(s: &str, max_bytes: u64, keep: usize) -> anyhow::Result<Output> {
        Ok(match Output::parse(s)? {
            Output::File(path) if max_bytes > 0 => Output::Rotating {
                path,
                max_bytes,
                keep,
            },
            o => o,
        })
    }
}

/// One side of a flow, as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct Peer {
    pub ip: String,
    pub port: u16,
    pub identity: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpFields {
    pub method: String,
    pub host: String,
    pub path: String,
    pub version: String,
    /// Selected headers; values of other headers are never logged.
    pub headers: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GrpcFields {
    pub service: String,
    pub method: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsFields {
    /// The ClientHello's server name (absent when the client sent none).
    pub sni: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DnsFields {
    /// The question's name (lowercase, trailing dot).
    pub qname: String,
    pub qtype: String,
    /// The rcode the client was answered with.
    pub rcode: String,
    /// `udp` | `tcp`.
    pub transport: &'static str,
}

/// A Kafka request (one record per request; `topics` lists every topic it named).
#[derive(Debug, Clone, Default, Serialize)]
pub struct KafkaFields {
    /// The API's protocol name (`produce`, `fetch`, …), or `unknown`.
    pub api_key: String,
    pub api_key_id: i16,
    pub api_version: i16,
    pub correlation_id: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
    /// Consumer groups the request named.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub transactional_ids: Vec<String>,
    /// The error code the client was answered with (absent when forwarded, or when the
    /// connection was closed instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i16>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyRef {
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

/// One audit record (schema `tollgate.audit/v1`).
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub schema: &'static str,
    pub time: String,
    pub node: String,
    pub direction: &'static str,
    /// `denied` | `audit-denied` | `allowed` (only for rules with `log`).
    pub verdict: &'static str,
    pub reason: String,
    /// `http` | `grpc` | `tcp` | `tls` | `dns` | `kafka`.
    pub protocol: &'static str,
    pub source: Peer,
    pub destination: Peer,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpFields>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcFields>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFields>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsFields>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaFields>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub enforcement: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    pub policy_revision: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

pub const SCHEMA: &str = "tollgate.audit/v1";

impl Record {
    /// The record of a decision, without protocol fields; `None` for an allow, unless the
    /// deciding rule has `log` set (visibility).
    pub fn of_verdict(
        v: &Verdict,
        protocol: &'static str,
        source: Peer,
        destination: Peer,
        node: &str,
        policy_revision: u64,
    ) -> Option<Record> {
        let verdict = match v.decision {
            Decision::Deny => "denied",
            Decision::AuditDeny => "audit-denied",
            // Visibility: a rule with `log` set has the requests it allows recorded too.
            Decision::Allow if v.log.is_some() => "allowed",
            Decision::Allow => return None,
        };
        Some(Record {
            schema: SCHEMA,
            time: now_rfc3339(),
            node: node.to_string(),
            direction: match v.direction {
                Direction::Ingress => "ingress",
                Direction::Egress => "egress",
            },
            verdict,
            reason: serde_json::to_value(v.reason)
                .ok()
                .and_then(|x| x.as_str().map(str::to_string))
                .unwrap_or_default(),
            protocol,
            source,
            destination,
            http: None,
            grpc: None,
            tls: None,
            dns: None,
            kafka: None,
            policy: v.policy.as_ref().map(|p| PolicyRef {
                kind: p.kind.as_str().to_string(),
                namespace: p.namespace.as_deref().map(str::to_string),
                name: p.name.to_string(),
            }),
            rule: v.rule.as_deref().map(str::to_string),
            enforcement: v.enforcement.as_str(),
            log: v.log.clone(),
            policy_revision,
            trace_id: None,
            detail: v.detail.clone(),
        })
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

pub fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// The sending side of the audit queue; cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<Record>,
    shed: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    tap: Arc<crate::observe::Tap>,
}

impl AuditSink {
    /// Start the writer task (needs a tokio runtime).
    pub fn start(output: Output, capacity: usize) -> AuditSink {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let sink = AuditSink {
            tx,
            shed: Arc::new(AtomicU64::new(0)),
            written: Arc::new(AtomicU64::new(0)),
            tap: Arc::new(crate::observe::Tap::new(4096, 4096)),
        };
        tokio::spawn(writer(
            Sink::open(&output, sink.tap.clone()),
            rx,
            sink.shed.clone(),
            sink.written.clone(),
        ));
        sink
    }

    /// Every line written, for `Observe` streams.
    pub fn tap(&self) -> Arc<crate::observe::Tap> {
        self.tap.clone()
    }

    /// Queue a record without ever waiting; a full queue sheds it and counts it.
    pub fn record(&self, r: Record) {
        if self.tx.try_send(r).is_err() {
            self.shed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records shed so far.
    pub fn shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    /// Records written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Records waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// The writer's end of an [`Output`]: whole lines, rotation between them.
struct Sink {
    out: Box<dyn Write + Send>,
    /// Bytes in the current file, and the rotation settings (`path`, `max_bytes`, `keep`).
    size: u64,
    rotate: Option<(std::path::PathBuf, u64, usize)>,
    tap: Arc<crate::observe::Tap>,
}

fn open_append(p: &std::path::Path) -> Box<dyn Write + Send> {
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
    {
        Ok(f) => Box::new(std::io::BufWriter::new(f)),
        Err(e) => {
            eprintln!(
                "tollgate proxy: cannot open audit log {}: {e}; writing to stderr",
                p.display()
            );
            Box::new(std::io::stderr())
        }
    }
}

impl Sink {
    fn open(output: &Output, tap: Arc<crate::observe::Tap>) -> Sink {
        let (out, size, rotate): (Box<dyn Write + Send>, u64, _) = match output {
            Output::Stdout => (Box::new(std::io::stdout()), 0, None),
            Output::File(p) => (open_append(p), 0, None),
            Output::Rotating {
                path,
                max_bytes,
                keep,
            } => (
                open_append(path),
                std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
                Some((path.clone(), (*max_bytes).max(1), *keep)),
            ),
        };
        Sink {
            out,
            size,
            rotate,
            tap,
        }
    }

    fn line(&mut self, line: &str) {
        let len = line.len() as u64 + 1;
        if let Some((path, max, keep)) = &self.rotate
            && self.size > 0
            && self.size + len > *max
        {
            let _ = self.out.flush();
            let name = |i: usize| {
                let mut s = path.as_os_str().to_owned();
                s.push(format!(".{i}"));
                std::path::PathBuf::from(s)
            };
            let _ = std::fs::remove_file(name(*keep));
            for i in (1..*keep).rev() {
                let _ = std::fs::rename(name(i), name(i + 1));
            }
            if *keep > 0 {
                let _ = std::fs::rename(path, name(1));
            } else {
                let _ = std::fs::remove_file(path);
            }
            self.out = open_append(path);
            self.size = 0;
        }
        let _ = writeln!(self.out, "{line}");
        self.size += len;
        self.tap.publish(line);
    }

    fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

async fn writer(
    mut out: Sink,
    mut rx: mpsc::Receiver<Record>,
    shed: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
) {
    let mut reported = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Some(rec) => {
                    if let Ok(line) = serde_json::to_string(&rec) {
                        out.line(&line);
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                    // Drain what is queued before flushing.
                    while let Ok(rec) = rx.try_recv() {
                        if let Ok(line) = serde_json::to_string(&rec) {
                            out.line(&line);
                            written.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    out.flush();
                }
                None => break,
            },
            _ = tick.tick() => {
                let lost = shed.load(Ordering::Relaxed);
                if lost > reported {
                    let line = serde_json::json!({
                        "schema": SCHEMA, "time": now_rfc3339(), "type": "records_lost",
                        "count": lost, "since_last": lost - reported,
                    });
                    out.line(&line.to_string());
                    out.flush();
                    reported = lost;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u32) -> Record {
        let peer = Peer {
            ip: "127.0.0.1".into(),
            port: 1,
            identity: i,
            namespace: None,
            name: None,
            labels: vec![],
        };
        Record {
            schema: SCHEMA,
            time: now_rfc3339(),
            node: "n".into(),
            direction: "ingress",
            verdict: "denied",
            reason: "default-deny".into(),
            protocol: "tcp",
            source: peer.clone(),
            destination: peer,
            http: None,
            grpc: None,
            tls: None,
            dns: None,
            kafka: None,
            policy: None,
            rule: None,
            enforcement: "enforce",
            log: None,
            policy_revision: 1,
            trace_id: None,
            detail: None,
        }
    }

    /// On a current-thread runtime the writer cannot run while we send without yielding, so
    /// a queue of 8 sheds everything past 8: written + shed must equal sent, exactly, and the
    /// loss must be written down as a `records_lost` record.
    #[tokio::test(flavor = "current_thread")]
    async fn shed_records_are_counted_and_reported_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = AuditSink::start(Output::File(path.clone()), 8);
        const SENT: u64 = 50_000;
        for i in 0..SENT {
            sink.record(record(i as u32));
        }
        assert_eq!(sink.shed(), SENT - 8);
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.contains("records_lost") {
                break;
            }
        }
        assert_eq!(sink.written() + sink.shed(), SENT);
        let text = std::fs::read_to_string(&path).unwrap();
        let lost: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["type"] == "records_lost")
            .collect();
        assert_eq!(lost.len(), 1, "{text}");
        assert_eq!(lost[0]["count"], SENT - 8);
        assert_eq!(text.lines().count() as u64, 8 + 1);
    }

    #[tokio::test]
    async fn the_file_rotates_by_size_between_records_keeping_n_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let one = serde_json::to_string(&record(1)).unwrap().len() as u64 + 1;
        let sink = AuditSink::start(
            Output::Rotating {
                path: path.clone(),
                max_bytes: one * 3,
                keep: 2,
            },
            1024,
        );
        for i in 0..10 {
            sink.record(record(i));
        }
        for _ in 0..200 {
            if sink.written() == 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(sink.written(), 10);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let lines = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["source"]["identity"]
                        .as_u64()
                        .unwrap()
                })
                .collect::<Vec<_>>()
        };
        // 10 records of equal size, 3 per file: 9 rotated out, the oldest files dropped.
        assert_eq!(lines(&path), vec![9]);
        assert_eq!(lines(&dir.path().join("audit.jsonl.1")), vec![6, 7, 8]);
        assert_eq!(lines(&dir.path().join("audit.jsonl.2")), vec![3, 4, 5]);
        assert!(!dir.path().join("audit.jsonl.3").exists());
    }
}
