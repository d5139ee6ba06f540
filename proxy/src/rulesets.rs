//! The proxy's side of the agent's rule-set stream (`tollgate proxy --agent SOCK`,
//! `tollgate_api::v1::RuleSets`).
//!
//! Why a stream of whole sources rather than the proxy reading files: one process (the agent)
//! owns policy sources — files or Kubernetes objects — and the proxy, which handles untrusted
//! traffic, reads nothing but what the agent hands it. The agent sends, at every version, every
//! rule set in force (one per policy source, plus the endpoints inventory); the proxy checks
//! each one on its own, answers ACK or NACK per rule set, and swaps in one new
//! [`PolicyState`] built from the accepted ones. A rejected rule set never blocks the others:
//! its previous accepted generation stays in force (or none, if it never had one), so a bad
//! change neither widens nor silently drops what was enforced. While the agent is away the
//! proxy serves the last good state and reconnects with backoff; a restarted proxy gets the
//! full set on connect. Until the first update is applied the proxy has no listeners at all, so
//! redirected flows are dropped by the datapath (no fail-open). Learned FQDN IPs go the other
//! way on a stream of their own (`fqdn_link.rs`), started here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::mpsc;
use tollgate_api::v1::{
    Ack, Hello, Kind, ProxyMessage, RuleSet, RuleSetResult, Update, proxy_message,
    rule_sets_client::RuleSetsClient,
};
use tollgate_policy::endpoints::Inventory;
use tollgate_policy::load::PolicySet;

use crate::fqdn::FqdnCache;
use crate::metrics::Metrics;
use crate::state::{PolicyHandle, PolicyState, Sources, loses_more_than_an_item};

/// An accepted rule set and what checking it found.
#[derive(Debug, Clone)]
struct Held {
    kind: Kind,
    generation: u64,
    content: String,
    diagnostics: Vec<String>,
}

/// The rule sets in force and the revision counter: turns each [`Update`] into the next
/// [`PolicyState`] and its [`Ack`]. No I/O, so it is tested directly.
#[derive(Debug, Default)]
pub struct RuleSetBook {
    held: BTreeMap<String, Held>,
    revision: u64,
}

/// Check one rule set alone: `Err` lists why it cannot be accepted; `Ok` lists problems
/// confined to single items (which the policy model drops, or fails closed on).
fn check(kind: Kind, name: &str, content: &str) -> Result<Vec<String>, Vec<String>> {
    match kind {
        Kind::Policy => {
            let mut set = PolicySet::default();
            set.load_str(name, content);
            let all: Vec<String> = set.diagnostics.iter().map(ToString::to_string).collect();
            if set.diagnostics.iter().any(loses_more_than_an_item) {
                Err(all)
            } else {
                Ok(all)
            }
        }
        Kind::Inventory => match Inventory::from_yaml(content) {
            Ok(_) => Ok(Vec::new()),
            Err(e) => Err(vec![format!("{name}: {e:#}")]),
        },
        Kind::Unspecified => Err(vec![format!("{name}: rule set of unknown kind")]),
    }
}

