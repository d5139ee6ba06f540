//! Kafka: request framing, the request fields policy needs, deny responses, and the response
//! rewrites a proxy in the middle must make (DESIGN.md §6, cnp-semantics §8).
//!
//! Why this shape: Cilium's Kafka parser understood the request layouts of 2017 (v0–v5, no
//! flexible versions) and rotted. Here every body is decoded with the `kafka-protocol` crate,
//! which is generated from Apache Kafka's own message schemas, so each version it knows —
//! flexible (KIP-482) ones included — decodes the way the broker decodes it. What the proxy
//! *cannot* decode for policy it never advertises: [`cap_api_versions`] lowers the broker's
//! `ApiVersions` answer to [`proxy_max_version`], so a conforming client never sends a version
//! the proxy would have to pass through blind.
//!
//! The framing and the request header are parsed by hand (they are tiny and on every request);
//! the header alone is enough to judge keys without topics, and the body is decoded only for
//! the keys whose topics, consumer groups or transactional ids rules can name, or whose deny
//! response has to echo the request's entries ([`Body`]).
//!
//! Sans-IO: bytes in, typed values or a precise error out; no panics on any input (fuzzed by
//! `fuzz/fuzz_targets/kafka_*.rs`).

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    self as m, ApiKey, ApiVersionsResponse, BrokerId, DescribeClusterResponse,
    FindCoordinatorResponse, MetadataResponse, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, Message, StrBytes, VersionRange};

/// Kafka's own default for `socket.request.max.bytes`.
pub const DEFAULT_MAX_FRAME: usize = 100 * 1024 * 1024;

pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
pub const GROUP_AUTHORIZATION_FAILED: i16 = 30;
pub const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;
pub const UNSUPPORTED_VERSION: i16 = 35;
pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
pub const FETCH_SESSION_ID_NOT_FOUND: i16 = 70;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KafkaError {
    #[error("frame of {0} bytes is larger than the limit of {1} bytes")]
    TooLarge(usize, usize),
    #[error("negative frame length {0}")]
    NegativeLength(i32),
    #[error("request header is truncated or malformed: {0}")]
    Header(&'static str),
    #[error("unknown API key {0}")]
    UnknownApiKey(i16),
    #[error("{api} v{version} is not a version tollgate can decode (it decodes v{min} to v{max})")]
    UnsupportedVersion {
        api: &'static str,
        version: i16,
        min: i16,
        max: i16,
    },
    #[error("{api} v{version} body does not decode: {reason}")]
    Body {
        api: &'static str,
        version: i16,
        reason: String,
    },
    #[error("{api} v{version} response cannot be encoded: {reason}")]
    Encode {
        api: &'static str,
        version: i16,
        reason: String,
    },
}

/// The total length (4-byte size prefix included) of the frame at the start of `buf`, or `None`
/// while it is incomplete. Frames above `max` bytes are refused before they are buffered.
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, KafkaError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let size = i32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    if size < 0 {
        return Err(KafkaError::NegativeLength(size));
    }
    let size = size as usize;
    if size > max {
        return Err(KafkaError::TooLarge(size, max));
    }
    Ok((buf.len() >= 4 + size).then_some(4 + size))
}

/// A request header (v0–v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHeader {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
    /// Absent in header v0 and when sent as null.
    pub client_id: Option<String>,
    /// Bytes of the header, where the body starts.
    pub len: usize,
}

impl RequestHeader {
    /// The API's protocol name (`"produce"`, …), or `None` for a key Kafka does not define.
    pub fn api_name(&self) -> Option<&'static str> {
        api_name(self.api_key)
    }
}

/// The lowercase protocol name of an API key.
pub fn api_name(key: i16) -> Option<&'static str> {
    ApiKey::try_from(key).ok().map(|k| {
        let name: &'static str = match k {
            ApiKey::Produce => "produce",
            ApiKey::Fetch => "fetch",
            ApiKey::ListOffsets => "listoffsets",
            ApiKey::Metadata => "metadata",
            ApiKey::OffsetCommit => "offsetcommit",
            ApiKey::OffsetFetch => "offsetfetch",
            ApiKey::FindCoordinator => "findcoordinator",
            ApiKey::JoinGroup => "joingroup",
            ApiKey::Heartbeat => "heartbeat",
            ApiKey::LeaveGroup => "leavegroup",
            ApiKey::SyncGroup => "syncgroup",
            ApiKey::DescribeGroups => "describegroups",
            ApiKey::ListGroups => "listgroups",
            ApiKey::ApiVersions => "apiversions",
            ApiKey::CreateTopics => "createtopics",
            ApiKey::DeleteTopics => "deletetopics",
            ApiKey::InitProducerId => "initproducerid",
            ApiKey::AddPartitionsToTxn => "addpartitionstotxn",
            ApiKey::AddOffsetsToTxn => "addoffsetstotxn",
            ApiKey::EndTxn => "endtxn",
            ApiKey::TxnOffsetCommit => "txnoffsetcommit",
            ApiKey::DescribeCluster => "describecluster",
            _ => return "other",
        };
        name
    })
}

