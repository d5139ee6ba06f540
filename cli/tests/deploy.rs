//! deploy/ stays true: the committed CRDs are exactly what `tollgate crd` generates from the Rust
//! types, the TollgatePolicy schema accepts every TollgatePolicy example of the repository and rejects
//! wrongly typed ones, and the plain manifests are well-formed Kubernetes objects.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every CRD: its kind and its committed file (the chart's `crds/` holds a copy of each).
const CRDS: [(&str, &str); 2] = [
    ("TollgatePolicy", "tollgate.io_tollgatepolicies.yaml"),
    ("TollgateIdentity", "tollgate.io_tollgateidentities.yaml"),
];

fn tollgate_crd(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("crd")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "tollgate crd {args:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn committed_crds_are_the_generated_ones() {
    let mut all = String::new();
    for (kind, file) in CRDS {
        let generated = tollgate_crd(&[kind]);
        let path = repo().join("deploy/crds").join(file);
        let committed = std::fs::read_to_string(&path).unwrap();
        assert!(
            generated == committed,
            "{} differs from `tollgate crd {kind}`: run `cargo run -q -p tollgate -- crd {kind} > deploy/crds/{file}`",
            path.display()
        );
        all.push_str(&committed);
    }
    assert_eq!(tollgate_crd(&[]), all, "`tollgate crd` prints every CRD");
    let unknown = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["crd", "Nope"])
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(2));
}

fn rule_validator() -> jsonschema::Validator {
    let crd = tollgate_agent::crd::tollgate_policy_crd();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    jsonschema::validator_for(schema).expect("the rule schema compiles")
}

#[test]
fn every_tollgate_policy_example_validates_and_wrong_types_do_not() {
    let v = rule_validator();
    let mut checked = 0;
    for file in [
        "conformance/policies/gateway/policies.yaml",
        "conformance/policies/kafka/policies.yaml",
    ] {
        let src = std::fs::read_to_string(repo().join(file)).unwrap();
        for doc in tollgate_policy::yaml::parse_documents(&src).unwrap() {
            if doc.value["kind"] != "TollgatePolicy" {
                continue;
            }
            let specs: Vec<&serde_json::Value> = match doc.value["specs"].as_array() {
                Some(a) => a.iter().collect(),
                None => vec![&doc.value["spec"]],
            };
            for spec in specs {
                let errors: Vec<String> = v.iter_errors(spec).map(|e| e.to_string()).collect();
                assert!(errors.is_empty(), "{file} line {}: {errors:?}", doc.line);
                checked += 1;
            }
        }
    }
    assert!(checked >= 3, "only {checked} TollgatePolicy rules found");
    for (bad, why) in [
        (serde_json::json!({"enforcement": "maybe"}), "enum"),
        (serde_json::json!({"ingress": {"toPorts": []}}), "a list"),
        (
            serde_json::json!({"egress": [{"toPorts": [{"rules": {"http": [{"action": "block"}]}}]}]}),
            "action enum",
        ),
        (
            serde_json::json!({"endpointSelector": {"matchLabels": {"app": ["x"]}}}),
            "label values are strings",
        ),
    ] {
        assert!(!v.is_valid(&bad), "{why}: {bad}");
    }
}

/// Deserialises `doc` into the typed Kubernetes object and back: a misspelt or misplaced field
/// (which the typed object does not have) makes the round trip differ.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
    doc: &serde_json::Value,
) -> Result<(), String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if &back == doc {
        Ok(())
    } else {
        Err(format!(
            "fields lost or changed in the round trip:\n{doc:#}\n{back:#}"
        ))
    }
}

fn check_object(doc: &serde_json::Value) -> Result<(), String> {
    use k8s_openapi::api::{apps::v1 as apps, core::v1 as core, rbac::v1 as rbac};
    match doc["kind"].as_str().unwrap_or("") {
        "Namespace" => round_trip::<core::Namespace>(doc),
        "ServiceAccount" => round_trip::<core::ServiceAccount>(doc),
        "ConfigMap" => round_trip::<core::ConfigMap>(doc),
        "Service" => round_trip::<core::Service>(doc),
        "DaemonSet" => round_trip::<apps::DaemonSet>(doc),
        "ClusterRole" => round_trip::<rbac::ClusterRole>(doc),
        "ClusterRoleBinding" => round_trip::<rbac::ClusterRoleBinding>(doc),
        "CustomResourceDefinition" => round_trip::<
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        >(doc),
        other => Err(format!("no schema known for kind `{other}`")),
    }
}

