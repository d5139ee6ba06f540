//! The FQDN cache: which IPs a name resolved to, learned from allowed DNS answers, so that
//! `toFQDNs` peers can be matched (cnp-semantics §9.3).
//!
//! Why it is shaped like this:
//! * an answer is learned **before** it is released to the client (the DNS listener calls
//!   [`FqdnCache::learn`] and only then sends), so the client's first connection to the new IP
//!   already matches;
//! * the TTL is the answer's lowest along the CNAME chain, raised to `min_ttl` (default 0: the
//!   DNS TTL is honoured, as in Cilium ≥ 1.13);
//! * a name keeps at most `max_ips_per_name` IPs (default 1,000, Cilium's); over the cap the
//!   longest-unrefreshed IPs go first;
//! * TTL expiry must not cut a live connection (users' most common toFQDNs complaint): the
//!   proxy holds an IP while it has a connection to it ([`FqdnCache::hold`]), and an expired IP
//!   stays until its last connection closes plus `grace`;
//! * every change goes to the agent, which turns it into identities, ipcache and policy
//!   entries: synchronously for the in-process agent of `tollgate up`
//!   ([`FqdnCache::set_observer`]), over the `Fqdn` stream for a separate proxy
//!   ([`FqdnCache::set_link`], `fqdn_link.rs`: the answer is then held until the agent
//!   confirms, bounded); and on a broadcast stream
//!   ([`FqdnCache::subscribe`]) whose subscriber is told, never silently, how many it missed
//!   when it lags (tokio's `Lagged`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::fqdn_link::FqdnLink;
pub use crate::fqdn_link::Release;

#[derive(Debug, Clone, Copy)]
pub struct FqdnConfig {
    pub min_ttl: Duration,
    pub max_ips_per_name: usize,
    /// How long an expired IP outlives its last connection.
    pub grace: Duration,
}

impl Default for FqdnConfig {
    fn default() -> Self {
        FqdnConfig {
            min_ttl: Duration::ZERO,
            max_ips_per_name: 1000,
            grace: Duration::ZERO,
        }
    }
}

/// One change of the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum FqdnUpdate {
    Added {
        name: String,
        ip: IpAddr,
        ttl_secs: u64,
    },
    Removed {
        name: String,
        ip: IpAddr,
    },
}

/// One (name, IP) pair as `tollgate fqdn list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FqdnEntry {
    pub name: String,
    pub ip: IpAddr,
    /// Seconds left of the TTL; 0 once expired (then it is kept for live connections).
    pub ttl_remaining_secs: u64,
    pub expired: bool,
    pub live_connections: usize,
}

#[derive(Debug, Clone)]
struct Learned {
    ip: IpAddr,
    expires: Instant,
    refreshed: Instant,
    /// The number of the message to the agent that announced it (0: none; see `fqdn_link.rs`).
    announced: u64,
}

#[derive(Debug, Default)]
struct Inner {
    by_name: HashMap<String, Vec<Learned>>,
    by_ip: HashMap<IpAddr, Vec<String>>,
    /// Live connections per IP, and when the last one closed.
    live: HashMap<IpAddr, usize>,
    last_closed: HashMap<IpAddr, Instant>,
}

impl Inner {
    fn unlink(&mut self, name: &str, ip: IpAddr) {
        if let Some(names) = self.by_ip.get_mut(&ip) {
            names.retain(|n| n != name);
            if names.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
    }
}

/// Called with every batch of changes, synchronously, before [`FqdnCache::learn`] returns —
/// so before the DNS answer is released. `tollgate up` writes the kernel ipcache and policy
/// entries here, so that the client's first connection to a new IP is already allowed.
pub type FqdnObserver = Arc<dyn Fn(&[FqdnUpdate]) + Send + Sync>;

pub struct FqdnCache {
    cfg: FqdnConfig,
    inner: RwLock<Inner>,
    updates: broadcast::Sender<FqdnUpdate>,
    observer: RwLock<Option<FqdnObserver>>,
    link: std::sync::OnceLock<Arc<FqdnLink>>,
}

impl std::fmt::Debug for FqdnCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FqdnCache")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Keeps an IP in the cache while a connection to it lives; released on drop.
#[derive(Debug)]
pub struct FqdnHold {
    cache: Arc<FqdnCache>,
    ip: IpAddr,
}

impl Drop for FqdnHold {
    fn drop(&mut self) {
        if let Ok(mut g) = self.cache.inner.write()
            && let Some(n) = g.live.get_mut(&self.ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.live.remove(&self.ip);
                g.last_closed.insert(self.ip, Instant::now());
            }
        }
    }
}