fn take<'a>(b: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], KafkaError> {
    if b.len() < n {
        return Err(KafkaError::Header(what));
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

fn uvarint(b: &mut &[u8], what: &'static str) -> Result<u32, KafkaError> {
    let mut v: u32 = 0;
    for i in 0..5 {
        let byte = take(b, 1, what)?[0];
        v |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(KafkaError::Header(what))
}

/// Which request header version a request uses. Unknown keys are read as v1 (client id, no
/// tagged fields) — enough to name them in an audit record; they are never forwarded decoded.
fn request_header_version(key: i16, version: i16) -> i16 {
    match ApiKey::try_from(key) {
        Ok(k) => k.request_header_version(version),
        Err(_) => 1,
    }
}

/// Parse the request header at the start of a frame body (after the 4-byte size).
pub fn parse_request_header(body: &[u8]) -> Result<RequestHeader, KafkaError> {
    let mut b = body;
    let fixed = take(&mut b, 8, "shorter than 8 bytes")?;
    let api_key = i16::from_be_bytes([fixed[0], fixed[1]]);
    let api_version = i16::from_be_bytes([fixed[2], fixed[3]]);
    let correlation_id = i32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
    let hv = request_header_version(api_key, api_version);
    let mut client_id = None;
    if hv >= 1 {
        let n = take(&mut b, 2, "client id length missing")?;
        let n = i16::from_be_bytes([n[0], n[1]]);
        if n >= 0 {
            let s = take(&mut b, n as usize, "client id truncated")?;
            let s =
                std::str::from_utf8(s).map_err(|_| KafkaError::Header("client id is not UTF-8"))?;
            client_id = Some(s.to_string());
        } else if n != -1 {
            return Err(KafkaError::Header("negative client id length"));
        }
    }
    if hv >= 2 {
        let fields = uvarint(&mut b, "tagged field count")?;
        for _ in 0..fields {
            uvarint(&mut b, "tagged field tag")?;
            let size = uvarint(&mut b, "tagged field size")?;
            take(&mut b, size as usize, "tagged field truncated")?;
        }
    }
    Ok(RequestHeader {
        api_key,
        api_version,
        correlation_id,
        client_id,
        len: body.len() - b.len(),
    })
}

/// The highest version of `key` tollgate decodes for policy, or `None` for a key it does not
/// know. Below `kafka-protocol`'s own maximum where a newer version addresses topics by id
/// only (KIP-516: Produce v13, Fetch v13+), since rules name topics.
pub fn proxy_max_version(key: i16) -> Option<i16> {
    let k = ApiKey::try_from(key).ok()?;
    let max = decoded_versions(k).max;
    Some(match k {
        ApiKey::Produce | ApiKey::Fetch => max.min(12),
        _ => max,
    })
}

/// The versions both the request and the response schema of a decoded key cover (the
/// crate's `ApiKey::valid_versions` can run ahead of its message types); every other key's
/// valid versions.
fn decoded_versions(key: ApiKey) -> VersionRange {
    fn both<Q: Message, S: Message>() -> VersionRange {
        Q::VERSIONS.intersect(&S::VERSIONS)
    }
    match key {
        ApiKey::Produce => both::<m::ProduceRequest, m::ProduceResponse>(),
        ApiKey::Fetch => both::<m::FetchRequest, m::FetchResponse>(),
        ApiKey::ListOffsets => both::<m::ListOffsetsRequest, m::ListOffsetsResponse>(),
        ApiKey::Metadata => both::<m::MetadataRequest, MetadataResponse>(),
        ApiKey::OffsetCommit => both::<m::OffsetCommitRequest, m::OffsetCommitResponse>(),
        ApiKey::OffsetFetch => both::<m::OffsetFetchRequest, m::OffsetFetchResponse>(),
        ApiKey::FindCoordinator => both::<m::FindCoordinatorRequest, FindCoordinatorResponse>(),
        ApiKey::JoinGroup => both::<m::JoinGroupRequest, m::JoinGroupResponse>(),
        ApiKey::Heartbeat => both::<m::HeartbeatRequest, m::HeartbeatResponse>(),
        ApiKey::LeaveGroup => both::<m::LeaveGroupRequest, m::LeaveGroupResponse>(),
        ApiKey::SyncGroup => both::<m::SyncGroupRequest, m::SyncGroupResponse>(),
        ApiKey::DescribeGroups => both::<m::DescribeGroupsRequest, m::DescribeGroupsResponse>(),
        ApiKey::ApiVersions => both::<m::ApiVersionsRequest, ApiVersionsResponse>(),
        ApiKey::CreateTopics => both::<m::CreateTopicsRequest, m::CreateTopicsResponse>(),
        ApiKey::DeleteTopics => both::<m::DeleteTopicsRequest, m::DeleteTopicsResponse>(),
        ApiKey::InitProducerId => both::<m::InitProducerIdRequest, m::InitProducerIdResponse>(),
        ApiKey::AddPartitionsToTxn => {
            both::<m::AddPartitionsToTxnRequest, m::AddPartitionsToTxnResponse>()
        }
        ApiKey::AddOffsetsToTxn => both::<m::AddOffsetsToTxnRequest, m::AddOffsetsToTxnResponse>(),
        ApiKey::EndTxn => both::<m::EndTxnRequest, m::EndTxnResponse>(),
        ApiKey::TxnOffsetCommit => both::<m::TxnOffsetCommitRequest, m::TxnOffsetCommitResponse>(),
        ApiKey::DescribeCluster => both::<m::DescribeClusterRequest, DescribeClusterResponse>(),
        _ => key.valid_versions(),
    }
}

fn supported_range(key: ApiKey) -> (i16, i16) {
    let v = decoded_versions(key);
    (v.min, proxy_max_version(key as i16).unwrap_or(v.max))
}

/// Whether tollgate builds a denial response for `key` (the keys [`Body`] decodes). A denied
/// request of any other key ends the connection, so [`cap_api_versions`] callers should not
/// advertise such keys to clients that may not use them.
pub fn has_deny_response(key: i16) -> bool {
    matches!(
        ApiKey::try_from(key),
        Ok(ApiKey::Produce
            | ApiKey::Fetch
            | ApiKey::ListOffsets
            | ApiKey::Metadata
            | ApiKey::OffsetCommit
            | ApiKey::OffsetFetch
            | ApiKey::FindCoordinator
            | ApiKey::JoinGroup
            | ApiKey::Heartbeat
            | ApiKey::LeaveGroup
            | ApiKey::SyncGroup
            | ApiKey::DescribeGroups
            | ApiKey::ApiVersions
            | ApiKey::CreateTopics
            | ApiKey::DeleteTopics
            | ApiKey::InitProducerId
            | ApiKey::AddPartitionsToTxn
            | ApiKey::AddOffsetsToTxn
            | ApiKey::EndTxn
            | ApiKey::TxnOffsetCommit)
    )
}

/// The API key × version matrix tollgate supports, as the Markdown table `docs/kafka.md`
/// shows (a test keeps the two equal): every key the crate knows, the versions advertised
/// to clients (after capping), whether the body is decoded for rules, and how a denial is
/// answered.
pub fn support_matrix_markdown() -> String {
    let mut out = String::from(
        "| key | API | versions offered | rules see | a denial is answered with |\n|---|---|---|---|---|\n",
    );
    for key in 0..=i16::MAX {
        let Ok(k) = ApiKey::try_from(key) else {
            if key > 200 {
                break;
            }
            continue;
        };
        let (min, max) = supported_range(k);
        let decoded = has_deny_response(key);
        let sees = match k {
            ApiKey::Produce | ApiKey::Metadata => {
                "key, version, client id, topics (answered per topic)"
            }
            ApiKey::Fetch | ApiKey::ListOffsets | ApiKey::CreateTopics | ApiKey::DeleteTopics => {
                "key, version, client id, topics"
            }
            ApiKey::OffsetCommit | ApiKey::OffsetFetch | ApiKey::TxnOffsetCommit => {
                "key, version, client id, topics, group"
            }
            ApiKey::AddPartitionsToTxn => "key, version, client id, topics, transactional id",
            ApiKey::AddOffsetsToTxn => "key, version, client id, group, transactional id",
            ApiKey::FindCoordinator => "key, version, client id, group or transactional id",
            ApiKey::InitProducerId | ApiKey::EndTxn => "key, version, client id, transactional id",
            _ if decoded && !matches!(k, ApiKey::ApiVersions) => "key, version, client id, group",
            _ => "key, version, client id",
        };
        let answer = if decoded {
            "the API's error response"
        } else {
            "closing the connection (offered only to clients whose policy allows it)"
        };
        let name = format!("{k:?}");
        out.push_str(&format!(
            "| {key} | {name} | {min}–{max} | {sees} | {answer} |\n"
        ));
    }
    out
}

/// A request whose body was decoded (for the keys policy or deny responses need), or only its
/// header (every other key: no rule can name anything in their bodies).
#[derive(Debug, Clone)]
pub struct Request {
    pub header: RequestHeader,
    pub body: Body,
}

/// The decoded bodies.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Body {
    Produce(m::ProduceRequest),
    Fetch(m::FetchRequest),
    ListOffsets(m::ListOffsetsRequest),
    Metadata(m::MetadataRequest),
    OffsetCommit(m::OffsetCommitRequest),
    OffsetFetch(m::OffsetFetchRequest),
    FindCoordinator(m::FindCoordinatorRequest),
    JoinGroup(m::JoinGroupRequest),
    Heartbeat(m::HeartbeatRequest),
    LeaveGroup(m::LeaveGroupRequest),
    SyncGroup(m::SyncGroupRequest),
    DescribeGroups(m::DescribeGroupsRequest),
    ApiVersions(m::ApiVersionsRequest),
    CreateTopics(m::CreateTopicsRequest),
    DeleteTopics(m::DeleteTopicsRequest),
    InitProducerId(m::InitProducerIdRequest),
    AddPartitionsToTxn(m::AddPartitionsToTxnRequest),
    AddOffsetsToTxn(m::AddOffsetsToTxnRequest),
    EndTxn(m::EndTxnRequest),
    TxnOffsetCommit(m::TxnOffsetCommitRequest),
    /// A key tollgate knows but whose body no rule looks into; forwarded as sent when allowed,
    /// and the connection is closed when denied (no error response of that API is built).
    Other,
}

/// What rules can match in a request besides its key, version and client id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyFields {
    /// Topic names; a topic addressed only by id appears as `topic-id:<uuid>` (no topic name
    /// can contain `:`, so only a rule without a topic, or a `*` glob, covers it).
    pub topics: Vec<String>,
    pub groups: Vec<String>,
    pub transactional_ids: Vec<String>,
    /// False for Produce with `acks=0`: the broker answers nothing, and neither does a denial.
    pub expects_response: bool,
}

