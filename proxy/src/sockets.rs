//! The socket options and the one syscall the transparent listeners need beyond what tokio and
//! socket2 offer: `IP_TRANSPARENT` binds, and `recvmsg` with `IP_ORIGDSTADDR` so that a UDP
//! datagram the datapath assigned with `bpf_sk_assign` tells where it was going.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;

use socket2::{Domain, Socket, Type};

/// A non-blocking `IP_TRANSPARENT` socket bound to `addr` (which may be a foreign address);
/// UDP sockets also report each datagram's original destination when `orig_dst` is set.
/// Needs CAP_NET_ADMIN.
pub fn transparent(addr: SocketAddr, ty: Type, orig_dst: bool) -> io::Result<Socket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, ty, None)?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv4() {
        sock.set_ip_transparent_v4(true)?;
    } else {
        sock.set_ip_transparent_v6(true)?;
    }
    if orig_dst {
        let (level, name) = if addr.is_ipv4() {
            (libc::SOL_IP, libc::IP_RECVORIGDSTADDR)
        } else {
            (libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR)
        };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own with a correctly sized int.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                level,
                name,
                (&raw const one).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock)
}

/// The original destination in the control messages of a received `msg` (`IP_ORIGDSTADDR` /
/// `IPV6_ORIGDSTADDR`, present on a transparent socket for redirected datagrams).
///
/// # Safety
/// `msg.msg_control` must point at the control buffer the kernel filled, `msg_controllen`
/// long.
pub unsafe fn orig_dst_of(msg: &libc::msghdr) -> Option<SocketAddr> {
    let mut orig = None;
    // SAFETY: walking the control buffer the kernel filled, with the libc macros; the data of
    // an ORIGDSTADDR message is a sockaddr_in / sockaddr_in6.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            let (level, ty) = ((*c).cmsg_level, (*c).cmsg_type);
            if (level == libc::SOL_IP && ty == libc::IP_ORIGDSTADDR)
                || (level == libc::SOL_IPV6 && ty == libc::IPV6_ORIGDSTADDR)
            {
                orig = sockaddr(libc::CMSG_DATA(c).cast());
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    orig
}

/// # Safety
/// `p` must point at a sockaddr large enough for its family.
unsafe fn sockaddr(p: *const libc::sockaddr) -> Option<SocketAddr> {
    // SAFETY: caller's guarantee; the family tells which layout it is.
    unsafe {
        match i32::from((*p).sa_family) {
            libc::AF_INET => {
                let sin = &*p.cast::<libc::sockaddr_in>();
                Some(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes())),
                    u16::from_be(sin.sin_port),
                ))
            }
            libc::AF_INET6 => {
                let sin6 = &*p.cast::<libc::sockaddr_in6>();
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                // A v4 client on a dual-stack socket: report it as v4.
                let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
                Some(SocketAddr::new(ip, u16::from_be(sin6.sin6_port)))
            }
            _ => None,
        }
    }
}

/// Receive buffer for the DNS sockets: a burst of small datagrams must not overflow the
/// kernel queue while the proxy is busy (the default, ~208 KiB, holds only a few hundred).
pub const DNS_RCVBUF: usize = 8 << 20;

/// Grows the receive buffer to `bytes`: with `SO_RCVBUFFORCE` when allowed (root), else as far
/// as `net.core.rmem_max` lets `SO_RCVBUF` go.
pub fn grow_receive_buffer(fd: &impl AsRawFd, bytes: usize) {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a live socket with a correctly sized int.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const v).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// Datagrams the kernel dropped on this socket so far (`SO_MEMINFO`, `SK_MEMINFO_DROPS`):
/// a full receive queue must be visible, never a silent loss.
pub fn kernel_drops(fd: &impl AsRawFd) -> Option<u64> {
    const SK_MEMINFO_DROPS: usize = 8;
    let mut info = [0u32; 16];
    let mut len = mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: getsockopt into a buffer of the stated size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    (rc == 0 && len as usize > SK_MEMINFO_DROPS * 4).then(|| u64::from(info[SK_MEMINFO_DROPS]))
}

/// The socket address in `s`, `None` for one that is not IPv4/IPv6 (or unset).
///
/// # Safety
/// `s` must be zeroed or filled by the kernel.
pub(crate) unsafe fn sockaddr_of(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: a sockaddr_storage is large enough for every family.
    unsafe { sockaddr((s as *const libc::sockaddr_storage).cast()) }
}