#[test]
fn the_plain_manifests_and_the_crd_are_valid_kubernetes_objects() {
    let mut kinds = Vec::new();
    let files = ["deploy/manifests/tollgate.yaml".to_string()]
        .into_iter()
        .chain(CRDS.iter().map(|(_, f)| format!("deploy/crds/{f}")));
    for file in files {
        let src = std::fs::read_to_string(repo().join(&file)).unwrap();
        for doc in tollgate_policy::yaml::parse_documents(&src).unwrap() {
            if doc.value.is_null() {
                continue;
            }
            if let Err(e) = check_object(&doc.value) {
                panic!("{file} line {}: {e}", doc.line);
            }
            kinds.push(doc.value["kind"].as_str().unwrap().to_string());
        }
    }
    for want in ["DaemonSet", "ClusterRole", "CustomResourceDefinition"] {
        assert!(kinds.iter().any(|k| k == want), "{want} missing: {kinds:?}");
    }
    // The check itself catches a misplaced field.
    let typo = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "datas": {}});
    assert!(check_object(&typo).is_err());
}

#[test]
fn the_chart_carries_the_same_crd_and_parses() {
    let chart = repo().join("deploy/helm/tollgate");
    for (_, file) in CRDS {
        assert_eq!(
            std::fs::read_to_string(chart.join("crds").join(file)).unwrap(),
            std::fs::read_to_string(repo().join("deploy/crds").join(file)).unwrap(),
            "copy deploy/crds/{file} into the chart's crds/"
        );
    }
    let meta = tollgate_policy::yaml::parse_documents(
        &std::fs::read_to_string(chart.join("Chart.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta[0].value["apiVersion"], "v2");
    assert_eq!(meta[0].value["name"], "tollgate");
    let values = tollgate_policy::yaml::parse_documents(
        &std::fs::read_to_string(chart.join("values.yaml")).unwrap(),
    )
    .unwrap();
    // Every `.Values.x.y` the templates use exists in values.yaml.
    let re = regex::Regex::new(r"\.Values\.([A-Za-z0-9_.]+)").unwrap();
    for entry in std::fs::read_dir(chart.join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for cap in re.captures_iter(&text) {
            let mut v = &values[0].value;
            for key in cap[1].split('.') {
                v = &v[key];
            }
            assert!(
                !v.is_null(),
                "{}: .Values.{} is not in values.yaml",
                path.display(),
                &cap[1]
            );
        }
    }
}

#[test]
fn the_dockerfile_builds_the_binary_the_entrypoint_runs() {
    let text = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let mut stages = Vec::new();
    let mut copied_to = Vec::new();
    let mut entrypoint = None;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (op, rest) = line.split_once(' ').unwrap_or((line, ""));
        match op {
            "FROM" => {
                if let Some((_, name)) = rest.split_once(" AS ") {
                    stages.push(name.trim().to_string());
                }
            }
            "COPY" => {
                let parts: Vec<&str> = rest.split_whitespace().collect();
                if let Some(from) = parts.iter().find_map(|p| p.strip_prefix("--from=")) {
                    assert!(
                        stages.iter().any(|s| s == from),
                        "COPY --from={from}: no such stage"
                    );
                } else {
                    for src in &parts[..parts.len() - 1] {
                        assert!(
                            repo().join(src).exists(),
                            "COPY {src}: not in the repository"
                        );
                    }
                }
                copied_to.push(parts[parts.len() - 1].to_string());
            }
            "ENTRYPOINT" => entrypoint = Some(rest.to_string()),
            "RUN" | "WORKDIR" | "CMD" | "ENV" | "USER" | "ARG" | "LABEL" | "EXPOSE" | "&&"
            | "\\" => {}
            other if line.starts_with("&&") || line.starts_with("||") => {
                let _ = other;
            }
            other => panic!("unexpected instruction `{other}` in deploy/Dockerfile"),
        }
        for script in rest
            .split_whitespace()
            .filter(|w| w.starts_with("scripts/"))
        {
            assert!(
                repo().join(script).exists(),
                "{script} is not in the repository"
            );
        }
    }
    let entry = entrypoint.expect("an ENTRYPOINT");
    assert!(
        copied_to.iter().any(|d| entry.contains(d.as_str())),
        "ENTRYPOINT {entry} runs nothing that was copied in ({copied_to:?})"
    );
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_the_proxy_registers() {
    let text =
        std::fs::read_to_string(repo().join("deploy/grafana/tollgate-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    // The names the proxy registers (families without samples are not exported until used,
    // so the registry calls in the source are the list to check against).
    let src = std::fs::read_to_string(repo().join("proxy/src/metrics.rs")).unwrap();
    let registered: Vec<String> = regex::Regex::new(r#"register\(\s*"(tollgate_[a-z_]+)""#)
        .unwrap()
        .captures_iter(&src)
        .map(|c| c[1].to_string())
        .collect();
    assert!(registered.len() >= 6, "{registered:?}");
    let re = regex::Regex::new(r"tollgate_[a-z_]+").unwrap();
    let mut seen = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for m in re.find_iter(expr) {
                let base = ["_total", "_bucket", "_count", "_sum"]
                    .iter()
                    .fold(m.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
                assert!(
                    registered.iter().any(|r| r == base),
                    "panel {} queries {}, which the proxy does not register ({registered:?})",
                    panel["title"],
                    m.as_str()
                );
                seen += 1;
            }
        }
    }
    assert!(seen >= 7);
}

/// The `rules:` block of the first ClusterRole in `text`, as lines.
fn cluster_role_rules(text: &str) -> Vec<String> {
    let start = text.find("kind: ClusterRole\n").expect("a ClusterRole");
    let rest = &text[start..];
    let rules = rest.find("rules:\n").expect("rules") + "rules:\n".len();
    rest[rules..]
        .lines()
        .take_while(|l| l.starts_with("  ") || l.trim_start().starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_cluster_role_grants_what_the_agent_uses_and_no_more_where_it_writes() {
    let manifests = std::fs::read_to_string(repo().join("deploy/manifests/tollgate.yaml")).unwrap();
    let chart =
        std::fs::read_to_string(repo().join("deploy/helm/tollgate/templates/rbac.yaml")).unwrap();
    let rules = cluster_role_rules(&manifests);
    assert_eq!(
        rules,
        cluster_role_rules(&chart),
        "the chart's ClusterRole rules differ"
    );
    let doc = tollgate_policy::yaml::parse_documents(&format!("rules:\n{}\n", rules.join("\n")))
        .unwrap()
        .remove(0)
        .value;
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let granted = |group: &str, resource: &str| -> Vec<String> {
        let mut verbs = Vec::new();
        for r in doc["rules"].as_array().unwrap() {
            if strings(&r["apiGroups"]).iter().any(|g| g == group)
                && strings(&r["resources"]).iter().any(|x| x == resource)
            {
                verbs.extend(strings(&r["verbs"]));
            }
        }
        verbs
    };
    for (group, resource, verbs) in tollgate_agent::kubernetes::API_ACCESS {
        let have = granted(group, resource);
        for v in *verbs {
            assert!(
                have.iter().any(|h| h == v),
                "{group}/{resource}: `{v}` not granted ({have:?})"
            );
        }
        let writes = verbs
            .iter()
            .any(|v| ["create", "patch", "update", "delete"].contains(v));
        if writes {
            let extra: Vec<&String> = have
                .iter()
                .filter(|h| !verbs.contains(&h.as_str()))
                .collect();
            assert!(
                extra.is_empty(),
                "{group}/{resource}: {extra:?} granted but never used"
            );
        }
    }
    // The check itself sees a missing grant.
    assert!(granted("tollgate.io", "no-such-resource").is_empty());
}
