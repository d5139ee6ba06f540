//! Helper of `bench/datapath/run.sh`: attaches the datapath with a policy of N entries (and
//! detaches it), and drives the TCP connection-rate and request/response-latency measurements
//! that iperf3 does not make. Runs inside the namespaces the script creates.
//!
//! ```text
//! datapath_bench attach NETNS PIN_ROOT ENTRIES CLIENT_IF CLIENT_IP SERVER_IF SERVER_IP [REDIRECT_PORT PROXY_PORT]
//! datapath_bench detach PIN_ROOT
//! datapath_bench serve ADDR                # 1-byte echo server
//! datapath_bench serve-transparent ADDR    # same, IP_TRANSPARENT (the proxy's listener)
//! datapath_bench connrate ADDR SECONDS     # connections/s (connect, 1-byte echo, RST close)
//! datapath_bench rr ADDR COUNT             # 1-byte ping-pong latency on one connection
//! ```
#![allow(
    clippy::print_stdout,
    reason = "a command-line helper prints its results"
)]

use std::{
    io::{Read, Write},
    mem,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tollgate_datapath::{
    Datapath, DatapathOptions, PolicyEntry, RedirectRouting,
    common::{
        EndpointInfo, PolicyKey, PolicyValue, direction, endpoint_flags, identity, proto, verdict,
    },
};

const CLIENT_ID: u32 = 1001;
const SERVER_ID: u32 = 1002;

fn entry(
    ep: u32,
    remote: u32,
    port: u16,
    protocol: u8,
    dir: u8,
    v: u8,
    proxy_port: u16,
) -> PolicyEntry {
    PolicyEntry {
        key: PolicyKey {
            endpoint_id: ep,
            remote_identity: remote,
            port,
            protocol,
            direction: dir,
        },
        value: PolicyValue {
            verdict: v,
            _pad: 0,
            proxy_port,
        },
    }
}

fn attach(args: &[String]) -> Result<()> {
    let [
        netns,
        pin_root,
        entries,
        client_if,
        client_ip,
        server_if,
        server_ip,
        rest @ ..,
    ] = args
    else {
        bail!(
            "attach NETNS PIN_ROOT ENTRIES CLIENT_IF CLIENT_IP SERVER_IF SERVER_IP [REDIRECT_PORT PROXY_PORT]"
        );
    };
    // Enter the node namespace ourselves: `ip netns exec` would also remount /sys and hide the
    // BPF filesystem the pins live on.
    let ns = std::fs::File::open(format!("/run/netns/{netns}")).context("open netns")?;
    // SAFETY: valid namespace fd; the process is single-threaded here.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    let entries: usize = entries.parse().context("ENTRIES")?;
    let opts = DatapathOptions {
        pin_root: pin_root.into(),
        ..DatapathOptions::default()
    };
    let mut dp = Datapath::load(&opts)?;
    let flags = endpoint_flags::ENFORCE_INGRESS | endpoint_flags::ENFORCE_EGRESS;
    for (ifname, ip, ep, id) in [
        (client_if, client_ip, 1, CLIENT_ID),
        (server_if, server_ip, 2, SERVER_ID),
    ] {
        dp.attach(ifname)?;
        dp.upsert_endpoint(
            ifname,
            EndpointInfo {
                endpoint_id: ep,
                identity: id,
                flags,
            },
        )?;
        let ip: IpAddr = ip.parse().context("IP")?;
        dp.upsert_ipcache(&[(
            ipnet::IpNet::new(ip, if ip.is_ipv4() { 32 } else { 128 })?,
            id,
        )])?;
    }
    let mut policy = vec![
        entry(
            1,
            identity::ANY,
            0,
            proto::ANY,
            direction::EGRESS,
            verdict::ALLOW,
            0,
        ),
        entry(
            2,
            CLIENT_ID,
            0,
            proto::ANY,
            direction::INGRESS,
            verdict::ALLOW,
            0,
        ),
    ];
    if let [redirect_port, proxy_port] = rest {
        policy.push(entry(
            1,
            SERVER_ID,
            redirect_port.parse()?,
            proto::TCP,
            direction::EGRESS,
            verdict::REDIRECT,
            proxy_port.parse()?,
        ));
        dp.install_redirect_routing(&RedirectRouting::default())?;
    }
    // Fill up to ENTRIES with entries for other identities and ports, as a real node has.
    let mut i = 0u32;
    while policy.len() < entries {
        let port = u16::try_from(10_000 + i % 50_000)?;
        policy.push(entry(
            2,
            20_000 + i,
            port,
            proto::TCP,
            direction::INGRESS,
            verdict::ALLOW,
            0,
        ));
        i += 1;
    }
    dp.upsert_policy(&policy)?;
    println!("attached, {} policy entries", policy.len());
    Ok(())
}

fn one_byte_echo(mut c: TcpStream) {
    let mut b = [0u8; 1];
    while c.read_exact(&mut b).is_ok() {
        if c.write_all(&b).is_err() {
            break;
        }
    }
}

fn serve(l: &TcpListener) -> Result<()> {
    for c in l.incoming() {
        let c = c?;
        c.set_nodelay(true)?;
        std::thread::spawn(move || one_byte_echo(c));
    }
    Ok(())
}

fn transparent_listener(addr: SocketAddr) -> Result<TcpListener> {
    let fam = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let SocketAddr::V4(v4) = addr else {
        bail!("serve-transparent takes an IPv4 address");
    };
    // SAFETY: plain socket calls on a fresh fd that is wrapped (and so closed) at the end.
    unsafe {
        let fd = libc::socket(fam, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let one: i32 = 1;
        let len = mem::size_of::<i32>() as libc::socklen_t;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            len,
        );
        if libc::setsockopt(
            fd,
            libc::SOL_IP,
            libc::IP_TRANSPARENT,
            (&raw const one).cast(),
            len,
        ) != 0
        {
            return Err(std::io::Error::last_os_error().into());
        }
        let mut sin: libc::sockaddr_in = mem::zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = v4.port().to_be();
        sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
        let sl = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, (&raw const sin).cast(), sl) != 0 || libc::listen(fd, 1024) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(TcpListener::from_raw_fd(fd))
    }
}

