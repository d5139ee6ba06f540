//! The Kubernetes source against an in-process fake API server (`fake_api`; no real API server
//! can run where these tests run — see that module's docs): the initial list compiles to the
//! verdicts the policies say, added/modified/deleted objects change them, a dropped watch
//! resumes from its resourceVersion and a 410 Gone relists, without losing or duplicating
//! objects. Verdicts come from `tollgate_policy::check` (the evaluator), as `tollgate eval`'s do.

mod fake_api;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_api::{FakeApi, eventually, namespace, pod, policy, verdict};
use serde_json::json;
use tokio::sync::watch;
use tollgate_agent::kubernetes::source::{self, Identities, Options, Running, Snapshot};
use tollgate_policy::eval::Decision;

/// The newest snapshot once it satisfies `pred` (at most 10 s).
async fn until(
    rx: &mut watch::Receiver<Arc<Snapshot>>,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let snap = rx.borrow_and_update().clone();
        if pred(&snap) {
            return snap;
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            panic!(
                "timed out waiting for {what}; last revision {}: endpoints {:?}, problems {:?}",
                snap.revision,
                names(&snap),
                snap.problems
            );
        }
    }
}

fn names(snap: &Snapshot) -> Vec<String> {
    let mut v: Vec<String> = snap
        .inventory
        .endpoints
        .iter()
        .map(|e| format!("{}/{}", e.spec.namespace, e.spec.name))
        .collect();
    v.sort();
    v
}

fn policy_names(snap: &Snapshot) -> Vec<String> {
    let mut v: Vec<String> = snap
        .policies
        .policies
        .iter()
        .map(|p| p.file.clone())
        .collect();
    v.sort();
    v
}

fn api_l7(from: &[&str]) -> serde_json::Value {
    // A namespaced policy's selectors select its own namespace unless they name one.
    let from: Vec<serde_json::Value> = from
        .iter()
        .map(|a| match *a {
            "intruder" => {
                json!({"matchLabels": {"app": a, "io.kubernetes.pod.namespace": "other"}})
            }
            _ => json!({"matchLabels": {"app": a}}),
        })
        .collect();
    json!({
        "endpointSelector": {"matchLabels": {"app": "api"}},
        "ingress": [{"fromEndpoints": from, "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                     "rules": {"http": [{"method": "GET", "path": "/api/.*"}]}}]}],
    })
}

/// The cluster of these tests: two namespaces, four pods, one policy of each kind.
fn seed(fake: &FakeApi) {
    fake.put(namespace("prod", json!({"env": "prod"})));
    fake.put(namespace("other", json!({"env": "dev"})));
    fake.put(pod(
        "prod",
        "frontend",
        "10.1.0.1",
        json!({"app": "frontend", "pod-template-hash": "5d8f"}),
    ));
    fake.put(pod("prod", "api", "10.1.0.2", json!({"app": "api"})));
    fake.put(pod("prod", "db", "10.1.0.4", json!({"app": "db"})));
    fake.put(pod(
        "other",
        "intruder",
        "10.1.0.3",
        json!({"app": "intruder"}),
    ));
    fake.put(policy(
        "CiliumNetworkPolicy",
        Some("prod"),
        "api-l7",
        api_l7(&["frontend"]),
    ));
    fake.put(policy(
        "TollgatePolicy",
        Some("prod"),
        "no-admin",
        json!({"endpointSelector": {"matchLabels": {"app": "api"}},
               "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                            "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                                         "rules": {"http": [{"path": "/api/admin.*", "action": "deny"}]}}]}]}),
    ));
    fake.put(
        json!({"kind": "NetworkPolicy", "metadata": {"name": "db", "namespace": "prod"},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}],
                              "ports": [{"port": 5432, "protocol": "TCP"}]}]}}),
    );
    fake.put(policy(
        "CiliumClusterwideNetworkPolicy",
        None,
        "intruder-not-to-frontend",
        json!({"endpointSelector": {"matchLabels": {"app": "intruder"}},
               "egress": [{"toEntities": ["all"]}],
               "egressDeny": [{"toEndpoints": [{"matchLabels": {"app": "frontend"}}]}]}),
    ));
}

fn options() -> Options {
    Options {
        debounce: Duration::from_millis(50),
        max_delay: Duration::from_millis(500),
        identities: Identities::Cluster {
            gc_grace: Duration::from_secs(3600),
        },
        write_status: true,
        instance: "node-a".into(),
    }
}

