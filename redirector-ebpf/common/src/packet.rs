//! Where the headers of a packet are and what the TC programs read from them, written once for
//! the kernel (which reads the packet through [`Bytes`]: straight from the skb's linear data,
//! or with `bpf_skb_load_bytes` when the bytes are not there) and for the unit tests below
//! (which read a byte slice).
//!
//! What is parsed, exactly: Ethernet, then IPv4 (any IHL ≥ 5; the fragment offset decides
//! whether ports are read) or IPv6 with up to [`MAX_IPV6_EXT`] extension headers (hop-by-hop,
//! routing, destination options, fragment) walked to the transport header; after that many, the
//! next header number is taken as the protocol as it stands. TCP and UDP ports come from the
//! first fragment only; ICMPv6 neighbour discovery and multicast listener messages are not
//! flows. Any read past the end of the packet makes the packet unjudged ([`parse`] returns
//! `None`), as does a protocol other than IPv4/IPv6.

use crate::{family, proto};

/// Length of the Ethernet header the programs see on a veth.
pub const ETH_HLEN: usize = 14;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86DD;
/// Extension headers walked at most before the transport header.
pub const MAX_IPV6_EXT: usize = 4;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;

/// The bytes of one packet, starting at its Ethernet header.
pub trait Bytes {
    /// The `N` bytes at `off`, or `None` when the packet is shorter than `off + N`.
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
}

impl Bytes for [u8] {
    #[inline(always)]
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.get(off..off.checked_add(N)?)?.try_into().ok()
    }
}

/// The L3/L4 facts of one packet. Addresses are 16 bytes in network order, IPv4 in the first
/// four; they are kept as four native-endian words of those bytes so the program copies them a
/// word at a time (`u32::from_ne_bytes` of each group of four: [`Headers::saddr_bytes`] turns
/// them back).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Headers {
    /// Source address words.
    pub saddr: [u32; 4],
    /// Destination address words.
    pub daddr: [u32; 4],
    /// Source port (host order; 0 without ports or in a later fragment).
    pub sport: u16,
    /// Destination port (host order).
    pub dport: u16,
    /// IP protocol (IPv6: the header after the walked extension headers).
    pub protocol: u8,
    /// [`family`].
    pub family: u8,
}

impl Headers {
    /// The source address as bytes.
    #[inline(always)]
    pub fn saddr_bytes(&self) -> [u8; 16] {
        words_to_bytes(&self.saddr)
    }

    /// The destination address as bytes.
    #[inline(always)]
    pub fn daddr_bytes(&self) -> [u8; 16] {
        words_to_bytes(&self.daddr)
    }
}

/// Native-endian words of an address back to its bytes.
#[inline(always)]
pub fn words_to_bytes(w: &[u32; 4]) -> [u8; 16] {
    // SAFETY: both are 16 bytes of plain integers; every bit pattern is valid for either. (A
    // transmute, not `to_ne_bytes` per word, so the program stores the address a word at a
    // time instead of byte by byte.)
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(*w) }
}

