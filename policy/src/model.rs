//! The compiled rule model: one [`CompiledRule`] per `spec`/`specs[i]`, validated item by item.
//!
//! Validation happens while compiling, so a rule that compiles is a rule that means exactly
//! one thing. Errors are collected per item (`spec.ingress[1]`), not per document, so one bad
//! item does not take the rest of its policy down. What happens to the bad item is chosen so an
//! error never *widens* what is allowed:
//! - a bad allow item (`ingress`/`egress`) is dropped: it allowed less than nothing;
//! - a bad deny item (`ingressDeny`/`egressDeny`) fails closed: it becomes "deny every peer on
//!   every port" for the endpoints the rule selects, until it is fixed;
//! - a rule whose subject cannot be compiled is rejected whole (we cannot know who it selects).
//!
//! A rejected allow item still counts as "the rule has entries for this direction", so the
//! endpoints it selects stay default-deny instead of falling back to allow-all.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::api::{self, Enforcement, RuleAction};
use crate::l7;
use crate::labels::{NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, Operator, Selector, ns_requirement};
use crate::peer::{CidrSet, Entity, PeerMatch, parse_cidr};

/// Which kind of document a rule came from; it decides namespace scoping and which fields are
/// allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum PolicyKind {
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
    NetworkPolicy,
    TollgatePolicy,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::TollgatePolicy => "TollgatePolicy",
        }
    }

    fn extensions_allowed(self) -> bool {
        self == PolicyKind::TollgatePolicy
    }
}

/// A policy's identity and provenance.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct PolicyId {
    pub kind: PolicyKind,
    /// Shared strings: every verdict names its policy, and a clone must not allocate.
    pub namespace: Option<Arc<str>>,
    pub name: Arc<str>,
}

impl std::fmt::Display for PolicyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyMeta {
    pub id: PolicyId,
    pub file: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Subject {
    Endpoints(Selector),
    Nodes(Selector),
}

/// One validated rule (`spec` or `specs[i]` of a policy), shared: a clone is a reference count,
/// so a snapshot, an evaluator or a per-endpoint subset holding 10,000 rules copies no rule
/// (cloning every rule into each new snapshot cost ≈ 85 ms per change at 10,000 policies).
/// Read through `Deref` ([`RuleBody`]'s fields).
#[derive(Debug, Clone)]
pub struct CompiledRule(Arc<RuleBody>);

impl CompiledRule {
    pub fn new(body: RuleBody) -> CompiledRule {
        CompiledRule(Arc::new(body))
    }

