//! The CustomResourceDefinitions of tollgate: `TollgatePolicy`, generated from the Rust types the
//! loader deserializes (`tollgate_policy::api::Rule`), so the schema the API server enforces and
//! the one tollgate parses cannot drift; and `TollgateIdentity` (cluster-scoped, one object per
//! cluster-wide identity, see [`crate::kubernetes::identity`]), derived with kube's
//! `CustomResource`. For clusters without Cilium, also Cilium's own `CiliumNetworkPolicy` and
//! `CiliumClusterwideNetworkPolicy` ([`cilium_crds`]), from the same rule type. `tollgate crd`
//! prints them, `deploy/crds/` holds them, and a test fails when the two differ.
//!
//! The JSON schema (schemars, OpenAPI 3 flavour, everything inlined) is made *structural* as
//! Kubernetes requires: no `$ref`/`definitions`, no `additionalProperties: false` (unknown
//! fields are pruned by the API server, and tollgate itself rejects them with a precise error),
//! free-form values marked `x-kubernetes-preserve-unknown-fields`, int-or-string marked as such.

use std::collections::BTreeMap;

use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::r#gen::SchemaSettings;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tollgate_policy::api::Rule;

/// A cluster-wide identity: the object's name is the numeric identity (`256`…`65535`), its
/// spec the security-relevant labels it stands for. Created with optimistic concurrency (a
/// create of an existing name fails with 409), so every node ends up with the same number for
/// the same labels; reserved identities (1–255) are never objects.
#[derive(
    CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars1::JsonSchema,
)]
#[kube(
    group = "tollgate.io",
    version = "v1alpha1",
    kind = "TollgateIdentity",
    plural = "tollgateidentities",
    shortname = "tgid",
    category = "tollgate",
    crates(schemars = "::schemars1"),
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[schemars(crate = "schemars1")]
#[serde(rename_all = "camelCase")]
pub struct TollgateIdentitySpec {
    /// The labels, as `source:key` → value (`k8s:app` → `frontend`,
    /// `k8s:io.kubernetes.pod.namespace` → `prod`).
    pub security_labels: BTreeMap<String, String>,
}

/// The TollgateIdentity CRD as a JSON value.
pub fn tollgate_identity_crd() -> Value {
    let mut v = serde_json::to_value(TollgateIdentity::crd()).unwrap_or(Value::Null);
    v["metadata"]["labels"] = json!({"app.kubernetes.io/name": "tollgate"});
    v
}

/// Every CRD of tollgate, by kind, in the order `tollgate crd` prints them.
pub fn all_crds() -> Vec<(&'static str, Value)> {
    vec![
        ("TollgatePolicy", tollgate_policy_crd()),
        ("TollgateIdentity", tollgate_identity_crd()),
    ]
}

/// The `openAPIV3Schema` of one rule (`spec`, or an entry of `specs`).
pub fn rule_schema() -> Value {
    let settings = SchemaSettings::openapi3().with(|s| {
        s.inline_subschemas = true;
        s.option_nullable = false;
        s.option_add_null_type = false;
    });
    let root = settings.into_generator().into_root_schema_for::<Rule>();
    let mut v = serde_json::to_value(root.schema).unwrap_or(Value::Null);
    structural(&mut v);
    v
}

/// Rewrites a schemars schema into a Kubernetes structural schema (see the module docs). `v`
/// is in a schema position: only its sub-schemas (properties, items, additionalProperties,
/// anyOf/oneOf/allOf) are visited, never keyword values such as `enum` or extensions.
fn structural(v: &mut Value) {
    if matches!(v, Value::Bool(true)) {
        *v = json!({"x-kubernetes-preserve-unknown-fields": true});
        return;
    }
    let Value::Object(o) = v else { return };
    o.remove("$schema");
    o.remove("definitions");
    o.remove("title");
    if o.get("additionalProperties") == Some(&Value::Bool(false)) {
        o.remove("additionalProperties");
    }
    if o.is_empty() {
        o.insert(
            "x-kubernetes-preserve-unknown-fields".into(),
            Value::Bool(true),
        );
        return;
    }
    if let Some(Value::Object(props)) = o.get_mut("properties") {
        props.values_mut().for_each(structural);
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = o.get_mut(key) {
            structural(child);
        }
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(a)) = o.get_mut(key) {
            a.iter_mut().for_each(structural);
        }
    }
}

