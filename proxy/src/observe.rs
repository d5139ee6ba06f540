//! Audit records for observers: the filter `tollgate observe` applies (to a log file, or here
//! in the proxy for the `Observe` gRPC stream), the tap the audit writer feeds, and the
//! `Observe` service (`--observe-socket SOCK`).
//!
//! Why in the proxy: `hubble observe`-style following should not need access to the node's
//! log files, and a filter applied at the source sends only what was asked for. The tap sits
//! after the audit queue (the writer publishes each line it writes), so observing never adds
//! work to the request path; a slow observer loses records from *its* stream, never from the
//! log, and is told how many with an `observer_lagged` record.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use regex::Regex;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};
use tollgate_api::v1::{AuditRecord, ObserveRequest, observe_server};

/// Which records an observer wants (every set field must match).
#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    pub verdict: Option<String>,
    pub protocol: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// Full match on the HTTP path.
    pub http_path: Option<Regex>,
    pub since: Option<SystemTime>,
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

impl RecordFilter {
    /// A full-match regex for `--http-path`.
    pub fn path_regex(p: &str) -> Result<Regex> {
        Regex::new(&format!("^(?:{p})$")).with_context(|| format!("http path regex `{p}`"))
    }

    /// The filter an `Observe` call asks for.
    pub fn from_request(r: &ObserveRequest) -> Result<RecordFilter> {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Ok(RecordFilter {
            verdict: some(&r.verdict),
            protocol: some(&r.protocol),
            from: some(&r.from),
            to: some(&r.to),
            http_path: some(&r.http_path)
                .map(|p| RecordFilter::path_regex(&p))
                .transpose()?,
            since: (r.since_seconds > 0)
                .then(|| SystemTime::now() - Duration::from_secs(r.since_seconds)),
        })
    }

