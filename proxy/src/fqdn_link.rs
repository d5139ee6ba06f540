//! The proxy's side of the agent's `Fqdn` stream (`tollgate proxy --agent SOCK`): the IPs the DNS
//! listeners learn go to the agent, the only writer of kernel maps, and a DNS answer that teaches
//! new IPs is held until the agent says they are in the kernel — so that, as with the in-process
//! proxy of `tollgate up`, the client's first connection to a `toFQDNs` address is allowed.
//!
//! How, and why like this:
//! * the cache queues every change ([`FqdnLink::queue`]) while it holds its write lock, so the
//!   agent sees changes in the order the cache made them, under increasing sequence numbers;
//!   each cache entry remembers the number it was announced under;
//! * an answer whose IPs were all confirmed (an ack of that number or a later one) goes out at
//!   once; one that teaches a new IP — or repeats one still unconfirmed — gets a [`Ticket`] and
//!   is held, in a task of its own (the receive loop never waits), until the ack or
//!   `--fqdn-max-hold-ms` (default 100 ms, Cilium's `--tofqdns-proxy-response-max-delay`);
//! * with no stream open (agent away, or an agent without a datapath) answers go out at once:
//!   DNS keeps working, and the first connection to a new IP is dropped by the datapath (it fails
//!   closed) until the agent has the IP. Each such answer, and each released on timeout, is
//!   counted (`tollgate_proxy_fqdn_answers_total{outcome}`) and logged (at most once a second);
//! * every (re)connection starts with the whole cache (`full`), so a restarted agent rebuilds
//!   the kernel state and nothing queued on a broken stream is lost; a queue that overflows
//!   (the agent stopped reading) is treated as a broken stream and re-sent the same way.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tollgate_api::v1::{FqdnChange, Learned, fqdn_client::FqdnClient};

use crate::fqdn::{FqdnCache, FqdnUpdate};
use crate::metrics::Metrics;

/// Messages waiting for the agent; beyond that the stream is re-sent whole.
const QUEUE: usize = 4096;

/// What the acks said so far.
#[derive(Debug, Clone, Copy, Default)]
struct Status {
    /// Every message up to this one was applied by the agent.
    applied: u64,
    /// The messages of the last ack that reported an error (from, to): the agent could not
    /// write them all to the kernel.
    failed: (u64, u64),
    /// Counts connections: a ticket of an earlier one is not confirmed by a later one's acks
    /// (the later one re-announces everything under its own numbers).
    epoch: u64,
    open: bool,
}

#[derive(Debug, Default)]
struct Queue {
    tx: Option<mpsc::Sender<Learned>>,
    next_seq: u64,
}

/// The proxy's FQDN stream to the agent. Installed on the cache with
/// [`FqdnCache::set_link`]; [`FqdnLink::run`] keeps the stream open.
#[derive(Debug)]
pub struct FqdnLink {
    queue: Mutex<Queue>,
    status: watch::Sender<Status>,
    metrics: Arc<Metrics>,
    proxy: String,
}

/// What the DNS listener does with an answer it just learned from.
#[derive(Debug)]
pub enum Release {
    /// Send it now: nothing new, the kernel has it already, or no agent to wait for.
    Now,
    /// Send it when the ticket resolves.
    Hold(Ticket),
}

/// An answer waiting for the agent's ack of message `seq`.
#[derive(Debug)]
pub struct Ticket {
    seq: u64,
    epoch: u64,
    status: watch::Receiver<Status>,
    metrics: Arc<Metrics>,
}

/// How a held answer was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The agent wrote its IPs to the kernel first.
    Confirmed,
    /// The hold limit passed first.
    TimedOut,
    /// The stream closed first.
    AgentAway,
    /// The agent answered that it could not write them (it logs why, and retries with its
    /// next change).
    AgentError,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Confirmed => "confirmed",
            Outcome::TimedOut => "timeout",
            Outcome::AgentAway => "agent_away",
            Outcome::AgentError => "agent_error",
        }
    }
}

impl Ticket {
    /// Wait for the agent's ack, at most `max`; counts and (for a release without the ack)
    /// logs the outcome. `qname` is the answer's name, for the log.
    pub async fn wait(mut self, max: Duration, qname: &str) -> Outcome {
        let started = Instant::now();
        let (seq, epoch) = (self.seq, self.epoch);
        // Decided on the status that ends the wait.
        let mut outcome = Outcome::TimedOut;
        let _ = tokio::time::timeout(
            max,
            self.status.wait_for(|s| {
                outcome = if s.epoch != epoch || (!s.open && s.applied < seq) {
                    Outcome::AgentAway
                } else if s.applied < seq {
                    return false;
                } else if (s.failed.0..=s.failed.1).contains(&seq) {
                    Outcome::AgentError
                } else {
                    Outcome::Confirmed
                };
                true
            }),
        )
        .await;
        let took = started.elapsed();
        self.metrics.fqdn_answer(outcome.label(), Some(took));
        if outcome != Outcome::Confirmed {
            log_released(qname, outcome, took);
        }
        outcome
    }
}

