//! Path normalisation: never panics, and is idempotent (normalising a normalised target gives
//! it back), and never lets a dot segment or an escaped slash through.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_parsers::path::{Options, normalize};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    for merge_slashes in [true, false] {
        let opts = Options { merge_slashes };
        if let Ok(once) = normalize(s, opts) {
            let twice = normalize(once.as_str(), opts).expect("a normalised target is valid");
            assert_eq!(once, twice, "not idempotent for {s:?}");
            let path = once.path();
            assert!(path.starts_with('/'));
            assert!(!path.split('/').any(|seg| seg == "." || seg == ".."), "{path:?}");
            assert!(!path.to_ascii_lowercase().contains("%2f"), "{path:?}");
        }
    }
});
