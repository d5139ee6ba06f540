//! L3/L4 enforcement on the real kernel: allow and deny by identity and port (IPv4, IPv6, CIDR
//! peers, explicit deny precedence), per-flow verdicts, drop events from the ring buffer and the
//! status read-out. Each test builds its own namespaces (see `harness`), loads the programs into
//! the node namespace and drives real TCP connections through them.
mod harness;

use std::net::{IpAddr, SocketAddr};

use harness::{ENFORCE_BOTH, Topology, entry, require_root, spawn_echo_server, tcp_ok};
use ipnet::IpNet;
use tollgate_datapath::{
    Datapath,
    common::{direction, endpoint_flags, identity, proto, reason, verdict},
};

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Loads the datapath with every endpoint enforcing both directions, egress open for everyone,
/// plus `ingress` entries for the server.
fn datapath_with_server_ingress(
    t: &Topology,
    ingress: &[tollgate_datapath::PolicyEntry],
) -> Datapath {
    let mut dp = t.load_datapath(ENFORCE_BOTH);
    let mut entries = vec![
        entry(
            &t.client,
            identity::ANY,
            0,
            proto::ANY,
            direction::EGRESS,
            verdict::ALLOW,
            0,
        ),
        entry(
            &t.other,
            identity::ANY,
            0,
            proto::ANY,
            direction::EGRESS,
            verdict::ALLOW,
            0,
        ),
    ];
    entries.extend_from_slice(ingress);
    dp.upsert_policy(&entries).expect("policy");
    dp
}

#[test]
fn ipv4_tcp_allowed_for_allowed_identity_and_port_denied_for_other_identity_or_port() {
    if !require_root(
        "ipv4_tcp_allowed_for_allowed_identity_and_port_denied_for_other_identity_or_port",
    ) {
        return;
    }
    let t = Topology::new();
    spawn_echo_server(&t.server.netns, 8080);
    spawn_echo_server(&t.server.netns, 8081);
    // Before any program is attached everything flows (the topology itself works).
    assert!(
        tcp_ok(&t.other.netns, sa(t.server.v4, 8080)),
        "baseline connectivity"
    );
    t.in_node(|| {
        let _dp = datapath_with_server_ingress(
            &t,
            &[entry(
                &t.server,
                t.client.identity,
                8080,
                proto::TCP,
                direction::INGRESS,
                verdict::ALLOW,
                0,
            )],
        );
        assert!(
            tcp_ok(&t.client.netns, sa(t.server.v4, 8080)),
            "client identity on 8080 must pass"
        );
        assert!(
            !tcp_ok(&t.other.netns, sa(t.server.v4, 8080)),
            "other identity on 8080 must be dropped"
        );
        assert!(
            !tcp_ok(&t.client.netns, sa(t.server.v4, 8081)),
            "client identity on 8081 must be dropped"
        );
    });
}

#[test]
fn ipv6_tcp_allowed_by_identity_and_explicit_deny_beats_wildcard_allow() {
    if !require_root("ipv6_tcp_allowed_by_identity_and_explicit_deny_beats_wildcard_allow") {
        return;
    }
    let t = Topology::new();
    spawn_echo_server(&t.server.netns, 8080);
    assert!(
        tcp_ok(&t.client.netns, sa(t.server.v6, 8080)),
        "baseline IPv6 connectivity"
    );
    t.in_node(|| {
        let _dp = datapath_with_server_ingress(
            &t,
            &[
                // Anyone may reach 8080 ...
                entry(
                    &t.server,
                    identity::ANY,
                    8080,
                    proto::TCP,
                    direction::INGRESS,
                    verdict::ALLOW,
                    0,
                ),
                // ... but the other identity is denied on every port: deny wins.
                entry(
                    &t.server,
                    t.other.identity,
                    0,
                    proto::ANY,
                    direction::INGRESS,
                    verdict::DENY,
                    0,
                ),
            ],
        );
        assert!(
            tcp_ok(&t.client.netns, sa(t.server.v6, 8080)),
            "client over IPv6 must pass"
        );
        assert!(
            !tcp_ok(&t.other.netns, sa(t.server.v6, 8080)),
            "explicit deny must win over the wildcard allow"
        );
    });
}