impl RuleSetBook {
    /// Apply `update`: the state to put in force (`None` when no inventory is in force, so
    /// there is nothing to serve) and the answer for the agent.
    pub fn apply(&mut self, update: &Update) -> (Option<PolicyState>, Ack) {
        let mut next: BTreeMap<String, Held> = BTreeMap::new();
        let mut results = Vec::with_capacity(update.rule_sets.len());
        let mut inventory_seen = false;
        for rs in &update.rule_sets {
            let kind = Kind::try_from(rs.kind).unwrap_or(Kind::Unspecified);
            let prev = self.held.get(&rs.name);
            let checked = if kind == Kind::Inventory && inventory_seen {
                Err(vec![format!(
                    "{}: a second inventory in one update (the first one is used)",
                    rs.name
                )])
            } else if next.contains_key(&rs.name) {
                Err(vec![format!("{}: named twice in one update", rs.name)])
            } else if let Some(p) = prev.filter(|p| p.generation == rs.generation && p.kind == kind)
            {
                Ok(p.diagnostics.clone())
            } else {
                check(kind, &rs.name, &rs.content)
            };
            results.push(self.settle(rs, kind, checked, &mut next));
            inventory_seen |= kind == Kind::Inventory
                && next
                    .get(&rs.name)
                    .is_some_and(|h| h.kind == Kind::Inventory);
        }
        // Problems only the whole set shows (the same policy defined by two sources): the
        // later source is refused and the set is built again without it. The last build is
        // the state put in force (built once when nothing clashes).
        let mut built = self.build(&next);
        for _ in 0..3 {
            let Some(state) = &built else {
                break;
            };
            let clashing: Vec<(String, Vec<String>)> = next
                .iter()
                .filter(|(_, h)| h.kind == Kind::Policy)
                .filter_map(|(name, h)| {
                    let new: Vec<String> = state
                        .diagnostics
                        .iter()
                        .filter(|d| d.file == *name && loses_more_than_an_item(d))
                        .map(ToString::to_string)
                        .filter(|d| !h.diagnostics.contains(d))
                        .collect();
                    (!new.is_empty()).then(|| (name.clone(), new))
                })
                .collect();
            if clashing.is_empty() {
                break;
            }
            for (name, problems) in clashing {
                next.remove(&name);
                if let Some(p) = self.held.get(&name).filter(|p| p.kind == Kind::Policy) {
                    next.insert(name.clone(), p.clone());
                }
                if let Some(r) = results.iter_mut().find(|r| r.name == name) {
                    r.accepted = false;
                    r.diagnostics = problems;
                    r.in_force_generation = next.get(&name).map_or(0, |h| h.generation);
                }
            }
            built = self.build(&next);
        }
        self.held = next;
        let state = built.map(|mut s| {
            self.revision += 1;
            s.revision = self.revision;
            s
        });
        if state.is_none() {
            results.push(RuleSetResult {
                name: "inventory".into(),
                generation: 0,
                accepted: false,
                diagnostics: vec![format!(
                    "no endpoints inventory in force: revision {} stays in force",
                    self.revision
                )],
                in_force_generation: 0,
            });
        }
        let ack = Ack {
            version: update.version,
            results,
            revision: self.revision,
        };
        (state, ack)
    }

    /// Record the outcome for `rs` into `next` and say it.
    fn settle(
        &self,
        rs: &RuleSet,
        kind: Kind,
        checked: Result<Vec<String>, Vec<String>>,
        next: &mut BTreeMap<String, Held>,
    ) -> RuleSetResult {
        let (accepted, diagnostics) = match checked {
            Ok(d) => {
                next.insert(
                    rs.name.clone(),
                    Held {
                        kind,
                        generation: rs.generation,
                        content: rs.content.clone(),
                        diagnostics: d.clone(),
                    },
                );
                (true, d)
            }
            Err(d) => {
                if let Some(p) = self.held.get(&rs.name)
                    && !next.contains_key(&rs.name)
                {
                    next.insert(rs.name.clone(), p.clone());
                }
                (false, d)
            }
        };
        RuleSetResult {
            name: rs.name.clone(),
            generation: rs.generation,
            accepted,
            diagnostics,
            in_force_generation: next.get(&rs.name).map_or(0, |h| h.generation),
        }
    }

    fn build(&self, held: &BTreeMap<String, Held>) -> Option<PolicyState> {
        let mut sources = Sources::default();
        let mut inventory = None;
        for (name, h) in held {
            match h.kind {
                Kind::Policy => sources.policies.push((name.clone(), h.content.clone())),
                Kind::Inventory => inventory = Some((name.clone(), h.content.clone())),
                Kind::Unspecified => {}
            }
        }
        sources.inventory = inventory?;
        PolicyState::from_sources(&sources).ok()
    }
}

/// Where the proxy's policy comes from in `--agent` mode.
#[derive(Debug, Clone)]
pub struct AgentLink {
    pub socket: PathBuf,
    pub fqdn: Arc<FqdnCache>,
    pub metrics: Arc<Metrics>,
}

