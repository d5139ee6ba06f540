//! Test topology for the datapath: network namespaces `client`, `server`, `other`, each wired by
//! a veth pair to a `node` namespace that stands in for the node's root namespace (routing
//! between them, the loader, the proxy's transparent listeners). Using a node namespace instead
//! of the real root namespace keeps the tests off the machine's own routing and sysctls and lets
//! parallel tests run side by side: every name carries a per-test id.
//!
//! Everything is torn down on drop (namespaces, which takes the veths with them, and the pin
//! directory). Tests need root; without it they print a loud SKIPPED line and return.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::{
    fs::File,
    io::{self, Read, Write},
    mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, RawFd},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::Duration,
};

use tollgate_datapath::{
    Datapath, DatapathOptions, PolicyEntry,
    common::{Config, EndpointInfo, PolicyKey, PolicyValue, endpoint_flags},
};

/// True when the test may run; prints a loud skip line otherwise.
pub fn require_root(test: &str) -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    eprintln!(
        "\n!!!!! SKIPPED {test}: needs root (network namespaces, BPF). CI runs as root; \
         run `sudo -E cargo test -p tollgate-datapath` to exercise it. !!!!!\n"
    );
    false
}

/// Runs `ip args…`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("spawn ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sysctl(netns: &str, keys: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "sysctl", "-qw"])
        .args(keys)
        .output()
        .expect("sysctl");
    assert!(
        out.status.success(),
        "sysctl {keys:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Adds a namespace whose interfaces skip IPv6 duplicate address detection (a tentative
/// link-local address would stall neighbour discovery for the first seconds).
fn add_netns(name: &str) {
    ip(&["netns", "add", name]);
    sysctl(
        name,
        &[
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ],
    );
}

/// One endpoint namespace.
#[derive(Debug, Clone)]
pub struct Host {
    /// Namespace name.
    pub netns: String,
    /// Host-side (node namespace) interface.
    pub host_if: String,
    /// The endpoint's IPv4 address.
    pub v4: Ipv4Addr,
    /// The endpoint's IPv6 address.
    pub v6: Ipv6Addr,
    /// Endpoint id used in policy keys.
    pub endpoint_id: u32,
    /// Security identity.
    pub identity: u32,
}

/// The whole topology.
#[derive(Debug)]
pub struct Topology {
    /// Per-test id.
    pub id: String,
    /// The node namespace.
    pub node: String,
    /// Endpoint namespaces.
    pub client: Host,
    /// Server.
    pub server: Host,
    /// A third party.
    pub other: Host,
    /// Pin directory of this test's datapath.
    pub pin_root: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Topology {
    /// Creates the namespaces, veths, addresses and routes.
    pub fn new() -> Self {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:x}{seq:x}", std::process::id() & 0xffff);
        let node = format!("tg-{id}-node");
        add_netns(&node);
        let topo_hosts =
            [("c", 1u8, 1001u32), ("s", 2, 1002), ("o", 3, 1003)].map(|(tag, n, ident)| {
                let netns = format!("tg-{id}-{tag}");
                let host_if = format!("tg{id}{tag}");
                add_netns(&netns);
                ip(&[
                    "-n", &node, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
                    "netns", &netns,
                ]);
                let gw4 = format!("10.200.{n}.1");
                let gw6 = format!("fd00:200:{n}::1");
                ip(&[
                    "-n",
                    &node,
                    "addr",
                    "add",
                    &format!("{gw4}/24"),
                    "dev",
                    &host_if,
                ]);
                ip(&[
                    "-n",
                    &node,
                    "-6",
                    "addr",
                    "add",
                    &format!("{gw6}/64"),
                    "dev",
                    &host_if,
                    "nodad",
                ]);
                ip(&["-n", &node, "link", "set", &host_if, "up"]);
                ip(&[
                    "-n",
                    &netns,
                    "addr",
                    "add",
                    &format!("10.200.{n}.2/24"),
                    "dev",
                    "eth0",
                ]);
                ip(&[
                    "-n",
                    &netns,
                    "-6",
                    "addr",
                    "add",
                    &format!("fd00:200:{n}::2/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ]);
                ip(&["-n", &netns, "link", "set", "eth0", "up"]);
                ip(&["-n", &netns, "link", "set", "lo", "up"]);
                ip(&["-n", &netns, "route", "add", "default", "via", &gw4]);
                ip(&["-n", &netns, "-6", "route", "add", "default", "via", &gw6]);
                Host {
                    netns,
                    host_if,
                    v4: Ipv4Addr::new(10, 200, n, 2),
                    v6: format!("fd00:200:{n}::2").parse().expect("v6"),
                    endpoint_id: u32::from(n),
                    identity: ident,
                }
            });
        ip(&["-n", &node, "link", "set", "lo", "up"]);
        sysctl(
            &node,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        );
        let [client, server, other] = topo_hosts;
        Self {
            pin_root: PathBuf::from(format!("/sys/fs/bpf/tollgate-test-{id}")),
            id,
            node,
            client,
            server,
            other,
        }
    }

    /// Datapath options for this test (own pin directory).
    pub fn options(&self) -> DatapathOptions {
        DatapathOptions {
            pin_root: self.pin_root.clone(),
            config: Config::default(),
        }
    }

    /// Loads the datapath in the node namespace (call from inside [`Topology::in_node`]),
    /// attaches it to the three endpoints, registers them (with `flags`) and fills the
    /// ipcache with their /32 and /128 addresses.
    pub fn load_datapath(&self, flags: u32) -> Datapath {
        let mut dp = Datapath::load(&self.options()).expect("load datapath");
        for h in self.hosts() {
            dp.attach(&h.host_if).expect("attach");
            dp.upsert_endpoint(
                &h.host_if,
                EndpointInfo {
                    endpoint_id: h.endpoint_id,
                    identity: h.identity,
                    flags,
                },
            )
            .expect("endpoint");
            dp.upsert_ipcache(&[
                (
                    ipnet::IpNet::new(IpAddr::V4(h.v4), 32).expect("net"),
                    h.identity,
                ),
                (
                    ipnet::IpNet::new(IpAddr::V6(h.v6), 128).expect("net"),
                    h.identity,
                ),
            ])
            .expect("ipcache");
        }
        dp
    }

    /// The three endpoints.
    pub fn hosts(&self) -> [&Host; 3] {
        [&self.client, &self.server, &self.other]
    }

    /// Runs `f` on a thread inside the node namespace.
    pub fn in_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.node, f)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = tollgate_datapath::unpin_all(&self.pin_root);
        for ns in [
            &self.client.netns,
            &self.server.netns,
            &self.other.netns,
            &self.node,
        ] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `f` on a fresh thread that has entered network namespace `netns`.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{netns}");
    thread::scope(|s| {
        s.spawn(|| {
            let fd = File::open(&path).expect("open netns");
            // SAFETY: valid fd of a network namespace; affects only this thread.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// A policy entry.
pub fn entry(
    endpoint: &Host,
    remote: u32,
    port: u16,
    protocol: u8,
    direction: u8,
    verdict: u8,
    proxy_port: u16,
) -> PolicyEntry {
    PolicyEntry {
        key: PolicyKey {
            endpoint_id: endpoint.endpoint_id,
            remote_identity: remote,
            port,
            protocol,
            direction,
        },
        value: PolicyValue {
            verdict,
            _pad: 0,
            proxy_port,
        },
    }
}

/// Flags enforcing both directions.
pub const ENFORCE_BOTH: u32 = endpoint_flags::ENFORCE_INGRESS | endpoint_flags::ENFORCE_EGRESS;

/// A TCP echo server in `netns` on `port` (both families), serving until the namespace goes.
pub fn spawn_echo_server(netns: &str, port: u16) {
    // Bind synchronously (so the caller can connect right away), then serve on threads.
    let listeners = in_netns(netns, move || {
        let v4 = TcpListener::bind(("0.0.0.0", port)).expect("bind v4");
        let v6 = bind_v6_only(port);
        (v4, v6)
    });
    for l in [listeners.0, listeners.1] {
        thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { break };
                thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
}

fn bind_v6_only(port: u16) -> TcpListener {
    // SAFETY: plain socket calls on a fresh fd that is wrapped (and so closed) right after.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1);
        set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
        let mut sa: libc::sockaddr_in6 = mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_port = port.to_be();
        let rc = libc::bind(
            fd,
            (&raw const sa).cast(),
            mem::size_of_val(&sa) as libc::socklen_t,
        );
        assert_eq!(rc, 0, "bind [::]:{port}: {}", io::Error::last_os_error());
        assert_eq!(libc::listen(fd, 128), 0);
        TcpListener::from_raw_fd(fd)
    }
}

/// Sets an integer socket option.
///
/// # Safety
/// `fd` must be an open socket.
pub unsafe fn set_int(fd: RawFd, level: i32, name: i32, value: i32) {
    // SAFETY: `value` outlives the call; the caller guarantees `fd`.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt({level}, {name}): {}",
        io::Error::last_os_error()
    );
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&raw mut ss).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&raw mut ss).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn transparent_socket(addr: SocketAddr, ty: i32) -> RawFd {
    let fam = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on a fresh fd.
    unsafe {
        let fd = libc::socket(fam, ty | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
        if addr.is_ipv4() {
            set_int(fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1);
        } else {
            set_int(fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1);
            set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1);
        }
        let (ss, len) = sockaddr(addr);
        let rc = libc::bind(fd, (&raw const ss).cast(), len);
        assert_eq!(rc, 0, "bind {addr}: {}", io::Error::last_os_error());
        fd
    }
}

/// A transparent (`IP_TRANSPARENT`) TCP listener, as the proxy opens it (call inside the node
/// namespace).
pub fn transparent_tcp_listener(addr: SocketAddr) -> TcpListener {
    let fd = transparent_socket(addr, libc::SOCK_STREAM);
    // SAFETY: `fd` is a bound socket we own.
    unsafe {
        assert_eq!(libc::listen(fd, 128), 0);
        TcpListener::from_raw_fd(fd)
    }
}

/// A transparent UDP socket reporting each datagram's original destination
/// (`IP_RECVORIGDSTADDR`), as the proxy's DNS listener opens it.
pub fn transparent_udp_socket(addr: SocketAddr) -> UdpSocket {
    let fd = transparent_socket(addr, libc::SOCK_DGRAM);
    // SAFETY: `fd` is a bound socket we own.
    unsafe {
        if addr.is_ipv4() {
            set_int(fd, libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1);
        } else {
            set_int(fd, libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, 1);
        }
        UdpSocket::from_raw_fd(fd)
    }
}

/// Receives one datagram with its source and original destination.
pub fn recv_with_orig_dst(sock: &UdpSocket) -> io::Result<(Vec<u8>, SocketAddr, SocketAddr)> {
    let mut buf = [0u8; 2048];
    let mut control = [0u8; 256];
    // SAFETY: all-zero is a valid msghdr / sockaddr_storage.
    let mut src: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&raw mut src).cast();
    msg.msg_namelen = mem::size_of_val(&src) as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    // SAFETY: every pointer in `msg` points at live buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut orig = None;
    // SAFETY: walking the control buffer the kernel filled, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            let (level, ty) = ((*c).cmsg_level, (*c).cmsg_type);
            if (level == libc::SOL_IP && ty == libc::IP_ORIGDSTADDR)
                || (level == libc::SOL_IPV6 && ty == libc::IPV6_ORIGDSTADDR)
            {
                orig = Some(from_storage(data.cast()));
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    // SAFETY: the kernel filled `src`.
    let src = unsafe { from_storage((&raw const src).cast()) };
    let orig = orig.ok_or_else(|| io::Error::other("no original-destination cmsg"))?;
    Ok((buf[..n as usize].to_vec(), src, orig))
}

/// # Safety
/// `p` must point at a sockaddr_in or sockaddr_in6.
unsafe fn from_storage(p: *const libc::sockaddr) -> SocketAddr {
    // SAFETY: caller's guarantee; the family tells which layout it is.
    unsafe {
        if i32::from((*p).sa_family) == libc::AF_INET {
            let sin = &*p.cast::<libc::sockaddr_in>();
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes())),
                u16::from_be(sin.sin_port),
            )
        } else {
            let sin6 = &*p.cast::<libc::sockaddr_in6>();
            SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)),
                u16::from_be(sin6.sin6_port),
            )
        }
    }
}

/// Sends `payload` from a transparent UDP socket bound to `from` (a foreign address: the
/// proxy answering as the original destination).
pub fn send_as(from: SocketAddr, to: SocketAddr, payload: &[u8]) -> io::Result<usize> {
    let fd = transparent_socket(from, libc::SOCK_DGRAM);
    // SAFETY: `fd` is a bound socket we own.
    let s = unsafe { UdpSocket::from_raw_fd(fd) };
    s.send_to(payload, to)
}

/// Connects from inside `netns` and exchanges one message; `Ok(reply)` when the echo came back.
pub fn tcp_roundtrip(netns: &str, to: SocketAddr, msg: &'static [u8]) -> io::Result<Vec<u8>> {
    in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(700))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(msg)?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf)?;
        Ok(buf)
    })
}

/// True when a TCP connection from `netns` to `to` is established and echoes.
pub fn tcp_ok(netns: &str, to: SocketAddr) -> bool {
    tcp_roundtrip(netns, to, b"ping").is_ok_and(|r| r == b"ping")
}
