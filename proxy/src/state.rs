//! The policy the proxy enforces: the evaluator, the endpoints inventory, and a cache of
//! [`PortPolicy`]s so that gathering the rules of an (endpoint, direction, port) happens once,
//! not per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tollgate_policy::endpoints::{Endpoint, Inventory};
use tollgate_policy::eval::{Evaluator, Local, PortPolicy};
use tollgate_policy::load::{Diagnostic, PolicySet};
use tollgate_policy::model::{Direction, Protocol};
use tollgate_policy::peer::Remote;

use crate::audit::Peer;
use crate::fqdn::{FqdnCache, FqdnConfig};

type CacheKey = (usize, Direction, u16, Protocol);

/// The policy in force, swappable while the proxy runs: connections and queries take the
/// current [`PolicyState`] when they start and keep it, so none sees half a policy, and a new
/// version applies to everything that starts after [`PolicyHandle::store`].
#[derive(Debug, Clone)]
pub struct PolicyHandle(Arc<std::sync::RwLock<Arc<PolicyState>>>);

impl PolicyHandle {
    pub fn new(state: Arc<PolicyState>) -> PolicyHandle {
        PolicyHandle(Arc::new(std::sync::RwLock::new(state)))
    }

    /// The current policy.
    pub fn load(&self) -> Arc<PolicyState> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Put `state` in force (its FQDN cache should be the previous one's: see
    /// [`PolicyState::with_fqdn`]).
    pub fn store(&self, state: Arc<PolicyState>) {
        match self.0.write() {
            Ok(mut g) => *g = state,
            Err(poisoned) => *poisoned.into_inner() = state,
        }
    }
}

impl From<Arc<PolicyState>> for PolicyHandle {
    fn from(state: Arc<PolicyState>) -> PolicyHandle {
        PolicyHandle::new(state)
    }
}

#[derive(Debug)]
pub struct PolicyState {
    pub evaluator: Evaluator,
    pub inventory: Inventory,
    pub diagnostics: Vec<Diagnostic>,
    /// Bumped on every load; written into audit records.
    pub revision: u64,
    /// Names learned from DNS answers, consulted for `toFQDNs` peers. Outlives a policy
    /// reload: hand it to the next state with [`PolicyState::with_fqdn`].
    pub fqdn: Arc<FqdnCache>,
    cache: Mutex<HashMap<CacheKey, Arc<PortPolicy>>>,
}

fn yaml_files(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| p.display().to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            if e.is_dir() || matches!(e.extension().and_then(|x| x.to_str()), Some("yaml" | "yml"))
            {
                yaml_files(&e, out)?;
            }
        }
    } else {
        out.push(p.to_path_buf());
    }
    Ok(())
}

/// Whether `d` drops more than one ingress/egress item (a file that does not parse, a policy or
/// rule rejected whole): such a problem could drop the deny rules that keep something closed, so
/// reloads and rule-set updates refuse it rather than apply the rest.
pub fn loses_more_than_an_item(d: &Diagnostic) -> bool {
    !["gress[", "gressDeny["].iter().any(|k| d.path.contains(k))
}

/// The text of every policy file and of the inventory, read once: what a policy state is
/// built from, and what the agent streams to a proxy as rule sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// (file name, YAML) in load order.
    pub policies: Vec<(String, String)>,
    /// (file name, YAML) of the endpoints inventory.
    pub inventory: (String, String),
}

impl Sources {
    /// Read `policies` (files, or directories of `*.yaml`/`*.yml`, recursively, sorted) and
    /// `endpoints`.
    pub fn read(policies: &[PathBuf], endpoints: &Path) -> Result<Sources> {
        let mut files = Vec::new();
        for p in policies {
            yaml_files(p, &mut files)?;
        }
        let mut out = Sources::default();
        for f in files {
            let src = std::fs::read_to_string(&f).with_context(|| f.display().to_string())?;
            out.policies.push((f.display().to_string(), src));
        }
        let src =
            std::fs::read_to_string(endpoints).with_context(|| endpoints.display().to_string())?;
        out.inventory = (endpoints.display().to_string(), src);
        Ok(out)
    }
}

/// A listener destination `NAME` or `NAME:PORT`: the name and the port rules name
/// (`default` when none is given).
pub fn split_destination(dest: &str, default: u16) -> Result<(&str, u16)> {
    match dest.rsplit_once(':') {
        Some((n, p)) => Ok((
            n,
            p.parse()
                .with_context(|| format!("`{dest}`: `{p}` is not a port"))?,
        )),
        None => Ok((dest, default)),
    }
}

/// Size and modification time of every policy and inventory file, to notice changes.
pub type Fingerprint = Vec<(PathBuf, u64, Option<std::time::SystemTime>)>;

/// The [`Fingerprint`] of `policies` (files or directories) and `endpoints`.
pub fn fingerprint(policies: &[PathBuf], endpoints: &Path) -> Fingerprint {
    fn walk(p: &Path, out: &mut Fingerprint) {
        if p.is_dir() {
            if let Ok(rd) = std::fs::read_dir(p) {
                let mut entries: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
                entries.sort();
                for e in entries {
                    walk(&e, out);
                }
            }
        } else if let Ok(m) = std::fs::metadata(p) {
            out.push((p.to_path_buf(), m.len(), m.modified().ok()));
        }
    }
    let mut out = Vec::new();
    for p in policies.iter().map(PathBuf::as_path).chain([endpoints]) {
        walk(p, &mut out);
    }
    out
}

