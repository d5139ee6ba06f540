//! The `tollgate` binary as users run it: exit codes and output of lint, eval, test, observe.

use std::process::Command;

fn tollgate(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn lint_exits_0_on_valid_and_1_with_located_messages() {
    let (code, out) = tollgate(&["lint", "conformance/policies/"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(", 0 errors"), "{out}");
    let (code, out) = tollgate(&["lint", "docs/examples/broken.yaml"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "docs/examples/broken.yaml:23: spec.ingress[2].fromEntitys: unknown field `fromEntitys`"
        ),
        "{out}"
    );
    assert!(
        out.contains("1 policies, 1 rules loaded, 4 errors"),
        "{out}"
    );
}

#[test]
fn eval_prints_verdict_policy_and_rule() {
    let base = [
        "eval",
        "-f",
        "conformance/policies/gateway/policies.yaml",
        "--endpoints",
        "conformance/policies/gateway/endpoints.yaml",
        "--port",
        "8080",
    ];
    let (code, out) = tollgate(
        &[
            &base[..],
            &[
                "--from",
                "admin",
                "--to",
                "api-server",
                "--http-method",
                "GET",
                "--http-path",
                "/admin/debug/x",
            ],
        ]
        .concat(),
    );
    assert_eq!(code, 1, "a denial exits 1: {out}");
    assert!(out.starts_with("DENY\n"), "{out}");
    assert!(
        out.contains("prod/no-debug spec.ingress[0].toPorts[0].rules.http[0]"),
        "{out}"
    );
    let (code, out) = tollgate(
        &[
            &base[..],
            &[
                "--from",
                "world",
                "--to",
                "api-server",
                "--http-path",
                "/public/x",
                "--json",
            ],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["decision"], "allow");
    assert_eq!(
        v["deciding"]["rule"],
        "spec.ingress[0].toPorts[0].rules.http[0]"
    );
}

#[test]
fn test_ends_with_the_exact_summary_line_and_fails_on_a_wrong_expectation() {
    let (code, out) = tollgate(&["test", "conformance/policies/gateway/"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().last(), Some("21 passed, 0 failed"));
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.yaml");
    std::fs::write(&f, "apiVersion: tollgate.io/v1alpha1\nkind: PolicyTest\npolicies:\n- inline: |\n    apiVersion: cilium.io/v2\n    kind: CiliumNetworkPolicy\n    metadata: {name: p}\n    spec: {endpointSelector: {matchLabels: {app: b}}, ingress: [{}]}\nendpoints:\n- {name: a, labels: {app: a}}\n- {name: b, labels: {app: b}}\ncases:\n- {name: wrong on purpose, from: a, to: b, port: 80, expect: allow}\n- {name: right, from: a, to: b, port: 80, expect: deny}\n").unwrap();
    let (code, out) = tollgate(&["test", f.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL"), "{out}");
    assert!(
        out.contains("expected allow, got deny by default/p spec.ingress"),
        "{out}"
    );
    assert_eq!(out.lines().last(), Some("1 passed, 1 failed"));
}

#[test]
fn observe_filters_audit_records() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("audit.jsonl");
    let rec = |verdict: &str, from: &str, path: &str| {
        format!(
            "{{\"schema\":\"tollgate.audit/v1\",\"time\":\"2099-01-01T00:00:00.000Z\",\"verdict\":\"{verdict}\",\"protocol\":\"http\",\"reason\":\"l7-no-match\",\"source\":{{\"ip\":\"10.0.0.1\",\"namespace\":\"prod\",\"name\":\"{from}\",\"labels\":[\"k8s:app={from}\"]}},\"destination\":{{\"ip\":\"10.0.0.2\",\"namespace\":\"prod\",\"name\":\"api\"}},\"http\":{{\"method\":\"GET\",\"host\":\"api\",\"path\":\"{path}\"}},\"policy\":{{\"namespace\":\"prod\",\"name\":\"p\"}},\"rule\":\"spec.ingress\"}}\n"
        )
    };
    let text = rec("denied", "web", "/admin")
        + &rec("audit-denied", "admin", "/x")
        + &rec("denied", "admin", "/admin/users");
    std::fs::write(&f, text).unwrap();
    let file = f.to_str().unwrap();
    let (code, out) = tollgate(&[
        "observe",
        "-f",
        file,
        "--verdict",
        "denied",
        "--from",
        "app=admin",
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains("prod/admin -> prod/api  GET api/admin/users"),
        "{out}"
    );
    let (_, out) = tollgate(&[
        "observe",
        "-f",
        file,
        "--http-path",
        "/admin.*",
        "-o",
        "json",
    ]);
    assert_eq!(out.lines().count(), 2, "{out}");
}

#[test]
fn observe_shows_kafka_records_and_filters_by_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("audit.jsonl");
    let kafka = r#"{"schema":"tollgate.audit/v1","time":"2099-01-01T00:00:00.000Z","verdict":"denied","reason":"l7-no-match","protocol":"kafka","source":{"ip":"10.0.0.1","namespace":"shop","name":"billing"},"destination":{"ip":"10.0.0.2","port":9092,"namespace":"shop","name":"kafka"},"kafka":{"api_key":"produce","api_key_id":0,"api_version":9,"correlation_id":4,"client_id":"rdkafka","topics":["secret"],"error_code":29},"policy":{"namespace":"shop","name":"k"},"rule":"spec.ingress[0].toPorts[0].rules"}"#;
    let http = r#"{"schema":"tollgate.audit/v1","time":"2099-01-01T00:00:00.000Z","verdict":"denied","reason":"l7-no-match","protocol":"http","source":{"ip":"10.0.0.1"},"destination":{"ip":"10.0.0.2"},"http":{"method":"GET","host":"a","path":"/"}}"#;
    std::fs::write(&f, format!("{kafka}\n{http}\n")).unwrap();
    let (code, out) = tollgate(&["observe", "-f", f.to_str().unwrap(), "--protocol", "kafka"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains("shop/billing -> shop/kafka  produce v9 [secret] client=rdkafka -> error 29"),
        "{out}"
    );
}
