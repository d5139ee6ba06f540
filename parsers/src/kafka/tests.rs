use super::*;
use kafka_protocol::messages as m;

fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// A request frame body (no size prefix) as a client encodes it.
fn request_body<R: Encodable>(
    key: ApiKey,
    v: i16,
    cid: i32,
    client: Option<&str>,
    body: &R,
) -> Bytes {
    let mut buf = BytesMut::new();
    let mut h = m::RequestHeader::default();
    h.request_api_key = key as i16;
    h.request_api_version = v;
    h.correlation_id = cid;
    h.client_id = client.map(sb);
    h.encode(&mut buf, key.request_header_version(v)).unwrap();
    body.encode(&mut buf, v)
        .unwrap_or_else(|e| panic!("{key:?} v{v}: {e}"));
    buf.freeze()
}

/// Decode a response frame (with its size prefix) as the client of `key` v`v` would.
fn client_decodes<R: Decodable>(key: ApiKey, v: i16, frame: &[u8]) -> (i32, R) {
    let size = i32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(size, frame.len() - 4, "size prefix");
    let mut buf = Bytes::copy_from_slice(&frame[4..]);
    let h = ResponseHeader::decode(&mut buf, key.response_header_version(v)).unwrap();
    let r = R::decode(&mut buf, v).unwrap();
    assert_eq!(buf.len(), 0, "{key:?} v{v}: trailing bytes in the response");
    (h.correlation_id, r)
}

fn produce(topics: &[(&str, &[i32])], acks: i16, txn: Option<&str>) -> m::ProduceRequest {
    let mut r = m::ProduceRequest::default();
    r.acks = acks;
    r.timeout_ms = 30_000;
    r.transactional_id = txn.map(|t| m::TransactionalId(sb(t)));
    for (t, parts) in topics {
        let mut td = m::produce_request::TopicProduceData::default();
        td.name = TopicName(sb(t));
        for &p in *parts {
            let mut pd = m::produce_request::PartitionProduceData::default();
            pd.index = p;
            pd.records = Some(Bytes::from_static(b"opaque record batch"));
            td.partition_data.push(pd);
        }
        r.topic_data.push(td);
    }
    r
}

#[test]
fn frames_are_split_on_the_size_prefix_and_bounded() {
    assert_eq!(frame_len(&[0, 0], 100), Ok(None));
    assert_eq!(frame_len(&[0, 0, 0, 3, 1, 2], 100), Ok(None));
    assert_eq!(frame_len(&[0, 0, 0, 3, 1, 2, 3, 9], 100), Ok(Some(7)));
    assert_eq!(
        frame_len(&[0xff, 0xff, 0xff, 0xff], 100),
        Err(KafkaError::NegativeLength(-1))
    );
    assert_eq!(
        frame_len(&[0, 0, 1, 0], 100),
        Err(KafkaError::TooLarge(256, 100))
    );
}

#[test]
fn flexible_produce_yields_topics_transactional_id_and_acks() {
    for v in [3, 8, 9, 12] {
        let body = request_body(
            ApiKey::Produce,
            v,
            77,
            Some("rdkafka"),
            &produce(&[("orders", &[0, 1]), ("audit", &[2])], -1, Some("tx-1")),
        );
        let req = decode_request(body).unwrap();
        assert_eq!(req.header.api_key, 0);
        assert_eq!(req.header.api_version, v);
        assert_eq!(req.header.correlation_id, 77);
        assert_eq!(req.header.client_id.as_deref(), Some("rdkafka"));
        let f = req.policy_fields();
        assert_eq!(f.topics, vec!["orders", "audit"], "v{v}");
        assert_eq!(f.transactional_ids, vec!["tx-1"]);
        assert!(f.expects_response);

        let frame = deny_response(&req, TOPIC_AUTHORIZATION_FAILED)
            .unwrap()
            .unwrap();
        let (cid, resp): (i32, m::ProduceResponse) = client_decodes(ApiKey::Produce, v, &frame);
        assert_eq!(cid, 77);
        let got: Vec<(String, i32, i16)> = resp
            .responses
            .iter()
            .flat_map(|t| {
                t.partition_responses
                    .iter()
                    .map(move |p| (t.name.0.to_string(), p.index, p.error_code))
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("orders".to_string(), 0, 29),
                ("orders".to_string(), 1, 29),
                ("audit".to_string(), 2, 29)
            ]
        );
    }
}

