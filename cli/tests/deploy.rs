//! deploy/ stays true: the committed CRDs (tollgate's and, for clusters without Cilium, Cilium's
//! CNP/CCNP) are exactly what `tollgate crd` generates from the Rust types, the policy schemas
//! accept every example of the repository and reject wrongly typed ones, the plain manifests are
//! well-formed Kubernetes objects, and the Helm chart, rendered by the real `helm template` with
//! its defaults and with every option on, gives only valid objects (the defaults: exactly the
//! plain manifests).

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

/// Cilium's CRDs, printed only when named (`deploy/crds/cilium/`, the chart's `files/cilium/`).
const CILIUM_CRDS: [(&str, &str); 2] = [
    (
        "CiliumNetworkPolicy",
        "cilium/cilium.io_ciliumnetworkpolicies.yaml",
    ),
    (
        "CiliumClusterwideNetworkPolicy",
        "cilium/cilium.io_ciliumclusterwidenetworkpolicies.yaml",
    ),
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
    assert_eq!(
        tollgate_crd(&[]),
        all,
        "`tollgate crd` prints every CRD of tollgate"
    );
    for (kind, file) in CILIUM_CRDS {
        let path = repo().join("deploy/crds").join(file);
        assert!(
            tollgate_crd(&[kind]) == std::fs::read_to_string(&path).unwrap(),
            "{} differs from `tollgate crd {kind}`: run `cargo run -q -p tollgate -- crd {kind} > deploy/crds/{file}`",
            path.display()
        );
        assert!(
            !all.contains(&format!("kind: {kind}\n")),
            "`tollgate crd` alone must not print Cilium's {kind} CRD"
        );
    }
    let unknown = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["crd", "Nope"])
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(2));
}

fn rule_schema() -> serde_json::Value {
    let crd = tollgate_agent::crd::tollgate_policy_crd();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

/// Fields of `value` the API server would prune under the structural `schema`: not among the
/// `properties` of an object schema that has neither `additionalProperties` nor
/// `x-kubernetes-preserve-unknown-fields`. A misspelt or misplaced field passes the schema's type
/// checks (Kubernetes schemas do not say `additionalProperties: false`) but is caught here.
fn pruned_fields(schema: &serde_json::Value, value: &serde_json::Value, at: &str) -> Vec<String> {
    use serde_json::Value;
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return Vec::new();
    }
    let mut out = Vec::new();
    match value {
        Value::Object(o) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, v) in o {
                let path = format!("{at}.{k}");
                match props.and_then(|p| p.get(k)).or(extra) {
                    Some(s) => out.extend(pruned_fields(s, v, &path)),
                    None => out.push(format!("{path}: not in the schema (pruned)")),
                }
            }
        }
        Value::Array(a) => {
            if let Some(items) = schema.get("items") {
                for (i, v) in a.iter().enumerate() {
                    out.extend(pruned_fields(items, v, &format!("{at}[{i}]")));
                }
            }
        }
        _ => {}
    }
    out
}

/// What the API server would say about `value` under `schema`: type errors (jsonschema) and
/// the fields it would prune.
fn schema_problems(schema: &serde_json::Value, value: &serde_json::Value) -> Vec<String> {
    let v = jsonschema::validator_for(schema).expect("the schema compiles");
    let mut out: Vec<String> = v.iter_errors(value).map(|e| e.to_string()).collect();
    out.extend(pruned_fields(schema, value, ""));
    out
}

/// Every rule (`spec`, each entry of `specs`) of every document of `kind` in the repository's
/// policy examples (conformance/policies, docs/examples), as (file, line, rule).
fn example_rules(kind: &str) -> Vec<(String, usize, serde_json::Value)> {
    fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                yaml_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    for dir in ["conformance/policies", "docs/examples"] {
        yaml_files(&repo().join(dir), &mut files);
    }
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let src = std::fs::read_to_string(&path).unwrap();
        let name = path.strip_prefix(repo()).unwrap().display().to_string();
        for doc in tollgate_policy::yaml::parse_documents(&src).unwrap() {
            if doc.value["kind"] != kind {
                continue;
            }
            let specs: Vec<serde_json::Value> = match doc.value["specs"].as_array() {
                Some(a) => a.clone(),
                None => vec![doc.value["spec"].clone()],
            };
            out.extend(specs.into_iter().map(|s| (name.clone(), doc.line, s)));
        }
    }
    out
}