    /// The same shared rule (not merely an equal one): rules are shared between policy
    /// revisions, so an unchanged rule is the same allocation.
    pub fn same(&self, other: &CompiledRule) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// To change a rule being built (copied first if it is already shared).
    pub fn body_mut(&mut self) -> &mut RuleBody {
        Arc::make_mut(&mut self.0)
    }
}

impl std::ops::Deref for CompiledRule {
    type Target = RuleBody;
    fn deref(&self) -> &RuleBody {
        &self.0
    }
}

/// What a [`CompiledRule`] holds.
#[derive(Debug, Clone)]
pub struct RuleBody {
    pub policy: Arc<PolicyMeta>,
    /// `spec` or `specs[i]`.
    pub path: String,
    pub subject: Subject,
    pub enforcement: Enforcement,
    pub log: Option<String>,
    pub ingress: DirectionRules,
    pub egress: DirectionRules,
}

impl RuleBody {
    pub fn direction(&self, d: Direction) -> &DirectionRules {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct DirectionRules {
    /// The rule has items for this direction (allow or deny), so the direction is enforced.
    pub enforced: bool,
    /// The rule turns on default-deny for this direction (§5.1).
    pub default_deny: bool,
    pub allow: Vec<Entry>,
    pub deny: Vec<Entry>,
}

/// One ingress/egress item.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `spec.ingress[0]`.
    pub path: String,
    pub peer: PeerMatch,
    /// [`PeerMatch::group_key`] of `peer`, computed once.
    pub peer_key: Option<u64>,
    /// `None`: every port (an L3-only item).
    pub ports: Option<Vec<PortRule>>,
}

impl Entry {
    pub fn new(path: String, peer: PeerMatch, ports: Option<Vec<PortRule>>) -> Entry {
        Entry {
            path,
            peer_key: peer.group_key(),
            peer,
            ports,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSel {
    /// Port 0 or no port: every port.
    Any,
    Range(u16, u16),
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMatch {
    pub port: PortSel,
    /// `None` is `ANY` (TCP, UDP and SCTP).
    pub protocol: Option<Protocol>,
}

impl PortMatch {
    pub fn matches(&self, port: u16, proto: Protocol, named: &dyn Fn(&str) -> Option<u16>) -> bool {
        if self.protocol.is_some_and(|p| p != proto) {
            return false;
        }
        match &self.port {
            PortSel::Any => true,
            PortSel::Range(lo, hi) => (*lo..=*hi).contains(&port),
            PortSel::Named(n) => named(n) == Some(port),
        }
    }
}

/// One `toPorts` item: ports plus optional L7 rules and SNI allow-list.
#[derive(Debug, Clone)]
pub struct PortRule {
    /// `spec.ingress[0].toPorts[1]`.
    pub path: String,
    /// Empty: every port.
    pub ports: Vec<PortMatch>,
    pub l7: L7,
    pub server_names: Vec<l7::ServerNamePattern>,
}

impl PortRule {
    pub fn matches(&self, port: u16, proto: Protocol, named: &dyn Fn(&str) -> Option<u16>) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|p| p.matches(port, proto, named))
    }
}

/// An L7 rule list with each rule's path and action, compiled once.
#[derive(Debug, Clone)]
pub struct L7List<S> {
    pub set: Arc<S>,
    /// Per rule: path (`…rules.http[2]`) and action. Shared: every port policy that takes
    /// the rule list holds it without copying thousands of paths.
    pub rules: Arc<[(Arc<str>, RuleAction)]>,
}

impl<S> L7List<S> {
    pub fn has_allow_rules(&self) -> bool {
        self.rules.iter().any(|(_, a)| *a == RuleAction::Allow)
    }
}

#[derive(Debug, Clone)]
pub enum L7 {
    /// No L7 rules (also `http: []`, §6.6): a plain L4 allow.
    None,
    Http(L7List<l7::HttpRuleSet>),
    Grpc(L7List<l7::GrpcRuleSet>),
    Kafka(L7List<l7::KafkaRuleSet>),
    Dns(L7List<l7::DnsRuleSet>),
}

impl L7 {
    pub fn kind(&self) -> &'static str {
        match self {
            L7::None => "none",
            L7::Http(_) => "http",
            L7::Grpc(_) => "grpc",
            L7::Kafka(_) => "kafka",
            L7::Dns(_) => "dns",
        }
    }
}

/// A validation problem: the field path (from the document root) and what is wrong.
pub type FieldError = (String, String);

/// Context of the document a rule comes from.
#[derive(Debug, Clone)]
pub struct RuleContext {
    pub kind: PolicyKind,
    /// The policy namespace (namespaced kinds only).
    pub namespace: Option<String>,
    pub policy: Arc<PolicyMeta>,
}

fn de<T: DeserializeOwned>(v: &Value, path: &str) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let inner = e.inner().to_string();
        let sub = e.path().to_string();
        let mut full = if sub == "." || sub.is_empty() {
            path.to_string()
        } else {
            format!("{path}.{sub}")
        };
        // serde reports an unknown field at its parent; name the field itself.
        if let Some(rest) = inner.strip_prefix("unknown field `")
            && let Some(field) = rest.split('`').next()
        {
            if !full.ends_with(&format!(".{field}")) {
                full = format!("{full}.{field}");
            }
            let expected = rest.split_once(", expected").map(|x| x.1).unwrap_or("");
            return (
                full,
                format!("unknown field `{field}` (expected{expected})")
                    .replace("(expected)", "(no fields expected)"),
            );
        }
        (full, inner)
    })
}

const RULE_FIELDS: &[&str] = &[
    "endpointSelector",
    "nodeSelector",
    "ingress",
    "ingressDeny",
    "egress",
    "egressDeny",
    "labels",
    "enableDefaultDeny",
    "description",
    "log",
    "enforcement",
];

