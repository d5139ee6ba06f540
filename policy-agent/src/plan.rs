//! Compiling policy into the kernel datapath's maps: endpoints, ipcache and policy entries.
//!
//! Why the evaluator is the oracle: the kernel must enforce exactly what `tollgate eval` and the
//! proxy decide. Instead of a second interpretation of the rule model, the compiler asks the
//! evaluator — for every local endpoint, direction, port mentioned by a rule that selects it
//! (plus one representative of every other port), and every remote identity the node knows
//! (managed endpoints, host, world, one identity per CIDR of the rules) — and writes the answer
//! as map entries. What the evaluator allows on a port with L7 rules becomes a redirect to the
//! proxy (DNS rules to the DNS listener), so the proxy judges each request with the same policy.
//!
//! Only entries that differ from what the kernel would do anyway are written: per endpoint and
//! direction the default is deny when the direction is enforced, allow otherwise; per remote a
//! wildcard-port entry says what happens on ports no rule names, and per-port entries say what
//! differs from it. The kernel resolves (remote, port) with four exact lookups where a deny
//! always wins, which is also the policy's precedence.
//!
//! Limits, reported as [`Plan::warnings`] (never silently): port ranges wider than
//! [`MAX_RANGE_PORTS`] are not expanded (their ports fall to the wildcard verdict); a remote
//! whose unnamed-port verdict differs between TCP and UDP gets the stricter one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use tollgate_datapath_common::{
    EndpointInfo, PolicyKey, PolicyValue, direction as dp_dir, endpoint_flags, identity, proto,
    verdict,
};
use tollgate_policy::endpoints::Inventory;
use tollgate_policy::eval::{Decision, Evaluator, Local, PortPolicy};
use tollgate_policy::model::{CompiledRule, Direction, L7, PortSel, Protocol};
use tollgate_policy::peer::{PeerMatch, Remote, RemoteKind};

/// Port ranges up to this many ports are expanded into per-port entries.
pub const MAX_RANGE_PORTS: u32 = 1024;
/// First identity given to CIDR prefixes of the rules (Cilium's local CIDR identity range).
pub const FIRST_CIDR_IDENTITY: u32 = 1 << 24;

/// Where redirected flows go: the proxy's transparent listeners.
#[derive(Debug, Clone, Copy)]
pub struct ProxyPorts {
    /// HTTP, gRPC, TLS server names (and Kafka once it lands).
    pub l7: u16,
    /// DNS rules.
    pub dns: u16,
}

/// A managed endpoint as the datapath sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanEndpoint {
    pub name: String,
    pub namespace: String,
    /// Host-side interface to attach to (from the inventory), if known.
    pub interface: Option<String>,
    pub info: EndpointInfo,
}

/// One policy map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanEntry {
    pub key: PolicyKey,
    pub value: PolicyValue,
}

/// Everything the kernel maps should hold for a policy set and inventory.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub endpoints: Vec<PlanEndpoint>,
    pub ipcache: Vec<(IpNet, u32)>,
    pub policy: Vec<PlanEntry>,
    pub warnings: Vec<String>,
}

/// A remote the node knows: its identity and how policy sees it.
struct Known {
    identity: u32,
    remote: Remote,
}

/// Collects the CIDR prefixes the rules name (allow and except alike).
fn rule_cidrs(rules: &[CompiledRule]) -> BTreeSet<IpNet> {
    let mut out = BTreeSet::new();
    for r in rules {
        for d in [&r.ingress, &r.egress] {
            for e in d.allow.iter().chain(&d.deny) {
                if let PeerMatch::Cidrs(sets) = &e.peer {
                    for s in sets {
                        out.insert(s.cidr.trunc());
                        out.extend(s.except.iter().map(|x| x.trunc()));
                    }
                }
            }
        }
    }
    out
}

/// An address whose longest match among `all` is `net`, so that policy decided for it holds
/// for every address the ipcache maps to `net`'s identity.
fn representative(net: &IpNet, all: &BTreeSet<IpNet>) -> Option<IpAddr> {
    let longest = |ip: IpAddr| {
        all.iter()
            .filter(|n| n.contains(&ip))
            .max_by_key(|n| n.prefix_len())
            .copied()
    };
    let (lo, hi) = (net.network(), net.broadcast());
    let mid = match (lo, hi) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            IpAddr::V4((((u64::from(u32::from(a)) + u64::from(u32::from(b))) / 2) as u32).into())
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let (a, b) = (u128::from(a), u128::from(b));
            IpAddr::V6((a / 2 + b / 2 + (a % 2 + b % 2) / 2).into())
        }
        _ => lo,
    };
    [lo, hi, mid]
        .into_iter()
        .find(|ip| longest(*ip) == Some(*net))
}

