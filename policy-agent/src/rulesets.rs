//! The agent's side of the rule-set stream (`tollgate_api::v1::RuleSets`): every proxy that
//! connects gets the complete set of rule sets in force at once (so a restarted proxy
//! re-syncs), then every new version; each ACK/NACK it sends back is kept per proxy and
//! reported. See `proxy/src/rulesets.rs` for what the proxy does with them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tollgate_api::v1::{Ack, Kind, ProxyMessage, RuleSet, Update, proxy_message, rule_sets_server};

/// What one connected (or once connected) proxy last told us.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProxyStatus {
    /// `host/pid` from its Hello.
    pub proxy: String,
    /// The last Ack (None until the first one arrives).
    pub ack: Option<Ack>,
    pub connected: bool,
}

type AckHook = Arc<dyn Fn(&str, &Ack) + Send + Sync>;

/// Publishes versions of the rule sets; serves them to proxies.
#[derive(Clone)]
pub struct RuleSetServer {
    current: watch::Sender<Arc<Update>>,
    proxies: Arc<Mutex<BTreeMap<u64, ProxyStatus>>>,
    next_conn: Arc<std::sync::atomic::AtomicU64>,
    on_ack: Option<AckHook>,
}

impl std::fmt::Debug for RuleSetServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSetServer")
            .field("version", &self.current.borrow().version)
            .finish_non_exhaustive()
    }
}

/// Rule sets from policy sources: one per policy file (or object) and the inventory.
pub fn rule_sets<'a>(
    policies: impl IntoIterator<Item = (&'a str, &'a str)>,
    inventory: (&str, &str),
) -> Vec<RuleSet> {
    let one = |name: &str, kind: Kind, content: &str| RuleSet {
        name: name.to_string(),
        kind: kind as i32,
        generation: tollgate_api::generation_of(content),
        content: content.to_string(),
    };
    let mut out = vec![one(inventory.0, Kind::Inventory, inventory.1)];
    out.extend(policies.into_iter().map(|(n, c)| one(n, Kind::Policy, c)));
    out
}

impl RuleSetServer {
    /// A server whose version 1 is `rule_sets`.
    pub fn new(rule_sets: Vec<RuleSet>) -> RuleSetServer {
        RuleSetServer {
            current: watch::channel(Arc::new(Update {
                version: 1,
                rule_sets,
            }))
            .0,
            proxies: Arc::default(),
            next_conn: Arc::default(),
            on_ack: None,
        }
    }

    /// Call `hook(proxy, ack)` for every Ack a proxy sends (e.g. to log NACKs).
    pub fn on_ack(mut self, hook: impl Fn(&str, &Ack) + Send + Sync + 'static) -> RuleSetServer {
        self.on_ack = Some(Arc::new(hook));
        self
    }

    /// Put a new version in force and send it to every connected proxy; returns its number.
    /// An unchanged set is not a new version.
    pub fn publish(&self, rule_sets: Vec<RuleSet>) -> u64 {
        let mut version = 0;
        self.current.send_if_modified(|u| {
            let same = u.rule_sets.len() == rule_sets.len()
                && u.rule_sets.iter().zip(&rule_sets).all(|(a, b)| {
                    a.name == b.name && a.generation == b.generation && a.kind == b.kind
                });
            version = if same { u.version } else { u.version + 1 };
            if !same {
                *u = Arc::new(Update { version, rule_sets });
            }
            !same
        });
        version
    }

    /// The version in force.
    pub fn version(&self) -> u64 {
        self.current.borrow().version
    }

    /// Every proxy that has connected, with its last Ack.
    pub fn proxies(&self) -> Vec<ProxyStatus> {
        self.proxies
            .lock()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Serve on the Unix socket `path` until the process ends.
    pub async fn serve_unix(self, path: PathBuf) -> Result<()> {
        self.serve_unix_with(path, None).await
    }

    /// [`RuleSetServer::serve_unix`], and with `learned` the `Fqdn` stream on the same socket
    /// (an agent that writes the kernel; without it proxies are answered UNIMPLEMENTED).
    pub async fn serve_unix_with(
        self,
        path: PathBuf,
        learned: Option<crate::learned::LearnedServer>,
    ) -> Result<()> {
        let listener = tollgate_api::bind_unix(&path)?;
        tonic::transport::Server::builder()
            .add_service(rule_sets_server::RuleSetsServer::new(self))
            .add_optional_service(learned.map(crate::learned::LearnedServer::service))
            .serve_with_incoming(tollgate_api::incoming(listener))
            .await
            .context("rule-set server")
    }

    fn set(&self, conn: u64, f: impl FnOnce(&mut ProxyStatus)) {
        if let Ok(mut p) = self.proxies.lock() {
            f(p.entry(conn).or_default());
        }
    }
}

type Updates = Pin<Box<dyn tokio_stream::Stream<Item = Result<Update, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl rule_sets_server::RuleSets for RuleSetServer {
    type SyncStream = Updates;

    async fn sync(
        &self,
        request: tonic::Request<tonic::Streaming<ProxyMessage>>,
    ) -> Result<tonic::Response<Updates>, tonic::Status> {
        let mut incoming = request.into_inner();
        let conn = self
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel::<Result<Update, tonic::Status>>(4);
        let mut versions = self.current.subscribe();
        // Sender: the version in force now, then each new one (a proxy that is slow to read
        // skips straight to the newest: every update is complete).
        tokio::spawn(async move {
            loop {
                let update = versions.borrow_and_update().as_ref().clone();
                if tx.send(Ok(update)).await.is_err() || versions.changed().await.is_err() {
                    return;
                }
            }
        });
        // Receiver: Hello, then Acks.
        let server = self.clone();
        tokio::spawn(async move {
            server.set(conn, |s| s.connected = true);
            while let Ok(Some(m)) = incoming.message().await {
                match m.msg {
                    Some(proxy_message::Msg::Hello(h)) => server.set(conn, |s| s.proxy = h.proxy),
                    Some(proxy_message::Msg::Ack(a)) => {
                        let mut name = String::new();
                        server.set(conn, |s| {
                            name = s.proxy.clone();
                            s.ack = Some(a.clone());
                        });
                        if let Some(hook) = &server.on_ack {
                            hook(&name, &a);
                        }
                    }
                    None => {}
                }
            }
            server.set(conn, |s| s.connected = false);
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// A one-line summary of `ack` and the problems of every rejected rule set, for logs.
pub fn describe(proxy: &str, ack: &Ack) -> Vec<String> {
    let rejected: Vec<_> = ack.results.iter().filter(|r| !r.accepted).collect();
    let mut out = vec![format!(
        "proxy {proxy}: version {} in force as revision {}: {} rule set(s) accepted, {} rejected",
        ack.version,
        ack.revision,
        ack.results.len() - rejected.len(),
        rejected.len()
    )];
    for r in rejected {
        out.push(format!(
            "  rejected {} ({}): {}",
            r.name,
            if r.in_force_generation == 0 {
                "nothing of it in force".to_string()
            } else {
                "its previous version stays in force".to_string()
            },
            r.diagnostics.join("; ")
        ));
    }
    out
}