fn topic_str(name: &TopicName) -> String {
    name.0.as_str().to_string()
}

fn topic_or_id(name: Option<&TopicName>, id: &impl std::fmt::Display) -> String {
    match name {
        Some(n) if !n.0.is_empty() => topic_str(n),
        _ => format!("topic-id:{id}"),
    }
}

/// Decode a whole request frame body (after the 4-byte size). An unknown key or a version
/// tollgate does not decode is an error: when Kafka rules apply the request is refused.
pub fn decode_request(body: Bytes) -> Result<Request, KafkaError> {
    let header = parse_request_header(&body)?;
    let key =
        ApiKey::try_from(header.api_key).map_err(|_| KafkaError::UnknownApiKey(header.api_key))?;
    let name = api_name(header.api_key).unwrap_or("other");
    let (min, max) = supported_range(key);
    let v = header.api_version;
    if v < min || v > max {
        return Err(KafkaError::UnsupportedVersion {
            api: name,
            version: v,
            min,
            max,
        });
    }
    let mut buf = body.slice(header.len..);
    macro_rules! dec {
        ($variant:ident, $ty:ty) => {
            Body::$variant(<$ty>::decode(&mut buf, v).map_err(|e| KafkaError::Body {
                api: name,
                version: v,
                reason: e.to_string(),
            })?)
        };
    }
    let decoded = match key {
        ApiKey::Produce => dec!(Produce, m::ProduceRequest),
        ApiKey::Fetch => dec!(Fetch, m::FetchRequest),
        ApiKey::ListOffsets => dec!(ListOffsets, m::ListOffsetsRequest),
        ApiKey::Metadata => dec!(Metadata, m::MetadataRequest),
        ApiKey::OffsetCommit => dec!(OffsetCommit, m::OffsetCommitRequest),
        ApiKey::OffsetFetch => dec!(OffsetFetch, m::OffsetFetchRequest),
        ApiKey::FindCoordinator => dec!(FindCoordinator, m::FindCoordinatorRequest),
        ApiKey::JoinGroup => dec!(JoinGroup, m::JoinGroupRequest),
        ApiKey::Heartbeat => dec!(Heartbeat, m::HeartbeatRequest),
        ApiKey::LeaveGroup => dec!(LeaveGroup, m::LeaveGroupRequest),
        ApiKey::SyncGroup => dec!(SyncGroup, m::SyncGroupRequest),
        ApiKey::DescribeGroups => dec!(DescribeGroups, m::DescribeGroupsRequest),
        ApiKey::ApiVersions => dec!(ApiVersions, m::ApiVersionsRequest),
        ApiKey::CreateTopics => dec!(CreateTopics, m::CreateTopicsRequest),
        ApiKey::DeleteTopics => dec!(DeleteTopics, m::DeleteTopicsRequest),
        ApiKey::InitProducerId => dec!(InitProducerId, m::InitProducerIdRequest),
        ApiKey::AddPartitionsToTxn => dec!(AddPartitionsToTxn, m::AddPartitionsToTxnRequest),
        ApiKey::AddOffsetsToTxn => dec!(AddOffsetsToTxn, m::AddOffsetsToTxnRequest),
        ApiKey::EndTxn => dec!(EndTxn, m::EndTxnRequest),
        ApiKey::TxnOffsetCommit => dec!(TxnOffsetCommit, m::TxnOffsetCommitRequest),
        _ => Body::Other,
    };
    Ok(Request {
        header,
        body: decoded,
    })
}

impl Request {
    /// The fields rules match (cnp-semantics §8.3 and the TollgatePolicy extensions).
    pub fn policy_fields(&self) -> PolicyFields {
        let mut f = PolicyFields {
            expects_response: true,
            ..PolicyFields::default()
        };
        let s = |x: &StrBytes| x.as_str().to_string();
        match &self.body {
            Body::Produce(r) => {
                f.topics = r
                    .topic_data
                    .iter()
                    .map(|t| topic_or_id(Some(&t.name), &t.topic_id))
                    .collect();
                f.transactional_ids = r.transactional_id.iter().map(|t| s(&t.0)).collect();
                f.expects_response = r.acks != 0;
            }
            Body::Fetch(r) => {
                f.topics = r
                    .topics
                    .iter()
                    .map(|t| topic_or_id(Some(&t.topic), &t.topic_id))
                    .collect();
            }
            Body::ListOffsets(r) => {
                f.topics = r.topics.iter().map(|t| topic_str(&t.name)).collect()
            }
            Body::Metadata(r) => {
                f.topics = r
                    .topics
                    .iter()
                    .flatten()
                    .map(|t| topic_or_id(t.name.as_ref(), &t.topic_id))
                    .collect();
            }
            Body::OffsetCommit(r) => {
                f.topics = r.topics.iter().map(|t| topic_str(&t.name)).collect();
                f.groups = vec![s(&r.group_id.0)];
            }
            Body::OffsetFetch(r) => {
                if self.header.api_version >= 8 {
                    for g in &r.groups {
                        f.groups.push(s(&g.group_id.0));
                        f.topics
                            .extend(g.topics.iter().flatten().map(|t| topic_str(&t.name)));
                    }
                } else {
                    f.groups = vec![s(&r.group_id.0)];
                    f.topics = r
                        .topics
                        .iter()
                        .flatten()
                        .map(|t| topic_str(&t.name))
                        .collect();
                }
            }
            Body::FindCoordinator(r) => {
                let keys: Vec<String> = if self.header.api_version >= 4 {
                    r.coordinator_keys.iter().map(s).collect()
                } else {
                    vec![s(&r.key)]
                };
                // key_type 0: consumer group, 1: transaction.
                if r.key_type == 1 {
                    f.transactional_ids = keys;
                } else {
                    f.groups = keys;
                }
            }
            Body::JoinGroup(r) => f.groups = vec![s(&r.group_id.0)],
            Body::Heartbeat(r) => f.groups = vec![s(&r.group_id.0)],
            Body::LeaveGroup(r) => f.groups = vec![s(&r.group_id.0)],
            Body::SyncGroup(r) => f.groups = vec![s(&r.group_id.0)],
            Body::DescribeGroups(r) => f.groups = r.groups.iter().map(|g| s(&g.0)).collect(),
            Body::CreateTopics(r) => {
                f.topics = r.topics.iter().map(|t| topic_str(&t.name)).collect()
            }
            Body::DeleteTopics(r) => {
                f.topics = if self.header.api_version >= 6 {
                    r.topics
                        .iter()
                        .map(|t| topic_or_id(t.name.as_ref(), &t.topic_id))
                        .collect()
                } else {
                    r.topic_names.iter().map(topic_str).collect()
                };
            }
            Body::InitProducerId(r) => {
                f.transactional_ids = r.transactional_id.iter().map(|t| s(&t.0)).collect();
            }
            Body::AddPartitionsToTxn(r) => {
                if self.header.api_version >= 4 {
                    for t in &r.transactions {
                        f.transactional_ids.push(s(&t.transactional_id.0));
                        f.topics.extend(t.topics.iter().map(|x| topic_str(&x.name)));
                    }
                } else {
                    f.transactional_ids = vec![s(&r.v3_and_below_transactional_id.0)];
                    f.topics = r
                        .v3_and_below_topics
                        .iter()
                        .map(|x| topic_str(&x.name))
                        .collect();
                }
            }
            Body::AddOffsetsToTxn(r) => {
                f.transactional_ids = vec![s(&r.transactional_id.0)];
                f.groups = vec![s(&r.group_id.0)];
            }
            Body::EndTxn(r) => f.transactional_ids = vec![s(&r.transactional_id.0)],
            Body::TxnOffsetCommit(r) => {
                f.transactional_ids = vec![s(&r.transactional_id.0)];
                f.groups = vec![s(&r.group_id.0)];
                f.topics = r.topics.iter().map(|t| topic_str(&t.name)).collect();
            }
            Body::ApiVersions(_) | Body::Other => {}
        }
        f
    }

