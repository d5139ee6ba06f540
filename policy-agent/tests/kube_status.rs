//! What the agent writes back, against the in-process fake API server (`fake_api`; no real API
//! server can run where these tests run): a `Valid` condition on TollgatePolicy status naming
//! the rule path of each problem (and the rest of the policy still applies), an Event for an
//! invalid Cilium policy (once, however often the agent recompiles).

mod fake_api;

use std::time::Duration;

use fake_api::{FakeApi, eventually, pod, policy, verdict};
use serde_json::{Value, json};
use tollgate_agent::kubernetes::source::{self, Identities, Options};
use tollgate_policy::eval::Decision;

fn valid_condition(fake: &FakeApi, ns: &str, name: &str) -> Option<Value> {
    let obj = fake.get("TollgatePolicy", ns, name)?;
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Valid")
        .cloned()
}

fn allow_from(app: &str, path: &str) -> Value {
    json!({"fromEndpoints": [{"matchLabels": {"app": app}}],
           "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                        "rules": {"http": [{"method": "GET", "path": path}]}}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_rule_gets_an_invalid_condition_and_the_rest_still_applies() {
    let fake = FakeApi::start().await;
    fake.put_app_pods(
        "prod",
        &[
            ("frontend", "10.1.0.1"),
            ("admin", "10.1.0.3"),
            ("api", "10.1.0.2"),
        ],
    );
    // ingress[1] has a regex that does not compile; ingress[0] is fine.
    fake.put(policy(
        "TollgatePolicy",
        Some("prod"),
        "api",
        json!({"endpointSelector": {"matchLabels": {"app": "api"}},
               "ingress": [allow_from("frontend", "/api/.*"), allow_from("admin", "/admin/(")]}),
    ));
    fake.put(policy(
        "TollgatePolicy",
        Some("prod"),
        "fine",
        json!({"endpointSelector": {"matchLabels": {"app": "frontend"}}, "ingress": [{}]}),
    ));
    // A Cilium policy with a bad port: we do not own its status, so it gets an Event.
    fake.put(policy(
        "CiliumNetworkPolicy",
        Some("prod"),
        "bad-port",
        json!({"endpointSelector": {"matchLabels": {"app": "admin"}},
               "ingress": [{"toPorts": [{"ports": [{"port": "70000", "protocol": "TCP"}]}]}]}),
    ));
    let opts = Options {
        debounce: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        identities: Identities::Local,
        write_status: true,
        instance: "node-a".into(),
    };
    let mut running =
        tokio::time::timeout(Duration::from_secs(10), source::start(fake.client(), opts))
            .await
            .unwrap()
            .unwrap();

    let cond = eventually(10, "the Invalid condition", || {
        valid_condition(&fake, "prod", "api")
    })
    .await;
    assert_eq!(cond["status"], "False", "{cond}");
    assert_eq!(cond["reason"], "InvalidRules");
    assert_eq!(cond["observedGeneration"], 1);
    let msg = cond["message"].as_str().unwrap();
    assert!(
        msg.starts_with("TollgatePolicy prod/api: spec.ingress[1].toPorts[0].rules.http[0].path: "),
        "{msg}"
    );
    assert_eq!(msg.lines().count(), 1, "one problem, one line: {msg}");
    assert!(
        cond["lastTransitionTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{cond}"
    );
    let fine = eventually(10, "the Valid condition", || {
        valid_condition(&fake, "prod", "fine")
    })
    .await;
    assert_eq!(fine["status"], "True", "{fine}");
    assert_eq!(fine["reason"], "Accepted");

    // The rest of the policy applies: frontend's item works, admin's bad one is dropped (and
    // admin, not allowed by anything else, is denied — an error never widens).
    let snap = running.snapshots.borrow().clone();
    let get = |from: &str, path: &str| verdict(&snap, from, "api", 8080, Some(path));
    assert_eq!(get("frontend", "/api/users"), Decision::Allow);
    assert_eq!(get("admin", "/admin/x"), Decision::Deny);
    assert!(
        snap.problems
            .iter()
            .any(|p| p.starts_with("TollgatePolicy prod/api: spec.ingress[1]")),
        "{:?}",
        snap.problems
    );

    // The Event for the CNP names the object and the path.
    let events = eventually(10, "an event", || {
        let e = fake.list("Event");
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["reason"], "InvalidPolicy");
    assert_eq!(e["involvedObject"]["kind"], "CiliumNetworkPolicy");
    assert_eq!(e["involvedObject"]["name"], "bad-port");
    assert_eq!(e["metadata"]["namespace"], "prod");
    let m = e["message"].as_str().unwrap();
    assert!(
        m.starts_with(
            "CiliumNetworkPolicy prod/bad-port: spec.ingress[0].toPorts[0].ports[0].port: "
        ),
        "{m}"
    );

    // Fix the rule: a new generation, the condition flips to True and says which generation.
    let patches = fake.count("patch-status", "TollgatePolicy");
    fake.put(policy(
        "TollgatePolicy",
        Some("prod"),
        "api",
        json!({"endpointSelector": {"matchLabels": {"app": "api"}},
               "ingress": [allow_from("frontend", "/api/.*"), allow_from("admin", "/admin/.*")]}),
    ));
    let cond = eventually(10, "the condition to flip", || {
        valid_condition(&fake, "prod", "api").filter(|c| c["status"] == "True")
    })
    .await;
    assert_eq!(cond["observedGeneration"], 2);
    let snap = loop {
        let s = running.snapshots.borrow_and_update().clone();
        if !s.problems.iter().any(|p| p.contains("prod/api")) {
            break s;
        }
        tokio::time::timeout(Duration::from_secs(10), running.snapshots.changed())
            .await
            .unwrap()
            .unwrap();
    };
    assert!(
        snap.problems.iter().all(|p| !p.contains("TollgatePolicy")),
        "{:?}",
        snap.problems
    );

    // Unrelated churn (a pod added) recompiles, but neither repeats the event nor re-patches
    // a status that is already right.
    fake.put(pod("prod", "extra", "10.1.0.9", json!({"app": "extra"})));
    let rev = snap.revision;
    eventually(10, "the recompile", || {
        (running.snapshots.borrow().revision > rev).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.list("Event").len(), 1, "the event is not repeated");
    assert_eq!(fake.count("create", "Event"), 1, "nor re-sent");
    assert_eq!(
        fake.count("patch-status", "TollgatePolicy"),
        patches + 1,
        "only the flip was patched"
    );
}