/// Compile one rule. Returns the rule (if its subject compiled) and every problem found.
pub fn compile_rule(
    ctx: &RuleContext,
    v: &Value,
    path: &str,
) -> (Option<CompiledRule>, Vec<FieldError>) {
    let mut errs = Vec::new();
    let Some(obj) = v.as_object() else {
        errs.push((
            path.to_string(),
            format!("expected a mapping, found {}", api::json_kind(v)),
        ));
        return (None, errs);
    };
    for k in obj.keys() {
        if !RULE_FIELDS.contains(&k.as_str()) {
            errs.push((format!("{path}.{k}"), format!("unknown field `{k}`")));
        }
    }
    let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let ext = ctx.kind.extensions_allowed();

    // A failure in these fields rejects the whole rule.
    let mut fatal = false;
    let enforcement = match field("enforcement") {
        None => Enforcement::Enforce,
        Some(_) if !ext => {
            errs.push((
                format!("{path}.enforcement"),
                "`enforcement` is a TollgatePolicy extension".to_string(),
            ));
            Enforcement::Enforce
        }
        Some(e) => match de::<Enforcement>(e, &format!("{path}.enforcement")) {
            Ok(x) => x,
            Err(_) => {
                errs.push((
                    format!("{path}.enforcement"),
                    format!("must be `enforce` or `audit`, found {e}"),
                ));
                fatal = true;
                Enforcement::Enforce
            }
        },
    };
    let log = match field("log").map(|v| de::<api::LogConfig>(v, &format!("{path}.log"))) {
        None => None,
        Some(Err(e)) => {
            errs.push(e);
            None
        }
        Some(Ok(l)) => match l.value {
            Some(s) if s.chars().count() > 32 || s.chars().any(|c| c.is_control()) => {
                errs.push((
                    format!("{path}.log.value"),
                    "must be at most 32 printable characters".to_string(),
                ));
                None
            }
            other => other,
        },
    };
    for k in ["description"] {
        if let Some(v) = field(k)
            && !v.is_string()
        {
            errs.push((format!("{path}.{k}"), "must be a string".to_string()));
        }
    }
    if let Some(v) = field("labels")
        && let Err(e) = de::<Vec<Value>>(v, &format!("{path}.labels"))
    {
        errs.push(e);
    }
    let default_deny = match field("enableDefaultDeny") {
        None => api::DefaultDenyConfig::default(),
        Some(v) => match de::<api::DefaultDenyConfig>(v, &format!("{path}.enableDefaultDeny")) {
            Ok(d) => d,
            Err(e) => {
                errs.push(e);
                api::DefaultDenyConfig::default()
            }
        },
    };

    let subject = match (field("endpointSelector"), field("nodeSelector")) {
        (Some(_), Some(_)) => {
            errs.push((
                path.to_string(),
                "rule cannot have both endpointSelector and nodeSelector".to_string(),
            ));
            None
        }
        (None, None) => {
            errs.push((
                path.to_string(),
                "rule must have one of endpointSelector or nodeSelector".to_string(),
            ));
            None
        }
        (Some(v), None) => compile_selector(v, &format!("{path}.endpointSelector"))
            .map_err(|e| errs.push(e))
            .ok()
            .map(|mut s| {
                if let Some(ns) = &ctx.namespace {
                    s.force_namespace(ns);
                }
                Subject::Endpoints(s)
            }),
        (None, Some(v)) => {
            if ctx.kind != PolicyKind::CiliumClusterwideNetworkPolicy {
                errs.push((
                    format!("{path}.nodeSelector"),
                    "rule cannot have nodeSelector (only CiliumClusterwideNetworkPolicy can)"
                        .to_string(),
                ));
                None
            } else {
                compile_selector(v, &format!("{path}.nodeSelector"))
                    .map_err(|e| errs.push(e))
                    .ok()
                    .map(Subject::Nodes)
            }
        }
    };

    let dirs = ["ingress", "ingressDeny", "egress", "egressDeny"];
    if dirs.iter().all(|d| field(d).is_none()) {
        errs.push((
            path.to_string(),
            "rule must have at least one of ingress, ingressDeny, egress, egressDeny".to_string(),
        ));
    }
    let host_policy = matches!(subject, Some(Subject::Nodes(_)));
    let mut ingress = DirectionRules::default();
    let mut egress = DirectionRules::default();
    for d in dirs {
        let Some(list) = field(d) else { continue };
        let dpath = format!("{path}.{d}");
        let Some(items) = list.as_array() else {
            errs.push((
                dpath,
                format!("expected a list, found {}", api::json_kind(list)),
            ));
            fatal = true;
            continue;
        };
        let is_deny = d.ends_with("Deny");
        let is_ingress = d.starts_with("ingress");
        let target = if is_ingress {
            &mut ingress
        } else {
            &mut egress
        };
        target.enforced = true;
        for (i, item) in items.iter().enumerate() {
            let ipath = format!("{dpath}[{i}]");
            let ictx = ItemContext {
                rule: ctx,
                path: &ipath,
                deny: is_deny,
                ingress: is_ingress,
                host_policy,
                ext,
            };
            match compile_item(&ictx, item) {
                Ok(entry) => {
                    if is_deny {
                        target.deny.push(entry)
                    } else {
                        target.allow.push(entry)
                    }
                }
                Err(mut e) => {
                    errs.append(&mut e);
                    if is_deny {
                        // Fail closed: deny everything in this direction.
                        target
                            .deny
                            .push(Entry::new(ipath.clone(), PeerMatch::Any, None));
                    }
                }
            }
        }
    }
    ingress.default_deny = ingress.enforced && default_deny.ingress.unwrap_or(true);
    egress.default_deny = egress.enforced && default_deny.egress.unwrap_or(true);

    let rule = match subject {
        Some(subject) if !fatal => Some(CompiledRule::new(RuleBody {
            policy: ctx.policy.clone(),
            path: path.to_string(),
            subject,
            enforcement,
            log,
            ingress,
            egress,
        })),
        _ => None,
    };
    (rule, errs)
}

