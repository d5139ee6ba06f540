//! The policy loader and compiler on arbitrary text: never panics, and every diagnostic names
//! a line inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_policy::load::PolicySet;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let mut set = PolicySet::default();
    set.load_str("fuzz.yaml", s);
    // Line breaks as YAML counts them: `\n`, `\r\n`, and a lone `\r` (the first crash this
    // target found was a lone-CR file whose YAML line numbers exceeded `str::lines()`).
    let b = s.as_bytes();
    let breaks = (0..b.len())
        .filter(|&i| b[i] == b'\n' || (b[i] == b'\r' && b.get(i + 1) != Some(&b'\n')))
        .count();
    let lines = breaks + 2;
    for d in &set.diagnostics {
        assert!(d.line <= lines, "line {} beyond the input ({lines}): {d}", d.line);
    }
});
