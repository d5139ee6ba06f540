//! The evaluator: the single source of truth for "is this flow / request allowed, and by what".
//!
//! Evaluation has two steps. [`Evaluator::port_policy`] gathers, for one local endpoint,
//! direction, port and protocol, every entry of every rule that selects the endpoint (work that
//! does not depend on the remote peer or the request, so the proxy does it once per listener
//! key). [`PortPolicy::evaluate`] then decides one flow or request:
//!
//! 1. a direction no rule has entries for is not enforced: allowed;
//! 2. an L3/L4 deny entry matching the peer and port denies (deny beats allow, §5.2);
//! 3. no allow entry matching: denied if any selecting rule is default-deny, else allowed;
//! 4. with an L7 request: a matching TollgatePolicy L7 deny rule denies (from any entry that
//!    applies); an entry without L7 rules (L4-only, `http: []`, or visibility-only from
//!    `enableDefaultDeny: false`) allows everything else (§6.3–§6.7); otherwise some allow
//!    rule must match. Entries with only deny rules never grant anything.
//!
//! Enforce-mode rules decide; audit-mode rules are evaluated together with them afterwards, and
//! a denial that only exists with them becomes `AuditDeny` (docs/policy-model.md).

use std::sync::Arc;

use crate::api::{Enforcement, RuleAction};
use crate::l7;
use crate::labels::LabelSet;
use crate::model::{
    CompiledRule, Direction, Entry, L7, PolicyId, PolicyMeta, PortRule, Protocol, Subject,
};
use crate::peer::{PeerMatch, Remote, RemoteKind};

/// An L7 request, as the proxy parsed it or the CLI was told.
#[derive(Debug, Clone)]
pub enum L7Request<'a> {
    /// HTTP, and gRPC calls (which are HTTP/2 requests: `grpc` is set when the request is one).
    Http {
        request: l7::HttpRequest<'a>,
        grpc: Option<l7::GrpcCall<'a>>,
    },
    Kafka(l7::KafkaRequest<'a>),
    Dns {
        qname: &'a str,
    },
    /// A TLS connection's ClientHello (SNI checks of `serverNames`).
    Tls {
        sni: Option<&'a str>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    Allow,
    Deny,
    /// Forwarded, but an audit-mode policy would have denied it.
    AuditDeny,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::AuditDeny => "audit-deny",
        }
    }
}

/// Why a verdict was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// No rule selects the endpoint for this direction.
    NotEnforced,
    /// Only default-allow (`enableDefaultDeny: false`) rules select it and none matched.
    DefaultAllow,
    /// Ingress from the local host into an endpoint (Kubernetes `allow-localhost`, §5.1).
    HostAllowed,
    /// An L3/L4 allow entry matched and no L7 rule restricts the request.
    L4Allow,
    /// An L7 allow rule matched.
    L7Allow,
    /// An L3/L4 deny entry matched.
    DenyRule,
    /// Default deny: no allow entry matched.
    DefaultDeny,
    /// A TollgatePolicy L7 deny rule matched.
    L7DenyRule,
    /// L7 rules apply and none allowed the request.
    L7NoMatch,
    /// The request was malformed or ambiguous (e.g. `%2F` in the path) and was refused
    /// before policy could judge it.
    Malformed,
}

impl Reason {
    pub fn describe(self) -> &'static str {
        match self {
            Reason::NotEnforced => "no policy selects the endpoint in this direction",
            Reason::DefaultAllow => "default allow (enableDefaultDeny: false)",
            Reason::HostAllowed => {
                "ingress from the local host is always allowed (allow-localhost)"
            }
            Reason::L4Allow => "allowed at L3/L4",
            Reason::L7Allow => "allowed by an L7 rule",
            Reason::DenyRule => "denied by a deny rule",
            Reason::DefaultDeny => "default deny: no rule allows it",
            Reason::L7DenyRule => "denied by an L7 deny rule",
            Reason::L7NoMatch => "no L7 rule matched",
            Reason::Malformed => "refused before policy: malformed or ambiguous request",
        }
    }
}

