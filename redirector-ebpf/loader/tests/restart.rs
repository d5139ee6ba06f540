//! Enforcement survives the loader: maps and TCX links are pinned, so when the loader exits the
//! programs stay attached, and a restarted loader reuses the maps (no flush) and swaps the
//! program inside the pinned links atomically. An established TCP connection must keep working
//! through all of it, and the connection tracker's per-flow verdict must survive too.
mod harness;

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use harness::{ENFORCE_BOTH, Topology, entry, in_netns, require_root, spawn_echo_server, tcp_ok};
use tollgate_datapath::{
    Datapath,
    common::{direction, identity, proto, verdict},
};

fn echo(conn: &mut TcpStream, msg: &[u8]) -> bool {
    let mut buf = vec![0u8; msg.len()];
    conn.write_all(msg).is_ok() && conn.read_exact(&mut buf).is_ok() && buf == msg
}

fn program_ids(t: &Topology) -> Vec<u32> {
    let st = tollgate_datapath::status(&t.pin_root).unwrap();
    st.attachments
        .iter()
        .map(|a| {
            assert_eq!(a.programs.len(), 1, "exactly one program per hook: {st}");
            a.programs[0].1
        })
        .collect()
}

#[test]
fn pinned_maps_and_links_survive_loader_restart_with_established_tcp_connection_kept() {
    if !require_root(
        "pinned_maps_and_links_survive_loader_restart_with_established_tcp_connection_kept",
    ) {
        return;
    }
    let t = Topology::new();
    spawn_echo_server(&t.server.netns, 8080);
    let server = SocketAddr::new(IpAddr::V4(t.server.v4), 8080);
    let allow = entry(
        &t.server,
        t.client.identity,
        8080,
        proto::TCP,
        direction::INGRESS,
        verdict::ALLOW,
        0,
    );
    t.in_node(|| {
        let first = {
            let mut dp = t.load_datapath(ENFORCE_BOTH);
            dp.upsert_policy(&[
                allow,
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
            ])
            .unwrap();
            program_ids(&t)
            // `dp` dropped here: the loader "exits".
        };
        let mut conn = in_netns(&t.client.netns, || {
            TcpStream::connect_timeout(&server, Duration::from_secs(2))
        })
        .expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert!(echo(&mut conn, b"before restart"));
        assert_eq!(
            program_ids(&t),
            first,
            "programs stay attached with no loader running"
        );
        assert!(
            !tcp_ok(&t.other.netns, server),
            "still enforcing with no loader running"
        );

        // Restart: a new loader over the same pins.
        let mut dp = Datapath::load(&t.options()).expect("reload");
        for h in t.hosts() {
            dp.attach(&h.host_if).expect("re-attach");
        }
        let second = program_ids(&t);
        assert_eq!(second.len(), first.len());
        assert!(
            second.iter().all(|id| !first.contains(id)),
            "programs replaced: {first:?} -> {second:?}"
        );
        let st = tollgate_datapath::status(&t.pin_root).unwrap();
        let policy = st.maps.iter().find(|m| m.name == "TG_POLICY").unwrap();
        assert_eq!(policy.entries, Some(3), "policy map not flushed: {st}");
        assert!(
            echo(&mut conn, b"after restart"),
            "established connection survives the restart"
        );
        assert!(
            tcp_ok(&t.client.netns, server),
            "new connections still allowed"
        );
        assert!(!tcp_ok(&t.other.netns, server), "and others still denied");

        // Revoking the allow keeps the established flow (per-flow verdict in the pinned
        // tracker) while new connections are refused ...
        dp.remove_policy(&[allow.key]).unwrap();
        assert!(
            echo(&mut conn, b"after revoke"),
            "tracked flow keeps its verdict"
        );
        assert!(
            !tcp_ok(&t.client.netns, server),
            "new connections follow the new policy"
        );
        // ... until the agent flushes the endpoint's flows, which cuts it.
        assert!(dp.flush_flows(t.server.endpoint_id).unwrap() >= 1);
        assert!(
            !echo(&mut conn, b"after flush"),
            "flushed flow is judged again and dropped"
        );
    });
}