/// At most one line a second: every release is counted anyway.
fn log_released(qname: &str, outcome: Outcome, took: Duration) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LAST.swap(second, Ordering::Relaxed) == second {
        return;
    }
    eprintln!(
        "tollgate proxy: DNS answer for {qname} released after {:.1} ms without the agent's \
         confirmation ({}): a first connection to its new IPs is dropped until the agent has \
         them (counted in tollgate_proxy_fqdn_answers_total; further ones this second not logged)",
        took.as_secs_f64() * 1000.0,
        match outcome {
            Outcome::TimedOut => "hold limit reached",
            Outcome::AgentError => "the agent failed to write them",
            _ => "FQDN stream to the agent closed",
        }
    );
}

fn to_proto(u: &FqdnUpdate) -> FqdnChange {
    match u {
        FqdnUpdate::Added { name, ip, ttl_secs } => FqdnChange {
            name: name.clone(),
            ip: ip.to_string(),
            ttl_seconds: *ttl_secs,
            removed: false,
        },
        FqdnUpdate::Removed { name, ip } => FqdnChange {
            name: name.clone(),
            ip: ip.to_string(),
            ttl_seconds: 0,
            removed: true,
        },
    }
}

impl FqdnLink {
    pub fn new(metrics: Arc<Metrics>) -> Arc<FqdnLink> {
        Arc::new(FqdnLink {
            queue: Mutex::default(),
            status: watch::channel(Status::default()).0,
            metrics,
            proxy: format!("{}/{}", crate::audit::node_name(), std::process::id()),
        })
    }

    /// Called under the cache's write lock: queue `changes` for the agent. The sequence number
    /// they travel under, or `None` when no stream is open (or the queue overflowed, which
    /// closes the stream: the next one re-sends everything).
    pub(crate) fn queue(&self, changes: &[FqdnUpdate]) -> Option<u64> {
        let Ok(mut q) = self.queue.lock() else {
            return None;
        };
        let tx = q.tx.as_ref()?;
        let seq = q.next_seq + 1;
        let msg = Learned {
            seq,
            full: false,
            proxy: String::new(),
            changes: changes.iter().map(to_proto).collect(),
        };
        if tx.try_send(msg).is_err() {
            self.metrics.event("dns", "fqdn_queue_overflow");
            q.tx = None;
            drop(q);
            self.status.send_modify(|s| s.open = false);
            return None;
        }
        q.next_seq = seq;
        Some(seq)
    }

    /// What becomes of an answer whose IPs were last announced under `need` (0: none of them
    /// unconfirmed); `unsent`: it taught IPs that could not be queued.
    pub(crate) fn release(&self, need: u64, unsent: bool) -> Release {
        let s = *self.status.borrow();
        if unsent || (need > s.applied && !s.open) {
            self.metrics.fqdn_answer(Outcome::AgentAway.label(), None);
            return Release::Now;
        }
        if need <= s.applied {
            return Release::Now;
        }
        Release::Hold(Ticket {
            seq: need,
            epoch: s.epoch,
            status: self.status.subscribe(),
            metrics: self.metrics.clone(),
        })
    }

    /// Called under the cache's write lock with its whole content: open the queue with it as
    /// the first (`full`) message; its sequence number, under which every entry is announced.
    fn attach(&self, tx: mpsc::Sender<Learned>, all: &[FqdnUpdate]) -> u64 {
        let Ok(mut q) = self.queue.lock() else {
            return 0;
        };
        q.next_seq += 1;
        let seq = q.next_seq;
        // A fresh channel has room for its first message.
        let _ = tx.try_send(Learned {
            seq,
            full: true,
            proxy: self.proxy.clone(),
            changes: all.iter().map(to_proto).collect(),
        });
        q.tx = Some(tx);
        drop(q);
        self.status.send_modify(|s| {
            s.epoch += 1;
            s.open = true;
        });
        seq
    }

    fn detach(&self) {
        if let Ok(mut q) = self.queue.lock() {
            q.tx = None;
        }
        self.status.send_modify(|s| s.open = false);
    }

