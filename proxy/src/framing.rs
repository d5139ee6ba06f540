//! Request-smuggling defence: every byte a client sends on an L7 connection passes through
//! [`RequestFramer`] before hyper sees it. The first request whose framing is ambiguous
//! (`Content-Length` with `Transfer-Encoding`, conflicting lengths, a final coding other than
//! `chunked`, a malformed chunk) is never handed to hyper: the guard delivers the bytes of the
//! requests before it, then a request head hyper itself answers `400 Bad Request` and closes
//! on, then end of stream. So the 400 is written in order after earlier responses, nothing of
//! the ambiguous request is forwarded, and the rejection is audited through `on_reject`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tollgate_parsers::http1::{FramingError, RequestFramer};

/// A head hyper rejects with `400` (an invalid `Content-Length`), closing the connection.
const POISON: &[u8] = b"GET / HTTP/1.1\r\ncontent-length: rejected\r\n\r\n";

type OnReject = Box<dyn FnOnce(FramingError) + Send + Sync>;

pub struct FramingGuard<T> {
    inner: T,
    framer: RequestFramer,
    /// `None` while open; then how much of [`POISON`] was delivered.
    poisoned: Option<usize>,
    on_reject: Option<OnReject>,
}

impl<T> std::fmt::Debug for FramingGuard<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FramingGuard")
            .field("framer", &self.framer)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl<T> FramingGuard<T> {
    pub fn new(inner: T, on_reject: impl FnOnce(FramingError) + Send + Sync + 'static) -> Self {
        FramingGuard {
            inner,
            framer: RequestFramer::new(),
            poisoned: None,
            on_reject: Some(Box::new(on_reject)),
        }
    }
}

fn deliver_poison(pos: &mut usize, buf: &mut ReadBuf<'_>) {
    let n = (POISON.len() - *pos).min(buf.remaining());
    buf.put_slice(&POISON[*pos..*pos + n]);
    *pos += n;
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(pos) = &mut this.poisoned {
            // The poison head, then end of stream.
            deliver_poison(pos, buf);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.framer.is_passthrough() {
            return Poll::Ready(Ok(()));
        }
        let fed = this.framer.feed(&buf.filled()[before..]);
        if let Err(rejected) = fed {
            buf.set_filled(before + rejected.at);
            let mut pos = 0;
            if rejected.at == 0 {
                // Nothing of this read may go through; an empty read would mean end of stream.
                deliver_poison(&mut pos, buf);
            }
            this.poisoned = Some(pos);
            if let Some(f) = this.on_reject.take() {
                f(rejected.error);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
