//! Kafka rules (cnp-semantics §8): `role` / `apiKey` / `apiVersion` / `clientID` / `topic`,
//! plus TollgatePolicy's topic globs, `groupID`, `transactionalID` and deny rules.
//!
//! Topic checks are Cilium's set cover: a request is allowed only if every topic it names is
//! covered by some matching allow rule (each topic may be covered by a different rule). Topics
//! count only for the keys Cilium extracts them from (Produce, Fetch, ListOffsets, Metadata,
//! OffsetCommit, OffsetFetch); for the other topic-bearing keys a topic-restricted rule never
//! allows, and an empty topic list (Metadata "all topics") is allowed only by a rule without
//! a topic (§8.3).

use super::L7Error;
use super::glob::glob_match;
use crate::api;

/// Every Kafka API key by its lowercase protocol name (and Cilium's aliases).
const API_KEYS: &[(&str, i16)] = &[
    ("produce", 0),
    ("fetch", 1),
    ("listoffsets", 2),
    ("offsets", 2),
    ("metadata", 3),
    ("leaderandisr", 4),
    ("stopreplica", 5),
    ("updatemetadata", 6),
    ("controlledshutdown", 7),
    ("offsetcommit", 8),
    ("offsetfetch", 9),
    ("findcoordinator", 10),
    ("joingroup", 11),
    ("heartbeat", 12),
    ("leavegroup", 13),
    ("syncgroup", 14),
    ("describegroups", 15),
    ("listgroups", 16),
    ("saslhandshake", 17),
    ("apiversions", 18),
    ("createtopics", 19),
    ("deletetopics", 20),
    ("deleterecords", 21),
    ("initproducerid", 22),
    ("offsetforleaderepoch", 23),
    ("addpartitionstotxn", 24),
    ("addoffsetstotxn", 25),
    ("endtxn", 26),
    ("writetxnmarkers", 27),
    ("txnoffsetcommit", 28),
    ("describeacls", 29),
    ("createacls", 30),
    ("deleteacls", 31),
    ("describeconfigs", 32),
    ("alterconfigs", 33),
    ("alterreplicalogdirs", 34),
    ("describelogdirs", 35),
    ("saslauthenticate", 36),
    ("createpartitions", 37),
    ("createdelegationtoken", 38),
    ("renewdelegationtoken", 39),
    ("expiredelegationtoken", 40),
    ("describedelegationtoken", 41),
    ("deletegroups", 42),
    ("electleaders", 43),
    ("incrementalalterconfigs", 44),
    ("alterpartitionreassignments", 45),
    ("listpartitionreassignments", 46),
    ("offsetdelete", 47),
    ("describeclientquotas", 48),
    ("alterclientquotas", 49),
    ("describeuserscramcredentials", 50),
    ("alteruserscramcredentials", 51),
    ("vote", 52),
    ("beginquorumepoch", 53),
    ("endquorumepoch", 54),
    ("describequorum", 55),
    ("alterpartition", 56),
    ("updatefeatures", 57),
    ("envelope", 58),
    ("fetchsnapshot", 59),
    ("describecluster", 60),
    ("describeproducers", 61),
    ("brokerregistration", 62),
    ("brokerheartbeat", 63),
    ("unregisterbroker", 64),
    ("describetransactions", 65),
    ("listtransactions", 66),
    ("allocateproducerids", 67),
    ("consumergroupheartbeat", 68),
    ("consumergroupdescribe", 69),
    ("controllerregistration", 70),
    ("gettelemetrysubscriptions", 71),
    ("pushtelemetry", 72),
    ("assignreplicastodirs", 73),
    ("listclientmetricsresources", 74),
    ("describetopicpartitions", 75),
];

/// The API key of a name (case-insensitive; Cilium's names and every newer protocol name).
pub fn kafka_api_key(name: &str) -> Option<i16> {
    let lower = name.to_ascii_lowercase();
    API_KEYS.iter().find(|(n, _)| *n == lower).map(|(_, k)| *k)
}