/// The ports rules selecting `local` name in `dir` (numeric, small ranges expanded, named
/// ports resolved: the local endpoint's on ingress, every known remote's on egress).
fn named_ports(
    rules: &[&CompiledRule],
    dir: Direction,
    local_ports: &[(String, u16)],
    remotes: &[Known],
    warnings: &mut Vec<String>,
    who: &str,
) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    for r in rules {
        let d = r.direction(dir);
        for e in d.allow.iter().chain(&d.deny) {
            for pr in e.ports.iter().flatten() {
                for pm in &pr.ports {
                    match &pm.port {
                        PortSel::Any => {}
                        PortSel::Range(a, b) => {
                            if u32::from(*b) - u32::from(*a) < MAX_RANGE_PORTS {
                                out.extend(*a..=*b);
                            } else {
                                warnings.push(format!(
                                    "{who}: {}: port range {a}-{b} is wider than {MAX_RANGE_PORTS} ports; \
                                     its ports get the endpoint's any-port verdict in the kernel",
                                    pr.path
                                ));
                            }
                        }
                        PortSel::Named(n) => {
                            let find = |ports: &[(String, u16)]| {
                                ports
                                    .iter()
                                    .filter(|(k, _)| k.eq_ignore_ascii_case(n))
                                    .map(|(_, v)| *v)
                                    .collect::<Vec<_>>()
                            };
                            match dir {
                                Direction::Ingress => out.extend(find(local_ports)),
                                Direction::Egress => {
                                    for k in remotes {
                                        out.extend(find(&k.remote.named_ports));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// What a compiled result of one endpoint (or identity) came from: its labels, named ports and
/// the rules selecting it, in rule order. [`PlanCache`] reuses a result while these are the
/// same — the rules by pointer, since unchanged rules are shared between revisions.
struct Selected {
    labels: tollgate_policy::labels::LabelSet,
    named: Vec<(String, u16)>,
    rules: Vec<CompiledRule>,
}

impl Selected {
    fn new(local: &Local<'_>, rules: &[&CompiledRule]) -> Selected {
        Selected {
            labels: local.labels.clone(),
            named: local.named_ports.to_vec(),
            rules: rules.iter().map(|r| (*r).clone()).collect(),
        }
    }

    fn unchanged(&self, local: &Local<'_>, rules: &[&CompiledRule]) -> bool {
        self.labels == *local.labels
            && self.named == local.named_ports
            && self.rules.len() == rules.len()
            && self.rules.iter().zip(rules).all(|(a, b)| a.same(b))
    }

    fn local(&self) -> Local<'_> {
        Local {
            labels: &self.labels,
            is_host: false,
            named_ports: &self.named,
        }
    }
}

/// An endpoint whose ingress has L7 rules: its rules, and the ports they are on.
struct IngressL7 {
    from: Selected,
    ports: BTreeSet<u16>,
    cache: VerdictCache,
    /// Unique over the cache's life: a new value whenever this identity's ingress is compiled
    /// again, so endpoints can tell whether their redirects towards it are still right.
    serial: u64,
}

type VerdictCache =
    std::sync::Mutex<std::collections::HashMap<(u16, Protocol), Arc<Verdicts<Box<PortPolicy>>>>>;

impl IngressL7 {
    fn verdicts(
        &self,
        port: u16,
        p: Protocol,
        ports: ProxyPorts,
    ) -> Arc<Verdicts<Box<PortPolicy>>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = cache.get(&(port, p)) {
            return v.clone();
        }
        let pp = Box::new(Evaluator::port_policy_of(
            &self.from.rules,
            &self.from.local(),
            Direction::Ingress,
            port,
            p,
        ));
        let v = Arc::new(Verdicts::new(pp, ports));
        cache.insert((port, p), v.clone());
        v
    }
}

fn named_of(ep: &tollgate_policy::endpoints::Endpoint) -> Vec<(String, u16)> {
    ep.spec.ports.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

/// The ports of ingress items with L7 rules or server names, among `rules`.
fn l7_ports<'a>(
    rules: impl Iterator<Item = &'a CompiledRule>,
    named: &[(String, u16)],
) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    for r in rules {
        for e in r.ingress.allow.iter().chain(&r.ingress.deny) {
            for pr in e.ports.iter().flatten() {
                if matches!(pr.l7, L7::None) && pr.server_names.is_empty() {
                    continue;
                }
                for pm in &pr.ports {
                    match &pm.port {
                        PortSel::Range(a, b) if u32::from(*b) - u32::from(*a) < MAX_RANGE_PORTS => {
                            out.extend(*a..=*b)
                        }
                        PortSel::Named(n) => out.extend(
                            named
                                .iter()
                                .filter(|(k, _)| k.eq_ignore_ascii_case(n))
                                .map(|(_, v)| *v),
                        ),
                        _ => {}
                    }
                }
            }
        }
    }
    out
}

/// Kernel verdicts of one port policy for many remotes: remotes no entry concerns all get the
/// verdict of a remote that matches nothing, computed once.
struct Verdicts<P: std::ops::Deref<Target = PortPolicy>> {
    pp: P,
    unconcerned: Option<(u8, u16)>,
    ports: ProxyPorts,
}

impl<P: std::ops::Deref<Target = PortPolicy>> Verdicts<P> {
    fn new(pp: P, ports: ProxyPorts) -> Verdicts<P> {
        let nobody = Remote::reserved(RemoteKind::Unmanaged);
        let unconcerned = (!pp.concerns(&nobody)).then(|| kernel_verdict(&pp, &nobody, ports));
        Verdicts {
            pp,
            unconcerned,
            ports,
        }
    }

    fn of(&self, remote: &Remote) -> (u8, u16) {
        match self.unconcerned {
            Some(v) if !self.pp.concerns(remote) => v,
            _ => kernel_verdict(&self.pp, remote, self.ports),
        }
    }
}

/// The kernel verdict for one evaluated flow.
fn kernel_verdict(pp: &PortPolicy, remote: &Remote, ports: ProxyPorts) -> (u8, u16) {
    let v = pp.evaluate(remote, None);
    match (v.decision, pp.l7_kind(remote)) {
        (Decision::Deny, _) => (verdict::DENY, 0),
        (_, Some("dns")) => (verdict::REDIRECT, ports.dns),
        (_, Some(_)) => (verdict::REDIRECT, ports.l7),
        (Decision::AuditDeny, None) => (verdict::AUDIT, 0),
        (Decision::Allow, None) => (verdict::ALLOW, 0),
    }
}

fn proto_num(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => proto::TCP,
        Protocol::Udp => proto::UDP,
        Protocol::Sctp => 132,
    }
}

/// First identity given to IPs learned from DNS answers (after the CIDR range).
pub const FIRST_FQDN_IDENTITY: u32 = FIRST_CIDR_IDENTITY + (1 << 20);

/// An IP the DNS proxy learned, with the names it was learned under and the identity the
/// agent gave it (one per IP, so that `toFQDNs` decides per address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnedIp {
    pub identity: u32,
    pub ip: IpAddr,
    pub names: Vec<String>,
}

/// Compile the rules of `eval` for the endpoints of `inv`.
pub fn compile(eval: &Evaluator, inv: &Inventory, ports: ProxyPorts) -> Plan {
    compile_with(eval, inv, ports, &[])
}

/// [`compile`], with the IPs learned from DNS answers as remotes of their own (`toFQDNs`):
/// each gets a host-prefix ipcache entry, so it wins over any CIDR it lies in.
pub fn compile_with(
    eval: &Evaluator,
    inv: &Inventory,
    ports: ProxyPorts,
    learned: &[LearnedIp],
) -> Plan {
    compile_local(eval, inv, ports, learned, &|_| true)
}

/// [`compile_with`] where only the endpoints `local` accepts are this node's (given an
/// endpoint entry and policy entries, and attached); the others are remote peers only (their
/// identities and ipcache entries), as the pods of other nodes are for `tollgate up
/// --kubernetes`.
pub fn compile_local(
    eval: &Evaluator,
    inv: &Inventory,
    ports: ProxyPorts,
    learned: &[LearnedIp],
    local: &dyn Fn(&tollgate_policy::endpoints::Endpoint) -> bool,
) -> Plan {
    compile_local_cached(eval, inv, ports, learned, local, &mut PlanCache::default())
}

/// [`compile_local`] reusing what `cache` kept from the previous call (see [`PlanCache`]):
/// the result is the same as compiling from scratch.
pub fn compile_local_cached(
    eval: &Evaluator,
    inv: &Inventory,
    ports: ProxyPorts,
    learned: &[LearnedIp],
    local: &dyn Fn(&tollgate_policy::endpoints::Endpoint) -> bool,
    cache: &mut PlanCache,
) -> Plan {
    let mut plan = Plan::default();

    // Remote identities: endpoints (one per identity), host, world, CIDR prefixes.
    let mut known: Vec<Known> = Vec::new();
    let mut seen = BTreeSet::new();
    for ep in &inv.endpoints {
        if seen.insert(ep.identity) {
            known.push(Known {
                identity: ep.identity,
                remote: Remote::endpoint(ep),
            });
        }
        for ip in &ep.spec.ips {
            plan.ipcache.push((IpNet::from(*ip), ep.identity));
        }
    }
    known.push(Known {
        identity: identity::HOST,
        remote: Remote::reserved(RemoteKind::Host),
    });
    known.push(Known {
        identity: identity::WORLD,
        remote: Remote::world(None, vec![]),
    });
    let learned_from = known.len();
    for l in learned {
        if inv.by_ip(l.ip).is_some() {
            // toFQDNs never selects in-cluster addresses (cnp-semantics §3.4).
            continue;
        }
        plan.ipcache.push((IpNet::from(l.ip), l.identity));
        known.push(Known {
            identity: l.identity,
            remote: Remote::world(Some(l.ip), l.names.clone()),
        });
    }
    let learned_to = known.len();
    let cidrs = rule_cidrs(eval.rules());
    for (i, net) in cidrs.iter().enumerate() {
        let id = FIRST_CIDR_IDENTITY + i as u32;
        match representative(net, &cidrs) {
            Some(ip) => {
                plan.ipcache.push((*net, id));
                known.push(Known {
                    identity: id,
                    remote: Remote::world(Some(ip), vec![]),
                });
            }
            None => plan.warnings.push(format!(
                "CIDR {net}: every address of it lies in a more specific CIDR of the rules; \
                 not given an identity of its own"
            )),
        }
    }

    // Ports on which each endpoint's ingress has L7 rules, by identity. A local client's flows
    // to such a port are redirected on the client's own interface (`bpf_sk_assign` works only
    // where a packet enters the node's stack), so the proxy can apply the destination's
    // ingress L7 rules; the destination's interface then admits the proxy's marked connection.
    let known_by_id: std::collections::HashMap<u32, usize> = known
        .iter()
        .enumerate()
        .map(|(i, k)| (k.identity, i))
        .collect();
    // What every endpoint's entries depend on besides its own rules: the remote identities as
    // the evaluator sees them, and the proxy ports. When the endpoints, host, world and CIDR
    // identities or the ports change nothing cached is kept; when only FQDN-learned addresses
    // came or went, each cached endpoint takes the change as a delta (below).
    let base = format!(
        "{ports:?} {:?}",
        known[..learned_from]
            .iter()
            .chain(&known[learned_to..])
            .map(|k| (k.identity, &k.remote))
            .collect::<Vec<_>>()
    );
    let now_learned: BTreeMap<u32, String> = known[learned_from..learned_to]
        .iter()
        .map(|k| (k.identity, format!("{:?}", k.remote)))
        .collect();
    if cache.global.as_deref() != Some(base.as_str()) {
        cache.endpoints.clear();
        cache.ingress.clear();
        cache.global = Some(base);
    } else if cache.learned != now_learned {
        let gone: Vec<u32> = cache
            .learned
            .iter()
            .filter(|(id, r)| now_learned.get(id) != Some(r))
            .map(|(id, _)| *id)
            .collect();
        let came: Vec<&Known> = known[learned_from..learned_to]
            .iter()
            .filter(|k| cache.learned.get(&k.identity) != now_learned.get(&k.identity))
            .collect();
        cache
            .endpoints
            .retain(|_, own| own.learned_changed(&gone, &came));
    }
    cache.learned = now_learned;

    let mut ingress_l7: BTreeMap<u32, Arc<IngressL7>> = BTreeMap::new();
    let mut judged = std::collections::HashSet::new();
    for ep in &inv.endpoints {
        if !judged.insert(ep.identity) {
            continue;
        }
        let named = named_of(ep);
        let local = Local {
            labels: &ep.labels,
            is_host: false,
            named_ports: &named,
        };
        let selecting: Vec<&CompiledRule> = eval.rules_selecting(&local).collect();
        // Kept while the identity's labels, named ports and selecting rules are the same (its
        // port policies and their verdicts with it).
        let kept = cache
            .ingress
            .remove(&ep.identity)
            .filter(|dst| dst.from.unchanged(&local, &selecting));
        let dst = match kept {
            Some(dst) => dst,
            None => {
                cache.serials += 1;
                Arc::new(IngressL7 {
                    from: Selected::new(&local, &selecting),
                    ports: l7_ports(selecting.iter().copied(), &named),
                    cache: Default::default(),
                    serial: cache.serials,
                })
            }
        };
        if !dst.ports.is_empty() {
            ingress_l7.insert(ep.identity, dst.clone());
        }
        cache.ingress.insert(ep.identity, dst);
    }
    cache.ingress.retain(|id, _| judged.contains(id));
    // The redirects an endpoint makes towards destinations with ingress L7 rules depend on its
    // own rules and on those destinations' (by serial): while neither changed they are kept.
    let redirect_inputs: Vec<(u32, u64)> =
        ingress_l7.iter().map(|(id, d)| (*id, d.serial)).collect();
    if cache.redirect_inputs != redirect_inputs {
        cache.redirect_epoch += 1;
        cache.redirect_inputs = redirect_inputs;
    }

    let mut seen = std::collections::HashSet::new();

    // Endpoint ids number the local endpoints only (1, 2, … in inventory order), so that pods
    // coming and going on other nodes do not renumber this node's (and rewrite their entries).
    for (n, ep) in inv.endpoints.iter().filter(|ep| local(ep)).enumerate() {
        let endpoint_id = n as u32 + 1;
        let named = named_of(ep);
        let local = Local {
            labels: &ep.labels,
            is_host: false,
            named_ports: &named,
        };
        let selecting: Vec<&CompiledRule> = eval.rules_selecting(&local).collect();
        let key = (ep.spec.namespace.clone(), ep.spec.name.clone());
        let unchanged = cache.endpoints.get(&key).is_some_and(|own| {
            own.identity == ep.identity && own.from.unchanged(&local, &selecting)
        });
        if unchanged {
            cache.reused += 1;
        } else {
            cache.recompiled += 1;
            let own = own_part(ep, &local, &selecting, &known, ports);
            cache.endpoints.insert(key.clone(), own);
        }
        let own = cache
            .endpoints
            .get_mut(&key)
            .expect("just checked or inserted");
        seen.insert(key);
        plan.warnings.extend(own.warnings.iter().cloned());
        let me = Remote::endpoint(ep);
        for (i, kdir) in [(0, dp_dir::INGRESS), (1, dp_dir::EGRESS)] {
            let mut entries = own.entries[i].clone();
            if kdir == dp_dir::EGRESS {
                // Redirect here what the destination's ingress L7 rules must see.
                if own.redirects.as_ref().map(|r| r.0) != Some(cache.redirect_epoch) {
                    let list =
                        redirects(own, &local, &me, &ingress_l7, &known_by_id, &known, ports);
                    own.redirects = Some((cache.redirect_epoch, list));
                }
                if let Some((_, list)) = &own.redirects {
                    entries.extend(list.iter().copied());
                }
            }
            for ((remote_identity, port, protocol), (v, proxy_port)) in entries {
                plan.policy.push(PlanEntry {
                    key: PolicyKey {
                        endpoint_id,
                        remote_identity,
                        port,
                        protocol,
                        direction: kdir,
                    },
                    value: PolicyValue {
                        verdict: v,
                        _pad: 0,
                        proxy_port,
                    },
                });
            }
        }
        plan.endpoints.push(PlanEndpoint {
            name: ep.spec.name.clone(),
            namespace: ep.spec.namespace.clone(),
            interface: ep.spec.interface.clone(),
            info: EndpointInfo {
                endpoint_id,
                identity: ep.identity,
                flags: own.flags,
            },
        });
    }
    cache.endpoints.retain(|k, _| seen.contains(k));
    plan
}

/// Compiled results kept between revisions by [`compile_local_cached`]: per local endpoint,
/// what its own rules compile to, reused while the endpoint, the rules selecting it (the same
/// shared rules, compared by pointer) and the node's remote identities are unchanged — so one
/// changed policy recompiles only the endpoints it selects. The redirects towards destinations
/// with ingress L7 rules are recomputed every time (they depend on the destination's rules).
#[derive(Default)]
pub struct PlanCache {
    /// The last [`IngressL7::serial`] given out.
    serials: u64,
    /// Destinations with ingress L7 rules and their serials, and a counter bumped whenever
    /// they change (endpoints keep redirects computed at the current epoch).
    redirect_inputs: Vec<(u32, u64)>,
    redirect_epoch: u64,
    /// Ports and remote identities other than the FQDN-learned ones (`Debug`).
    global: Option<String>,
    /// FQDN-learned identities and their remotes (`Debug`), to tell what came and went.
    learned: BTreeMap<u32, String>,
    endpoints: std::collections::HashMap<(String, String), OwnPart>,
    /// Per identity: its ingress rules and port policies (the redirect checks' other side).
    ingress: std::collections::HashMap<u32, Arc<IngressL7>>,
    /// Endpoints taken from the cache / compiled, over the cache's life.
    pub reused: u64,
    pub recompiled: u64,
}

impl std::fmt::Debug for PlanCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanCache")
            .field("endpoints", &self.endpoints.len())
            .field("reused", &self.reused)
            .field("recompiled", &self.recompiled)
            .finish()
    }
}

/// One direction's policy entries of an endpoint: (remote identity, port, protocol) →
/// (verdict, proxy port).
type DirEntries = BTreeMap<(u32, u16, u8), (u8, u16)>;
/// The same as a list.
type EntryList = Vec<((u32, u16, u8), (u8, u16))>;
/// (port, protocol) → (verdict, proxy port), for a remote not yet named.
type PortEntries = Vec<((u16, u8), (u8, u16))>;

/// One local endpoint's entries from its own rules, with the inputs they came from.
struct OwnPart {
    identity: u32,
    from: Selected,
    /// [ingress, egress].
    entries: [DirEntries; 2],
    flags: u32,
    warnings: Vec<String>,
    /// This endpoint's egress port policies, built when a redirect check needs them.
    egress: std::collections::HashMap<(u16, Protocol), Verdicts<Box<PortPolicy>>>,
    /// [ingress, egress] entries (port, protocol) → verdict of a remote that no peer of the
    /// endpoint's rules matches: what a newly learned FQDN address gets here unless one of the
    /// rules' peers (a `toFQDNs`, CIDR or entity peer) matches it. `None` when that is not
    /// known to hold (a peer matches even the unmanaged probe, or the probe drew a warning).
    unmatched: Option<[PortEntries; 2]>,
    /// Egress redirects towards destinations with ingress L7 rules, and the
    /// [`PlanCache::redirect_epoch`] they were computed at.
    redirects: Option<(u64, EntryList)>,
}

/// The egress entries that send `me`'s flows to the proxy because a destination's ingress L7
/// rules must see them: for each destination identity with ingress L7 ports, each port the
/// endpoint's own egress does not deny and the destination redirects.
fn redirects(
    own: &mut OwnPart,
    local: &Local<'_>,
    me: &Remote,
    ingress_l7: &BTreeMap<u32, Arc<IngressL7>>,
    known_by_id: &std::collections::HashMap<u32, usize>,
    known: &[Known],
    ports: ProxyPorts,
) -> EntryList {
    let mut out = Vec::new();
    for (rid, dst) in ingress_l7 {
        let Some(k) = known_by_id.get(rid).map(|i| &known[*i]) else {
            continue;
        };
        for port in &dst.ports {
            for p in [Protocol::Tcp, Protocol::Udp] {
                let mine = own
                    .egress
                    .entry((*port, p))
                    .or_insert_with(|| {
                        Verdicts::new(
                            Box::new(Evaluator::port_policy_of(
                                &own.from.rules,
                                local,
                                Direction::Egress,
                                *port,
                                p,
                            )),
                            ports,
                        )
                    })
                    .of(&k.remote);
                if mine.0 == verdict::DENY {
                    continue;
                }
                let theirs = dst.verdicts(*port, p, ports).of(me);
                if theirs.0 == verdict::REDIRECT {
                    out.push(((*rid, *port, proto_num(p)), theirs));
                }
            }
        }
    }
    out
}

impl OwnPart {
    /// Takes FQDN-learned identities that went (`gone`) and came (`came`) as a delta: their
    /// entries removed, and the unmatched entries given to the new ones. `false` when the
    /// endpoint must be compiled again instead (a peer of its rules matches a new remote).
    fn learned_changed(&mut self, gone: &[u32], came: &[&Known]) -> bool {
        let Some(unmatched) = &self.unmatched else {
            return false;
        };
        if came
            .iter()
            .any(|k| any_peer_matches(&self.from.rules, &k.remote))
        {
            return false;
        }
        for (dir, entries) in self.entries.iter_mut().enumerate() {
            if !gone.is_empty() {
                entries.retain(|(id, _, _), _| !gone.contains(id));
            }
            for k in came {
                for &((port, proto), v) in &unmatched[dir] {
                    entries.insert((k.identity, port, proto), v);
                }
            }
        }
        true
    }
}

/// Whether a peer of any of `rules`' items, in either direction, allow or deny, matches `r`.
fn any_peer_matches<'a>(rules: impl IntoIterator<Item = &'a CompiledRule>, r: &Remote) -> bool {
    rules.into_iter().any(|rule| {
        [&rule.ingress, &rule.egress]
            .iter()
            .any(|d| d.allow.iter().chain(&d.deny).any(|e| e.peer.matches(r)))
    })
}

/// The identity under which [`own_part`] computes its entries for a remote no peer matches
/// (never a real identity: identities are allocated far below it).
const PROBE_IDENTITY: u32 = u32::MAX;

fn own_part(
    ep: &tollgate_policy::endpoints::Endpoint,
    local: &Local<'_>,
    selecting: &[&CompiledRule],
    known: &[Known],
    ports: ProxyPorts,
) -> OwnPart {
    let port_policy =
        |dir, port, p| Evaluator::port_policy_of(selecting.iter().copied(), local, dir, port, p);
    let who = format!("{}/{}", ep.spec.namespace, ep.spec.name);
    let mut warnings = Vec::new();
    let mut flags = 0;
    let mut out: [DirEntries; 2] = Default::default();
    // The remotes plus a probe no peer matches, whose entries become `unmatched`.
    let probe = Known {
        identity: PROBE_IDENTITY,
        remote: Remote::reserved(RemoteKind::Unmanaged),
    };
    debug_assert!(known.iter().all(|k| k.identity != PROBE_IDENTITY));
    let with_probe: Vec<&Known> = known.iter().chain(std::iter::once(&probe)).collect();
    let mut probe_warned = false;
    for (i, dir, flag) in [
        (0, Direction::Ingress, endpoint_flags::ENFORCE_INGRESS),
        (1, Direction::Egress, endpoint_flags::ENFORCE_EGRESS),
    ] {
        let mentioned = named_ports(
            selecting,
            dir,
            local.named_ports,
            known,
            &mut warnings,
            &who,
        );
        // A port no rule names stands for all of them.
        let other = (1..=u16::MAX).find(|p| !mentioned.contains(p)).unwrap_or(0);
        let pp_other = [Protocol::Tcp, Protocol::Udp].map(|p| port_policy(dir, other, p));
        let unknown = Remote::reserved(RemoteKind::Unmanaged);
        let default = if pp_other[0].evaluate(&unknown, None).decision == Decision::Allow {
            verdict::ALLOW
        } else {
            flags |= flag;
            verdict::DENY
        };
        let entries = &mut out[i];
        let mut any_port: BTreeMap<u32, u8> = BTreeMap::new();
        let other_v = [
            Verdicts::new(&pp_other[0], ports),
            Verdicts::new(&pp_other[1], ports),
        ];
        for k in &with_probe {
            let tcp = other_v[0].of(&k.remote);
            let udp = other_v[1].of(&k.remote);
            let v = if tcp == udp {
                tcp
            } else if k.identity == PROBE_IDENTITY {
                probe_warned = true;
                if tcp.0 == verdict::DENY { tcp } else { udp }
            } else {
                warnings.push(format!(
                    "{who} {dir:?}: identity {}: TCP and UDP differ on unnamed ports; the \
                     kernel applies the stricter",
                    k.identity
                ));
                if tcp.0 == verdict::DENY { tcp } else { udp }
            };
            any_port.insert(k.identity, v.0);
            if v.0 != default {
                entries.insert((k.identity, 0, proto::ANY), v);
            }
        }
        for port in &mentioned {
            for p in [Protocol::Tcp, Protocol::Udp] {
                let pp = port_policy(dir, *port, p);
                let vs = Verdicts::new(&pp, ports);
                for k in &with_probe {
                    let v = vs.of(&k.remote);
                    let wildcard = any_port.get(&k.identity).copied().unwrap_or(default);
                    if v.0 != wildcard || v.0 == verdict::REDIRECT {
                        entries.insert((k.identity, *port, proto_num(p)), v);
                    }
                }
            }
        }
    }
    // The probe sorts last: its entries are the tail of each direction's map.
    let unmatched: [PortEntries; 2] = out.each_mut().map(|entries| {
        entries
            .split_off(&(PROBE_IDENTITY, 0, 0))
            .into_iter()
            .map(|((_, port, proto), v)| ((port, proto), v))
            .collect()
    });
    let probe_matched = any_peer_matches(selecting.iter().copied(), &probe.remote);
    OwnPart {
        identity: ep.identity,
        from: Selected::new(local, selecting),
        entries: out,
        flags,
        warnings,
        egress: Default::default(),
        unmatched: (!probe_warned && !probe_matched).then_some(unmatched),
        redirects: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_policy::load::PolicySet;

    const PORTS: ProxyPorts = ProxyPorts {
        l7: 15001,
        dns: 15053,
    };

    const INVENTORY: &str = "
endpoints:
  - {name: frontend, namespace: prod, labels: {app: frontend}, ips: [10.0.0.1], interface: veth-fe}
  - {name: api, namespace: prod, labels: {app: api}, ips: [10.0.0.2, 'fd00::2'], ports: {http: 8080}}
  - {name: intruder, namespace: prod, labels: {app: intruder}, ips: [10.0.0.3]}
  - {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}, ips: [10.0.0.53]}
";

    const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts:
    - ports: [{port: http, protocol: TCP}]
      rules:
        http: [{method: GET, path: /items}]
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts:
    - ports: [{port: "9090", protocol: TCP}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: frontend, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
  - toEndpoints: [{matchLabels: {app: api}}]
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
    toPorts:
    - ports: [{port: "53", protocol: UDP}]
      rules:
        dns: [{matchPattern: "*.example.com"}]
  - toCIDRSet: [{cidr: 192.0.2.0/24, except: [192.0.2.128/25]}]
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
  egressDeny:
  - toEndpoints: [{matchLabels: {app: api}}]
    toPorts:
    - ports: [{port: "22", protocol: TCP}]
"#;

    fn plan() -> (Plan, Inventory) {
        let mut set = PolicySet::default();
        set.load_str("p.yaml", POLICY);
        assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
        let inv = Inventory::from_yaml(INVENTORY).unwrap();
        (compile(&Evaluator::new(set.rules), &inv, PORTS), inv)
    }

    /// The kernel's lookup: four exact keys, deny wins, else the highest rank; no entry →
    /// the endpoint's default. Mirrors `decide` in redirector-ebpf/ebpf/src/main.rs.
    fn kernel(plan: &Plan, ep: &str, dir: u8, remote: u32, port: u16, protocol: u8) -> (u8, u16) {
        let e = plan.endpoints.iter().find(|e| e.name == ep).unwrap();
        let id = e.info.endpoint_id;
        let rank = |v: u8| match v {
            verdict::REDIRECT => 3,
            verdict::ALLOW => 2,
            verdict::AUDIT => 1,
            _ => 0,
        };
        let mut best: Option<(u8, u16)> = None;
        for (r, p, pr) in [
            (remote, port, protocol),
            (remote, 0, proto::ANY),
            (identity::ANY, port, protocol),
            (identity::ANY, 0, proto::ANY),
        ] {
            if let Some(x) = plan.policy.iter().find(|x| {
                x.key
                    == PolicyKey {
                        endpoint_id: id,
                        remote_identity: r,
                        port: p,
                        protocol: pr,
                        direction: dir,
                    }
            }) {
                if x.value.verdict == verdict::DENY {
                    return (verdict::DENY, 0);
                }
                if best.is_none_or(|b| rank(x.value.verdict) > rank(b.0)) {
                    best = Some((x.value.verdict, x.value.proxy_port));
                }
            }
        }
        let flag = if dir == dp_dir::INGRESS {
            endpoint_flags::ENFORCE_INGRESS
        } else {
            endpoint_flags::ENFORCE_EGRESS
        };
        best.unwrap_or(if e.info.flags & flag != 0 {
            (verdict::DENY, 0)
        } else {
            (verdict::ALLOW, 0)
        })
    }

    #[test]
    fn ingress_l7_port_redirects_allowed_peers_and_denies_the_rest() {
        let (plan, inv) = plan();
        let fe = inv.by_name("frontend").unwrap().identity;
        let intruder = inv.by_name("intruder").unwrap().identity;
        let api = plan.endpoints.iter().find(|e| e.name == "api").unwrap();
        assert_eq!(
            api.info.flags,
            endpoint_flags::ENFORCE_INGRESS,
            "api: ingress enforced, egress open"
        );
        let tcp = proto::TCP;
        let i = dp_dir::INGRESS;
        assert_eq!(
            kernel(&plan, "api", i, fe, 8080, tcp),
            (verdict::REDIRECT, 15001)
        );
        assert_eq!(kernel(&plan, "api", i, fe, 9090, tcp), (verdict::ALLOW, 0));
        assert_eq!(kernel(&plan, "api", i, fe, 8081, tcp), (verdict::DENY, 0));
        assert_eq!(
            kernel(&plan, "api", i, fe, 8080, proto::UDP).0,
            verdict::DENY
        );
        assert_eq!(
            kernel(&plan, "api", i, intruder, 8080, tcp).0,
            verdict::DENY
        );
        assert_eq!(
            kernel(&plan, "api", i, identity::WORLD, 9090, tcp).0,
            verdict::DENY
        );
        assert_eq!(
            kernel(&plan, "api", dp_dir::EGRESS, intruder, 1234, tcp).0,
            verdict::ALLOW
        );
    }

    #[test]
    fn egress_l3_allow_with_a_port_deny_dns_redirect_and_cidr_except() {
        let (plan, inv) = plan();
        let api = inv.by_name("api").unwrap().identity;
        let dns = inv.by_name("kube-dns").unwrap().identity;
        let intruder = inv.by_name("intruder").unwrap().identity;
        let e = dp_dir::EGRESS;
        let (tcp, udp) = (proto::TCP, proto::UDP);
        assert_eq!(
            kernel(&plan, "frontend", e, api, 8080, tcp),
            (verdict::REDIRECT, 15001),
            "redirected at the client, for the api's ingress HTTP rules"
        );
        assert_eq!(
            kernel(&plan, "frontend", e, api, 9090, tcp).0,
            verdict::ALLOW
        );
        assert_eq!(
            kernel(&plan, "frontend", e, api, 5432, udp).0,
            verdict::ALLOW
        );
        assert_eq!(
            kernel(&plan, "frontend", e, api, 22, tcp).0,
            verdict::DENY,
            "egressDeny wins"
        );
        assert_eq!(
            kernel(&plan, "frontend", e, dns, 53, udp),
            (verdict::REDIRECT, 15053)
        );
        assert_eq!(kernel(&plan, "frontend", e, dns, 53, tcp).0, verdict::DENY);
        assert_eq!(
            kernel(&plan, "frontend", e, intruder, 80, tcp).0,
            verdict::DENY
        );
        assert_eq!(
            kernel(&plan, "frontend", e, identity::WORLD, 443, tcp).0,
            verdict::DENY
        );
        // The CIDR and its except got identities, by longest prefix.
        let id_of = |net: &str| {
            let n: IpNet = net.parse().unwrap();
            plan.ipcache
                .iter()
                .find(|(x, _)| *x == n)
                .map(|(_, id)| *id)
                .unwrap()
        };
        let allowed = id_of("192.0.2.0/24");
        let except = id_of("192.0.2.128/25");
        assert!(allowed >= FIRST_CIDR_IDENTITY && except >= FIRST_CIDR_IDENTITY);
        assert_eq!(
            kernel(&plan, "frontend", e, allowed, 443, tcp).0,
            verdict::ALLOW
        );
        assert_eq!(
            kernel(&plan, "frontend", e, allowed, 80, tcp).0,
            verdict::DENY
        );
        assert_eq!(
            kernel(&plan, "frontend", e, except, 443, tcp).0,
            verdict::DENY
        );
        let fe = plan
            .endpoints
            .iter()
            .find(|x| x.name == "frontend")
            .unwrap();
        assert_eq!(fe.interface.as_deref(), Some("veth-fe"));
        assert_eq!(fe.info.flags, endpoint_flags::ENFORCE_EGRESS);
    }

    #[test]
    fn only_local_endpoints_get_entries_and_the_others_stay_known_identities() {
        let mut set = PolicySet::default();
        set.load_str("p.yaml", POLICY);
        let inv = Inventory::from_yaml(INVENTORY).unwrap();
        let eval = Evaluator::new(set.rules);
        let full = compile(&eval, &inv, PORTS);
        let here = compile_local(&eval, &inv, PORTS, &[], &|ep| ep.spec.name == "frontend");
        assert_eq!(
            here.endpoints.iter().map(|e| &e.name).collect::<Vec<_>>(),
            ["frontend"]
        );
        assert_eq!(here.ipcache, full.ipcache, "every pod is a known peer");
        let fe = here.endpoints[0].info.endpoint_id;
        assert!(here.policy.iter().all(|e| e.key.endpoint_id == fe));
        // The frontend is the first endpoint either way: the same id, the same entries.
        assert_eq!(full.endpoints[0].name, "frontend");
        let full_fe: Vec<_> = full
            .policy
            .iter()
            .filter(|e| e.key.endpoint_id == fe)
            .collect();
        assert_eq!(here.policy.iter().collect::<Vec<_>>(), full_fe);
        // Only local endpoints are numbered: the api alone here is endpoint 1.
        let api_here = compile_local(&eval, &inv, PORTS, &[], &|ep| ep.spec.name == "api");
        assert_eq!(api_here.endpoints[0].info.endpoint_id, 1);
        // The api's ingress L7 port is still redirected at the (local) frontend.
        let api = inv.by_name("api").unwrap().identity;
        assert_eq!(
            kernel(&here, "frontend", dp_dir::EGRESS, api, 8080, proto::TCP).0,
            verdict::REDIRECT
        );
    }

    #[test]
    fn endpoint_addresses_are_in_the_ipcache_and_unselected_endpoints_are_open() {
        let (plan, inv) = plan();
        let api = inv.by_name("api").unwrap().identity;
        for ip in ["10.0.0.2/32", "fd00::2/128"] {
            let n: IpNet = ip.parse().unwrap();
            assert!(plan.ipcache.contains(&(n, api)), "{ip}");
        }
        let intruder = plan
            .endpoints
            .iter()
            .find(|e| e.name == "intruder")
            .unwrap();
        assert_eq!(intruder.info.flags, 0);
        assert!(
            !plan
                .policy
                .iter()
                .any(|p| p.key.endpoint_id == intruder.info.endpoint_id)
        );
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    }

    #[test]
    fn every_kernel_verdict_agrees_with_the_evaluator_on_a_grid_of_flows() {
        let (plan, inv) = plan();
        let mut set = PolicySet::default();
        set.load_str("p.yaml", POLICY);
        let eval = Evaluator::new(set.rules);
        for ep in &inv.endpoints {
            let named: Vec<(String, u16)> =
                ep.spec.ports.iter().map(|(k, v)| (k.clone(), *v)).collect();
            let local = Local {
                labels: &ep.labels,
                is_host: false,
                named_ports: &named,
            };
            for (dir, kdir) in [
                (Direction::Ingress, dp_dir::INGRESS),
                (Direction::Egress, dp_dir::EGRESS),
            ] {
                for peer in &inv.endpoints {
                    for port in [22u16, 53, 80, 443, 8080, 9090, 40000] {
                        for p in [Protocol::Tcp, Protocol::Udp] {
                            let pp = eval.port_policy(&local, dir, port, p);
                            let mut want = kernel_verdict(&pp, &Remote::endpoint(peer), PORTS);
                            // Egress to a port where the peer's ingress has L7 rules is
                            // redirected at this end (unless this end denies it).
                            let peer_named: Vec<(String, u16)> = peer
                                .spec
                                .ports
                                .iter()
                                .map(|(k, v)| (k.clone(), *v))
                                .collect();
                            let peer_local = Local {
                                labels: &peer.labels,
                                is_host: false,
                                named_ports: &peer_named,
                            };
                            let theirs = kernel_verdict(
                                &eval.port_policy(&peer_local, Direction::Ingress, port, p),
                                &Remote::endpoint(ep),
                                PORTS,
                            );
                            if dir == Direction::Egress
                                && want.0 != verdict::DENY
                                && theirs.0 == verdict::REDIRECT
                            {
                                want = theirs;
                            }
                            let got = kernel(
                                &plan,
                                &ep.spec.name,
                                kdir,
                                peer.identity,
                                port,
                                proto_num(p),
                            );
                            assert_eq!(
                                got, want,
                                "{} {dir:?} {} {port}/{p:?}",
                                ep.spec.name, peer.spec.name
                            );
                        }
                    }
                }
            }
        }
    }

    /// FQDN-learned addresses coming and going: each cached endpoint takes them as a delta
    /// unless a peer of its rules (here the intruder's `toFQDNs`, the frontend's CIDR) matches
    /// a new one; the plan is the same as a fresh compile at every step.
    #[test]
    fn learned_addresses_recompile_only_the_endpoints_whose_peers_match_them() {
        let fqdn_egress = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: intruder, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: intruder}}
  egress:
  - toFQDNs: [{matchName: api.example.com}]
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
---
# Audit mode: every remote none of its peers matches gets an audit entry on kube-dns's
# egress, so the delta must give learned addresses entries of their own.
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: kube-dns
  namespace: kube-system
  annotations: {tollgate.io/enforcement: audit}
spec:
  endpointSelector: {matchLabels: {k8s-app: kube-dns}}
  egress:
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: prod, app: api}}]
"#;
        let mut set = PolicySet::default();
        set.load_str("p.yaml", POLICY);
        set.load_str("intruder.yaml", fqdn_egress);
        assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
        let eval = Evaluator::new(set.rules);
        let inv = Inventory::from_yaml(INVENTORY).unwrap();
        let local = |_: &tollgate_policy::endpoints::Endpoint| true;
        let learned = |id: u32, ip: &str, name: &str| LearnedIp {
            identity: FIRST_FQDN_IDENTITY + id,
            ip: ip.parse().unwrap(),
            names: vec![name.to_string()],
        };
        let api = learned(1, "203.0.113.5", "api.example.com.");
        let cdn = learned(2, "192.0.2.7", "cdn.example.net.");
        let cdn_renamed = learned(2, "192.0.2.7", "api.example.com.");
        let steps: Vec<(&str, Vec<LearnedIp>, u64)> = vec![
            ("nothing learned", vec![], 4),
            // Only the intruder's toFQDNs peer matches the name.
            ("api learned", vec![api.clone()], 1),
            // Only the frontend's CIDR peer (192.0.2.0/24) covers the address.
            ("cdn learned", vec![api.clone(), cdn.clone()], 1),
            // Removal is exact for everybody: the identity's entries go.
            ("api expired", vec![cdn.clone()], 0),
            // The same identity under a name the intruder allows: both peers match now.
            ("cdn renamed", vec![cdn_renamed], 2),
            ("all expired", vec![], 0),
        ];
        let mut cache = PlanCache::default();
        let mut seen_fqdn_entry = false;
        for (what, learned, want) in steps {
            let before = cache.recompiled;
            let cached = compile_local_cached(&eval, &inv, PORTS, &learned, &local, &mut cache);
            let fresh = compile_local(&eval, &inv, PORTS, &learned, &local);
            assert_eq!(format!("{cached:?}"), format!("{fresh:?}"), "{what}");
            assert_eq!(
                cache.recompiled - before,
                want,
                "{what}: endpoints recompiled"
            );
            seen_fqdn_entry |= cached
                .policy
                .iter()
                .any(|e| e.key.remote_identity == FIRST_FQDN_IDENTITY + 1 && e.key.port == 443);
        }
        assert!(
            seen_fqdn_entry,
            "the intruder's allow towards the learned address reached the plan"
        );
        // The audit entry a learned address gets without any peer matching it.
        let with_cdn = compile_local_cached(&eval, &inv, PORTS, &[cdn], &local, &mut cache);
        let dns_id = with_cdn
            .endpoints
            .iter()
            .find(|e| e.name == "kube-dns")
            .unwrap();
        assert!(
            with_cdn
                .policy
                .iter()
                .any(|e| e.key.endpoint_id == dns_id.info.endpoint_id
                    && e.key.remote_identity == FIRST_FQDN_IDENTITY + 2
                    && e.value.verdict == verdict::AUDIT),
            "{with_cdn:?}"
        );
    }

    #[test]
    fn a_cached_compile_equals_a_fresh_one_and_reuses_only_unchanged_endpoints() {
        let docs: Vec<&str> = POLICY.split("---").collect();
        let load = |name: &str, text: &str| {
            let mut set = PolicySet::default();
            set.load_str(name, text);
            assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
            set.rules
        };
        let api = load("api.yaml", docs[0]);
        let frontend = load("frontend.yaml", docs[1]);
        // The api's L7 rule changed (another path), then gone (the port is L4 only).
        let api_other_path = load("api.yaml", &docs[0].replace("/items", "/orders"));
        let api_no_l7 = load(
            "api.yaml",
            &docs[0].replace(
                "      rules:\n        http: [{method: GET, path: /items}]\n",
                "",
            ),
        );
        let inv = Inventory::from_yaml(INVENTORY).unwrap();
        let local = |ep: &tollgate_policy::endpoints::Endpoint| ep.spec.name != "db";
        let mut cache = PlanCache::default();
        let revisions: Vec<(&str, Vec<CompiledRule>)> = vec![
            ("both", [api.clone(), frontend.clone()].concat()),
            ("same again", [api.clone(), frontend.clone()].concat()),
            (
                "api path",
                [api_other_path.clone(), frontend.clone()].concat(),
            ),
            ("api L4 only", [api_no_l7, frontend.clone()].concat()),
            ("frontend gone", api_other_path.clone()),
            ("both back", [api_other_path, frontend].concat()),
        ];
        let mut recompiled = Vec::new();
        for (what, rules) in revisions {
            let eval = Evaluator::new(rules);
            let before = cache.recompiled;
            let cached = compile_local_cached(&eval, &inv, PORTS, &[], &local, &mut cache);
            let fresh = compile_local(&eval, &inv, PORTS, &[], &local);
            assert_eq!(format!("{cached:?}"), format!("{fresh:?}"), "{what}");
            recompiled.push((what, cache.recompiled - before));
        }
        let local_endpoints = inv.endpoints.iter().filter(|ep| local(ep)).count() as u64;
        assert!(local_endpoints >= 2);
        let n = |what: &str| recompiled.iter().find(|r| r.0 == what).unwrap().1;
        assert_eq!(n("both"), local_endpoints, "{recompiled:?}");
        assert_eq!(n("same again"), 0, "{recompiled:?}");
        // Only the api is selected by the changed rules; the frontend's egress redirect
        // towards it still follows the change (checked by the equality above).
        assert_eq!(n("api path"), 1, "{recompiled:?}");
        assert_eq!(n("api L4 only"), 1, "{recompiled:?}");
        // The frontend's policy carried the only CIDR rule: without it the node's remote
        // identities change, and with them every endpoint's inputs.
        assert_eq!(n("frontend gone"), local_endpoints, "{recompiled:?}");
    }
}
