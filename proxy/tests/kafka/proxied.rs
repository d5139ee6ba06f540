//! Kafka policy through tollgate's Kafka listener (fixed-listener mode: the proxy rewrites the
//! broker addresses in Metadata / FindCoordinator / DescribeCluster to itself, so clients
//! bootstrapped at the proxy stay on it). Every case asserts what the real client saw AND the
//! audit record of each denial; where it matters, it also reads the broker directly to show
//! that a denied request never reached it.

use super::*;

use std::sync::Arc;
use std::time::Duration;

use tollgate_policy::endpoints::Inventory;
use tollgate_policy::load::PolicySet;
use tollgate_proxy::PolicyState;
use tollgate_proxy::audit::{AuditSink, Output};
use tollgate_proxy::kafka::KafkaListener;
use tollgate_proxy::metrics::Metrics;

/// The client runs on 127.0.0.1 (Kafka clients cannot pick their source address); the broker
/// endpoint's inventory address is not used by a fixed listener (the upstream is given).
const INVENTORY: &str = "
endpoints:
  - {name: client, namespace: shop, labels: {app: client}, ips: [127.0.0.1]}
  - {name: kafka, namespace: shop, labels: {app: kafka}, ips: [127.0.0.2]}
";

/// Rule indexes below are part of the audit assertions (`rules.kafka[N]`).
const BASE_POLICY: &str = r#"
apiVersion: tollgate.io/v1alpha1
kind: TollgatePolicy
metadata: {name: shop-kafka, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
        - {role: produce, topic: "orders-*"}
        - {apiKey: fetch, topic: "orders-*"}
        - {apiKey: listoffsets, topic: "orders-*"}
        - {role: consume, topic: "orders-*", groupID: "billing-*"}
        - {topic: orders-secret, action: deny}
"#;

/// The base policy plus more `kafka` rules (indexes 5, 6, ...).
fn policy(extra: &[&str]) -> String {
    let mut p = BASE_POLICY.to_string();
    for r in extra {
        p.push_str(&format!("        - {r}\n"));
    }
    p
}

const DENY_RULE: &str = "spec.ingress[0].toPorts[0].rules.kafka[4]";

// The audit record's Kafka object (`proxy/src/audit.rs` `KafkaFields`); one place to rename.
const K_API_KEY: &str = "api_key";
const K_CLIENT_ID: &str = "client_id";
const K_TOPICS: &str = "topics";
const K_GROUPS: &str = "groups";
const K_TXNS: &str = "transactional_ids";
const K_ERROR: &str = "error_code";

const TOPIC_AUTHORIZATION_FAILED: i64 = 29;
const GROUP_AUTHORIZATION_FAILED: i64 = 30;
const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i64 = 53;

struct Proxy {
    addr: SocketAddr,
    audit: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The first denied Kafka record matching `pred` (bounded wait: records are written by a
    /// task). Panics with every record when there is none.
    async fn denied(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..100 {
            if let Some(r) = self
                .records()
                .into_iter()
                .find(|r| r["verdict"] == "denied" && r["protocol"] == "kafka" && pred(r))
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no denied kafka record for {what}: {:#?}", self.records());
    }

    /// No denied record names only topics in `allowed` (an allowed request was never denied).
    fn none_denied_only_for(&self, allowed: &[&str]) {
        for r in self.records() {
            if r["verdict"] != "denied" {
                continue;
            }
            let topics = topics_of(&r);
            assert!(
                topics.is_empty() || topics.iter().any(|t| !allowed.contains(&t.as_str())),
                "an allowed request was denied: {r}"
            );
        }
    }
}

/// A list field of the record's Kafka object (`topics`, `groups`, `transactional_ids`).
fn list_of(r: &Value, field: &str) -> Vec<String> {
    r["kafka"][field]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn topics_of(r: &Value) -> Vec<String> {
    list_of(r, K_TOPICS)
}

fn names_topic(r: &Value, t: &str) -> bool {
    topics_of(r).iter().any(|x| x == t)
}

/// The request was answered with this error (records of topics merely hidden from an
/// all-topics Metadata answer carry none).
fn answered(r: &Value, code: i64) -> bool {
    r["kafka"][K_ERROR] == code
}

fn from_client(r: &Value, c: &str) -> bool {
    r["kafka"][K_CLIENT_ID] == format!("tg-{c}").as_str()
}

/// Assert the fields every Kafka denial carries.
fn assert_kafka_denial(r: &Value) {
    assert_eq!(r["protocol"], "kafka", "{r}");
    assert_eq!(r["verdict"], "denied", "{r}");
    assert_eq!(r["source"]["name"], "client", "{r}");
    assert_eq!(r["source"]["ip"], "127.0.0.1", "{r}");
    assert_eq!(r["destination"]["name"], "kafka", "{r}");
    assert_eq!(r["destination"]["port"], 9092, "{r}");
    assert_eq!(r["policy_revision"], 3, "{r}");
    assert!(r["kafka"][K_API_KEY].is_string(), "{r}");
    assert!(r["kafka"]["api_key_id"].is_number(), "{r}");
    assert!(r["kafka"]["api_version"].is_number(), "{r}");
    assert!(r["kafka"]["correlation_id"].is_number(), "{r}");
}

async fn start_proxy(policy: &str, upstream: SocketAddr) -> Proxy {
    let mut set = PolicySet::default();
    set.load_str("policy.yaml", policy);
    assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
    let inv = Inventory::from_yaml(INVENTORY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let l = KafkaListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        "kafka:9092",
        upstream,
        Arc::new(PolicyState::new(set, inv, 3)),
        AuditSink::start(Output::File(audit.clone()), 256),
        Arc::new(Metrics::new()),
    )
    .await
    .unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(l.serve());
    Proxy {
        addr,
        audit,
        _dir: dir,
    }
}
/// One test per (case, client): `proxied::produce::kafka_python`, ... — a client that fails
/// never hides what the others do.
macro_rules! per_client {
    ($case:ident: $($client:ident),+) => {
        mod $case {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $client() {
                    super::$case(&stringify!($client).replace('_', "-")).await
                }
            )+
        }
    };
}

per_client!(produce: confluent, aiokafka, kafka_python, kcat);
per_client!(consume: confluent, aiokafka, kafka_python, kcat);
per_client!(group: confluent, aiokafka, kafka_python, kcat);
per_client!(mixed_producer: confluent, aiokafka, kafka_python);
per_client!(idempotent_allowed: confluent, aiokafka, kafka_python, kcat);
per_client!(idempotent_refused: confluent, aiokafka, kafka_python, kcat);
per_client!(transactional_allowed: confluent, kafka_python);
per_client!(transactional_refused: confluent, aiokafka, kafka_python, kcat);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_bootstrapped_at_the_proxy_are_told_the_proxy_is_the_broker() {
    let broker = tansu();
    kafka_create_topics(broker.addr, &["orders-eu"], 1);
    let p = start_proxy(&policy(&[]), broker.addr).await;
    let v = client(
        "raw",
        p.addr,
        vec!["--steps".into(), "metadata:12:orders-eu".into()],
    )
    .await;
    let m = &v["steps"][0];
    assert_eq!(m["topics"]["orders-eu"], "NONE", "{v}");
    assert_eq!(m["brokers"], serde_json::json!([p.addr.to_string()]), "{v}");
    // librdkafka (kcat -L) sees the same: only the proxy, never the broker's own address.
    let out = std::process::Command::new(common::peers_dir().join("kcat.sh"))
        .args([
            "-L",
            "-b",
            &p.addr.to_string(),
            "-t",
            "orders-eu",
            "-m",
            "5",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("at {}", p.addr)) && !text.contains(&broker.addr.to_string()),
        "kcat -L through the proxy: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_versions_get_kip_511_on_a_connection_that_stays_usable_or_a_prompt_close() {
    let broker = tansu();
    kafka_create_topics(broker.addr, &["orders-eu", "payments"], 1);
    let p = start_proxy(&policy(&[]), broker.addr).await;
    let direct = client(
        "raw",
        broker.addr,
        vec!["--steps".into(), "apiversions:3".into()],
    )
    .await;
    let v = client(
        "raw",
        p.addr,
        vec![
            "--steps".into(),
            "apiversions:127,apiversions:3,metadata:12:orders-eu,metadata:12:payments,apiversions:3"
                .into(),
        ],
    )
    .await;
    let s = &v["steps"];
    // KIP-511: an ApiVersions version nobody knows gets a v0 reply with UNSUPPORTED_VERSION
    // (tansu itself would answer it as if it were v3: see kafka_real.rs).
    assert_eq!(s[0]["outcome"], "response", "{v}");
    assert_eq!(s[0]["correlation_ok"], true, "{v}");
    assert_eq!(s[0]["error_name"], "UNSUPPORTED_VERSION", "{v}");
    assert_eq!(s[0]["layout"], "v0", "{v}");
    assert!(
        s[0]["apis"]["18"].is_array(),
        "ApiVersions itself is listed: {v}"
    );
    // Then a valid ApiVersions v3 on the same connection: every version offered is one the
    // broker offers too (the proxy caps, never widens).
    assert_eq!(s[1]["error_name"], "NONE", "{v}");
    let broker_apis = &direct["steps"][0]["apis"];
    for (k, range) in s[1]["apis"].as_object().unwrap() {
        let b = &broker_apis[k];
        assert!(
            b.is_array(),
            "api {k} offered by the proxy, not by the broker: {v}"
        );
        assert!(
            range[1].as_i64() <= b[1].as_i64(),
            "api {k}: {range} vs broker {b}"
        );
    }
    // An allowed and a denied Metadata on the same connection, then ApiVersions again.
    assert_eq!(s[2]["topics"]["orders-eu"], "NONE", "{v}");
    assert_eq!(s[3]["outcome"], "response", "{v}");
    assert_eq!(
        s[3]["topics"]["payments"], "TOPIC_AUTHORIZATION_FAILED",
        "{v}"
    );
    assert_eq!(s[4]["error_name"], "NONE", "{v}");
    assert_eq!(v["connection_survived"], true, "{v}");

    // A Metadata version nobody knows: no response of that version can be written and the
    // body cannot be judged, so the proxy closes the connection as a broker would - at once,
    // not after a timeout (parsers/src/kafka.rs `unsupported_version_response`).
    let v = client(
        "raw",
        p.addr,
        vec![
            "--steps".into(),
            "metadata:127:payments,apiversions:3".into(),
        ],
    )
    .await;
    assert_eq!(v["steps"][0]["outcome"], "closed", "{v}");
    assert_eq!(v["connection_survived"], false, "{v}");
    assert!(v["elapsed_s"].as_f64().unwrap() < 2.0, "{v}");
}

/// Produce is delivered to an allowed topic and refused with TOPIC_AUTHORIZATION_FAILED for a
/// topic no rule covers and for one a deny rule names; only the allowed messages reach the
/// broker.
async fn produce(c: &str) {
    let broker = tansu();
    kafka_create_topics(broker.addr, &["orders-eu", "orders-secret", "payments"], 1);
    let p = start_proxy(&policy(&[]), broker.addr).await;
    let ok = client(
        "produce",
        p.addr,
        args(c, &["--topic", "orders-eu", "--n", "5"]),
    )
    .await;
    assert_eq!(ok["delivered"], 5, "{c}: {ok}");
    assert!(error_names(&ok).is_empty(), "{c}: {ok}");

    // No rule covers `payments`: the default deny of an L7 port.
    let den = client(
        "produce",
        p.addr,
        args(c, &["--topic", "payments", "--n", "3"]),
    )
    .await;
    assert_ne!(den["delivered"], 3, "{c}: {den}");
    assert_eq!(
        error_names(&den),
        ["TOPIC_AUTHORIZATION_FAILED"],
        "{c}: {den}"
    );
    let r = p
        .denied(&format!("{c} produce payments"), |r| {
            from_client(r, c)
                && names_topic(r, "payments")
                && answered(r, TOPIC_AUTHORIZATION_FAILED)
        })
        .await;
    assert_kafka_denial(&r);
    assert_eq!(r["reason"], "l7-no-match", "{r}");

    // `orders-secret` matches `orders-*` and the deny rule: deny wins.
    let den = client(
        "produce",
        p.addr,
        args(c, &["--topic", "orders-secret", "--n", "2"]),
    )
    .await;
    assert_ne!(den["delivered"], 2, "{c}: {den}");
    assert_eq!(
        error_names(&den),
        ["TOPIC_AUTHORIZATION_FAILED"],
        "{c}: {den}"
    );
    let r = p
        .denied(&format!("{c} produce orders-secret"), |r| {
            from_client(r, c)
                && names_topic(r, "orders-secret")
                && answered(r, TOPIC_AUTHORIZATION_FAILED)
        })
        .await;
    assert_kafka_denial(&r);
    assert_eq!(r["reason"], "l7-deny-rule", "{r}");
    assert_eq!(r["rule"], DENY_RULE, "{r}");
    assert_eq!(r["policy"]["name"], "shop-kafka", "{r}");

    p.none_denied_only_for(&["orders-eu"]);
    assert_eq!(count_at_broker(broker.addr, "orders-eu", 100).await, 5);
    assert_eq!(count_at_broker(broker.addr, "payments", 100).await, 0);
    assert_eq!(count_at_broker(broker.addr, "orders-secret", 100).await, 0);
}

/// Consume (no consumer group) reads an allowed topic and is refused on a topic no rule
/// covers and on one a deny rule names. librdkafka's Python consumer still names a group
/// (billing-assign-*) for its coordinator lookup; it never joins.
async fn consume(c: &str) {
    let broker = tansu();
    kafka_create_topics(broker.addr, &["orders-eu", "orders-secret", "payments"], 1);
    for t in ["orders-eu", "orders-secret", "payments"] {
        let v = client(
            "produce",
            broker.addr,
            args("confluent", &["--topic", t, "--n", "7"]),
        )
        .await;
        assert_eq!(v["delivered"], 7, "{v}");
    }
    let p = start_proxy(&policy(&[]), broker.addr).await;
    let ok = client(
        "consume",
        p.addr,
        args(c, &["--topic", "orders-eu", "--n", "7"]),
    )
    .await;
    assert_eq!(ok["consumed"], 7, "{c}: {ok}");
    assert!(error_names(&ok).is_empty(), "{c}: {ok}");
    for (t, reason) in [
        ("payments", "l7-no-match"),
        ("orders-secret", "l7-deny-rule"),
    ] {
        let den = client("consume", p.addr, args(c, &["--topic", t, "--n", "7"])).await;
        assert_eq!(den["consumed"], 0, "{c} {t}: {den}");
        assert!(
            error_names(&den).contains(&"TOPIC_AUTHORIZATION_FAILED".to_string()),
            "{c} {t}: {den}"
        );
        let r = p
            .denied(&format!("{c} consume {t}"), |r| {
                from_client(r, c) && names_topic(r, t) && answered(r, TOPIC_AUTHORIZATION_FAILED)
            })
            .await;
        assert_kafka_denial(&r);
        assert_eq!(r["reason"], reason, "{r}");
    }
    p.none_denied_only_for(&["orders-eu"]);
}

/// A consumer group the policy allows (billing-*) joins, consumes, commits and reads its
/// commit back; another group gets GROUP_AUTHORIZATION_FAILED and consumes nothing.
async fn group(c: &str) {
    let broker = tansu();
    kafka_create_topics(broker.addr, &["orders-eu"], 1);
    let v = client(
        "produce",
        broker.addr,
        args("confluent", &["--topic", "orders-eu", "--n", "6"]),
    )
    .await;
    assert_eq!(v["delivered"], 6, "{v}");
    let p = start_proxy(&policy(&[]), broker.addr).await;
    let g = format!("billing-{c}");
    let ok = client(
        "group",
        p.addr,
        args(c, &["--topic", "orders-eu", "--n", "6", "--group", &g]),
    )
    .await;
    assert_eq!(ok["consumed"], 6, "{c}: {ok}");
    assert!(error_names(&ok).is_empty(), "{c}: {ok}");
    assert_eq!(ok["commit"], "ok", "{c}: {ok}");
    assert_eq!(ok["committed_offsets"], 6, "{c}: {ok}");

    let g = format!("analytics-{c}");
    let den = client(
        "group",
        p.addr,
        args(c, &["--topic", "orders-eu", "--n", "6", "--group", &g]),
    )
    .await;
    assert_eq!(den["consumed"], 0, "{c}: {den}");
    assert!(
        den.to_string().contains("GROUP_AUTHORIZATION_FAILED"),
        "{c}: {den}"
    );
    let r = p
        .denied(&format!("{c} group {g}"), |r| {
            list_of(r, K_GROUPS).contains(&g) && answered(r, GROUP_AUTHORIZATION_FAILED)
        })
        .await;
    assert_kafka_denial(&r);
    assert_eq!(r["reason"], "l7-no-match", "{r}");
}

/// One producer sends to an allowed and a denied topic, interleaved, then carries on with the
/// allowed one: every allowed message arrives, every denied one gets
/// TOPIC_AUTHORIZATION_FAILED, and the denials cost no connection.
async fn mixed_producer(c: &str) {
    let broker = tansu();
    kafka_create_topics(
        broker.addr,
        &["orders-eu", "payments", "orders-base", "payments-base"],
        1,
    );
    let p = start_proxy(&policy(&[]), broker.addr).await;
    // The same client directly at the broker: how many connections it opens on its own.
    let base = client(
        "mixed-produce",
        broker.addr,
        args(
            c,
            &[
                "--allowed",
                "orders-base",
                "--denied",
                "payments-base",
                "--n",
                "4",
            ],
        ),
    )
    .await;
    assert_eq!(base["denied"]["delivered"], 4, "{c}: {base}");
    let v = client(
        "mixed-produce",
        p.addr,
        args(
            c,
            &["--allowed", "orders-eu", "--denied", "payments", "--n", "4"],
        ),
    )
    .await;
    // 4 interleaved with the denied ones, then 4 more after them.
    assert_eq!(v["allowed"]["delivered"], 8, "{c}: {v}");
    assert!(v["allowed"]["errors"].is_null(), "{c}: {v}");
    assert_eq!(
        v["denied"]["errors"]["TOPIC_AUTHORIZATION_FAILED"], 4,
        "{c}: {v}"
    );
    assert!(v["denied"]["delivered"].is_null(), "{c}: {v}");
    assert!(
        v["tcp_connects"].as_u64() <= base["tcp_connects"].as_u64(),
        "{c}: through the proxy {v}, direct {base}"
    );
    if c == "confluent" {
        // librdkafka counts the connections it lost.
        assert_eq!(v["rd_disconnects"], 0, "{v}");
        assert!(
            v["rd_connects"].as_u64() <= base["rd_connects"].as_u64(),
            "{v} vs {base}"
        );
    }
    let r = p
        .denied(&format!("{c} mixed"), |r| {
            from_client(r, c)
                && names_topic(r, "payments")
                && answered(r, TOPIC_AUTHORIZATION_FAILED)
        })
        .await;
    assert_kafka_denial(&r);
    p.none_denied_only_for(&["orders-eu"]);
    assert_eq!(count_at_broker(broker.addr, "orders-eu", 100).await, 8);
    assert_eq!(count_at_broker(broker.addr, "payments", 100).await, 0);
}

/// With `{apiKey: initproducerid}` an idempotent producer gets its producer id and delivers.
/// aiokafka only speaks InitProducerId v0, which tansu cannot answer (UNKNOWN_SERVER_ERROR,
/// kafka_real.rs): through the proxy it must see exactly that broker answer.
async fn idempotent_allowed(c: &str) {
    let broker = tansu();
    kafka_create_topics(broker.addr, &["orders-eu"], 1);
    let p = start_proxy(&policy(&["{apiKey: initproducerid}"]), broker.addr).await;
    let v = client(
        "idempotent",
        p.addr,
        args(c, &["--topic", "orders-eu", "--n", "5"]),
    )
    .await;
    if c == "aiokafka" {
        assert_eq!(v["exception"]["class"], "UnknownError", "{v}");
        assert_eq!(count_at_broker(broker.addr, "orders-eu", 100).await, 0);
    } else {
        assert_eq!(v["delivered"], 5, "{c}: {v}");
        assert!(error_names(&v).is_empty(), "{c}: {v}");
        assert_eq!(count_at_broker(broker.addr, "orders-eu", 100).await, 5);
    }
    assert!(p.records().is_empty(), "{c}: {:?}", p.records());
}

/// Without a rule for InitProducerId the producer id is refused as a broker with ACLs
/// refuses it (CLUSTER_AUTHORIZATION_FAILED): no message is written.
async fn idempotent_refused(c: &str) {
    let broker = tansu();
    kafka_create_topics(broker.addr, &["orders-eu"], 1);
    let p = start_proxy(&policy(&[]), broker.addr).await;
    let v = client(
        "idempotent",
        p.addr,
        args(c, &["--topic", "orders-eu", "--n", "3"]),
    )
    .await;
    assert_ne!(v["delivered"], 3, "{c}: {v}");
    assert!(
        v.to_string().contains("CLUSTER_AUTHORIZATION_FAILED"),
        "{c}: {v}"
    );
    let r = p
        .denied(&format!("{c} initproducerid"), |r| {
            from_client(r, c) && r["kafka"][K_API_KEY] == "initproducerid" && answered(r, 31)
        })
        .await;
    assert_kafka_denial(&r);
    assert_eq!(count_at_broker(broker.addr, "orders-eu", 100).await, 0);
}

/// A transactional producer whose transactional id the policy allows (billing-tx-*) is
/// forwarded: every step ends exactly as it does directly at tansu (init, begin and the
/// transactional produce work; tansu has no EndTxn, so the commit fails the same way), the
/// proxy offers no EndTxn either, and nothing is denied.
async fn transactional_allowed(c: &str) {
    let broker = tansu();
    kafka_create_topics(broker.addr, &["orders-eu", "orders-base"], 1);
    let p = start_proxy(
        &policy(&["{transactionalID: \"billing-tx-*\"}"]),
        broker.addr,
    )
    .await;
    let txn = format!("billing-tx-base-{c}");
    let base = client(
        "transactional",
        broker.addr,
        args(c, &["--topic", "orders-base", "--n", "4", "--txn-id", &txn]),
    )
    .await;
    let txn = format!("billing-tx-{c}");
    let v = client(
        "transactional",
        p.addr,
        args(c, &["--topic", "orders-eu", "--n", "4", "--txn-id", &txn]),
    )
    .await;
    assert_eq!(v["steps"]["init"], "ok", "{c}: {v}");
    assert_eq!(v["steps"]["begin"], "ok", "{c}: {v}");
    assert_eq!(v["delivered"], 4, "{c}: {v}");
    assert_eq!(
        v["steps"], base["steps"],
        "{c}: through the proxy {v}, direct {base}"
    );
    assert!(p.records().is_empty(), "{c}: {:?}", p.records());
}

/// Another transactional id is refused with TRANSACTIONAL_ID_AUTHORIZATION_FAILED before
/// anything is produced.
async fn transactional_refused(c: &str) {
    let broker = tansu();
    kafka_create_topics(broker.addr, &["orders-eu"], 1);
    let p = start_proxy(
        &policy(&["{transactionalID: \"billing-tx-*\"}"]),
        broker.addr,
    )
    .await;
    let txn = format!("rogue-tx-{c}");
    let v = client(
        "transactional",
        p.addr,
        args(c, &["--topic", "orders-eu", "--n", "4", "--txn-id", &txn]),
    )
    .await;
    if c == "kcat" {
        assert_eq!(v["exit"], 1, "{v}");
        assert!(
            v["errors"]["TRANSACTIONAL_ID_AUTHORIZATION_FAILED"].as_u64() >= Some(1),
            "{v}"
        );
    } else {
        assert_eq!(
            v["steps"]["init"], "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
            "{c}: {v}"
        );
        assert_eq!(v["delivered"], 0, "{c}: {v}");
    }
    let r = p
        .denied(&format!("{c} {txn}"), |r| {
            list_of(r, K_TXNS).contains(&txn) && answered(r, TRANSACTIONAL_ID_AUTHORIZATION_FAILED)
        })
        .await;
    assert_kafka_denial(&r);
}
