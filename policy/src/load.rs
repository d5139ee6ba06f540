//! From YAML text to compiled rules and precise diagnostics.
//!
//! Every problem is a [`Diagnostic`] naming the file, the YAML line and the field path, e.g.
//! `api.yaml:23: spec.ingress[1].toPorts[0].rules.http[2].path: regex too large (…)`. A
//! document with problems still contributes every rule and item that compiled (see
//! [`crate::model`] for what happens to the broken ones), and [`PolicySet::rejected`] says which
//! were rejected.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::api;
use crate::labels::NAMESPACE_LABELS_PREFIX;
use crate::model::{CompiledRule, PolicyId, PolicyKind, PolicyMeta, RuleContext, compile_rule};
use crate::yaml::{self, Document};

/// Annotation that puts any policy (CNP, CCNP, NetworkPolicy or TollgatePolicy) in audit mode:
/// `tollgate.io/enforcement: audit`.
pub const ENFORCEMENT_ANNOTATION: &str = "tollgate.io/enforcement";

/// A problem in an input file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    /// Field path from the document root; empty for whole-document problems.
    pub path: String,
    pub message: String,
    /// The policy it belongs to, when known.
    pub policy: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        } else {
            write!(
                f,
                "{}:{}: {}: {}",
                self.file, self.line, self.path, self.message
            )
        }
    }
}

/// Everything loaded so far: the compiled rules, the policies they came from, and problems.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub rules: Vec<CompiledRule>,
    pub policies: Vec<Arc<PolicyMeta>>,
    pub diagnostics: Vec<Diagnostic>,
    /// Documents that are not policies (e.g. `PolicyTest`), as `file:line: kind`.
    pub skipped: Vec<String>,
    /// Index into `policies`, for duplicate detection in O(1).
    by_id: HashMap<PolicyId, usize>,
}

impl PolicySet {
    /// Load every document of `src` (named `file` in messages).
    pub fn load_str(&mut self, file: &str, src: &str) {
        let docs = match yaml::parse_documents(src) {
            Ok(d) => d,
            Err(e) => {
                self.diagnostics.push(Diagnostic {
                    file: file.to_string(),
                    line: e.line,
                    path: String::new(),
                    message: format!("invalid YAML: {}", e.message),
                    policy: None,
                });
                return;
            }
        };
        for doc in &docs {
            if doc.value.is_null() {
                continue;
            }
            self.load_document(file, doc);
        }
    }

    /// Rule paths that were rejected, as `policy path` strings.
    pub fn rejected(&self) -> Vec<String> {
        self.diagnostics
            .iter()
            .map(|d| match &d.policy {
                Some(p) => format!("{p} {}", d.path),
                None => format!("{}:{}", d.file, d.line),
            })
            .collect()
    }

