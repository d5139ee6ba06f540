//! Hostile Kafka frames against the proxy in front of a real broker (tansu): each one is
//! refused — the connection closed, an audit record written — and the proxy keeps serving.
//! The first of these, a 14-byte Metadata request claiming 2^31-1 topics, used to abort the
//! whole process (kafka-protocol reserves capacity from the wire count; see
//! `tollgate_parsers::alloc`). This test binary runs under the allocator the proxy registers,
//! like the `tollgate` binary does.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use tollgate_proxy::audit::{AuditSink, Output};
use tollgate_proxy::kafka::KafkaListener;
use tollgate_proxy::metrics::Metrics;

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka: [{apiKey: metadata}, {apiKey: apiversions}]
"#;

const INVENTORY: &str = r#"
apiVersion: tollgate.io/v1alpha1
kind: EndpointInventory
endpoints:
  - {name: kafka, namespace: shop, labels: {app: kafka}, ips: [127.0.0.2]}
  - {name: client, namespace: shop, labels: {app: client}, ips: [127.0.0.1]}
"#;

/// Send one frame body (size prefix added) and wait for what comes back: bytes, or the close.
fn exchange(addr: std::net::SocketAddr, body: &[u8]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    s.write_all(&frame).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .expect("the proxy closes the connection");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_are_refused_and_the_proxy_keeps_serving() {
    let broker = common::tansu();
    let mut set = tollgate_policy::load::PolicySet::default();
    set.load_str("policy.yaml", POLICY);
    assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
    let inv = tollgate_policy::endpoints::Inventory::from_yaml(INVENTORY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let l = KafkaListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        "kafka:9092",
        broker.addr,
        Arc::new(tollgate_proxy::PolicyState::new(set, inv, 1)),
        AuditSink::start(Output::File(audit.clone()), 64),
        Arc::new(Metrics::new()),
    )
    .await
    .unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(l.serve());

    let hostile: &[(&str, &[u8])] = &[
        // Metadata v1, null client id, topic count i32::MAX.
        (
            "two billion topics",
            &[0, 3, 0, 1, 0, 0, 0, 1, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff],
        ),
        // Metadata v12 (flexible): compact array count 2^32-2.
        (
            "compact count",
            &[
                0, 3, 0, 12, 0, 0, 0, 2, 0xff, 0xff, 0, 0xff, 0xff, 0xff, 0xff, 0x0f,
            ],
        ),
        // An API key no Kafka version defines.
        ("unknown key", &[0x7f, 0, 0, 1, 0, 0, 0, 3, 0xff, 0xff]),
        // A client id longer than the frame.
        ("truncated header", &[0, 3, 0, 1, 0, 0, 0, 4, 0, 50, b'x']),
    ];
    for (what, body) in hostile {
        let answer = tokio::task::spawn_blocking({
            let body = body.to_vec();
            move || exchange(addr, &body)
        })
        .await
        .unwrap();
        assert!(answer.is_empty(), "{what}: answered {answer:?}");
        // Still serving: a valid ApiVersions round trip through the proxy to tansu.
        let ok = tokio::task::spawn_blocking(move || common::kafka_api_versions_ok(addr))
            .await
            .unwrap();
        assert!(ok, "{what}: the proxy stopped serving");
    }
    // Every refusal is on record, with why.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let malformed: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["reason"] == "malformed")
        .collect();
    assert_eq!(malformed.len(), hostile.len(), "{records:#?}");
    let detail = |i: usize| {
        malformed[i]["detail"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        detail(0).contains("metadata v1 body does not decode"),
        "{}",
        detail(0)
    );
    assert!(detail(2).contains("unknown API key 32512"), "{}", detail(2));
    assert!(detail(3).contains("client id truncated"), "{}", detail(3));
    assert_eq!(malformed[0]["protocol"], "kafka");
    assert_eq!(malformed[0]["kafka"]["api_key"], "metadata");
}
