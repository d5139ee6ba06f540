//! The kernel's route to an address: one netlink `RTM_GETROUTE` request (what `ip route get
//! ADDR` sends), answered from the calling thread's network namespace.
//!
//! This is how `tollgate up --kubernetes` finds a local pod's host-side interface without
//! knowing the CNI: every CNI that gives a pod its own veth (Calico, Cilium's veth mode, the
//! bridge-less setups of AWS VPC CNI, kube-router, ptp) leaves a route to the pod's IP through
//! it, because that is how the node delivers the pod's traffic. A small request over a
//! `NETLINK_ROUTE` socket through `libc` is all it takes; the netlink crates (rtnetlink,
//! netlink-packet-route) would bring an async stack and a few thousand lines of message types
//! for this one message.

use std::io;
use std::net::IpAddr;

/// What the kernel answered for one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The output interface.
    pub ifindex: u32,
    /// Its name (in the calling thread's namespace).
    pub ifname: String,
    /// The next hop, when the address is not on the link.
    pub gateway: Option<IpAddr>,
    /// `rtm_type`: `RTN_UNICAST`, `RTN_LOCAL` (an address of this host), …
    pub kind: u8,
    /// The routing table the answer came from.
    pub table: u32,
}

/// `rtm_type` of a unicast route.
pub const RTN_UNICAST: u8 = 1;
/// `rtm_type` of an address of this host.
pub const RTN_LOCAL: u8 = 2;

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u8 = 254;
const NLMSG_HDR: usize = 16;
const RTMSG: usize = 12;