/// The outcome of one evaluation, with attribution.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    pub decision: Decision,
    pub reason: Reason,
    pub direction: Direction,
    /// The policy that decided (for default deny: a policy that made the endpoint default-deny).
    pub policy: Option<PolicyId>,
    /// The rule path inside that policy (`spec.ingress[0].toPorts[0].rules.http[2]`).
    pub rule: Option<Arc<str>>,
    pub enforcement: Enforcement,
    /// The `log.value` tag of the deciding rule.
    pub log: Option<String>,
    /// Topics a Kafka request was denied for (when known).
    pub denied_topics: Vec<String>,
    /// Free-text detail, e.g. why a request was refused as malformed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Header changes the proxy must make before forwarding an allowed request (Cilium's
    /// `headerMatches` mismatch actions).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub header_edits: Vec<l7::HeaderEdit>,
}

impl Verdict {
    fn new(decision: Decision, reason: Reason, direction: Direction) -> Verdict {
        Verdict {
            decision,
            reason,
            direction,
            policy: None,
            rule: None,
            enforcement: Enforcement::Enforce,
            log: None,
            denied_topics: Vec::new(),
            detail: None,
            header_edits: Vec::new(),
        }
    }

    fn by(mut self, c: &Candidate, rule: Option<Arc<str>>) -> Verdict {
        self.policy = Some(c.rule.policy.id.clone());
        self.rule = rule;
        self.enforcement = c.enforcement();
        self.log = c.rule.log.clone();
        self
    }

    /// The verdict for a request refused before policy (the proxy answers 400).
    pub fn malformed(direction: Direction, detail: impl Into<String>) -> Verdict {
        Verdict {
            detail: Some(detail.into()),
            ..Verdict::new(Decision::Deny, Reason::Malformed, direction)
        }
    }

    /// `prod/api-l7 spec.ingress[0].toPorts[0].rules.http[0]`, or `default deny by prod/api`.
    pub fn rule_ref(&self) -> Option<String> {
        let p = self.policy.as_ref()?;
        Some(match &self.rule {
            Some(r) => format!("{p} {r}"),
            None => p.to_string(),
        })
    }

    pub fn is_allowed(&self) -> bool {
        self.decision != Decision::Deny
    }
}

/// One entry of a rule (and one of its port rules), relevant to a port: a handle on the shared
/// compiled rule plus positions in it, so that gathering a port's candidates copies no
/// selectors, paths or L7 rules (at 10,000 policies this copying was most of a recompile).
#[derive(Debug, Clone)]
struct Candidate {
    rule: CompiledRule,
    direction: Direction,
    /// From the rule's deny list (else its allow list).
    deny: bool,
    entry: usize,
    /// `None`: an L3-only entry (every port).
    port_index: Option<usize>,
    /// From a default-allow rule: its L7 rules only observe (§6.7).
    visibility_only: bool,
    /// Index into [`PortPolicy::peer_groups`]: candidates with equal peers share one.
    peer_group: usize,
}

impl Candidate {
    fn entry(&self) -> &Entry {
        let d = self.rule.direction(self.direction);
        if self.deny {
            &d.deny[self.entry]
        } else {
            &d.allow[self.entry]
        }
    }

    fn peer(&self) -> &PeerMatch {
        &self.entry().peer
    }

    fn port_rule(&self) -> Option<&PortRule> {
        let i = self.port_index?;
        self.entry().ports.as_ref().map(|prs| &prs[i])
    }

    fn entry_path(&self) -> &str {
        &self.entry().path
    }

    fn enforcement(&self) -> Enforcement {
        self.rule.enforcement
    }
}

