//! Transparent redirect to the proxy on the real kernel: a flow whose policy verdict is
//! `redirect(port)` is assigned (`bpf_sk_assign`) to a transparent listener in the node
//! namespace, and the accepted socket reports the original destination and source. Covers TCP
//! over IPv4 and IPv6, UDP/53 to a DNS listener (with the reply sent back as the original
//! destination), and the fail-closed drop when no listener is there.
mod harness;

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use harness::{
    ENFORCE_BOTH, Topology, entry, in_netns, recv_with_orig_dst, require_root, send_as,
    transparent_tcp_listener, transparent_udp_socket,
};
use tollgate_datapath::{
    RedirectRouting,
    common::{direction, identity, proto, reason, verdict},
};

const PROXY_PORT: u16 = 15001;
const DNS_PROXY_PORT: u16 = 15053;

/// Client egress to the server's identity on `port`/`protocol` is redirected to `proxy_port`;
/// the server's ingress is open so that nothing but the redirect decides.
fn redirect_policy(
    t: &Topology,
    port: u16,
    protocol: u8,
    proxy_port: u16,
) -> tollgate_datapath::Datapath {
    let mut dp = t.load_datapath(ENFORCE_BOTH);
    dp.upsert_policy(&[
        entry(
            &t.client,
            t.server.identity,
            port,
            protocol,
            direction::EGRESS,
            verdict::REDIRECT,
            proxy_port,
        ),
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
            identity::ANY,
            0,
            proto::ANY,
            direction::INGRESS,
            verdict::ALLOW,
            0,
        ),
    ])
    .expect("policy");
    dp.install_redirect_routing(&RedirectRouting::default())
        .expect("routing");
    dp
}

fn tcp_redirect_preserves_original_destination_and_source(
    server_ip: IpAddr,
    client_ip: IpAddr,
    listen: IpAddr,
) {
    let t = Topology::new();
    t.in_node(|| {
        let _dp = redirect_policy(&t, 8080, proto::TCP, PROXY_PORT);
        let listener = transparent_tcp_listener(SocketAddr::new(listen, PROXY_PORT));
        let original = SocketAddr::new(server_ip, 8080);
        std::thread::scope(|s| {
            // Nothing listens on the server: only the proxy can answer.
            let client = s.spawn(|| {
                in_netns(&t.client.netns, || {
                    let mut c = TcpStream::connect_timeout(&original, Duration::from_secs(2))?;
                    c.set_read_timeout(Some(Duration::from_secs(3)))?;
                    c.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                    let mut reply = Vec::new();
                    c.read_to_end(&mut reply)?;
                    Ok::<_, std::io::Error>((c.local_addr()?, reply))
                })
            });
            listener.set_nonblocking(false).unwrap();
            let (mut conn, peer) = listener.accept().expect("proxy accept");
            assert_eq!(
                conn.local_addr().unwrap(),
                original,
                "getsockname must be the original destination"
            );
            assert_eq!(peer.ip(), client_ip, "the peer must be the real client");
            let mut req = [0u8; 18];
            conn.read_exact(&mut req).unwrap();
            assert_eq!(&req, b"GET / HTTP/1.0\r\n\r\n");
            conn.write_all(b"answered by proxy").unwrap();
            drop(conn);
            let (client_local, reply) = client.join().unwrap().expect("client");
            assert_eq!(reply, b"answered by proxy");
            assert_eq!(client_local, peer, "source port preserved end to end");
        });
        let st = tollgate_datapath::status(&t.pin_root).unwrap();
        let redirected = st.counters.iter().find(|c| c.name == "redirected").unwrap();
        assert!(
            redirected.packets >= 3,
            "SYN, ACK and data all go to the proxy: {st}"
        );
    });
}

#[test]
fn tcp_ipv4_redirect_to_transparent_listener_keeps_original_destination_and_source() {
    if !require_root(
        "tcp_ipv4_redirect_to_transparent_listener_keeps_original_destination_and_source",
    ) {
        return;
    }
    tcp_redirect_preserves_original_destination_and_source(
        IpAddr::V4(Ipv4Addr::new(10, 200, 2, 2)),
        IpAddr::V4(Ipv4Addr::new(10, 200, 1, 2)),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    );
}

#[test]
fn tcp_ipv6_redirect_to_transparent_listener_keeps_original_destination_and_source() {
    if !require_root(
        "tcp_ipv6_redirect_to_transparent_listener_keeps_original_destination_and_source",
    ) {
        return;
    }
    tcp_redirect_preserves_original_destination_and_source(
        "fd00:200:2::2".parse().unwrap(),
        "fd00:200:1::2".parse().unwrap(),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    );
}

#[test]
fn udp_dns_redirect_reaches_dns_listener_with_original_destination_and_reply_returns() {
    if !require_root(
        "udp_dns_redirect_reaches_dns_listener_with_original_destination_and_reply_returns",
    ) {
        return;
    }
    let t = Topology::new();
    t.in_node(|| {
        let _dp = redirect_policy(&t, 53, proto::UDP, DNS_PROXY_PORT);
        let dns = transparent_udp_socket(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            DNS_PROXY_PORT,
        ));
        dns.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let original = SocketAddr::new(IpAddr::V4(t.server.v4), 53);
        std::thread::scope(|s| {
            let client = s.spawn(|| {
                in_netns(&t.client.netns, || {
                    let c = UdpSocket::bind("0.0.0.0:0")?;
                    c.set_read_timeout(Some(Duration::from_secs(3)))?;
                    c.send_to(b"\x12\x34query", original)?;
                    let mut buf = [0u8; 64];
                    let (n, from) = c.recv_from(&mut buf)?;
                    Ok::<_, std::io::Error>((c.local_addr()?.port(), buf[..n].to_vec(), from))
                })
            });
            let (payload, src, orig) =
                recv_with_orig_dst(&dns).expect("DNS listener receives the query");
            assert_eq!(payload, b"\x12\x34query");
            assert_eq!(orig, original, "original destination of the datagram");
            assert_eq!(
                src.ip(),
                IpAddr::V4(t.client.v4),
                "source is the real client"
            );
            // Answer as the original destination, as the DNS proxy does.
            send_as(orig, src, b"\x12\x34answer").expect("reply");
            let (client_port, reply, from) =
                client.join().unwrap().expect("client gets the answer");
            assert_eq!(client_port, src.port());
            assert_eq!(reply, b"\x12\x34answer");
            assert_eq!(
                from, original,
                "the answer comes from the address the client asked"
            );
        });
    });
}

#[test]
fn redirect_without_proxy_listener_fails_closed_and_reports_proxy_unavailable() {
    if !require_root("redirect_without_proxy_listener_fails_closed_and_reports_proxy_unavailable") {
        return;
    }
    let t = Topology::new();
    harness::spawn_echo_server(&t.server.netns, 8080);
    t.in_node(|| {
        let mut dp = redirect_policy(&t, 8080, proto::TCP, PROXY_PORT);
        let mut events = dp.take_events().unwrap();
        // No listener on PROXY_PORT: the flow must not leak to the real server.
        let to = SocketAddr::new(IpAddr::V4(t.server.v4), 8080);
        assert!(
            !harness::tcp_ok(&t.client.netns, to),
            "must not bypass the missing proxy"
        );
        let got = events.drain();
        assert!(
            got.iter()
                .any(|e| e.raw.reason == reason::PROXY_UNAVAILABLE && e.raw.dport == 8080),
            "expected a proxy-unavailable event: {got:?}"
        );
    });
}