fn connrate(addr: SocketAddr, secs: u64) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(secs);
    let mut n = 0u64;
    let start = Instant::now();
    while Instant::now() < end {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        c.set_nodelay(true)?;
        c.write_all(b"x")?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b)?;
        close_with_reset(c);
        n += 1;
    }
    println!("{:.0}", n as f64 / start.elapsed().as_secs_f64());
    Ok(())
}

/// Closes with an RST (SO_LINGER 0) so the client keeps no TIME_WAIT sockets: otherwise the
/// ephemeral port range fills during the first measurement and every later `connect()` pays the
/// kernel's search for a free port, which would be charged to whichever run comes second.
fn close_with_reset(c: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized value.
    unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn rr(addr: SocketAddr, count: usize) -> Result<()> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    c.set_nodelay(true)?;
    let mut samples = Vec::with_capacity(count);
    let mut b = [0u8; 1];
    for _ in 0..count {
        let t = Instant::now();
        c.write_all(b"x")?;
        c.read_exact(&mut b)?;
        samples.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    println!("{mean:.1} {:.1} {:.1}", p(0.5), p(0.99));
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        bail!("usage: datapath_bench attach|detach|serve|serve-transparent|connrate|rr ...");
    };
    match (cmd.as_str(), rest) {
        ("attach", rest) => attach(rest),
        ("detach", [pin_root]) => Ok(tollgate_datapath::unpin_all(Path::new(pin_root))?),
        ("serve", [addr]) => serve(&TcpListener::bind(addr.as_str())?),
        ("serve-transparent", [addr]) => serve(&transparent_listener(addr.parse()?)?),
        ("connrate", [addr, secs]) => connrate(addr.parse()?, secs.parse()?),
        ("rr", [addr, count]) => rr(addr.parse()?, count.parse()?),
        _ => bail!("bad arguments: {args:?}"),
    }
}
