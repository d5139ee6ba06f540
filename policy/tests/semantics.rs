//! Evaluator semantics that the PolicyTest tables cannot see directly: which layer decided,
//! precedence between audit and enforce, L7 deny rules, fail-closed items, port policies.

use tollgate_policy::check::{PeerSpec, check};
use tollgate_policy::endpoints::{EndpointSpec, Inventory};
use tollgate_policy::eval::{Decision, Evaluator, L7Request, Local, Reason};
use tollgate_policy::l7::HttpRequest;
use tollgate_policy::load::PolicySet;
use tollgate_policy::model::{Direction, Protocol};
use tollgate_policy::peer::Remote;

fn inventory() -> Inventory {
    let ep = |name: &str, app: &str, ip: &str| EndpointSpec {
        name: name.into(),
        namespace: "prod".into(),
        labels: [("app".to_string(), app.to_string())].into(),
        ips: vec![ip.parse().unwrap()],
        ..Default::default()
    };
    Inventory::new(
        vec![
            ep("web", "web", "10.0.0.1"),
            ep("api", "api", "10.0.0.2"),
            ep("admin", "admin", "10.0.0.3"),
        ],
        vec![],
    )
    .unwrap()
}

fn evaluator(src: &str) -> Evaluator {
    let mut set = PolicySet::default();
    set.load_str("p.yaml", src);
    assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
    Evaluator::new(set.rules)
}

fn http(
    eval: &Evaluator,
    from: &str,
    method: &str,
    path: &str,
) -> tollgate_policy::check::CheckResult {
    let req = L7Request::Http {
        request: HttpRequest {
            method,
            path,
            host: "api",
            headers: &[],
        },
        grpc: None,
    };
    check(
        eval,
        &inventory(),
        &PeerSpec::parse(from).unwrap(),
        &PeerSpec::Endpoint("api".into()),
        8080,
        Protocol::Tcp,
        Some(&req),
    )
    .unwrap()
}

const ENFORCE: &str = r#"
apiVersion: tollgate.io/v1alpha1
kind: TollgatePolicy
metadata: {name: api, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}, {matchLabels: {app: admin}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/api/.*"}
        - {path: "/api/secret.*", action: deny}
"#;

#[test]
fn l7_deny_rule_beats_a_matching_allow_rule() {
    let eval = evaluator(ENFORCE);
    let ok = http(&eval, "web", "GET", "/api/users");
    assert_eq!(ok.decision, Decision::Allow);
    assert_eq!(
        ok.deciding.rule_ref().as_deref(),
        Some("prod/api spec.ingress[0].toPorts[0].rules.http[0]")
    );
    let denied = http(&eval, "web", "GET", "/api/secret/1");
    assert_eq!(denied.decision, Decision::Deny);
    assert_eq!(denied.deciding.reason, Reason::L7DenyRule);
    assert_eq!(
        denied.deciding.rule_ref().as_deref(),
        Some("prod/api spec.ingress[0].toPorts[0].rules.http[1]")
    );
    let nomatch = http(&eval, "web", "POST", "/api/users");
    assert_eq!(nomatch.decision, Decision::Deny);
    assert_eq!(nomatch.deciding.reason, Reason::L7NoMatch);
}

#[test]
fn deny_rules_never_grant_anything() {
    // A deny-only rule list for every peer must not open the port to anyone.
    let eval = evaluator(
        r#"
apiVersion: tollgate.io/v1alpha1
kind: TollgatePolicy
metadata: {name: api, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{method: DELETE, action: deny}]
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{}]
"#,
    );
    assert_eq!(http(&eval, "web", "GET", "/x").decision, Decision::Allow);
    let del = http(&eval, "web", "DELETE", "/x");
    assert_eq!(del.decision, Decision::Deny);
    assert_eq!(del.deciding.reason, Reason::L7DenyRule);
    let other = http(&eval, "admin", "GET", "/x");
    assert_eq!(
        other.decision,
        Decision::Deny,
        "the deny-only entry grants nothing"
    );
    assert_eq!(other.deciding.reason, Reason::DefaultDeny);
}

#[test]
fn audit_policy_reports_but_never_denies_and_never_allows_what_enforce_denies() {
    let audit = r#"
---
apiVersion: tollgate.io/v1alpha1
kind: TollgatePolicy
metadata: {name: tighten, namespace: prod}
spec:
  enforcement: audit
  endpointSelector: {matchLabels: {app: api}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: admin}}]
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{method: POST}]
"#;
    let eval = evaluator(&format!("{ENFORCE}{audit}"));
    // The combined layer holds both entries for web on 8080 (enforce: GET, audit: POST); any
    // matching allow rule allows, so GET is not audit-denied.
    let get = http(&eval, "web", "GET", "/api/users");
    assert_eq!(get.decision, Decision::Allow);
    // Admin is allowed by enforce, denied by the audit deny rule: forwarded, audit-denied.
    let admin = http(&eval, "admin", "GET", "/api/users");
    assert_eq!(admin.decision, Decision::AuditDeny);
    assert_eq!(
        admin.deciding.rule_ref().as_deref(),
        Some("prod/tighten spec.ingressDeny[0]")
    );
    assert_eq!(admin.deciding.enforcement.as_str(), "audit");
    // Enforce denies the secret path; the audit policy cannot change that.
    assert_eq!(
        http(&eval, "web", "GET", "/api/secret").decision,
        Decision::Deny
    );
}

