//! Request-target normalisation for policy matching.
//!
//! Policy `path` regexes are matched against the *normalised* `:path`, query included (as
//! Cilium's Envoy does with `normalize_path`, `merge_slashes` and escaped-slash rejection), so
//! `/public/../admin` is judged as `/admin` and cannot slip past an `/admin/.*` deny. Exactly:
//!
//! 1. absolute-form targets (`http://host/p`) are reduced to their path and query; the target
//!    must otherwise start with `/` (origin-form);
//! 2. the query (from the first `?`) is kept byte for byte;
//! 3. in the path, percent-escapes of unreserved characters (`A–Z a–z 0–9 - . _ ~`) are
//!    decoded, every other escape is kept with uppercase hex;
//! 4. ambiguous input is **rejected** (the proxy answers 400 and writes an audit record):
//!    an escaped slash `%2F`, an escaped or raw backslash `%5C` / `\`, `%00`, a malformed
//!    escape, control characters, spaces and non-ASCII bytes;
//! 5. runs of `/` are merged into one (unless [`Options::merge_slashes`] is off);
//! 6. `.` and `..` segments are removed as RFC 3986 §5.2.4 says (`..` never climbs above `/`);
//!    a trailing slash is kept.
//!
//! The result is idempotent: normalising a normalised target returns it unchanged.

use std::fmt;

/// Normalisation options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub merge_slashes: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            merge_slashes: true,
        }
    }
}

/// Why a target was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("request target must start with `/`")]
    NotOriginForm,
    #[error("escaped slash `%2F` in the path is ambiguous")]
    EncodedSlash,
    #[error("backslash in the path is ambiguous")]
    Backslash,
    #[error("`%00` in the path")]
    Nul,
    #[error("malformed percent-escape at byte {0}")]
    BadEscape(usize),
    #[error("character {byte:#04x} at byte {at} is not allowed in a path")]
    InvalidByte { byte: u8, at: usize },
}

/// A normalised target: path plus query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    full: String,
    path_len: usize,
}

impl Normalized {
    /// Path and query, as policy `path` rules see it.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        &self.full[..self.path_len]
    }

    /// The query without the `?`, if any.
    pub fn query(&self) -> Option<&str> {
        self.full
            .get(self.path_len + 1..)
            .filter(|_| self.full.len() > self.path_len)
    }
}