fn compile_selector(v: &Value, path: &str) -> Result<Selector, FieldError> {
    let sel: api::LabelSelector = de(v, path)?;
    Selector::compile(&sel).map_err(|(p, m)| (format!("{path}.{p}"), m))
}

struct ItemContext<'a> {
    rule: &'a RuleContext,
    path: &'a str,
    deny: bool,
    ingress: bool,
    host_policy: bool,
    ext: bool,
}

/// Scope a peer endpoint selector as Cilium's CRD parsing does (§3.1).
fn scope_peer_selector(ctx: &RuleContext, sel: &mut Selector) {
    if sel.uses_source("reserved") {
        return;
    }
    let names_ns =
        sel.mentions_key(|k| k == NAMESPACE_LABEL || k.starts_with(NAMESPACE_LABELS_PREFIX));
    if names_ns {
        return;
    }
    match (&ctx.namespace, ctx.kind) {
        (Some(ns), _) => sel.add(ns_requirement(Operator::In(vec![ns.clone()]))),
        (None, PolicyKind::CiliumClusterwideNetworkPolicy) => {
            sel.add(ns_requirement(Operator::Exists))
        }
        (None, _) => {}
    }
}

fn compile_item(ctx: &ItemContext<'_>, v: &Value) -> Result<Entry, Vec<FieldError>> {
    let path = ctx.path;
    let mut errs: Vec<FieldError> = Vec::new();
    let Some(obj) = v.as_object() else {
        return Err(vec![(
            path.to_string(),
            format!("expected a mapping, found {}", api::json_kind(v)),
        )]);
    };
    // Deserialize into the typed shape first so unknown fields are named precisely; the typed
    // value itself is not needed (the fields are compiled from the raw object below).
    let (peer_names, unsupported_names): (&[&str], &[&str]) = if ctx.ingress {
        de::<api::IngressRule>(v, path).map_err(|e| vec![e])?;
        (
            &["fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities"],
            &[
                "fromNodes",
                "fromGroups",
                "fromRequires",
                "icmps",
                "authentication",
            ],
        )
    } else {
        de::<api::EgressRule>(v, path).map_err(|e| vec![e])?;
        (
            &[
                "toEndpoints",
                "toCIDR",
                "toCIDRSet",
                "toEntities",
                "toFQDNs",
            ],
            &[
                "toServices",
                "toNodes",
                "toGroups",
                "toRequires",
                "icmps",
                "authentication",
            ],
        )
    };
    let peers = peer_fields(obj, peer_names);
    let to_ports = obj.get("toPorts");
    let unsupported = unsupported_names
        .iter()
        .copied()
        .filter(|n| obj.get(*n).is_some_and(|v| !v.is_null()));
    for name in unsupported {
        let hint = match name {
            "toServices" => " (select the service's pods with toEndpoints instead)",
            "fromRequires" | "toRequires" => " (deprecated and rejected by Cilium too)",
            _ => "",
        };
        errs.push((
            format!("{path}.{name}"),
            format!("`{name}` is not supported by tollgate{hint}"),
        ));
    }
    if peers.len() > 1 {
        errs.push((
            path.to_string(),
            format!(
                "combining {} and {} is not supported yet (write separate items)",
                peers[0].0, peers[1].0
            ),
        ));
    }
    let peer = match peers.first() {
        None if to_ports.as_ref().is_some_and(|p| !p.is_null()) => PeerMatch::Any,
        None => PeerMatch::Nothing,
        Some((name, val)) => match compile_peer(ctx, name, val) {
            Ok(p) => p,
            Err(mut e) => {
                errs.append(&mut e);
                PeerMatch::Nothing
            }
        },
    };
    let ports = match to_ports.filter(|v| !v.is_null()) {
        None => None,
        Some(v) => match compile_to_ports(ctx, v, &format!("{path}.toPorts"), &peer) {
            Ok(p) => Some(p),
            Err(mut e) => {
                errs.append(&mut e);
                None
            }
        },
    };
    if errs.is_empty() {
        Ok(Entry::new(path.to_string(), peer, ports))
    } else {
        Err(errs)
    }
}

