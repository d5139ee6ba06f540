//! DNS message parsing: never panics; a parsed query's name is lowercase presentation form
//! ending in a dot; its refusal parses back as a response to the same question and ID; a
//! response's learned IPs come with a TTL no higher than any record on the chain.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_parsers::dns::{self, rcode};

fuzz_target!(|data: &[u8]| {
    if let Ok(q) = dns::parse_query(data) {
        let name = &q.question.name;
        assert!(name.ends_with('.'), "{name:?}");
        assert!(!name.bytes().any(|b| b.is_ascii_uppercase()), "{name:?}");
        let reply = dns::reply_with_rcode(data, &q, rcode::REFUSED);
        let r = dns::parse_response(&reply).expect("our own refusal parses");
        assert_eq!(r.header.id, q.header.id);
        assert_eq!(r.header.rcode(), rcode::REFUSED);
        assert_eq!(r.question.as_ref(), Some(&q.question));
    }
    if let Ok(r) = dns::parse_response(data) {
        if let Some(l) = r.learned() {
            assert!(!l.ips.is_empty());
            let chain_min = r
                .answers
                .iter()
                .filter(|rec| rec.name == l.name || l.cnames.contains(&rec.name))
                .map(|rec| rec.ttl)
                .min();
            assert!(chain_min.is_some_and(|m| l.ttl >= m), "{l:?}");
        }
    }
    let _ = dns::formerr(data);
});
