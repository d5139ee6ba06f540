//! Compiled L7 matchers: HTTP, gRPC, Kafka, DNS names and TLS server names.
//!
//! Each `compile_*` function validates one API rule (with Cilium's sanitize checks, and the
//! TollgatePolicy-only fields rejected when `ext` is false) and returns a compiled rule or an
//! [`L7Error`] whose `path` is relative to the rule (`headerMatches[1].regex`). Rule *sets*
//! are built once per port rule and evaluated per request without compiling anything:
//! HTTP regexes of a set run as one `RegexSet` per field, DNS names as a hash lookup plus one
//! `RegexSet` for the patterns.

mod dns;
mod glob;
mod grpc;
mod http;
mod kafka;
mod sni;

pub use dns::{DnsPattern, DnsRuleSet, FqdnSelector};
pub use grpc::{CompiledGrpcRule, GrpcCall, GrpcRuleSet, compile_grpc_rule};
pub use http::{
    CompiledHttpRule, HeaderEdit, HeaderEditAction, HttpRequest, HttpRuleSet, compile_http_rule,
};
pub use kafka::{
    CompiledKafkaRule, KafkaOutcome, KafkaRequest, KafkaRuleSet, compile_kafka_rule,
    evaluate_rules as evaluate_kafka_rules, kafka_api_key, kafka_api_key_name,
};
pub use sni::ServerNamePattern;

/// A problem in one L7 rule; `path` is relative to the rule (empty: the rule itself).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct L7Error {
    pub path: String,
    pub message: String,
}

impl L7Error {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> L7Error {
        L7Error {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Compiled-size limit of one regex (the NFA, in bytes).
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;

/// Check that `pattern` is a valid RE2-style regex within [`REGEX_SIZE_LIMIT`], and return it
/// anchored for full-string matching (§7.2: Envoy's RegexMatcher matches the full string).
pub(crate) fn checked_full_match(pattern: &str, field: &str) -> Result<String, L7Error> {
    let anchored = format!("^(?:{pattern})$");
    let nfa = regex_automata::nfa::thompson::Compiler::new()
        .configure(
            regex_automata::nfa::thompson::Config::new().nfa_size_limit(Some(REGEX_SIZE_LIMIT)),
        )
        .build(&anchored);
    match nfa {
        Ok(_) => Ok(anchored),
        Err(e) => {
            let msg = e.to_string();
            if msg.contains("exceeded limit") || msg.contains("size limit") {
                Err(L7Error::new(
                    field,
                    format!(
                        "regex too large (compiled size over the limit of {REGEX_SIZE_LIMIT} bytes)"
                    ),
                ))
            } else {
                // The syntax error, without the anchoring we added.
                let detail = regex_syntax::Parser::new()
                    .parse(pattern)
                    .err()
                    .map(|e| first_line_of_kind(&e.to_string()))
                    .unwrap_or(msg);
                Err(L7Error::new(
                    field,
                    format!("invalid regex `{pattern}`: {detail}"),
                ))
            }
        }
    }
}

/// regex-syntax errors are multi-line (pattern, caret, "error: …"); keep the reason.
fn first_line_of_kind(s: &str) -> String {
    s.lines()
        .find_map(|l| l.strip_prefix("error: "))
        .unwrap_or(s)
        .to_string()
}