/// Structural-schema violations of `schema` (Kubernetes' rules that matter here), as JSON
/// pointers with a reason; empty when the schema can be served by the API server.
pub fn structural_problems(schema: &Value) -> Vec<String> {
    fn walk(v: &Value, at: &str, out: &mut Vec<String>) {
        let Value::Object(o) = v else {
            out.push(format!("{at}: a schema must be an object"));
            return;
        };
        for k in ["$ref", "definitions"] {
            if o.contains_key(k) {
                out.push(format!("{at}: `{k}` is not allowed"));
            }
        }
        let special = o.contains_key("x-kubernetes-int-or-string")
            || o.contains_key("x-kubernetes-preserve-unknown-fields");
        if !o.contains_key("type") && !special && !o.contains_key("anyOf") {
            out.push(format!("{at}: no `type`"));
        }
        if o.contains_key("properties") && o.contains_key("additionalProperties") {
            out.push(format!("{at}: `properties` with `additionalProperties`"));
        }
        for key in ["properties"] {
            if let Some(Value::Object(props)) = o.get(key) {
                for (name, p) in props {
                    walk(p, &format!("{at}/{key}/{name}"), out);
                }
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(child @ Value::Object(_)) = o.get(key) {
                walk(child, &format!("{at}/{key}"), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(schema, "", &mut out);
    out
}

/// The `openAPIV3Schema` of a policy object: `spec` (one rule) and/or `specs` (a list of
/// rules), both of [`rule_schema`], and `status`.
fn policy_object_schema(description: &str, status: Value) -> Value {
    let rule = rule_schema();
    json!({
        "type": "object",
        "description": description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": rule.clone(),
            "specs": {"type": "array", "items": rule},
            "status": status,
        },
    })
}

/// The whole CRD as a JSON value (serialise it as YAML or JSON; both are valid manifests).
pub fn tollgate_policy_crd() -> Value {
    let status = json!({
        "type": "object",
        "properties": {
            "conditions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["type", "status"],
                    "properties": {
                        "type": {"type": "string"},
                        "status": {"type": "string"},
                        "reason": {"type": "string"},
                        "message": {"type": "string"},
                        "lastTransitionTime": {"type": "string", "format": "date-time"},
                        "observedGeneration": {"type": "integer"},
                    },
                },
            },
        },
    });
    let columns = json!([
        {"name": "Enforcement", "type": "string", "jsonPath": ".spec.enforcement"},
        {"name": "Valid", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Valid\")].status"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]);
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": "tollgatepolicies.tollgate.io",
            "labels": {"app.kubernetes.io/name": "tollgate"},
        },
        "spec": {
            "group": "tollgate.io",
            "names": {
                "kind": "TollgatePolicy",
                "listKind": "TollgatePolicyList",
                "plural": "tollgatepolicies",
                "singular": "tollgatepolicy",
                "shortNames": ["tgp"],
                "categories": ["tollgate"],
            },
            "scope": "Namespaced",
            "versions": [{
                "name": "v1alpha1",
                "served": true,
                "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": policy_object_schema(
                    "L7-aware network policy for tollgate: CiliumNetworkPolicy's rule model plus L7 deny rules, audit enforcement, gRPC, header regex/CIDR and Kafka group/transactional-id rules.",
                    status,
                )},
            }],
        },
    })
}

/// Cilium's policy kinds, for clusters without Cilium (the chart installs them only when
/// asked): CiliumNetworkPolicy (namespaced) and CiliumClusterwideNetworkPolicy, `cilium.io/v2`,
/// with the schema of the rule type tollgate parses them with. That type includes the
/// TollgatePolicy extensions (`action`, `enforcement`, …) on purpose: a schema without them
/// would have the API server prune `action: deny` from a CNP's HTTP rule, storing an *allow*
/// rule; with them the object keeps what its author wrote and tollgate rejects the extension
/// with "… is a TollgatePolicy extension" (a Warning Event). `status` is free-form (Cilium's
/// agents write theirs there when Cilium is installed later and replaces these CRDs).
pub fn cilium_crds() -> Vec<(&'static str, Value)> {
    [false, true]
        .into_iter()
        .map(|clusterwide| {
            let (kind, plural, short, scope) = if clusterwide {
                (
                    "CiliumClusterwideNetworkPolicy",
                    "ciliumclusterwidenetworkpolicies",
                    "ccnp",
                    "Cluster",
                )
            } else {
                (
                    "CiliumNetworkPolicy",
                    "ciliumnetworkpolicies",
                    "cnp",
                    "Namespaced",
                )
            };
            let status = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
            let crd = json!({
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {
                    "name": format!("{plural}.cilium.io"),
                    "labels": {"app.kubernetes.io/name": "tollgate"},
                },
                "spec": {
                    "group": "cilium.io",
                    "names": {
                        "kind": kind,
                        "listKind": format!("{kind}List"),
                        "plural": plural,
                        "singular": kind.to_lowercase(),
                        "shortNames": [short],
                        "categories": ["cilium", "ciliumpolicy"],
                    },
                    "scope": scope,
                    "versions": [{
                        "name": "v2",
                        "served": true,
                        "storage": true,
                        "subresources": {"status": {}},
                        "additionalPrinterColumns": [
                            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                        ],
                        "schema": {"openAPIV3Schema": policy_object_schema(
                            &format!("{kind} (cilium.io/v2) as tollgate parses it: `spec` and/or `specs`, each a Cilium policy rule. Installed by tollgate for clusters without Cilium."),
                            status,
                        )},
                    }],
                },
            });
            (kind, crd)
        })
        .collect()
}

