//! The agent's Prometheus metrics: what it loaded, how long compiling and applying took, what
//! it wrote to the kernel, and what the proxies said about its rule sets. Rendered as text;
//! `tollgate up --metrics` serves them with the proxy's, `tollgate agent --metrics` alone.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::rulesets::RuleSetServer;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// What one applied revision looked like.
#[derive(Debug, Clone, Copy, Default)]
pub struct Applied {
    pub revision: u64,
    pub policies: usize,
    pub rules: usize,
    pub endpoints: usize,
    pub identities: usize,
    /// Problems reported for the revision (items dropped or failed closed, warnings).
    pub diagnostics: usize,
    /// Kernel map entries written and removed (policy + ipcache + endpoints).
    pub written: usize,
    pub removed: usize,
    /// Load + compile + apply, seconds.
    pub seconds: f64,
}

#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    apply_seconds: Histogram,
    revision: Gauge,
    loaded: Family<KindLabels, Gauge>,
    diagnostics: Gauge,
    kernel: Family<OutcomeLabels, Counter>,
    last_apply: Gauge<f64, AtomicU64>,
    rejected_reloads: Counter,
    proxies: Family<OutcomeLabels, Gauge>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    pub fn new() -> AgentMetrics {
        let mut registry = Registry::default();
        let apply_seconds = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ]);
        let revision = Gauge::default();
        let loaded = Family::<KindLabels, Gauge>::default();
        let diagnostics = Gauge::default();
        let kernel = Family::<OutcomeLabels, Counter>::default();
        let last_apply = Gauge::<f64, AtomicU64>::default();
        let rejected_reloads = Counter::default();
        let proxies = Family::<OutcomeLabels, Gauge>::default();
        registry.register(
            "tollgate_agent_apply_seconds",
            "Time to load, compile and apply one revision (kernel diff included)",
            apply_seconds.clone(),
        );
        registry.register(
            "tollgate_agent_revision",
            "Revision of the policy the agent has in force",
            revision.clone(),
        );
        registry.register(
            "tollgate_agent_loaded",
            "What the revision in force holds, by kind (policies, rules, endpoints, identities)",
            loaded.clone(),
        );
        registry.register(
            "tollgate_agent_diagnostics",
            "Problems reported for the revision in force (items dropped or failed closed)",
            diagnostics.clone(),
        );
        registry.register(
            "tollgate_agent_kernel_entries",
            "Kernel map entries written and removed",
            kernel.clone(),
        );
        registry.register(
            "tollgate_agent_last_apply_timestamp_seconds",
            "Unix time of the last successful apply",
            last_apply.clone(),
        );
        registry.register(
            "tollgate_agent_rejected_reloads",
            "Reloads refused because they would drop whole files or rules (last good kept)",
            rejected_reloads.clone(),
        );
        registry.register(
            "tollgate_agent_proxies",
            "Proxies on the rule-set stream: connected, and those whose last ACK rejected a rule set",
            proxies.clone(),
        );
        AgentMetrics {
            registry,
            apply_seconds,
            revision,
            loaded,
            diagnostics,
            kernel,
            last_apply,
            rejected_reloads,
            proxies,
        }
    }

    /// Record one applied revision.
    pub fn applied(&self, a: &Applied) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.apply_seconds.observe(a.seconds);
        self.revision
            .set(i64::try_from(a.revision).unwrap_or(i64::MAX));
        for (kind, v) in [
            ("policies", a.policies),
            ("rules", a.rules),
            ("endpoints", a.endpoints),
            ("identities", a.identities),
        ] {
            self.loaded.get_or_create(&KindLabels { kind }).set(n(v));
        }
        self.diagnostics.set(n(a.diagnostics));
        for (outcome, v) in [("written", a.written), ("removed", a.removed)] {
            self.kernel
                .get_or_create(&OutcomeLabels { outcome })
                .inc_by(v as u64);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_apply.set(now);
    }

    /// A reload that kept the last good revision.
    pub fn rejected_reload(&self) {
        self.rejected_reloads.inc();
    }

    /// The metrics as Prometheus text, without the closing `# EOF` (so they can follow
    /// another registry's output); the proxies' state is read from `server` now.
    pub fn render(&self, server: Option<&RuleSetServer>) -> String {
        if let Some(server) = server {
            let ps = server.proxies();
            let connected = ps.iter().filter(|p| p.connected).count();
            let rejecting = ps
                .iter()
                .filter(|p| p.connected)
                .filter(|p| {
                    p.ack
                        .as_ref()
                        .is_some_and(|a| a.results.iter().any(|r| !r.accepted))
                })
                .count();
            for (outcome, v) in [("connected", connected), ("rejecting", rejecting)] {
                self.proxies
                    .get_or_create(&OutcomeLabels { outcome })
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out.strip_suffix("# EOF\n")
            .map(str::to_string)
            .unwrap_or(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_applied_revision_shows_in_the_text() {
        let m = AgentMetrics::new();
        m.applied(&Applied {
            revision: 3,
            policies: 2,
            rules: 5,
            endpoints: 4,
            identities: 4,
            diagnostics: 1,
            written: 10,
            removed: 2,
            seconds: 0.004,
        });
        m.rejected_reload();
        let text = m.render(None);
        for want in [
            "tollgate_agent_revision 3",
            "tollgate_agent_loaded{kind=\"rules\"} 5",
            "tollgate_agent_kernel_entries_total{outcome=\"written\"} 10",
            "tollgate_agent_rejected_reloads_total 1",
            "tollgate_agent_apply_seconds_count 1",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
        assert!(!text.contains("# EOF"));
    }
}
