//! HTTP/1.1 request framing, sans-IO: where each request on a connection starts and ends, and
//! whether its head says so unambiguously.
//!
//! Why: request smuggling lives in framing disagreements between two HTTP/1 parsers — a
//! request carrying both `Content-Length` and `Transfer-Encoding`, two different
//! `Content-Length`s, a `Transfer-Encoding` whose last coding is not `chunked`, a malformed
//! chunk size. RFC 9112 §6.1 lets a server reject such a message, and a policy proxy must:
//! whatever the next hop would make of it, policy judged something else. The proxy feeds every
//! byte a client sends through a [`RequestFramer`] before its HTTP library sees it; the first
//! request whose framing is ambiguous is answered `400` and never forwarded.
//!
//! The framer only frames: it follows heads, fixed-length bodies and chunked bodies (sizes,
//! extensions, trailers) with bounded state, and stops looking (passthrough) once a connection
//! stops being HTTP/1 — after `CONNECT` or an `Upgrade` request, or an HTTP/2 preface.

/// Largest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest chunk-size line (size, extensions) accepted.
pub const MAX_CHUNK_LINE: usize = 4096;
const MAX_HEADERS: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramingError {
    /// Both `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.1: smuggling vector).
    LengthAndTransferEncoding,
    /// `Content-Length` values that differ, or one that is not a decimal number.
    InvalidContentLength,
    /// A `Transfer-Encoding` whose final coding is not `chunked`.
    TransferEncodingNotChunked,
    /// A chunk size line that is not hex digits (plus extensions) and CRLF.
    InvalidChunk,
    /// The head is not valid HTTP/1 (httparse's reason).
    InvalidHead(&'static str),
    HeadTooLarge,
}

impl std::fmt::Display for FramingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FramingError::LengthAndTransferEncoding => {
                write!(f, "both Content-Length and Transfer-Encoding")
            }
            FramingError::InvalidContentLength => {
                write!(f, "invalid or conflicting Content-Length")
            }
            FramingError::TransferEncodingNotChunked => {
                write!(f, "Transfer-Encoding whose final coding is not chunked")
            }
            FramingError::InvalidChunk => write!(f, "malformed chunk size line"),
            FramingError::InvalidHead(why) => write!(f, "malformed request head: {why}"),
            FramingError::HeadTooLarge => write!(f, "request head larger than {MAX_HEAD} bytes"),
        }
    }
}

impl std::error::Error for FramingError {}

/// The first byte of a request whose framing was rejected, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Offset, in the bytes passed to the [`RequestFramer::feed`] call that found it, of the
    /// start of the rejected request's head (bytes before it belong to earlier requests).
    pub at: usize,
    pub error: FramingError,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Collecting a head; `buf` holds its bytes so far.
    Head,
    /// `n` body bytes left.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// `n` bytes of chunk data left, then CRLF.
    ChunkData(u64),
    /// The CRLF after chunk data: how many of its two bytes were seen.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk, until an empty line.
    Trailers,
    /// Not HTTP/1 any more (tunnel, upgrade, HTTP/2): bytes are not looked at.
    Passthrough,
    /// A request was rejected; nothing after it is framed.
    Failed,
}

/// Follows the requests of one client connection.
#[derive(Debug, Clone)]
pub struct RequestFramer {
    state: State,
    /// Bytes of the current head (or chunk-size / trailer line).
    buf: Vec<u8>,
    /// Offset of the current head's first byte within the current `feed` call (0 when the head
    /// began in an earlier call).
    head_start: usize,
    requests: u64,
}

impl Default for RequestFramer {
    fn default() -> Self {
        RequestFramer::new()
    }
}

/// The first "head" of an HTTP/2 connection's preface.
const H2_PREFACE_HEAD: &[u8] = b"PRI * HTTP/2.0\r\n";

impl RequestFramer {
    pub fn new() -> RequestFramer {
        RequestFramer {
            state: State::Head,
            buf: Vec::new(),
            head_start: 0,
            requests: 0,
        }
    }

