//! gRPC path parsing: never panics, and a parsed path is exactly `/` service `/` method with no
//! `/` in the method — the split policy matches gRPC rules on cannot be ambiguous.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_parsers::grpc::parse_path;

fuzz_target!(|path: &str| {
    if let Ok(g) = parse_path(path) {
        assert_eq!(format!("/{}/{}", g.service, g.method), path);
        assert!(!g.service.is_empty() && !g.method.is_empty());
        assert!(!g.method.contains('/'));
    }
});