#[inline(always)]
fn word(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses the headers the datapath judges; `None` means "not a flow we judge" (not IP, an
/// ICMPv6 link message, an IPv4 header with IHL < 5, or a header cut short).
#[inline(always)]
pub fn parse<B: Bytes + ?Sized>(b: &B) -> Option<Headers> {
    let eth_proto = u16::from_be_bytes(b.read::<2>(12)?);
    let mut h = Headers::default();
    let l4: usize;
    let mut first_fragment = true;
    if eth_proto == ETH_P_IP {
        let ip = b.read::<20>(ETH_HLEN)?;
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ihl < 20 {
            return None;
        }
        first_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff == 0;
        h.protocol = ip[9];
        h.saddr[0] = word(&ip, 12);
        h.daddr[0] = word(&ip, 16);
        h.family = family::V4;
        l4 = ETH_HLEN + ihl;
    } else if eth_proto == ETH_P_IPV6 {
        let ip = b.read::<40>(ETH_HLEN)?;
        let mut i = 0;
        while i < 4 {
            h.saddr[i] = word(&ip, 8 + 4 * i);
            h.daddr[i] = word(&ip, 24 + 4 * i);
            i += 1;
        }
        h.family = family::V6;
        let mut next: u8 = ip[6];
        let mut off = ETH_HLEN + 40;
        // Walk (a bounded number of) extension headers to the transport header.
        let mut i = 0;
        while i < MAX_IPV6_EXT {
            match next {
                IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                    let hdr = b.read::<2>(off)?;
                    next = hdr[0];
                    off += (usize::from(hdr[1]) + 1) * 8;
                }
                IPV6_FRAGMENT => {
                    let hdr = b.read::<4>(off)?;
                    next = hdr[0];
                    first_fragment = u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff8 == 0;
                    off += 8;
                }
                _ => break,
            }
            i += 1;
        }
        h.protocol = next;
        l4 = off;
    } else {
        return None;
    }
    if h.protocol == proto::ICMPV6 {
        // Neighbour discovery and multicast listener messages are the link working, not flows:
        // without them no IPv6 flow could be allowed at all.
        let icmp_type = b.read::<1>(l4)?[0];
        if (130..=137).contains(&icmp_type) || icmp_type == 143 {
            return None;
        }
    }
    if first_fragment && (h.protocol == proto::TCP || h.protocol == proto::UDP) {
        let ports = b.read::<4>(l4)?;
        h.sport = u16::from_be_bytes([ports[0], ports[1]]);
        h.dport = u16::from_be_bytes([ports[2], ports[3]]);
    }
    Some(h)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut p = std::vec![0u8; 12];
        p.extend_from_slice(&ethertype.to_be_bytes());
        p
    }

    fn v4(ihl_words: u8, frag: u16, protocol: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = eth(ETH_P_IP);
        let mut ip = std::vec![0u8; usize::from(ihl_words) * 4];
        ip[0] = 0x40 | ihl_words;
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip[9] = protocol;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p.extend_from_slice(&ip);
        p.extend_from_slice(l4);
        p
    }

    const SRC6: [u8; 16] = [0xfd, 0, 2, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const DST6: [u8; 16] = [0xfd, 0, 2, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];

    /// IPv6 with `exts` = (header type, header bytes incl. its next-header/length), then `l4`.
    fn v6(first_next: u8, exts: &[&[u8]], l4: &[u8]) -> Vec<u8> {
        let mut p = eth(ETH_P_IPV6);
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[6] = first_next;
        ip[8..24].copy_from_slice(&SRC6);
        ip[24..40].copy_from_slice(&DST6);
        p.extend_from_slice(&ip);
        for e in exts {
            p.extend_from_slice(e);
        }
        p.extend_from_slice(l4);
        p
    }

    /// An 8-byte hop-by-hop / routing / destination options header followed by `next`.
    fn opt8(next: u8) -> [u8; 8] {
        [next, 0, 0, 0, 0, 0, 0, 0]
    }

    fn frag(next: u8, offset_units: u16) -> [u8; 8] {
        let o = (offset_units << 3).to_be_bytes();
        [next, 0, o[0], o[1], 0, 0, 0, 1]
    }

    const PORTS: [u8; 4] = [0x30, 0x39, 0x1f, 0x90]; // 12345 -> 8080

    #[test]
    fn ipv4_tcp_and_udp_ports_and_addresses() {
        for protocol in [proto::TCP, proto::UDP] {
            let h = parse(&v4(5, 0, protocol, &PORTS)[..]).expect("parsed");
            assert_eq!(h.family, family::V4);
            assert_eq!(h.protocol, protocol);
            assert_eq!((h.sport, h.dport), (12345, 8080));
            assert_eq!(&h.saddr_bytes()[..4], &[10, 0, 0, 1]);
            assert_eq!(&h.daddr_bytes()[..4], &[10, 0, 0, 2]);
            assert_eq!(&h.saddr_bytes()[4..], &[0; 12]);
        }
    }

    #[test]
    fn ipv4_options_move_the_transport_header() {
        // IHL 6: four bytes of options, then the ports.
        let mut l4 = std::vec![0xAA, 0xBB, 0xCC, 0xDD];
        l4.extend_from_slice(&PORTS);
        let mut p = v4(5, 0, proto::TCP, &l4);
        // Read with IHL 5, the option bytes would be taken for the ports ...
        let h = parse(&p[..]).expect("parsed");
        assert_eq!((h.sport, h.dport), (0xAABB, 0xCCDD));
        // ... with IHL 6 they are skipped.
        p[ETH_HLEN] = 0x46;
        let h = parse(&p[..]).expect("parsed");
        assert_eq!((h.sport, h.dport), (12345, 8080));
        let h = parse(&v4(6, 0, proto::TCP, &PORTS)[..]).expect("parsed");
        assert_eq!((h.sport, h.dport), (12345, 8080));
        let h = parse(&v4(15, 0, proto::UDP, &PORTS)[..]).expect("parsed");
        assert_eq!((h.sport, h.dport), (12345, 8080));
    }

    #[test]
    fn ipv4_short_ihl_is_not_judged() {
        for ihl in 0..5 {
            let mut p = v4(5, 0, proto::TCP, &PORTS);
            p[ETH_HLEN] = 0x40 | ihl;
            assert_eq!(parse(&p[..]), None, "ihl {ihl}");
        }
    }

    #[test]
    fn ipv4_later_fragments_carry_no_ports_first_fragment_does() {
        let h = parse(&v4(5, 185, proto::TCP, &PORTS)[..]).expect("parsed");
        assert_eq!((h.protocol, h.sport, h.dport), (proto::TCP, 0, 0));
        // More-fragments set, offset 0: the first fragment, ports read.
        let h = parse(&v4(5, 0x2000, proto::UDP, &PORTS)[..]).expect("parsed");
        assert_eq!((h.sport, h.dport), (12345, 8080));
        // A later fragment needs no transport bytes at all.
        let h = parse(&v4(5, 1, proto::UDP, &[])[..]).expect("parsed");
        assert_eq!((h.sport, h.dport), (0, 0));
    }

    #[test]
    fn ipv4_other_protocols_have_no_ports() {
        let h = parse(&v4(5, 0, proto::ICMP, &[8, 0, 0, 0])[..]).expect("parsed");
        assert_eq!((h.protocol, h.sport, h.dport), (proto::ICMP, 0, 0));
    }

    #[test]
    fn truncated_headers_are_not_judged() {
        let p = v4(5, 0, proto::TCP, &PORTS);
        for len in 0..p.len() {
            assert_eq!(parse(&p[..len]), None, "cut at {len}");
        }
        let p = v6(IPV6_HOPOPTS, &[&opt8(proto::UDP)], &PORTS);
        for len in 0..p.len() {
            assert_eq!(parse(&p[..len]), None, "cut at {len}");
        }
    }

    #[test]
    fn not_ip_is_not_judged() {
        let mut p = eth(0x0806);
        p.extend_from_slice(&[0; 28]);
        assert_eq!(parse(&p[..]), None);
    }

    #[test]
    fn ipv6_ports_and_addresses() {
        let h = parse(&v6(proto::TCP, &[], &PORTS)[..]).expect("parsed");
        assert_eq!(h.family, family::V6);
        assert_eq!(h.protocol, proto::TCP);
        assert_eq!((h.sport, h.dport), (12345, 8080));
        assert_eq!(h.saddr_bytes(), SRC6);
        assert_eq!(h.daddr_bytes(), DST6);
    }

    #[test]
    fn ipv6_extension_headers_are_walked_with_their_lengths() {
        // Hop-by-hop (8 bytes), routing (24 bytes: length field 2), destination options.
        let mut routing = [0u8; 24];
        routing[0] = IPV6_DSTOPTS;
        routing[1] = 2;
        let h = parse(
            &v6(
                IPV6_HOPOPTS,
                &[&opt8(IPV6_ROUTING), &routing, &opt8(proto::UDP)],
                &PORTS,
            )[..],
        )
        .expect("parsed");
        assert_eq!((h.protocol, h.sport, h.dport), (proto::UDP, 12345, 8080));
    }

    #[test]
    fn ipv6_fragments_first_has_ports_later_do_not() {
        let h = parse(&v6(IPV6_FRAGMENT, &[&frag(proto::TCP, 0)], &PORTS)[..]).expect("parsed");
        assert_eq!((h.protocol, h.sport, h.dport), (proto::TCP, 12345, 8080));
        let h = parse(&v6(IPV6_FRAGMENT, &[&frag(proto::TCP, 100)], &[])[..]).expect("parsed");
        assert_eq!((h.protocol, h.sport, h.dport), (proto::TCP, 0, 0));
    }

    #[test]
    fn ipv6_more_than_four_extension_headers_stop_at_the_fifth() {
        // Four walked, the fifth's type is taken as the protocol: no ports.
        let exts: [&[u8]; 5] = [
            &opt8(IPV6_DSTOPTS),
            &opt8(IPV6_DSTOPTS),
            &opt8(IPV6_DSTOPTS),
            &opt8(IPV6_DSTOPTS),
            &opt8(proto::TCP),
        ];
        let h = parse(&v6(IPV6_HOPOPTS, &exts, &PORTS)[..]).expect("parsed");
        assert_eq!((h.protocol, h.sport, h.dport), (IPV6_DSTOPTS, 0, 0));
        // Exactly four: the transport header is reached.
        let h = parse(&v6(IPV6_HOPOPTS, &exts[1..], &PORTS)[..]).expect("parsed");
        assert_eq!((h.protocol, h.sport, h.dport), (proto::TCP, 12345, 8080));
    }

    #[test]
    fn icmpv6_link_messages_are_not_flows_echo_is() {
        for t in [130u8, 133, 134, 135, 136, 137, 143] {
            assert_eq!(
                parse(&v6(proto::ICMPV6, &[], &[t, 0, 0, 0])[..]),
                None,
                "type {t}"
            );
        }
        for t in [128u8, 129, 1, 138, 142, 144] {
            let h = parse(&v6(proto::ICMPV6, &[], &[t, 0, 0, 0])[..]).expect("parsed");
            assert_eq!((h.protocol, h.sport, h.dport), (proto::ICMPV6, 0, 0));
        }
        // Behind an extension header too.
        assert_eq!(
            parse(&v6(IPV6_HOPOPTS, &[&opt8(proto::ICMPV6)], &[135, 0, 0, 0])[..]),
            None
        );
    }
}