#[test]
fn produce_with_acks_zero_gets_no_denial_response() {
    let body = request_body(
        ApiKey::Produce,
        9,
        1,
        Some("c"),
        &produce(&[("t", &[0])], 0, None),
    );
    let req = decode_request(body).unwrap();
    assert!(!req.policy_fields().expects_response);
    assert_eq!(deny_response(&req, 29).unwrap(), None);
}

#[test]
fn metadata_for_all_topics_has_no_topics_and_named_topics_are_listed() {
    let mut all = m::MetadataRequest::default();
    all.topics = None;
    let req = decode_request(request_body(ApiKey::Metadata, 12, 5, Some("c"), &all)).unwrap();
    assert!(req.policy_fields().topics.is_empty());

    let mut some = m::MetadataRequest::default();
    let mut t = m::metadata_request::MetadataRequestTopic::default();
    t.name = Some(TopicName(sb("orders")));
    some.topics = Some(vec![t]);
    let req = decode_request(request_body(ApiKey::Metadata, 12, 6, Some("c"), &some)).unwrap();
    assert_eq!(req.policy_fields().topics, vec!["orders"]);
    let frame = deny_response(&req, 29).unwrap().unwrap();
    let (cid, r): (i32, MetadataResponse) = client_decodes(ApiKey::Metadata, 12, &frame);
    assert_eq!(cid, 6);
    assert_eq!(r.topics.len(), 1);
    assert_eq!(r.topics[0].error_code, 29);
    assert_eq!(r.topics[0].name.as_ref().unwrap().0.as_str(), "orders");
}

