//! Kafka without any client configuration, on the real kernel: a tansu broker listens on the
//! server namespace's address (port 9092) and advertises that address; real clients
//! (confluent-kafka / librdkafka, kcat, and a plain socket) in the client namespace bootstrap
//! at it. The eBPF datapath (TC program on the client's veth) redirects every one of their
//! flows to port 9092 with `bpf_sk_assign` to the proxy's transparent listener in the node
//! namespace — the bootstrap connection and each connection to the advertised broker address
//! (nothing is rewritten in this mode, so the client reaches the real address every time). The proxy reads
//! the original destination from the accepted socket, finds the broker endpoint and its
//! ingress Kafka rules, and judges every request. Asserted: what the clients saw (delivered
//! produce, TOPIC_AUTHORIZATION_FAILED — also to one producer mixing an allowed and a denied
//! topic, with no connection lost —, the consumer group allowed / GROUP_AUTHORIZATION_FAILED,
//! the broker address left as advertised), what reached the broker (read directly from the
//! server namespace), and the audit records (protocol `kafka`, API, topics/groups, the error
//! code answered, destination = the broker endpoint at the original IP and port).
//! Needs root (skipped loudly otherwise; CI runs as root).

#[path = "../../redirector-ebpf/loader/tests/harness/mod.rs"]
mod harness;

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Reaped, feas_dir, kafka_api_versions_ok, kafka_client_in, need_kafka_clients};
use harness::{ENFORCE_BOTH, Topology, entry, in_netns, require_root};
use serde_json::Value;
use tollgate_datapath::RedirectRouting;
use tollgate_datapath::common::{direction, identity, proto, verdict};
use tollgate_policy::endpoints::Inventory;
use tollgate_policy::load::PolicySet;
use tollgate_proxy::audit::{AuditSink, Output};
use tollgate_proxy::{Listener, PolicyState, serve_listener};

const PROXY_PORT: u16 = 15001;
const KAFKA_PORT: u16 = 9092;

const TOPIC_AUTHORIZATION_FAILED: i64 = 29;
const GROUP_AUTHORIZATION_FAILED: i64 = 30;

/// On the broker's ingress; rule indexes are part of the audit assertions.
const POLICY: &str = r#"
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
        - {role: produce, topic: "orders*"}
        - {apiKey: fetch, topic: "orders*"}
        - {apiKey: listoffsets, topic: "orders*"}
        - {role: consume, topic: "orders*", groupID: "billing-*"}
        - {topic: orders-secret, action: deny}
        - {apiKey: metadata, topic: ledger}
"#;
const DENY_RULE: &str = "spec.ingress[0].toPorts[0].rules.kafka[4]";

/// tansu in `netns`, listening on and advertising `addr`, killed on drop.
struct Broker {
    _dir: tempfile::TempDir,
    log: std::path::PathBuf,
    _child: Reaped,
}

