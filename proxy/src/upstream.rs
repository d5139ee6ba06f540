//! Connections toward destinations. Behind the datapath, every socket the proxy opens carries
//! the proxy's upstream mark: the kernel program on the destination's interface admits marked
//! flows as already judged (the proxy decided them with both the source's egress and the
//! destination's ingress policy), so the destination's ingress policy need not — and must not —
//! allow the node itself for proxied traffic to arrive. Pods cannot forge the mark: the kernel
//! clears it when a packet crosses network namespaces.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

/// A TCP connection to `addr`, marked with `mark` when given.
pub async fn connect(addr: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(m) = mark {
        socket2::SockRef::from(&sock).set_mark(m)?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A UDP socket bound to the unspecified address of `toward`'s family, marked when asked.
pub fn udp_socket(toward: SocketAddr, mark: Option<u32>) -> io::Result<UdpSocket> {
    let domain = if toward.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
    if let Some(m) = mark {
        sock.set_mark(m)?;
    }
    sock.set_nonblocking(true)?;
    let any: SocketAddr = if toward.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    sock.bind(&any.into())?;
    UdpSocket::from_std(sock.into())
}

/// hyper's connector for the pooled upstream clients, marking each connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct MarkedConnector {
    pub mark: Option<u32>,
}

impl tower_service::Service<Uri> for MarkedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mark = self.mark;
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::other(format!("no host in {uri}")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(80);
            let addr = tokio::net::lookup_host((host.as_str(), port))
                .await?
                .next()
                .ok_or_else(|| io::Error::other(format!("{host} resolves to nothing")))?;
            connect(addr, mark).await.map(TokioIo::new)
        })
    }
}