#[test]
fn header_errors_are_precise() {
    assert_eq!(
        parse_request_header(&[0, 3, 0]),
        Err(KafkaError::Header("shorter than 8 bytes"))
    );
    // Metadata v1 (header v1) with a client id claiming 10 bytes and carrying 2.
    assert_eq!(
        parse_request_header(&[0, 3, 0, 1, 0, 0, 0, 9, 0, 10, b'a', b'b']),
        Err(KafkaError::Header("client id truncated"))
    );
    let unknown = decode_request(Bytes::from_static(&[0x7f, 0, 0, 1, 0, 0, 0, 9, 0xff, 0xff]));
    assert_eq!(unknown.unwrap_err(), KafkaError::UnknownApiKey(0x7f00));
    let body = request_body(
        ApiKey::Metadata,
        12,
        9,
        None,
        &m::MetadataRequest::default(),
    );
    let mut raw = body.to_vec();
    raw[2..4].copy_from_slice(&99i16.to_be_bytes());
    match decode_request(Bytes::from(raw)).unwrap_err() {
        KafkaError::UnsupportedVersion {
            api, version, min, ..
        } => {
            assert_eq!((api, version, min), ("metadata", 99, 0));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn a_truncated_body_is_an_error_not_a_panic() {
    let body = request_body(
        ApiKey::Produce,
        9,
        1,
        Some("c"),
        &produce(&[("t", &[0])], 1, None),
    );
    for cut in 0..body.len() {
        let _ = decode_request(body.slice(..cut));
    }
    assert!(decode_request(body.slice(..body.len() - 3)).is_err());
}

#[test]
fn topic_ids_stand_in_for_missing_names() {
    let mut r = m::MetadataRequest::default();
    let mut t = m::metadata_request::MetadataRequestTopic::default();
    t.name = None;
    t.topic_id = uuid::Uuid::from_u128(0x1234);
    r.topics = Some(vec![t]);
    let req = decode_request(request_body(ApiKey::Metadata, 12, 1, Some("c"), &r)).unwrap();
    assert_eq!(
        req.policy_fields().topics,
        vec!["topic-id:00000000-0000-0000-0000-000000001234"]
    );
}

#[test]
fn groups_and_transactional_ids_are_extracted() {
    let mut fc = m::FindCoordinatorRequest::default();
    fc.key_type = 1;
    fc.coordinator_keys = vec![sb("tx-a"), sb("tx-b")];
    let req = decode_request(request_body(ApiKey::FindCoordinator, 4, 1, Some("c"), &fc)).unwrap();
    assert_eq!(req.policy_fields().transactional_ids, vec!["tx-a", "tx-b"]);
    assert_eq!(req.deny_error(false), TRANSACTIONAL_ID_AUTHORIZATION_FAILED);

    let mut of = m::OffsetFetchRequest::default();
    let mut g = m::offset_fetch_request::OffsetFetchRequestGroup::default();
    g.group_id = m::GroupId(sb("billing"));
    let mut t = m::offset_fetch_request::OffsetFetchRequestTopics::default();
    t.name = TopicName(sb("orders"));
    t.partition_indexes = vec![0];
    g.topics = Some(vec![t]);
    of.groups = vec![g];
    let req = decode_request(request_body(ApiKey::OffsetFetch, 8, 1, Some("c"), &of)).unwrap();
    let f = req.policy_fields();
    assert_eq!(
        (f.groups, f.topics),
        (vec!["billing".to_string()], vec!["orders".to_string()])
    );
    assert_eq!(req.deny_error(false), GROUP_AUTHORIZATION_FAILED);
    assert_eq!(req.deny_error(true), TOPIC_AUTHORIZATION_FAILED);
}

/// Every decoded API, at every version tollgate decodes: a request round-trips through
/// [`decode_request`], and its denial decodes as that API's response at that version, with the
/// request's correlation id and nothing left over.
#[test]
fn every_deny_response_is_a_valid_response_of_the_same_api_and_version() {
    macro_rules! check {
        ($key:expr, $req:ty, $resp:ty) => {{
            let key: ApiKey = $key;
            let (min, max) = supported_range(key);
            for v in min..=max {
                let body =
                    request_body(key, v, 4242 + v as i32, Some("client"), &<$req>::default());
                let req = decode_request(body).unwrap_or_else(|e| panic!("{key:?} v{v}: {e}"));
                for err in [29, 30, 31, 53] {
                    let frame = deny_response(&req, err)
                        .unwrap_or_else(|e| panic!("{key:?} v{v}: {e}"))
                        .unwrap_or_else(|| panic!("{key:?} v{v}: no response"));
                    let (cid, _): (i32, $resp) = client_decodes(key, v, &frame);
                    assert_eq!(cid, 4242 + v as i32, "{key:?} v{v}");
                }
            }
        }};
    }
    check!(ApiKey::Fetch, m::FetchRequest, m::FetchResponse);
    check!(
        ApiKey::ListOffsets,
        m::ListOffsetsRequest,
        m::ListOffsetsResponse
    );
    check!(ApiKey::Metadata, m::MetadataRequest, m::MetadataResponse);
    check!(
        ApiKey::OffsetCommit,
        m::OffsetCommitRequest,
        m::OffsetCommitResponse
    );
    check!(
        ApiKey::OffsetFetch,
        m::OffsetFetchRequest,
        m::OffsetFetchResponse
    );
    check!(
        ApiKey::FindCoordinator,
        m::FindCoordinatorRequest,
        m::FindCoordinatorResponse
    );
    check!(ApiKey::JoinGroup, m::JoinGroupRequest, m::JoinGroupResponse);
    check!(ApiKey::Heartbeat, m::HeartbeatRequest, m::HeartbeatResponse);
    check!(
        ApiKey::LeaveGroup,
        m::LeaveGroupRequest,
        m::LeaveGroupResponse
    );
    check!(ApiKey::SyncGroup, m::SyncGroupRequest, m::SyncGroupResponse);
    check!(
        ApiKey::DescribeGroups,
        m::DescribeGroupsRequest,
        m::DescribeGroupsResponse
    );
    check!(
        ApiKey::ApiVersions,
        m::ApiVersionsRequest,
        m::ApiVersionsResponse
    );
    check!(
        ApiKey::CreateTopics,
        m::CreateTopicsRequest,
        m::CreateTopicsResponse
    );
    check!(
        ApiKey::DeleteTopics,
        m::DeleteTopicsRequest,
        m::DeleteTopicsResponse
    );
    check!(
        ApiKey::InitProducerId,
        m::InitProducerIdRequest,
        m::InitProducerIdResponse
    );
    check!(
        ApiKey::AddPartitionsToTxn,
        m::AddPartitionsToTxnRequest,
        m::AddPartitionsToTxnResponse
    );
    check!(
        ApiKey::AddOffsetsToTxn,
        m::AddOffsetsToTxnRequest,
        m::AddOffsetsToTxnResponse
    );
    check!(ApiKey::EndTxn, m::EndTxnRequest, m::EndTxnResponse);
    check!(
        ApiKey::TxnOffsetCommit,
        m::TxnOffsetCommitRequest,
        m::TxnOffsetCommitResponse
    );
    // Produce needs a non-default acks to get an answer.
    let (min, max) = supported_range(ApiKey::Produce);
    for v in min..=max {
        let req = decode_request(request_body(
            ApiKey::Produce,
            v,
            1,
            None,
            &produce(&[], 1, None),
        ))
        .unwrap();
        let frame = deny_response(&req, 29).unwrap().unwrap();
        let _: (i32, m::ProduceResponse) = client_decodes(ApiKey::Produce, v, &frame);
    }
}

fn api_versions_frame(v: i16, keys: &[(i16, i16, i16)]) -> Bytes {
    let mut r = ApiVersionsResponse::default();
    for &(k, min, max) in keys {
        let mut a = m::api_versions_response::ApiVersion::default();
        a.api_key = k;
        a.min_version = min;
        a.max_version = max;
        r.api_keys.push(a);
    }
    let frame = encode_response(ApiKey::ApiVersions, v, 3, &r).unwrap();
    Bytes::copy_from_slice(&frame[4..])
}

#[test]
fn api_versions_are_capped_to_what_tollgate_decodes() {
    let body = api_versions_frame(
        3,
        &[(0, 3, 13), (1, 4, 18), (3, 0, 13), (18, 0, 4), (999, 0, 1)],
    );
    let frame =
        cap_api_versions(3, body, &mut |k, min, max| (k != 3).then_some((min, max))).unwrap();
    let (cid, r): (i32, ApiVersionsResponse) = client_decodes(ApiKey::ApiVersions, 3, &frame);
    assert_eq!(cid, 3);
    let got: Vec<(i16, i16, i16)> = r
        .api_keys
        .iter()
        .map(|k| (k.api_key, k.min_version, k.max_version))
        .collect();
    // Metadata (3) dropped by the offer callback; 999 unknown.
    assert_eq!(got, vec![(0, 3, 12), (1, 4, 12), (18, 0, 4)]);
}

#[test]
fn an_unknown_api_versions_version_gets_the_kip_511_answer() {
    let h = parse_request_header(&[0, 18, 0x7f, 0, 0, 0, 0, 5, 0, 0, 0]).unwrap();
    let frame = unsupported_version_response(&h).unwrap();
    let (cid, r): (i32, ApiVersionsResponse) = client_decodes(ApiKey::ApiVersions, 0, &frame);
    assert_eq!((cid, r.error_code), (5, UNSUPPORTED_VERSION));
    assert_eq!(r.api_keys[0].api_key, 18);
    // The broker's own v0 fallback answer passes through the cap with its error kept.
    let mut fallback = ApiVersionsResponse::default();
    fallback.error_code = UNSUPPORTED_VERSION;
    let raw = encode_response(ApiKey::ApiVersions, 0, 8, &fallback).unwrap();
    let capped = cap_api_versions(127, Bytes::copy_from_slice(&raw[4..]), &mut |_, a, b| {
        Some((a, b))
    })
    .unwrap();
    let (_, r): (i32, ApiVersionsResponse) = client_decodes(ApiKey::ApiVersions, 0, &capped);
    assert_eq!(r.error_code, UNSUPPORTED_VERSION);
}

#[test]
fn broker_addresses_are_rewritten_in_metadata_and_find_coordinator() {
    let mut md = MetadataResponse::default();
    for (id, port) in [(1, 9092), (2, 9093)] {
        let mut b = m::metadata_response::MetadataResponseBroker::default();
        b.node_id = BrokerId(id);
        b.host = sb("10.0.0.1");
        b.port = port;
        md.brokers.push(b);
    }
    let raw = encode_response(ApiKey::Metadata, 12, 11, &md).unwrap();
    let mut map = |node: i32, host: &str, port: i32| {
        assert_eq!(host, "10.0.0.1");
        (node == 1 && port == 9092).then(|| ("127.0.0.1".to_string(), 15092))
    };
    let out = rewrite_brokers(3, 12, Bytes::copy_from_slice(&raw[4..]), &mut map).unwrap();
    let (cid, r): (i32, MetadataResponse) = client_decodes(ApiKey::Metadata, 12, &out);
    assert_eq!(cid, 11);
    assert_eq!(
        (r.brokers[0].host.as_str(), r.brokers[0].port),
        ("127.0.0.1", 15092)
    );
    assert_eq!(
        (r.brokers[1].host.as_str(), r.brokers[1].port),
        ("10.0.0.1", 9093)
    );

    for v in [3, 4] {
        let mut fc = FindCoordinatorResponse::default();
        if v < 4 {
            fc.node_id = BrokerId(1);
            fc.host = sb("10.0.0.1");
            fc.port = 9092;
        }
        let mut c = m::find_coordinator_response::Coordinator::default();
        c.key = sb("g");
        c.node_id = BrokerId(1);
        c.host = sb("10.0.0.1");
        c.port = 9092;
        fc.coordinators = vec![c];
        if v < 4 {
            fc.coordinators.clear();
        }
        let raw = encode_response(ApiKey::FindCoordinator, v, 2, &fc).unwrap();
        let out = rewrite_brokers(10, v, Bytes::copy_from_slice(&raw[4..]), &mut map).unwrap();
        let (_, r): (i32, FindCoordinatorResponse) =
            client_decodes(ApiKey::FindCoordinator, v, &out);
        if v < 4 {
            assert_eq!((r.host.as_str(), r.port), ("127.0.0.1", 15092));
        } else {
            assert_eq!(
                (r.coordinators[0].host.as_str(), r.coordinators[0].port),
                ("127.0.0.1", 15092)
            );
        }
    }
}

#[test]
fn a_mixed_produce_is_split_and_the_denied_topics_answered_in_the_broker_response() {
    let body = request_body(
        ApiKey::Produce,
        9,
        31,
        Some("c"),
        &produce(&[("ok", &[0]), ("secret", &[0, 1])], -1, None),
    );
    let mut req = decode_request(body).unwrap();
    let split = req.split_topics(&mut |t| t != "secret").unwrap();
    assert_eq!(split.topics(), vec!["secret"]);
    let forwarded = req.encode_frame().unwrap();
    let again = decode_request(Bytes::copy_from_slice(&forwarded[4..])).unwrap();
    assert_eq!(again.policy_fields().topics, vec!["ok"]);
    assert_eq!(again.header.correlation_id, 31);
    // The broker answers for "ok"; the merge adds "secret" with the error.
    let mut resp = m::ProduceResponse::default();
    let mut tr = m::produce_response::TopicProduceResponse::default();
    tr.name = TopicName(sb("ok"));
    tr.partition_responses
        .push(m::produce_response::PartitionProduceResponse::default());
    resp.responses.push(tr);
    let raw = encode_response(ApiKey::Produce, 9, 31, &resp).unwrap();
    let merged = merge_denied(&split, 9, Bytes::copy_from_slice(&raw[4..]), 29, None).unwrap();
    let (cid, r): (i32, m::ProduceResponse) = client_decodes(ApiKey::Produce, 9, &merged);
    assert_eq!(cid, 31);
    let errs: Vec<(String, i16)> = r
        .responses
        .iter()
        .flat_map(|t| {
            t.partition_responses
                .iter()
                .map(move |p| (t.name.0.to_string(), p.error_code))
        })
        .collect();
    assert_eq!(
        errs,
        vec![
            ("ok".into(), 0),
            ("secret".into(), 29),
            ("secret".into(), 29)
        ]
    );
    // Nothing to split when every topic (or none) is allowed.
    let mut all = decode_request(request_body(
        ApiKey::Produce,
        9,
        1,
        None,
        &produce(&[("a", &[0])], 1, None),
    ))
    .unwrap();
    assert!(all.split_topics(&mut |_| true).is_none());
    assert!(all.split_topics(&mut |_| false).is_none());
    assert_eq!(all.policy_fields().topics, vec!["a"]);
}

#[test]
fn metadata_for_all_topics_hides_what_the_client_may_not_see() {
    let mut md = MetadataResponse::default();
    for t in ["orders", "secret"] {
        let mut tr = m::metadata_response::MetadataResponseTopic::default();
        tr.name = Some(TopicName(sb(t)));
        md.topics.push(tr);
    }
    let raw = encode_response(ApiKey::Metadata, 12, 4, &md).unwrap();
    let (out, hidden) = filter_metadata(
        12,
        Bytes::copy_from_slice(&raw[4..]),
        &mut |t| t == "orders",
        None,
    )
    .unwrap();
    assert_eq!(hidden, vec!["secret"]);
    let (_, r): (i32, MetadataResponse) = client_decodes(ApiKey::Metadata, 12, &out);
    let names: Vec<&str> = r
        .topics
        .iter()
        .map(|t| t.name.as_ref().unwrap().0.as_str())
        .collect();
    assert_eq!(names, vec!["orders"]);
}

/// Found while writing this parser: kafka-protocol reserves `Vec::with_capacity(count)` from
/// the wire before decoding elements, so 14 bytes claiming 2^31-1 topics aborted the process
/// (SIGABRT in this very test) until [`crate::alloc::LazyHugeAlloc`]. Now it is an error.
#[test]
fn a_request_claiming_two_billion_topics_is_an_error_not_an_abort() {
    // Metadata v1: header (key 3, v1, correlation 1, null client id), topic count i32::MAX.
    let body = Bytes::from_static(&[0, 3, 0, 1, 0, 0, 0, 1, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff]);
    match decode_request(body) {
        Err(KafkaError::Body { api, version, .. }) => assert_eq!((api, version), ("metadata", 1)),
        other => panic!("{other:?}"),
    }
    // Flexible versions use varint counts: 2^32-2 elements.
    let body = Bytes::from_static(&[
        0, 3, 0, 12, 0, 0, 0, 1, 0xff, 0xff, 0, 0xff, 0xff, 0xff, 0xff, 0x0f,
    ]);
    assert!(decode_request(body).is_err());
}

/// Found by the kafka_response fuzz target: kafka-protocol decodes an unknown tagged field
/// numbered 2^32-1 as tag -1 and then encodes a response that does not decode. A rewritten
/// response is checked before it is sent; this one is refused (the proxy closes the
/// connection) instead of reaching the client malformed.
#[test]
fn a_rewritten_response_that_would_not_decode_is_refused() {
    let body: Vec<u8> = vec![
        7, 0, 0, 0, 0, 36, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
        2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 255, 255, 255, 255, 255, 255, 255, 3, 0, 4, 1, 0, 0,
        36, 0, 30, 0, 0, 0, 0,
    ];
    let r = cap_api_versions(4, Bytes::from(body), &mut |_, a, b| Some((a, b)));
    assert!(matches!(r, Err(KafkaError::Encode { .. })), "{r:?}");
}

/// docs/kafka.md shows the matrix the code supports; `UPDATE_DOCS=1 cargo test` rewrites it.
#[test]
fn the_documented_support_matrix_is_the_code_s() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/kafka.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let (begin, end) = ("<!-- matrix:begin -->\n", "<!-- matrix:end -->");
    let a = doc.find(begin).expect("matrix markers") + begin.len();
    let b = doc.find(end).expect("matrix markers");
    let want = support_matrix_markdown();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(path, format!("{}{want}{}", &doc[..a], &doc[b..])).unwrap();
        return;
    }
    assert_eq!(
        &doc[a..b],
        want,
        "docs/kafka.md is stale: run UPDATE_DOCS=1 cargo test -p tollgate-parsers"
    );
}

#[test]
fn an_edited_request_that_would_not_read_back_the_same_is_refused() {
    // Metadata v12 for topics "a" and "b"; "a" carries an unknown tagged field numbered
    // 2³²−1, which kafka-protocol decodes (as tag −1) but leaves out when encoding while
    // still counting it (found by the kafka_request fuzz target in a CI smoke run).
    let mut body = vec![0, 3, 0, 12, 0, 0, 0, 7, 0, 1, b'c', 0];
    body.push(3); // two topics
    body.extend([0; 16]);
    body.extend([2, b'a', 1, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, b'x']);
    body.extend([0; 16]);
    body.extend([2, b'b', 0]);
    body.extend([0, 0, 0]); // allow_auto_topic_creation, include_topic_authorized_operations, tags
    let mut req = decode_request(Bytes::from(body)).unwrap();
    assert_eq!(req.policy_fields().topics, vec!["a", "b"]);
    let split = req.split_topics(&mut |t| t == "a").unwrap();
    assert_eq!(split.topics(), vec!["b"]);
    let err = req.encode_frame().unwrap_err();
    assert!(err.to_string().contains("does not read back"), "{err}");

    // Without the odd tag the same edit goes through.
    let mut fine = decode_request(request_body(
        ApiKey::Metadata,
        12,
        7,
        Some("c"),
        &m::MetadataRequest::default().with_topics(Some(vec![
            m::metadata_request::MetadataRequestTopic::default().with_name(Some(sb("a").into())),
            m::metadata_request::MetadataRequestTopic::default().with_name(Some(sb("b").into())),
        ])),
    ))
    .unwrap();
    fine.split_topics(&mut |t| t == "a").unwrap();
    let frame = fine.encode_frame().unwrap();
    let again = decode_request(Bytes::copy_from_slice(&frame[4..])).unwrap();
    assert_eq!(again.policy_fields().topics, vec!["a"]);
}