#[test]
fn cidr_peer_identity_resolved_by_longest_prefix_for_ipv4_and_ipv6() {
    if !require_root("cidr_peer_identity_resolved_by_longest_prefix_for_ipv4_and_ipv6") {
        return;
    }
    const CIDR_IDENTITY: u32 = 16_777_300;
    let t = Topology::new();
    spawn_echo_server(&t.server.netns, 9090);
    t.in_node(|| {
        let mut dp = datapath_with_server_ingress(
            &t,
            &[entry(
                &t.server,
                CIDR_IDENTITY,
                9090,
                proto::TCP,
                direction::INGRESS,
                verdict::ALLOW,
                0,
            )],
        );
        // The other host is known only through its prefix (a CIDR peer): drop its /32 and /128.
        let (v4, v6) = (IpAddr::V4(t.other.v4), IpAddr::V6(t.other.v6));
        dp.remove_ipcache(&[IpNet::new(v4, 32).unwrap(), IpNet::new(v6, 128).unwrap()])
            .unwrap();
        assert!(
            !tcp_ok(&t.other.netns, sa(t.server.v4, 9090)),
            "unknown address is world: denied"
        );
        dp.upsert_ipcache(&[
            ("10.200.3.0/24".parse().unwrap(), CIDR_IDENTITY),
            ("fd00:200:3::/64".parse().unwrap(), CIDR_IDENTITY),
            // A wider prefix with another identity must lose to the longer one.
            ("10.200.0.0/16".parse().unwrap(), identity::WORLD),
        ])
        .unwrap();
        assert!(
            tcp_ok(&t.other.netns, sa(t.server.v4, 9090)),
            "IPv4 CIDR peer must pass"
        );
        assert!(
            tcp_ok(&t.other.netns, sa(t.server.v6, 9090)),
            "IPv6 CIDR peer must pass"
        );
        // The client keeps its /32 identity, which the CIDR rule does not cover.
        assert!(
            !tcp_ok(&t.client.netns, sa(t.server.v4, 9090)),
            "client identity is not the CIDR's"
        );
    });
}

#[test]
fn unenforced_endpoint_passes_and_replies_of_allowed_flows_pass_enforced_egress() {
    if !require_root("unenforced_endpoint_passes_and_replies_of_allowed_flows_pass_enforced_egress")
    {
        return;
    }
    let t = Topology::new();
    spawn_echo_server(&t.server.netns, 8080);
    t.in_node(|| {
        // Server enforces both directions and allows nothing outbound: its replies pass only
        // because the connection tracker knows the flow the ingress policy admitted.
        let mut dp =
            t.load_datapath(endpoint_flags::ENFORCE_INGRESS | endpoint_flags::ENFORCE_EGRESS);
        dp.upsert_policy(&[
            entry(
                &t.client,
                identity::ANY,
                0,
                proto::ANY,
                direction::EGRESS,
                verdict::ALLOW,
                0,
            ),
            entry(
                &t.server,
                t.client.identity,
                8080,
                proto::TCP,
                direction::INGRESS,
                verdict::ALLOW,
                0,
            ),
        ])
        .unwrap();
        assert!(
            tcp_ok(&t.client.netns, sa(t.server.v4, 8080)),
            "reply of an admitted flow must pass"
        );
        // The other host's egress is enforced with no entry: its SYN never leaves.
        assert!(
            !tcp_ok(&t.other.netns, sa(t.server.v4, 8080)),
            "default-deny egress"
        );
        // Turning enforcement off for the other host (flags 0) lets its egress out, but the
        // server's ingress still refuses its identity.
        dp.upsert_endpoint(
            &t.other.host_if,
            tollgate_datapath::common::EndpointInfo {
                endpoint_id: t.other.endpoint_id,
                identity: t.other.identity,
                flags: 0,
            },
        )
        .unwrap();
        assert!(
            !tcp_ok(&t.other.netns, sa(t.server.v4, 8080)),
            "server ingress still enforced"
        );
        let st = tollgate_datapath::status(&t.pin_root).unwrap();
        let allowed = st.counters.iter().find(|c| c.name == "allowed").unwrap();
        let denied = st.counters.iter().find(|c| c.name == "denied").unwrap();
        assert!(
            allowed.packets >= 2 && denied.packets >= 2,
            "counters: {st}"
        );
    });
}

