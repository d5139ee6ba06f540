//! TEMPORARY naive L7 matchers so the rest of the crate compiles while `l7/` is written.
//! Not committed; replaced by the real module.
#![allow(missing_docs, dead_code)]

use crate::api;
use regex::Regex;

#[derive(Debug, Clone)]
pub struct L7Error {
    pub path: String,
    pub message: String,
}

fn re(s: &str, path: &str) -> Result<Regex, L7Error> {
    Regex::new(&format!("^(?:{s})$")).map_err(|e| L7Error {
        path: path.into(),
        message: e.to_string(),
    })
}

#[derive(Debug, Clone)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
}
#[derive(Debug, Clone)]
pub struct GrpcCall<'a> {
    pub service: &'a str,
    pub method: &'a str,
}
#[derive(Debug, Clone)]
pub struct KafkaRequest<'a> {
    pub api_key: i16,
    pub api_version: i16,
    pub client_id: Option<&'a str>,
    pub topics: &'a [&'a str],
    pub group_id: Option<&'a str>,
    pub transactional_id: Option<&'a str>,
}

#[derive(Debug, Clone)]
pub struct CompiledHttpRule {
    method: Option<Regex>,
    path: Option<Regex>,
    host: Option<Regex>,
    headers: Vec<(String, Option<String>)>,
}
pub fn compile_http_rule(r: &api::HttpRule, _ext: bool) -> Result<CompiledHttpRule, L7Error> {
    let mut headers = Vec::new();
    for h in r.headers.iter().flatten() {
        match h.split_once(' ') {
            Some((n, v)) => headers.push((
                n.trim_end_matches(':').to_ascii_lowercase(),
                Some(v.to_string()),
            )),
            None => headers.push((h.to_ascii_lowercase(), None)),
        }
    }
    for h in r.header_matches.iter().flatten() {
        headers.push((h.name.to_ascii_lowercase(), h.value.clone()));
    }
    Ok(CompiledHttpRule {
        method: r.method.as_deref().map(|s| re(s, "method")).transpose()?,
        path: r.path.as_deref().map(|s| re(s, "path")).transpose()?,
        host: r.host.as_deref().map(|s| re(s, "host")).transpose()?,
        headers,
    })
}
#[derive(Debug, Clone)]
pub struct HttpRuleSet(Vec<CompiledHttpRule>);
impl HttpRuleSet {
    pub fn new(v: Vec<CompiledHttpRule>) -> Result<Self, L7Error> {
        Ok(HttpRuleSet(v))
    }
    pub fn matching(&self, req: &HttpRequest<'_>, out: &mut Vec<usize>) {
        for (i, r) in self.0.iter().enumerate() {
            let ok = r.method.as_ref().is_none_or(|m| m.is_match(req.method))
                && r.path.as_ref().is_none_or(|m| m.is_match(req.path))
                && r.host.as_ref().is_none_or(|m| m.is_match(req.host))
                && r.headers.iter().all(|(n, v)| {
                    let vals: Vec<&str> = req
                        .headers
                        .iter()
                        .filter(|(k, _)| k.eq_ignore_ascii_case(n))
                        .map(|(_, v)| *v)
                        .collect();
                    !vals.is_empty() && v.as_ref().is_none_or(|v| vals.join(",") == *v)
                });
            if ok {
                out.push(i)
            }
        }
    }
}
#[derive(Debug, Clone)]
pub struct CompiledGrpcRule(api::GrpcRule);
pub fn compile_grpc_rule(r: &api::GrpcRule) -> Result<CompiledGrpcRule, L7Error> {
    Ok(CompiledGrpcRule(r.clone()))
}
#[derive(Debug, Clone)]
pub struct GrpcRuleSet(Vec<CompiledGrpcRule>);
impl GrpcRuleSet {
    pub fn new(v: Vec<CompiledGrpcRule>) -> Self {
        GrpcRuleSet(v)
    }
    pub fn matching(&self, c: &GrpcCall<'_>, out: &mut Vec<usize>) {
        for (i, r) in self.0.iter().enumerate() {
            if r.0.service.as_deref().is_none_or(|s| s == c.service)
                && r.0.method.as_deref().is_none_or(|m| m == c.method)
            {
                out.push(i)
            }
        }
    }
}
#[derive(Debug, Clone)]
pub struct CompiledKafkaRule(api::KafkaRule);
pub fn compile_kafka_rule(r: &api::KafkaRule, _ext: bool) -> Result<CompiledKafkaRule, L7Error> {
    Ok(CompiledKafkaRule(r.clone()))
}
pub fn kafka_api_key(name: &str) -> Option<i16> {
    Some(match name {
        "produce" => 0,
        "fetch" => 1,
        "metadata" => 3,
        _ => return None,
    })
}
#[derive(Debug, Clone)]
pub struct KafkaRuleSet(Vec<CompiledKafkaRule>);
#[derive(Debug, Clone, Default)]
pub struct KafkaOutcome {
    pub allowed: bool,
    pub deny_rule: Option<usize>,
    pub allow_rules: Vec<usize>,
    pub uncovered_topics: Vec<String>,
}
impl KafkaRuleSet {
    pub fn new(v: Vec<CompiledKafkaRule>) -> Self {
        KafkaRuleSet(v)
    }
    pub fn rules(&self) -> &[CompiledKafkaRule] {
        &self.0
    }
    pub fn evaluate(&self, _r: &KafkaRequest<'_>) -> KafkaOutcome {
        KafkaOutcome::default()
    }
}
#[derive(Debug, Clone)]
pub struct DnsPattern(Regex);
impl DnsPattern {
    pub fn from_rule(r: &api::DnsRule) -> Result<Self, L7Error> {
        let p = r
            .match_name
            .clone()
            .or(r.match_pattern.clone())
            .unwrap_or_default();
        re(
            &regex::escape(&p).replace("\\*", "[-a-zA-Z0-9_]*"),
            "matchPattern",
        )
        .map(DnsPattern)
    }
}
#[derive(Debug, Clone)]
pub struct DnsRuleSet(Vec<DnsPattern>);
impl DnsRuleSet {
    pub fn new(v: Vec<DnsPattern>) -> Self {
        DnsRuleSet(v)
    }
    pub fn first_match(&self, q: &str) -> Option<usize> {
        let q = q.trim_end_matches('.').to_ascii_lowercase();
        self.0.iter().position(|p| p.0.is_match(&q))
    }
}
#[derive(Debug, Clone)]
pub struct FqdnSelector(DnsPattern);
impl FqdnSelector {
    pub fn new(s: &api::FqdnSelector) -> Result<Self, L7Error> {
        DnsPattern::from_rule(&api::DnsRule {
            match_name: s.match_name.clone(),
            match_pattern: s.match_pattern.clone(),
        })
        .map(FqdnSelector)
    }
    pub fn matches(&self, n: &str) -> bool {
        self.0
            .0
            .is_match(&n.trim_end_matches('.').to_ascii_lowercase())
    }
}
#[derive(Debug, Clone)]
pub struct ServerNamePattern(String);
impl ServerNamePattern {
    pub fn new(s: &str) -> Result<Self, L7Error> {
        Ok(ServerNamePattern(s.to_string()))
    }
    pub fn matches(&self, s: &str) -> bool {
        self.0.eq_ignore_ascii_case(s)
    }
}
