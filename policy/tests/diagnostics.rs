//! Every class of bad input gets an exact, located message, and never takes other rules down.

use tollgate_policy::load::PolicySet;

fn load(src: &str) -> PolicySet {
    let mut set = PolicySet::default();
    set.load_str("api.yaml", src);
    set
}

fn messages(src: &str) -> Vec<String> {
    load(src)
        .diagnostics
        .iter()
        .map(|d| d.to_string())
        .collect()
}

const HEAD: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: api, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: api}}\n";

#[test]
fn unknown_field_is_named_with_its_line() {
    let src = format!("{HEAD}  ingress:\n  - fromEndpoint:\n    - {{}}\n");
    let msgs = messages(&src);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0].starts_with(
            "api.yaml:7: spec.ingress[0].fromEndpoint: unknown field `fromEndpoint` (expected"
        ),
        "{msgs:?}"
    );
}

#[test]
fn bad_cidr_is_rejected_with_path() {
    let src = format!("{HEAD}  egress:\n  - toCIDR: [10.0.0/8]\n");
    assert_eq!(
        messages(&src),
        vec!["api.yaml:7: spec.egress[0].toCIDR[0]: `10.0.0/8` is not a valid CIDR or IP address"]
    );
}

#[test]
fn cidr_except_outside_its_cidr() {
    let src = format!(
        "{HEAD}  egress:\n  - toCIDRSet:\n    - cidr: 10.0.0.0/8\n      except: [192.168.0.0/16]\n"
    );
    assert_eq!(
        messages(&src),
        vec![
            "api.yaml:9: spec.egress[0].toCIDRSet[0].except[0]: `192.168.0.0/16` is not contained within the CIDR 10.0.0.0/8"
        ]
    );
}

#[test]
fn combining_peer_kinds_is_impossible() {
    let src = format!("{HEAD}  ingress:\n  - fromEndpoints: [{{}}]\n    fromCIDR: [10.0.0.0/8]\n");
    assert_eq!(
        messages(&src),
        vec![
            "api.yaml:7: spec.ingress[0]: combining fromEndpoints and fromCIDR is not supported yet (write separate items)"
        ]
    );
}

#[test]
fn l7_rules_need_tcp() {
    let src = format!(
        "{HEAD}  ingress:\n  - toPorts:\n    - ports: [{{port: \"80\", protocol: ANY}}]\n      rules:\n        http: [{{method: GET}}]\n"
    );
    assert_eq!(
        messages(&src),
        vec![
            "api.yaml:8: spec.ingress[0].toPorts[0].ports: L7 rules can only apply to TCP (not ANY) except for DNS rules"
        ]
    );
}

#[test]
fn dns_rules_are_egress_only_and_need_a_port() {
    let src = format!(
        "{HEAD}  ingress:\n  - toPorts:\n    - ports: [{{port: \"53\", protocol: UDP}}]\n      rules:\n        dns: [{{matchName: a.com}}]\n"
    );
    assert_eq!(
        messages(&src),
        vec!["api.yaml:9: spec.ingress[0].toPorts[0].rules: DNS rules are not allowed on ingress"]
    );
    let src = format!(
        "{HEAD}  egress:\n  - toPorts:\n    - rules:\n        dns: [{{matchName: a.com}}]\n"
    );
    assert_eq!(
        messages(&src),
        vec![
            "api.yaml:8: spec.egress[0].toPorts[0].ports: port 53 must be specified for DNS rules"
        ]
    );
}

#[test]
fn to_fqdns_not_in_deny_rules() {
    let src = format!("{HEAD}  egressDeny:\n  - toFQDNs: [{{matchName: a.com}}]\n");
    assert_eq!(
        messages(&src),
        vec!["api.yaml:7: spec.egressDeny[0].toFQDNs: toFQDNs is not supported in deny rules"]
    );
}

#[test]
fn tollgate_extensions_are_rejected_in_cilium_documents() {
    let src = format!("{HEAD}  enforcement: audit\n  ingress: [{{}}]\n");
    assert_eq!(
        messages(&src),
        vec!["api.yaml:6: spec.enforcement: `enforcement` is a TollgatePolicy extension"]
    );
}

#[test]
fn multiple_l7_types_in_one_port_rule() {
    let src = format!(
        "{HEAD}  ingress:\n  - toPorts:\n    - ports: [{{port: \"80\", protocol: TCP}}]\n      rules:\n        http: [{{}}]\n        kafka: [{{}}]\n"
    );
    assert_eq!(
        messages(&src),
        vec![
            "api.yaml:9: spec.ingress[0].toPorts[0].rules: multiple L7 protocol rule types specified in single rule (http, kafka)"
        ]
    );
}

#[test]
fn rule_without_directions_and_document_without_spec() {
    assert_eq!(
        messages(HEAD),
        vec![
            "api.yaml:4: spec: rule must have at least one of ingress, ingressDeny, egress, egressDeny"
        ]
    );
    assert_eq!(
        messages("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\n"),
        vec!["api.yaml:1: spec or specs must be provided"]
    );
}

