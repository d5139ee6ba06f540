//! IPs learned from DNS answers (`toFQDNs`) on the agent's side: who taught them, the identity
//! each got, and the `Fqdn` stream separate proxies report them on (`tollgate_api::v1::Fqdn`;
//! the proxy's side is `proxy/src/fqdn_link.rs`).
//!
//! * Every teacher is a source of its own: the in-process proxy of `tollgate up` ([`LOCAL`]) or
//!   a proxy process, by the `host/pid` it names. An IP is in force while some source names it;
//!   its identity is given once (counting up from `FIRST_FQDN_IDENTITY`) and kept while it is.
//! * While a proxy's stream is open, that proxy is the authority: it removes what expired (it
//!   keeps IPs with live connections past their TTL, so the agent must not expire them on its
//!   own). A full message (the first of every stream) replaces all that proxy taught before.
//! * When the stream closes, what it taught stays until the TTL it last reported runs out — so a
//!   proxy restart does not cut flows to learned IPs the kernel allows directly — unless the same
//!   proxy reconnects first and re-sends its cache.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tollgate_api::v1::{Learned, LearnedAck, fqdn_server};

use crate::plan::LearnedIp;

/// The source name of the in-process proxy.
pub const LOCAL: &str = "local";

/// One change of what a source learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub name: String,
    pub ip: IpAddr,
    /// TTL left when it was reported.
    pub ttl: Duration,
    pub removed: bool,
}

#[derive(Debug, Default)]
struct Taught {
    /// The stream that owns this source now (0 for [`LOCAL`]); `None` once it closed.
    open: Option<u64>,
    /// (name, IP) → when its TTL runs out (as reported).
    pairs: BTreeMap<(String, IpAddr), Instant>,
}

/// Learned IPs by source, and their identities.
#[derive(Debug)]
pub struct LearnedBook {
    sources: BTreeMap<String, Taught>,
    identities: BTreeMap<IpAddr, u32>,
    next_identity: u32,
}

impl LearnedBook {
    pub fn new(first_identity: u32) -> LearnedBook {
        LearnedBook {
            sources: BTreeMap::new(),
            identities: BTreeMap::new(),
            next_identity: first_identity,
        }
    }

    /// Apply what `source` (on stream `conn`) reported; `full`: it is all that source knows.
    /// True when the set of learned IPs or their names changed.
    pub fn apply(
        &mut self,
        source: &str,
        conn: u64,
        full: bool,
        changes: &[Change],
        now: Instant,
    ) -> bool {
        let before = self.learned();
        let t = self.sources.entry(source.to_string()).or_default();
        t.open = Some(conn);
        if full {
            t.pairs.clear();
        }
        for c in changes {
            let key = (c.name.clone(), c.ip);
            if c.removed {
                t.pairs.remove(&key);
            } else {
                t.pairs.insert(key, now + c.ttl);
            }
        }
        self.reindex();
        self.learned() != before
    }

    /// Stream `conn` of `source` closed: from now on its pairs expire with their TTL (unless
    /// a newer stream of the same source took over already).
    pub fn closed(&mut self, source: &str, conn: u64) {
        if let Some(t) = self.sources.get_mut(source)
            && t.open == Some(conn)
        {
            t.open = None;
        }
    }

    /// Drop the pairs of closed sources whose TTL ran out; true when anything went.
    pub fn expire(&mut self, now: Instant) -> bool {
        let mut gone = false;
        self.sources.retain(|_, t| {
            if t.open.is_none() {
                let n = t.pairs.len();
                t.pairs.retain(|_, expires| *expires > now);
                gone |= t.pairs.len() != n;
            }
            t.open.is_some() || !t.pairs.is_empty()
        });
        if gone {
            self.reindex();
        }
        gone
    }

    /// Identities for IPs new to the book; none for IPs no source names any more.
    fn reindex(&mut self) {
        let named: BTreeSet<IpAddr> = self
            .sources
            .values()
            .flat_map(|t| t.pairs.keys().map(|(_, ip)| *ip))
            .collect();
        self.identities.retain(|ip, _| named.contains(ip));
        for ip in named {
            self.identities.entry(ip).or_insert_with(|| {
                let id = self.next_identity;
                self.next_identity += 1;
                id
            });
        }
    }

