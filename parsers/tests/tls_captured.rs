//! ClientHellos captured on loopback from real clients (curl 7.88 with OpenSSL 3, and
//! `openssl s_client`; the capture was a plain TCP listener that stored the first bytes — the
//! same files seed the `tls_client_hello` fuzz target).

use tollgate_parsers::tls::parse_client_hello;

fn sample(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/data/tls/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[test]
fn curl_sends_sni_and_alpn() {
    let h = parse_client_hello(&sample("curl-sni-alpn")).unwrap();
    assert_eq!(h.sni.as_deref(), Some("api.example.com"));
    assert!(h.alpn.iter().any(|p| p == "http/1.1"), "{:?}", h.alpn);
}

#[test]
fn openssl_s_client_with_and_without_sni() {
    let h = parse_client_hello(&sample("openssl-s_client-sni")).unwrap();
    assert_eq!(h.sni.as_deref(), Some("x.svc.example.com"));
    let h = parse_client_hello(&sample("openssl-s_client-tls12-no-sni")).unwrap();
    assert_eq!(h.sni, None);
}