    /// Whether to show `r`. Notices of lost records are always shown.
    pub fn keep(&self, r: &Value) -> bool {
        if matches!(r["type"].as_str(), Some("records_lost" | "observer_lagged")) {
            return true;
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
                .http_path
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

/// Every line the audit writer writes, for observers: the most recent ones (for calls without
/// `follow`, and as the start of a followed stream) and a broadcast of new ones.
#[derive(Debug)]
pub struct Tap {
    tx: broadcast::Sender<Arc<str>>,
    recent: Mutex<VecDeque<Arc<str>>>,
    keep: usize,
}

impl Tap {
    /// Keep the last `keep` lines; a follower more than `lag` lines behind loses the oldest.
    pub fn new(keep: usize, lag: usize) -> Tap {
        Tap {
            tx: broadcast::channel(lag.max(1)).0,
            recent: Mutex::new(VecDeque::with_capacity(keep.min(4096))),
            keep,
        }
    }

    /// Called by the audit writer for each line written.
    pub fn publish(&self, line: &str) {
        let line: Arc<str> = Arc::from(line);
        if let Ok(mut r) = self.recent.lock() {
            if r.len() == self.keep {
                r.pop_front();
            }
            if self.keep > 0 {
                r.push_back(line.clone());
            }
        }
        // No followers is not an error.
        let _ = self.tx.send(line);
    }

    /// The lines held now and a receiver for the ones after them (no gap, no duplicate: both
    /// are taken under the same lock `publish` takes).
    fn snapshot(&self) -> (Vec<Arc<str>>, broadcast::Receiver<Arc<str>>) {
        match self.recent.lock() {
            Ok(r) => (r.iter().cloned().collect(), self.tx.subscribe()),
            Err(p) => (
                p.into_inner().iter().cloned().collect(),
                self.tx.subscribe(),
            ),
        }
    }
}

/// The `Observe` service over a [`Tap`].
#[derive(Debug, Clone)]
pub struct ObserveService {
    tap: Arc<Tap>,
}

impl ObserveService {
    pub fn new(tap: Arc<Tap>) -> ObserveService {
        ObserveService { tap }
    }

    /// Serve on the Unix socket `path` until the process ends.
    pub async fn serve_unix(self, path: std::path::PathBuf) -> Result<()> {
        let listener = tollgate_api::bind_unix(&path)?;
        tonic::transport::Server::builder()
            .add_service(observe_server::ObserveServer::new(self))
            .serve_with_incoming(tollgate_api::incoming(listener))
            .await
            .context("observe server")
    }
}

fn parse(line: &str) -> Option<Value> {
    serde_json::from_str(line).ok()
}

type Records = tokio_stream::wrappers::ReceiverStream<Result<AuditRecord, tonic::Status>>;

#[tonic::async_trait]
impl observe_server::Observe for ObserveService {
    type ObserveStream = Records;

    async fn observe(
        &self,
        request: tonic::Request<ObserveRequest>,
    ) -> Result<tonic::Response<Records>, tonic::Status> {
        let req = request.into_inner();
        let filter = RecordFilter::from_request(&req)
            .map_err(|e| tonic::Status::invalid_argument(format!("{e:#}")))?;
        let (recent, mut rx) = self.tap.snapshot();
        let (tx, out) = mpsc::channel(256);
        tokio::spawn(async move {
            let send = |line: &str| {
                let tx = tx.clone();
                let rec = AuditRecord {
                    json: line.to_string(),
                };
                async move { tx.send(Ok(rec)).await.is_ok() }
            };
            for line in &recent {
                if parse(line).is_some_and(|v| filter.keep(&v)) && !send(line).await {
                    return;
                }
            }
            if !req.follow {
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(line) => {
                        if parse(&line).is_some_and(|v| filter.keep(&v)) && !send(&line).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let note = serde_json::json!({
                            "schema": crate::audit::SCHEMA, "time": crate::audit::now_rfc3339(),
                            "type": "observer_lagged", "count": n,
                        });
                        if !send(&note.to_string()).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(out),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(verdict: &str, path: &str) -> String {
        serde_json::json!({
            "type": "request", "verdict": verdict, "protocol": "http",
            "time": crate::audit::now_rfc3339(),
            "source": {"name": "web", "namespace": "default", "ip": "10.0.0.1", "labels": ["k8s:app=web"]},
            "destination": {"name": "api", "namespace": "default", "ip": "10.0.0.2"},
            "http": {"path": path},
        })
        .to_string()
    }

    #[test]
    fn filters_match_on_every_field_and_lost_notices_always_pass() {
        let f = RecordFilter::from_request(&ObserveRequest {
            verdict: "denied".into(),
            from: "app=web".into(),
            to: "default/api".into(),
            http_path: "/admin.*".into(),
            ..Default::default()
        })
        .unwrap();
        let v = |s: &str| parse(s).unwrap();
        assert!(f.keep(&v(&rec("denied", "/admin/x"))));
        assert!(!f.keep(&v(&rec("allowed", "/admin/x"))));
        assert!(!f.keep(&v(&rec("denied", "/public"))));
        assert!(f.keep(&v(r#"{"type":"records_lost","count":3}"#)));
        assert!(
            RecordFilter::from_request(&ObserveRequest {
                http_path: "(".into(),
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn the_tap_keeps_the_last_lines_and_followers_see_what_comes_after_without_gaps() {
        let tap = Tap::new(2, 8);
        tap.publish("a");
        tap.publish("b");
        tap.publish("c");
        let (recent, mut rx) = tap.snapshot();
        assert_eq!(recent.iter().map(|s| &**s).collect::<Vec<_>>(), ["b", "c"]);
        tap.publish("d");
        assert_eq!(&*rx.try_recv().unwrap(), "d");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_follower_that_falls_behind_is_told_how_many_it_lost() {
        let tap = Tap::new(0, 2);
        let (_, mut rx) = tap.snapshot();
        for i in 0..5 {
            tap.publish(&i.to_string());
        }
        match rx.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => assert_eq!(n, 3),
            other => panic!("expected a lag notice, got {other:?}"),
        }
    }
}