    /// Every learned IP with its identity and all the names any source learned it under.
    pub fn learned(&self) -> Vec<LearnedIp> {
        let mut names: BTreeMap<IpAddr, BTreeSet<&str>> = BTreeMap::new();
        for t in self.sources.values() {
            for (name, ip) in t.pairs.keys() {
                names.entry(*ip).or_default().insert(name);
            }
        }
        self.identities
            .iter()
            .map(|(ip, id)| LearnedIp {
                identity: *id,
                ip: *ip,
                names: names
                    .get(ip)
                    .map(|n| n.iter().map(|s| (*s).to_string()).collect())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// How many IPs are learned.
    pub fn len(&self) -> usize {
        self.identities.len()
    }

    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
    }
}

/// Who applies what proxies report: writes it to the kernel (called on a blocking thread).
pub trait LearnedSink: Send + Sync + 'static {
    /// Apply `changes` from `source` on stream `conn` (see [`LearnedBook::apply`]) and write the
    /// result to the kernel; the number of learned IPs in force, or why it failed.
    fn learned(
        &self,
        source: &str,
        conn: u64,
        full: bool,
        changes: Vec<Change>,
    ) -> Result<usize, String>;
    /// Stream `conn` of `source` closed.
    fn closed(&self, source: &str, conn: u64);
}

/// The agent's side of `tollgate_api::v1::Fqdn`: one stream per proxy; each message is
/// applied (kernel writes included) before its ack is sent. Messages that queued up while one
/// was being applied are applied together, with one ack for the last.
#[derive(Clone)]
pub struct LearnedServer {
    sink: Arc<dyn LearnedSink>,
    next_conn: Arc<AtomicU64>,
}

impl std::fmt::Debug for LearnedServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LearnedServer").finish_non_exhaustive()
    }
}

impl LearnedServer {
    pub fn new(sink: impl LearnedSink) -> LearnedServer {
        LearnedServer {
            sink: Arc::new(sink),
            // 0 is the in-process source's.
            next_conn: Arc::new(AtomicU64::new(1)),
        }
    }

    pub fn service(self) -> fqdn_server::FqdnServer<LearnedServer> {
        fqdn_server::FqdnServer::new(self)
    }
}

/// The changes of `m`; a pair whose IP does not parse is skipped and named in `errors`.
fn changes_of(m: &Learned, errors: &mut Vec<String>) -> Vec<Change> {
    m.changes
        .iter()
        .filter_map(|c| match c.ip.parse() {
            Ok(ip) => Some(Change {
                name: c.name.clone(),
                ip,
                ttl: Duration::from_secs(c.ttl_seconds),
                removed: c.removed,
            }),
            Err(_) => {
                errors.push(format!("{}: `{}` is not an IP address", c.name, c.ip));
                None
            }
        })
        .collect()
}

/// At most this many queued messages are applied together.
const COALESCE: usize = 256;