/// Rules that made a direction enforced / default-deny, per layer.
#[derive(Debug, Clone, Default)]
struct LayerInfo {
    enforced: bool,
    default_deny_by: Option<(Arc<PolicyMeta>, String, Enforcement, Option<String>)>,
}

/// Everything that can decide flows of one (endpoint, direction, port, protocol).
#[derive(Debug, Clone)]
pub struct PortPolicy {
    pub direction: Direction,
    pub port: u16,
    pub protocol: Protocol,
    local_named_ports: Vec<(String, u16)>,
    local_is_host: bool,
    candidates: Vec<Candidate>,
    /// One candidate index per distinct peer among the candidates. Many rules on one port
    /// often name the same peer (200 policies allowing `app=web` to `app=api`): a remote is
    /// matched against each distinct peer once, not once per candidate.
    peer_groups: Vec<usize>,
    /// [enforce only, enforce + audit]
    layers: [LayerInfo; 2],
    has_audit: bool,
}

/// The compiled policy of a node: all valid rules.
#[derive(Debug, Clone, Default)]
pub struct Evaluator {
    rules: Vec<CompiledRule>,
    index: SubjectIndex,
}

/// Rules by one `key=value` their subject requires, so that finding the rules that select an
/// endpoint looks at the few rules that could, not all of them (10,000 policies × 1,000
/// endpoints is 10 million selector checks without it). Rules whose subject requires no single
/// value are checked for every endpoint.
#[derive(Debug, Clone, Default)]
struct SubjectIndex {
    by_label: std::collections::HashMap<(String, String), Vec<usize>>,
    always: Vec<usize>,
}

impl SubjectIndex {
    fn new(rules: &[CompiledRule]) -> SubjectIndex {
        let mut idx = SubjectIndex::default();
        for (i, r) in rules.iter().enumerate() {
            let sel = match &r.subject {
                Subject::Endpoints(s) | Subject::Nodes(s) => s,
            };
            let single = |r: &&crate::labels::Requirement| match &r.op {
                crate::labels::Operator::In(v) if v.len() == 1 => {
                    Some((r.key.clone(), v[0].clone()))
                }
                _ => None,
            };
            // Prefer a label other than the namespace: most subjects require their namespace.
            let key = sel
                .requirements
                .iter()
                .filter(|r| r.key != crate::labels::NAMESPACE_LABEL)
                .find_map(|r| single(&r))
                .or_else(|| sel.requirements.iter().find_map(|r| single(&r)));
            match key {
                Some(k) => idx.by_label.entry(k).or_default().push(i),
                None => idx.always.push(i),
            }
        }
        idx
    }