#[test]
fn every_tollgate_policy_example_validates_and_wrong_types_do_not() {
    let schema = rule_schema();
    let rules = example_rules("TollgatePolicy");
    for (file, line, spec) in &rules {
        let problems = schema_problems(&schema, spec);
        assert!(problems.is_empty(), "{file} line {line}: {problems:?}");
    }
    assert!(
        rules.len() >= 3,
        "only {} TollgatePolicy rules found",
        rules.len()
    );
    let v = jsonschema::validator_for(&schema).unwrap();
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
    // A typo passes the types but is a field the API server would drop.
    let typo = serde_json::json!({"ingress": [{"fromEntitys": ["world"]}]});
    assert_eq!(
        pruned_fields(&schema, &typo, ""),
        vec![".ingress[0].fromEntitys: not in the schema (pruned)"]
    );
}

#[test]
fn every_cilium_policy_example_validates_against_the_cilium_crds() {
    for ((kind, crd), (want, _)) in tollgate_agent::crd::cilium_crds().iter().zip(CILIUM_CRDS) {
        assert_eq!(*kind, want);
        let object = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let problems = tollgate_agent::crd::structural_problems(object);
        assert!(problems.is_empty(), "{kind}: {problems:?}");
        let rules = example_rules(kind);
        let mut typo_seen = false;
        for (file, line, spec) in &rules {
            for (key, schema) in [
                ("spec", &object["properties"]["spec"]),
                ("specs", &object["properties"]["specs"]["items"]),
            ] {
                let problems = schema_problems(schema, spec);
                if file == "docs/examples/broken.yaml" {
                    // The lint example's one typo is the only thing its schema sees; the rest of
                    // its mistakes are semantic (`tollgate lint` names them).
                    assert_eq!(
                        problems,
                        vec![".ingress[2].fromEntitys: not in the schema (pruned)"],
                        "{file} as {key}"
                    );
                    typo_seen = true;
                } else {
                    assert!(
                        problems.is_empty(),
                        "{file} line {line} ({kind} {key}): {problems:?}"
                    );
                }
            }
        }
        let least = if *kind == "CiliumNetworkPolicy" {
            10
        } else {
            1
        };
        assert!(
            rules.len() >= least,
            "only {} {kind} rules found",
            rules.len()
        );
        assert_eq!(typo_seen, *kind == "CiliumNetworkPolicy");
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
        "ServiceMonitor" => check_service_monitor(doc),
        other => Err(format!("no schema known for kind `{other}`")),
    }
}

/// A ServiceMonitor (no k8s-openapi type: prometheus-operator's own CRD, vendored in
/// tests/schemas/): `metadata` round-trips through `ObjectMeta`, the rest must pass the CRD's
/// schema with nothing pruned.
fn check_service_monitor(doc: &serde_json::Value) -> Result<(), String> {
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/schemas/monitoring.coreos.com_servicemonitors.yaml"),
    )
    .unwrap();
    let crd = tollgate_policy::yaml::parse_documents(&src)
        .unwrap()
        .remove(0)
        .value;
    let version = crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| {
            doc["apiVersion"] == format!("monitoring.coreos.com/{}", v["name"].as_str().unwrap())
        })
        .ok_or_else(|| format!("no ServiceMonitor version {}", doc["apiVersion"]))?;
    round_trip::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>(&doc["metadata"])?;
    let mut rest = doc.clone();
    rest.as_object_mut().unwrap().remove("metadata");
    let problems = schema_problems(&version["schema"]["openAPIV3Schema"], &rest);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("ServiceMonitor: {problems:?}"))
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
    let monitor = |endpoint: serde_json::Value| {
        serde_json::json!({"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": "x"}, "spec": {"selector": {}, "endpoints": [endpoint]}})
    };
    assert_eq!(
        check_object(&monitor(serde_json::json!({"port": "metrics"}))),
        Ok(())
    );
    assert!(check_object(&monitor(serde_json::json!({"prot": "metrics"}))).is_err());
    assert!(check_object(&monitor(serde_json::json!({"interval": 30}))).is_err());
}

/// The helm CLI: `$TOLLGATE_HELM`, else `helm` on PATH (scripts/setup-helm.sh installs it).
/// `None` only outside CI, where the render tests then say they were skipped; in CI (`CI` set)
/// a missing helm fails them.
fn helm() -> Option<PathBuf> {
    let helm = PathBuf::from(std::env::var_os("TOLLGATE_HELM").unwrap_or_else(|| "helm".into()));
    let works = Command::new(&helm)
        .args(["version", "--short"])
        .output()
        .is_ok_and(|o| o.status.success());
    if works {
        return Some(helm);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "no helm CLI ({}): run scripts/setup-helm.sh",
        helm.display()
    );
    eprintln!(
        "SKIPPED: no helm CLI ({}); run scripts/setup-helm.sh",
        helm.display()
    );
    None
}