#[test]
fn audit_policy_on_an_unenforced_endpoint_reports_its_default_deny() {
    let eval = evaluator(
        r#"
apiVersion: tollgate.io/v1alpha1
kind: TollgatePolicy
metadata: {name: lockdown, namespace: prod}
spec:
  enforcement: audit
  log: {value: trial-run}
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: admin}}]
"#,
    );
    let r = http(&eval, "web", "GET", "/");
    assert_eq!(r.decision, Decision::AuditDeny);
    assert_eq!(r.deciding.reason, Reason::DefaultDeny);
    assert_eq!(
        r.deciding.rule_ref().as_deref(),
        Some("prod/lockdown spec.ingress")
    );
    assert_eq!(r.deciding.log.as_deref(), Some("trial-run"));
    assert_eq!(http(&eval, "admin", "GET", "/").decision, Decision::Allow);
}

#[test]
fn port_policy_is_reusable_and_reports_l7() {
    let eval = evaluator(ENFORCE);
    let inv = inventory();
    let api = inv.by_name("api").unwrap();
    let local = Local {
        labels: &api.labels,
        is_host: false,
        named_ports: &[],
    };
    let pp = eval.port_policy(&local, Direction::Ingress, 8080, Protocol::Tcp);
    assert!(pp.has_l7());
    let other = eval.port_policy(&local, Direction::Ingress, 9090, Protocol::Tcp);
    assert!(!other.has_l7());
    let web = Remote::endpoint(inv.by_name("web").unwrap());
    assert_eq!(pp.evaluate(&web, None).decision, Decision::Allow);
    assert_eq!(other.evaluate(&web, None).decision, Decision::Deny);
    assert_eq!(other.evaluate(&web, None).reason, Reason::DefaultDeny);
}

#[test]
fn default_allow_rules_only_observe_at_l7() {
    let eval = evaluator(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: observe, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  enableDefaultDeny: {ingress: false}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{method: GET}]
"#,
    );
    assert_eq!(http(&eval, "web", "POST", "/").decision, Decision::Allow);
    assert_eq!(http(&eval, "admin", "POST", "/").decision, Decision::Allow);
    assert_eq!(
        http(&eval, "admin", "POST", "/").deciding.reason,
        Reason::DefaultAllow
    );
}

#[test]
fn the_enforcement_annotation_puts_a_cilium_policy_in_audit_mode() {
    let cnp = |annotation: &str| {
        format!(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: api
  namespace: prod
  annotations: {{tollgate.io/enforcement: {annotation}}}
spec:
  endpointSelector: {{matchLabels: {{app: api}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: web}}}}]
    toPorts:
    - ports: [{{port: "8080", protocol: TCP}}]
      rules:
        http: [{{method: GET, path: "/api/.*"}}]
"#
        )
    };
    let audited = evaluator(&cnp("audit"));
    let r = http(&audited, "web", "DELETE", "/api/users");
    assert_eq!(r.decision, Decision::AuditDeny, "forwarded, reported");
    assert_eq!(r.deciding.enforcement.as_str(), "audit");
    assert_eq!(
        http(&audited, "admin", "GET", "/api/x").decision,
        Decision::AuditDeny
    );
    let enforced = evaluator(&cnp("enforce"));
    assert_eq!(
        http(&enforced, "web", "DELETE", "/api/users").decision,
        Decision::Deny
    );
    // Anything else is an error, and the policy stays enforced.
    let mut set = PolicySet::default();
    set.load_str("p.yaml", &cnp("maybe"));
    assert_eq!(set.diagnostics.len(), 1, "{:?}", set.diagnostics);
    assert!(
        set.diagnostics[0]
            .message
            .contains("expected `audit` or `enforce`")
    );
    let eval = Evaluator::new(set.rules);
    assert_eq!(
        http(&eval, "web", "DELETE", "/api/users").decision,
        Decision::Deny
    );
}

#[test]
fn rules_naming_the_same_peer_are_judged_together_and_apart_from_other_peers() {
    // The port policy matches each distinct peer once (peer groups); entries with an equal
    // selector, a selector listed in another order, a different selector and a deny for one
    // of them must still each decide for their own peers.
    let eval = evaluator(
        r#"
apiVersion: tollgate.io/v1alpha1
kind: TollgatePolicy
metadata: {name: api, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET, path: "/a"}]}
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET, path: "/b"}]}
  - fromEndpoints: [{matchLabels: {app: admin}}, {matchLabels: {app: web}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET, path: "/shared"}]}
  - fromEndpoints: [{matchLabels: {app: admin}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET, path: "/c"}, {path: "/b", action: deny}]}
"#,
    );
    for (from, path, want) in [
        ("web", "/a", Decision::Allow),
        ("web", "/b", Decision::Allow),
        ("web", "/c", Decision::Deny),
        ("web", "/shared", Decision::Allow),
        ("admin", "/a", Decision::Deny),
        ("admin", "/b", Decision::Deny),
        ("admin", "/c", Decision::Allow),
        ("admin", "/shared", Decision::Allow),
    ] {
        assert_eq!(
            http(&eval, from, "GET", path).decision,
            want,
            "{from} GET {path}"
        );
    }
    let b = http(&eval, "web", "GET", "/b");
    assert_eq!(
        b.deciding.rule_ref().as_deref(),
        Some("prod/api spec.ingress[1].toPorts[0].rules.http[0]")
    );
}