    /// Whether this Fetch continues a fetch session (KIP-227): its topic list holds only what
    /// changed, the rest was named by earlier requests of the session.
    pub fn fetch_session(&self) -> Option<(i32, i32)> {
        match &self.body {
            Body::Fetch(r) if self.header.api_version >= 7 => Some((r.session_id, r.session_epoch)),
            _ => None,
        }
    }

    /// Topics a Fetch asks the session to forget.
    pub fn fetch_forgotten(&self) -> Vec<String> {
        match &self.body {
            Body::Fetch(r) => r
                .forgotten_topics_data
                .iter()
                .map(|t| topic_or_id(Some(&t.topic), &t.topic_id))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The error code a denial of this request carries, as a broker with ACLs would answer:
    /// per topic `TOPIC_AUTHORIZATION_FAILED`, per group `GROUP_AUTHORIZATION_FAILED`, per
    /// transactional id `TRANSACTIONAL_ID_AUTHORIZATION_FAILED`, otherwise
    /// `CLUSTER_AUTHORIZATION_FAILED`. `for_topics`: the denial was for the request's topics
    /// (which decides between a group and a topic error where a request names both).
    pub fn deny_error(&self, for_topics: bool) -> i16 {
        match &self.body {
            Body::Produce(_)
            | Body::Fetch(_)
            | Body::ListOffsets(_)
            | Body::Metadata(_)
            | Body::CreateTopics(_)
            | Body::DeleteTopics(_) => TOPIC_AUTHORIZATION_FAILED,
            Body::OffsetCommit(_) | Body::OffsetFetch(_) | Body::TxnOffsetCommit(_)
                if for_topics =>
            {
                TOPIC_AUTHORIZATION_FAILED
            }
            Body::OffsetCommit(_)
            | Body::OffsetFetch(_)
            | Body::TxnOffsetCommit(_)
            | Body::JoinGroup(_)
            | Body::Heartbeat(_)
            | Body::LeaveGroup(_)
            | Body::SyncGroup(_)
            | Body::DescribeGroups(_) => GROUP_AUTHORIZATION_FAILED,
            Body::FindCoordinator(r) if r.key_type == 1 => TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
            Body::FindCoordinator(_) => GROUP_AUTHORIZATION_FAILED,
            Body::InitProducerId(r) if r.transactional_id.is_some() => {
                TRANSACTIONAL_ID_AUTHORIZATION_FAILED
            }
            Body::AddPartitionsToTxn(_) if for_topics => TOPIC_AUTHORIZATION_FAILED,
            Body::AddOffsetsToTxn(_) if for_topics => GROUP_AUTHORIZATION_FAILED,
            Body::AddPartitionsToTxn(_) | Body::AddOffsetsToTxn(_) | Body::EndTxn(_) => {
                TRANSACTIONAL_ID_AUTHORIZATION_FAILED
            }
            Body::InitProducerId(_) | Body::ApiVersions(_) | Body::Other => {
                CLUSTER_AUTHORIZATION_FAILED
            }
        }
    }
}

/// `frame`, if it decodes as the response a client of `key` v`version` reads. Rewritten
/// broker responses go through this: the crate can decode input it then cannot encode back
/// faithfully (an unknown tagged field numbered 2^31 or more), and such an answer is refused
/// rather than sent malformed.
fn verified(key: ApiKey, version: i16, frame: Vec<u8>) -> Result<Vec<u8>, KafkaError> {
    match check_response(key as i16, version, &frame) {
        Ok(_) => Ok(frame),
        Err(e) => Err(KafkaError::Encode {
            api: api_name(key as i16).unwrap_or("other"),
            version,
            reason: format!("the rewritten response does not decode: {e}"),
        }),
    }
}

/// Encode a response frame (size prefix, response header of the right version, body).
pub fn encode_response<R: Encodable>(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &R,
) -> Result<Vec<u8>, KafkaError> {
    let err = |e: anyhow::Error| KafkaError::Encode {
        api: api_name(key as i16).unwrap_or("other"),
        version,
        reason: e.to_string(),
    };
    let mut buf = BytesMut::with_capacity(64);
    buf.extend_from_slice(&[0, 0, 0, 0]);
    let mut header = ResponseHeader::default();
    header.correlation_id = correlation_id;
    header
        .encode(&mut buf, key.response_header_version(version))
        .map_err(err)?;
    body.encode(&mut buf, version).map_err(err)?;
    let size = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&size.to_be_bytes());
    Ok(buf.to_vec())
}

/// A Produce topic's answer with every partition refused `error`.
fn refused_produce(
    t: &m::produce_request::TopicProduceData,
    error: i16,
) -> m::produce_response::TopicProduceResponse {
    let mut tr = m::produce_response::TopicProduceResponse::default();
    tr.name = t.name.clone();
    tr.topic_id = t.topic_id;
    for p in &t.partition_data {
        let mut pr = m::produce_response::PartitionProduceResponse::default();
        pr.index = p.index;
        pr.error_code = error;
        pr.base_offset = -1;
        pr.log_append_time_ms = -1;
        pr.log_start_offset = -1;
        tr.partition_responses.push(pr);
    }
    tr
}

/// A Metadata topic's answer refused `error`.
fn refused_metadata(
    t: &m::metadata_request::MetadataRequestTopic,
    error: i16,
) -> m::metadata_response::MetadataResponseTopic {
    let mut tr = m::metadata_response::MetadataResponseTopic::default();
    tr.error_code = error;
    tr.name = t.name.clone();
    tr.topic_id = t.topic_id;
    tr
}

/// The text a broker puts beside an authorization error, naming what was refused, so clients
/// that print only the message (librdkafka for FindCoordinator) still say what happened.
fn refusal_text(error: i16, subject: &str) -> String {
    match error {
        TOPIC_AUTHORIZATION_FAILED => {
            format!("Not authorized to access topics: [{subject}] (tollgate)")
        }
        GROUP_AUTHORIZATION_FAILED => {
            format!("Not authorized to access group: {subject} (tollgate)")
        }
        TRANSACTIONAL_ID_AUTHORIZATION_FAILED => {
            format!("Transactional Id authorization failed: {subject} (tollgate)")
        }
        _ => "Cluster authorization failed (tollgate)".to_string(),
    }
}

/// The response a broker with ACLs would send when it refuses `req`: the same API and version,
/// the request's correlation id, `error` on every entry (topic/partition, group, transaction)
/// or at the top. `Ok(None)`: the request gets no response (Produce with `acks=0`), or tollgate
/// builds none for its API ([`Body::Other`]; the caller closes the connection, as a broker does
/// with a request it cannot serve).
pub fn deny_response(req: &Request, error: i16) -> Result<Option<Vec<u8>>, KafkaError> {
    let v = req.header.api_version;
    let cid = req.header.correlation_id;
    let s = |x: &str| StrBytes::from_string(x.to_string());
    macro_rules! out {
        ($key:expr, $resp:expr) => {
            encode_response($key, v, cid, &$resp).map(Some)
        };
    }
    match &req.body {
        Body::Produce(r) => {
            if r.acks == 0 {
                return Ok(None);
            }
            let mut resp = m::ProduceResponse::default();
            resp.responses = r
                .topic_data
                .iter()
                .map(|t| refused_produce(t, error))
                .collect();
            out!(ApiKey::Produce, resp)
        }
        Body::Fetch(r) => {
            let mut resp = m::FetchResponse::default();
            resp.session_id = r.session_id;
            for t in &r.topics {
                let mut tr = m::fetch_response::FetchableTopicResponse::default();
                tr.topic = t.topic.clone();
                tr.topic_id = t.topic_id;
                for p in &t.partitions {
                    let mut pd = m::fetch_response::PartitionData::default();
                    pd.partition_index = p.partition;
                    pd.error_code = error;
                    pd.high_watermark = -1;
                    pd.last_stable_offset = -1;
                    pd.log_start_offset = -1;
                    pd.records = Some(Bytes::new());
                    tr.partitions.push(pd);
                }
                resp.responses.push(tr);
            }
            if error == FETCH_SESSION_ID_NOT_FOUND {
                resp.error_code = error;
                resp.responses.clear();
            }
            out!(ApiKey::Fetch, resp)
        }
        Body::ListOffsets(r) => {
            let mut resp = m::ListOffsetsResponse::default();
            for t in &r.topics {
                let mut tr = m::list_offsets_response::ListOffsetsTopicResponse::default();
                tr.name = t.name.clone();
                for p in &t.partitions {
                    let mut pr = m::list_offsets_response::ListOffsetsPartitionResponse::default();
                    pr.partition_index = p.partition_index;
                    pr.error_code = error;
                    pr.timestamp = -1;
                    pr.offset = -1;
                    tr.partitions.push(pr);
                }
                resp.topics.push(tr);
            }
            out!(ApiKey::ListOffsets, resp)
        }
        Body::Metadata(r) => {
            let mut resp = MetadataResponse::default();
            resp.controller_id = BrokerId(-1);
            resp.topics = r
                .topics
                .iter()
                .flatten()
                .map(|t| refused_metadata(t, error))
                .collect();
            out!(ApiKey::Metadata, resp)
        }
        Body::OffsetCommit(r) => {
            let mut resp = m::OffsetCommitResponse::default();
            for t in &r.topics {
                let mut tr = m::offset_commit_response::OffsetCommitResponseTopic::default();
                tr.name = t.name.clone();
                for p in &t.partitions {
                    let mut pr =
                        m::offset_commit_response::OffsetCommitResponsePartition::default();
                    pr.partition_index = p.partition_index;
                    pr.error_code = error;
                    tr.partitions.push(pr);
                }
                resp.topics.push(tr);
            }
            out!(ApiKey::OffsetCommit, resp)
        }
        Body::OffsetFetch(r) => {
            let mut resp = m::OffsetFetchResponse::default();
            if v >= 8 {
                for g in &r.groups {
                    let mut gr = m::offset_fetch_response::OffsetFetchResponseGroup::default();
                    gr.group_id = g.group_id.clone();
                    gr.error_code = error;
                    resp.groups.push(gr);
                }
            } else {
                resp.error_code = error;
                for t in r.topics.iter().flatten() {
                    let mut tr = m::offset_fetch_response::OffsetFetchResponseTopic::default();
                    tr.name = t.name.clone();
                    for &p in &t.partition_indexes {
                        let mut pr =
                            m::offset_fetch_response::OffsetFetchResponsePartition::default();
                        pr.partition_index = p;
                        pr.committed_offset = -1;
                        pr.error_code = error;
                        tr.partitions.push(pr);
                    }
                    resp.topics.push(tr);
                }
            }
            out!(ApiKey::OffsetFetch, resp)
        }
        Body::FindCoordinator(r) => {
            let mut resp = FindCoordinatorResponse::default();
            if v >= 4 {
                for k in &r.coordinator_keys {
                    let mut c = m::find_coordinator_response::Coordinator::default();
                    c.key = k.clone();
                    c.node_id = BrokerId(-1);
                    c.port = -1;
                    c.error_code = error;
                    c.error_message = Some(s(&refusal_text(error, k.as_str())));
                    resp.coordinators.push(c);
                }
            } else {
                resp.error_code = error;
                resp.node_id = BrokerId(-1);
                resp.port = -1;
                if v >= 1 {
                    resp.error_message = Some(s(&refusal_text(error, r.key.as_str())));
                }
            }
            out!(ApiKey::FindCoordinator, resp)
        }
        Body::JoinGroup(r) => {
            let mut resp = m::JoinGroupResponse::default();
            resp.error_code = error;
            resp.generation_id = -1;
            resp.member_id = r.member_id.clone();
            if v >= 7 {
                resp.protocol_name = None;
            } else {
                resp.protocol_name = Some(s(""));
            }
            out!(ApiKey::JoinGroup, resp)
        }
        Body::Heartbeat(_) => {
            let mut resp = m::HeartbeatResponse::default();
            resp.error_code = error;
            out!(ApiKey::Heartbeat, resp)
        }
        Body::LeaveGroup(_) => {
            let mut resp = m::LeaveGroupResponse::default();
            resp.error_code = error;
            out!(ApiKey::LeaveGroup, resp)
        }
        Body::SyncGroup(_) => {
            let mut resp = m::SyncGroupResponse::default();
            resp.error_code = error;
            out!(ApiKey::SyncGroup, resp)
        }
        Body::DescribeGroups(r) => {
            let mut resp = m::DescribeGroupsResponse::default();
            for g in &r.groups {
                let mut d = m::describe_groups_response::DescribedGroup::default();
                d.error_code = error;
                d.group_id = g.clone();
                resp.groups.push(d);
            }
            out!(ApiKey::DescribeGroups, resp)
        }
        Body::ApiVersions(_) => {
            let mut resp = ApiVersionsResponse::default();
            resp.error_code = error;
            out!(ApiKey::ApiVersions, resp)
        }
        Body::CreateTopics(r) => {
            let mut resp = m::CreateTopicsResponse::default();
            for t in &r.topics {
                let mut tr = m::create_topics_response::CreatableTopicResult::default();
                tr.name = t.name.clone();
                tr.error_code = error;
                if v >= 1 {
                    tr.error_message = Some(s(&refusal_text(error, t.name.0.as_str())));
                }
                tr.num_partitions = -1;
                tr.replication_factor = -1;
                resp.topics.push(tr);
            }
            out!(ApiKey::CreateTopics, resp)
        }
        Body::DeleteTopics(r) => {
            let mut resp = m::DeleteTopicsResponse::default();
            if v >= 6 {
                for t in &r.topics {
                    let mut d = m::delete_topics_response::DeletableTopicResult::default();
                    d.name = t.name.clone();
                    d.topic_id = t.topic_id;
                    d.error_code = error;
                    resp.responses.push(d);
                }
            } else {
                for t in &r.topic_names {
                    let mut d = m::delete_topics_response::DeletableTopicResult::default();
                    d.name = Some(t.clone());
                    d.error_code = error;
                    resp.responses.push(d);
                }
            }
            out!(ApiKey::DeleteTopics, resp)
        }
        Body::InitProducerId(_) => {
            let mut resp = m::InitProducerIdResponse::default();
            resp.error_code = error;
            resp.producer_id = m::ProducerId(-1);
            resp.producer_epoch = -1;
            out!(ApiKey::InitProducerId, resp)
        }
        Body::AddPartitionsToTxn(r) => {
            let mut resp = m::AddPartitionsToTxnResponse::default();
            let topic_results =
                |topics: &[m::add_partitions_to_txn_request::AddPartitionsToTxnTopic]| {
                    topics
                    .iter()
                    .map(|t| {
                        let mut tr = m::add_partitions_to_txn_response::AddPartitionsToTxnTopicResult::default();
                        tr.name = t.name.clone();
                        tr.results_by_partition = t
                            .partitions
                            .iter()
                            .map(|&p| {
                                let mut pr = m::add_partitions_to_txn_response::AddPartitionsToTxnPartitionResult::default();
                                pr.partition_index = p;
                                pr.partition_error_code = error;
                                pr
                            })
                            .collect();
                        tr
                    })
                    .collect::<Vec<_>>()
                };
            if v >= 4 {
                for t in &r.transactions {
                    let mut res =
                        m::add_partitions_to_txn_response::AddPartitionsToTxnResult::default();
                    res.transactional_id = t.transactional_id.clone();
                    res.topic_results = topic_results(&t.topics);
                    resp.results_by_transaction.push(res);
                }
            } else {
                resp.results_by_topic_v3_and_below = topic_results(&r.v3_and_below_topics);
            }
            out!(ApiKey::AddPartitionsToTxn, resp)
        }
        Body::AddOffsetsToTxn(_) => {
            let mut resp = m::AddOffsetsToTxnResponse::default();
            resp.error_code = error;
            out!(ApiKey::AddOffsetsToTxn, resp)
        }
        Body::EndTxn(_) => {
            let mut resp = m::EndTxnResponse::default();
            resp.error_code = error;
            resp.producer_id = m::ProducerId(-1);
            resp.producer_epoch = -1;
            out!(ApiKey::EndTxn, resp)
        }
        Body::TxnOffsetCommit(r) => {
            let mut resp = m::TxnOffsetCommitResponse::default();
            for t in &r.topics {
                let mut tr = m::txn_offset_commit_response::TxnOffsetCommitResponseTopic::default();
                tr.name = t.name.clone();
                for p in &t.partitions {
                    let mut pr =
                        m::txn_offset_commit_response::TxnOffsetCommitResponsePartition::default();
                    pr.partition_index = p.partition_index;
                    pr.error_code = error;
                    tr.partitions.push(pr);
                }
                resp.topics.push(tr);
            }
            out!(ApiKey::TxnOffsetCommit, resp)
        }
        Body::Other => Ok(None),
    }
}

/// The answer to an `ApiVersions` request of a version tollgate does not know (KIP-511): a v0
/// response with `UNSUPPORTED_VERSION` and the versions tollgate itself decodes, which tells
/// the client to retry with one of them. `None` for other APIs: no response of an unknown
/// version can be encoded, and the caller closes the connection as a broker would.
pub fn unsupported_version_response(header: &RequestHeader) -> Option<Vec<u8>> {
    if header.api_key != ApiKey::ApiVersions as i16 {
        return None;
    }
    let mut resp = ApiVersionsResponse::default();
    resp.error_code = UNSUPPORTED_VERSION;
    let (min, max) = supported_range(ApiKey::ApiVersions);
    let mut v = m::api_versions_response::ApiVersion::default();
    v.api_key = ApiKey::ApiVersions as i16;
    v.min_version = min;
    v.max_version = max;
    resp.api_keys.push(v);
    encode_response(ApiKey::ApiVersions, 0, header.correlation_id, &resp).ok()
}

/// A response frame body split into its header's correlation id and the rest.
fn response_body(key: ApiKey, version: i16, frame_body: Bytes) -> Result<(i32, Bytes), KafkaError> {
    let mut buf = frame_body;
    let header =
        ResponseHeader::decode(&mut buf, key.response_header_version(version)).map_err(|e| {
            KafkaError::Body {
                api: api_name(key as i16).unwrap_or("other"),
                version,
                reason: format!("response header: {e}"),
            }
        })?;
    Ok((header.correlation_id, buf))
}

fn decode_response<R: Decodable>(
    key: ApiKey,
    version: i16,
    frame_body: Bytes,
) -> Result<(i32, R), KafkaError> {
    let (cid, mut buf) = response_body(key, version, frame_body)?;
    let r = R::decode(&mut buf, version).map_err(|e| KafkaError::Body {
        api: api_name(key as i16).unwrap_or("other"),
        version,
        reason: format!("response: {e}"),
    })?;
    Ok((cid, r))
}

/// Rewrite a broker's `ApiVersions` response (frame body, after the size) so that every API's
/// max version is the lower of the broker's and [`proxy_max_version`], and APIs tollgate does
/// not know are left out. The answer to a v0 fallback keeps its error code.
///
/// `offer(key, min, max)` may narrow each remaining range further, or drop the key (`None`):
/// the proxy drops keys the client's policy never allows and whose denial it could not
/// answer.
pub fn cap_api_versions(
    version: i16,
    frame_body: Bytes,
    offer: &mut dyn FnMut(i16, i16, i16) -> Option<(i16, i16)>,
) -> Result<Vec<u8>, KafkaError> {
    // ApiVersions answers an unsupported request version in v0 (KIP-511); try the version
    // asked first, then v0.
    let (cid, mut resp, used) = match decode_response::<ApiVersionsResponse>(
        ApiKey::ApiVersions,
        version,
        frame_body.clone(),
    ) {
        Ok((cid, r)) => (cid, r, version),
        Err(e) => {
            match decode_response::<ApiVersionsResponse>(ApiKey::ApiVersions, 0, frame_body) {
                Ok((cid, r)) if r.error_code == UNSUPPORTED_VERSION => (cid, r, 0),
                _ => return Err(e),
            }
        }
    };
    resp.api_keys.retain_mut(|k| {
        let Some(max) = proxy_max_version(k.api_key) else {
            return false;
        };
        k.max_version = k.max_version.min(max);
        if k.min_version > k.max_version {
            return false;
        }
        match offer(k.api_key, k.min_version, k.max_version) {
            Some((min, max)) if min <= max => {
                (k.min_version, k.max_version) = (min, max);
                true
            }
            _ => false,
        }
    });
    verified(
        ApiKey::ApiVersions,
        used,
        encode_response(ApiKey::ApiVersions, used, cid, &resp)?,
    )
}

/// Where brokers are reached through the proxy: given a broker's advertised host and port,
/// the host and port clients should use instead (`None`: leave it).
pub trait BrokerMap {
    fn map(&mut self, node_id: i32, host: &str, port: i32) -> Option<(String, i32)>;
}

impl<F: FnMut(i32, &str, i32) -> Option<(String, i32)>> BrokerMap for F {
    fn map(&mut self, node_id: i32, host: &str, port: i32) -> Option<(String, i32)> {
        self(node_id, host, port)
    }
}

fn remap(map: &mut dyn BrokerMap, node: i32, host: &mut StrBytes, port: &mut i32) {
    if let Some((h, p)) = map.map(node, host.as_str(), *port) {
        *host = StrBytes::from_string(h);
        *port = p;
    }
}

/// Whether responses of `key` carry broker addresses ([`rewrite_brokers`]).
pub fn carries_brokers(key: i16) -> bool {
    key == ApiKey::Metadata as i16
        || key == ApiKey::FindCoordinator as i16
        || key == ApiKey::DescribeCluster as i16
}

/// Rewrite the broker addresses of a Metadata, FindCoordinator or DescribeCluster response
/// (frame body, after the size) through `map`, for clients that reach brokers through fixed
/// proxy listeners. Returns the whole new frame.
pub fn rewrite_brokers(
    key: i16,
    version: i16,
    frame_body: Bytes,
    map: &mut dyn BrokerMap,
) -> Result<Vec<u8>, KafkaError> {
    let k = ApiKey::try_from(key).map_err(|_| KafkaError::UnknownApiKey(key))?;
    match k {
        ApiKey::Metadata => {
            let (cid, mut r) = decode_response::<MetadataResponse>(k, version, frame_body)?;
            remap_all(Some(map), &mut r);
            verified(k, version, encode_response(k, version, cid, &r)?)
        }
        ApiKey::FindCoordinator => {
            let (cid, mut r) = decode_response::<FindCoordinatorResponse>(k, version, frame_body)?;
            if version < 4 && r.error_code == 0 {
                remap(map, r.node_id.0, &mut r.host, &mut r.port);
            }
            for c in &mut r.coordinators {
                if c.error_code == 0 && c.port >= 0 {
                    remap(map, c.node_id.0, &mut c.host, &mut c.port);
                }
            }
            verified(k, version, encode_response(k, version, cid, &r)?)
        }
        ApiKey::DescribeCluster => {
            let (cid, mut r) = decode_response::<DescribeClusterResponse>(k, version, frame_body)?;
            for b in &mut r.brokers {
                remap(map, b.broker_id.0, &mut b.host, &mut b.port);
            }
            verified(k, version, encode_response(k, version, cid, &r)?)
        }
        _ => Err(KafkaError::Body {
            api: api_name(key).unwrap_or("other"),
            version,
            reason: "no broker addresses to rewrite".into(),
        }),
    }
}

/// The part of a request split off because its topics are denied ([`Request::split_topics`]),
/// kept to answer for it in the broker's response ([`merge_denied`]).
#[derive(Debug, Clone)]
pub struct Split {
    denied: SplitOff,
}

#[derive(Debug, Clone)]
enum SplitOff {
    Produce(Vec<m::produce_request::TopicProduceData>),
    /// The denied topics, and the names of the topics that went on: a broker answering more
    /// than was asked (tansu reads an empty list as "all") must not reveal the rest.
    Metadata(Vec<m::metadata_request::MetadataRequestTopic>, Vec<String>),
}

impl Split {
    /// The denied topics.
    pub fn topics(&self) -> Vec<String> {
        match &self.denied {
            SplitOff::Produce(t) => t
                .iter()
                .map(|t| topic_or_id(Some(&t.name), &t.topic_id))
                .collect(),
            SplitOff::Metadata(t, _) => t
                .iter()
                .map(|t| topic_or_id(t.name.as_ref(), &t.topic_id))
                .collect(),
        }
    }
}

impl Request {
    /// Split off the topics `allowed` rejects, for a Produce or a Metadata request that names
    /// topics — the two requests a client mixes allowed and denied topics in, and where a
    /// broker with ACLs answers per topic. `None` when nothing was split off, when every
    /// topic of a Produce was, or the API has no per-topic answer (the request is then judged
    /// whole). A Metadata request whose topics are all denied still goes on, asking for none.
    pub fn split_topics(&mut self, allowed: &mut dyn FnMut(&str) -> bool) -> Option<Split> {
        let v = self.header.api_version;
        match &mut self.body {
            Body::Produce(r) => {
                let (keep, deny): (Vec<_>, Vec<_>) = std::mem::take(&mut r.topic_data)
                    .into_iter()
                    .partition(|t| allowed(&topic_or_id(Some(&t.name), &t.topic_id)));
                if keep.is_empty() || deny.is_empty() {
                    r.topic_data = keep.into_iter().chain(deny).collect();
                    return None;
                }
                r.topic_data = keep;
                Some(Split {
                    denied: SplitOff::Produce(deny),
                })
            }
            // v0 reads an empty topic list as "all topics": never split there.
            Body::Metadata(r) if v >= 1 => {
                let topics = r.topics.as_mut()?;
                let (keep, deny): (Vec<_>, Vec<_>) = std::mem::take(topics)
                    .into_iter()
                    .partition(|t| allowed(&topic_or_id(t.name.as_ref(), &t.topic_id)));
                // Even with every topic denied the request goes on (asking for no topics):
                // clients need the brokers a Metadata answer lists to report the denial.
                if deny.is_empty() {
                    *topics = keep.into_iter().chain(deny).collect();
                    return None;
                }
                let kept = keep
                    .iter()
                    .map(|t| topic_or_id(t.name.as_ref(), &t.topic_id))
                    .collect();
                *topics = keep;
                Some(Split {
                    denied: SplitOff::Metadata(deny, kept),
                })
            }
            _ => None,
        }
    }