/// The committed file of one CRD (`deploy/crds/tollgate.io_<plural>.yaml`): a header saying
/// where it comes from, then the CRD as YAML.
pub fn crd_file(kind: &str, crd: &Value) -> String {
    let from = match kind {
        "TollgatePolicy" | "CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy" => {
            "tollgate_policy::api::Rule".to_string()
        }
        k => format!("tollgate_agent::crd::{k}Spec"),
    };
    format!(
        "# Generated by `tollgate crd` from {from}; do not edit.\n---\n{}",
        to_yaml(crd).trim_start_matches("---\n")
    )
}

/// `value` as YAML text.
pub fn to_yaml(value: &Value) -> String {
    fn conv(v: &Value) -> yaml_rust2::Yaml {
        use yaml_rust2::Yaml;
        match v {
            Value::Null => Yaml::Null,
            Value::Bool(b) => Yaml::Boolean(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Yaml::Integer(i),
                None => Yaml::Real(n.to_string()),
            },
            Value::String(s) => Yaml::String(s.clone()),
            Value::Array(a) => Yaml::Array(a.iter().map(conv).collect()),
            Value::Object(o) => Yaml::Hash(
                o.iter()
                    .map(|(k, v)| (Yaml::String(k.clone()), conv(v)))
                    .collect(),
            ),
        }
    }
    let mut out = String::new();
    let mut emitter = yaml_rust2::YamlEmitter::new(&mut out);
    let _ = emitter.dump(&conv(value));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_schema_is_structural_and_knows_the_extensions() {
        let crd = tollgate_policy_crd();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert_eq!(structural_problems(schema), Vec::<String>::new());
        let rule = &schema["properties"]["spec"]["properties"];
        assert_eq!(rule["enforcement"]["enum"], json!(["enforce", "audit"]));
        let http = &rule["ingress"]["items"]["properties"]["toPorts"]["items"]["properties"]["rules"]
            ["properties"]["http"]["items"]["properties"];
        assert!(http.get("action").is_some(), "{http}");
        let port = &rule["ingress"]["items"]["properties"]["toPorts"]["items"]["properties"]["ports"]
            ["items"]["properties"]["port"];
        assert_eq!(port["x-kubernetes-int-or-string"], json!(true));
    }

    #[test]
    fn the_identity_crd_is_cluster_scoped_and_structural() {
        let crd = tollgate_identity_crd();
        assert_eq!(crd["metadata"]["name"], "tollgateidentities.tollgate.io");
        assert_eq!(crd["spec"]["scope"], "Cluster");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert_eq!(structural_problems(schema), Vec::<String>::new());
        let labels = &schema["properties"]["spec"]["properties"]["securityLabels"];
        assert_eq!(labels["additionalProperties"]["type"], "string", "{labels}");
    }

    #[test]
    fn the_cilium_crds_are_structural_with_cilium_names() {
        let crds = cilium_crds();
        let (cnp, ccnp) = (&crds[0].1, &crds[1].1);
        assert_eq!(cnp["metadata"]["name"], "ciliumnetworkpolicies.cilium.io");
        assert_eq!(cnp["spec"]["scope"], "Namespaced");
        assert_eq!(cnp["spec"]["names"]["shortNames"], json!(["cnp"]));
        assert_eq!(
            ccnp["metadata"]["name"],
            "ciliumclusterwidenetworkpolicies.cilium.io"
        );
        assert_eq!(ccnp["spec"]["scope"], "Cluster");
        assert_eq!(ccnp["spec"]["names"]["shortNames"], json!(["ccnp"]));
        for (_, crd) in &crds {
            assert_eq!(crd["spec"]["group"], "cilium.io");
            assert_eq!(crd["spec"]["versions"][0]["name"], "v2");
            let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
            assert_eq!(structural_problems(schema), Vec::<String>::new());
            assert_eq!(schema["properties"]["spec"], rule_schema());
            assert_eq!(schema["properties"]["specs"]["items"], rule_schema());
        }
    }

    #[test]
    fn structural_check_catches_what_the_api_server_would_refuse() {
        let bad = json!({"type": "object", "properties": {
            "a": {"$ref": "#/definitions/x"},
            "b": {"description": "no type"},
        }});
        let problems = structural_problems(&bad);
        assert_eq!(problems.len(), 3, "{problems:?}");
    }
}