    /// Complete request heads seen so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// True once the connection is no longer followed (tunnel, upgrade or HTTP/2).
    pub fn is_passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    /// Follow `data`, the next bytes the client sent. `Err` names the first rejected request;
    /// the framer then stays failed.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), Rejected> {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Passthrough => return Ok(()),
                State::Failed => {
                    return Err(Rejected {
                        at: 0,
                        error: FramingError::InvalidHead("earlier request rejected"),
                    });
                }
                State::Head => {
                    if self.buf.is_empty() {
                        // Tolerate empty lines between requests (RFC 9112 §2.2).
                        if data[i] == b'\r' || data[i] == b'\n' {
                            i += 1;
                            continue;
                        }
                        self.head_start = i;
                    }
                    let found = find_head_end(&self.buf, &data[i..]);
                    let take = found.unwrap_or(data.len() - i);
                    if self.buf.len() + take > MAX_HEAD {
                        return self.fail(FramingError::HeadTooLarge);
                    }
                    self.buf.extend_from_slice(&data[i..i + take]);
                    i += take;
                    if found.is_none() {
                        return Ok(());
                    }
                    let head = std::mem::take(&mut self.buf);
                    match frame_head(&head) {
                        Ok(next) => {
                            self.requests += 1;
                            self.state = next;
                        }
                        Err(e) => return self.fail(e),
                    }
                }
                State::Body(n) => {
                    let take = (data.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    i += take;
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Body(left)
                    };
                }
                State::ChunkSize | State::Trailers => {
                    let Some(pos) = data[i..].iter().position(|b| *b == b'\n') else {
                        self.buf.extend_from_slice(&data[i..]);
                        if self.buf.len() > MAX_CHUNK_LINE {
                            return self.fail(FramingError::InvalidChunk);
                        }
                        return Ok(());
                    };
                    self.buf.extend_from_slice(&data[i..i + pos + 1]);
                    i += pos + 1;
                    if self.buf.len() > MAX_CHUNK_LINE {
                        return self.fail(FramingError::InvalidChunk);
                    }
                    let line = std::mem::take(&mut self.buf);
                    let Some(line) = line.strip_suffix(b"\r\n") else {
                        return self.fail(FramingError::InvalidChunk);
                    };
                    if self.state == State::Trailers {
                        if line.is_empty() {
                            self.state = State::Head;
                        }
                        continue;
                    }
                    match chunk_size(line) {
                        Some(0) => self.state = State::Trailers,
                        Some(n) => self.state = State::ChunkData(n),
                        None => return self.fail(FramingError::InvalidChunk),
                    }
                }
                State::ChunkData(n) => {
                    let take = (data.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    i += take;
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::ChunkEnd(0)
                    } else {
                        State::ChunkData(left)
                    };
                }
                State::ChunkEnd(seen) => {
                    let want = if seen == 0 { b'\r' } else { b'\n' };
                    if data[i] != want {
                        return self.fail(FramingError::InvalidChunk);
                    }
                    i += 1;
                    self.state = if seen == 0 {
                        State::ChunkEnd(1)
                    } else {
                        State::ChunkSize
                    };
                }
            }
        }
        // A head that continues into the next call starts at its beginning.
        self.head_start = 0;
        Ok(())
    }

    fn fail(&mut self, error: FramingError) -> Result<(), Rejected> {
        let at = self.head_start;
        self.state = State::Failed;
        self.buf.clear();
        Err(Rejected { at, error })
    }
}

/// Where the head ends in `more`, given the head bytes `so_far`: the index in `more` just
/// after the blank line.
fn find_head_end(so_far: &[u8], more: &[u8]) -> Option<usize> {
    // The terminator may straddle the two slices: look at the last 3 bytes of `so_far` too.
    let tail = &so_far[so_far.len().saturating_sub(3)..];
    let mut window: Vec<u8> = tail.to_vec();
    for (j, b) in more.iter().enumerate() {
        window.push(*b);
        let w = window.len();
        if (w >= 4 && &window[w - 4..] == b"\r\n\r\n") || (w >= 2 && &window[w - 2..] == b"\n\n") {
            return Some(j + 1);
        }
        if window.len() > 8 {
            window.drain(..window.len() - 4);
        }
    }
    None
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let size = line.split(|b| *b == b';').next()?;
    let size = size.strip_suffix(b" ").unwrap_or(size);
    if size.is_empty() || size.len() > 16 || !size.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(size).ok()?, 16).ok()
}

