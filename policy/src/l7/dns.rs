//! DNS names: `matchName` / `matchPattern` for L7 DNS rules and `toFQDNs` (cnp-semantics §9.1).
//!
//! Both sides are lowercased and get a trailing dot. `*` inside a label matches
//! `[-a-z0-9_]*` and never crosses a dot; a leading `**.` matches one or more whole labels;
//! a run of `*` elsewhere is one `*`; a pattern of only `*` (and dots) matches every name.
//! A set looks exact names up in a hash map and runs every pattern at once in one automaton.

use std::collections::HashMap;
use std::sync::Arc;

use regex::Regex;

use super::L7Error;
use crate::api;

const MAX_NAME: usize = 255;
const LABEL: &str = "[-a-z0-9_]";

/// Lowercase and add the trailing dot.
pub(crate) fn fqdn(name: &str) -> String {
    fqdn_cow(name).into_owned()
}

/// [`fqdn`] without a copy when the name is already in that form (as the DNS parser gives it).
fn fqdn_cow(name: &str) -> std::borrow::Cow<'_, str> {
    if name.ends_with('.') && !name.bytes().any(|b| b.is_ascii_uppercase()) {
        return std::borrow::Cow::Borrowed(name);
    }
    let mut s = name.to_ascii_lowercase();
    if !s.ends_with('.') {
        s.push('.');
    }
    std::borrow::Cow::Owned(s)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Exact(String),
    /// Anchored regex source.
    Pattern(String),
    All,
}

/// One compiled `matchName` or `matchPattern`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsPattern {
    kind: Kind,
}

impl DnsPattern {
    pub fn from_rule(r: &api::DnsRule) -> Result<DnsPattern, L7Error> {
        Self::compile(r.match_name.as_deref(), r.match_pattern.as_deref())
    }

    fn compile(name: Option<&str>, pattern: Option<&str>) -> Result<DnsPattern, L7Error> {
        match (name, pattern) {
            (Some(_), Some(_)) => Err(L7Error::new(
                "",
                "only one of matchName or matchPattern may be set",
            )),
            (None, None) => Err(L7Error::new(
                "",
                "one of matchName or matchPattern is needed",
            )),
            (Some(n), None) => {
                check_chars(n, "matchName", false)?;
                Ok(DnsPattern {
                    kind: Kind::Exact(fqdn(n)),
                })
            }
            (None, Some(p)) => {
                check_chars(p, "matchPattern", true)?;
                let p = fqdn(p);
                if p.chars().all(|c| c == '*' || c == '.') {
                    return Ok(DnsPattern { kind: Kind::All });
                }
                let (prefix, rest) = match p.strip_prefix("**.") {
                    Some(rest) => (format!("(?:{LABEL}+\\.)+"), rest.to_string()),
                    None => (String::new(), p.clone()),
                };
                let mut re = String::from("^");
                re.push_str(&prefix);
                let mut prev_star = false;
                for c in rest.chars() {
                    if c == '*' {
                        if !prev_star {
                            re.push_str(LABEL);
                            re.push('*');
                        }
                        prev_star = true;
                        continue;
                    }
                    prev_star = false;
                    if c == '.' {
                        re.push_str("\\.");
                    } else {
                        re.push(c);
                    }
                }
                re.push('$');
                Ok(DnsPattern {
                    kind: Kind::Pattern(re),
                })
            }
        }
    }

    /// Match one name (any case, trailing dot optional).
    pub fn matches(&self, name: &str) -> bool {
        let n = fqdn(name);
        match &self.kind {
            Kind::All => true,
            Kind::Exact(e) => *e == n,
            Kind::Pattern(p) => Regex::new(p).is_ok_and(|r| r.is_match(&n)),
        }
    }
}

fn check_chars(s: &str, field: &str, star: bool) -> Result<(), L7Error> {
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(L7Error::new(
            field,
            format!("must have 1 to {MAX_NAME} characters"),
        ));
    }
    if let Some(c) = s.chars().find(|c| {
        !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || (star && *c == '*'))
    }) {
        return Err(L7Error::new(
            field,
            format!(
                "`{s}` contains `{c}`: only letters, digits, `-`, `_`, `.`{} are allowed",
                if star { " and `*`" } else { "" }
            ),
        ));
    }
    Ok(())
}

/// The DNS rules of one port rule.
#[derive(Debug, Clone)]
pub struct DnsRuleSet {
    len: usize,
    /// Exact name → first rule index.
    exact: HashMap<String, usize>,
    /// First rule index of an all-matching pattern.
    all: Option<usize>,
    /// All patterns in one automaton. Every pattern is anchored at both ends, so a leftmost-
    /// first search reports the lowest-index pattern that matches: the first matching rule,
    /// without computing the whole set of matches.
    /// Shared with every set of the same patterns (see [`cached_automaton`]).
    patterns: Option<Arc<regex_automata::meta::Regex>>,
    /// Rule index of each pattern of `patterns`.
    pattern_rule: Vec<usize>,
}