    /// Indices of the rules that might select `labels`, in rule order.
    fn candidates(&self, labels: &LabelSet) -> Vec<usize> {
        let mut out = self.always.clone();
        for l in labels.iter() {
            if let Some(v) = self.by_label.get(&(l.key.clone(), l.value.clone())) {
                out.extend(v);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// The local side of a flow: the endpoint the policy is about.
#[derive(Debug, Clone, Copy)]
pub struct Local<'a> {
    pub labels: &'a LabelSet,
    pub is_host: bool,
    pub named_ports: &'a [(String, u16)],
}

impl Evaluator {
    pub fn new(rules: Vec<CompiledRule>) -> Evaluator {
        let index = SubjectIndex::new(&rules);
        Evaluator { rules, index }
    }

    pub fn rules(&self) -> &[CompiledRule] {
        &self.rules
    }

    fn selects(rule: &CompiledRule, local: &Local<'_>) -> bool {
        match &rule.subject {
            Subject::Endpoints(s) => !local.is_host && s.matches(local.labels),
            Subject::Nodes(s) => local.is_host && s.matches(local.labels),
        }
    }

    /// The rules that select `local`, in rule order.
    pub fn rules_selecting<'a>(
        &'a self,
        local: &'a Local<'_>,
    ) -> impl Iterator<Item = &'a CompiledRule> + 'a {
        self.index
            .candidates(local.labels)
            .into_iter()
            .map(|i| &self.rules[i])
            .filter(|r| Self::selects(r, local))
    }

    /// Gather what decides flows of `local` in `direction` to/from `port`/`protocol`.
    pub fn port_policy(
        &self,
        local: &Local<'_>,
        direction: Direction,
        port: u16,
        protocol: Protocol,
    ) -> PortPolicy {
        Self::port_policy_of(
            self.rules_selecting(local),
            local,
            direction,
            port,
            protocol,
        )
    }

    /// [`Evaluator::port_policy`] from rules the caller already knows select `local` (in rule
    /// order, as [`Evaluator::rules_selecting`] gives them): the agent compiles many ports of
    /// one endpoint and selects its rules once.
    pub fn port_policy_of<'r>(
        selecting: impl IntoIterator<Item = &'r CompiledRule>,
        local: &Local<'_>,
        direction: Direction,
        port: u16,
        protocol: Protocol,
    ) -> PortPolicy {
        let mut pp = PortPolicy {
            direction,
            port,
            protocol,
            local_named_ports: local.named_ports.to_vec(),
            local_is_host: local.is_host,
            candidates: Vec::new(),
            peer_groups: Vec::new(),
            layers: Default::default(),
            has_audit: false,
        };
        for rule in selecting {
            let d = rule.direction(direction);
            if !d.enforced {
                continue;
            }
            let audit = rule.enforcement == Enforcement::Audit;
            pp.has_audit |= audit;
            for (i, layer) in pp.layers.iter_mut().enumerate() {
                if audit && i == 0 {
                    continue;
                }
                layer.enforced = true;
                if d.default_deny && layer.default_deny_by.is_none() {
                    layer.default_deny_by = Some((
                        rule.policy.clone(),
                        rule.path.clone(),
                        rule.enforcement,
                        rule.log.clone(),
                    ));
                }
            }
            let visibility_only = !d.default_deny;
            for (deny, entries) in [(true, &d.deny), (false, &d.allow)] {
                for e in entries.iter().enumerate() {
                    pp.add_entry(rule, e, deny, visibility_only);
                }
            }
        }
        pp.group_peers();
        pp
    }

    /// Decide one flow or request.
    pub fn evaluate(
        &self,
        local: &Local<'_>,
        direction: Direction,
        remote: &Remote,
        port: u16,
        protocol: Protocol,
        request: Option<&L7Request<'_>>,
    ) -> Verdict {
        self.port_policy(local, direction, port, protocol)
            .evaluate(remote, request)
    }
}

impl PortPolicy {
    fn add_entry(
        &mut self,
        rule: &CompiledRule,
        (entry, e): (usize, &Entry),
        deny: bool,
        visibility_only: bool,
    ) {
        let base = Candidate {
            rule: rule.clone(),
            direction: self.direction,
            deny,
            entry,
            port_index: None,
            visibility_only,
            peer_group: 0,
        };
        match &e.ports {
            None => self.candidates.push(base),
            Some(prs) => {
                for (i, pr) in prs.iter().enumerate() {
                    // Numeric ports can be checked now; named ports need the peer (egress).
                    let maybe = pr.ports.is_empty()
                        || pr
                            .ports
                            .iter()
                            .any(|p| p.matches(self.port, self.protocol, &|_| Some(self.port)));
                    if maybe {
                        self.candidates.push(Candidate {
                            port_index: Some(i),
                            ..base.clone()
                        });
                    }
                }
            }
        }
    }