    /// The request as a frame again (size prefix, header, body), after
    /// [`Request::split_topics`].
    pub fn encode_frame(&self) -> Result<Vec<u8>, KafkaError> {
        let v = self.header.api_version;
        let key = ApiKey::try_from(self.header.api_key)
            .map_err(|_| KafkaError::UnknownApiKey(self.header.api_key))?;
        let fail = |reason: String| KafkaError::Encode {
            api: api_name(key as i16).unwrap_or("other"),
            version: v,
            reason,
        };
        let mut buf = BytesMut::with_capacity(256);
        buf.extend_from_slice(&[0, 0, 0, 0]);
        let mut h = m::RequestHeader::default();
        h.request_api_key = self.header.api_key;
        h.request_api_version = v;
        h.correlation_id = self.header.correlation_id;
        h.client_id = self.header.client_id.clone().map(StrBytes::from_string);
        h.encode(&mut buf, key.request_header_version(v))
            .map_err(|e| fail(e.to_string()))?;
        match &self.body {
            Body::Produce(r) => r.encode(&mut buf, v),
            Body::Metadata(r) => r.encode(&mut buf, v),
            _ => return Err(fail("only split requests are re-encoded".into())),
        }
        .map_err(|e| fail(e.to_string()))?;
        let size = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&size.to_be_bytes());
        // The broker must read exactly what was judged. kafka-protocol does not re-encode
        // every request it decodes faithfully (an unknown tagged field with a tag above
        // i32::MAX is counted but not written, found by fuzzing), so the edited frame is read
        // back and refused unless it decodes to the same body.
        let frame = Bytes::from(buf);
        let same = match (&self.body, decode_request(frame.slice(4..)).map(|r| r.body)) {
            (Body::Produce(a), Ok(Body::Produce(b))) => *a == b,
            (Body::Metadata(a), Ok(Body::Metadata(b))) => *a == b,
            _ => false,
        };
        if !same {
            return Err(fail(
                "the edited request does not read back as written (malformed tagged fields?)"
                    .into(),
            ));
        }
        Ok(frame.to_vec())
    }
}