    fn load_document(&mut self, file: &str, doc: &Document) {
        let mut errs: Vec<(String, String)> = Vec::new();
        let diag = |errs: Vec<(String, String)>, policy: Option<String>| -> Vec<Diagnostic> {
            errs.into_iter()
                .map(|(path, message)| Diagnostic {
                    file: file.to_string(),
                    line: doc.line_of(&path),
                    path,
                    message,
                    policy: policy.clone(),
                })
                .collect()
        };
        let Some(obj) = doc.value.as_object() else {
            self.diagnostics.extend(diag(
                vec![(
                    String::new(),
                    format!("expected a mapping, found {}", api::json_kind(&doc.value)),
                )],
                None,
            ));
            return;
        };
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind_str = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        let kind = match (api_version, kind_str) {
            ("cilium.io/v2", "CiliumNetworkPolicy") => PolicyKind::CiliumNetworkPolicy,
            ("cilium.io/v2", "CiliumClusterwideNetworkPolicy") => {
                PolicyKind::CiliumClusterwideNetworkPolicy
            }
            ("networking.k8s.io/v1", "NetworkPolicy") => PolicyKind::NetworkPolicy,
            ("tollgate.io/v1alpha1", "TollgatePolicy") => PolicyKind::TollgatePolicy,
            ("tollgate.io/v1alpha1", k @ ("PolicyTest" | "EndpointInventory")) => {
                self.skipped.push(format!("{file}:{}: {k}", doc.line));
                return;
            }
            ("", _) => {
                self.diagnostics.extend(diag(
                    vec![("apiVersion".to_string(), "missing apiVersion".to_string())],
                    None,
                ));
                return;
            }
            (v, k) => {
                self.diagnostics.extend(diag(
                    vec![(
                        "kind".to_string(),
                        format!("unsupported document kind `{k}` of `{v}` (expected CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy of cilium.io/v2, NetworkPolicy of networking.k8s.io/v1, or TollgatePolicy of tollgate.io/v1alpha1)"),
                    )],
                    None,
                ));
                return;
            }
        };
        for k in obj.keys() {
            if !["apiVersion", "kind", "metadata", "spec", "specs", "status"].contains(&k.as_str())
            {
                errs.push((k.clone(), format!("unknown field `{k}`")));
            }
        }
        let meta: api::Metadata = match obj.get("metadata") {
            None => api::Metadata::default(),
            Some(m) => match api::Metadata::deserialize(m) {
                Ok(m) => m,
                Err(e) => {
                    errs.push(("metadata".to_string(), e.to_string()));
                    api::Metadata::default()
                }
            },
        };
        // Audit mode for any kind, Cilium's included: the annotation applies to the rules that
        // do not say `enforcement` themselves. A value other than audit/enforce is an error and
        // the policy is enforced (the stricter reading).
        let annotated = match meta
            .annotations
            .get(ENFORCEMENT_ANNOTATION)
            .map(String::as_str)
        {
            None => None,
            Some("audit") => Some(crate::api::Enforcement::Audit),
            Some("enforce") => Some(crate::api::Enforcement::Enforce),
            Some(other) => {
                errs.push((
                    format!("metadata.annotations.{ENFORCEMENT_ANNOTATION}"),
                    format!("`{other}`: expected `audit` or `enforce` (the policy is enforced)"),
                ));
                None
            }
        };
        let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
            errs.push((
                "metadata.name".to_string(),
                "a policy needs metadata.name".to_string(),
            ));
            self.diagnostics.extend(diag(errs, None));
            return;
        };
        let namespace = match kind {
            PolicyKind::CiliumClusterwideNetworkPolicy => {
                if meta.namespace.is_some() {
                    errs.push((
                        "metadata.namespace".to_string(),
                        "a cluster-wide policy has no namespace".to_string(),
                    ));
                }
                None
            }
            _ => Some(
                meta.namespace
                    .clone()
                    .unwrap_or_else(|| "default".to_string()),
            ),
        };
        let id = PolicyId {
            kind,
            namespace: namespace.as_deref().map(Arc::from),
            name: name.into(),
        };
        let policy_name = id.to_string();
        if let Some(prev) = self.by_id.get(&id).map(|i| &self.policies[*i]) {
            errs.push((
                "metadata.name".to_string(),
                format!(
                    "{} {policy_name} is already defined in {}",
                    kind.as_str(),
                    prev.file
                ),
            ));
            self.diagnostics.extend(diag(errs, Some(policy_name)));
            return;
        }
        let policy = Arc::new(PolicyMeta {
            id,
            file: file.to_string(),
        });
        let ctx = RuleContext {
            kind,
            namespace,
            policy: policy.clone(),
        };