    /// Fill [`PortPolicy::peer_groups`]: equal label-selector peers (and `Any`, `Nothing`)
    /// share a group; other peers (CIDRs, entities, FQDNs) get one each.
    fn group_peers(&mut self) {
        let mut by_key: std::collections::HashMap<u64, Vec<usize>> = Default::default();
        self.peer_groups.clear();
        for i in 0..self.candidates.len() {
            let entry = self.candidates[i].entry();
            let found = entry.peer_key.and_then(|k| {
                by_key.get(&k)?.iter().copied().find(|&g| {
                    self.candidates[self.peer_groups[g]]
                        .peer()
                        .same_as(&entry.peer)
                })
            });
            let group = match found {
                Some(g) => g,
                None => {
                    self.peer_groups.push(i);
                    let g = self.peer_groups.len() - 1;
                    if let Some(k) = entry.peer_key {
                        by_key.entry(k).or_default().push(g);
                    }
                    g
                }
            };
            self.candidates[i].peer_group = group;
        }
    }

    /// Whether `remote` matches candidate `c`'s peer, matching each peer group at most once
    /// per remote (`memo`).
    fn peer_matches(&self, memo: &mut PeerMemo, c: &Candidate, remote: &Remote) -> bool {
        let g = c.peer_group;
        if let Some(known) = memo.get(g) {
            return known;
        }
        let m = self.candidates[self.peer_groups[g]].peer().matches(remote);
        memo.set(g, m);
        m
    }

    /// True when some entry on this port carries L7 rules (the flow goes through the proxy).
    /// On egress a named port depends on the peer, so such an entry counts as "maybe";
    /// [`PortPolicy::l7_kind`] answers for one peer.
    pub fn has_l7(&self) -> bool {
        // Ingress named ports are the local endpoint's: any remote resolves them the same.
        let nobody = Remote::world(None, vec![]);
        self.candidates.iter().any(|c| {
            (self.direction == Direction::Egress || self.port_matches(c, &nobody))
                && c.port_rule().is_some_and(|p| !matches!(p.l7, L7::None))
        })
    }

    /// Which proxy listener `remote`'s flows on this port need: `"dns"` when an entry that
    /// applies to the port carries DNS rules (they go to the DNS listener), else
    /// `"http"`/`"grpc"`/`"kafka"`, `"tls"` for a `serverNames` allow-list alone; `None` when
    /// the port is plain L3/L4. Only the port decides, not the peer: a peer allowed at L4 on a
    /// port with L7 rules is proxied too (and allowed every request, cnp-semantics §12.3).
    pub fn l7_kind(&self, remote: &Remote) -> Option<&'static str> {
        let rules = || {
            self.candidates
                .iter()
                .filter(|c| self.port_matches(c, remote))
                .filter_map(|c| c.port_rule())
        };
        if rules().any(|p| matches!(p.l7, L7::Dns(_))) {
            return Some("dns");
        }
        if let Some(p) = rules().find(|p| !matches!(p.l7, L7::None)) {
            return Some(p.l7.kind());
        }
        rules().any(|p| !p.server_names.is_empty()).then_some("tls")
    }

    /// True when some entry of this port could decide flows of `remote` (its peer and its port
    /// match), or the host exception applies. When false, `remote` gets the same verdict as any
    /// other remote no entry concerns — what lets the agent skip evaluating most remotes.
    pub fn concerns(&self, remote: &Remote) -> bool {
        (self.direction == Direction::Ingress
            && remote.kind == RemoteKind::Host
            && !self.local_is_host)
            || {
                let memo = &mut PeerMemo::new(self.peer_groups.len());
                self.candidates
                    .iter()
                    .any(|c| self.peer_matches(memo, c, remote) && self.port_matches(c, remote))
            }
    }

    /// True when some entry on this port has a `serverNames` allow-list (the proxy must read
    /// the TLS ClientHello before deciding).
    pub fn has_server_names(&self) -> bool {
        self.candidates
            .iter()
            .any(|c| c.port_rule().is_some_and(|p| !p.server_names.is_empty()))
    }