/// The protocol name of an API key (for audit records).
pub fn kafka_api_key_name(key: i16) -> Option<&'static str> {
    API_KEYS
        .iter()
        .find(|(n, k)| *k == key && *n != "offsets")
        .map(|(n, _)| *n)
}

const PRODUCE_KEYS: &[i16] = &[0, 3, 18];
const CONSUME_KEYS: &[i16] = &[1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18];
/// Keys whose topics Cilium extracts and checks.
const TOPIC_EXTRACTED: &[i16] = &[0, 1, 2, 3, 8, 9];
/// Keys whose requests name a consumer group (OffsetCommit, OffsetFetch, FindCoordinator,
/// JoinGroup, Heartbeat, LeaveGroup, SyncGroup, DescribeGroups, AddOffsetsToTxn,
/// TxnOffsetCommit, DeleteGroups, OffsetDelete, ConsumerGroupHeartbeat/Describe). A
/// FindCoordinator for a transaction names none and is matched by `transactionalID` instead.
const GROUP_BEARING: &[i16] = &[8, 9, 10, 11, 12, 13, 14, 15, 25, 28, 42, 47, 68, 69];
/// Keys that carry topics (§8.3).
const TOPIC_BEARING: &[i16] = &[
    0, 1, 2, 3, 4, 5, 6, 8, 9, 19, 20, 21, 23, 24, 27, 28, 34, 35, 37,
];

/// A Kafka request as the parser summarised it.
#[derive(Debug, Clone, Copy)]
pub struct KafkaRequest<'a> {
    pub api_key: i16,
    pub api_version: i16,
    /// From the request header (absent for header v0).
    pub client_id: Option<&'a str>,
    pub topics: &'a [&'a str],
    pub group_id: Option<&'a str>,
    pub transactional_id: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledKafkaRule {
    /// Empty: every key.
    keys: Vec<i16>,
    /// -1: every version.
    version: i16,
    client_id: Option<String>,
    topic: Option<String>,
    group_id: Option<String>,
    transactional_id: Option<String>,
    deny: bool,
}

fn valid_topic(t: &str, ext: bool) -> bool {
    t.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || (ext && c == '*'))
}

pub fn compile_kafka_rule(r: &api::KafkaRule, ext: bool) -> Result<CompiledKafkaRule, L7Error> {
    for (name, set) in [
        ("groupID", r.group_id.is_some()),
        ("transactionalID", r.transactional_id.is_some()),
        ("action", r.action.is_some()),
    ] {
        if set && !ext {
            return Err(L7Error::new(
                name,
                format!("`{name}` is a TollgatePolicy extension"),
            ));
        }
    }
    if r.role.is_some() && r.api_key.is_some() {
        return Err(L7Error::new("role", "cannot set both role and apiKey"));
    }
    let keys = match (&r.role, &r.api_key) {
        (Some(role), _) => match role.to_ascii_lowercase().as_str() {
            "produce" => PRODUCE_KEYS.to_vec(),
            "consume" => CONSUME_KEYS.to_vec(),
            _ => {
                return Err(L7Error::new(
                    "role",
                    format!("unknown role `{role}` (expected produce or consume)"),
                ));
            }
        },
        (None, Some(k)) => {
            match kafka_api_key(k).or_else(|| k.parse::<i16>().ok().filter(|n| *n >= 0)) {
                Some(n) => vec![n],
                None => {
                    return Err(L7Error::new(
                        "apiKey",
                        format!("unknown Kafka apiKey `{k}`"),
                    ));
                }
            }
        }
        (None, None) => Vec::new(),
    };
    let version = match &r.api_version {
        None => -1,
        Some(v) => match v.0.parse::<i16>() {
            Ok(n) if n >= 0 => n,
            _ => {
                return Err(L7Error::new(
                    "apiVersion",
                    format!(
                        "`{}` is not an API version (an integer from 0 to 32767)",
                        v.0
                    ),
                ));
            }
        },
    };
    if let Some(t) = &r.topic {
        if t.is_empty() || t.len() > 255 {
            return Err(L7Error::new(
                "topic",
                "a topic name has 1 to 255 characters",
            ));
        }
        if !valid_topic(t, ext) {
            let hint = if !ext && t.contains('*') {
                " (topic globs are a TollgatePolicy extension)"
            } else {
                ""
            };
            return Err(L7Error::new(
                "topic",
                format!("`{t}` is not a valid topic name: only [a-zA-Z0-9._-] are allowed{hint}"),
            ));
        }
    }
    Ok(CompiledKafkaRule {
        keys,
        version,
        // Cilium treats an empty clientID as "any client" (§8.3 compares only when set).
        client_id: r.client_id.clone().filter(|c| !c.is_empty()),
        topic: r.topic.clone(),
        group_id: r.group_id.clone(),
        transactional_id: r.transactional_id.clone(),
        deny: r.action == Some(api::RuleAction::Deny),
    })
}