/// `helm template tollgate deploy/helm/tollgate -n tollgate-system --include-crds [-f VALUES]`,
/// as parsed documents (line, object), after `helm lint --strict` with the same values passed.
fn helm_template(helm: &Path, values: Option<&str>) -> Vec<(usize, serde_json::Value)> {
    let chart = repo().join("deploy/helm/tollgate");
    let mut cmd = Command::new(helm);
    cmd.args(["template", "tollgate"]).arg(&chart).args([
        "--namespace",
        "tollgate-system",
        "--include-crds",
    ]);
    if let Some(v) = values {
        cmd.arg("-f").arg(chart.join(v));
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "helm template ({values:?}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // helm's own chart checks (Chart.yaml, template errors, YAML), warnings as failures.
    let mut lint = Command::new(helm);
    lint.args(["lint", "--strict"]).arg(&chart);
    if let Some(v) = values {
        lint.arg("-f").arg(chart.join(v));
    }
    let lint = lint.output().unwrap();
    assert!(
        lint.status.success(),
        "helm lint --strict ({values:?}): {}",
        String::from_utf8_lossy(&lint.stdout)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    tollgate_policy::yaml::parse_documents(&text)
        .unwrap()
        .into_iter()
        .filter(|d| !d.value.is_null())
        .map(|d| (d.line, d.value))
        .collect()
}

fn kind_name(o: &serde_json::Value) -> (String, String) {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    (s(&o["kind"]), s(&o["metadata"]["name"]))
}

#[test]
fn the_rendered_chart_is_valid_kubernetes_objects_with_defaults_and_every_option() {
    let Some(helm) = helm() else { return };
    let mut generated: Vec<(String, serde_json::Value)> = tollgate_agent::crd::all_crds()
        .into_iter()
        .map(|(_, c)| (c["metadata"]["name"].as_str().unwrap().to_string(), c))
        .collect();
    for (_, mut crd) in tollgate_agent::crd::cilium_crds() {
        // Rendered from a template: kept (with every policy) when the release is uninstalled.
        crd["metadata"]["annotations"] = serde_json::json!({"helm.sh/resource-policy": "keep"});
        generated.push((crd["metadata"]["name"].as_str().unwrap().to_string(), crd));
    }
    for (values, every_option) in [(None, false), (Some("ci/all-on-values.yaml"), true)] {
        let objects = helm_template(&helm, values);
        let mut kinds = Vec::new();
        for (line, o) in &objects {
            if let Err(e) = check_object(o) {
                panic!("helm template ({values:?}), line {line}: {e}");
            }
            let (kind, name) = kind_name(o);
            if kind == "CustomResourceDefinition" {
                let want = generated.iter().find(|(n, _)| *n == name);
                let want = want.unwrap_or_else(|| panic!("unknown CRD {name}"));
                assert!(&want.1 == o, "rendered CRD {name} is not the generated one");
            }
            kinds.push((kind, name));
        }
        let has = |k: &str, n: &str| kinds.iter().any(|(a, b)| a == k && b == n);
        for (k, n) in [
            ("DaemonSet", "tollgate"),
            ("ServiceAccount", "tollgate"),
            ("ClusterRole", "tollgate"),
            ("ClusterRoleBinding", "tollgate"),
            ("Service", "tollgate-metrics"),
            ("CustomResourceDefinition", "tollgatepolicies.tollgate.io"),
            ("CustomResourceDefinition", "tollgateidentities.tollgate.io"),
        ] {
            assert!(has(k, n), "{values:?}: no {k} {n} in {kinds:?}");
        }
        // The defaults take everything from the Kubernetes API; all-on is directory mode
        // (`source: files`), with the policies and the inventory in ConfigMaps.
        for (k, n) in [
            ("ConfigMap", "tollgate-policies"),
            ("ConfigMap", "tollgate-endpoints"),
            ("ServiceMonitor", "tollgate"),
            (
                "CustomResourceDefinition",
                "ciliumnetworkpolicies.cilium.io",
            ),
            (
                "CustomResourceDefinition",
                "ciliumclusterwidenetworkpolicies.cilium.io",
            ),
        ] {
            assert_eq!(has(k, n), every_option, "{values:?}: {k} {n} in {kinds:?}");
        }
        assert_eq!(kinds.len(), if every_option { 12 } else { 7 }, "{kinds:?}");
        if every_option {
            the_options_reach_the_objects(&objects);
        } else {
            the_nodes_enforce_the_kubernetes_source(&objects);
        }
    }
}

/// With the defaults: every node runs `tollgate up --kubernetes`, told its node's name.
fn the_nodes_enforce_the_kubernetes_source(objects: &[(usize, serde_json::Value)]) {
    let ds = objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == "DaemonSet")
        .unwrap();
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(&args[..2], ["up", "--kubernetes"], "{args:?}");
    assert!(
        !args.iter().any(|a| a.starts_with("--policies")),
        "{args:?}"
    );
    assert_eq!(c["env"][0]["name"], "NODE_NAME");
    assert_eq!(
        c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert!(c["volumeMounts"].as_array().unwrap().len() == 3, "{c}");
}

/// With ci/all-on-values.yaml: the values are where they act, and the policies the ConfigMap
/// carries lint clean.
fn the_options_reach_the_objects(objects: &[(usize, serde_json::Value)]) {
    let find = |kind: &str, name: &str| {
        &objects
            .iter()
            .find(|(_, o)| kind_name(o) == (kind.to_string(), name.to_string()))
            .unwrap()
            .1
    };
    let pod = &find("DaemonSet", "tollgate")["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "registry.example/tollgate:0.1.0-test");
    assert_eq!(c["imagePullPolicy"], "Always");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for want in [
        "--policies=/etc/tollgate/policies",
        "--endpoints=/etc/tollgate/endpoints/endpoints.yaml",
        "--audit-log=-",
        "--audit-max-bytes=1048576",
        "--audit-keep=2",
        "--metrics=0.0.0.0:9964",
    ] {
        assert!(args.contains(&want), "{want} not in {args:?}");
    }
    assert_eq!(c["ports"][0]["containerPort"], 9964);
    assert_eq!(c["resources"]["limits"]["cpu"], "1");
    assert_eq!(
        pod["tolerations"][0]["key"],
        "node-role.kubernetes.io/control-plane"
    );
    assert_eq!(
        find("ServiceMonitor", "tollgate")["spec"]["endpoints"][0]["interval"],
        "15s"
    );
    assert_eq!(
        find("Service", "tollgate-metrics")["spec"]["ports"][0]["port"],
        9964
    );
    let data = find("ConfigMap", "tollgate-policies")["data"]
        .as_object()
        .unwrap();
    assert_eq!(data.len(), 2);
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in data {
        std::fs::write(dir.path().join(name), text.as_str().unwrap()).unwrap();
    }
    let lint = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("lint")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "the rendered policies do not lint: {}",
        String::from_utf8_lossy(&lint.stdout)
    );
    let endpoints = find("ConfigMap", "tollgate-endpoints")["data"]["endpoints.yaml"]
        .as_str()
        .unwrap();
    let inv = tollgate_policy::yaml::parse_documents(endpoints).unwrap();
    assert_eq!(inv[0].value["endpoints"][0]["name"], "api");
}

#[test]
fn the_default_render_is_the_plain_manifests() {
    let Some(helm) = helm() else { return };
    let src = std::fs::read_to_string(repo().join("deploy/manifests/tollgate.yaml")).unwrap();
    let mut manifests: Vec<serde_json::Value> = tollgate_policy::yaml::parse_documents(&src)
        .unwrap()
        .into_iter()
        .map(|d| d.value)
        .filter(|v| !v.is_null())
        // The chart leaves the namespace to `helm install --create-namespace`.
        .filter(|v| v["kind"] != "Namespace")
        .collect();
    let mut rendered: Vec<serde_json::Value> = helm_template(&helm, None)
        .into_iter()
        .map(|(_, mut o)| {
            if o["kind"] == "DaemonSet" {
                // The chart restarts the pods when the ConfigMaps change; plain manifests cannot.
                let meta = o["spec"]["template"]["metadata"].as_object_mut().unwrap();
                let annotations = meta.remove("annotations").unwrap();
                assert!(annotations["checksum/config"].is_string(), "{annotations}");
            }
            o
        })
        .filter(|o| o["kind"] != "CustomResourceDefinition")
        .collect();
    manifests.sort_by_key(kind_name);
    rendered.sort_by_key(kind_name);
    let names = |v: &[serde_json::Value]| v.iter().map(kind_name).collect::<Vec<_>>();
    assert_eq!(names(&rendered), names(&manifests));
    for (r, m) in rendered.iter().zip(&manifests) {
        assert!(
            r == m,
            "{:?}: deploy/manifests/tollgate.yaml differs from the chart's default render:\n{m:#}\n{r:#}",
            kind_name(m)
        );
    }
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
    for (_, file) in CILIUM_CRDS {
        assert_eq!(
            std::fs::read_to_string(chart.join("files").join(file)).unwrap(),
            std::fs::read_to_string(repo().join("deploy/crds").join(file)).unwrap(),
            "copy deploy/crds/{file} into the chart's files/cilium/"
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