impl Broker {
    fn start(netns: &str, addr: SocketAddr) -> Broker {
        let bin = feas_dir().join("opt/bin/tansu");
        assert!(
            bin.exists(),
            "{} is not installed: run scripts/setup-proxy.sh",
            bin.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("tansu.log");
        let url = format!("tcp://{addr}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(&bin)
            .args(["broker", "--cluster-id", "t", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("tansu.err")).unwrap());
        // Reaped kills it on drop; should the test binary abort (no destructors), the broker
        // still gets SIGKILL when the test's thread is gone (`ip netns exec` execs tansu, and
        // the death signal survives exec). Called on the test's own thread.
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let b = Broker {
            _dir: dir,
            log,
            _child: Reaped(child),
        };
        let up = in_netns(netns, || {
            (0..100).any(|_| {
                std::thread::sleep(Duration::from_millis(50));
                kafka_api_versions_ok(addr)
            })
        });
        assert!(up, "tansu does not answer on {addr}: {}", b.log_tail());
        b
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        s[s.len().saturating_sub(2000)..].to_string()
    }
}

/// `--client CLIENT --client-id tg-transparent rest...`
fn args<'a>(client: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--client", client, "--client-id", "tg-transparent"];
    v.extend_from_slice(rest);
    v
}

/// Error names a client reported (its `errors` map), sorted.
fn error_names(v: &Value) -> Vec<String> {
    let mut names: Vec<String> = v["errors"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    names.sort();
    names
}

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

#[test]
fn redirected_kafka_flows_are_judged_per_request_at_their_original_broker() {
    if !require_root("redirected_kafka_flows_are_judged_per_request_at_their_original_broker") {
        return;
    }
    need_kafka_clients();
    let t = Topology::new();
    let boot = SocketAddr::new(t.server.v4.into(), KAFKA_PORT);
    let broker = Broker::start(&t.server.netns, boot);

    // Topics are created directly at the broker, from its own namespace (loopback there: no
    // TC program, no proxy).
    let v = kafka_client_in(
        &t.server.netns,
        "create-topics",
        boot,
        &["--topics", "orders-eu,orders-secret,payments,ledger"],
    );
    for topic in ["orders-eu", "orders-secret", "payments", "ledger"] {
        assert_eq!(v["created"][topic], "ok", "create {topic}: {v}");
    }

    let mut set = PolicySet::default();
    set.load_str("kafka.yaml", POLICY);
    assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
    let inv = Inventory::from_yaml(&format!(
        "- {{name: client, namespace: shop, labels: {{app: client}}, ips: [{}]}}\n- {{name: kafka, namespace: shop, labels: {{app: kafka}}, ips: [{}]}}\n",
        t.client.v4, t.server.v4
    ))
    .unwrap();
    let state = Arc::new(PolicyState::new(set, inv, 4));
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.jsonl");

    let client_ns = t.client.netns.clone();
    let run = move |scenario: &'static str, client: &'static str, rest: Vec<&'static str>| {
        let ns = client_ns.clone();
        tokio::task::spawn_blocking(move || {
            kafka_client_in(&ns, scenario, boot, &args(client, &rest))
        })
    };

    let seen =
        t.in_node(|| {
            let mut dp = t.load_datapath(ENFORCE_BOTH);
            let open = |ep, dir| entry(ep, identity::ANY, 0, proto::ANY, dir, verdict::ALLOW, 0);
            dp.upsert_policy(&[
                // The client's Kafka to the broker goes to the proxy (what the agent writes for a
                // port whose ingress rules are L7); everything else is open, so that only the
                // redirect and the proxy decide.
                entry(
                    &t.client,
                    t.server.identity,
                    KAFKA_PORT,
                    proto::TCP,
                    direction::EGRESS,
                    verdict::REDIRECT,
                    PROXY_PORT,
                ),
                open(&t.client, direction::EGRESS),
                open(&t.client, direction::INGRESS),
                open(&t.server, direction::INGRESS),
                open(&t.server, direction::EGRESS),
            ])
            .expect("policy");
            dp.install_redirect_routing(&RedirectRouting::default())
                .expect("routing");

            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let seen = rt.block_on(async {
            let l = Listener::bind_transparent(
                format!("127.0.0.1:{PROXY_PORT}").parse().unwrap(),
                state.clone(),
                AuditSink::start(Output::File(audit.clone()), 256),
                "Access denied",
            )
            .await
            .expect("transparent listener");
            tokio::spawn(serve_listener(l));
            let mut seen = Vec::new();
            for (scenario, client, rest) in [
                ("produce", "confluent", vec!["--topic", "orders-eu", "--n", "5"]),
                ("produce", "confluent", vec!["--topic", "payments", "--n", "3"]),
                ("produce", "confluent", vec!["--topic", "orders-secret", "--n", "2"]),
                // Its Metadata is allowed, so librdkafka goes on to send Produce.
                ("produce", "confluent", vec!["--topic", "ledger", "--n", "4"]),
                (
                    "raw",
                    "socket",
                    vec![
                        "--steps",
                        "apiversions:3,metadata:12:orders-eu,metadata:12:payments,apiversions:3",
                    ],
                ),
                (
                    "group",
                    "confluent",
                    vec!["--topic", "orders-eu", "--n", "5", "--group", "billing-eu"],
                ),
                (
                    "group",
                    "confluent",
                    vec!["--topic", "orders-eu", "--n", "5", "--group", "analytics"],
                ),
                // One producer, both topics interleaved (librdkafka batches them into the
                // same Produce requests), then 4 more to the allowed one.
                (
                    "mixed-produce",
                    "confluent",
                    vec!["--allowed", "orders-eu", "--denied", "ledger", "--n", "4"],
                ),
                ("produce", "kcat", vec!["--topic", "orders-eu", "--n", "3"]),
                ("produce", "kcat", vec!["--topic", "payments", "--n", "2"]),
            ] {
                seen.push(run(scenario, client, rest).await.unwrap());
            }
            // Records are written by a task: wait (bounded) for the last denial's.
            for _ in 0..100 {
                let text = std::fs::read_to_string(&audit).unwrap_or_default();
                if text.contains(r#""groups":["analytics"]"#) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        });
            let st = tollgate_datapath::status(&t.pin_root).unwrap();
            let redirected = st.counters.iter().find(|c| c.name == "redirected").unwrap();
            assert!(
                redirected.packets > 0,
                "the flows went through the redirect: {st}"
            );
            seen
        });
    for v in &seen {
        eprintln!("client saw: {v}");
    }
    let [
        ok,
        payments,
        secret,
        ledger,
        raw,
        group_ok,
        group_denied,
        mixed,
        kcat_ok,
        kcat_denied,
    ] = <[Value; 10]>::try_from(seen).unwrap();

    // What the clients saw.
    assert_eq!(ok["delivered"], 5, "{ok}");
    assert!(error_names(&ok).is_empty(), "{ok}");
    assert!(ok["exception"].is_null(), "{ok}");
    for (den, n) in [(&payments, 3), (&secret, 2), (&ledger, 4)] {
        assert_eq!(den["delivered"], 0, "nothing of {n} delivered: {den}");
        assert_eq!(error_names(den), ["TOPIC_AUTHORIZATION_FAILED"], "{den}");
    }
    let steps = raw["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("raw steps: {raw}"));
    assert_eq!(steps.len(), 4, "{raw}");
    for s in steps {
        assert_eq!(s["outcome"], "response", "{raw}");
        assert_eq!(s["correlation_ok"], true, "{raw}");
    }
    assert!(
        raw["connection_survived"] == true,
        "a denial does not cost the connection: {raw}"
    );
    // The ApiVersions answer came through the proxy: Fetch capped at v12 (tansu offers 17).
    assert_eq!(steps[0]["apis"]["1"][1], 12, "{raw}");
    // Transparent mode rewrites no broker address: the client is told the broker's own.
    assert_eq!(
        steps[1]["brokers"],
        serde_json::json!([boot.to_string()]),
        "{raw}"
    );
    assert_eq!(steps[1]["topics"]["orders-eu"], "NONE", "{raw}");
    assert_eq!(
        steps[2]["brokers"],
        serde_json::json!([boot.to_string()]),
        "{raw}"
    );
    assert_eq!(
        steps[2]["topics"]["payments"], "TOPIC_AUTHORIZATION_FAILED",
        "{raw}"
    );
    assert_eq!(group_ok["consumed"], 5, "{group_ok}");
    assert!(error_names(&group_ok).is_empty(), "{group_ok}");
    assert_eq!(group_ok["commit"], "ok", "{group_ok}");
    assert_eq!(group_ok["committed_offsets"], 5, "{group_ok}");
    assert_eq!(group_denied["consumed"], 0, "{group_denied}");
    assert!(
        group_denied
            .to_string()
            .contains("GROUP_AUTHORIZATION_FAILED"),
        "{group_denied}"
    );

    assert_eq!(mixed["allowed"]["delivered"], 8, "{mixed}");
    assert!(mixed["allowed"]["errors"].is_null(), "{mixed}");
    assert_eq!(
        mixed["denied"]["errors"]["TOPIC_AUTHORIZATION_FAILED"], 4,
        "{mixed}"
    );
    assert!(mixed["denied"]["delivered"].is_null(), "{mixed}");
    assert_eq!(
        mixed["rd_disconnects"], 0,
        "the denials cost no connection: {mixed}"
    );
    assert_eq!(kcat_ok["exit"], 0, "{kcat_ok}");
    assert_eq!(kcat_ok["delivered"], 3, "{kcat_ok}");
    assert!(error_names(&kcat_ok).is_empty(), "{kcat_ok}");
    assert_ne!(kcat_denied["exit"], 0, "{kcat_denied}");
    assert_eq!(kcat_denied["failed"], 2, "{kcat_denied}");
    assert_eq!(
        error_names(&kcat_denied),
        ["TOPIC_AUTHORIZATION_FAILED"],
        "{kcat_denied}"
    );

    // What reached the broker: only the allowed messages (read from its own namespace).
    for (topic, n) in [
        ("orders-eu", 5 + 8 + 3),
        ("payments", 0),
        ("orders-secret", 0),
        ("ledger", 0),
    ] {
        let v = kafka_client_in(
            &t.server.netns,
            "consume",
            boot,
            &args(
                "confluent",
                &["--topic", topic, "--n", "100", "--timeout", "3"],
            ),
        );
        assert!(v["exception"].is_null(), "{v}");
        assert_eq!(
            v["consumed"],
            n,
            "{topic} at the broker: {v}; {}",
            broker.log_tail()
        );
    }

    // The audit records: every one a Kafka denial of the client at the broker endpoint, found
    // from the original destination.
    let recs: Vec<Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for r in &recs {
        eprintln!("audit: {r}");
    }
    assert!(!recs.is_empty());
    for r in &recs {
        assert_eq!(r["protocol"], "kafka", "{r}");
        assert_eq!(r["verdict"], "denied", "{r}");
        assert_eq!(r["source"]["name"], "client", "{r}");
        assert_eq!(r["source"]["ip"], t.client.v4.to_string(), "{r}");
        assert_eq!(r["destination"]["name"], "kafka", "{r}");
        assert_eq!(r["destination"]["ip"], t.server.v4.to_string(), "{r}");
        assert_eq!(r["destination"]["port"], KAFKA_PORT, "{r}");
        assert_eq!(r["policy_revision"], 4, "{r}");
        assert_eq!(r["policy"]["name"], "shop-kafka", "{r}");
        let topics = list_of(r, "topics");
        assert!(
            !topics.iter().all(|t| t == "orders-eu") || !list_of(r, "groups").is_empty(),
            "an allowed request was denied: {r}"
        );
        assert!(
            !list_of(r, "groups").contains(&"billing-eu".to_string()),
            "an allowed group was denied: {r}"
        );
    }
    let find = |what: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        recs.iter()
            .find(|r| pred(r))
            .cloned()
            .unwrap_or_else(|| panic!("no audit record for {what}: {recs:#?}"))
    };
    let client_produce_denial = |topic: &'static str| {
        move |r: &Value| {
            r["kafka"]["client_id"] == "tg-transparent"
                && list_of(r, "topics") == [topic]
                && r["kafka"]["error_code"] == TOPIC_AUTHORIZATION_FAILED
                && (r["kafka"]["api_key"] == "produce" || r["kafka"]["api_key"] == "metadata")
        }
    };
    let r = find("produce payments", &client_produce_denial("payments"));
    assert_eq!(r["reason"], "l7-no-match", "{r}");
    let r = find(
        "produce orders-secret",
        &client_produce_denial("orders-secret"),
    );
    assert_eq!(r["reason"], "l7-deny-rule", "{r}");
    assert_eq!(r["rule"], DENY_RULE, "{r}");
    // `ledger`: Metadata allowed, the Produce request itself denied and answered.
    let r = find("produce ledger", &|r| {
        r["kafka"]["api_key"] == "produce" && list_of(r, "topics") == ["ledger"]
    });
    assert_eq!(r["kafka"]["api_key_id"], 0, "{r}");
    assert_eq!(r["kafka"]["error_code"], TOPIC_AUTHORIZATION_FAILED, "{r}");
    assert_eq!(r["kafka"]["client_id"], "tg-transparent", "{r}");
    assert_eq!(r["reason"], "l7-no-match", "{r}");
    // The plain socket's Metadata v12 for `payments`: exactly that request.
    let r = find("raw metadata payments", &|r| {
        r["kafka"]["correlation_id"] == 1002
    });
    assert_eq!(r["kafka"]["api_key"], "metadata", "{r}");
    assert_eq!(r["kafka"]["api_key_id"], 3, "{r}");
    assert_eq!(r["kafka"]["api_version"], 12, "{r}");
    assert_eq!(list_of(&r, "topics"), ["payments"], "{r}");
    assert_eq!(r["kafka"]["error_code"], TOPIC_AUTHORIZATION_FAILED, "{r}");
    let r = find("group analytics", &|r| {
        list_of(r, "groups") == ["analytics"]
            && r["kafka"]["error_code"] == GROUP_AUTHORIZATION_FAILED
    });
    assert_eq!(r["reason"], "l7-no-match", "{r}");
}