async fn start(fake: &FakeApi) -> Running {
    tokio::time::timeout(
        Duration::from_secs(10),
        source::start(fake.client(), options()),
    )
    .await
    .expect("the source starts within 10 s")
    .expect("the source starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_initial_list_compiles_to_the_policies_verdicts() {
    let fake = FakeApi::start().await;
    seed(&fake);
    let running = start(&fake).await;
    let snap = running.snapshots.borrow().clone();
    assert_eq!(
        names(&snap),
        ["other/intruder", "prod/api", "prod/db", "prod/frontend"]
    );
    assert_eq!(
        policy_names(&snap),
        [
            "CiliumClusterwideNetworkPolicy intruder-not-to-frontend",
            "CiliumNetworkPolicy prod/api-l7",
            "NetworkPolicy prod/db",
            "TollgatePolicy prod/no-admin",
        ]
    );
    assert_eq!(snap.problems, Vec::<String>::new());
    assert!(snap.not_served.is_empty());

    // CNP with L7 rules: frontend may GET /api/…, nobody else may reach api:8080.
    assert_eq!(
        verdict(&snap, "frontend", "api", 8080, Some("/api/v1/users")),
        Decision::Allow
    );
    assert_eq!(
        verdict(&snap, "frontend", "api", 8080, Some("/metrics")),
        Decision::Deny
    );
    assert_eq!(
        verdict(&snap, "intruder", "api", 8080, Some("/api/v1/users")),
        Decision::Deny
    );
    // TollgatePolicy L7 deny beats the CNP's allow.
    assert_eq!(
        verdict(&snap, "frontend", "api", 8080, Some("/api/admin/users")),
        Decision::Deny
    );
    // NetworkPolicy with a namespace selector: namespace labels come from Namespace objects.
    assert_eq!(
        verdict(&snap, "frontend", "db", 5432, None),
        Decision::Allow
    );
    assert_eq!(verdict(&snap, "intruder", "db", 5432, None), Decision::Deny);
    // CCNP egress deny.
    assert_eq!(
        verdict(&snap, "intruder", "frontend", 9000, None),
        Decision::Deny
    );
    assert_eq!(
        verdict(&snap, "api", "frontend", 9000, None),
        Decision::Allow
    );

    // Endpoints carry what the inventory file would: labels (without pod-template-hash), the
    // namespace's labels, service account, named ports; identities are cluster objects.
    let fe = snap.inventory.by_name("frontend").unwrap();
    let labels = fe.labels.to_string();
    assert!(labels.contains("k8s:app=frontend"), "{labels}");
    assert!(
        labels.contains("k8s:io.cilium.k8s.namespace.labels.env=prod"),
        "{labels}"
    );
    assert!(
        labels.contains("k8s:io.cilium.k8s.policy.serviceaccount=default"),
        "{labels}"
    );
    assert!(!labels.contains("pod-template-hash"), "{labels}");
    assert_eq!(fe.spec.ports.get("http"), Some(&8080));
    let mut ids: Vec<u32> = snap
        .inventory
        .endpoints
        .iter()
        .map(|e| e.identity)
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "four label sets, four identities: {ids:?}");
    assert!(ids.iter().all(|i| (256..=65535).contains(i)), "{ids:?}");
    let objects = fake.list("TollgateIdentity");
    assert_eq!(objects.len(), 4);
    let fe_obj = fake
        .get("TollgateIdentity", "", &fe.identity.to_string())
        .unwrap();
    assert_eq!(fe_obj["spec"]["securityLabels"]["k8s:app"], "frontend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_modified_and_deleted_objects_change_the_verdicts() {
    let fake = FakeApi::start().await;
    seed(&fake);
    let mut running = start(&fake).await;
    let rx = &mut running.snapshots;
    let first = rx.borrow().revision;

    // Modified policy: intruder may now call the api.
    let t = Instant::now();
    fake.put(policy(
        "CiliumNetworkPolicy",
        Some("prod"),
        "api-l7",
        api_l7(&["frontend", "intruder"]),
    ));
    let snap = until(rx, "intruder allowed", |s| {
        verdict(s, "intruder", "api", 8080, Some("/api/v1")) == Decision::Allow
    })
    .await;
    eprintln!(
        "policy change → new snapshot: {:.1} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    assert!(snap.revision > first);
    assert_eq!(
        verdict(&snap, "intruder", "api", 8080, Some("/metrics")),
        Decision::Deny
    );

    // Deleted policy: the L7 deny is gone, the CNP's allow remains.
    fake.remove("TollgatePolicy", "prod", "no-admin");
    let snap = until(rx, "admin allowed", |s| {
        verdict(s, "frontend", "api", 8080, Some("/api/admin/users")) == Decision::Allow
    })
    .await;
    assert_eq!(policy_names(&snap).len(), 3);

    // Added pod: same labels, same identity; it is a peer the CNP allows.
    fake.put(pod(
        "prod",
        "frontend-2",
        "10.1.0.5",
        json!({"app": "frontend", "pod-template-hash": "77aa"}),
    ));
    let snap = until(rx, "frontend-2", |s| {
        s.inventory.by_name("frontend-2").is_some()
    })
    .await;
    assert_eq!(
        snap.inventory.by_name("frontend-2").unwrap().identity,
        snap.inventory.by_name("frontend").unwrap().identity
    );
    assert_eq!(
        verdict(&snap, "frontend-2", "api", 8080, Some("/api/v1")),
        Decision::Allow
    );

    // Modified namespace labels: the NetworkPolicy's namespace selector now admits `other`.
    fake.put(namespace("other", json!({"env": "prod"})));
    let snap = until(rx, "intruder reaches db", |s| {
        verdict(s, "intruder", "db", 5432, None) == Decision::Allow
    })
    .await;
    assert_eq!(
        verdict(&snap, "intruder", "frontend", 9000, None),
        Decision::Deny,
        "the CCNP still applies"
    );

    // Modified pod labels: a new identity, and the CNP no longer admits it.
    fake.put(pod(
        "other",
        "intruder",
        "10.1.0.3",
        json!({"app": "unknown"}),
    ));
    let snap = until(rx, "intruder relabelled", |s| {
        verdict(s, "intruder", "api", 8080, Some("/api/v1")) == Decision::Deny
    })
    .await;
    assert_eq!(
        verdict(&snap, "intruder", "frontend", 9000, None),
        Decision::Allow,
        "the CCNP no longer selects it"
    );

    // Deleted pod: gone from the inventory (and from the ipcache the plan would write).
    fake.remove("Pod", "other", "intruder");
    let snap = until(rx, "intruder gone", |s| {
        s.inventory.by_name("intruder").is_none()
    })
    .await;
    assert_eq!(
        names(&snap),
        ["prod/api", "prod/db", "prod/frontend", "prod/frontend-2"]
    );
    assert!(snap.inventory.by_ip("10.1.0.3".parse().unwrap()).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_changes_is_one_recompile() {
    let fake = FakeApi::start().await;
    seed(&fake);
    let mut running = start(&fake).await;
    let before = running.snapshots.borrow().revision;
    fake.atomically(|tx| {
        for i in 0..50 {
            tx.put(pod(
                "prod",
                &format!("web-{i}"),
                &format!("10.2.0.{}", i + 1),
                json!({"app": "web"}),
            ));
        }
    });
    let snap = until(&mut running.snapshots, "50 more pods", |s| {
        s.inventory.endpoints.len() == 54
    })
    .await;
    // 50 events within microseconds: the debounce makes them one recompile (two at most, if
    // the first event's recompile started before the rest arrived).
    assert!(
        snap.revision - before <= 2,
        "{} recompiles for one burst",
        snap.revision - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_watch_resumes_and_a_410_relists_without_losing_or_duplicating() {
    let fake = FakeApi::start().await;
    seed(&fake);
    let mut running = start(&fake).await;
    let rx = &mut running.snapshots;
    let lists = |k: &str| fake.count("list", k);
    let (pod_lists, cnp_lists) = (lists("Pod"), lists("CiliumNetworkPolicy"));
    let pod_watches = fake.count("watch", "Pod");

    // Drop every watch and change things before the watchers come back: the watchers resume
    // from their last resourceVersion (bookmark) and get the missed events from the history.
    fake.atomically(|tx| {
        tx.drop_watches();
        tx.put(pod("prod", "cache", "10.1.0.9", json!({"app": "cache"})));
        tx.remove("Pod", "prod", "db");
        tx.put(policy(
            "CiliumNetworkPolicy",
            Some("prod"),
            "api-l7",
            api_l7(&["frontend", "cache"]),
        ));
    });
    let snap = until(rx, "changes after a watch drop", |s| {
        s.inventory.by_name("cache").is_some()
            && s.inventory.by_name("db").is_none()
            && verdict(s, "cache", "api", 8080, Some("/api/x")) == Decision::Allow
    })
    .await;
    assert_eq!(
        names(&snap),
        ["other/intruder", "prod/api", "prod/cache", "prod/frontend"]
    );
    assert_eq!(policy_names(&snap).len(), 4);
    assert!(
        fake.count("watch", "Pod") > pod_watches,
        "the Pod watch was re-opened"
    );
    assert_eq!(
        lists("Pod"),
        pod_lists,
        "a dropped watch resumes without a relist"
    );
    assert_eq!(lists("CiliumNetworkPolicy"), cnp_lists);
    assert_eq!(fake.count("gone", "Pod"), 0);

    // Drop again, change, and compact the history: the watchers' resourceVersions are too old,
    // the server says 410 Gone, they relist — and the relisted state replaces the old one.
    eventually(10, "the watches to be back", || {
        (fake.watches("Pod") > 0 && fake.watches("CiliumNetworkPolicy") > 0).then_some(())
    })
    .await;
    fake.atomically(|tx| {
        tx.drop_watches();
        tx.remove("Pod", "prod", "cache");
        tx.put(pod("prod", "db", "10.1.0.4", json!({"app": "db"})));
        tx.remove("CiliumNetworkPolicy", "prod", "api-l7");
        tx.put(policy(
            "CiliumNetworkPolicy",
            Some("prod"),
            "api-l7-v2",
            api_l7(&["intruder"]),
        ));
        tx.compact();
    });
    let snap = until(rx, "the relisted state", |s| {
        s.inventory.by_name("cache").is_none()
            && s.inventory.by_name("db").is_some()
            && policy_names(s).contains(&"CiliumNetworkPolicy prod/api-l7-v2".to_string())
            && !policy_names(s).contains(&"CiliumNetworkPolicy prod/api-l7".to_string())
    })
    .await;
    assert!(
        fake.count("gone", "Pod") >= 1,
        "the Pod watcher was told 410 Gone"
    );
    assert!(lists("Pod") > pod_lists, "and relisted");
    assert!(lists("CiliumNetworkPolicy") > cnp_lists);
    assert_eq!(
        names(&snap),
        ["other/intruder", "prod/api", "prod/db", "prod/frontend"]
    );
    assert_eq!(policy_names(&snap).len(), 4, "{:?}", policy_names(&snap));
    assert_eq!(
        verdict(&snap, "intruder", "api", 8080, Some("/api/x")),
        Decision::Allow
    );
    assert_eq!(
        verdict(&snap, "frontend", "api", 8080, Some("/api/x")),
        Decision::Deny
    );
    assert_eq!(snap.problems, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinds_the_cluster_does_not_serve_are_reported_not_waited_for() {
    let fake =
        FakeApi::start_serving(&["ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"])
            .await;
    seed(&fake);
    let running = start(&fake).await;
    let snap = running.snapshots.borrow().clone();
    assert_eq!(
        snap.not_served,
        ["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"]
    );
    assert_eq!(
        policy_names(&snap),
        ["NetworkPolicy prod/db", "TollgatePolicy prod/no-admin"]
    );
    // Without the CNP, the TollgatePolicy and the NetworkPolicy still apply.
    assert_eq!(verdict(&snap, "intruder", "db", 5432, None), Decision::Deny);
    assert_eq!(
        verdict(&snap, "frontend", "api", 8080, Some("/api/admin")),
        Decision::Deny
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_identities_keep_their_numbers_across_revisions() {
    let fake = FakeApi::start().await;
    fake.put_app_pods("prod", &[("web", "10.1.0.1"), ("db", "10.1.0.2")]);
    let opts = Options {
        identities: Identities::Local,
        ..options()
    };
    let mut running =
        tokio::time::timeout(Duration::from_secs(10), source::start(fake.client(), opts))
            .await
            .unwrap()
            .unwrap();
    let first = running.snapshots.borrow().clone();
    let id = |s: &Snapshot, n: &str| s.inventory.by_name(n).unwrap().identity;
    let (web, db) = (id(&first, "web"), id(&first, "db"));
    assert_ne!(web, db);
    // A pod that sorts first, with new labels: the others keep their numbers.
    fake.put(pod("prod", "aaa", "10.1.0.3", json!({"app": "aaa"})));
    let snap = until(&mut running.snapshots, "aaa", |s| {
        s.inventory.by_name("aaa").is_some()
    })
    .await;
    assert_eq!((id(&snap, "web"), id(&snap, "db")), (web, db));
    assert!(![web, db].contains(&id(&snap, "aaa")));
    assert!(
        fake.list("TollgateIdentity").is_empty(),
        "local identities are not objects"
    );
}