fn peer_fields<'a>(obj: &Map<String, Value>, names: &[&'a str]) -> Vec<(&'a str, Value)> {
    names
        .iter()
        .filter_map(|n| {
            obj.get(*n)
                .filter(|v| !v.is_null())
                .map(|v| (*n, v.clone()))
        })
        .collect()
}

fn compile_peer(
    ctx: &ItemContext<'_>,
    name: &str,
    v: &Value,
) -> Result<PeerMatch, Vec<FieldError>> {
    let path = format!("{}.{name}", ctx.path);
    let mut errs = Vec::new();
    let peer = match name {
        "fromEndpoints" | "toEndpoints" => {
            let list: Vec<Value> = de(v, &path).map_err(|e| vec![e])?;
            let mut sels = Vec::new();
            for (i, s) in list.iter().enumerate() {
                match compile_selector(s, &format!("{path}[{i}]")) {
                    Ok(mut sel) => {
                        scope_peer_selector(ctx.rule, &mut sel);
                        sels.push(sel);
                    }
                    Err(e) => errs.push(e),
                }
            }
            if list.is_empty() {
                PeerMatch::Nothing
            } else {
                PeerMatch::Endpoints(sels)
            }
        }
        "fromEntities" | "toEntities" => {
            let list: Vec<String> = de(v, &path).map_err(|e| vec![e])?;
            let mut es = Vec::new();
            for (i, s) in list.iter().enumerate() {
                match Entity::parse(s) {
                    Some(e) => es.push(e),
                    None => errs.push((
                        format!("{path}[{i}]"),
                        format!("unknown entity `{s}` (expected one of all, world, cluster, host, init, ingress, unmanaged, remote-node, health, none, kube-apiserver)"),
                    )),
                }
            }
            PeerMatch::Entities(es)
        }
        "fromCIDR" | "toCIDR" => {
            let list: Vec<String> = de(v, &path).map_err(|e| vec![e])?;
            let mut sets = Vec::new();
            for (i, s) in list.iter().enumerate() {
                match parse_cidr(s) {
                    Ok(cidr) => sets.push(CidrSet {
                        cidr,
                        except: vec![],
                    }),
                    Err(m) => errs.push((format!("{path}[{i}]"), m)),
                }
            }
            PeerMatch::Cidrs(sets)
        }
        "fromCIDRSet" | "toCIDRSet" => {
            let list: Vec<api::CidrRule> = de(v, &path).map_err(|e| vec![e])?;
            let mut sets = Vec::new();
            for (i, r) in list.iter().enumerate() {
                let at = format!("{path}[{i}]");
                if r.cidr_group_ref.is_some() || r.cidr_group_selector.is_some() {
                    errs.push((
                        at.clone(),
                        "cidrGroupRef and cidrGroupSelector are not supported by tollgate"
                            .to_string(),
                    ));
                    continue;
                }
                let Some(c) = &r.cidr else {
                    errs.push((
                        at,
                        "one of cidr, cidrGroupRef or cidrGroupSelector must be set".to_string(),
                    ));
                    continue;
                };
                let cidr = match parse_cidr(c) {
                    Ok(c) => c,
                    Err(m) => {
                        errs.push((format!("{at}.cidr"), m));
                        continue;
                    }
                };
                let mut except = Vec::new();
                for (j, e) in r.except.iter().flatten().enumerate() {
                    match parse_cidr(e) {
                        Ok(x) if !cidr.contains(&x) => errs.push((
                            format!("{at}.except[{j}]"),
                            format!("`{e}` is not contained within the CIDR {cidr}"),
                        )),
                        Ok(x) => except.push(x),
                        Err(m) => errs.push((format!("{at}.except[{j}]"), m)),
                    }
                }
                sets.push(CidrSet { cidr, except });
            }
            PeerMatch::Cidrs(sets)
        }
        "toFQDNs" => {
            if ctx.deny {
                return Err(vec![(
                    path,
                    "toFQDNs is not supported in deny rules".to_string(),
                )]);
            }
            let list: Vec<api::FqdnSelector> = de(v, &path).map_err(|e| vec![e])?;
            let mut sels = Vec::new();
            for (i, s) in list.iter().enumerate() {
                match l7::FqdnSelector::new(s) {
                    Ok(f) => sels.push(f),
                    Err(e) => errs.push((join(&format!("{path}[{i}]"), &e.path), e.message)),
                }
            }
            PeerMatch::Fqdns(sels)
        }
        other => unreachable_field(other),
    };
    if errs.is_empty() { Ok(peer) } else { Err(errs) }
}

