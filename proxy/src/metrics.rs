//! Prometheus metrics of the proxy, served on `--metrics ADDR` at `/metrics`.
//!
//! - `tollgate_requests_total{verdict, protocol}`: every decided request or connection;
//! - `tollgate_rule_hits_total{policy, rule}`: decisions per deciding rule, so unused rules
//!   show up as absent series. Cardinality is bounded: after [`MAX_RULE_SERIES`] distinct
//!   rules, further ones are counted under `policy="_other", rule="_other"`;
//! - `tollgate_proxy_events_total{protocol, event}`: what is not a decision but must not pass
//!   silently (DNS upstream timeouts, malformed queries, shed load, truncated answers);
//! - `tollgate_request_duration_seconds{protocol}`: arrival-to-answer latency histogram;
//! - `tollgate_proxy_fqdn_answers_total{outcome}` (`--agent` mode): DNS answers that taught IPs
//!   the agent did not have yet, by what released them — `confirmed` (the agent wrote them to the
//!   kernel first), `timeout` (the hold limit passed first), `agent_away` (no FQDN stream to the
//!   agent), `agent_error` (the agent could not write them); `tollgate_proxy_fqdn_hold_seconds`:
//!   how long held answers waited;
//! - `tollgate_policy_revision`: the revision in force;
//! - `tollgate_audit_queue_depth`: records waiting for the sink;
//! - `tollgate_audit_records_written` / `tollgate_audit_records_shed`: the audit queue (a shed
//!   record is never silent).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tollgate_policy::eval::{Decision, Verdict};
use tollgate_policy::model::PolicyId;

use crate::audit::AuditSink;

pub const MAX_RULE_SERIES: usize = 1024;
/// (policy, rule) pairs whose counter [`Metrics::observe`] remembers.
const MAX_CACHED_RULE_COUNTERS: usize = 4 * MAX_RULE_SERIES;

#[derive(Debug, Default)]
struct RuleCounters {
    map: HashMap<PolicyId, HashMap<String, Counter>>,
    len: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    verdict: &'static str,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleSetLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: &'static str,
}

