//! Batched UDP I/O (`recvmmsg` / `sendmmsg`): the DNS listener moves many datagrams per
//! system call when it is busy, and exactly one when it is not (a receive returns what is
//! queued, never waits for a batch to fill).

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::SockAddr;

/// Datagrams one call moves at most.
pub const BATCH: usize = 32;
/// A receive buffer: a whole UDP payload always fits, so nothing is cut short.
const DATAGRAM: usize = 65_535;

/// Receive buffers and the source of each datagram of the last [`RecvBatch::recv`].
pub struct RecvBatch {
    bufs: Vec<Box<[u8]>>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
    /// Control-message room per datagram, and the original destination found there (a
    /// transparent socket's redirected datagrams carry one).
    controls: Vec<[u64; CONTROL_WORDS]>,
    origs: Vec<Option<SocketAddr>>,
    n: usize,
}

/// Control buffer per datagram, in 8-byte words (aligned for `cmsghdr`): room for an
/// `IPV6_ORIGDSTADDR` message and then some.
const CONTROL_WORDS: usize = 16;

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch::new()
    }
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").field("n", &self.n).finish()
    }
}

impl RecvBatch {
    pub fn new() -> RecvBatch {
        RecvBatch {
            bufs: (0..BATCH)
                .map(|_| vec![0u8; DATAGRAM].into_boxed_slice())
                .collect(),
            // SAFETY: all-zero is a valid sockaddr_storage.
            addrs: vec![unsafe { mem::zeroed() }; BATCH],
            lens: vec![0; BATCH],
            controls: vec![[0; CONTROL_WORDS]; BATCH],
            origs: vec![None; BATCH],
            n: 0,
        }
    }

    /// One non-blocking `recvmmsg`: how many datagrams arrived (`WouldBlock` when none).
    pub fn recv(&mut self, fd: &impl AsRawFd) -> io::Result<usize> {
        // The headers live on the stack: a receive allocates nothing.
        // SAFETY: all-zero is a valid iovec and mmsghdr.
        let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        for (i, (h, iov)) in hdrs.iter_mut().zip(iovs.iter_mut()).enumerate() {
            *iov = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.bufs[i].len(),
            };
            h.msg_hdr.msg_name = (&raw mut self.addrs[i]).cast();
            h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.controls[i].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = mem::size_of::<[u64; CONTROL_WORDS]>();
        }
        // SAFETY: every header points at live buffers and addresses of the stated sizes.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            self.n = 0;
            return Err(io::Error::last_os_error());
        }
        self.n = n as usize;
        for (i, h) in hdrs.iter().take(self.n).enumerate() {
            self.lens[i] = h.msg_len as usize;
            // Keep the length the kernel wrote for the address.
            if h.msg_hdr.msg_namelen == 0 {
                self.addrs[i].ss_family = libc::AF_UNSPEC as libc::sa_family_t;
            }
            // SAFETY: the kernel filled this header's control buffer (`msg_controllen` now
            // says how much of it).
            self.origs[i] = unsafe { crate::sockets::orig_dst_of(&h.msg_hdr) };
        }
        Ok(self.n)
    }

    /// Datagram `i` of the last receive and its source (`None` for a source that is not IP,
    /// as on a connected socket that reports none).
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        // SAFETY: the kernel filled the address (or it is AF_UNSPEC / zeroed).
        let addr = unsafe { crate::sockets::sockaddr_of(&self.addrs[i]) };
        (&self.bufs[i][..self.lens[i]], addr)
    }

    /// The original destination of datagram `i` (a transparent socket's redirected datagram),
    /// `None` for one addressed to the socket itself.
    pub fn orig_dst(&self, i: usize) -> Option<SocketAddr> {
        self.origs[i]
    }

    /// Datagram `i` of the last receive, to edit in place (an answer gets its client's ID
    /// back without a copy).
    pub fn get_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i][..self.lens[i]]
    }
}

/// Datagrams waiting to go out in one `sendmmsg`: each with its destination, or none on a
/// connected socket. They are copied back to back into one buffer that is kept from batch to
/// batch, so queueing a datagram allocates nothing once the batcher has warmed up.
#[derive(Debug, Default)]
pub struct SendBatch {
    bytes: Vec<u8>,
    msgs: Vec<(std::ops::Range<usize>, Option<SockAddr>)>,
}