#[test]
fn unsupported_kinds_and_invalid_yaml() {
    assert_eq!(
        messages("apiVersion: v1\nkind: ConfigMap\n"),
        vec![
            "api.yaml:2: kind: unsupported document kind `ConfigMap` of `v1` (expected CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy of cilium.io/v2, NetworkPolicy of networking.k8s.io/v1, or TollgatePolicy of tollgate.io/v1alpha1)"
        ]
    );
    let msgs = messages("a: [1\n");
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].starts_with("api.yaml:"), "{msgs:?}");
    assert!(msgs[0].contains("invalid YAML"), "{msgs:?}");
}

#[test]
fn one_bad_item_leaves_the_others_loaded() {
    let src = format!(
        "{HEAD}  ingress:\n  - fromEntities: [wrld]\n  - fromEntities: [world]\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: other, namespace: prod}}\nspec:\n  endpointSelector: {{}}\n  egress: [{{toEntities: [all]}}]\n"
    );
    let set = load(&src);
    assert_eq!(set.diagnostics.len(), 1);
    assert!(
        set.diagnostics[0]
            .to_string()
            .starts_with("api.yaml:7: spec.ingress[0].fromEntities[0]: unknown entity `wrld`")
    );
    assert_eq!(set.diagnostics[0].policy.as_deref(), Some("prod/api"));
    assert_eq!(set.rules.len(), 2, "both rules load");
    assert_eq!(set.rules[0].ingress.allow.len(), 1, "the good item stays");
    assert!(
        set.rules[0].ingress.enforced,
        "the direction stays enforced"
    );
}

#[test]
fn a_bad_deny_item_fails_closed() {
    let src = format!("{HEAD}  ingressDeny:\n  - fromCIDR: [not-a-cidr]\n");
    let set = load(&src);
    assert_eq!(set.diagnostics.len(), 1);
    let deny = &set.rules[0].ingress.deny;
    assert_eq!(deny.len(), 1);
    assert!(matches!(
        deny[0].peer,
        tollgate_policy::peer::PeerMatch::Any
    ));
    assert!(deny[0].ports.is_none(), "denies every port");
}

#[test]
fn node_selector_only_in_clusterwide_policies() {
    let src = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: h}\nspec:\n  nodeSelector: {}\n  ingress: [{}]\n";
    assert_eq!(
        messages(src),
        vec![
            "api.yaml:5: spec.nodeSelector: rule cannot have nodeSelector (only CiliumClusterwideNetworkPolicy can)"
        ]
    );
}

#[test]
fn ports_are_checked() {
    let src = format!(
        "{HEAD}  ingress:\n  - toPorts:\n    - ports: [{{port: \"70000\"}}, {{port: \"80\", endPort: 79}}, {{port: \"80\", protocol: tcp}}]\n"
    );
    assert_eq!(
        messages(&src),
        vec![
            "api.yaml:8: spec.ingress[0].toPorts[0].ports[0].port: port 70000 is out of range 0-65535",
            "api.yaml:8: spec.ingress[0].toPorts[0].ports[1].endPort: endPort 79 must be between port 80 and 65535",
            "api.yaml:8: spec.ingress[0].toPorts[0].ports[2].protocol: unknown protocol `tcp` (expected TCP, UDP, SCTP or ANY)",
        ]
    );
}

#[test]
fn duplicate_policy_names_are_reported() {
    let one = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {endpointSelector: {}, ingress: [{}]}\n";
    let mut set = PolicySet::default();
    set.load_str("a.yaml", one);
    set.load_str("b.yaml", one);
    assert_eq!(
        set.diagnostics
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>(),
        vec!["b.yaml:3: metadata.name: CiliumNetworkPolicy default/x is already defined in a.yaml"]
    );
}

#[test]
fn bad_and_oversized_regexes_name_the_rule() {
    let src = format!(
        "{HEAD}  ingress:\n  - toPorts:\n    - ports: [{{port: \"80\", protocol: TCP}}]\n      rules:\n        http:\n        - {{method: GET}}\n        - {{path: \"a{{1000}}{{1000}}\"}}\n        - {{method: \"*\"}}\n"
    );
    assert_eq!(
        messages(&src),
        vec![
            "api.yaml:12: spec.ingress[0].toPorts[0].rules.http[1].path: regex too large (compiled size over the limit of 65536 bytes)",
            "api.yaml:13: spec.ingress[0].toPorts[0].rules.http[2].method: invalid regex `*`: repetition operator missing expression",
        ]
    );
}

#[test]
fn kafka_and_dns_rule_errors_name_the_field() {
    let src = format!(
        "{HEAD}  ingress:\n  - toPorts:\n    - ports: [{{port: \"9092\", protocol: TCP}}]\n      rules:\n        kafka: [{{role: produce, apiKey: fetch}}]\n  egress:\n  - toPorts:\n    - ports: [{{port: \"53\", protocol: ANY}}]\n      rules:\n        dns: [{{matchName: 'bad name'}}]\n"
    );
    assert_eq!(
        messages(&src),
        vec![
            "api.yaml:10: spec.ingress[0].toPorts[0].rules.kafka[0].role: cannot set both role and apiKey",
            "api.yaml:15: spec.egress[0].toPorts[0].rules.dns[0].matchName: `bad name` contains ` `: only letters, digits, `-`, `_`, `.` are allowed",
        ]
    );
}
