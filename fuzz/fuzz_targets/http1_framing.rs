//! HTTP/1 request framing: never panics, and where a stream is split into reads never changes
//! the outcome (accepted with the same number of requests, or rejected) — bytes arriving in
//! pieces must not open a smuggling gap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_parsers::http1::RequestFramer;

fuzz_target!(|input: (u16, &[u8])| {
    let (cut, data) = input;
    let mut whole = RequestFramer::new();
    let a = whole.feed(data);
    let cut = usize::from(cut) % (data.len() + 1);
    let mut split = RequestFramer::new();
    let b = split.feed(&data[..cut]).and_then(|()| split.feed(&data[cut..]));
    assert_eq!(a.is_ok(), b.is_ok(), "cut at {cut}: {a:?} vs {b:?}");
    if a.is_ok() {
        assert_eq!(whole.requests(), split.requests());
        assert_eq!(whole.is_passthrough(), split.is_passthrough());
    } else if let (Err(x), Err(y)) = (a, b) {
        assert_eq!(x.error, y.error, "cut at {cut}");
    }
});