impl AgentLink {
    /// Connect to the agent and apply its first update; keep following the stream (and
    /// reconnecting) in a background task that swaps every later version into the returned
    /// handle. Waits, retrying, until the agent has sent a servable policy. Also opens the
    /// FQDN stream that reports learned IPs to the agent (`fqdn_link.rs`).
    pub async fn start(self) -> Result<PolicyHandle> {
        let link = crate::fqdn_link::FqdnLink::new(self.metrics.clone());
        self.fqdn.set_link(link.clone());
        tokio::spawn(link.run(self.socket.clone(), Arc::downgrade(&self.fqdn)));
        let mut book = RuleSetBook::default();
        let mut backoff = Backoff::default();
        let mut waiting_logged = false;
        loop {
            match self.session(&mut book).await {
                Ok(Some((handle, stream))) => {
                    let (link, h) = (self.clone(), handle.clone());
                    tokio::spawn(async move { link.follow(book, h, stream).await });
                    return Ok(handle);
                }
                Ok(None) => {}
                Err(e) => {
                    if !waiting_logged {
                        eprintln!(
                            "tollgate proxy: waiting for the agent at {}: {e:#}",
                            self.socket.display()
                        );
                        waiting_logged = true;
                    }
                }
            }
            tokio::time::sleep(backoff.next()).await;
        }
    }

    /// After the first session: keep applying updates; when the stream ends, keep serving the
    /// last good state and reconnect.
    async fn follow(self, mut book: RuleSetBook, handle: PolicyHandle, first: Session) {
        let mut session = Some(first);
        let mut backoff = Backoff::default();
        loop {
            if let Some(s) = session.take() {
                let ended = self.run(&mut book, &handle, s).await;
                self.metrics.set_agent_connected(false);
                match ended {
                    Ok(()) => eprintln!(
                        "tollgate proxy: the agent closed the rule-set stream; serving revision {}",
                        handle.load().revision
                    ),
                    Err(e) => eprintln!(
                        "tollgate proxy: rule-set stream lost ({e:#}); serving revision {}",
                        handle.load().revision
                    ),
                }
                backoff = Backoff::default();
            }
            tokio::time::sleep(backoff.next()).await;
            if let Ok(s) = self.open(handle.load().revision).await {
                eprintln!("tollgate proxy: reconnected to the agent");
                session = Some(s);
            }
        }
    }

    /// One connection up to the first servable update: `Ok(None)` when the stream ended
    /// before there was anything to serve.
    async fn session(&self, book: &mut RuleSetBook) -> Result<Option<(PolicyHandle, Session)>> {
        let mut s = self.open(0).await?;
        while let Some(update) = s.updates.message().await? {
            let (state, ack) = apply_blocking(book, update, None).await?;
            report(&ack, &self.metrics);
            let _ = s.acks.send(ack_message(ack)).await;
            if let Some(state) = state {
                self.metrics.set_revision(state.revision);
                let handle = PolicyHandle::new(Arc::new(state.with_fqdn(self.fqdn.clone())));
                return Ok(Some((handle, s)));
            }
        }
        Ok(None)
    }

    async fn open(&self, serving: u64) -> Result<Session> {
        let mut client = RuleSetsClient::new(tollgate_api::unix_channel(&self.socket));
        let (tx, rx) = mpsc::channel(16);
        tx.send(ProxyMessage {
            msg: Some(proxy_message::Msg::Hello(Hello {
                proxy: format!("{}/{}", crate::audit::node_name(), std::process::id()),
                serving_version: serving,
            })),
        })
        .await?;
        let updates = client
            .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        self.metrics.set_agent_connected(true);
        Ok(Session { updates, acks: tx })
    }