fn remap_all(brokers: Option<&mut dyn BrokerMap>, r: &mut MetadataResponse) {
    if let Some(map) = brokers {
        for b in &mut r.brokers {
            remap(map, b.node_id.0, &mut b.host, &mut b.port);
        }
    }
}

/// The broker's response to the forwarded part of a split request, with the split-off topics
/// answered `error` (and broker addresses mapped through `brokers`, for Metadata).
pub fn merge_denied(
    split: &Split,
    version: i16,
    frame_body: Bytes,
    error: i16,
    brokers: Option<&mut dyn BrokerMap>,
) -> Result<Vec<u8>, KafkaError> {
    match &split.denied {
        SplitOff::Produce(denied) => {
            let (cid, mut r) =
                decode_response::<m::ProduceResponse>(ApiKey::Produce, version, frame_body)?;
            r.responses
                .extend(denied.iter().map(|t| refused_produce(t, error)));
            verified(
                ApiKey::Produce,
                version,
                encode_response(ApiKey::Produce, version, cid, &r)?,
            )
        }
        SplitOff::Metadata(denied, kept) => {
            let (cid, mut r) =
                decode_response::<MetadataResponse>(ApiKey::Metadata, version, frame_body)?;
            r.topics
                .retain(|t| kept.contains(&topic_or_id(t.name.as_ref(), &t.topic_id)));
            r.topics
                .extend(denied.iter().map(|t| refused_metadata(t, error)));
            remap_all(brokers, &mut r);
            verified(
                ApiKey::Metadata,
                version,
                encode_response(ApiKey::Metadata, version, cid, &r)?,
            )
        }
    }
}

