//! Remote peers as policy sees them, and the compiled peer part of an ingress/egress item.
//!
//! A [`Remote`] is what the datapath or the proxy knows about the other side of a flow: its
//! kind (an endpoint of this cluster, the host, the world…), its labels, and where known its IP
//! and the DNS names it was learned under. A [`PeerMatch`] is one item's peer fields compiled:
//! endpoint selectors, entities, CIDR sets or FQDN selectors (mutually exclusive, §3).

use std::net::IpAddr;

use ipnet::IpNet;

use crate::endpoints::reserved_labels;
use crate::l7::FqdnSelector;
use crate::labels::{LabelSet, Selector};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteKind {
    /// A workload endpoint of this cluster.
    Endpoint,
    Host,
    RemoteNode,
    KubeApiserver,
    Health,
    Init,
    Ingress,
    Unmanaged,
    /// Everything outside the cluster.
    World,
}

/// The other side of a flow.
#[derive(Debug, Clone)]
pub struct Remote {
    pub kind: RemoteKind,
    pub labels: LabelSet,
    pub ip: Option<IpAddr>,
    /// Names this IP was learned under from DNS answers (toFQDNs).
    pub fqdns: Vec<String>,
    /// Named ports of the remote endpoint (egress named-port resolution).
    pub named_ports: Vec<(String, u16)>,
    pub identity: u32,
}

impl Remote {
    pub fn reserved(kind: RemoteKind) -> Remote {
        use crate::endpoints::reserved as r;
        let (name, identity) = match kind {
            RemoteKind::Host => ("host", r::HOST),
            RemoteKind::RemoteNode => ("remote-node", r::REMOTE_NODE),
            RemoteKind::KubeApiserver => ("kube-apiserver", r::KUBE_APISERVER),
            RemoteKind::Health => ("health", r::HEALTH),
            RemoteKind::Init => ("init", r::INIT),
            RemoteKind::Ingress => ("ingress", r::INGRESS),
            RemoteKind::Unmanaged => ("unmanaged", r::UNMANAGED),
            RemoteKind::World | RemoteKind::Endpoint => ("world", r::WORLD),
        };
        Remote {
            kind,
            labels: reserved_labels(name),
            ip: None,
            fqdns: Vec::new(),
            named_ports: Vec::new(),
            identity,
        }
    }

    pub fn world(ip: Option<IpAddr>, fqdns: Vec<String>) -> Remote {
        Remote {
            ip,
            fqdns,
            ..Remote::reserved(RemoteKind::World)
        }
    }

    pub fn endpoint(ep: &crate::endpoints::Endpoint) -> Remote {
        Remote {
            kind: RemoteKind::Endpoint,
            labels: ep.labels.clone(),
            ip: ep.spec.ips.first().copied(),
            fqdns: Vec::new(),
            named_ports: ep.spec.ports.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            identity: ep.identity,
        }
    }

    fn is_cluster(&self) -> bool {
        !matches!(self.kind, RemoteKind::World)
    }
}

/// `fromEntities` / `toEntities` values (§3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    All,
    World,
    Cluster,
    Host,
    RemoteNode,
    KubeApiserver,
    Health,
    Init,
    Ingress,
    Unmanaged,
    None,
}

impl Entity {
    pub fn parse(s: &str) -> Option<Entity> {
        Some(match s {
            "all" => Entity::All,
            "world" | "world-ipv4" | "world-ipv6" => Entity::World,
            "cluster" => Entity::Cluster,
            "host" => Entity::Host,
            "remote-node" => Entity::RemoteNode,
            "kube-apiserver" => Entity::KubeApiserver,
            "health" => Entity::Health,
            "init" => Entity::Init,
            "ingress" => Entity::Ingress,
            "unmanaged" => Entity::Unmanaged,
            "none" => Entity::None,
            _ => return None,
        })
    }

    fn matches(self, r: &Remote) -> bool {
        match self {
            Entity::All => true,
            Entity::World => r.kind == RemoteKind::World,
            Entity::Cluster => r.is_cluster(),
            Entity::Host => r.kind == RemoteKind::Host,
            Entity::RemoteNode => r.kind == RemoteKind::RemoteNode,
            Entity::KubeApiserver => r.kind == RemoteKind::KubeApiserver,
            Entity::Health => r.kind == RemoteKind::Health,
            Entity::Init => r.kind == RemoteKind::Init,
            Entity::Ingress => r.kind == RemoteKind::Ingress,
            Entity::Unmanaged => r.kind == RemoteKind::Unmanaged,
            Entity::None => false,
        }
    }
}

