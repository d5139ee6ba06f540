//! TLS ClientHello parsing for SNI enforcement without termination.
//!
//! Feed the first bytes of a connection to [`parse_client_hello`]: it reassembles the
//! handshake message from as many TLS records as it spans, and returns the server name
//! (lowercased) and ALPN protocols, [`TlsError::Incomplete`] when more bytes are needed, or a
//! precise error. Work and memory are bounded by [`MAX_HELLO`].

/// The largest ClientHello we accept (post-quantum key shares make hellos of several KiB).
pub const MAX_HELLO: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    /// The `server_name` extension's host name, lowercased, if present.
    pub sni: Option<String>,
    pub alpn: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("need more bytes")]
    Incomplete,
    #[error("not a TLS handshake (first byte {0:#04x})")]
    NotTls(u8),
    #[error("the first handshake message is not a ClientHello (type {0})")]
    NotClientHello(u8),
    #[error("ClientHello larger than {MAX_HELLO} bytes")]
    TooLarge,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

/// Parse the ClientHello at the start of a connection.
pub fn parse_client_hello(buf: &[u8]) -> Result<ClientHello, TlsError> {
    // Reassemble the handshake bytes from consecutive handshake records.
    let mut hs = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + 5) else {
            return Err(TlsError::Incomplete);
        };
        if header[0] != 22 {
            return Err(if at == 0 {
                TlsError::NotTls(header[0])
            } else {
                TlsError::Malformed("a non-handshake record inside the ClientHello")
            });
        }
        if header[1] != 3 {
            return Err(TlsError::Malformed("record version is not 3.x"));
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len == 0 || len > 16 * 1024 + 256 {
            return Err(TlsError::Malformed("record length"));
        }
        let Some(payload) = buf.get(at + 5..at + 5 + len) else {
            return Err(TlsError::Incomplete);
        };
        hs.extend_from_slice(payload);
        at += 5 + len;
        if hs.len() >= 4 {
            if hs[0] != 1 {
                return Err(TlsError::NotClientHello(hs[0]));
            }
            let need = 4 + (u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize);
            if need > MAX_HELLO {
                return Err(TlsError::TooLarge);
            }
            if hs.len() >= need {
                return parse_body(&hs[4..need]);
            }
        }
        if at > MAX_HELLO {
            return Err(TlsError::TooLarge);
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], TlsError> {
        if self.0.len() < n {
            return Err(TlsError::Malformed(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<usize, TlsError> {
        Ok(self.take(1, what)?[0] as usize)
    }
    fn u16(&mut self, what: &'static str) -> Result<usize, TlsError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, TlsError> {
    let mut r = Reader(body);
    r.take(2, "client version")?;
    r.take(32, "random")?;
    let n = r.u8("session id length")?;
    r.take(n, "session id")?;
    let n = r.u16("cipher suites length")?;
    r.take(n, "cipher suites")?;
    let n = r.u8("compression methods length")?;
    r.take(n, "compression methods")?;
    let mut hello = ClientHello::default();
    if r.0.is_empty() {
        return Ok(hello); // no extensions at all
    }
    let n = r.u16("extensions length")?;
    let mut ext = Reader(r.take(n, "extensions")?);
    while !ext.0.is_empty() {
        let kind = ext.u16("extension type")?;
        let len = ext.u16("extension length")?;
        let mut data = Reader(ext.take(len, "extension data")?);
        match kind {
            0 => {
                let list = data.u16("server name list length")?;
                let mut names = Reader(data.take(list, "server name list")?);
                while !names.0.is_empty() {
                    let name_type = names.u8("server name type")?;
                    let len = names.u16("server name length")?;
                    let name = names.take(len, "server name")?;
                    if name_type == 0 {
                        if hello.sni.is_some() {
                            return Err(TlsError::Malformed("two host names in server_name"));
                        }
                        let s = std::str::from_utf8(name)
                            .map_err(|_| TlsError::Malformed("server name is not ASCII"))?;
                        if s.is_empty() || !s.is_ascii() {
                            return Err(TlsError::Malformed("server name is not ASCII"));
                        }
                        hello.sni = Some(s.to_ascii_lowercase());
                    }
                }
            }
            16 => {
                let list = data.u16("ALPN list length")?;
                let mut protos = Reader(data.take(list, "ALPN list")?);
                while !protos.0.is_empty() {
                    let len = protos.u8("ALPN protocol length")?;
                    let p = protos.take(len, "ALPN protocol")?;
                    hello.alpn.push(String::from_utf8_lossy(p).into_owned());
                }
            }
            _ => {}
        }
    }
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Build a ClientHello record carrying `sni` and `alpn`, split into records of `chunk`.
    pub(crate) fn hello(sni: Option<&str>, alpn: &[&str], chunk: usize) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(s) = sni {
            let mut list = vec![0u8];
            list.extend((s.len() as u16).to_be_bytes());
            list.extend(s.as_bytes());
            ext.extend(0u16.to_be_bytes());
            ext.extend(((list.len() + 2) as u16).to_be_bytes());
            ext.extend((list.len() as u16).to_be_bytes());
            ext.extend(list);
        }
        if !alpn.is_empty() {
            let mut list = Vec::new();
            for p in alpn {
                list.push(p.len() as u8);
                list.extend(p.as_bytes());
            }
            ext.extend(16u16.to_be_bytes());
            ext.extend(((list.len() + 2) as u16).to_be_bytes());
            ext.extend((list.len() as u16).to_be_bytes());
            ext.extend(list);
        }
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend(2u16.to_be_bytes());
        body.extend([0x13, 0x01]);
        body.extend([1, 0]); // compression
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut out = Vec::new();
        for part in hs.chunks(chunk) {
            out.extend([22, 3, 1]);
            out.extend((part.len() as u16).to_be_bytes());
            out.extend(part);
        }
        out
    }

    #[test]
    fn sni_and_alpn_even_across_records() {
        for chunk in [4, 17, 1000] {
            let h = hello(Some("API.Example.com"), &["h2", "http/1.1"], chunk);
            let got = parse_client_hello(&h).unwrap();
            assert_eq!(got.sni.as_deref(), Some("api.example.com"));
            assert_eq!(got.alpn, vec!["h2", "http/1.1"]);
        }
        assert_eq!(
            parse_client_hello(&hello(None, &[], 1000)).unwrap().sni,
            None
        );
    }

    #[test]
    fn incomplete_and_invalid_input() {
        let h = hello(Some("a.example"), &[], 1000);
        for cut in [0, 3, 5, 20, h.len() - 1] {
            assert_eq!(
                parse_client_hello(&h[..cut]),
                Err(TlsError::Incomplete),
                "cut {cut}"
            );
        }
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            Err(TlsError::NotTls(b'G'))
        );
        let mut bad = h.clone();
        bad[5] = 2; // ServerHello
        assert_eq!(parse_client_hello(&bad), Err(TlsError::NotClientHello(2)));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_client_hello(&data);
        }

        #[test]
        fn truncation_is_incomplete_or_an_error_never_a_wrong_name(cut in 0usize..80) {
            let h = hello(Some("x.example"), &[], 1000);
            match parse_client_hello(&h[..cut.min(h.len())]) {
                Ok(got) => proptest::prop_assert_eq!(got.sni.as_deref(), Some("x.example")),
                Err(e) => proptest::prop_assert_eq!(e, TlsError::Incomplete),
            }
        }
    }
}