        // Rules are compiled from the parsed document where it is (a copy of a spec with
        // thousands of DNS names would cost more than compiling it).
        let rule_values: Vec<(String, Cow<'_, Value>)> = if kind == PolicyKind::NetworkPolicy {
            match obj.get("spec") {
                None => {
                    errs.push((
                        "spec".to_string(),
                        "a NetworkPolicy needs a spec".to_string(),
                    ));
                    vec![]
                }
                Some(spec) => match translate_network_policy(
                    spec,
                    ctx.namespace.as_deref().unwrap_or("default"),
                ) {
                    Ok(rule) => vec![("spec".to_string(), Cow::Owned(rule))],
                    Err(e) => {
                        errs.push(e);
                        vec![]
                    }
                },
            }
        } else {
            let spec = obj.get("spec").filter(|v| !v.is_null());
            let specs = obj.get("specs").filter(|v| !v.is_null());
            let mut out = Vec::new();
            if spec.is_none() && specs.is_none() {
                errs.push((String::new(), "spec or specs must be provided".to_string()));
            }
            if let Some(s) = spec {
                out.push(("spec".to_string(), Cow::Borrowed(s)));
            }
            match specs.map(|s| s.as_array()) {
                None => {}
                Some(None) => errs.push(("specs".to_string(), "specs must be a list".to_string())),
                Some(Some(list)) => {
                    for (i, s) in list.iter().enumerate() {
                        out.push((format!("specs[{i}]"), Cow::Borrowed(s)));
                    }
                }
            }
            out
        };
        for (path, v) in rule_values {
            let (rule, mut e) = compile_rule(&ctx, &v, &path);
            if kind == PolicyKind::NetworkPolicy {
                // Paths of a translated rule do not exist in the file; point at the spec.
                for (p, _) in e.iter_mut() {
                    *p = "spec".to_string();
                }
            }
            errs.append(&mut e);
            if let Some(mut r) = rule {
                if let Some(enforcement) = annotated
                    && v.get("enforcement").is_none_or(Value::is_null)
                {
                    r.body_mut().enforcement = enforcement;
                }
                self.rules.push(r);
            }
        }
        self.by_id.insert(policy.id.clone(), self.policies.len());
        self.policies.push(policy);
        self.diagnostics.extend(diag(errs, Some(policy_name)));
    }
}