/// Round `n` up to netlink's 4-byte alignment.
fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// The `RTM_GETROUTE` request for `ip` (sequence number `seq`).
fn request(ip: IpAddr, seq: u32) -> Vec<u8> {
    let (family, addr) = match ip {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let attr_len = 4 + addr.len();
    let len = NLMSG_HDR + RTMSG + align(attr_len);
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let bits = (addr.len() * 8) as u8;
    m.extend_from_slice(&[family, bits, 0, 0, RT_TABLE_MAIN, 0, 0, 0]);
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&RTA_DST.to_ne_bytes());
    m.extend_from_slice(&addr);
    m.resize(len, 0);
    m
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn ip_of(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

/// Parse the kernel's answer to request `seq`: the route (its name not filled in), the error
/// the kernel gave, or `None` when `buf` holds no answer to `seq`.
fn parse(buf: &[u8], seq: u32) -> io::Result<Option<Route>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"));
    let mut at = 0;
    while at + NLMSG_HDR <= buf.len() {
        let len = u32_at(buf, at).ok_or_else(|| bad("short header"))? as usize;
        let ty = u16_at(buf, at + 4).ok_or_else(|| bad("short header"))?;
        let msg_seq = u32_at(buf, at + 8).ok_or_else(|| bad("short header"))?;
        if len < NLMSG_HDR || at + len > buf.len() {
            return Err(bad("message length out of bounds"));
        }
        let msg = &buf[at..at + len];
        at += align(len);
        if msg_seq != seq {
            continue;
        }
        match ty {
            NLMSG_ERROR => {
                let code = u32_at(msg, NLMSG_HDR).ok_or_else(|| bad("short error"))? as i32;
                return Err(if code == 0 {
                    bad("an acknowledgement instead of a route")
                } else {
                    io::Error::from_raw_os_error(-code)
                });
            }
            RTM_NEWROUTE => {
                let rtm = msg
                    .get(NLMSG_HDR..NLMSG_HDR + RTMSG)
                    .ok_or_else(|| bad("short rtmsg"))?;
                let mut route = Route {
                    ifindex: 0,
                    ifname: String::new(),
                    gateway: None,
                    kind: rtm[7],
                    table: u32::from(rtm[4]),
                };
                let mut a = NLMSG_HDR + RTMSG;
                while a + 4 <= msg.len() {
                    let alen = usize::from(u16_at(msg, a).unwrap_or(0));
                    let aty = u16_at(msg, a + 2).unwrap_or(0);
                    if alen < 4 || a + alen > msg.len() {
                        return Err(bad("attribute length out of bounds"));
                    }
                    let data = &msg[a + 4..a + alen];
                    match aty {
                        RTA_OIF => route.ifindex = u32_at(data, 0).unwrap_or(0),
                        RTA_GATEWAY => route.gateway = ip_of(data),
                        RTA_TABLE => route.table = u32_at(data, 0).unwrap_or(route.table),
                        _ => {}
                    }
                    a += align(alen);
                }
                return Ok(Some(route));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// The name of interface `ifindex` in the calling thread's namespace.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname writes at most.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The index of interface `name` in the calling thread's namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string; the call has no other preconditions.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// A netlink socket closed on drop.
struct Socket(libc::c_int);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

/// The kernel's route to `ip` (see the module docs). Bounded: the answer is waited for at most
/// one second.
pub fn route_to(ip: IpAddr) -> io::Result<Route> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: plain socket call; the descriptor is owned by `Socket` right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let sock = Socket(fd);
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: `timeout` outlives the call and has the size given.
    let rc = unsafe {
        libc::setsockopt(
            sock.0,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let req = request(ip, seq);
    // SAFETY: all-zero is a valid sockaddr_nl (pid 0: the kernel).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `req` and `kernel` are live for the call, with the lengths given.
    let sent = unsafe {
        libc::sendto(
            sock.0,
            req.as_ptr().cast(),
            req.len(),
            0,
            (&raw const kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    // A few reads at most: the answer is one message, anything else is skipped.
    for _ in 0..4 {
        // SAFETY: `buf` is live and writable for its length.
        let n = unsafe { libc::recv(sock.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        match parse(&buf[..n as usize], seq)? {
            None => continue,
            Some(mut route) => {
                route.ifname = ifname(route.ifindex).ok_or_else(|| {
                    io::Error::other(format!("interface {} has no name", route.ifindex))
                })?;
                return Ok(route);
            }
        }
    }
    Err(io::Error::other("no answer to the route request"))
}

#[cfg(test)]
#[path = "../../redirector-ebpf/loader/tests/harness/mod.rs"]
mod harness;

#[cfg(test)]
mod tests {
    use super::*;
    use harness::{in_netns, ip, require_root};

    #[test]
    fn requests_and_answers_are_framed_as_the_kernel_does() {
        let req = request("10.1.2.3".parse().unwrap(), 7);
        assert_eq!(req.len(), 16 + 12 + 8);
        assert_eq!(u32_at(&req, 0), Some(36));
        assert_eq!(u16_at(&req, 4), Some(RTM_GETROUTE));
        assert_eq!(&req[32..36], &[10, 1, 2, 3]);
        let v6 = request("fd00::1".parse().unwrap(), 8);
        assert_eq!(v6.len(), 16 + 12 + 20);
        // An error answer (ENETUNREACH) to request 7, after an unrelated message.
        let mut answer = Vec::new();
        for (seq, code) in [(3u32, -libc::EPERM), (7, -libc::ENETUNREACH)] {
            answer.extend_from_slice(&36u32.to_ne_bytes());
            answer.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            answer.extend_from_slice(&0u16.to_ne_bytes());
            answer.extend_from_slice(&seq.to_ne_bytes());
            answer.extend_from_slice(&0u32.to_ne_bytes());
            answer.extend_from_slice(&code.to_ne_bytes());
            answer.extend_from_slice(&[0; 16]);
        }
        let e = parse(&answer, 7).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENETUNREACH));
        assert!(parse(&answer[..20], 7).is_err(), "a truncated answer");
        assert!(parse(&answer[..36], 7).unwrap().is_none(), "no answer to 7");
    }

    #[test]
    fn the_route_to_a_veth_peer_leads_to_its_host_side() {
        if !require_root("the_route_to_a_veth_peer_leads_to_its_host_side") {
            return;
        }
        let id = format!("{:x}", std::process::id() & 0xffff);
        let (node, pod) = (format!("tgrt-{id}-node"), format!("tgrt-{id}-pod"));
        struct Gone(Vec<String>);
        impl Drop for Gone {
            fn drop(&mut self) {
                for ns in &self.0 {
                    let _ = std::process::Command::new("ip")
                        .args(["netns", "del", ns])
                        .output();
                }
            }
        }
        let _gone = Gone(vec![node.clone(), pod.clone()]);
        let host_if = format!("tgrt{id}h");
        ip(&["netns", "add", &node]);
        ip(&["netns", "add", &pod]);
        ip(&[
            "-n", &node, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns",
            &pod,
        ]);
        ip(&["-n", &node, "addr", "add", "10.77.0.1/24", "dev", &host_if]);
        ip(&[
            "-n",
            &node,
            "-6",
            "addr",
            "add",
            "fd00:77::1/64",
            "dev",
            &host_if,
            "nodad",
        ]);
        ip(&["-n", &node, "link", "set", &host_if, "up"]);
        ip(&["-n", &pod, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &node,
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            "10.77.0.2",
        ]);
        in_netns(&node, || {
            let want = ifindex(&host_if).expect("the host side exists");
            for peer in ["10.77.0.2", "fd00:77::2"] {
                let r = route_to(peer.parse().unwrap()).unwrap();
                assert_eq!((r.ifindex, r.ifname.as_str()), (want, host_if.as_str()));
                assert_eq!((r.kind, r.gateway, r.table), (RTN_UNICAST, None, 254));
            }
            let own = route_to("10.77.0.1".parse().unwrap()).unwrap();
            assert_eq!(own.kind, RTN_LOCAL, "{own:?}");
            let routed = route_to("198.51.100.7".parse().unwrap()).unwrap();
            assert_eq!(routed.gateway, Some("10.77.0.2".parse().unwrap()));
            let none = route_to("192.0.2.1".parse().unwrap()).unwrap_err();
            assert_eq!(none.raw_os_error(), Some(libc::ENETUNREACH), "{none}");
        });
    }
}