impl SendBatch {
    /// Queues a copy of `msg` and gives it back to be edited in place.
    pub fn push(&mut self, msg: &[u8], to: Option<SocketAddr>) -> &mut [u8] {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(msg);
        self.msgs
            .push((start..self.bytes.len(), to.map(SockAddr::from)));
        &mut self.bytes[start..]
    }

    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Sends every datagram with as few `sendmmsg` calls as the kernel allows, waiting for
    /// room when the send buffer is full (as a plain `send_to().await` would); how many went
    /// out. A datagram the kernel refuses (an unreachable destination, a bad address) is
    /// handed to `failed` and dropped.
    pub async fn flush(
        &mut self,
        sock: &tokio::net::UdpSocket,
        mut failed: impl FnMut(&[u8]),
    ) -> usize {
        let mut sent = 0;
        let mut start = 0;
        while start < self.msgs.len() {
            let end = (start + BATCH).min(self.msgs.len());
            let r = sock
                .async_io(tokio::io::Interest::WRITABLE, || {
                    send_chunk(sock, &self.bytes, &self.msgs[start..end])
                })
                .await;
            match r {
                Ok(n) if n > 0 => {
                    sent += n;
                    start += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The first datagram of the chunk cannot go: drop it and go on with the rest.
                _ => {
                    failed(&self.bytes[self.msgs[start].0.clone()]);
                    start += 1;
                }
            }
        }
        self.msgs.clear();
        self.bytes.clear();
        sent
    }
}

/// One non-blocking `sendmmsg` of `chunk` (ranges of `bytes`): how many datagrams the kernel
/// took.
fn send_chunk(
    fd: &impl AsRawFd,
    bytes: &[u8],
    chunk: &[(std::ops::Range<usize>, Option<SockAddr>)],
) -> io::Result<usize> {
    debug_assert!(chunk.len() <= BATCH);
    // SAFETY: all-zero is a valid iovec and mmsghdr.
    let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
    for ((h, iov), (range, to)) in hdrs.iter_mut().zip(iovs.iter_mut()).zip(chunk) {
        let msg = &bytes[range.clone()];
        *iov = libc::iovec {
            // sendmmsg only reads the data.
            iov_base: msg.as_ptr() as *mut libc::c_void,
            iov_len: msg.len(),
        };
        if let Some(a) = to {
            h.msg_hdr.msg_name = a.as_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_namelen = a.len();
        }
        h.msg_hdr.msg_iov = iov;
        h.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every header points at live buffers and addresses of the stated sizes.
    let n = unsafe {
        libc::sendmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr(),
            chunk.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_go_out_and_come_in_whole_with_their_sources() {
        let a = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut out = SendBatch::default();
        for i in 0..40u8 {
            out.push(
                &vec![i; usize::from(i) * 100 + 1],
                Some(b.local_addr().unwrap()),
            );
        }
        assert_eq!(out.flush(&a, |_| panic!("refused")).await, 40);
        assert!(out.is_empty());
        c.send_to(&[7u8; 60_000], b.local_addr().unwrap()).unwrap();
        let mut got = Vec::new();
        let mut rb = RecvBatch::new();
        while got.len() < 41 {
            match rb.recv(&b) {
                Ok(n) => {
                    assert!(n <= BATCH);
                    for i in 0..n {
                        assert_eq!(
                            rb.orig_dst(i),
                            None,
                            "not redirected: no original destination"
                        );
                        let (m, from) = rb.get(i);
                        got.push((m.to_vec(), from.unwrap()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        for (i, (m, from)) in got.iter().take(40).enumerate() {
            assert_eq!(m.len(), i * 100 + 1);
            assert!(m.iter().all(|&x| usize::from(x) == i));
            assert_eq!(*from, a.local_addr().unwrap());
        }
        assert_eq!(got[40].0.len(), 60_000, "a large datagram is not cut");
        assert_eq!(got[40].1, c.local_addr().unwrap());
        assert_eq!(
            rb.recv(&b).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "nothing left: no wait"
        );
    }

    #[tokio::test]
    async fn connected_sockets_send_without_addresses() {
        let a = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).await.unwrap();
        let mut out = SendBatch::default();
        out.push(b"one", None);
        out.push(b"two", None)[0] = b'T';
        assert_eq!(out.flush(&a, |_| panic!("refused")).await, 2);
        let mut buf = [0u8; 16];
        let (n, from) = b.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"one"[..], a.local_addr().unwrap()));
        let (n, _) = b.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"Two", "edited in place after queueing");
    }
}
