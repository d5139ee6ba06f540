//! Non-linear (paged) packets are judged exactly like linear ones. The programs read headers
//! straight from the skb's linear data and fall back to `bpf_skb_load_bytes` for bytes outside
//! it; this test makes the kernel build skbs whose headers are *not* linear and checks that
//! the fallback gives the same verdicts, flows and drop events.
//!
//! How: a packet socket with `PACKET_VNET_HDR` in the client namespace sends whole Ethernet
//! frames of ~4 KiB (the veths get MTU 9000). For such frames `packet_snd` puts only the
//! Ethernet header in the linear part and everything after it in page fragments, so on the
//! client's host-side veth (TC ingress) the IP header, the IPv6 extension header and the ports
//! are all paged. The client's egress policy admits only the allowed port, so that program has
//! to read the paged ports right for the datagram to pass, and the denied one is dropped
//! there, with its ports in the event. (Checked when this was written: making the fallback read
//! two bytes off fails this test at the client's egress.)
mod harness;

use std::{
    io, mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    process::Command,
    time::Duration,
};

use harness::{ENFORCE_BOTH, Host, Topology, entry, in_netns, ip, require_root};
use tollgate_datapath::common::{direction, proto, reason, verdict};

const ALLOWED_PORT: u16 = 9000;
const DENIED_PORT: u16 = 9001;
const SPORT: u16 = 40001;
/// Frame length: large enough that the packet socket allocates a paged skb (its linear part
/// is only the Ethernet header once headroom + frame reach a page).
const FRAME_LEN: usize = 4200;

fn mac_of(netns: &str, ifname: &str) -> [u8; 6] {
    let out = Command::new("ip")
        .args(["-n", netns, "-o", "link", "show", "dev", ifname])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC for {ifname} in {text}"));
    let mut b = [0u8; 6];
    for (i, part) in mac.split(':').enumerate() {
        b[i] = u8::from_str_radix(part, 16).expect("hex");
    }
    b
}

fn checksum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// Ethernet addresses of the frames: the node's side of the client's veth, the client's eth0.
#[derive(Clone, Copy)]
struct Macs {
    dst: [u8; 6],
    src: [u8; 6],
}

/// The Ethernet header of a frame of `FRAME_LEN` bytes.
fn ethernet(macs: Macs, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_LEN);
    f.extend_from_slice(&macs.dst);
    f.extend_from_slice(&macs.src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An Ethernet + IPv4 + UDP frame of `FRAME_LEN` bytes (UDP checksum 0: none, valid for IPv4).
fn v4_frame(macs: Macs, src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut f = ethernet(macs, 0x0800);
    let ip_len = (FRAME_LEN - 14) as u16;
    let mut iph = [0u8; 20];
    iph[0] = 0x45;
    iph[2..4].copy_from_slice(&ip_len.to_be_bytes());
    iph[8] = 64;
    iph[9] = proto::UDP;
    iph[12..16].copy_from_slice(&src.octets());
    iph[16..20].copy_from_slice(&dst.octets());
    let c = checksum_fold(sum16(&iph));
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&iph);
    let udp_len = ip_len - 20;
    f.extend_from_slice(&SPORT.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(FRAME_LEN, b'x');
    f
}

/// An Ethernet + IPv6 + hop-by-hop options (8 bytes of padding) + UDP frame.
fn v6_frame(macs: Macs, src: Ipv6Addr, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    let mut f = ethernet(macs, 0x86DD);
    let payload_len = (FRAME_LEN - 14 - 40) as u16;
    let mut ip6 = [0u8; 40];
    ip6[0] = 0x60;
    ip6[4..6].copy_from_slice(&payload_len.to_be_bytes());
    ip6[6] = 0; // hop-by-hop options next
    ip6[7] = 64;
    ip6[8..24].copy_from_slice(&src.octets());
    ip6[24..40].copy_from_slice(&dst.octets());
    f.extend_from_slice(&ip6);
    // Hop-by-hop: next header UDP, length 0 (8 bytes), PadN of 4 bytes of padding.
    f.extend_from_slice(&[proto::UDP, 0, 1, 4, 0, 0, 0, 0]);
    let udp_len = payload_len - 8;
    let mut udp = Vec::with_capacity(usize::from(udp_len));
    udp.extend_from_slice(&SPORT.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.resize(usize::from(udp_len), b'y');
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&u32::from(udp_len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto::UDP]);
    let c = checksum_fold(sum16(&pseudo) + sum16(&udp));
    let c = if c == 0 { 0xffff } else { c };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

/// Sends `frame` from `eth0` of `netns` through a packet socket with a (zero) virtio-net
/// header, which makes the kernel build a paged skb.
fn send_paged(netns: &str, frame: Vec<u8>) {
    in_netns(netns, move || {
        // SAFETY: plain socket calls on a fd we own and close; buffers outlive the calls.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
            harness::set_int(fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1);
            let ifindex = libc::if_nametoindex(c"eth0".as_ptr());
            assert_ne!(ifindex, 0, "eth0: {}", io::Error::last_os_error());
            let mut sll: libc::sockaddr_ll = mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            sll.sll_protocol = u16::from_be_bytes([frame[12], frame[13]]).to_be();
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&frame[..6]);
            // struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
            // — all zero: no offloads, and no claim about the header length.
            let mut msg = vec![0u8; 10];
            msg.extend_from_slice(&frame);
            let n = libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const sll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            );
            let err = io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(n, msg.len() as isize, "sendto: {err}");
        }
    });
}