impl PolicyState {
    /// [`PolicyState::load`] for a *reload*: a problem confined to one ingress/egress item is
    /// applied as the policy model says (a bad allow item is left out, a bad deny item denies
    /// everything for its endpoints), but a problem that loses more — a file that does not
    /// parse, a policy or rule rejected whole — fails the load, because the rules lost could be
    /// the deny rules that keep something closed. The caller keeps what is in force.
    pub fn load_strict(policies: &[PathBuf], endpoints: &Path) -> Result<PolicyState> {
        PolicyState::load(policies, endpoints)?.strict()
    }

    /// `self`, or an error listing its problems that lose more than one item (see
    /// [`PolicyState::load_strict`]).
    pub fn strict(self) -> Result<PolicyState> {
        let blocking: Vec<String> = self
            .diagnostics
            .iter()
            .filter(|d| loses_more_than_an_item(d))
            .map(|d| d.to_string())
            .collect();
        if !blocking.is_empty() {
            anyhow::bail!(
                "{} problem(s) that would drop whole files or rules:\n  {}",
                blocking.len(),
                blocking.join("\n  ")
            );
        }
        Ok(self)
    }

    pub fn load(policies: &[PathBuf], endpoints: &Path) -> Result<PolicyState> {
        PolicyState::from_sources(&Sources::read(policies, endpoints)?)
    }

    /// The policy of `sources` (revision 1).
    pub fn from_sources(sources: &Sources) -> Result<PolicyState> {
        let mut set = PolicySet::default();
        for (name, src) in &sources.policies {
            set.load_str(name, src);
        }
        let (name, src) = &sources.inventory;
        let inventory = Inventory::from_yaml(src).with_context(|| name.clone())?;
        Ok(PolicyState::new(set, inventory, 1))
    }

    pub fn new(set: PolicySet, inventory: Inventory, revision: u64) -> PolicyState {
        PolicyState {
            evaluator: Evaluator::new(set.rules),
            inventory,
            diagnostics: set.diagnostics,
            revision,
            fqdn: Arc::new(FqdnCache::new(FqdnConfig::default())),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Use `cache` (shared with the DNS listeners, kept across reloads) for `toFQDNs`.
    pub fn with_fqdn(mut self, cache: Arc<FqdnCache>) -> PolicyState {
        self.fqdn = cache;
        self
    }

    pub fn endpoint_index(&self, name: &str) -> Option<usize> {
        self.inventory
            .endpoints
            .iter()
            .position(|e| e.spec.name == name)
    }

    pub fn endpoint(&self, idx: usize) -> &Endpoint {
        &self.inventory.endpoints[idx]
    }

    /// The managed endpoint owning `ip`, if any.
    pub fn endpoint_by_ip(&self, ip: IpAddr) -> Option<usize> {
        let ep = self.inventory.by_ip(ip)?;
        self.endpoint_index(&ep.spec.name)
    }

    /// The remote view of a peer: a managed endpoint, or the world with its IP and the names
    /// DNS answers gave it.
    pub fn remote(&self, ip: IpAddr) -> Remote {
        match self.inventory.by_ip(ip) {
            Some(ep) => Remote::endpoint(ep),
            None => Remote::world(Some(ip), self.fqdn.names_of(ip)),
        }
    }

    /// How a peer appears in audit records.
    pub fn audit_peer(&self, remote: &Remote, ip: IpAddr, port: u16) -> Peer {
        let ep = self.inventory.by_ip(ip);
        Peer {
            ip: ip.to_string(),
            port,
            identity: remote.identity,
            namespace: ep.map(|e| e.spec.namespace.clone()),
            name: ep.map(|e| e.spec.name.clone()),
            labels: remote.labels.iter().map(|l| l.to_string()).collect(),
        }
    }

    /// Build, ahead of use, the port policies `previous` had built (same endpoint by name,
    /// direction, port, protocol), so the first queries after a swap find them cached instead
    /// of gathering rules on the request path. How many were built.
    pub fn warm_like(&self, previous: &PolicyState) -> usize {
        let keys: Vec<CacheKey> = match previous.cache.lock() {
            Ok(c) => c.keys().copied().collect(),
            Err(_) => return 0,
        };
        let mut n = 0;
        for (idx, direction, port, protocol) in keys {
            let Some(name) = previous.inventory.endpoints.get(idx).map(|e| &e.spec.name) else {
                continue;
            };
            if let Some(i) = self.endpoint_index(name) {
                self.port_policy_for(i, direction, port, protocol);
                n += 1;
            }
        }
        n
    }

    /// The (cached) TCP port policy of endpoint `idx`.
    pub fn port_policy(&self, idx: usize, direction: Direction, port: u16) -> Arc<PortPolicy> {
        self.port_policy_for(idx, direction, port, Protocol::Tcp)
    }

    /// The (cached) port policy of endpoint `idx` for `protocol`.
    pub fn port_policy_for(
        &self,
        idx: usize,
        direction: Direction,
        port: u16,
        protocol: Protocol,
    ) -> Arc<PortPolicy> {
        let key = (idx, direction, port, protocol);
        if let Some(pp) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return pp;
        }
        let ep = self.endpoint(idx);
        let named: Vec<(String, u16)> =
            ep.spec.ports.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let local = Local {
            labels: &ep.labels,
            is_host: false,
            named_ports: &named,
        };
        let pp = Arc::new(
            self.evaluator
                .port_policy(&local, direction, port, protocol),
        );
        if let Ok(mut c) = self.cache.lock() {
            c.insert(key, pp.clone());
        }
        pp
    }
}