fn unreachable_field(name: &str) -> PeerMatch {
    debug_assert!(false, "unexpected peer field {name}");
    PeerMatch::Nothing
}

fn join(base: &str, rel: &str) -> String {
    if rel.is_empty() {
        base.to_string()
    } else if rel.starts_with('[') {
        format!("{base}{rel}")
    } else {
        format!("{base}.{rel}")
    }
}

const MAX_PORTS: usize = 40;

fn compile_to_ports(
    ctx: &ItemContext<'_>,
    v: &Value,
    path: &str,
    _peer: &PeerMatch,
) -> Result<Vec<PortRule>, Vec<FieldError>> {
    // A list is walked where it is; anything else fails as a typed list would.
    let owned: Vec<Value>;
    let list: &[Value] = match v.as_array() {
        Some(l) => l,
        None => {
            owned = de(v, path).map_err(|e| vec![e])?;
            &owned
        }
    };
    let mut errs = Vec::new();
    let mut out = Vec::new();
    for (i, pv) in list.iter().enumerate() {
        let ppath = format!("{path}[{i}]");
        match compile_port_rule(ctx, pv, &ppath) {
            Ok(p) => out.push(p),
            Err(mut e) => errs.append(&mut e),
        }
    }
    if errs.is_empty() { Ok(out) } else { Err(errs) }
}