impl FqdnCache {
    pub fn new(cfg: FqdnConfig) -> FqdnCache {
        let (updates, _) = broadcast::channel(4096);
        FqdnCache {
            cfg,
            inner: RwLock::new(Inner::default()),
            updates,
            observer: RwLock::new(None),
            link: std::sync::OnceLock::new(),
        }
    }

    /// Install the synchronous observer (see [`FqdnObserver`]).
    pub fn set_observer(&self, f: FqdnObserver) {
        if let Ok(mut o) = self.observer.write() {
            *o = Some(f);
        }
    }

    /// Send every change to the agent over `link` (a separate proxy), and hold answers that
    /// teach new IPs until it confirms them (see [`Release`]). Set once.
    pub fn set_link(&self, link: Arc<FqdnLink>) {
        let _ = self.link.set(link);
    }

    /// Under the write lock (so that nothing changes between the two): `f` gets every (name,
    /// IP) pair as an `Added` change with the TTL left and returns the number of the message
    /// that carries them, under which every entry is then announced.
    pub(crate) fn attach(&self, f: impl FnOnce(&[FqdnUpdate]) -> u64) {
        let Ok(mut g) = self.inner.write() else {
            return;
        };
        let now = Instant::now();
        let all: Vec<FqdnUpdate> = g
            .by_name
            .iter()
            .flat_map(|(name, entries)| {
                entries.iter().map(move |e| FqdnUpdate::Added {
                    name: name.clone(),
                    ip: e.ip,
                    ttl_secs: e.expires.saturating_duration_since(now).as_secs(),
                })
            })
            .collect();
        let seq = f(&all);
        for e in g.by_name.values_mut().flatten() {
            e.announced = seq;
        }
    }

    fn notify(&self, changes: Vec<FqdnUpdate>) {
        if changes.is_empty() {
            return;
        }
        let observer = self.observer.read().ok().and_then(|o| o.clone());
        if let Some(f) = observer {
            f(&changes);
        }
        for u in changes {
            self.publish(u);
        }
    }

