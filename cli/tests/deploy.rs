//! deploy/ stays true: the committed CRD is exactly what `tollgate crd` generates from the Rust
//! types, its schema accepts every TollgatePolicy example of the repository and rejects
//! wrongly typed ones, and the plain manifests are well-formed Kubernetes objects.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_crd_is_the_generated_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let path = repo().join("deploy/crds/tollgate.io_tollgatepolicies.yaml");
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(
        generated == committed,
        "{} differs from `tollgate crd`: run `cargo run -q -p tollgate -- crd > deploy/crds/tollgate.io_tollgatepolicies.yaml`",
        path.display()
    );
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