impl DnsRuleSet {
    pub fn new(rules: Vec<DnsPattern>) -> DnsRuleSet {
        let len = rules.len();
        let mut exact = HashMap::new();
        let mut all = None;
        let mut sources = Vec::new();
        let mut pattern_rule = Vec::new();
        // The names move into the map: no copy of thousands of strings.
        for (i, r) in rules.into_iter().enumerate() {
            match r.kind {
                Kind::Exact(n) => {
                    exact.entry(n).or_insert(i);
                }
                Kind::All => {
                    all.get_or_insert(i);
                }
                Kind::Pattern(p) => {
                    sources.push(p);
                    pattern_rule.push(i);
                }
            }
        }
        // Each pattern was built from validated characters only, so the set always compiles.
        let patterns = if sources.is_empty() {
            None
        } else {
            cached_automaton(&sources)
        };
        DnsRuleSet {
            len,
            exact,
            all,
            patterns,
            pattern_rule,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The lowest-index rule matching `qname`.
    pub fn first_match(&self, qname: &str) -> Option<usize> {
        let n = fqdn_cow(qname);
        let mut best = self.all;
        let mut consider = |i: usize| best = Some(best.map_or(i, |b: usize| b.min(i)));
        if let Some(&i) = self.exact.get(n.as_ref()) {
            consider(i);
        }
        if let Some(re) = &self.patterns {
            let input =
                regex_automata::Input::new(n.as_ref()).anchored(regex_automata::Anchored::Yes);
            if let Some(m) = re.search(&input) {
                consider(self.pattern_rule[m.pattern().as_usize()]);
            }
        }
        best
    }
}

/// Automata shared between rule sets with the same patterns — across policy reloads too, so a
/// change that adds names does not recompile a thousand unchanged patterns. Shared through an
/// `Arc` (a clone of the automaton would get its own pool of match caches). Bounded: cleared
/// when it grows past 1,024 entries.
fn cached_automaton(sources: &[String]) -> Option<Arc<regex_automata::meta::Regex>> {
    use std::sync::{Mutex, OnceLock};
    type Cache = Mutex<HashMap<Vec<String>, Arc<regex_automata::meta::Regex>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(re) = cache.lock().ok().and_then(|c| c.get(sources).cloned()) {
        return Some(re);
    }
    let re = Arc::new(regex_automata::meta::Regex::new_many(sources).ok()?);
    if let Ok(mut c) = cache.lock() {
        if c.len() >= 1024 {
            c.clear();
        }
        c.insert(sources.to_vec(), re.clone());
    }
    Some(re)
}

/// A `toFQDNs` selector (same syntax as DNS rules).
#[derive(Debug, Clone)]
pub struct FqdnSelector {
    pattern: DnsPattern,
    regex: Option<Regex>,
}

impl FqdnSelector {
    pub fn new(s: &api::FqdnSelector) -> Result<FqdnSelector, L7Error> {
        let pattern = DnsPattern::compile(s.match_name.as_deref(), s.match_pattern.as_deref())?;
        let regex = match &pattern.kind {
            Kind::Pattern(p) => Regex::new(p).ok(),
            // For toFQDNs an all-`*` pattern matches any well-formed name (§9.1).
            Kind::All => Regex::new(&format!("^(?:{LABEL}+\\.)*$")).ok(),
            Kind::Exact(_) => None,
        };
        Ok(FqdnSelector { pattern, regex })
    }

    pub fn matches(&self, name: &str) -> bool {
        match (&self.pattern.kind, &self.regex) {
            (Kind::Exact(e), _) => *e == fqdn(name),
            (_, Some(r)) => r.is_match(&fqdn(name)),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(p: &str) -> DnsPattern {
        DnsPattern::compile(None, Some(p)).unwrap()
    }

    #[test]
    fn star_stays_within_a_label_9_1() {
        let p = pat("*.cilium.io");
        assert!(p.matches("anysub.cilium.io"));
        assert!(!p.matches("cilium.io"));
        assert!(!p.matches("a.b.cilium.io"));
        let p = pat("*cilium.io");
        assert!(p.matches("cilium.io"));
        assert!(p.matches("subcilium.io"));
        assert!(!p.matches("www.cilium.io"));
        let p = pat("sub*.cilium.io");
        assert!(p.matches("sub.cilium.io"));
        assert!(p.matches("subdomain.cilium.io"));
    }

    #[test]
    fn double_star_prefix_and_runs_9_1() {
        let p = pat("**.cilium.io");
        assert!(p.matches("a.cilium.io"));
        assert!(p.matches("a.b.cilium.io"));
        assert!(!p.matches("cilium.io"));
        let p = pat("test.**.cilium.io");
        assert!(p.matches("test.x.cilium.io"));
        assert!(!p.matches("test.x.y.cilium.io"));
        for all in ["*", "**", "***."] {
            assert!(pat(all).matches("anything.example.com"));
            assert!(pat(all).matches("."));
        }
    }

    #[test]
    fn case_and_trailing_dot_9_1() {
        let n = DnsPattern::compile(Some("Cilium.IO"), None).unwrap();
        assert!(n.matches("cilium.io."));
        assert!(n.matches("CILIUM.io"));
        assert!(!n.matches("ciliumXio"));
    }

    #[test]
    fn set_returns_lowest_matching_rule() {
        let s = DnsRuleSet::new(vec![
            pat("*.example.com"),
            DnsPattern::compile(Some("api.example.com"), None).unwrap(),
            pat("**.internal"),
        ]);
        assert_eq!(s.first_match("API.example.com."), Some(0));
        assert_eq!(s.first_match("a.b.internal"), Some(2));
        assert_eq!(s.first_match("example.org"), None);
    }

    #[test]
    fn fqdn_selectors() {
        let all = FqdnSelector::new(&api::FqdnSelector {
            match_name: None,
            match_pattern: Some("*".into()),
        })
        .unwrap();
        assert!(all.matches("a.b.example.com"));
        let name = FqdnSelector::new(&api::FqdnSelector {
            match_name: Some("api.example.com".into()),
            match_pattern: None,
        })
        .unwrap();
        assert!(name.matches("API.example.com."));
        assert!(!name.matches("x.api.example.com"));
    }

    #[test]
    fn validation() {
        assert_eq!(
            DnsPattern::compile(Some("a.com"), Some("*.a.com"))
                .unwrap_err()
                .message,
            "only one of matchName or matchPattern may be set"
        );
        assert_eq!(
            DnsPattern::compile(None, None).unwrap_err(),
            L7Error::new("", "one of matchName or matchPattern is needed")
        );
        let long = "a".repeat(MAX_NAME + 1);
        assert_eq!(
            DnsPattern::compile(None, Some(&long)).unwrap_err(),
            L7Error::new(
                "matchPattern",
                format!("must have 1 to {MAX_NAME} characters")
            )
        );
        assert_eq!(
            DnsPattern::compile(None, Some("a b.com"))
                .unwrap_err()
                .message,
            "`a b.com` contains ` `: only letters, digits, `-`, `_`, `.` and `*` are allowed"
        );
        assert_eq!(
            DnsPattern::compile(Some("a*.com"), None).unwrap_err(),
            L7Error::new(
                "matchName",
                "`a*.com` contains `*`: only letters, digits, `-`, `_`, `.` are allowed"
            )
        );
    }

    proptest::proptest! {
        #[test]
        fn set_agrees_with_each_pattern(
            pats in proptest::collection::vec(proptest::sample::select(vec!["*.a.com", "a.com", "**.b.org", "x*y.a.com", "*"]), 1..6),
            name in proptest::sample::select(vec!["a.com", "q.a.com", "xzy.a.com", "p.q.b.org", "b.org", "Z.A.COM."]),
        ) {
            let compiled: Vec<DnsPattern> = pats.iter().map(|p| pat(p)).collect();
            let naive = compiled.iter().position(|p| p.matches(name));
            proptest::prop_assert_eq!(DnsRuleSet::new(compiled).first_match(name), naive);
        }
    }

    #[test]
    fn first_match_is_the_lowest_index_rule_among_overlapping_patterns() {
        let set = |ps: &[&str]| {
            DnsRuleSet::new(
                ps.iter()
                    .map(|p| DnsPattern::compile(None, Some(p)).unwrap())
                    .collect(),
            )
        };
        let s = set(&["*.example.co", "**.example.com", "*.b.example.com"]);
        assert_eq!(s.first_match("a.b.example.com"), Some(1));
        assert_eq!(s.first_match("A.B.Example.COM."), Some(1));
        let s = set(&["*.example.co", "*.b.example.com", "**.example.com"]);
        assert_eq!(s.first_match("a.b.example.com"), Some(1));
        assert_eq!(s.first_match("x.y.z.example.com"), Some(2));
        assert_eq!(s.first_match("example.com"), None);
        let many: Vec<String> = (0..1000).map(|i| format!("*.svc{i}.example.com")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let s = set(&refs);
        assert_eq!(s.first_match("h1.svc999.example.com"), Some(999));
        assert_eq!(s.first_match("h1.svc1000.example.com"), None);
    }
}
