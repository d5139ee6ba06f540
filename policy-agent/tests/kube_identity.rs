//! Cluster-wide identities against the in-process fake API server (`fake_api`; no real API
//! server can run where these tests run): two agents racing for one label set agree on one
//! number (one create wins, the other gets 409 and reads the object back), a number taken by
//! other labels is skipped, unused identities are collected after the grace period and used
//! ones never are.

mod fake_api;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_api::{FakeApi, eventually, namespace, pod};
use kube::Api;
use serde_json::json;
use tokio::sync::Notify;
use tollgate_agent::crd::TollgateIdentity;
use tollgate_agent::kubernetes::identity::{ClusterIdentities, security_labels};
use tollgate_agent::kubernetes::source::{self, Identities, Options, reflect};
use tollgate_policy::labels::pod_labels;

/// An allocator of its own (own client, own watch, own store), as on its own node.
async fn node(fake: &FakeApi, grace: Duration) -> (ClusterIdentities, tokio::task::JoinHandle<()>) {
    let api: Api<TollgateIdentity> = Api::all(fake.client());
    let (store, task) = reflect(
        api.clone(),
        (),
        "TollgateIdentities".into(),
        Arc::new(Notify::new()),
        Default::default(),
        |_| {},
    );
    tokio::time::timeout(Duration::from_secs(10), store.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    (ClusterIdentities::new(api, store, grace), task)
}

fn labels(app: &str) -> tollgate_policy::labels::LabelSet {
    pod_labels(
        "prod",
        &BTreeMap::from([("app".into(), app.into())]),
        &BTreeMap::new(),
        Some("default"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_for_the_same_labels_get_the_same_identity() {
    let fake = FakeApi::start().await;
    let (mut a, _ta) = node(&fake, Duration::from_secs(60)).await;
    let (mut b, _tb) = node(&fake, Duration::from_secs(60)).await;
    let web = labels("web");
    // Both creates are held until both have arrived: a real race, both for number 256.
    fake.hold_creates(2);
    let (ia, ib) = tokio::join!(a.allocate(&web), b.allocate(&web));
    let (ia, ib) = (ia.unwrap(), ib.unwrap());
    assert_eq!(ia, ib, "both nodes agree");
    assert_eq!(ia, 256, "the first number of the range");
    assert_eq!(fake.count("create", "TollgateIdentity"), 2, "both tried");
    assert_eq!(
        fake.count("conflict", "TollgateIdentity"),
        1,
        "one lost with 409"
    );
    assert_eq!(a.conflicts + b.conflicts, 1);
    assert!(
        fake.count("get", "TollgateIdentity") >= 1,
        "the loser read the object back"
    );
    let objects = fake.list("TollgateIdentity");
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert_eq!(objects[0]["metadata"]["name"], "256");
    assert_eq!(
        objects[0]["spec"]["securityLabels"],
        json!(security_labels(&web))
    );

    // Other labels: 256 is taken, so 257 — whether or not the store has caught up.
    let db = labels("db");
    let id_db = a.allocate(&db).await.unwrap();
    assert_eq!(id_db, 257);
    // The other node agrees on 257 too (from its store, or by losing a create and reading
    // the object back).
    assert_eq!(b.allocate(&db).await.unwrap(), 257);
    assert_eq!(fake.list("TollgateIdentity").len(), 2);
    // Known labels, once the watch has shown the objects: no create at all.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let creates = fake.count("create", "TollgateIdentity");
    assert_eq!(b.allocate(&web).await.unwrap(), 256);
    assert_eq!(fake.count("create", "TollgateIdentity"), creates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_identities_are_collected_after_the_grace_period() {
    let fake = FakeApi::start().await;
    let grace = Duration::from_millis(300);
    let (mut a, _t) = node(&fake, grace).await;
    let (web, old) = (labels("web"), labels("old"));
    let id_web = a.allocate(&web).await.unwrap();
    let id_old = a.allocate(&old).await.unwrap();
    // Reserved identities are never objects, and an object outside the range is never touched.
    fake.put(json!({"kind": "TollgateIdentity", "metadata": {"name": "7"}, "spec": {"securityLabels": {}}}));
    eventually(10, "the store to show all three", || {
        (fake.list("TollgateIdentity").len() == 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let in_use: HashSet<BTreeMap<String, String>> = HashSet::from([security_labels(&web)]);
    let t0 = Instant::now();
    // Within the grace period: nothing is deleted.
    assert_eq!(
        a.collect_garbage(&in_use, t0).await.unwrap(),
        Vec::<u32>::new()
    );
    assert!(a.gc_pending());
    assert!(
        fake.get("TollgateIdentity", "", &id_old.to_string())
            .is_some()
    );
    // Past it: the unused one goes, the used one and the reserved-range one stay.
    let gone = a.collect_garbage(&in_use, t0 + grace).await.unwrap();
    assert_eq!(gone, [id_old]);
    assert!(
        fake.get("TollgateIdentity", "", &id_old.to_string())
            .is_none()
    );
    assert!(
        fake.get("TollgateIdentity", "", &id_web.to_string())
            .is_some()
    );
    assert!(fake.get("TollgateIdentity", "", "7").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_source_collects_the_identity_of_a_deleted_pod() {
    let fake = FakeApi::start().await;
    fake.put(namespace("prod", json!({})));
    fake.put(pod("prod", "web", "10.1.0.1", json!({"app": "web"})));
    fake.put(pod("prod", "batch", "10.1.0.2", json!({"app": "batch"})));
    let opts = Options {
        debounce: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        identities: Identities::Cluster {
            gc_grace: Duration::from_millis(200),
        },
        write_status: false,
        instance: "node-a".into(),
    };
    let running = tokio::time::timeout(Duration::from_secs(10), source::start(fake.client(), opts))
        .await
        .unwrap()
        .unwrap();
    let snap = running.snapshots.borrow().clone();
    let batch = snap.inventory.by_name("batch").unwrap().identity;
    let web = snap.inventory.by_name("web").unwrap().identity;
    assert_ne!(batch, web);
    assert_eq!(fake.list("TollgateIdentity").len(), 2);
    let t = Instant::now();
    fake.remove("Pod", "prod", "batch");
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake
        .get("TollgateIdentity", "", &batch.to_string())
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "the batch identity was not collected within 10 s; revision {}, endpoints {}, write errors {:?}",
            running.snapshots.borrow().revision,
            running.snapshots.borrow().inventory.endpoints.len(),
            running.write_errors.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t.elapsed();
    eprintln!(
        "pod deleted → identity collected: {:.0} ms (grace 200 ms)",
        took.as_secs_f64() * 1000.0
    );
    assert!(
        took >= Duration::from_millis(200),
        "not before the grace period: {took:?}"
    );
    assert!(fake.get("TollgateIdentity", "", &web.to_string()).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_identities_without_the_crd_are_a_clear_error() {
    let fake = FakeApi::start_serving(&["tollgateidentities"]).await;
    let opts = Options {
        identities: Identities::Cluster {
            gc_grace: Duration::from_secs(1),
        },
        ..Options::default()
    };
    let err = tokio::time::timeout(Duration::from_secs(10), source::start(fake.client(), opts))
        .await
        .unwrap()
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("cluster identities need the TollgateIdentity CRD (deploy/crds/tollgate.io_tollgateidentities.yaml)"), "{msg}");
}
