//! Kafka request decoding (frame body after the size prefix): never panics or aborts (under
//! the proxy's allocator: a hostile element count must not abort the process); a decoded
//! request's denial, for every error code the proxy sends, decodes as a response of the same
//! API and version with the request's correlation id and nothing left over; splitting off
//! topics re-encodes to a request that decodes with exactly the kept topics (or the edit is
//! refused), and the merged answer names every topic of the original request.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tollgate_parsers::kafka as kp;

#[global_allocator]
static ALLOC: tollgate_parsers::alloc::LazyHugeAlloc = tollgate_parsers::alloc::LazyHugeAlloc;

fuzz_target!(|data: &[u8]| {
    let _ = kp::parse_request_header(data);
    let Ok(req) = kp::decode_request(Bytes::copy_from_slice(data)) else {
        return;
    };
    let h = &req.header;
    let fields = req.policy_fields();
    for error in [
        kp::TOPIC_AUTHORIZATION_FAILED,
        kp::GROUP_AUTHORIZATION_FAILED,
        kp::CLUSTER_AUTHORIZATION_FAILED,
        kp::TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    ] {
        match kp::deny_response(&req, error) {
            Ok(Some(frame)) => {
                let cid = kp::check_response(h.api_key, h.api_version, &frame)
                    .unwrap_or_else(|e| panic!("our denial does not decode: {e}"));
                assert_eq!(cid, h.correlation_id);
            }
            // No answer only for acks=0 produce and keys without a denial response.
            Ok(None) => assert!(!fields.expects_response || !kp::has_deny_response(h.api_key)),
            // A request the crate decodes but cannot answer at its version (a field set that
            // the version lacks) is refused by closing: allowed, but never a panic.
            Err(_) => {}
        }
    }
    // Split off every other distinct topic.
    let mut split_req = req.clone();
    let mut n = 0;
    let mut kept = Vec::new();
    if let Some(split) = split_req.split_topics(&mut |t| {
        n += 1;
        let keep = n % 2 == 1;
        if keep {
            kept.push(t.to_string());
        }
        keep
    }) {
        let denied = split.topics();
        assert!(!denied.is_empty());
        // An edit that would not read back as judged is refused (the proxy closes).
        let Ok(frame) = split_req.encode_frame() else {
            return;
        };
        let again = kp::decode_request(Bytes::copy_from_slice(&frame[4..])).expect("and decodes");
        assert_eq!(again.header.correlation_id, h.correlation_id);
        assert_eq!(again.policy_fields().topics, kept);
        let mut all: Vec<String> = kept.iter().chain(&denied).cloned().collect();
        let mut orig = fields.topics.clone();
        all.sort();
        orig.sort();
        assert_eq!(all, orig);
    }
});