    async fn run(
        &self,
        book: &mut RuleSetBook,
        handle: &PolicyHandle,
        mut s: Session,
    ) -> Result<()> {
        while let Some(update) = s.updates.message().await? {
            let started = Instant::now();
            let version = update.version;
            let (state, ack) = apply_blocking(book, update, Some(handle.load())).await?;
            report(&ack, &self.metrics);
            if let Some(state) = state {
                let revision = state.revision;
                handle.store(Arc::new(state.with_fqdn(self.fqdn.clone())));
                self.metrics.set_revision(revision);
                eprintln!(
                    "tollgate proxy: agent version {version} in force as revision {revision} \
                     ({:.1} ms)",
                    started.elapsed().as_secs_f64() * 1000.0
                );
            }
            s.acks.send(ack_message(ack)).await?;
        }
        Ok(())
    }
}

/// One open stream: updates in, acks out.
#[derive(Debug)]
struct Session {
    updates: tonic::Streaming<Update>,
    acks: mpsc::Sender<ProxyMessage>,
}

fn ack_message(ack: Ack) -> ProxyMessage {
    ProxyMessage {
        msg: Some(proxy_message::Msg::Ack(ack)),
    }
}

/// Checking and compiling is CPU work: off the threads that answer requests. The port
/// policies `previous` has in use are built there too (`warm_like`).
async fn apply_blocking(
    book: &mut RuleSetBook,
    update: Update,
    previous: Option<Arc<PolicyState>>,
) -> Result<(Option<PolicyState>, Ack)> {
    let mut owned = std::mem::take(book);
    let (owned, out) = tokio::task::spawn_blocking(move || {
        let out = owned.apply(&update);
        if let (Some(next), Some(previous)) = (&out.0, &previous) {
            next.warm_like(previous);
        }
        (owned, out)
    })
    .await?;
    *book = owned;
    Ok(out)
}

fn report(ack: &Ack, metrics: &Metrics) {
    let rejected = ack.results.iter().filter(|r| !r.accepted).count();
    metrics.set_rule_sets(ack.version, ack.results.len() - rejected, rejected);
    for r in ack.results.iter().filter(|r| !r.accepted) {
        eprintln!(
            "tollgate proxy: rejected rule set {} (generation {:x}); in force: {}",
            r.name,
            r.generation,
            if r.in_force_generation == 0 {
                "none".to_string()
            } else {
                format!("generation {:x}", r.in_force_generation)
            }
        );
        for d in &r.diagnostics {
            eprintln!("  {d}");
        }
    }
}

/// 100 ms doubling to 2 s.
#[derive(Debug)]
pub(crate) struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff(Duration::from_millis(100))
    }
}

impl Backoff {
    pub(crate) fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVENTORY: &str = "endpoints:\n  - name: api\n    namespace: default\n    ips: [10.0.0.2]\n    labels: {app: api}\n  - name: web\n    namespace: default\n    ips: [10.0.0.1]\n    labels: {app: web}\n";