/// Frame one complete head: what follows it.
fn frame_head(head: &[u8]) -> Result<State, FramingError> {
    if head.starts_with(H2_PREFACE_HEAD) {
        // HTTP/2 with prior knowledge: not HTTP/1 from here on.
        return Ok(State::Passthrough);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(FramingError::InvalidHead("incomplete")),
        Err(e) => {
            return Err(FramingError::InvalidHead(match e {
                httparse::Error::HeaderName => "invalid header name",
                httparse::Error::HeaderValue => "invalid header value",
                httparse::Error::NewLine => "invalid line ending",
                httparse::Error::Status => "invalid status",
                httparse::Error::Token => "invalid token",
                httparse::Error::TooManyHeaders => "too many headers",
                httparse::Error::Version => "invalid HTTP version",
            }));
        }
    }
    let method = req.method.unwrap_or("");
    let mut length: Option<u64> = None;
    let mut te: Option<Vec<u8>> = None;
    let mut upgrade = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            // A list (`5, 5`) is allowed only when every member is the same number.
            for part in h.value.split(|b| *b == b',') {
                let part = part.trim_ascii();
                if part.is_empty() || !part.iter().all(u8::is_ascii_digit) || part.len() > 19 {
                    return Err(FramingError::InvalidContentLength);
                }
                let n: u64 = std::str::from_utf8(part)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or(FramingError::InvalidContentLength)?;
                if length.is_some_and(|l| l != n) {
                    return Err(FramingError::InvalidContentLength);
                }
                length = Some(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let t = te.get_or_insert_with(Vec::new);
            if !t.is_empty() {
                t.push(b',');
            }
            t.extend_from_slice(h.value);
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if let Some(te) = &te {
        if length.is_some() {
            return Err(FramingError::LengthAndTransferEncoding);
        }
        let last = te
            .split(|b| *b == b',')
            .map(<[u8]>::trim_ascii)
            .rfind(|c| !c.is_empty())
            .unwrap_or(b"");
        if !last.eq_ignore_ascii_case(b"chunked") {
            return Err(FramingError::TransferEncodingNotChunked);
        }
    }
    if method.eq_ignore_ascii_case("CONNECT") || upgrade {
        // Beyond this request the bytes may be a tunnel: stop following (hyper decides whether
        // the upgrade happens; a refused one closes the connection).
        return Ok(State::Passthrough);
    }
    Ok(match (te, length) {
        (Some(_), _) => State::ChunkSize,
        (None, Some(0)) | (None, None) => State::Head,
        (None, Some(n)) => State::Body(n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(parts: &[&[u8]]) -> (RequestFramer, Result<(), Rejected>) {
        let mut f = RequestFramer::new();
        for p in parts {
            if let Err(e) = f.feed(p) {
                return (f, Err(e));
            }
        }
        (f, Ok(()))
    }

    #[test]
    fn keep_alive_requests_with_length_and_chunked_bodies_are_followed() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
GET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        let (f, r) = feed_all(&[stream]);
        assert_eq!(r, Ok(()));
        assert_eq!(f.requests(), 4);
        // Byte by byte: the same.
        let mut f = RequestFramer::new();
        for b in stream {
            f.feed(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(f.requests(), 4);
    }

    #[test]
    fn content_length_with_transfer_encoding_is_rejected_at_its_head() {
        let first: &[u8] = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n";
        let bad: &[u8] =
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let mut data = first.to_vec();
        data.extend_from_slice(bad);
        let (_, r) = feed_all(&[&data]);
        assert_eq!(
            r,
            Err(Rejected {
                at: first.len(),
                error: FramingError::LengthAndTransferEncoding
            })
        );
        // Either order, and split across reads.
        let swapped: &[u8] =
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n";
        let (_, r) = feed_all(&[&swapped[..20], &swapped[20..]]);
        assert_eq!(
            r.unwrap_err().error,
            FramingError::LengthAndTransferEncoding
        );
    }

    #[test]
    fn ambiguous_lengths_and_codings_are_rejected() {
        for (head, want) in [
            (&b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n"[..], FramingError::InvalidContentLength),
            (b"POST / HTTP/1.1\r\nContent-Length: 4, 5\r\n\r\n", FramingError::InvalidContentLength),
            (b"POST / HTTP/1.1\r\nContent-Length: +4\r\n\r\n", FramingError::InvalidContentLength),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", FramingError::TransferEncodingNotChunked),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n", FramingError::TransferEncodingNotChunked),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n", FramingError::InvalidHead("invalid header name")),
        ] {
            let (_, r) = feed_all(&[head]);
            assert_eq!(r.map_err(|e| e.error), Err(want), "{}", String::from_utf8_lossy(head));
        }
        // Equal repeated lengths are one length.
        let (f, r) = feed_all(&[b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nokGET / HTTP/1.1\r\n\r\n"]);
        assert_eq!((r, f.requests()), (Ok(()), 2));
    }

    #[test]
    fn malformed_chunks_are_rejected() {
        for body in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"5\nhello\r\n",
            b"ffffffffffffffffff\r\n",
        ] {
            let mut data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            data.extend_from_slice(body);
            let (_, r) = feed_all(&[&data]);
            assert_eq!(
                r.map_err(|e| e.error),
                Err(FramingError::InvalidChunk),
                "{body:?}"
            );
        }
    }

    #[test]
    fn tunnels_upgrades_and_http2_are_not_followed() {
        let (f, r) =
            feed_all(&[b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n\x00\x01binary"]);
        assert_eq!(r, Ok(()));
        assert!(f.is_passthrough());
        let (f, r) = feed_all(&[
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x85",
        ]);
        assert!(r.is_ok() && f.is_passthrough());
        let (f, r) = feed_all(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"]);
        assert!(r.is_ok() && f.is_passthrough());
    }

    #[test]
    fn oversized_heads_are_rejected() {
        let mut f = RequestFramer::new();
        f.feed(b"GET / HTTP/1.1\r\n").unwrap();
        let filler = vec![b'a'; MAX_HEAD];
        assert_eq!(
            f.feed(&filler).unwrap_err().error,
            FramingError::HeadTooLarge
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_in_arbitrary_pieces_never_panic(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..2000),
            cut in 0usize..2000,
        ) {
            let cut = cut.min(data.len());
            let mut f = RequestFramer::new();
            let _ = f.feed(&data[..cut]).and_then(|_| f.feed(&data[cut..]));
        }
    }
}
