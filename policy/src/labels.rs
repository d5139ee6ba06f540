//! Labels, label sets and compiled label selectors.
//!
//! A label has a source (`k8s`, `reserved`, `cidr`, `fqdn`, …), a key and a value, as in
//! Cilium. A selector key written without a source (`app`) matches a label of that key from any
//! source; `k8s:app` only a Kubernetes label (cnp-semantics §2).

use std::collections::BTreeMap;
use std::fmt;

use crate::api::{LabelSelector, StringLike};

pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    pub source: String,
    pub key: String,
    pub value: String,
}

impl Label {
    pub fn new(source: &str, key: &str, value: &str) -> Self {
        Label {
            source: source.to_string(),
            key: key.to_string(),
            value: value.to_string(),
        }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.source, self.key)
        } else {
            write!(f, "{}:{}={}", self.source, self.key, self.value)
        }
    }
}

/// A sorted, deduplicated set of labels: the security-relevant identity of a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSet(Vec<Label>);

impl LabelSet {
    pub fn new(mut labels: Vec<Label>) -> Self {
        labels.sort();
        labels.dedup();
        LabelSet(labels)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.iter()
    }

    pub fn contains_key(&self, source: Option<&str>, key: &str) -> bool {
        self.values_of(source, key).next().is_some()
    }

    pub fn values_of<'a>(
        &'a self,
        source: Option<&'a str>,
        key: &'a str,
    ) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |l| l.key == key && source.is_none_or(|s| s == l.source))
            .map(|l| l.value.as_str())
    }

    pub fn has_reserved(&self, key: &str) -> bool {
        self.contains_key(Some("reserved"), key)
    }
}

impl fmt::Display for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{l}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Operator {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

/// One requirement of a compiled selector. `source: None` is Cilium's `any:` source.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Requirement {
    pub source: Option<String>,
    pub key: String,
    pub op: Operator,
}

impl Requirement {
    pub fn matches(&self, labels: &LabelSet) -> bool {
        let src = self.source.as_deref();
        match &self.op {
            Operator::Exists => labels.contains_key(src, &self.key),
            Operator::DoesNotExist => !labels.contains_key(src, &self.key),
            Operator::In(vals) => labels
                .values_of(src, &self.key)
                .any(|v| vals.iter().any(|x| x == v)),
            Operator::NotIn(vals) => !labels
                .values_of(src, &self.key)
                .any(|v| vals.iter().any(|x| x == v)),
        }
    }
}

/// A compiled label selector: all requirements ANDed; no requirement selects everything.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

/// Split `k8s:app` into (Some("k8s"), "app"); `app` into (None, "app"); `any:app` into
/// (None, "app").
pub fn split_source(key: &str) -> (Option<&str>, &str) {
    match key.split_once(':') {
        Some(("any", k)) => (None, k),
        Some((s, k)) if !s.is_empty() && !s.contains('/') && !s.contains('.') => (Some(s), k),
        _ => (None, key),
    }
}

impl Selector {
    /// Compile an API selector. Errors are `(relative path, message)`.
    pub fn compile(sel: &LabelSelector) -> Result<Selector, (String, String)> {
        let mut requirements = Vec::new();
        for (k, StringLike(v)) in sel.match_labels.iter().flatten() {
            let (source, key) = split_source(k);
            check_key(key).map_err(|m| (format!("matchLabels.{k}"), m))?;
            requirements.push(Requirement {
                source: source.map(str::to_string),
                key: key.to_string(),
                op: Operator::In(vec![v.clone()]),
            });
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let at = |f: &str| format!("matchExpressions[{i}].{f}");
            let (source, key) = split_source(&e.key);
            check_key(key).map_err(|m| (at("key"), m))?;
            let values: Vec<String> = e.values.iter().flatten().map(|s| s.0.clone()).collect();
            let op = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err((
                        at("values"),
                        format!("operator {} needs at least one value", e.operator),
                    ));
                }
                "In" => Operator::In(values),
                "NotIn" => Operator::NotIn(values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err((
                        at("values"),
                        format!("operator {} takes no values", e.operator),
                    ));
                }
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err((
                        at("operator"),
                        format!(
                            "unknown operator `{other}` (expected In, NotIn, Exists or DoesNotExist)"
                        ),
                    ));
                }
            };
            requirements.push(Requirement {
                source: source.map(str::to_string),
                key: key.to_string(),
                op,
            });
        }
        Ok(Selector { requirements })
    }

    pub fn matches(&self, labels: &LabelSet) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    pub fn is_wildcard(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn mentions_key(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.requirements.iter().any(|r| pred(&r.key))
    }

    pub fn uses_source(&self, source: &str) -> bool {
        self.requirements
            .iter()
            .any(|r| r.source.as_deref() == Some(source))
    }

    /// Replace every requirement on the pod namespace with `namespace == ns` (CNP subject
    /// scoping, cnp-semantics §2).
    pub fn force_namespace(&mut self, ns: &str) {
        self.requirements.retain(|r| r.key != NAMESPACE_LABEL);
        self.requirements
            .push(ns_requirement(Operator::In(vec![ns.to_string()])));
    }

    pub fn add(&mut self, r: Requirement) {
        self.requirements.push(r);
    }
}

