//! `tollgate agent --kubernetes --kubeconfig FILE` against the agent's in-process fake API
//! server (policy-agent/tests/fake_api; no real API server can run where these tests run): the
//! binary reads the kubeconfig, lists and watches, compiles, and prints the revision and every
//! problem naming the object and rule path.

#[path = "../../policy-agent/tests/fake_api/mod.rs"]
mod fake_api;

mod common;

use fake_api::{FakeApi, policy};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_command_compiles_the_cluster_and_names_each_problem() {
    let fake = FakeApi::start().await;
    fake.put_app_pods("prod", &[("frontend", "10.1.0.1"), ("api", "10.1.0.2")]);
    fake.put(policy(
        "CiliumNetworkPolicy",
        Some("prod"),
        "api",
        json!({"endpointSelector": {"matchLabels": {"app": "api"}},
               "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                            "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}),
    ));
    fake.put(policy(
        "CiliumNetworkPolicy",
        Some("prod"),
        "bad",
        json!({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "99999", "protocol": "TCP"}]}]}]}),
    ));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig);
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args([
                "agent",
                "--kubernetes",
                "--once",
                "--node",
                "test-node",
                "--kubeconfig",
            ])
            .arg(&kubeconfig)
            .output(),
    )
    .await
    .expect("the agent answers within 30 s")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "problems → exit 1\n{stdout}\n{stderr}"
    );
    let first = stdout.lines().next().unwrap_or("");
    assert!(
        first.starts_with("revision 1: 2 policies, 2 rules, 2 endpoints, 2 identities; kernel: "),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with(
            "  CiliumNetworkPolicy prod/bad: spec.ingress[0].toPorts[0].ports[0].port: "
        )),
        "{stdout}"
    );
    // Cluster identities by default: the two label sets are TollgateIdentity objects.
    assert_eq!(fake.list("TollgateIdentity").len(), 2);
}

/// `tollgate agent --kubernetes --rule-socket SOCK` serves every revision to a separate proxy:
/// each policy object its own rule set (`Kind ns/name`), and the inventory; the proxy accepts
/// them, rejects a broken object by its name, and follows a change made through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_each_revision_to_proxies_as_rule_sets() {
    use std::process::Stdio;
    let fake = FakeApi::start().await;
    fake.put_app_pods("prod", &[("frontend", "10.1.0.1"), ("api", "10.1.0.2")]);
    fake.put(fake_api::namespace("kube-system", json!({})));
    fake.put(fake_api::pod(
        "kube-system",
        "kube-dns",
        "10.1.0.53",
        json!({"k8s-app": "kube-dns"}),
    ));
    let api_policy = |port: &str| {
        policy(
            "CiliumNetworkPolicy",
            Some("prod"),
            "api",
            json!({"endpointSelector": {"matchLabels": {"app": "api"}},
                   "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                                "toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}]}),
        )
    };
    fake.put(api_policy("8080"));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig);
    let socket = dir.path().join("rules.sock");
    let (agent_log, proxy_log) = (dir.path().join("agent.log"), dir.path().join("proxy.log"));
    let _agent = common::Reaped(
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args([
                "agent",
                "--kubernetes",
                "--node",
                "test-node",
                "--kubeconfig",
            ])
            .arg(&kubeconfig)
            .arg("--rule-socket")
            .arg(&socket)
            .stdout(std::fs::File::create(dir.path().join("agent.out")).unwrap())
            .stderr(std::fs::File::create(&agent_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let wait = |log: &std::path::Path, needle: &str| {
        common::wait_for_log(log, needle, std::time::Duration::from_secs(30))
    };
    wait(&dir.path().join("agent.out"), "rule sets: version 1 on");
    let (dns, upstream) = (common::free_udp_port(), common::free_udp_port());
    let _proxy = common::Reaped(
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["proxy", "--audit-log", "/dev/null", "--agent"])
            .arg(&socket)
            .args(["--dns-listen", &format!("127.0.0.1:{dns}")])
            .args(["--dns-to", &format!("kube-dns@127.0.0.1:{upstream}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&proxy_log).unwrap())
            .spawn()
            .unwrap(),
    );
    // The inventory and the one object.
    wait(&agent_log, ": 2 rule set(s) accepted, 0 rejected");

    // A second object that the proxy refuses (an unknown top-level field): named, alone.
    let mut bad = api_policy("9090");
    bad["metadata"]["name"] = json!("bad");
    bad["sepc"] = json!({});
    fake.put(bad);
    let logged = wait(&agent_log, "version 2 in force");
    assert!(
        logged.contains("2 rule set(s) accepted, 1 rejected")
            && logged.contains("rejected CiliumNetworkPolicy prod/bad (nothing of it in force): "),
        "{logged}"
    );
    // A change through the API reaches the proxy as the object's new generation.
    fake.put(api_policy("8081"));
    wait(&proxy_log, "agent version 3 in force");
}