    fn port_matches(&self, c: &Candidate, remote: &Remote) -> bool {
        let Some(pr) = c.port_rule() else { return true };
        let named_ports = match self.direction {
            Direction::Ingress => &self.local_named_ports,
            Direction::Egress => &remote.named_ports,
        };
        let named = |n: &str| {
            named_ports
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| *v)
        };
        pr.matches(self.port, self.protocol, &named)
    }

    fn sni_matches(c: &Candidate, request: Option<&L7Request<'_>>) -> bool {
        let Some(pr) = c.port_rule() else { return true };
        if pr.server_names.is_empty() {
            return true;
        }
        match request {
            Some(L7Request::Tls { sni: Some(sni) }) => {
                pr.server_names.iter().any(|p| p.matches(sni))
            }
            _ => false,
        }
    }

    /// Decide one flow (`request: None`: an L3/L4 connection check) or one L7 request.
    pub fn evaluate(&self, remote: &Remote, request: Option<&L7Request<'_>>) -> Verdict {
        let enforce = self.evaluate_layer(0, remote, request);
        if enforce.decision == Decision::Deny || !self.has_audit {
            return enforce;
        }
        let with_audit = self.evaluate_layer(1, remote, request);
        if with_audit.decision == Decision::Deny {
            return Verdict {
                decision: Decision::AuditDeny,
                ..with_audit
            };
        }
        enforce
    }

    fn evaluate_layer(
        &self,
        layer: usize,
        remote: &Remote,
        request: Option<&L7Request<'_>>,
    ) -> Verdict {
        let info = &self.layers[layer];
        let dir = self.direction;
        if !info.enforced {
            return Verdict::new(Decision::Allow, Reason::NotEnforced, dir);
        }
        let in_layer = |c: &&Candidate| layer == 1 || c.enforcement() == Enforcement::Enforce;
        let memo = &mut PeerMemo::new(self.peer_groups.len());
        let matching: Vec<&Candidate> = self
            .candidates
            .iter()
            .filter(in_layer)
            .filter(|c| self.peer_matches(memo, c, remote) && self.port_matches(c, remote))
            .collect();
        if let Some(c) = matching.iter().find(|c| c.deny) {
            let path = c
                .port_rule()
                .map(|p| p.path.clone())
                .unwrap_or_else(|| c.entry_path().to_string());
            return Verdict::new(Decision::Deny, Reason::DenyRule, dir).by(c, Some(path.into()));
        }
        if dir == Direction::Ingress && remote.kind == RemoteKind::Host && !self.local_is_host {
            return Verdict::new(Decision::Allow, Reason::HostAllowed, dir);
        }
        // Entries that apply to this peer and port (deny-only L7 entries included: their deny
        // rules apply), and the subset that can grant anything.
        let applicable: Vec<&Candidate> = matching
            .into_iter()
            .filter(|c| !c.deny && Self::sni_matches(c, request))
            .collect();
        let request = request.filter(|r| !matches!(r, L7Request::Tls { .. }));
        if let Some(request) = request
            && let Some(v) = l7_deny(&applicable, request, dir)
        {
            return v;
        }
        let allows: Vec<&Candidate> = applicable.into_iter().filter(|c| grants(c)).collect();
        if allows.is_empty() {
            return match &info.default_deny_by {
                Some((policy, path, enforcement, log)) => Verdict {
                    policy: Some(policy.id.clone()),
                    rule: Some(format!("{path}.{}", dir.as_str()).into()),
                    enforcement: *enforcement,
                    log: log.clone(),
                    ..Verdict::new(Decision::Deny, Reason::DefaultDeny, dir)
                },
                None => Verdict::new(Decision::Allow, Reason::DefaultAllow, dir),
            };
        }
        let Some(request) = request else {
            let c = allows[0];
            return Verdict::new(Decision::Allow, Reason::L4Allow, dir)
                .by(c, Some(l4_path(c).into()));
        };
        self.evaluate_l7(&allows, request, dir)
    }

    fn evaluate_l7(
        &self,
        allows: &[&Candidate],
        request: &L7Request<'_>,
        dir: Direction,
    ) -> Verdict {
        // An entry without L7 rules (or only observing them) allows everything (§6.3, §6.7).
        if let Some(c) = allows
            .iter()
            .find(|c| c.visibility_only || matches!(l7_of(c), L7::None))
        {
            return Verdict::new(Decision::Allow, Reason::L4Allow, dir)
                .by(c, Some(l4_path(c).into()));
        }
        let mut hits = Vec::new();
        // 3. Kafka: the topic set cover spans every applicable entry (§8.3).
        if let L7Request::Kafka(kreq) = request {
            return kafka_cover(allows, kreq, dir);
        }
        // 4. Any allow rule. Header mismatch actions of every matching allow rule run
        //    (§7.3: with header matches, Envoy evaluates every rule).
        let mut first: Option<Verdict> = None;
        let mut edits = Vec::new();
        for c in allows {
            hits.clear();
            let Some(rules) = match_l7(l7_of(c), request, &mut hits) else {
                continue;
            };
            for &i in hits.iter().filter(|&&i| rules[i].1 == RuleAction::Allow) {
                if first.is_none() {
                    first = Some(
                        Verdict::new(Decision::Allow, Reason::L7Allow, dir)
                            .by(c, Some(rules[i].0.clone())),
                    );
                }
                if let (L7::Http(l), L7Request::Http { request, .. }) = (l7_of(c), request) {
                    edits.extend(l.set.header_edits(i, request));
                }
            }
        }
        if let Some(mut v) = first {
            v.header_edits = edits;
            return v;
        }
        let c = most_specific(allows);
        let path = c.port_rule().map(|p| format!("{}.rules", p.path).into());
        Verdict::new(Decision::Deny, Reason::L7NoMatch, dir).by(c, path)
    }
}

