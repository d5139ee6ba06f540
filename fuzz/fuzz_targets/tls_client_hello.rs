//! TLS ClientHello parsing: never panics; a parsed server name is lowercase ASCII; and every
//! prefix of an input that parses is `Incomplete` or parses to the same hello (bytes that
//! arrive in pieces never change the answer).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_parsers::tls::{TlsError, parse_client_hello};

fuzz_target!(|data: &[u8]| {
    if let Ok(hello) = parse_client_hello(data) {
        if let Some(sni) = &hello.sni {
            assert!(sni.is_ascii() && *sni == sni.to_ascii_lowercase(), "{sni:?}");
        }
        for cut in [data.len() / 2, data.len().saturating_sub(1)] {
            match parse_client_hello(&data[..cut]) {
                Ok(h) => assert_eq!(h, hello),
                Err(e) => assert_eq!(e, TlsError::Incomplete, "prefix {cut} of a valid hello"),
            }
        }
    }
});
