//! Kafka end to end with real parts: tansu 0.6.0 as the broker (in memory; it does not
//! auto-create topics, so each case creates its own), and confluent-kafka (librdkafka 2.16),
//! aiokafka, kafka-python, kcat and a plain-socket client as clients. Each client run is one
//! scenario of `proxy/tests/kafka/clients.py`, which prints what that client observed
//! (delivered and consumed counts, Kafka error names, exception classes, connections opened).
//! Every case starts its own broker on its own port; children are killed on drop.
//!
//! This file holds the direct-to-broker baseline: what every client sees from tansu with
//! nothing in between (no broker-side denials, the broker's own version answers). The cases
//! through tollgate's Kafka listener are in `kafka/proxied.rs`.

mod common;
#[path = "kafka/proxied.rs"]
mod proxied;

use std::net::SocketAddr;

use common::{kafka_client, kafka_create_topics, tansu};
use serde_json::Value;

/// The four library clients (the plain-socket client is `raw`).
pub const CLIENTS: [&str; 4] = ["confluent", "aiokafka", "kafka-python", "kcat"];

/// Run a scenario off the async runtime (clients.py blocks for seconds).
pub async fn client(scenario: &str, boot: SocketAddr, args: Vec<String>) -> Value {
    let scenario = scenario.to_string();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        kafka_client(&scenario, boot, &a)
    })
    .await
    .unwrap()
}

/// `["--client", c, "--client-id", "tg-<c>", rest...]`
pub fn args(c: &str, rest: &[&str]) -> Vec<String> {
    let mut v = vec![
        "--client".to_string(),
        c.to_string(),
        "--client-id".to_string(),
        format!("tg-{c}"),
    ];
    v.extend(rest.iter().map(|s| s.to_string()));
    v
}