fn duration_histogram() -> Histogram {
    // 50 µs … ~1.6 s, doubling.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    protocol: &'static str,
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    policy: String,
    rule: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    rule_hits: Family<RuleLabels, Counter>,
    rules_seen: Mutex<HashSet<(String, String)>>,
    /// The counter each (policy, rule) of a decision resolved to, so a decision costs a lookup
    /// by reference — no label strings built, no family lock. Bounded: cleared past
    /// [`MAX_CACHED_RULE_COUNTERS`] entries.
    rule_counters: Mutex<RuleCounters>,
    /// `tollgate_requests_total{protocol="dns"}` by verdict, resolved on first use (a family
    /// lookup per query takes a lock and hashes the labels).
    dns_requests: [OnceLock<Counter>; 3],
    events: Family<EventLabels, Counter>,
    durations: Family<ProtocolLabels, Histogram, fn() -> Histogram>,
    /// The two series observed on every request, looked up once (a family lookup takes a
    /// lock and hashes the labels).
    http_duration: Histogram,
    dns_duration: Histogram,
    revision: Gauge,
    agent_version: Gauge,
    agent_connected: Gauge,
    rule_sets: Family<RuleSetLabels, Gauge>,
    fqdn_answers: Family<OutcomeLabels, Counter>,
    fqdn_hold: Histogram,
    queued: Gauge,
    written: Gauge,
    shed: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let rule_hits = Family::<RuleLabels, Counter>::default();
        let events = Family::<EventLabels, Counter>::default();
        let durations =
            Family::<ProtocolLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram,
            );
        let revision = Gauge::default();
        let agent_version = Gauge::default();
        let agent_connected = Gauge::default();
        let rule_sets = Family::<RuleSetLabels, Gauge>::default();
        let fqdn_answers = Family::<OutcomeLabels, Counter>::default();
        let fqdn_hold = duration_histogram();
        let queued = Gauge::default();
        let written = Gauge::default();
        let shed = Gauge::default();
        registry.register(
            "tollgate_requests",
            "Requests and connections decided, by verdict and protocol",
            requests.clone(),
        );
        registry.register(
            "tollgate_rule_hits",
            "Decisions attributed to each policy rule (bounded cardinality)",
            rule_hits.clone(),
        );
        registry.register(
            "tollgate_proxy_events",
            "Protocol events that are not decisions: upstream timeouts and errors, malformed \
             messages, load shed, truncations (every one counted, none silent)",
            events.clone(),
        );
        registry.register(
            "tollgate_request_duration_seconds",
            "Time from a request (or DNS query) arriving to its answer leaving, by protocol",
            durations.clone(),
        );
        registry.register(
            "tollgate_policy_revision",
            "Revision of the policy in force",
            revision.clone(),
        );
        registry.register(
            "tollgate_agent_version",
            "Version of the agent's rule sets last applied (--agent mode)",
            agent_version.clone(),
        );
        registry.register(
            "tollgate_agent_connected",
            "1 while the rule-set stream from the agent is open (--agent mode)",
            agent_connected.clone(),
        );
        registry.register(
            "tollgate_rule_sets",
            "Rule sets of the agent's last update, by outcome (rejected: NACKed, the previous \
             generation stays in force)",
            rule_sets.clone(),
        );
        registry.register(
            "tollgate_proxy_fqdn_answers",
            "DNS answers that taught IPs the agent did not have yet (--agent mode), by what \
             released them: confirmed (in the kernel first), timeout (after --fqdn-max-hold-ms), \
             agent_away (no FQDN stream to the agent), agent_error (the agent could not write \
             them); all but confirmed: a first connection may be dropped, never passed",
            fqdn_answers.clone(),
        );
        registry.register(
            "tollgate_proxy_fqdn_hold_seconds",
            "How long DNS answers that taught new IPs were held for the agent (--agent mode)",
            fqdn_hold.clone(),
        );
        registry.register(
            "tollgate_audit_queue_depth",
            "Audit records waiting for the sink",
            queued.clone(),
        );
        registry.register(
            "tollgate_audit_records_written",
            "Audit records written by the sink",
            written.clone(),
        );
        registry.register(
            "tollgate_audit_records_shed",
            "Audit records shed because the sink fell behind",
            shed.clone(),
        );
        let http_duration = durations
            .get_or_create(&ProtocolLabels { protocol: "http" })
            .clone();
        let dns_duration = durations
            .get_or_create(&ProtocolLabels { protocol: "dns" })
            .clone();
        Metrics {
            registry,
            requests,
            rule_hits,
            rules_seen: Mutex::new(HashSet::new()),
            rule_counters: Mutex::new(RuleCounters::default()),
            dns_requests: Default::default(),
            events,
            http_duration,
            dns_duration,
            durations,
            revision,
            agent_version,
            agent_connected,
            rule_sets,
            fqdn_answers,
            fqdn_hold,
            queued,
            written,
            shed,
        }
    }

    /// Count one decision.
    pub fn observe(&self, v: &Verdict, protocol: &'static str) {
        let verdict = match v.decision {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::AuditDeny => "audit-deny",
        };
        if protocol == "dns" {
            let slot = &self.dns_requests[v.decision as usize];
            slot.get_or_init(|| {
                self.requests
                    .get_or_create(&RequestLabels { verdict, protocol })
                    .clone()
            })
            .inc();
        } else {
            self.requests
                .get_or_create(&RequestLabels { verdict, protocol })
                .inc();
        }
        let Some(policy) = &v.policy else { return };
        let rule = v.rule.as_deref().unwrap_or_default();
        if let Ok(c) = self.rule_counters.lock()
            && let Some(counter) = c.map.get(policy).and_then(|r| r.get(rule))
        {
            counter.inc();
            return;
        }
        let mut key = (policy.to_string(), rule.to_string());
        if let Ok(mut seen) = self.rules_seen.lock()
            && !seen.contains(&key)
        {
            if seen.len() >= MAX_RULE_SERIES {
                key = ("_other".to_string(), "_other".to_string());
            } else {
                seen.insert(key.clone());
            }
        }
        let counter = self
            .rule_hits
            .get_or_create(&RuleLabels {
                policy: key.0,
                rule: key.1,
            })
            .clone();
        counter.inc();
        if let Ok(mut c) = self.rule_counters.lock() {
            if c.len >= MAX_CACHED_RULE_COUNTERS {
                *c = RuleCounters::default();
            }
            c.len += 1;
            c.map
                .entry(policy.clone())
                .or_default()
                .insert(rule.to_string(), counter);
        }
    }

    /// One request's time from arrival to answer.
    pub fn observe_duration(&self, protocol: &'static str, d: std::time::Duration) {
        match protocol {
            "http" => self.http_duration.observe(d.as_secs_f64()),
            "dns" => self.dns_duration.observe(d.as_secs_f64()),
            _ => self
                .durations
                .get_or_create(&ProtocolLabels { protocol })
                .observe(d.as_secs_f64()),
        }
    }

    /// The revision of the policy now in force.
    pub fn set_revision(&self, revision: u64) {
        self.revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }

    /// The outcome of the agent's update `version`.
    pub fn set_rule_sets(&self, version: u64, accepted: usize, rejected: usize) {
        self.agent_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        for (outcome, n) in [("accepted", accepted), ("rejected", rejected)] {
            self.rule_sets
                .get_or_create(&RuleSetLabels { outcome })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Whether the rule-set stream is open.
    pub fn set_agent_connected(&self, connected: bool) {
        self.agent_connected.set(i64::from(connected));
    }

    /// Count one protocol event (`protocol`, `event` are fixed names: bounded cardinality).
    pub fn event(&self, protocol: &'static str, event: &'static str) {
        self.events_n(protocol, event, 1);
    }

    /// Count `n` protocol events at once.
    pub fn events_n(&self, protocol: &'static str, event: &'static str, n: u64) {
        self.events
            .get_or_create(&EventLabels { protocol, event })
            .inc_by(n);
    }

    /// Count one DNS answer released by `outcome` (see the module docs), after `held`.
    pub fn fqdn_answer(&self, outcome: &'static str, held: Option<std::time::Duration>) {
        self.fqdn_answers
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        if let Some(d) = held {
            self.fqdn_hold.observe(d.as_secs_f64());
        }
    }

    /// The text exposition, with the audit gauges refreshed from `sink`.
    pub fn render(&self, sink: &AuditSink) -> String {
        self.written.set(sink.written() as i64);
        self.queued
            .set(i64::try_from(sink.queued()).unwrap_or(i64::MAX));
        self.shed.set(sink.shed() as i64);
        self.render_plain()
    }

    /// The text exposition as it stands (the audit gauges as last refreshed).
    pub fn render_plain(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serve `/metrics` (and `/fqdn`, the FQDN cache as JSON, when given) on `addr` until the
/// process stops. `extra` is appended to `/metrics` (the agent's metrics in `tollgate up`).
pub async fn serve(
    addr: SocketAddr,
    metrics: std::sync::Arc<Metrics>,
    sink: AuditSink,
    fqdn: Option<std::sync::Arc<crate::fqdn::FqdnCache>>,
    extra: Option<Page>,
) -> anyhow::Result<()> {
    serve_pages(addr, move |path| match (path, &fqdn) {
        ("/metrics", _) => {
            let mut out = metrics.render(&sink);
            if let Some(extra) = &extra {
                let more = extra();
                // One `# EOF` at the very end of an OpenMetrics exposition.
                if let Some(head) = out.strip_suffix("# EOF\n") {
                    out = format!("{head}{more}");
                } else {
                    out.push_str(&more);
                }
            }
            Some((out, "text/plain; version=0.0.4"))
        }
        ("/fqdn", Some(c)) => Some((
            serde_json::to_string(&c.list(std::time::Instant::now())).unwrap_or_default(),
            "application/json",
        )),
        _ => None,
    })
    .await
}

/// A page rendered on each request.
pub type Page = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

/// A minimal HTTP/1.1 server of text pages: `pages(path)` gives a page's body and content
/// type, or `None` for 404. For metrics endpoints (the proxy's and the agent's).
pub async fn serve_pages(
    addr: SocketAddr,
    pages: impl Fn(&str) -> Option<(String, &'static str)> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let pages = std::sync::Arc::new(pages);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let pages = pages.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (status, body, content_type) = match pages(req.uri().path()) {
                    Some((body, ct)) => (200, body, ct),
                    None => (404, String::new(), "text/plain"),
                };
                async move {
                    let mut resp = hyper::Response::new(Full::new(bytes::Bytes::from(body)));
                    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(content_type),
                    );
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