/// A CIDR with its exceptions (`toCIDRSet` item, or a plain `toCIDR`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrSet {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

impl CidrSet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }
}

/// The compiled peer fields of one ingress/egress item.
#[derive(Debug, Clone)]
pub enum PeerMatch {
    /// No peer field but `toPorts`: every peer, world and host included (§3.1).
    Any,
    /// `ingress: [{}]` or `fromEndpoints: []`: selects nothing.
    Nothing,
    Endpoints(Vec<Selector>),
    Entities(Vec<Entity>),
    Cidrs(Vec<CidrSet>),
    Fqdns(Vec<FqdnSelector>),
}

impl PeerMatch {
    /// A hash under which equal peers meet (the evaluator matches each distinct peer of a
    /// port once): label selectors, `Any` and `Nothing`; `None` for the other kinds, which
    /// are then never merged.
    pub fn group_key(&self) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        match self {
            PeerMatch::Any => Some(0),
            PeerMatch::Nothing => Some(1),
            PeerMatch::Endpoints(sels) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                sels.hash(&mut h);
                Some(h.finish() | 2)
            }
            _ => None,
        }
    }

    /// Peers that match exactly the same remotes because they are written the same.
    pub fn same_as(&self, other: &PeerMatch) -> bool {
        match (self, other) {
            (PeerMatch::Any, PeerMatch::Any) | (PeerMatch::Nothing, PeerMatch::Nothing) => true,
            (PeerMatch::Endpoints(x), PeerMatch::Endpoints(y)) => x == y,
            _ => false,
        }
    }

    pub fn matches(&self, r: &Remote) -> bool {
        match self {
            PeerMatch::Any => true,
            PeerMatch::Nothing => false,
            PeerMatch::Endpoints(sels) => sels.iter().any(|s| s.matches(&r.labels)),
            PeerMatch::Entities(es) => es.iter().any(|e| e.matches(r)),
            // CIDR rules select only traffic from outside the cluster (§3.3).
            PeerMatch::Cidrs(sets) => {
                r.kind == RemoteKind::World
                    && match r.ip {
                        Some(ip) => sets.iter().any(|s| s.contains(ip)),
                        // The world identity without an address is 0.0.0.0/0 and ::/0.
                        None => sets
                            .iter()
                            .any(|s| s.cidr.prefix_len() == 0 && s.except.is_empty()),
                    }
            }
            PeerMatch::Fqdns(sels) => {
                r.kind == RemoteKind::World
                    && r.fqdns.iter().any(|n| sels.iter().any(|s| s.matches(n)))
            }
        }
    }
}

/// Parse a CIDR or a bare IP (meaning /32 or /128).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    // Host bits are masked, as Go's net.ParseCIDR does for Cilium.
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    match s.parse::<IpAddr>() {
        Ok(ip) => Ok(IpNet::from(ip)),
        Err(_) => Err(format!("`{s}` is not a valid CIDR or IP address")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_except_only_applies_inside_its_own_set() {
        let s = CidrSet {
            cidr: "1.0.0.0/8".parse().unwrap(),
            except: vec!["1.1.1.1/32".parse().unwrap()],
        };
        assert!(s.contains("1.2.3.4".parse().unwrap()));
        assert!(!s.contains("1.1.1.1".parse().unwrap()));
        assert!(!s.contains("2.0.0.1".parse().unwrap()));
    }

    #[test]
    fn cidr_peers_never_select_cluster_endpoints() {
        let m = PeerMatch::Cidrs(vec![CidrSet {
            cidr: "0.0.0.0/0".parse().unwrap(),
            except: vec![],
        }]);
        let mut host = Remote::reserved(RemoteKind::Host);
        host.ip = Some("10.0.0.1".parse().unwrap());
        assert!(!m.matches(&host));
        assert!(m.matches(&Remote::world(Some("8.8.8.8".parse().unwrap()), vec![])));
        assert!(m.matches(&Remote::world(None, vec![])));
    }

    #[test]
    fn cidr_parse_errors_are_precise() {
        assert_eq!(parse_cidr("10.0.0.1").unwrap().to_string(), "10.0.0.1/32");
        assert_eq!(parse_cidr("10.0.0.1/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            parse_cidr("10.0.0/8").unwrap_err(),
            "`10.0.0/8` is not a valid CIDR or IP address"
        );
    }
}