type Acks = Pin<Box<dyn tokio_stream::Stream<Item = Result<LearnedAck, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl fqdn_server::Fqdn for LearnedServer {
    type LearnStream = Acks;

    async fn learn(
        &self,
        request: tonic::Request<tonic::Streaming<Learned>>,
    ) -> Result<tonic::Response<Acks>, tonic::Status> {
        use futures::FutureExt;
        let mut incoming = request.into_inner();
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let sink = self.sink.clone();
        let (tx, rx) = mpsc::channel::<Result<LearnedAck, tonic::Status>>(16);
        tokio::spawn(async move {
            let mut source = String::new();
            while let Ok(Some(first)) = incoming.message().await {
                // The first message of a batch, then whatever is already queued behind it.
                let mut batch = vec![first];
                while batch.len() < COALESCE {
                    match incoming.message().now_or_never() {
                        Some(Ok(Some(m))) => batch.push(m),
                        _ => break,
                    }
                }
                let mut errors = Vec::new();
                let mut full = false;
                let mut changes = Vec::new();
                let mut seq = 0;
                for m in &batch {
                    if !m.proxy.is_empty() {
                        source = m.proxy.clone();
                    }
                    if m.full {
                        // Everything before a full message is replaced by it.
                        full = true;
                        changes.clear();
                    }
                    changes.extend(changes_of(m, &mut errors));
                    seq = seq.max(m.seq);
                }
                if source.is_empty() {
                    source = format!("proxy stream {conn}");
                }
                let (s, src) = (sink.clone(), source.clone());
                let applied =
                    tokio::task::spawn_blocking(move || s.learned(&src, conn, full, changes))
                        .await
                        .unwrap_or_else(|e| Err(format!("applying learned IPs panicked: {e}")));
                let learned_ips = match applied {
                    Ok(n) => n as u64,
                    Err(e) => {
                        errors.push(e);
                        0
                    }
                };
                let ack = LearnedAck {
                    seq,
                    error: errors.join("; "),
                    learned_ips,
                };
                if tx.send(Ok(ack)).await.is_err() {
                    break;
                }
            }
            let _ = tokio::task::spawn_blocking(move || sink.closed(&source, conn)).await;
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn add(name: &str, a: &str, ttl: u64) -> Change {
        Change {
            name: name.into(),
            ip: ip(a),
            ttl: Duration::from_secs(ttl),
            removed: false,
        }
    }

    fn ips(b: &LearnedBook) -> Vec<(IpAddr, u32, Vec<String>)> {
        b.learned()
            .into_iter()
            .map(|l| (l.ip, l.identity, l.names))
            .collect()
    }

    /// Records what the server hands it; refuses IPs in 203.0.113.0/24 (a kernel write that
    /// fails).
    #[derive(Default)]
    struct Recorder {
        calls: std::sync::Mutex<Vec<(String, u64, bool, usize)>>,
        closed: std::sync::Mutex<Vec<(String, u64)>>,
    }

    impl LearnedSink for Arc<Recorder> {
        fn learned(
            &self,
            source: &str,
            conn: u64,
            full: bool,
            changes: Vec<Change>,
        ) -> Result<usize, String> {
            if changes
                .iter()
                .any(|c| c.ip.to_string().starts_with("203.0.113."))
            {
                return Err("kernel write failed".into());
            }
            let mut calls = self.calls.lock().unwrap();
            calls.push((source.to_string(), conn, full, changes.len()));
            Ok(calls.len())
        }
        fn closed(&self, source: &str, conn: u64) {
            self.closed.lock().unwrap().push((source.to_string(), conn));
        }
    }

    fn msg(seq: u64, full: bool, ips: &[&str]) -> Learned {
        Learned {
            seq,
            full,
            proxy: if full {
                "node/42".into()
            } else {
                String::new()
            },
            changes: ips
                .iter()
                .map(|ip| tollgate_api::v1::FqdnChange {
                    name: "a.test.".into(),
                    ip: (*ip).into(),
                    ttl_seconds: 30,
                    removed: false,
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn every_message_is_applied_before_its_ack_and_the_close_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let rec = Arc::new(Recorder::default());
        let listener = tollgate_api::bind_unix(&sock).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(LearnedServer::new(rec.clone()).service())
                .serve_with_incoming(tollgate_api::incoming(listener)),
        );
        let mut client =
            tollgate_api::v1::fqdn_client::FqdnClient::new(tollgate_api::unix_channel(&sock));
        let (tx, rx) = mpsc::channel(8);
        let mut acks = client
            .learn(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        tx.send(msg(1, true, &[])).await.unwrap();
        let ack = acks.message().await.unwrap().unwrap();
        assert_eq!((ack.seq, ack.error.as_str()), (1, ""));
        assert_eq!(rec.calls.lock().unwrap().len(), 1, "applied before the ack");
        tx.send(msg(2, false, &["192.0.2.1"])).await.unwrap();
        let ack = acks.message().await.unwrap().unwrap();
        assert_eq!((ack.seq, ack.learned_ips), (2, 2));
        // A bad address is named, a failed kernel write is reported: acked, never silent.
        tx.send(msg(3, false, &["not-an-ip", "203.0.113.5"]))
            .await
            .unwrap();
        let ack = acks.message().await.unwrap().unwrap();
        assert_eq!(ack.seq, 3);
        assert!(
            ack.error.contains("`not-an-ip` is not an IP address")
                && ack.error.contains("kernel write failed"),
            "{}",
            ack.error
        );
        drop(tx);
        assert!(acks.message().await.unwrap().is_none());
        for _ in 0..100 {
            if !rec.closed.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let calls = rec.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            vec![
                ("node/42".to_string(), 1, true, 0),
                ("node/42".to_string(), 1, false, 1)
            ]
        );
        assert_eq!(
            *rec.closed.lock().unwrap(),
            vec![("node/42".to_string(), 1)]
        );
    }

    #[test]
    fn sources_add_up_and_an_ip_keeps_its_identity_while_any_names_it() {
        let mut b = LearnedBook::new(100);
        let t0 = Instant::now();
        assert!(b.apply("p1", 1, true, &[add("a.test.", "192.0.2.1", 30)], t0));
        assert!(b.apply("p2", 2, true, &[add("b.test.", "192.0.2.1", 30)], t0));
        assert!(b.apply(LOCAL, 0, false, &[add("c.test.", "192.0.2.2", 30)], t0));
        assert_eq!(
            ips(&b),
            vec![
                (
                    ip("192.0.2.1"),
                    100,
                    vec!["a.test.".into(), "b.test.".into()]
                ),
                (ip("192.0.2.2"), 101, vec!["c.test.".into()]),
            ]
        );
        // p1 forgets: still named by p2, same identity.
        let mut gone = add("a.test.", "192.0.2.1", 0);
        gone.removed = true;
        assert!(b.apply("p1", 1, false, &[gone], t0));
        assert_eq!(ips(&b)[0], (ip("192.0.2.1"), 100, vec!["b.test.".into()]));
        // A repeat changes nothing.
        assert!(!b.apply("p2", 2, false, &[add("b.test.", "192.0.2.1", 30)], t0));
        // p2's new stream sends its whole cache without the IP: gone, and a later one is new.
        assert!(b.apply("p2", 3, true, &[], t0));
        assert_eq!(b.len(), 1);
        assert!(b.apply("p2", 3, false, &[add("b.test.", "192.0.2.1", 30)], t0));
        assert_eq!(ips(&b)[0].1, 102, "identities are not reused");
    }

    #[test]
    fn a_closed_stream_keeps_its_ips_until_their_ttl_and_a_live_one_is_never_expired_here() {
        let mut b = LearnedBook::new(1);
        let t0 = Instant::now();
        b.apply("p1", 1, true, &[add("a.test.", "192.0.2.1", 30)], t0);
        b.apply("p2", 2, true, &[add("b.test.", "192.0.2.2", 10)], t0);
        // Live: the proxy expires (it holds IPs with live connections past their TTL).
        assert!(!b.expire(t0 + Duration::from_secs(60)));
        assert_eq!(b.len(), 2);
        b.closed("p1", 1);
        // A stale close of an older stream does not orphan the newer one.
        b.closed("p2", 1);
        assert!(!b.expire(t0 + Duration::from_secs(29)));
        assert!(b.expire(t0 + Duration::from_secs(31)));
        assert_eq!(ips(&b), vec![(ip("192.0.2.2"), 2, vec!["b.test.".into()])]);
        // The same proxy reconnecting takes its pairs back before they expire.
        b.closed("p2", 2);
        b.apply(
            "p2",
            5,
            true,
            &[add("b.test.", "192.0.2.2", 10)],
            t0 + Duration::from_secs(60),
        );
        assert!(!b.expire(t0 + Duration::from_secs(200)));
        assert_eq!(b.len(), 1);
    }
}