/// Error names a client reported for a scenario (its `errors` map), as a sorted list.
pub fn error_names(v: &Value) -> Vec<String> {
    let mut names: Vec<String> = v["errors"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// How many messages `topic` holds, read straight from the broker (no group, confluent-kafka).
pub async fn count_at_broker(boot: SocketAddr, topic: &str, at_most: u32) -> u64 {
    let v = client(
        "consume",
        boot,
        args(
            "confluent",
            &[
                "--topic",
                topic,
                "--n",
                &at_most.to_string(),
                "--timeout",
                "3",
            ],
        ),
    )
    .await;
    assert!(v["exception"].is_null(), "{v}");
    v["consumed"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_produces_consumes_and_joins_a_group_directly_at_tansu() {
    let broker = tansu();
    let boot = broker.addr;
    kafka_create_topics(boot, &["orders-eu", "payments"], 1);
    for c in CLIENTS {
        let v = client(
            "produce",
            boot,
            args(c, &["--topic", "orders-eu", "--n", "5"]),
        )
        .await;
        assert_eq!(v["delivered"], 5, "{c}: {v}");
        assert!(error_names(&v).is_empty(), "{c}: {v}");
        assert!(v["exception"].is_null(), "{c}: {v}");
    }
    // 4 clients x 5 messages: each consumer reads all 20, without and with a consumer group.
    for c in CLIENTS {
        let v = client(
            "consume",
            boot,
            args(c, &["--topic", "orders-eu", "--n", "20"]),
        )
        .await;
        assert_eq!(v["consumed"], 20, "{c}: {v}");
        assert!(error_names(&v).is_empty(), "{c}: {v}");
        let g = format!("billing-{c}");
        let v = client(
            "group",
            boot,
            args(c, &["--topic", "orders-eu", "--n", "20", "--group", &g]),
        )
        .await;
        assert_eq!(v["consumed"], 20, "{c}: {v}");
        assert!(error_names(&v).is_empty(), "{c}: {v}");
        // The libraries commit and read it back; kcat commits by itself (auto commit) and
        // librdkafka reads the group's offsets back.
        assert_eq!(v["commit"], "ok", "{c}: {v}");
        assert_eq!(v["committed_offsets"], 20, "{c}: {v}");
    }
    // One producer, two topics, interleaved: the broker takes both.
    for c in ["confluent", "aiokafka", "kafka-python"] {
        let v = client(
            "mixed-produce",
            boot,
            args(
                c,
                &["--allowed", "orders-eu", "--denied", "payments", "--n", "3"],
            ),
        )
        .await;
        assert_eq!(v["allowed"]["delivered"], 6, "{c}: {v}");
        assert_eq!(v["denied"]["delivered"], 3, "{c}: {v}");
        if c == "confluent" {
            assert_eq!(v["rd_disconnects"], 0, "{v}");
        }
    }
    assert_eq!(count_at_broker(boot, "payments", 100).await, 9);
}

/// tansu 0.6.0 limitations this pins down (the cases through the proxy compare with them):
/// * InitProducerId v0–v2 (no producer id/epoch in the request) is answered with
///   UNKNOWN_SERVER_ERROR (-1) and the broker logs `producer=None epoch=None`; v3+ works.
///   aiokafka 0.14 only speaks v0, so it cannot be idempotent or transactional against tansu.
/// * There is no EndTxn (API key 26): it is not in tansu's ApiVersions, and an EndTxn v3
///   request makes it close the connection. No transaction can be committed: librdkafka
///   fails commit_transaction() with _UNSUPPORTED_FEATURE ("EndTxnRequest (KIP-98) not
///   supported by broker"), kafka-python with IncompatibleBrokerVersion (error 35). init,
///   begin and the transactional produce itself work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_and_transactional_producers_directly_at_tansu() {
    let broker = tansu();
    let boot = broker.addr;
    kafka_create_topics(boot, &["orders-tx"], 1);
    for c in ["confluent", "kafka-python", "kcat"] {
        let v = client(
            "idempotent",
            boot,
            args(c, &["--topic", "orders-tx", "--n", "5"]),
        )
        .await;
        assert_eq!(v["delivered"], 5, "{c}: {v}");
        assert!(error_names(&v).is_empty(), "{c}: {v}");
    }
    let v = client(
        "idempotent",
        boot,
        args("aiokafka", &["--topic", "orders-tx", "--n", "5"]),
    )
    .await;
    assert_eq!(v["exception"]["class"], "UnknownError", "{v}");
    assert_eq!(count_at_broker(boot, "orders-tx", 100).await, 15);

    for (c, commit) in [
        ("confluent", "_UNSUPPORTED_FEATURE"),
        ("kafka-python", "UNSUPPORTED_VERSION"),
    ] {
        let txn = format!("billing-tx-{c}");
        let v = client(
            "transactional",
            boot,
            args(c, &["--topic", "orders-tx", "--n", "5", "--txn-id", &txn]),
        )
        .await;
        assert_eq!(v["steps"]["init"], "ok", "{c}: {v}");
        assert_eq!(v["steps"]["begin"], "ok", "{c}: {v}");
        assert_eq!(v["delivered"], 5, "{c}: {v}");
        assert_eq!(v["steps"]["commit"], commit, "{c}: {v}");
    }
    let v = client(
        "transactional",
        boot,
        args(
            "aiokafka",
            &[
                "--topic",
                "orders-tx",
                "--n",
                "5",
                "--txn-id",
                "billing-tx-aio",
            ],
        ),
    )
    .await;
    assert_eq!(v["steps"]["init"], "UNKNOWN", "{v}");
    let v = client(
        "transactional",
        boot,
        args(
            "kcat",
            &[
                "--topic",
                "orders-tx",
                "--n",
                "5",
                "--txn-id",
                "billing-tx-kcat",
            ],
        ),
    )
    .await;
    assert_eq!(v["exit"], 1, "{v}");
    assert!(
        v["stderr"]
            .as_str()
            .unwrap()
            .contains("EndTxnRequest (KIP-98) not supported"),
        "{v}"
    );
}

/// tansu 0.6.0 does not check request versions: ApiVersions v127 is answered exactly like v3
/// (error 0, flexible layout), not with KIP-511's v0 UNSUPPORTED_VERSION reply, and a Metadata
/// v127 request gets a Metadata response. So whatever the proxy answers to unknown versions is
/// the proxy's own doing. (Also seen, not asserted here: a Metadata v12 request with an empty
/// topic array - "no topics" since v1 - is answered with every topic, like a null array.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_answers_unknown_request_versions_as_if_they_were_known() {
    let broker = tansu();
    kafka_create_topics(broker.addr, &["orders-eu"], 1);
    let v = client(
        "raw",
        broker.addr,
        vec![
            "--steps".into(),
            "apiversions:127,apiversions:3,metadata:127,apiversions:3".into(),
            "--topic".into(),
            "orders-eu".into(),
        ],
    )
    .await;
    let s = &v["steps"];
    for i in 0..4 {
        assert_eq!(s[i]["outcome"], "response", "{v}");
        assert_eq!(s[i]["correlation_ok"], true, "{v}");
    }
    assert_eq!(s[0]["error_name"], "NONE", "{v}");
    assert_eq!(s[0]["layout"], "v3", "{v}");
    assert_eq!(s[0]["apis"], s[1]["apis"], "{v}");
    assert!(s[1]["apis"]["26"].is_null(), "no EndTxn: {v}");
    assert_eq!(v["connection_survived"], true, "{v}");
}