#[test]
fn denied_flows_emit_ring_buffer_drop_events_with_identities_ports_and_reason() {
    if !require_root("denied_flows_emit_ring_buffer_drop_events_with_identities_ports_and_reason") {
        return;
    }
    let t = Topology::new();
    spawn_echo_server(&t.server.netns, 8080);
    t.in_node(|| {
        let mut dp = datapath_with_server_ingress(
            &t,
            &[entry(
                &t.server,
                t.other.identity,
                8080,
                proto::TCP,
                direction::INGRESS,
                verdict::DENY,
                0,
            )],
        );
        let mut events = dp.take_events().unwrap();
        assert!(events.drain().is_empty());
        assert!(!tcp_ok(&t.other.netns, sa(t.server.v4, 8080)));
        assert!(!tcp_ok(&t.client.netns, sa(t.server.v6, 8080)));
        let got = events.drain();
        let explicit = got
            .iter()
            .find(|e| e.raw.reason == reason::POLICY_DENY)
            .unwrap_or_else(|| panic!("no policy-deny event in {got:?}"));
        assert_eq!(explicit.src, IpAddr::V4(t.other.v4));
        assert_eq!(explicit.dst, IpAddr::V4(t.server.v4));
        assert_eq!(explicit.raw.dport, 8080);
        assert_ne!(explicit.raw.sport, 0);
        assert_eq!(explicit.raw.src_identity, t.other.identity);
        assert_eq!(explicit.raw.dst_identity, t.server.identity);
        assert_eq!(explicit.raw.endpoint_id, t.server.endpoint_id);
        assert_eq!(explicit.raw.direction, direction::INGRESS);
        assert_eq!(explicit.raw.protocol, proto::TCP);
        let default_deny = got
            .iter()
            .find(|e| e.raw.reason == reason::NO_POLICY)
            .unwrap_or_else(|| panic!("no no-policy event in {got:?}"));
        assert_eq!(default_deny.src, IpAddr::V6(t.client.v6), "{got:#?}");
        assert_eq!(default_deny.raw.src_identity, t.client.identity);
        assert!(
            default_deny.to_string().starts_with("no-policy ingress"),
            "{default_deny}"
        );
    });
}

#[test]
fn status_lists_attached_programs_map_sizes_and_counters() {
    if !require_root("status_lists_attached_programs_map_sizes_and_counters") {
        return;
    }
    let t = Topology::new();
    t.in_node(|| {
        let _dp = datapath_with_server_ingress(&t, &[]);
        let st = tollgate_datapath::status(&t.pin_root).unwrap();
        assert_eq!(st.attachments.len(), 6, "3 interfaces x 2 hooks: {st}");
        let server_in = st
            .attachments
            .iter()
            .find(|a| a.ifname == t.server.host_if && a.hook == "ingress")
            .unwrap();
        assert_eq!(server_in.programs.len(), 1);
        assert!(server_in.programs[0].0.starts_with("tollgate_from"), "{st}");
        let policy = st.maps.iter().find(|m| m.name == "TG_POLICY").unwrap();
        assert_eq!(policy.entries, Some(2));
        let endpoints = st.maps.iter().find(|m| m.name == "TG_ENDPOINTS").unwrap();
        assert_eq!(endpoints.entries, Some(3));
        let text = st.to_string();
        assert!(
            text.contains("attached programs:") && text.contains("counters:"),
            "{text}"
        );
    });
}