    /// Keep the stream to the agent on `socket` open (reconnecting with backoff) for as long
    /// as `cache` lives.
    pub async fn run(self: Arc<Self>, socket: PathBuf, cache: Weak<FqdnCache>) {
        let mut backoff = crate::rulesets::Backoff::default();
        let mut last_error = String::new();
        while let Some(c) = cache.upgrade() {
            let r = self.session(&socket, &c, &mut backoff).await;
            self.detach();
            drop(c);
            let said = match r {
                Ok(()) => "the agent closed the FQDN stream".to_string(),
                Err(e) if e.code() == tonic::Code::Unimplemented => {
                    "the agent takes no FQDN updates (it has no datapath)".to_string()
                }
                Err(e) => format!("FQDN stream to the agent: {}", e.message()),
            };
            if said != last_error {
                eprintln!(
                    "tollgate proxy: {said}; DNS answers go out without waiting for it \
                     (counted as agent_away); retrying"
                );
                last_error = said;
            }
            tokio::time::sleep(backoff.next()).await;
        }
    }

    /// One stream: open it, send the cache, then the changes; apply the acks.
    async fn session(
        &self,
        socket: &std::path::Path,
        cache: &FqdnCache,
        backoff: &mut crate::rulesets::Backoff,
    ) -> Result<(), tonic::Status> {
        let mut client = FqdnClient::new(tollgate_api::unix_channel(socket));
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut acks = client
            .learn(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut pairs = 0;
        cache.attach(|all| {
            pairs = all.len();
            self.attach(tx, all)
        });
        let epoch = self.status.borrow().epoch;
        *backoff = crate::rulesets::Backoff::default();
        eprintln!(
            "tollgate proxy: FQDN stream to the agent open; {pairs} learned (name, IP) pair(s) sent"
        );
        while let Some(ack) = acks.message().await? {
            if !ack.error.is_empty() {
                self.metrics.event("dns", "fqdn_agent_error");
                eprintln!(
                    "tollgate proxy: the agent could not apply learned IPs (message {}): {}",
                    ack.seq, ack.error
                );
            }
            self.status.send_modify(|s| {
                if s.epoch == epoch && ack.seq > s.applied {
                    if !ack.error.is_empty() {
                        s.failed = (s.applied + 1, ack.seq);
                    }
                    s.applied = ack.seq;
                }
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fqdn::FqdnConfig;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A cache with a link whose stream is "open" on a channel the test reads as the agent.
    fn linked() -> (Arc<FqdnCache>, Arc<FqdnLink>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let cache = Arc::new(FqdnCache::new(FqdnConfig::default()));
        let link = FqdnLink::new(metrics.clone());
        cache.set_link(link.clone());
        (cache, link, metrics)
    }

    fn open(cache: &FqdnCache, link: &FqdnLink) -> mpsc::Receiver<Learned> {
        let (tx, rx) = mpsc::channel(QUEUE);
        cache.attach(|all| link.attach(tx, all));
        rx
    }

    fn ack(link: &FqdnLink, seq: u64) {
        link.status.send_modify(|s| s.applied = s.applied.max(seq));
    }

    fn counted(m: &Metrics, outcome: &str) -> bool {
        m.render_plain().contains(&format!(
            "tollgate_proxy_fqdn_answers_total{{outcome=\"{outcome}\"}} 1"
        ))
    }

    fn hold(r: Release) -> Ticket {
        match r {
            Release::Hold(t) => t,
            Release::Now => panic!("expected the answer to be held"),
        }
    }

    #[tokio::test]
    async fn a_new_ip_is_held_until_the_agent_acks_and_known_ones_go_at_once() {
        let (cache, link, metrics) = linked();
        let mut agent = open(&cache, &link);
        let full = agent.recv().await.unwrap();
        assert!(full.full && full.changes.is_empty() && !full.proxy.is_empty());
        ack(&link, full.seq);

        let t = hold(cache.learn("a.test.", &[ip("192.0.2.1")], 30, Instant::now()));
        let msg = agent.recv().await.unwrap();
        assert_eq!(msg.seq, full.seq + 1);
        assert_eq!(msg.changes.len(), 1);
        assert_eq!(msg.changes[0].ip, "192.0.2.1");
        assert_eq!(msg.changes[0].ttl_seconds, 30);
        assert!(!msg.changes[0].removed);
        // The same IP again before the ack: held as well (its kernel entry may not exist yet).
        let t2 = hold(cache.learn("a.test.", &[ip("192.0.2.1")], 30, Instant::now()));
        let l = link.clone();
        let seq = msg.seq;
        let acker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            ack(&l, seq);
        });
        let started = Instant::now();
        assert_eq!(
            t.wait(Duration::from_secs(5), "a.test.").await,
            Outcome::Confirmed
        );
        assert!(started.elapsed() >= Duration::from_millis(15));
        assert_eq!(
            t2.wait(Duration::from_secs(5), "a.test.").await,
            Outcome::Confirmed
        );
        acker.await.unwrap();
        // Confirmed now: a refresh goes out at once and sends nothing.
        assert!(matches!(
            cache.learn("a.test.", &[ip("192.0.2.1")], 30, Instant::now()),
            Release::Now
        ));
        assert!(agent.try_recv().is_err(), "a refresh is no change");
        let m = metrics.render_plain();
        assert!(
            m.contains("tollgate_proxy_fqdn_answers_total{outcome=\"confirmed\"} 2"),
            "{m}"
        );
        assert!(
            m.contains("tollgate_proxy_fqdn_hold_seconds_count 2"),
            "{m}"
        );
    }

    #[tokio::test]
    async fn an_ack_reporting_an_error_releases_the_answer_counted_as_such() {
        let (cache, link, metrics) = linked();
        let mut agent = open(&cache, &link);
        let full = agent.recv().await.unwrap();
        ack(&link, full.seq);
        let t = hold(cache.learn("e.test.", &[ip("192.0.2.8")], 30, Instant::now()));
        let seq = agent.recv().await.unwrap().seq;
        link.status.send_modify(|s| {
            s.failed = (s.applied + 1, seq);
            s.applied = seq;
        });
        assert_eq!(
            t.wait(Duration::from_secs(5), "e.test.").await,
            Outcome::AgentError
        );
        assert!(
            counted(&metrics, "agent_error"),
            "{}",
            metrics.render_plain()
        );
    }

    #[tokio::test]
    async fn without_an_ack_the_answer_goes_out_at_the_hold_limit_counted() {
        let (cache, link, metrics) = linked();
        let mut agent = open(&cache, &link);
        let _full = agent.recv().await.unwrap();
        let t = hold(cache.learn("slow.test.", &[ip("192.0.2.7")], 30, Instant::now()));
        let started = Instant::now();
        assert_eq!(
            t.wait(Duration::from_millis(50), "slow.test.").await,
            Outcome::TimedOut
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(50) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert!(counted(&metrics, "timeout"), "{}", metrics.render_plain());
    }

    #[tokio::test]
    async fn with_the_agent_away_answers_go_at_once_and_a_reconnect_resends_the_cache() {
        let (cache, link, metrics) = linked();
        // Never connected: released at once, counted.
        assert!(matches!(
            cache.learn("a.test.", &[ip("192.0.2.1")], 30, Instant::now()),
            Release::Now
        ));
        assert!(
            counted(&metrics, "agent_away"),
            "{}",
            metrics.render_plain()
        );

        // Connected: the first message is the whole cache.
        let mut agent = open(&cache, &link);
        let full = agent.recv().await.unwrap();
        assert!(full.full);
        assert_eq!(full.changes.len(), 1);
        assert_eq!(full.changes[0].name, "a.test.");
        // Held, then the stream closes: released as agent_away, not at the hold limit.
        let t = hold(cache.learn("b.test.", &[ip("192.0.2.2")], 30, Instant::now()));
        let l = link.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            l.detach();
        });
        let started = Instant::now();
        assert_eq!(
            t.wait(Duration::from_secs(5), "b.test.").await,
            Outcome::AgentAway
        );
        assert!(started.elapsed() < Duration::from_secs(2));

        // Reconnected: both pairs re-sent; b's unconfirmed announcement is re-made under the
        // new stream's first number, so a repeat of b waits for that one's ack.
        let mut agent = open(&cache, &link);
        let full2 = agent.recv().await.unwrap();
        assert!(full2.full && full2.seq > full.seq);
        assert_eq!(full2.changes.len(), 2);
        let t = hold(cache.learn("b.test.", &[ip("192.0.2.2")], 30, Instant::now()));
        ack(&link, full2.seq);
        assert_eq!(
            t.wait(Duration::from_secs(5), "b.test.").await,
            Outcome::Confirmed
        );
    }

    #[tokio::test]
    async fn expiry_reaches_the_agent_in_order_and_an_overflow_reopens() {
        let (cache, link, metrics) = linked();
        let mut agent = open(&cache, &link);
        let _full = agent.recv().await.unwrap();
        let t0 = Instant::now();
        let _ = cache.learn("e.test.", &[ip("192.0.2.3")], 1, t0);
        assert_eq!(cache.expire(t0 + Duration::from_secs(2)), 1);
        let added = agent.recv().await.unwrap();
        let removed = agent.recv().await.unwrap();
        assert!(!added.changes[0].removed && removed.changes[0].removed);
        assert!(removed.seq > added.seq);

        // Nobody reads: past the queue's size the stream is closed (and counted), so the next
        // connection re-sends the whole cache instead of losing changes.
        for i in 0..=QUEUE {
            let a = IpAddr::from([198, 51, (i / 256) as u8, (i % 256) as u8]);
            let _ = cache.learn(&format!("n{i}.test."), &[a], 60, t0);
        }
        assert!(!link.status.borrow().open);
        assert!(
            metrics
                .render_plain()
                .contains("event=\"fqdn_queue_overflow\""),
            "{}",
            metrics.render_plain()
        );
    }
}