/// Translate a Kubernetes NetworkPolicy spec into an equivalent Cilium rule (as JSON, so it
/// goes through the same compiler).
fn translate_network_policy(spec: &Value, namespace: &str) -> Result<Value, (String, String)> {
    use serde_json::json;
    let np: api::NetworkPolicySpec = serde_path_to_error::deserialize(spec.clone())
        .map_err(|e| (format!("spec.{}", e.path()), e.inner().to_string()))?;
    let types: Vec<String> = match &np.policy_types {
        Some(t) => t.clone(),
        None => {
            let mut t = vec!["Ingress".to_string()];
            if np.egress.is_some() {
                t.push("Egress".to_string());
            }
            t
        }
    };
    for (i, t) in types.iter().enumerate() {
        if t != "Ingress" && t != "Egress" {
            return Err((
                format!("spec.policyTypes[{i}]"),
                format!("unknown policy type `{t}` (expected Ingress or Egress)"),
            ));
        }
    }
    let ports_json = |ports: &Option<Vec<api::NetworkPolicyPort>>| -> Option<Value> {
        let ports = ports.as_ref()?;
        if ports.is_empty() {
            return None;
        }
        let list: Vec<Value> = ports
            .iter()
            .map(|p| {
                let mut o = serde_json::Map::new();
                o.insert(
                    "port".to_string(),
                    Value::String(
                        p.port
                            .as_ref()
                            .map(|s| s.0.clone())
                            .unwrap_or_else(|| "0".to_string()),
                    ),
                );
                if let Some(e) = p.end_port {
                    o.insert("endPort".to_string(), json!(e));
                }
                o.insert(
                    "protocol".to_string(),
                    Value::String(p.protocol.clone().unwrap_or_else(|| "TCP".to_string())),
                );
                Value::Object(o)
            })
            .collect();
        Some(json!([{ "ports": list }]))
    };
    let peer_items = |peers: &Option<Vec<api::NetworkPolicyPeer>>,
                      ports: Option<Value>,
                      ingress: bool|
     -> Vec<Value> {
        let (ep, cidrset, ent) = if ingress {
            ("fromEndpoints", "fromCIDRSet", "fromEntities")
        } else {
            ("toEndpoints", "toCIDRSet", "toEntities")
        };
        let with_ports = |mut o: serde_json::Map<String, Value>| {
            if let Some(p) = &ports {
                o.insert("toPorts".to_string(), p.clone());
            }
            Value::Object(o)
        };
        match peers.as_ref().filter(|p| !p.is_empty()) {
            // No peers: every source (Kubernetes semantics), on the listed ports.
            None => vec![with_ports(serde_json::Map::from_iter([(
                ent.to_string(),
                json!(["all"]),
            )]))],
            Some(list) => list
                .iter()
                .map(|peer| {
                    let mut o = serde_json::Map::new();
                    if let Some(ib) = &peer.ip_block {
                        o.insert(
                            cidrset.to_string(),
                            json!([{ "cidr": ib.cidr, "except": ib.except.clone().unwrap_or_default() }]),
                        );
                    } else {
                        let mut reqs: Vec<Value> = Vec::new();
                        let mut labels = serde_json::Map::new();
                        if let Some(ps) = &peer.pod_selector {
                            for (k, v) in ps.match_labels.iter().flatten() {
                                labels.insert(format!("k8s:{k}"), Value::String(v.0.clone()));
                            }
                            for e in ps.match_expressions.iter().flatten() {
                                reqs.push(json!({"key": format!("k8s:{}", e.key), "operator": e.operator, "values": e.values.iter().flatten().map(|v| v.0.clone()).collect::<Vec<_>>()}));
                            }
                        }
                        match &peer.namespace_selector {
                            None => {
                                labels.insert(
                                    "k8s:io.kubernetes.pod.namespace".to_string(),
                                    Value::String(namespace.to_string()),
                                );
                            }
                            Some(ns) => {
                                reqs.push(json!({"key": "k8s:io.kubernetes.pod.namespace", "operator": "Exists"}));
                                for (k, v) in ns.match_labels.iter().flatten() {
                                    labels.insert(
                                        format!("k8s:{NAMESPACE_LABELS_PREFIX}{k}"),
                                        Value::String(v.0.clone()),
                                    );
                                }
                                for e in ns.match_expressions.iter().flatten() {
                                    reqs.push(json!({"key": format!("k8s:{NAMESPACE_LABELS_PREFIX}{}", e.key), "operator": e.operator, "values": e.values.iter().flatten().map(|v| v.0.clone()).collect::<Vec<_>>()}));
                                }
                            }
                        }
                        for r in reqs.iter_mut() {
                            if r["values"].as_array().is_some_and(|a| a.is_empty()) {
                                r.as_object_mut().map(|o| o.remove("values"));
                            }
                        }
                        o.insert(
                            ep.to_string(),
                            json!([{ "matchLabels": labels, "matchExpressions": reqs }]),
                        );
                    }
                    with_ports(o)
                })
                .collect(),
        }
    };
    let mut rule = serde_json::Map::new();
    rule.insert(
        "endpointSelector".to_string(),
        serde_json::to_value(selector_json(np.pod_selector.as_ref())).unwrap_or(Value::Null),
    );
    let mut has_dir = false;
    for (dir, is_ingress) in [("Ingress", true), ("Egress", false)] {
        if !types.iter().any(|t| t == dir) {
            continue;
        }
        has_dir = true;
        let mut items: Vec<Value> = Vec::new();
        if is_ingress {
            for r in np.ingress.iter().flatten() {
                items.extend(peer_items(&r.from, ports_json(&r.ports), true));
            }
        } else {
            for r in np.egress.iter().flatten() {
                items.extend(peer_items(&r.to, ports_json(&r.ports), false));
            }
        }
        if items.is_empty() {
            // A policy type with no rules isolates the pods: default deny.
            items.push(json!({}));
        }
        rule.insert(
            if is_ingress { "ingress" } else { "egress" }.to_string(),
            Value::Array(items),
        );
    }
    if !has_dir {
        return Err((
            "spec.policyTypes".to_string(),
            "no policy types".to_string(),
        ));
    }
    Ok(Value::Object(rule))
}

fn selector_json(sel: Option<&api::LabelSelector>) -> Value {
    use serde_json::json;
    let Some(sel) = sel else { return json!({}) };
    let labels: serde_json::Map<String, Value> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| (format!("k8s:{k}"), Value::String(v.0.clone())))
        .collect();
    let exprs: Vec<Value> = sel
        .match_expressions
        .iter()
        .flatten()
        .map(|e| {
            let mut o = json!({"key": format!("k8s:{}", e.key), "operator": e.operator});
            if let Some(v) = &e.values {
                o["values"] = json!(v.iter().map(|s| s.0.clone()).collect::<Vec<_>>());
            }
            o
        })
        .collect();
    json!({"matchLabels": labels, "matchExpressions": exprs})
}