/// Peer-group match results for one remote, filled lazily: bit sets for the usual handful of
/// groups (no allocation per evaluated flow), a vector beyond 64.
enum PeerMemo {
    Small { known: u64, matched: u64 },
    Large(Vec<Option<bool>>),
}

impl PeerMemo {
    fn new(groups: usize) -> PeerMemo {
        if groups <= 64 {
            PeerMemo::Small {
                known: 0,
                matched: 0,
            }
        } else {
            PeerMemo::Large(vec![None; groups])
        }
    }

    fn get(&self, g: usize) -> Option<bool> {
        match self {
            PeerMemo::Small { known, matched } => {
                (known >> g & 1 == 1).then_some(matched >> g & 1 == 1)
            }
            PeerMemo::Large(v) => v[g],
        }
    }

    fn set(&mut self, g: usize, m: bool) {
        match self {
            PeerMemo::Small { known, matched } => {
                *known |= 1 << g;
                *matched |= (m as u64) << g;
            }
            PeerMemo::Large(v) => v[g] = Some(m),
        }
    }
}

fn l4_path(c: &Candidate) -> String {
    c.port_rule()
        .map(|p| p.path.clone())
        .unwrap_or_else(|| c.entry_path().to_string())
}

/// Can this entry allow anything? L7 deny rules never grant: an entry whose L7 rules are all
/// deny rules only denies (adding a deny policy must never widen access).
fn grants(c: &Candidate) -> bool {
    match l7_of(c) {
        L7::None => true,
        L7::Http(l) => l.has_allow_rules(),
        L7::Grpc(l) => l.has_allow_rules(),
        L7::Kafka(l) => l.has_allow_rules(),
        L7::Dns(l) => l.has_allow_rules(),
    }
}

/// The first L7 deny rule, of any applicable entry, that matches the request.
fn l7_deny(applicable: &[&Candidate], request: &L7Request<'_>, dir: Direction) -> Option<Verdict> {
    let mut hits = Vec::new();
    for c in applicable {
        hits.clear();
        if let Some(rules) = match_l7(l7_of(c), request, &mut hits)
            && let Some(&i) = hits.iter().find(|&&i| rules[i].1 == RuleAction::Deny)
        {
            return Some(
                Verdict::new(Decision::Deny, Reason::L7DenyRule, dir)
                    .by(c, Some(rules[i].0.clone())),
            );
        }
    }
    None
}

