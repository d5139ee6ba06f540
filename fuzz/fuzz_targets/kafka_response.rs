//! Rewriting broker responses (the proxy's other untrusted input: a workload can pose as a
//! broker): input = API key (2 bytes), version (2 bytes), response frame body. Never panics or
//! aborts; what the proxy writes back decodes as a response of the same API and version with
//! the broker's correlation id; capped ApiVersions never offer a version above what tollgate
//! decodes; hidden Metadata topics are gone from the answer.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tollgate_parsers::kafka as kp;

#[global_allocator]
static ALLOC: tollgate_parsers::alloc::LazyHugeAlloc = tollgate_parsers::alloc::LazyHugeAlloc;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let key = i16::from_be_bytes([data[0], data[1]]) & 0x7f;
    let version = i16::from_be_bytes([data[2], data[3]]) & 0x1f;
    let body = Bytes::copy_from_slice(&data[4..]);
    let cid = kp::response_correlation_id(&body).unwrap_or_default();
    let mut map = |_node: i32, host: &str, port: i32| {
        (host.len() % 2 == 0).then(|| ("127.0.0.1".to_string(), port.wrapping_add(1)))
    };
    if key == 18 {
        if let Ok(frame) = kp::cap_api_versions(version, body.clone(), &mut |k, a, b| {
            (k % 3 != 0).then_some((a, b))
        }) {
            // Answers to unsupported versions come back in v0 (KIP-511).
            let used = if kp::check_response(18, version, &frame).is_ok() { version } else { 0 };
            assert_eq!(kp::check_response(18, used, &frame).expect("capped answer decodes"), cid);
        }
    }
    if kp::carries_brokers(key)
        && let Ok(frame) = kp::rewrite_brokers(key, version, body.clone(), &mut map)
    {
        assert_eq!(kp::check_response(key, version, &frame).expect("rewritten answer decodes"), cid);
    }
    if key == 3
        && let Ok((frame, hidden)) =
            kp::filter_metadata(version, body, &mut |t| t.len() % 2 == 0, Some(&mut map))
    {
        assert_eq!(kp::check_response(3, version, &frame).expect("filtered answer decodes"), cid);
        assert!(hidden.iter().all(|t| t.len() % 2 == 1));
    }
});