    fn policy(name: &str, path: &str) -> String {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{app: api}}}}\n  ingress:\n    - fromEndpoints: [{{matchLabels: {{app: web}}}}]\n      toPorts:\n        - ports: [{{port: \"80\", protocol: TCP}}]\n          rules:\n            http: [{{method: GET, path: \"{path}\"}}]\n"
        )
    }

    fn rs(name: &str, kind: Kind, content: &str) -> RuleSet {
        RuleSet {
            name: name.into(),
            kind: kind as i32,
            generation: tollgate_api::generation_of(content),
            content: content.into(),
        }
    }

    fn update(version: u64, sets: Vec<RuleSet>) -> Update {
        Update {
            version,
            rule_sets: sets,
        }
    }

    fn paths(state: &PolicyState) -> Vec<String> {
        let mut v: Vec<String> = state
            .evaluator
            .rules()
            .iter()
            .map(|r| r.policy.id.name.to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_rejected_rule_set_keeps_its_previous_generation_and_does_not_block_the_others() {
        let mut book = RuleSetBook::default();
        let (state, ack) = book.apply(&update(
            1,
            vec![
                rs("inv", Kind::Inventory, INVENTORY),
                rs("a.yaml", Kind::Policy, &policy("a", "/a")),
                rs("b.yaml", Kind::Policy, &policy("b", "/b")),
            ],
        ));
        let state = state.expect("servable");
        assert!(ack.results.iter().all(|r| r.accepted), "{ack:?}");
        assert_eq!(state.revision, 1);
        assert_eq!(paths(&state), ["a", "b"]);

        // a.yaml breaks (unknown top-level spec field rejects the whole rule), b.yaml changes.
        let broken = policy("a", "/a").replace("  ingress:", "  ingresss:\n  ingress:");
        let b2 = policy("b2", "/b2");
        let (state, ack) = book.apply(&update(
            2,
            vec![
                rs("inv", Kind::Inventory, INVENTORY),
                rs("a.yaml", Kind::Policy, &broken),
                rs("b.yaml", Kind::Policy, &b2),
            ],
        ));
        let state = state.expect("servable");
        let a = &ack.results[1];
        assert!(!a.accepted);
        assert!(
            a.diagnostics
                .iter()
                .any(|d| d.starts_with("a.yaml:") && d.contains("ingresss")),
            "{:?}",
            a.diagnostics
        );
        assert_eq!(
            a.in_force_generation,
            tollgate_api::generation_of(&policy("a", "/a"))
        );
        assert!(ack.results[2].accepted);
        assert_eq!(paths(&state), ["a", "b2"], "old a kept, new b in force");
        assert_eq!(ack.revision, 2);
    }

    #[test]
    fn a_new_rule_set_that_is_rejected_is_not_in_force_and_removed_ones_go() {
        let mut book = RuleSetBook::default();
        let _ = book.apply(&update(
            1,
            vec![
                rs("inv", Kind::Inventory, INVENTORY),
                rs("a.yaml", Kind::Policy, &policy("a", "/a")),
            ],
        ));
        let (state, ack) = book.apply(&update(
            2,
            vec![
                rs("inv", Kind::Inventory, INVENTORY),
                rs("c.yaml", Kind::Policy, "kind: [unclosed"),
            ],
        ));
        let state = state.expect("servable");
        assert!(!ack.results[1].accepted);
        assert_eq!(ack.results[1].in_force_generation, 0);
        assert!(paths(&state).is_empty(), "a removed, c never accepted");
    }

    #[test]
    fn the_same_policy_from_two_sources_refuses_the_second_not_both() {
        let mut book = RuleSetBook::default();
        let (state, ack) = book.apply(&update(
            1,
            vec![
                rs("inv", Kind::Inventory, INVENTORY),
                rs("a.yaml", Kind::Policy, &policy("a", "/a")),
                rs("z.yaml", Kind::Policy, &policy("a", "/z")),
            ],
        ));
        let state = state.expect("servable");
        assert!(ack.results[1].accepted, "{ack:?}");
        assert!(!ack.results[2].accepted, "{ack:?}");
        assert_eq!(state.diagnostics.len(), 0, "{:?}", state.diagnostics);
        assert_eq!(paths(&state), ["a"]);
    }

    #[test]
    fn without_an_inventory_nothing_is_served_and_a_bad_one_keeps_the_last() {
        let mut book = RuleSetBook::default();
        let (state, ack) = book.apply(&update(
            1,
            vec![rs("a.yaml", Kind::Policy, &policy("a", "/a"))],
        ));
        assert!(state.is_none());
        assert!(
            ack.results
                .iter()
                .any(|r| r.name == "inventory" && !r.accepted)
        );
        let (state, _) = book.apply(&update(
            2,
            vec![
                rs("inv", Kind::Inventory, INVENTORY),
                rs("a.yaml", Kind::Policy, &policy("a", "/a")),
            ],
        ));
        assert_eq!(state.expect("servable").revision, 1);
        let (state, ack) = book.apply(&update(
            3,
            vec![
                rs("inv", Kind::Inventory, "endpoints: 7"),
                rs("a.yaml", Kind::Policy, &policy("a", "/a")),
            ],
        ));
        assert!(!ack.results[0].accepted);
        let state = state.expect("previous inventory kept");
        assert!(state.endpoint_index("api").is_some());
    }
}