fn bind_udp(netns: &str, addr: SocketAddr) -> UdpSocket {
    in_netns(netns, move || {
        let s = UdpSocket::bind(addr).expect("bind udp");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        s
    })
}

fn set_mtu(t: &Topology, h: &Host) {
    ip(&["-n", &t.node, "link", "set", &h.host_if, "mtu", "9000"]);
    ip(&["-n", &h.netns, "link", "set", "eth0", "mtu", "9000"]);
}

#[test]
fn paged_ipv4_and_ipv6_udp_are_judged_like_linear_packets() {
    if !require_root("paged_ipv4_and_ipv6_udp_are_judged_like_linear_packets") {
        return;
    }
    let t = Topology::new();
    set_mtu(&t, &t.client);
    set_mtu(&t, &t.server);
    let macs = Macs {
        dst: mac_of(&t.node, &t.client.host_if),
        src: mac_of(&t.client.netns, "eth0"),
    };
    let rx4 = bind_udp(
        &t.server.netns,
        SocketAddr::new(IpAddr::V4(t.server.v4), ALLOWED_PORT),
    );
    let rx6 = bind_udp(
        &t.server.netns,
        SocketAddr::new(IpAddr::V6(t.server.v6), ALLOWED_PORT),
    );
    t.in_node(|| {
        // Both sides enforce: the client may send UDP to the allowed port only (so its
        // egress program must read the paged ports to pass it), and the server admits the
        // client there only.
        let mut dp = t.load_datapath(ENFORCE_BOTH);
        dp.upsert_policy(&[
            entry(
                &t.client,
                t.server.identity,
                ALLOWED_PORT,
                proto::UDP,
                direction::EGRESS,
                verdict::ALLOW,
                0,
            ),
            entry(
                &t.server,
                t.client.identity,
                ALLOWED_PORT,
                proto::UDP,
                direction::INGRESS,
                verdict::ALLOW,
                0,
            ),
        ])
        .expect("policy");
        let mut events = dp.take_events().expect("events");
        events.drain();

        let frames = [
            (
                v4_frame(macs, t.client.v4, t.server.v4, ALLOWED_PORT),
                v4_frame(macs, t.client.v4, t.server.v4, DENIED_PORT),
                &rx4,
                IpAddr::V4(t.client.v4),
            ),
            (
                v6_frame(macs, t.client.v6, t.server.v6, ALLOWED_PORT),
                v6_frame(macs, t.client.v6, t.server.v6, DENIED_PORT),
                &rx6,
                IpAddr::V6(t.client.v6),
            ),
        ];
        for (allowed, denied, rx, src) in frames {
            send_paged(&t.client.netns, allowed);
            let mut buf = vec![0u8; 9000];
            let (n, from) = rx
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("allowed paged datagram from {src} not delivered: {e}"));
            assert_eq!(from, SocketAddr::new(src, SPORT));
            assert!(n > 4000, "whole datagram: {n} bytes");

            send_paged(&t.client.netns, denied);
            let mut got = Vec::new();
            for _ in 0..20 {
                got.extend(events.drain());
                if !got.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let drop = got
                .iter()
                .find(|e| e.src == src)
                .unwrap_or_else(|| panic!("no drop event for the denied paged datagram: {got:#?}"));
            assert_eq!(drop.raw.reason, reason::NO_POLICY, "{drop}");
            assert_eq!(drop.raw.direction, direction::EGRESS, "{drop}");
            assert_eq!(drop.raw.endpoint_id, t.client.endpoint_id, "{drop}");
            assert_eq!(drop.raw.protocol, proto::UDP, "{drop}");
            assert_eq!(
                (drop.raw.sport, drop.raw.dport),
                (SPORT, DENIED_PORT),
                "{drop}"
            );
            assert_eq!(drop.raw.dst_identity, t.server.identity, "{drop}");
            assert!(rx.recv_from(&mut buf).is_err(), "denied datagram delivered");
        }
        // Judged, not passed untracked: each allowed datagram left one flow at each end
        // (IPv4 and IPv6), keyed with the ports read from the pages.
        assert_eq!(dp.flush_flows(t.client.endpoint_id).expect("flows"), 2);
        assert_eq!(dp.flush_flows(t.server.endpoint_id).expect("flows"), 2);
    });
}