impl fmt::Display for Normalized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalise a request target (see the module docs).
pub fn normalize(target: &str, opts: Options) -> Result<Normalized, PathError> {
    let mut t = target;
    for scheme in ["http://", "https://"] {
        if t.get(..scheme.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(scheme))
        {
            let rest = &t[scheme.len()..];
            t = match rest.find(['/', '?']) {
                Some(i) if rest.as_bytes()[i] == b'/' => &rest[i..],
                Some(i) => {
                    // `http://host?q`: the path is `/`.
                    return finish("/", Some(&rest[i + 1..]), opts);
                }
                None => "/",
            };
            break;
        }
    }
    if !t.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    let (path, query) = match t.find('?') {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    finish(path, query, opts)
}

fn finish(path: &str, query: Option<&str>, opts: Options) -> Result<Normalized, PathError> {
    // Decode unreserved escapes, validate bytes.
    let b = path.as_bytes();
    let mut decoded = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape(i));
                };
                let v = h * 16 + l;
                match v {
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::Backslash),
                    0 => return Err(PathError::Nul),
                    v if is_unreserved(v) => decoded.push(v as char),
                    v => {
                        decoded.push('%');
                        decoded.push(char::from(b"0123456789ABCDEF"[(v >> 4) as usize]));
                        decoded.push(char::from(b"0123456789ABCDEF"[(v & 15) as usize]));
                    }
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            c if c <= b' ' || c >= 0x7f => return Err(PathError::InvalidByte { byte: c, at: i }),
            c => decoded.push(c as char),
        }
        i += 1;
    }
    if let Some(q) = query
        && let Some((at, &byte)) = q
            .as_bytes()
            .iter()
            .enumerate()
            .find(|(_, c)| **c < b' ' || **c == 0x7f)
    {
        return Err(PathError::InvalidByte {
            byte,
            at: path.len() + 1 + at,
        });
    }
    // Segments: merge slashes, remove dot segments.
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {}
            ".." => {
                out.pop();
            }
            "" if opts.merge_slashes || n + 1 == segments.len() => {}
            s => out.push(s),
        }
    }
    let mut full = String::with_capacity(decoded.len() + query.map_or(0, |q| q.len() + 1));
    full.push('/');
    full.push_str(&out.join("/"));
    if trailing && !out.is_empty() {
        full.push('/');
    }
    let path_len = full.len();
    if let Some(q) = query {
        full.push('?');
        full.push_str(q);
    }
    Ok(Normalized { full, path_len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Result<String, PathError> {
        normalize(s, Options::default()).map(|x| x.as_str().to_string())
    }

    #[test]
    fn dot_segments_cannot_escape_a_prefix() {
        assert_eq!(n("/public/../admin").unwrap(), "/admin");
        assert_eq!(n("/public/./a/../b").unwrap(), "/public/b");
        assert_eq!(n("/../../etc/passwd").unwrap(), "/etc/passwd");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(
            n("/%2E%2E/admin").unwrap(),
            "/admin",
            "escaped dots are dots"
        );
        assert_eq!(n("/public/%2e%2e/admin").unwrap(), "/admin");
    }

    #[test]
    fn unreserved_escapes_are_decoded_others_uppercased() {
        assert_eq!(n("/%61%64min").unwrap(), "/admin");
        assert_eq!(n("/a%3fb").unwrap(), "/a%3Fb");
        assert_eq!(n("/caf%c3%a9").unwrap(), "/caf%C3%A9");
    }

    #[test]
    fn ambiguous_encodings_are_rejected() {
        assert_eq!(n("/a%2Fb"), Err(PathError::EncodedSlash));
        assert_eq!(n("/a%2fb"), Err(PathError::EncodedSlash));
        assert_eq!(n("/a\\b"), Err(PathError::Backslash));
        assert_eq!(n("/a%5Cb"), Err(PathError::Backslash));
        assert_eq!(n("/a%00"), Err(PathError::Nul));
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape(2)));
        assert_eq!(n("/a%4"), Err(PathError::BadEscape(2)));
        assert_eq!(n("/a b"), Err(PathError::InvalidByte { byte: b' ', at: 2 }));
        assert_eq!(n("admin"), Err(PathError::NotOriginForm));
    }

    #[test]
    fn slashes_merge_and_query_is_kept() {
        assert_eq!(n("//admin///users").unwrap(), "/admin/users");
        let x = normalize("/a/../b?x=%2F&y=../z", Options::default()).unwrap();
        assert_eq!(x.as_str(), "/b?x=%2F&y=../z");
        assert_eq!(x.path(), "/b");
        assert_eq!(x.query(), Some("x=%2F&y=../z"));
        assert_eq!(normalize("/b", Options::default()).unwrap().query(), None);
        let keep = normalize(
            "//a//b",
            Options {
                merge_slashes: false,
            },
        )
        .unwrap();
        assert_eq!(keep.as_str(), "//a//b");
    }

    #[test]
    fn absolute_form_is_reduced_to_path_and_query() {
        assert_eq!(n("http://api.example.com/x/../y?q").unwrap(), "/y?q");
        assert_eq!(n("HTTPS://h").unwrap(), "/");
        assert_eq!(n("http://h?q=1").unwrap(), "/?q=1");
    }

    proptest::proptest! {
        #[test]
        fn normalisation_is_idempotent(s in "/[a-zA-Z0-9%./?_~-]{0,40}") {
            if let Ok(once) = normalize(&s, Options::default()) {
                let twice = normalize(once.as_str(), Options::default()).unwrap();
                proptest::prop_assert_eq!(once, twice);
            }
        }

        #[test]
        fn never_panics(s in "\\PC{0,64}") {
            let _ = normalize(&s, Options::default());
        }
    }
}