impl CompiledKafkaRule {
    /// Key, version, client id, group and transactional id (everything but topics).
    fn matches_request(&self, req: &KafkaRequest<'_>) -> bool {
        let client = if req.api_version == 0 {
            ""
        } else {
            req.client_id.unwrap_or("")
        };
        (self.keys.is_empty() || self.keys.contains(&req.api_key))
            && (self.version == -1 || self.version == req.api_version)
            && self.client_id.as_deref().is_none_or(|c| c == client)
            // A consumer group constrains the requests that name one; Fetch, ListOffsets and
            // Metadata name none, so a group-restricted consume rule still lets its members
            // read (as `topic` is ignored for keys without topics, §8.3).
            && self.group_id.as_deref().is_none_or(|g| match req.group_id {
                Some(x) => glob_match(g, x),
                None => !GROUP_BEARING.contains(&req.api_key),
            })
            && self
                .transactional_id
                .as_deref()
                .is_none_or(|t| req.transactional_id.is_some_and(|x| glob_match(t, x)))
    }
}

/// The outcome of evaluating one request against a rule set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KafkaOutcome {
    pub allowed: bool,
    /// The first deny rule that matched.
    pub deny_rule: Option<usize>,
    /// Allow rules that covered the request.
    pub allow_rules: Vec<usize>,
    /// Topics no allow rule covered (when denied for topics).
    pub uncovered_topics: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct KafkaRuleSet {
    rules: Vec<CompiledKafkaRule>,
}

impl KafkaRuleSet {
    pub fn new(rules: Vec<CompiledKafkaRule>) -> KafkaRuleSet {
        KafkaRuleSet { rules }
    }