/// The entry to name when no rule matched: one that names its peers, over a wildcard one.
fn most_specific<'a>(allows: &[&'a Candidate]) -> &'a Candidate {
    allows
        .iter()
        .find(|c| !matches!(c.peer(), PeerMatch::Any))
        .unwrap_or(&allows[0])
}

fn l7_of(c: &Candidate) -> &L7 {
    c.port_rule().map(|p| &p.l7).unwrap_or(&L7::None)
}

/// Run the rules of `l7` that understand `request`; push matching rule indices into `hits` and
/// return the rule metadata they index, or `None` when `l7` cannot judge this request.
fn match_l7<'l>(
    l7: &'l L7,
    request: &L7Request<'_>,
    hits: &mut Vec<usize>,
) -> Option<&'l [(Arc<str>, RuleAction)]> {
    match (l7, request) {
        (L7::Http(l), L7Request::Http { request, .. }) => {
            l.set.matching(request, hits);
            Some(&l.rules)
        }
        (
            L7::Grpc(l),
            L7Request::Http {
                grpc: Some(call), ..
            },
        ) => {
            l.set.matching(call, hits);
            Some(&l.rules)
        }
        (L7::Dns(l), L7Request::Dns { qname }) => {
            hits.extend(l.set.first_match(qname));
            Some(&l.rules)
        }
        (L7::Kafka(l), L7Request::Kafka(req)) => {
            // Deny rules only here; allow rules need the cross-entry set cover.
            let out = l.set.evaluate(req);
            hits.extend(out.deny_rule);
            Some(&l.rules)
        }
        _ => None,
    }
}

fn kafka_cover(allows: &[&Candidate], req: &l7::KafkaRequest<'_>, dir: Direction) -> Verdict {
    let mut compiled = Vec::new();
    let mut origin: Vec<(&Candidate, &Arc<str>)> = Vec::new();
    for c in allows {
        if let Some(PortRule {
            l7: L7::Kafka(l), ..
        }) = c.port_rule()
        {
            for (i, r) in l.set.rules().iter().enumerate() {
                compiled.push(r);
                origin.push((c, &l.rules[i].0));
            }
        }
    }
    let out = l7::evaluate_kafka_rules(&compiled, req);
    if out.allowed {
        let (c, path) = match out.allow_rules.first() {
            Some(&i) => (origin[i].0, Some(origin[i].1.clone())),
            None => (allows[0], None),
        };
        return Verdict::new(Decision::Allow, Reason::L7Allow, dir).by(c, path);
    }
    let c = most_specific(allows);
    let path = c.port_rule().map(|p| format!("{}.rules", p.path).into());
    let mut v = Verdict::new(Decision::Deny, Reason::L7NoMatch, dir).by(c, path);
    v.denied_topics = out.uncovered_topics.iter().map(|t| t.to_string()).collect();
    v
}

#[cfg(test)]
mod tests {
    use super::PeerMemo;

    #[test]
    fn the_peer_memo_remembers_each_group_for_small_and_large_policies() {
        for groups in [1, 64, 65, 300] {
            let mut memo = PeerMemo::new(groups);
            assert!(matches!(memo, PeerMemo::Small { .. }) == (groups <= 64));
            for g in 0..groups {
                assert_eq!(memo.get(g), None, "{groups} groups: {g} unknown at first");
            }
            for g in (0..groups).step_by(3) {
                memo.set(g, g % 2 == 0);
            }
            for g in 0..groups {
                let want = (g % 3 == 0).then_some(g % 2 == 0);
                assert_eq!(memo.get(g), want, "{groups} groups: group {g}");
            }
        }
    }
}