    pub fn config(&self) -> FqdnConfig {
        self.cfg
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<FqdnUpdate> {
        self.updates.subscribe()
    }

    fn publish(&self, u: FqdnUpdate) {
        // No subscriber is fine: the cache itself is the source of truth.
        let _ = self.updates.send(u);
    }

    /// Record that `name` resolved to `ips` with `ttl` seconds (already the chain's minimum);
    /// when the answer may be released.
    pub fn learn(&self, name: &str, ips: &[IpAddr], ttl: u32, now: Instant) -> Release {
        let ttl = Duration::from_secs(u64::from(ttl)).max(self.cfg.min_ttl);
        let expires = now + ttl;
        let mut added = Vec::new();
        let mut removed = Vec::new();
        let mut changes = Vec::new();
        let release = {
            let Ok(mut g) = self.inner.write() else {
                return Release::Now;
            };
            // The latest announcement among the answer's IPs the agent may not have yet.
            let mut need = 0;
            // A name already known (the common case: every answer renews it) costs no copy.
            if !g.by_name.contains_key(name) {
                g.by_name.insert(name.to_string(), Vec::new());
            }
            let Some(entries) = g.by_name.get_mut(name) else {
                return Release::Now;
            };
            for &ip in ips {
                match entries.iter_mut().find(|e| e.ip == ip) {
                    Some(e) => {
                        e.expires = e.expires.max(expires);
                        e.refreshed = now;
                        need = need.max(e.announced);
                    }
                    None => {
                        entries.push(Learned {
                            ip,
                            expires,
                            refreshed: now,
                            announced: 0,
                        });
                        added.push(ip);
                    }
                }
            }
            if entries.len() > self.cfg.max_ips_per_name {
                entries.sort_by_key(|e| std::cmp::Reverse(e.refreshed));
                removed = entries
                    .split_off(self.cfg.max_ips_per_name)
                    .into_iter()
                    .map(|e| e.ip)
                    .collect();
            }
            for &ip in &added {
                if !removed.contains(&ip) {
                    g.by_ip.entry(ip).or_default().push(name.to_string());
                }
            }
            for &ip in &removed {
                g.unlink(name, ip);
            }
            for ip in added.iter().filter(|ip| !removed.contains(ip)) {
                changes.push(FqdnUpdate::Added {
                    name: name.to_string(),
                    ip: *ip,
                    ttl_secs: ttl.as_secs(),
                });
            }
            for ip in removed.iter().filter(|ip| !added.contains(ip)) {
                changes.push(FqdnUpdate::Removed {
                    name: name.to_string(),
                    ip: *ip,
                });
            }
            match self.link.get() {
                None => Release::Now,
                Some(link) => {
                    // Queued under the lock: the agent sees changes in the order made here.
                    let seq = (!changes.is_empty()).then(|| link.queue(&changes));
                    if let Some(Some(seq)) = seq
                        && let Some(entries) = g.by_name.get_mut(name)
                    {
                        for e in entries.iter_mut().filter(|e| added.contains(&e.ip)) {
                            e.announced = seq;
                            need = need.max(seq);
                        }
                    }
                    let taught = changes
                        .iter()
                        .any(|c| matches!(c, FqdnUpdate::Added { .. }));
                    link.release(need, taught && seq == Some(None))
                }
            }
        };
        self.notify(changes);
        release
    }

    /// The names `ip` was learned under (expired ones still held by connections included).
    pub fn names_of(&self, ip: IpAddr) -> Vec<String> {
        self.inner
            .read()
            .ok()
            .and_then(|g| g.by_ip.get(&ip).cloned())
            .unwrap_or_default()
    }

    /// Hold `ip` for the lifetime of a connection.
    pub fn hold(self: &Arc<Self>, ip: IpAddr) -> FqdnHold {
        if let Ok(mut g) = self.inner.write() {
            *g.live.entry(ip).or_default() += 1;
        }
        FqdnHold {
            cache: self.clone(),
            ip,
        }
    }

    /// Drop what has expired, is not held by a live connection and is past its grace period.
    /// Returns how many (name, IP) pairs went.
    pub fn expire(&self, now: Instant) -> usize {
        let mut gone = Vec::new();
        let changes = {
            let Ok(mut g) = self.inner.write() else {
                return 0;
            };
            let Inner {
                by_name,
                live,
                last_closed,
                ..
            } = &mut *g;
            let grace = self.cfg.grace;
            by_name.retain(|name, entries| {
                entries.retain(|e| {
                    let keep = e.expires > now
                        || live.get(&e.ip).is_some_and(|n| *n > 0)
                        || last_closed.get(&e.ip).is_some_and(|t| *t + grace > now);
                    if !keep {
                        gone.push((name.clone(), e.ip));
                    }
                    keep
                });
                !entries.is_empty()
            });
            for (name, ip) in &gone {
                g.unlink(name, *ip);
            }
            let g = &mut *g;
            g.last_closed
                .retain(|ip, t| *t + grace > now || g.by_ip.contains_key(ip));
            let changes: Vec<FqdnUpdate> = gone
                .iter()
                .map(|(name, ip)| FqdnUpdate::Removed {
                    name: name.clone(),
                    ip: *ip,
                })
                .collect();
            if let Some(link) = self.link.get()
                && !changes.is_empty()
            {
                let _ = link.queue(&changes);
            }
            changes
        };
        let n = gone.len();
        self.notify(changes);
        n
    }

    /// Every (name, IP) pair, sorted by name then IP.
    pub fn list(&self, now: Instant) -> Vec<FqdnEntry> {
        let Ok(g) = self.inner.read() else {
            return Vec::new();
        };
        let mut out: Vec<FqdnEntry> = g
            .by_name
            .iter()
            .flat_map(|(name, entries)| {
                let live = &g.live;
                entries.iter().map(move |e| FqdnEntry {
                    name: name.clone(),
                    ip: e.ip,
                    ttl_remaining_secs: e.expires.saturating_duration_since(now).as_secs(),
                    expired: e.expires <= now,
                    live_connections: live.get(&e.ip).copied().unwrap_or(0),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.ip.cmp(&b.ip)));
        out
    }

    /// Run [`FqdnCache::expire`] every second until the process stops.
    pub async fn run_expiry(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            self.expire(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn learned_ips_are_found_by_ip_and_expire_with_their_ttl() {
        let c = FqdnCache::new(FqdnConfig::default());
        let t0 = Instant::now();
        c.learn(
            "api.example.com.",
            &[ip("192.0.2.1"), ip("2001:db8::1")],
            30,
            t0,
        );
        assert_eq!(c.names_of(ip("192.0.2.1")), vec!["api.example.com."]);
        assert_eq!(c.list(t0).len(), 2);
        assert_eq!(c.expire(t0 + Duration::from_secs(29)), 0);
        assert_eq!(c.expire(t0 + Duration::from_secs(31)), 2);
        assert!(c.names_of(ip("192.0.2.1")).is_empty());
        assert!(c.list(t0).is_empty());
    }

    #[test]
    fn min_ttl_raises_short_ttls_and_refresh_extends() {
        let c = FqdnCache::new(FqdnConfig {
            min_ttl: Duration::from_secs(60),
            ..FqdnConfig::default()
        });
        let t0 = Instant::now();
        c.learn("a.test.", &[ip("192.0.2.1")], 1, t0);
        assert_eq!(c.expire(t0 + Duration::from_secs(59)), 0);
        c.learn(
            "a.test.",
            &[ip("192.0.2.1")],
            1,
            t0 + Duration::from_secs(50),
        );
        assert_eq!(c.expire(t0 + Duration::from_secs(100)), 0);
        assert_eq!(c.expire(t0 + Duration::from_secs(111)), 1);
    }

    #[test]
    fn over_the_cap_the_least_recently_refreshed_ips_go() {
        let c = FqdnCache::new(FqdnConfig {
            max_ips_per_name: 2,
            ..FqdnConfig::default()
        });
        let mut rx = c.subscribe();
        let t0 = Instant::now();
        c.learn("n.test.", &[ip("192.0.2.1")], 300, t0);
        c.learn(
            "n.test.",
            &[ip("192.0.2.2")],
            300,
            t0 + Duration::from_secs(1),
        );
        c.learn(
            "n.test.",
            &[ip("192.0.2.3")],
            300,
            t0 + Duration::from_secs(2),
        );
        let ips: Vec<IpAddr> = c.list(t0).into_iter().map(|e| e.ip).collect();
        assert_eq!(ips, vec![ip("192.0.2.2"), ip("192.0.2.3")]);
        assert!(c.names_of(ip("192.0.2.1")).is_empty());
        let mut seen = Vec::new();
        while let Ok(u) = rx.try_recv() {
            seen.push(u);
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert_eq!(
            seen[3],
            FqdnUpdate::Removed {
                name: "n.test.".into(),
                ip: ip("192.0.2.1")
            }
        );
    }

    #[test]
    fn a_live_connection_keeps_an_expired_ip_until_it_closes_plus_grace() {
        let c = Arc::new(FqdnCache::new(FqdnConfig {
            grace: Duration::from_secs(5),
            ..FqdnConfig::default()
        }));
        let t0 = Instant::now();
        c.learn("db.test.", &[ip("192.0.2.9")], 1, t0);
        let hold = c.hold(ip("192.0.2.9"));
        assert_eq!(c.expire(t0 + Duration::from_secs(10)), 0);
        let l = c.list(t0 + Duration::from_secs(10));
        assert!(l[0].expired);
        assert_eq!(l[0].live_connections, 1);
        drop(hold);
        let closed = Instant::now();
        assert_eq!(c.expire(closed + Duration::from_secs(4)), 0);
        assert_eq!(c.expire(closed + Duration::from_secs(6)), 1);
    }

    #[test]
    fn names_sharing_an_ip_are_all_reported() {
        let c = FqdnCache::new(FqdnConfig::default());
        let t0 = Instant::now();
        c.learn("a.test.", &[ip("192.0.2.5")], 10, t0);
        c.learn("b.test.", &[ip("192.0.2.5")], 100, t0);
        let mut names = c.names_of(ip("192.0.2.5"));
        names.sort();
        assert_eq!(names, vec!["a.test.", "b.test."]);
        c.expire(t0 + Duration::from_secs(50));
        assert_eq!(c.names_of(ip("192.0.2.5")), vec!["b.test."]);
    }
}