fn compile_port_rule(
    ctx: &ItemContext<'_>,
    v: &Value,
    path: &str,
) -> Result<PortRule, Vec<FieldError>> {
    let pr: api::PortRule = de(v, path).map_err(|e| vec![e])?;
    let mut errs = Vec::new();
    for (name, set) in [
        ("terminatingTLS", pr.terminating_tls.is_some()),
        ("originatingTLS", pr.originating_tls.is_some()),
        ("listener", pr.listener.is_some()),
    ] {
        if set {
            errs.push((
                format!("{path}.{name}"),
                format!("`{name}` is not supported by tollgate (TLS is never terminated)"),
            ));
        }
    }
    let ports_list = pr.ports.clone().unwrap_or_default();
    if ports_list.len() > MAX_PORTS {
        errs.push((
            format!("{path}.ports"),
            format!(
                "at most {MAX_PORTS} ports per rule, found {}",
                ports_list.len()
            ),
        ));
    }
    let mut ports = Vec::new();
    let mut any_port_zero = false;
    let mut has_range = false;
    let mut protos: Vec<Option<Protocol>> = Vec::new();
    for (j, p) in ports_list.iter().enumerate() {
        let at = format!("{path}.ports[{j}]");
        let protocol = match p.protocol.as_deref().unwrap_or("ANY") {
            "ANY" | "" => None,
            s => match Protocol::parse(s) {
                Some(p) if s.chars().all(|c| c.is_ascii_uppercase()) => Some(p),
                _ => {
                    errs.push((
                        format!("{at}.protocol"),
                        format!("unknown protocol `{s}` (expected TCP, UDP, SCTP or ANY)"),
                    ));
                    continue;
                }
            },
        };
        protos.push(protocol);
        let port_str = p.port.as_ref().map(|s| s.0.as_str()).unwrap_or("0");
        let sel = match port_str.parse::<i64>() {
            Ok(n) if !(0..=65535).contains(&n) => {
                errs.push((
                    format!("{at}.port"),
                    format!("port {n} is out of range 0-65535"),
                ));
                continue;
            }
            Ok(0) => {
                any_port_zero = true;
                if p.end_port.is_some_and(|e| e != 0) {
                    errs.push((
                        format!("{at}.endPort"),
                        "endPort needs a non-zero port".to_string(),
                    ));
                }
                PortSel::Any
            }
            Ok(n) => {
                let lo = n as u16;
                match p.end_port {
                    None | Some(0) => PortSel::Range(lo, lo),
                    Some(e) if e < n || e > 65535 => {
                        errs.push((
                            format!("{at}.endPort"),
                            format!("endPort {e} must be between port {n} and 65535"),
                        ));
                        continue;
                    }
                    Some(e) => {
                        if e != n {
                            has_range = true;
                        }
                        PortSel::Range(lo, e as u16)
                    }
                }
            }
            Err(_) => {
                let valid = !port_str.is_empty()
                    && port_str.len() <= 15
                    && port_str
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && port_str.chars().any(|c| c.is_ascii_alphabetic());
                if !valid {
                    errs.push((
                        format!("{at}.port"),
                        format!("`{port_str}` is neither a port number nor a valid port name"),
                    ));
                    continue;
                }
                if p.end_port.is_some() {
                    errs.push((
                        format!("{at}.endPort"),
                        "endPort cannot be used with a named port".to_string(),
                    ));
                }
                PortSel::Named(port_str.to_ascii_lowercase())
            }
        };
        ports.push(PortMatch {
            port: sel,
            protocol,
        });
    }

    let mut server_names = Vec::new();
    for (j, s) in pr.server_names.iter().flatten().enumerate() {
        match l7::ServerNamePattern::new(s) {
            Ok(p) => server_names.push(p),
            Err(e) => errs.push((
                join(&format!("{path}.serverNames[{j}]"), &e.path),
                e.message,
            )),
        }
    }

    let l7 = match &pr.rules {
        None => L7::None,
        Some(rules) => {
            let rpath = format!("{path}.rules");
            match compile_l7(ctx, rules, &rpath) {
                Ok(l7) => l7,
                Err(mut e) => {
                    errs.append(&mut e);
                    L7::None
                }
            }
        }
    };
    let rpath = format!("{path}.rules");
    if ctx.deny && pr.rules.is_some() {
        errs.push((rpath.clone(), "deny rules cannot have L7 rules".to_string()));
    }
    if !matches!(l7, L7::None) {
        let is_dns = matches!(l7, L7::Dns(_));
        if ports.is_empty() || any_port_zero {
            let msg = if is_dns {
                "port 53 must be specified for DNS rules".to_string()
            } else {
                "L7 rules need a specific port (not port 0 or no port)".to_string()
            };
            errs.push((format!("{path}.ports"), msg));
        }
        if !is_dns && protos.iter().any(|p| *p != Some(Protocol::Tcp)) {
            errs.push((
                format!("{path}.ports"),
                "L7 rules can only apply to TCP (not ANY) except for DNS rules".to_string(),
            ));
        }
        if is_dns && has_range {
            errs.push((
                format!("{path}.ports"),
                "DNS rules cannot use port ranges".to_string(),
            ));
        }
        if is_dns && ctx.ingress {
            errs.push((
                rpath.clone(),
                "DNS rules are not allowed on ingress".to_string(),
            ));
        }
        if ctx.host_policy && !is_dns {
            errs.push((
                rpath.clone(),
                "only DNS L7 rules are allowed in host (nodeSelector) policies".to_string(),
            ));
        }
        if !server_names.is_empty() {
            errs.push((
                format!("{path}.serverNames"),
                "serverNames cannot be combined with L7 rules (that needs TLS termination, which tollgate does not do)".to_string(),
            ));
        }
    }
    if errs.is_empty() {
        Ok(PortRule {
            path: path.to_string(),
            ports,
            l7,
            server_names,
        })
    } else {
        Err(errs)
    }
}