/// A Metadata response to a request for all topics, without the topics `visible` rejects (a
/// broker with ACLs lists only the topics a client may describe), broker addresses mapped
/// through `brokers`. Returns the frame and the hidden topics.
pub fn filter_metadata(
    version: i16,
    frame_body: Bytes,
    visible: &mut dyn FnMut(&str) -> bool,
    brokers: Option<&mut dyn BrokerMap>,
) -> Result<(Vec<u8>, Vec<String>), KafkaError> {
    let (cid, mut r) = decode_response::<MetadataResponse>(ApiKey::Metadata, version, frame_body)?;
    let mut hidden = Vec::new();
    r.topics.retain(|t| {
        let name = topic_or_id(t.name.as_ref(), &t.topic_id);
        let keep = visible(&name);
        if !keep {
            hidden.push(name);
        }
        keep
    });
    remap_all(brokers, &mut r);
    let frame = encode_response(ApiKey::Metadata, version, cid, &r)?;
    Ok((verified(ApiKey::Metadata, version, frame)?, hidden))
}

/// Decode a response frame (size prefix included) as the response of `key` v`version` a
/// client would read, with nothing left over; its correlation id. What the fuzz targets and
/// tests use to check that every answer tollgate writes is well-formed.
pub fn check_response(key: i16, version: i16, frame: &[u8]) -> Result<i32, KafkaError> {
    let k = ApiKey::try_from(key).map_err(|_| KafkaError::UnknownApiKey(key))?;
    let bad = |reason: String| KafkaError::Body {
        api: api_name(key).unwrap_or("other"),
        version,
        reason,
    };
    let size = frame
        .get(..4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| bad("no size prefix".into()))?;
    if usize::try_from(size).ok() != Some(frame.len() - 4) {
        return Err(bad(format!(
            "size prefix {size} for {} bytes",
            frame.len() - 4
        )));
    }
    let body = Bytes::copy_from_slice(&frame[4..]);
    macro_rules! full {
        ($ty:ty) => {{
            let (cid, mut rest) = response_body(k, version, body)?;
            <$ty>::decode(&mut rest, version).map_err(|e| bad(e.to_string()))?;
            if !rest.is_empty() {
                return Err(bad(format!("{} bytes after the response", rest.len())));
            }
            Ok(cid)
        }};
    }
    match k {
        ApiKey::Produce => full!(m::ProduceResponse),
        ApiKey::Fetch => full!(m::FetchResponse),
        ApiKey::ListOffsets => full!(m::ListOffsetsResponse),
        ApiKey::Metadata => full!(MetadataResponse),
        ApiKey::OffsetCommit => full!(m::OffsetCommitResponse),
        ApiKey::OffsetFetch => full!(m::OffsetFetchResponse),
        ApiKey::FindCoordinator => full!(FindCoordinatorResponse),
        ApiKey::JoinGroup => full!(m::JoinGroupResponse),
        ApiKey::Heartbeat => full!(m::HeartbeatResponse),
        ApiKey::LeaveGroup => full!(m::LeaveGroupResponse),
        ApiKey::SyncGroup => full!(m::SyncGroupResponse),
        ApiKey::DescribeGroups => full!(m::DescribeGroupsResponse),
        ApiKey::ApiVersions => full!(ApiVersionsResponse),
        ApiKey::CreateTopics => full!(m::CreateTopicsResponse),
        ApiKey::DeleteTopics => full!(m::DeleteTopicsResponse),
        ApiKey::InitProducerId => full!(m::InitProducerIdResponse),
        ApiKey::AddPartitionsToTxn => full!(m::AddPartitionsToTxnResponse),
        ApiKey::AddOffsetsToTxn => full!(m::AddOffsetsToTxnResponse),
        ApiKey::EndTxn => full!(m::EndTxnResponse),
        ApiKey::TxnOffsetCommit => full!(m::TxnOffsetCommitResponse),
        ApiKey::DescribeCluster => full!(DescribeClusterResponse),
        _ => Err(bad("not a response tollgate writes".into())),
    }
}

/// The correlation id of a response frame body (its first four bytes in every header version).
pub fn response_correlation_id(frame_body: &[u8]) -> Option<i32> {
    frame_body
        .get(..4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests;
