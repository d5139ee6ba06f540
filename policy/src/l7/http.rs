//! HTTP rules (cnp-semantics §7): `method`, `path`, `host` full-match regexes, `headers`
//! ("Name: value" split on the first space, or a bare name for presence), `headerMatches`
//! with Cilium's mismatch actions, and TollgatePolicy's header `regex` and `cidr` matches.
//!
//! A set evaluates each regex field with one `RegexSet` over the distinct patterns of the set,
//! then checks each rule against the resulting bitsets: 1,000 rules cost three set scans and
//! 1,000 bit tests, not 3,000 regex runs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use regex::{Regex, RegexSet, RegexSetBuilder};

use super::{L7Error, REGEX_SIZE_LIMIT, checked_full_match};
use crate::api::{self, MismatchAction};

/// The request fields HTTP rules look at.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The normalised path *including* the query string (what `:path` holds, §7.2).
    pub path: &'a str,
    /// `:authority` / `Host`, including any port.
    pub host: &'a str,
    /// Header names in any case; repeated headers appear repeatedly.
    pub headers: &'a [(&'a str, &'a str)],
}

impl HttpRequest<'_> {
    /// All values of a header joined with `,` (Envoy's view of repeated headers), or `None`.
    pub fn header(&self, name: &str) -> Option<String> {
        let mut out: Option<String> = None;
        for (k, v) in self.headers {
            if k.eq_ignore_ascii_case(name) {
                match &mut out {
                    None => out = Some((*v).to_string()),
                    Some(s) => {
                        s.push(',');
                        s.push_str(v);
                    }
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
enum ValueCheck {
    Present,
    Exact(String),
    Regex(Regex),
    Cidr(Vec<IpNet>),
}

impl ValueCheck {
    fn ok(&self, value: &str) -> bool {
        match self {
            ValueCheck::Present => true,
            ValueCheck::Exact(v) => constant_time_eq(v.as_bytes(), value.as_bytes()),
            ValueCheck::Regex(r) => r.is_match(value),
            ValueCheck::Cidr(nets) => value
                .split(',')
                .next()
                .and_then(|v| v.trim().parse::<IpAddr>().ok())
                .is_some_and(|ip| nets.iter().any(|n| n.contains(&ip))),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Clone)]
struct HeaderCheck {
    /// Lowercased.
    name: String,
    check: ValueCheck,
    mismatch: Option<MismatchAction>,
}

/// What the proxy must do to a request's headers after a rule with `mismatch` matched.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeaderEdit {
    pub name: String,
    pub action: HeaderEditAction,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderEditAction {
    /// Only record the header as mismatched in the audit record.
    Log,
    /// Append the expected value.
    Add(String),
    /// Remove the header (it was present with a wrong value).
    Delete,
    /// Set the header to the expected value.
    Replace(String),
}

/// One validated HTTP rule.
#[derive(Debug, Clone)]
pub struct CompiledHttpRule {
    method: Option<String>,
    path: Option<String>,
    host: Option<String>,
    headers: Vec<HeaderCheck>,
}

/// Validate and compile one HTTP rule; `ext` allows TollgatePolicy fields.
pub fn compile_http_rule(r: &api::HttpRule, ext: bool) -> Result<CompiledHttpRule, L7Error> {
    if r.action.is_some() && !ext {
        return Err(L7Error::new(
            "action",
            "`action` is a TollgatePolicy extension",
        ));
    }
    let method = r
        .method
        .as_deref()
        .map(|m| checked_full_match(m, "method"))
        .transpose()?;
    let path = r
        .path
        .as_deref()
        .map(|p| checked_full_match(p, "path"))
        .transpose()?;
    let host = r
        .host
        .as_deref()
        .map(|h| checked_full_match(h, "host"))
        .transpose()?;
    let mut headers = Vec::new();
    for (i, h) in r.headers.iter().flatten().enumerate() {
        let at = format!("headers[{i}]");
        let (name, check) = match h.split_once(' ') {
            Some((n, v)) => (n.trim_end_matches(':'), ValueCheck::Exact(v.to_string())),
            None => (h.as_str(), ValueCheck::Present),
        };
        if name.is_empty() {
            return Err(L7Error::new(at, "header name must not be empty"));
        }
        headers.push(HeaderCheck {
            name: name.to_ascii_lowercase(),
            check,
            mismatch: None,
        });
    }
    for (i, m) in r.header_matches.iter().flatten().enumerate() {
        let at = |f: &str| format!("headerMatches[{i}]{f}");
        if m.name.is_empty() {
            return Err(L7Error::new(at(".name"), "header name must not be empty"));
        }
        if m.secret.is_some() {
            return Err(L7Error::new(
                at(".secret"),
                "`secret` is not supported by tollgate (put the value inline)",
            ));
        }
        if !ext && m.regex.is_some() {
            return Err(L7Error::new(
                at(".regex"),
                "`regex` is a TollgatePolicy extension",
            ));
        }
        if !ext && m.cidr.is_some() {
            return Err(L7Error::new(
                at(".cidr"),
                "`cidr` is a TollgatePolicy extension",
            ));
        }
        let set = [m.value.is_some(), m.regex.is_some(), m.cidr.is_some()];
        if set.iter().filter(|x| **x).count() > 1 {
            return Err(L7Error::new(
                at(""),
                "at most one of `value`, `regex` or `cidr` may be set",
            ));
        }
        let check = if let Some(v) = &m.value {
            ValueCheck::Exact(v.clone())
        } else if let Some(re) = &m.regex {
            let anchored = checked_full_match(re, &at(".regex"))?;
            ValueCheck::Regex(
                regex::RegexBuilder::new(&anchored)
                    .size_limit(REGEX_SIZE_LIMIT * 16)
                    .build()
                    .map_err(|e| L7Error::new(at(".regex"), e.to_string()))?,
            )
        } else if let Some(cidrs) = &m.cidr {
            let mut nets = Vec::new();
            for (j, c) in cidrs.iter().enumerate() {
                nets.push(
                    crate::peer::parse_cidr(c)
                        .map_err(|e| L7Error::new(at(&format!(".cidr[{j}]")), e))?,
                );
            }
            if nets.is_empty() {
                return Err(L7Error::new(at(".cidr"), "needs at least one CIDR"));
            }
            ValueCheck::Cidr(nets)
        } else {
            ValueCheck::Present
        };
        if m.mismatch.is_some() && matches!(check, ValueCheck::Present) {
            return Err(L7Error::new(
                at(".mismatch"),
                "a mismatch action needs a `value` to compare with",
            ));
        }
        if matches!(
            m.mismatch,
            Some(MismatchAction::Add | MismatchAction::Replace)
        ) && !matches!(check, ValueCheck::Exact(_))
        {
            return Err(L7Error::new(
                at(".mismatch"),
                "ADD and REPLACE need an exact `value` to write",
            ));
        }
        headers.push(HeaderCheck {
            name: m.name.to_ascii_lowercase(),
            check,
            mismatch: m.mismatch,
        });
    }
    Ok(CompiledHttpRule {
        method,
        path,
        host,
        headers,
    })
}

/// One regex field of a set: distinct patterns and, per rule, its pattern index.
#[derive(Debug, Clone)]
struct FieldSet {
    /// Shared with every set of the same patterns (see [`cached_set`]).
    set: Option<Arc<RegexSet>>,
    /// Per rule: `None` = the rule does not constrain this field.
    index: Vec<Option<usize>>,
}

impl FieldSet {
    fn build(patterns: Vec<Option<&String>>, field: &str) -> Result<FieldSet, L7Error> {
        let mut distinct: Vec<&str> = Vec::new();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let index = patterns
            .into_iter()
            .map(|p| {
                p.map(|p| {
                    *seen.entry(p.as_str()).or_insert_with(|| {
                        distinct.push(p);
                        distinct.len() - 1
                    })
                })
            })
            .collect();
        let set = if distinct.is_empty() {
            None
        } else {
            Some(cached_set(&distinct).map_err(|e| {
                L7Error::new(
                    "",
                    format!("the {field} regexes of this rule list together are too large: {e}"),
                )
            })?)
        };
        Ok(FieldSet { set, index })
    }

    /// Matching pattern indices for `text` (empty when the field is unconstrained everywhere).
    fn scan(&self, text: &str) -> Vec<bool> {
        match &self.set {
            None => Vec::new(),
            Some(set) => {
                let m = set.matches(text);
                (0..set.len()).map(|i| m.matched(i)).collect()
            }
        }
    }
}

/// Compiled sets shared between rule lists with the same patterns (policies repeat their
/// paths a lot: 10,000 policies often hold a few hundred distinct lists). Shared through an
/// `Arc`, not cloned: a `RegexSet` clone shares the compiled program but gets its own pool of
/// match caches (a few KiB each, and a lazy DFA per pool once used), which at 10,000 rule lists
/// was most of their memory. Bounded: cleared when it grows past `SET_CACHE_MAX` entries.
fn cached_set(patterns: &[&str]) -> Result<Arc<RegexSet>, regex::Error> {
    use std::sync::{Mutex, OnceLock};
    const SET_CACHE_MAX: usize = 4096;
    static CACHE: OnceLock<Mutex<HashMap<Vec<String>, Arc<RegexSet>>>> = OnceLock::new();
    let key: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(set) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(set);
    }
    let set = Arc::new(
        RegexSetBuilder::new(patterns)
            .size_limit(REGEX_SIZE_LIMIT * 1024)
            .dfa_size_limit(8 << 20)
            .build()?,
    );
    if let Ok(mut c) = cache.lock() {
        if c.len() >= SET_CACHE_MAX {
            c.clear();
        }
        c.insert(key, set.clone());
    }
    Ok(set)
}

/// The HTTP rules of one port rule, compiled together.
#[derive(Debug, Clone)]
pub struct HttpRuleSet {
    rules: Vec<CompiledHttpRule>,
    method: FieldSet,
    path: FieldSet,
    host: FieldSet,
}

impl HttpRuleSet {
    pub fn new(rules: Vec<CompiledHttpRule>) -> Result<HttpRuleSet, L7Error> {
        let method = FieldSet::build(rules.iter().map(|r| r.method.as_ref()).collect(), "method")?;
        let path = FieldSet::build(rules.iter().map(|r| r.path.as_ref()).collect(), "path")?;
        let host = FieldSet::build(rules.iter().map(|r| r.host.as_ref()).collect(), "host")?;
        Ok(HttpRuleSet {
            rules,
            method,
            path,
            host,
        })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Push the index of every rule that matches `req`, in rule order.
    pub fn matching(&self, req: &HttpRequest<'_>, out: &mut Vec<usize>) {
        let m = self.method.scan(req.method);
        let p = self.path.scan(req.path);
        let h = self.host.scan(req.host);
        let hit = |fs: &FieldSet, bits: &[bool], i: usize| fs.index[i].is_none_or(|x| bits[x]);
        for (i, rule) in self.rules.iter().enumerate() {
            if hit(&self.method, &m, i)
                && hit(&self.path, &p, i)
                && hit(&self.host, &h, i)
                && rule.headers.iter().all(|hc| header_ok(hc, req))
            {
                out.push(i);
            }
        }
    }

    /// The header side effects of rule `i` (which matched `req`): mismatch actions (§7.3).
    pub fn header_edits(&self, i: usize, req: &HttpRequest<'_>) -> Vec<HeaderEdit> {
        let Some(rule) = self.rules.get(i) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for hc in &rule.headers {
            let Some(action) = hc.mismatch else { continue };
            let value = req.header(&hc.name);
            if value.as_deref().is_some_and(|v| hc.check.ok(v)) {
                continue;
            }
            let expected = match &hc.check {
                ValueCheck::Exact(v) => v.clone(),
                _ => String::new(),
            };
            let action = match action {
                MismatchAction::Log => HeaderEditAction::Log,
                MismatchAction::Add => HeaderEditAction::Add(expected),
                MismatchAction::Replace => HeaderEditAction::Replace(expected),
                // Deleting a header that is not there is a no-op (§7.3).
                MismatchAction::Delete if value.is_none() => continue,
                MismatchAction::Delete => HeaderEditAction::Delete,
            };
            out.push(HeaderEdit {
                name: hc.name.clone(),
                action,
            });
        }
        out
    }
}

/// A header check passes when the header satisfies it, or on a mismatch when the check has a
/// mismatch action (the rule still matches; the action runs, §7.3).
fn header_ok(hc: &HeaderCheck, req: &HttpRequest<'_>) -> bool {
    if hc.mismatch.is_some() {
        return true;
    }
    req.header(&hc.name).is_some_and(|v| hc.check.ok(&v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> api::HttpRule {
        let v = crate::yaml::parse_documents(yaml).unwrap().remove(0).value;
        serde_json::from_value(v).unwrap()
    }

    fn set(rules: &[&str]) -> HttpRuleSet {
        HttpRuleSet::new(
            rules
                .iter()
                .map(|r| compile_http_rule(&rule(r), true).unwrap())
                .collect(),
        )
        .unwrap()
    }

    fn req<'a>(
        method: &'a str,
        path: &'a str,
        headers: &'a [(&'a str, &'a str)],
    ) -> HttpRequest<'a> {
        HttpRequest {
            method,
            path,
            host: "api.example.com:8080",
            headers,
        }
    }

    fn hits(s: &HttpRuleSet, r: &HttpRequest<'_>) -> Vec<usize> {
        let mut out = Vec::new();
        s.matching(r, &mut out);
        out
    }

    #[test]
    fn regexes_are_full_match_and_case_sensitive_7_2() {
        let s = set(&["{path: '.*public$'}", "{method: GET}"]);
        assert_eq!(hits(&s, &req("POST", "/public", &[])), vec![0]);
        assert_eq!(hits(&s, &req("POST", "/maybe/public", &[])), vec![0]);
        assert!(hits(&s, &req("POST", "/publicz", &[])).is_empty());
        assert!(
            hits(&s, &req("get", "/x", &[])).is_empty(),
            "method is case-sensitive"
        );
        let s = set(&["{path: /public}"]);
        assert!(
            hits(&s, &req("GET", "/public?x=1", &[])).is_empty(),
            "the query string is part of :path"
        );
    }

    #[test]
    fn host_matches_authority_with_port_7_2() {
        let s = set(&[
            "{host: api.example.com}",
            "{host: 'api.example.com(:[0-9]+)?'}",
        ]);
        assert_eq!(hits(&s, &req("GET", "/", &[])), vec![1]);
    }

    #[test]
    fn headers_split_on_first_space_7_2() {
        let s = set(&[
            "{headers: ['X-My-Header: true']}",
            "{headers: [X-My-Header]}",
            "{headers: ['X-Key:true']}",
        ]);
        assert_eq!(
            hits(&s, &req("GET", "/", &[("x-my-header", "true")])),
            vec![0, 1]
        );
        assert_eq!(
            hits(&s, &req("GET", "/", &[("X-MY-HEADER", "false")])),
            vec![1]
        );
        assert!(hits(&s, &req("GET", "/", &[("x-key", "true")])).is_empty());
    }

    #[test]
    fn repeated_headers_are_joined_with_commas() {
        let s = set(&["{headers: ['Accept: a,b']}"]);
        assert_eq!(
            hits(&s, &req("GET", "/", &[("accept", "a"), ("Accept", "b")])),
            vec![0]
        );
    }

    #[test]
    fn header_matches_and_mismatch_actions_7_3() {
        let s = set(&[
            "{headerMatches: [{name: X-Token, value: s3cret}]}",
            "{headerMatches: [{name: X-Token, value: s3cret, mismatch: REPLACE}]}",
            "{headerMatches: [{name: X-Trace}]}",
            "{headerMatches: [{name: X-Bad, value: good, mismatch: DELETE}]}",
        ]);
        let r = req("GET", "/", &[("x-token", "wrong"), ("x-bad", "evil")]);
        assert_eq!(hits(&s, &r), vec![1, 3]);
        assert_eq!(
            s.header_edits(1, &r),
            vec![HeaderEdit {
                name: "x-token".into(),
                action: HeaderEditAction::Replace("s3cret".into())
            }]
        );
        assert_eq!(
            s.header_edits(3, &r),
            vec![HeaderEdit {
                name: "x-bad".into(),
                action: HeaderEditAction::Delete
            }]
        );
        let missing = req("GET", "/", &[]);
        assert!(
            s.header_edits(3, &missing).is_empty(),
            "DELETE of a missing header is a no-op"
        );
        let ok = req("GET", "/", &[("x-token", "s3cret"), ("x-trace", "1")]);
        assert_eq!(hits(&s, &ok), vec![0, 1, 2, 3]);
        assert!(s.header_edits(1, &ok).is_empty());
    }

    #[test]
    fn regex_and_cidr_header_extensions() {
        let s = set(&[
            "{headerMatches: [{name: User-Agent, regex: 'curl/.*'}]}",
            "{headerMatches: [{name: X-Forwarded-For, cidr: [10.0.0.0/8]}]}",
        ]);
        assert_eq!(
            hits(&s, &req("GET", "/", &[("user-agent", "curl/8.1")])),
            vec![0]
        );
        assert!(hits(&s, &req("GET", "/", &[("user-agent", "xcurl/8.1")])).is_empty());
        assert_eq!(
            hits(
                &s,
                &req("GET", "/", &[("x-forwarded-for", "10.1.2.3, 8.8.8.8")])
            ),
            vec![1]
        );
        assert!(
            hits(
                &s,
                &req("GET", "/", &[("x-forwarded-for", "8.8.8.8, 10.1.2.3")])
            )
            .is_empty()
        );
    }

    #[test]
    fn empty_rule_matches_everything() {
        assert_eq!(hits(&set(&["{}"]), &req("PATCH", "/x", &[])), vec![0]);
    }

    #[test]
    fn validation_errors_are_precise() {
        let err = |y: &str, ext: bool| compile_http_rule(&rule(y), ext).unwrap_err();
        assert_eq!(
            err("{method: '*'}", false),
            L7Error::new(
                "method",
                "invalid regex `*`: repetition operator missing expression"
            )
        );
        assert_eq!(
            err("{path: '(a'}", false).message,
            "invalid regex `(a`: unclosed group"
        );
        assert_eq!(
            err("{path: 'a{1000}{1000}'}", false),
            L7Error::new(
                "path",
                "regex too large (compiled size over the limit of 65536 bytes)"
            )
        );
        assert_eq!(
            err("{action: deny}", false),
            L7Error::new("action", "`action` is a TollgatePolicy extension")
        );
        assert_eq!(
            err("{headerMatches: [{name: a, regex: b}]}", false),
            L7Error::new(
                "headerMatches[0].regex",
                "`regex` is a TollgatePolicy extension"
            )
        );
        assert_eq!(
            err(
                "{headerMatches: [{name: a, secret: {name: s, namespace: n}}]}",
                false
            ),
            L7Error::new(
                "headerMatches[0].secret",
                "`secret` is not supported by tollgate (put the value inline)"
            )
        );
        assert_eq!(
            err("{headerMatches: [{name: a, mismatch: LOG}]}", false),
            L7Error::new(
                "headerMatches[0].mismatch",
                "a mismatch action needs a `value` to compare with"
            )
        );
        assert_eq!(
            err("{headerMatches: [{name: a, cidr: [10.0.0/8]}]}", true),
            L7Error::new(
                "headerMatches[0].cidr[0]",
                "`10.0.0/8` is not a valid CIDR or IP address"
            )
        );
        assert_eq!(
            err("{headerMatches: [{name: a, cidr: ['10.0.0.0/8']}]}", false),
            L7Error::new(
                "headerMatches[0].cidr",
                "`cidr` is a TollgatePolicy extension"
            )
        );
        assert_eq!(
            err("{headerMatches: [{name: a, cidr: []}]}", true),
            L7Error::new("headerMatches[0].cidr", "needs at least one CIDR")
        );
        assert_eq!(
            err("{headerMatches: [{name: a, value: b, regex: c}]}", true),
            L7Error::new(
                "headerMatches[0]",
                "at most one of `value`, `regex` or `cidr` may be set"
            )
        );
        assert_eq!(
            err(
                "{headerMatches: [{name: a, regex: 'b.*', mismatch: ADD}]}",
                true
            ),
            L7Error::new(
                "headerMatches[0].mismatch",
                "ADD and REPLACE need an exact `value` to write"
            )
        );
        assert_eq!(
            err("{headerMatches: [{name: '', value: b}]}", false),
            L7Error::new("headerMatches[0].name", "header name must not be empty")
        );
        assert_eq!(
            err("{headers: ['ok', ' x']}", false),
            L7Error::new("headers[1]", "header name must not be empty")
        );
        assert_eq!(
            err("{headerMatches: [{name: a, regex: '[b'}]}", true).message,
            "invalid regex `[b`: unclosed character class"
        );
    }

    /// A naive reference: one regex per rule field, checked in a loop.
    fn naive(rules: &[(Option<String>, Option<String>)], method: &str, path: &str) -> Vec<usize> {
        rules
            .iter()
            .enumerate()
            .filter(|(_, (m, p))| {
                let ok = |pat: &Option<String>, t: &str| {
                    pat.as_ref()
                        .is_none_or(|p| Regex::new(&format!("^(?:{p})$")).unwrap().is_match(t))
                };
                ok(m, method) && ok(p, path)
            })
            .map(|(i, _)| i)
            .collect()
    }

    proptest::proptest! {
        #[test]
        fn set_matching_equals_naive_reference(
            rules in proptest::collection::vec(
                (proptest::option::of(proptest::sample::select(vec!["GET", "POST", "GET|HEAD", "P.*", "[A-Z]+"])),
                 proptest::option::of(proptest::sample::select(vec!["/", "/a", "/a/.*", ".*b", "/[0-9]+", "/a|/b"]))),
                0..12),
            method in proptest::sample::select(vec!["GET", "POST", "HEAD", "PUT", "get"]),
            path in proptest::sample::select(vec!["/", "/a", "/a/x", "/b", "/ab", "/12", "/a?b"]),
        ) {
            let owned: Vec<(Option<String>, Option<String>)> =
                rules.iter().map(|(m, p)| (m.map(str::to_string), p.map(str::to_string))).collect();
            let compiled = owned
                .iter()
                .map(|(m, p)| compile_http_rule(&api::HttpRule { method: m.clone(), path: p.clone(), ..Default::default() }, false).unwrap())
                .collect();
            let s = HttpRuleSet::new(compiled).unwrap();
            let mut got = Vec::new();
            s.matching(&req(method, path, &[]), &mut got);
            proptest::prop_assert_eq!(got, naive(&owned, method, path));
        }
    }
}
