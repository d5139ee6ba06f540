//! DNS without any client configuration, on the real kernel: a client in its own network
//! namespace queries the server's resolver (dnsmasq on the server's address, port 53); the eBPF
//! datapath redirects UDP/53 and TCP/53 with `bpf_sk_assign` to the proxy's transparent DNS
//! listener in the node namespace; the proxy reads each query's original destination, judges
//! the name, forwards allowed queries to that destination and answers *as* that destination.
//! Needs root (skipped loudly otherwise; CI runs as root).

#[path = "../../redirector-ebpf/loader/tests/harness/mod.rs"]
mod harness;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use harness::{ENFORCE_BOTH, Topology, entry, require_root};
use tollgate_datapath::RedirectRouting;
use tollgate_datapath::common::{direction, identity, proto, verdict};
use tollgate_policy::endpoints::Inventory;
use tollgate_policy::load::PolicySet;
use tollgate_proxy::PolicyState;
use tollgate_proxy::audit::{AuditSink, Output};
use tollgate_proxy::dns::{DnsListener, DnsOptions};
use tollgate_proxy::metrics::Metrics;

const DNS_PROXY_PORT: u16 = 15053;

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dig from the client namespace: (status, answer lines).
fn dig(netns: &str, server: &str, args: &[&str]) -> (String, Vec<String>) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "dig", &format!("@{server}")])
        .args(["+noall", "+comments", "+answer", "+tries=1", "+time=3"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("NO-ANSWER")
        .to_string();
    let answers = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    (status, answers)
}

#[test]
fn redirected_dns_is_judged_forwarded_to_the_original_resolver_and_answered_as_it() {
    if !require_root(
        "redirected_dns_is_judged_forwarded_to_the_original_resolver_and_answered_as_it",
    ) {
        return;
    }
    let t = Topology::new();
    let server = t.server.v4.to_string();
    let _dnsmasq = Reaped(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &t.server.netns,
                "dnsmasq",
                "--keep-in-foreground",
            ])
            .args([
                "-C",
                "/dev/null",
                "--port=53",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
            ])
            .args(["--user=root", "--pid-file=", "--local-ttl=60"])
            .arg(format!("--listen-address={server}"))
            .args([
                "--host-record=api.example.com,192.0.2.10",
                "--host-record=evil.example.org,192.0.2.66",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        dig(&t.server.netns, &server, &["api.example.com"]).0 == "NOERROR"
    });
    assert!(up, "dnsmasq did not start");

    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: dns, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: client}}\n  egress:\n  - toEndpoints: [{matchLabels: {app: resolver}}]\n    toPorts:\n    - ports: [{port: \"53\", protocol: ANY}]\n      rules:\n        dns: [{matchPattern: \"*.example.com\"}]\n";
    let mut set = PolicySet::default();
    set.load_str("dns.yaml", policy);
    assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
    let inv = Inventory::from_yaml(&format!(
        "- {{name: client, namespace: prod, labels: {{app: client}}, ips: [{}]}}\n- {{name: resolver, namespace: prod, labels: {{app: resolver}}, ips: [{}]}}\n",
        t.client.v4, t.server.v4
    ))
    .unwrap();
    let state = Arc::new(PolicyState::new(set, inv, 3));
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.jsonl");

    t.in_node(|| {
        let mut dp = t.load_datapath(ENFORCE_BOTH);
        let open = |ep, dir| entry(ep, identity::ANY, 0, proto::ANY, dir, verdict::ALLOW, 0);
        dp.upsert_policy(&[
            // The client's DNS, UDP and TCP, goes to the proxy; everything else is open so
            // that only the redirect and the proxy decide.
            entry(
                &t.client,
                t.server.identity,
                53,
                proto::UDP,
                direction::EGRESS,
                verdict::REDIRECT,
                DNS_PROXY_PORT,
            ),
            entry(
                &t.client,
                t.server.identity,
                53,
                proto::TCP,
                direction::EGRESS,
                verdict::REDIRECT,
                DNS_PROXY_PORT,
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
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = DnsListener::bind_transparent(
                format!("127.0.0.1:{DNS_PROXY_PORT}").parse().unwrap(),
                state.clone(),
                AuditSink::start(Output::File(audit.clone()), 64),
                Arc::new(Metrics::new()),
                DnsOptions::default(),
            )
            .await
            .expect("transparent DNS listener");
            tokio::spawn(l.serve());
            let q = |args: &'static [&'static str]| {
                let (ns, server) = (t.client.netns.clone(), server.clone());
                tokio::task::spawn_blocking(move || dig(&ns, &server, args))
            };
            let (st, ans) = q(&["api.example.com", "A"]).await.unwrap();
            assert_eq!(st, "NOERROR");
            assert_eq!(ans, vec!["api.example.com. 60 IN A 192.0.2.10"]);
            let (st, ans) = q(&["evil.example.org", "A"]).await.unwrap();
            assert_eq!(
                st, "REFUSED",
                "the resolver knows the name; the policy refuses it"
            );
            assert!(ans.is_empty());
            let (st, ans) = q(&["+tcp", "api.example.com", "A"]).await.unwrap();
            assert_eq!(
                (st.as_str(), ans.len()),
                ("NOERROR", 1),
                "TCP/53 redirected too"
            );
            let (st, _) = q(&["+tcp", "evil.example.org", "A"]).await.unwrap();
            assert_eq!(st, "REFUSED");
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        let st = tollgate_datapath::status(&t.pin_root).unwrap();
        let redirected = st.counters.iter().find(|c| c.name == "redirected").unwrap();
        assert!(
            redirected.packets > 0,
            "the queries went through the redirect: {st}"
        );
    });
    assert_eq!(
        state.fqdn.names_of("192.0.2.10".parse().unwrap()),
        vec!["api.example.com."],
        "learned from the redirected answer"
    );
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 2, "{recs:?}");
    for (r, transport) in recs.iter().zip(["udp", "tcp"]) {
        assert_eq!(r["source"]["name"], "client");
        assert_eq!(r["source"]["ip"], t.client.v4.to_string());
        assert_eq!(
            r["destination"]["name"], "resolver",
            "from the original destination"
        );
        assert_eq!(r["destination"]["ip"], t.server.v4.to_string());
        assert_eq!(r["destination"]["port"], 53);
        assert_eq!(r["dns"]["qname"], "evil.example.org.");
        assert_eq!(r["dns"]["transport"], transport);
    }
}