/// Compile each rule of an L7 list, collecting errors at `base[i].field`; returns the compiled
/// rules and, per compiled rule, its path and action.
fn compile_list<R, C>(
    list: Option<&Vec<R>>,
    base: &str,
    errs: &mut Vec<FieldError>,
    compile: impl Fn(&R) -> Result<C, l7::L7Error>,
    action: impl Fn(&R) -> Option<RuleAction>,
) -> (Vec<C>, Vec<(Arc<str>, RuleAction)>) {
    let mut compiled = Vec::new();
    let mut meta = Vec::new();
    for (i, r) in list.into_iter().flatten().enumerate() {
        let at = format!("{base}[{i}]");
        match compile(r) {
            Ok(c) => {
                compiled.push(c);
                meta.push((Arc::from(at), action(r).unwrap_or_default()));
            }
            Err(e) => errs.push((join(&at, &e.path), e.message)),
        }
    }
    (compiled, meta)
}

fn compile_l7(
    ctx: &ItemContext<'_>,
    rules: &api::L7Rules,
    path: &str,
) -> Result<L7, Vec<FieldError>> {
    let mut errs = Vec::new();
    if rules.l7proto.is_some() || rules.l7.is_some() {
        errs.push((
            format!("{path}.l7proto"),
            "generic `l7proto`/`l7` rules are not supported (Cilium removed them in 1.20)"
                .to_string(),
        ));
    }
    let non_empty: Vec<&str> = [
        ("http", rules.http.as_ref().is_some_and(|r| !r.is_empty())),
        ("kafka", rules.kafka.as_ref().is_some_and(|r| !r.is_empty())),
        ("dns", rules.dns.as_ref().is_some_and(|r| !r.is_empty())),
        ("grpc", rules.grpc.as_ref().is_some_and(|r| !r.is_empty())),
    ]
    .into_iter()
    .filter(|(_, set)| *set)
    .map(|(n, _)| n)
    .collect();
    if non_empty.len() > 1 {
        errs.push((
            path.to_string(),
            format!(
                "multiple L7 protocol rule types specified in single rule ({})",
                non_empty.join(", ")
            ),
        ));
        return Err(errs);
    }
    if rules.grpc.is_some() && !ctx.ext {
        errs.push((
            format!("{path}.grpc"),
            "`grpc` rules are a TollgatePolicy extension".to_string(),
        ));
        return Err(errs);
    }
    let ext = ctx.ext;
    let l7 = match non_empty.first().copied() {
        None => L7::None,
        Some("http") => {
            let (compiled, rules) = compile_list(
                rules.http.as_ref(),
                &format!("{path}.http"),
                &mut errs,
                |r| l7::compile_http_rule(r, ext),
                |r| r.action,
            );
            match l7::HttpRuleSet::new(compiled) {
                Ok(set) => L7::Http(L7List {
                    set: Arc::new(set),
                    rules: rules.into(),
                }),
                Err(e) => {
                    errs.push((join(&format!("{path}.http"), &e.path), e.message));
                    L7::None
                }
            }
        }
        Some("grpc") => {
            let (compiled, rules) = compile_list(
                rules.grpc.as_ref(),
                &format!("{path}.grpc"),
                &mut errs,
                l7::compile_grpc_rule,
                |r| r.action,
            );
            L7::Grpc(L7List {
                set: Arc::new(l7::GrpcRuleSet::new(compiled)),
                rules: rules.into(),
            })
        }
        Some("kafka") => {
            let (compiled, rules) = compile_list(
                rules.kafka.as_ref(),
                &format!("{path}.kafka"),
                &mut errs,
                |r| l7::compile_kafka_rule(r, ext),
                |r| r.action,
            );
            L7::Kafka(L7List {
                set: Arc::new(l7::KafkaRuleSet::new(compiled)),
                rules: rules.into(),
            })
        }
        Some(_) => {
            let (compiled, rules) = compile_list(
                rules.dns.as_ref(),
                &format!("{path}.dns"),
                &mut errs,
                l7::DnsPattern::from_rule,
                |_| None,
            );
            L7::Dns(L7List {
                set: Arc::new(l7::DnsRuleSet::new(compiled)),
                rules: rules.into(),
            })
        }
    };
    if errs.is_empty() { Ok(l7) } else { Err(errs) }
}