    pub fn rules(&self) -> &[CompiledKafkaRule] {
        &self.rules
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn evaluate(&self, req: &KafkaRequest<'_>) -> KafkaOutcome {
        let rules: Vec<&CompiledKafkaRule> = self.rules.iter().collect();
        evaluate_rules(&rules, req)
    }
}

/// [`KafkaRuleSet::evaluate`] over borrowed rules (the evaluator's set cover spans the rules of
/// several entries; borrowing them costs no copy per request). Indices in the outcome are into
/// `rules`.
pub fn evaluate_rules(rules: &[&CompiledKafkaRule], req: &KafkaRequest<'_>) -> KafkaOutcome {
    let extracted = TOPIC_EXTRACTED.contains(&req.api_key);
    let bearing = TOPIC_BEARING.contains(&req.api_key);
    let mut topics: Vec<&str> = req.topics.to_vec();
    topics.sort_unstable();
    topics.dedup();

    let deny_rule = rules.iter().position(|r| {
        r.deny
            && r.matches_request(req)
            && match &r.topic {
                None => true,
                Some(t) => extracted && topics.iter().any(|x| glob_match(t, x)),
            }
    });
    if deny_rule.is_some() {
        return KafkaOutcome {
            deny_rule,
            uncovered_topics: topics.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        };
    }
    let candidates: Vec<usize> = (0..rules.len())
        .filter(|&i| !rules[i].deny && rules[i].matches_request(req))
        .collect();
    // A matching rule without a topic allows the whole request, topics or not.
    if let Some(&i) = candidates.iter().find(|&&i| rules[i].topic.is_none()) {
        return KafkaOutcome {
            allowed: true,
            allow_rules: vec![i],
            ..Default::default()
        };
    }
    if !bearing {
        // Topic-less keys ignore the rule's topic (§8.3).
        return match candidates.first() {
            Some(&i) => KafkaOutcome {
                allowed: true,
                allow_rules: vec![i],
                ..Default::default()
            },
            None => KafkaOutcome::default(),
        };
    }
    if !extracted || topics.is_empty() {
        return KafkaOutcome {
            uncovered_topics: topics.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        };
    }
    let mut used = Vec::new();
    let mut uncovered = Vec::new();
    for t in &topics {
        match candidates
            .iter()
            .find(|&&i| rules[i].topic.as_deref().is_some_and(|p| glob_match(p, t)))
        {
            Some(&i) => {
                if !used.contains(&i) {
                    used.push(i);
                }
            }
            None => uncovered.push(t.to_string()),
        }
    }
    KafkaOutcome {
        allowed: uncovered.is_empty(),
        deny_rule: None,
        allow_rules: if uncovered.is_empty() {
            used
        } else {
            Vec::new()
        },
        uncovered_topics: uncovered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> CompiledKafkaRule {
        let v = crate::yaml::parse_documents(yaml).unwrap().remove(0).value;
        compile_kafka_rule(&serde_json::from_value(v).unwrap(), true).unwrap()
    }

    fn set(rules: &[&str]) -> KafkaRuleSet {
        KafkaRuleSet::new(rules.iter().map(|r| rule(r)).collect())
    }

    fn req<'a>(key: i16, topics: &'a [&'a str]) -> KafkaRequest<'a> {
        KafkaRequest {
            api_key: key,
            api_version: 5,
            client_id: Some("client-1"),
            topics,
            group_id: None,
            transactional_id: None,
        }
    }

    #[test]
    fn multi_topic_requests_need_every_topic_covered_8_3() {
        // TestProduceRequest: {foo,bar} with rules foo+bar allowed; foo only denied; foo+baz denied.
        let foo_bar = set(&[
            "{apiKey: produce, topic: foo}",
            "{apiKey: produce, topic: bar}",
        ]);
        assert!(foo_bar.evaluate(&req(0, &["foo", "bar"])).allowed);
        let foo = set(&["{apiKey: produce, topic: foo}"]);
        let out = foo.evaluate(&req(0, &["foo", "bar", "foo"]));
        assert!(!out.allowed);
        assert_eq!(out.uncovered_topics, vec!["bar"]);
        let foo_baz = set(&[
            "{apiKey: produce, topic: foo}",
            "{apiKey: produce, topic: baz}",
        ]);
        assert!(!foo_baz.evaluate(&req(0, &["foo", "bar"])).allowed);
    }

    #[test]
    fn roles_expand_to_cilium_key_sets_8_2() {
        let produce = set(&["{role: produce, topic: t}"]);
        assert!(produce.evaluate(&req(0, &["t"])).allowed);
        assert!(produce.evaluate(&req(3, &["t"])).allowed);
        assert!(
            produce.evaluate(&req(18, &[])).allowed,
            "ApiVersions ignores topic"
        );
        assert!(
            !produce.evaluate(&req(1, &["t"])).allowed,
            "fetch is not produce"
        );
        let consume = set(&["{role: consume, topic: t}"]);
        for k in [1, 2, 3, 8, 9] {
            assert!(consume.evaluate(&req(k, &["t"])).allowed, "key {k}");
        }
        for k in [10, 11, 12, 13, 14, 18] {
            assert!(consume.evaluate(&req(k, &[])).allowed, "topic-less key {k}");
        }
        assert!(!consume.evaluate(&req(0, &["t"])).allowed);
        assert!(!consume.evaluate(&req(19, &[])).allowed, "createtopics");
    }

    #[test]
    fn empty_topic_lists_and_non_extracted_keys_8_3() {
        let s = set(&["{topic: t}"]);
        assert!(!s.evaluate(&req(3, &[])).allowed, "metadata for all topics");
        assert!(
            !s.evaluate(&req(19, &["t"])).allowed,
            "createtopics never allowed by topic rules"
        );
        assert!(s.evaluate(&req(11, &[])).allowed, "joingroup ignores topic");
        let any = set(&["{}"]);
        assert!(any.evaluate(&req(3, &[])).allowed);
        assert!(any.evaluate(&req(19, &["t"])).allowed);
    }

    #[test]
    fn client_id_never_matches_v0_and_versions_are_exact_8_3() {
        let s = set(&["{clientID: client-1}"]);
        assert!(s.evaluate(&req(0, &["t"])).allowed);
        let v0 = KafkaRequest {
            api_version: 0,
            ..req(0, &["t"])
        };
        assert!(!s.evaluate(&v0).allowed);
        let v = set(&["{apiKey: fetch, apiVersion: 11}"]);
        assert!(!v.evaluate(&req(1, &["t"])).allowed);
        assert!(
            v.evaluate(&KafkaRequest {
                api_version: 11,
                ..req(1, &["t"])
            })
            .allowed
        );
    }

    #[test]
    fn tollgate_extensions_globs_groups_transactions_and_deny() {
        let s = set(&[
            "{role: consume, topic: 'orders-*', groupID: 'billing-*'}",
            "{transactionalID: 'tx-*'}",
            "{topic: orders-secret, action: deny}",
        ]);
        // OffsetCommit names its group: it must match.
        let commit = |g: Option<&'static str>| KafkaRequest {
            group_id: g,
            ..req(8, &["orders-eu"])
        };
        assert!(s.evaluate(&commit(Some("billing-a"))).allowed);
        assert!(!s.evaluate(&commit(Some("other"))).allowed);
        assert!(!s.evaluate(&commit(None)).allowed);
        // Fetch and ListOffsets name no group: the group's members can read.
        assert!(s.evaluate(&req(1, &["orders-eu"])).allowed);
        assert!(s.evaluate(&req(2, &["orders-eu"])).allowed);
        assert!(!s.evaluate(&req(1, &["payments"])).allowed);
        // A FindCoordinator for a transaction names no group: the group rule does not allow it.
        let group_only = set(&["{role: consume, topic: 'orders-*', groupID: 'billing-*'}"]);
        assert!(!group_only.evaluate(&req(10, &[])).allowed);
        let find_group = KafkaRequest {
            group_id: Some("billing-eu"),
            ..req(10, &[])
        };
        assert!(group_only.evaluate(&find_group).allowed);
        let tx = KafkaRequest {
            transactional_id: Some("tx-1"),
            ..req(22, &[])
        };
        assert!(s.evaluate(&tx).allowed);
        let denied = s.evaluate(&KafkaRequest {
            group_id: Some("billing-a"),
            ..req(1, &["orders-eu", "orders-secret"])
        });
        assert!(!denied.allowed);
        assert_eq!(denied.deny_rule, Some(2));
    }

    #[test]
    fn validation_errors() {
        let err = |y: &str, ext: bool| {
            let v = crate::yaml::parse_documents(y).unwrap().remove(0).value;
            compile_kafka_rule(&serde_json::from_value(v).unwrap(), ext).unwrap_err()
        };
        assert_eq!(
            err("{role: produce, apiKey: fetch}", false),
            L7Error::new("role", "cannot set both role and apiKey")
        );
        assert_eq!(
            err("{apiKey: createtopic}", false),
            L7Error::new("apiKey", "unknown Kafka apiKey `createtopic`")
        );
        assert_eq!(
            err("{role: admin}", false).message,
            "unknown role `admin` (expected produce or consume)"
        );
        assert_eq!(
            err("{apiVersion: -1}", false).message,
            "`-1` is not an API version (an integer from 0 to 32767)"
        );
        assert_eq!(
            err("{topic: 'orders-*'}", false).message,
            "`orders-*` is not a valid topic name: only [a-zA-Z0-9._-] are allowed (topic globs are a TollgatePolicy extension)"
        );
        assert_eq!(
            err("{groupID: g}", false).message,
            "`groupID` is a TollgatePolicy extension"
        );
        assert_eq!(
            err("{transactionalID: t}", false).message,
            "`transactionalID` is a TollgatePolicy extension"
        );
        assert_eq!(
            err("{action: deny}", false),
            L7Error::new("action", "`action` is a TollgatePolicy extension")
        );
        let long = format!("{{topic: {}}}", "t".repeat(256));
        assert_eq!(
            err(&long, false),
            L7Error::new("topic", "a topic name has 1 to 255 characters")
        );
        assert_eq!(
            err("{apiKey: '-1'}", false),
            L7Error::new("apiKey", "unknown Kafka apiKey `-1`")
        );
        // Numbers are accepted as keys, and topic globs in TollgatePolicy documents.
        let ok = |y: &str| {
            let v = crate::yaml::parse_documents(y).unwrap().remove(0).value;
            compile_kafka_rule(&serde_json::from_value(v).unwrap(), true)
        };
        assert!(ok("{apiKey: '18', topic: 'orders-*'}").is_ok());
        assert_eq!(
            err("{topic: 'a/b'}", true).message,
            "`a/b` is not a valid topic name: only [a-zA-Z0-9._-] are allowed"
        );
        assert_eq!(kafka_api_key("CreateTopics"), Some(19));
        assert_eq!(kafka_api_key_name(2), Some("listoffsets"));
    }

    #[test]
    fn empty_client_id_means_any_client_8_3() {
        let s = set(&["{clientID: ''}"]);
        let mut r = req(0, &["t"]);
        r.api_version = 0;
        assert!(s.evaluate(&r).allowed);
        // A non-empty clientID never matches a v0 request (the id is read only from v1+).
        let s = set(&["{clientID: client-1}"]);
        assert!(!s.evaluate(&r).allowed);
        r.api_version = 1;
        assert!(s.evaluate(&r).allowed);
    }

    /// Naive reference for the set cover: a topic is covered if some allow rule matching the
    /// request names it; a topic-less matching rule covers everything.
    fn naive(rules: &[CompiledKafkaRule], r: &KafkaRequest<'_>) -> bool {
        let m: Vec<&CompiledKafkaRule> = rules.iter().filter(|x| x.matches_request(r)).collect();
        if m.iter().any(|x| x.topic.is_none()) {
            return true;
        }
        if !TOPIC_BEARING.contains(&r.api_key) {
            return !m.is_empty();
        }
        if !TOPIC_EXTRACTED.contains(&r.api_key) || r.topics.is_empty() {
            return false;
        }
        r.topics.iter().all(|t| {
            m.iter()
                .any(|x| x.topic.as_deref().is_some_and(|p| glob_match(p, t)))
        })
    }

    proptest::proptest! {
        #[test]
        fn evaluate_equals_naive_set_cover(
            rules in proptest::collection::vec(
                (proptest::option::of(0i16..4), proptest::option::of(proptest::sample::select(vec!["a", "b", "c*"]))), 0..6),
            key in proptest::sample::select(vec![0i16, 1, 3, 11, 19]),
            topics in proptest::collection::vec(proptest::sample::select(vec!["a", "b", "cx", "d"]), 0..4),
        ) {
            let compiled: Vec<CompiledKafkaRule> = rules.iter().map(|(k, t)| compile_kafka_rule(&api::KafkaRule {
                api_key: k.map(|k| k.to_string()), topic: t.map(str::to_string), ..Default::default()
            }, true).unwrap()).collect();
            let r = req(key, &topics);
            let s = KafkaRuleSet::new(compiled.clone());
            proptest::prop_assert_eq!(s.evaluate(&r).allowed, naive(&compiled, &r));
        }
    }
}
