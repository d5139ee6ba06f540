//! `tollgate agent --kubernetes --kubeconfig FILE` against the agent's in-process fake API
//! server (policy-agent/tests/fake_api; no real API server can run where these tests run): the
//! binary reads the kubeconfig, lists and watches, compiles, and prints the revision and every
//! problem naming the object and rule path.

#[path = "../../policy-agent/tests/fake_api/mod.rs"]
mod fake_api;

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
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: fake, user: u}}\ncurrent-context: c\n",
            fake.url
        ),
    )
    .unwrap();
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