pub fn ns_requirement(op: Operator) -> Requirement {
    Requirement {
        source: Some("k8s".to_string()),
        key: NAMESPACE_LABEL.to_string(),
        op,
    }
}

fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("label key must not be empty".to_string());
    }
    if key.len() > 317 {
        return Err("label key longer than 317 characters".to_string());
    }
    Ok(())
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let src = r.source.as_deref().unwrap_or("any");
            match &r.op {
                Operator::In(v) if v.len() == 1 => write!(f, "{src}:{}={}", r.key, v[0])?,
                Operator::In(v) => write!(f, "{src}:{} in ({})", r.key, v.join(","))?,
                Operator::NotIn(v) => write!(f, "{src}:{} notin ({})", r.key, v.join(","))?,
                Operator::Exists => write!(f, "{src}:{}", r.key)?,
                Operator::DoesNotExist => write!(f, "!{src}:{}", r.key)?,
            }
        }
        Ok(())
    }
}

/// Labels of a pod: its own labels (source `k8s`), its namespace, its namespace's labels and
/// its service account, as Cilium derives them.
pub fn pod_labels(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
    service_account: Option<&str>,
) -> LabelSet {
    let mut out: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new("k8s", k, v))
        .collect();
    out.push(Label::new("k8s", NAMESPACE_LABEL, namespace));
    for (k, v) in namespace_labels {
        out.push(Label::new(
            "k8s",
            &format!("{NAMESPACE_LABELS_PREFIX}{k}"),
            v,
        ));
    }
    out.push(Label::new(
        "k8s",
        &format!("{NAMESPACE_LABELS_PREFIX}kubernetes.io/metadata.name"),
        namespace,
    ));
    if let Some(sa) = service_account {
        out.push(Label::new("k8s", SERVICE_ACCOUNT_LABEL, sa));
    }
    LabelSet::new(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(yaml: &str) -> Selector {
        let v = crate::yaml::parse_documents(yaml).unwrap().remove(0).value;
        Selector::compile(&serde_json::from_value(v).unwrap()).unwrap()
    }

    fn pod(ns: &str, kv: &[(&str, &str)]) -> LabelSet {
        let l = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        pod_labels(ns, &l, &BTreeMap::new(), None)
    }

    #[test]
    fn any_source_key_matches_k8s_label_but_reserved_source_does_not() {
        let p = pod("prod", &[("app", "web")]);
        assert!(sel("matchLabels: {app: web}").matches(&p));
        assert!(sel("matchLabels: {'k8s:app': web}").matches(&p));
        assert!(sel("matchLabels: {'any:app': web}").matches(&p));
        assert!(!sel("matchLabels: {'reserved:app': web}").matches(&p));
    }

    #[test]
    fn expressions_follow_kubernetes_semantics() {
        let p = pod("prod", &[("tier", "db")]);
        assert!(
            sel("matchExpressions: [{key: tier, operator: In, values: [db, cache]}]").matches(&p)
        );
        assert!(!sel("matchExpressions: [{key: tier, operator: NotIn, values: [db]}]").matches(&p));
        assert!(sel("matchExpressions: [{key: zone, operator: NotIn, values: [a]}]").matches(&p));
        assert!(sel("matchExpressions: [{key: tier, operator: Exists}]").matches(&p));
        assert!(sel("matchExpressions: [{key: zone, operator: DoesNotExist}]").matches(&p));
        assert!(sel("{}").matches(&p));
    }

    #[test]
    fn selector_errors_name_the_field() {
        let v = crate::yaml::parse_documents("matchExpressions: [{key: a, operator: Is}]")
            .unwrap()
            .remove(0)
            .value;
        let err = Selector::compile(&serde_json::from_value(v).unwrap()).unwrap_err();
        assert_eq!(err.0, "matchExpressions[0].operator");
        assert_eq!(
            err.1,
            "unknown operator `Is` (expected In, NotIn, Exists or DoesNotExist)"
        );
    }

    #[test]
    fn namespace_labels_are_selectable() {
        let mut nsl = BTreeMap::new();
        nsl.insert("team".to_string(), "a".to_string());
        let p = pod_labels("prod", &BTreeMap::new(), &nsl, None);
        assert!(sel("matchLabels: {io.cilium.k8s.namespace.labels.team: a}").matches(&p));
        assert!(
            sel("matchLabels: {io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name: prod}")
                .matches(&p)
        );
    }
}
