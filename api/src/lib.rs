//! The gRPC services between tollgate's processes on one node (`proto/tollgate.proto`): the
//! agent streams versioned rule sets to the proxy and gets an ACK/NACK per rule set back
//! (`RuleSets`), the proxy reports the IPs its DNS listeners learned to the agent, which
//! answers once they are in the kernel (`Fqdn`), and the proxy streams audit records to
//! `tollgate observe` (`Observe`). All run over Unix sockets — node-local, guarded by file
//! permissions, no ports to collide.
//!
//! The types are defined here once; the proxy and the agent implement the services.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint, Uri};

/// Generated from `proto/tollgate.proto`.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("tollgate.v1");
}

/// A client channel to the gRPC server on the Unix socket `path` (connected lazily, and
/// reconnected by tonic when the server comes back).
pub fn unix_channel(path: impl Into<PathBuf>) -> Channel {
    // The URI is required by the API and ignored by the connector.
    Endpoint::from_static("http://tollgate.invalid")
        .connect_with_connector_lazy(UnixConnector(path.into()))
}

#[derive(Debug, Clone)]
struct UnixConnector(PathBuf);

impl tower_service::Service<Uri> for UnixConnector {
    type Response = TokioIo<UnixStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(UnixStream::connect(path).await?)) })
    }
}

/// Bind a Unix socket at `path` for a gRPC server, replacing a stale socket file left by an
/// earlier run (a live server on it is an error, not silently replaced).
pub fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("{}: another server is listening there", path.display());
        }
        std::fs::remove_file(path)
            .map_err(|e| anyhow::anyhow!("{}: removing stale socket: {e}", path.display()))?;
    }
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    }
    UnixListener::bind(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The accepted connections of `listener`, as tonic's `serve_with_incoming` takes them.
pub fn incoming(listener: UnixListener) -> tokio_stream::wrappers::UnixListenerStream {
    tokio_stream::wrappers::UnixListenerStream::new(listener)
}

/// A content hash for [`v1::RuleSet::generation`] (FNV-1a 64; never 0, which means "none").
pub fn generation_of(content: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in content.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}
