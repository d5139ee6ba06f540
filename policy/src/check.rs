//! Whole-path checks: "may `from` talk to `to` on this port, with this request?".
//!
//! A connection between two endpoints crosses two policies: the source's egress and the
//! destination's ingress. Both must allow it, as on a real network. Peers outside the inventory
//! (`world`, `cidr:…`, `fqdn:…`, `host`) have no policy of their own here. This is what
//! `tollgate eval` and `tollgate test` run.

use std::net::IpAddr;

use crate::endpoints::{Endpoint, Inventory};
use crate::eval::{Decision, Evaluator, L7Request, Local, Reason, Verdict};
use crate::labels::LabelSet;
use crate::model::{Direction, Protocol};
use crate::peer::{Remote, RemoteKind};

/// One side of a checked connection, as written in `--from`/`--to` or a test case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSpec {
    Endpoint(String),
    World,
    Host,
    RemoteNode,
    KubeApiserver,
    Cidr(IpAddr),
    Fqdn(String),
}

impl PeerSpec {
    /// `frontend` | `world` | `host` | `remote-node` | `kube-apiserver` | `cidr:203.0.113.7` |
    /// `fqdn:api.example.com`.
    pub fn parse(s: &str) -> Result<PeerSpec, String> {
        Ok(match s {
            "world" => PeerSpec::World,
            "host" => PeerSpec::Host,
            "remote-node" => PeerSpec::RemoteNode,
            "kube-apiserver" => PeerSpec::KubeApiserver,
            _ => {
                if let Some(ip) = s.strip_prefix("cidr:") {
                    let ip = ip.split('/').next().unwrap_or(ip);
                    PeerSpec::Cidr(
                        ip.parse()
                            .map_err(|_| format!("`{s}`: `{ip}` is not an IP address"))?,
                    )
                } else if let Some(name) = s.strip_prefix("fqdn:") {
                    if name.is_empty() {
                        return Err(format!("`{s}`: empty name"));
                    }
                    PeerSpec::Fqdn(name.to_string())
                } else if s.is_empty() {
                    return Err("empty peer".to_string());
                } else {
                    PeerSpec::Endpoint(s.to_string())
                }
            }
        })
    }
}

/// The outcome of a whole-path check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckResult {
    pub decision: Decision,
    /// The verdict that decided (the denying one, else the most specific allow).
    pub deciding: Verdict,
    pub egress: Option<Verdict>,
    pub ingress: Option<Verdict>,
}

enum Side<'a> {
    Managed(&'a Endpoint),
    Unmanaged(Remote),
}

fn resolve<'a>(inv: &'a Inventory, p: &PeerSpec) -> Result<Side<'a>, String> {
    Ok(match p {
        PeerSpec::Endpoint(name) => Side::Managed(
            inv.by_name(name)
                .ok_or_else(|| format!("unknown endpoint `{name}` (not in the endpoints list)"))?,
        ),
        PeerSpec::World => Side::Unmanaged(Remote::world(None, vec![])),
        PeerSpec::Host => Side::Unmanaged(Remote::reserved(RemoteKind::Host)),
        PeerSpec::RemoteNode => Side::Unmanaged(Remote::reserved(RemoteKind::RemoteNode)),
        PeerSpec::KubeApiserver => Side::Unmanaged(Remote::reserved(RemoteKind::KubeApiserver)),
        PeerSpec::Cidr(ip) => match inv.by_ip(*ip) {
            Some(ep) => Side::Managed(ep),
            None => Side::Unmanaged(Remote::world(Some(*ip), vec![])),
        },
        PeerSpec::Fqdn(name) => Side::Unmanaged(Remote::world(None, vec![name.clone()])),
    })
}

fn remote_of(side: &Side<'_>) -> Remote {
    match side {
        Side::Managed(ep) => Remote::endpoint(ep),
        Side::Unmanaged(r) => r.clone(),
    }
}

fn local_of<'a>(ep: &'a Endpoint, ports: &'a [(String, u16)]) -> Local<'a> {
    Local {
        labels: &ep.labels,
        is_host: false,
        named_ports: ports,
    }
}

/// Check a connection (and optionally one request on it) from `from` to `to`.
pub fn check(
    eval: &Evaluator,
    inv: &Inventory,
    from: &PeerSpec,
    to: &PeerSpec,
    port: u16,
    protocol: Protocol,
    request: Option<&L7Request<'_>>,
) -> Result<CheckResult, String> {
    let src = resolve(inv, from)?;
    let dst = resolve(inv, to)?;
    let egress = match &src {
        Side::Managed(ep) => {
            let ports = named_ports(ep);
            Some(eval.evaluate(
                &local_of(ep, &ports),
                Direction::Egress,
                &remote_of(&dst),
                port,
                protocol,
                request,
            ))
        }
        Side::Unmanaged(_) => None,
    };
    let ingress = match &dst {
        Side::Managed(ep) => {
            let ports = named_ports(ep);
            Some(eval.evaluate(
                &local_of(ep, &ports),
                Direction::Ingress,
                &remote_of(&src),
                port,
                protocol,
                request,
            ))
        }
        // The host itself is checked with host (nodeSelector) policies.
        Side::Unmanaged(r) if r.kind == RemoteKind::Host => {
            let labels = r.labels.clone();
            Some(host_ingress(
                eval,
                &labels,
                &remote_of(&src),
                port,
                protocol,
                request,
            ))
        }
        Side::Unmanaged(_) => None,
    };
    let deciding = combine(egress.as_ref(), ingress.as_ref());
    Ok(CheckResult {
        decision: deciding.decision,
        deciding,
        egress,
        ingress,
    })
}

/// The verdict that decides a path from the source's egress and the destination's ingress
/// verdicts: the denying one, else an audit denial, else the most specific allow (an L7 rule
/// beats an L4 entry beats no policy; on a tie the destination's ingress wins).
pub fn combine(egress: Option<&Verdict>, ingress: Option<&Verdict>) -> Verdict {
    let verdicts: Vec<&Verdict> = egress.into_iter().chain(ingress).collect();
    verdicts
        .iter()
        .find(|v| v.decision == Decision::Deny)
        .or_else(|| verdicts.iter().find(|v| v.decision == Decision::AuditDeny))
        .or_else(|| verdicts.iter().rev().max_by_key(|v| allow_rank(v.reason)))
        .map(|v| (*v).clone())
        .unwrap_or_else(|| Verdict {
            decision: Decision::Allow,
            reason: Reason::NotEnforced,
            direction: Direction::Ingress,
            policy: None,
            rule: None,
            enforcement: crate::api::Enforcement::Enforce,
            log: None,
            denied_topics: vec![],
            detail: None,
            header_edits: vec![],
        })
}

fn allow_rank(r: Reason) -> u8 {
    match r {
        Reason::L7Allow => 3,
        Reason::L4Allow => 2,
        Reason::DefaultAllow => 1,
        _ => 0,
    }
}

fn host_ingress(
    eval: &Evaluator,
    labels: &LabelSet,
    remote: &Remote,
    port: u16,
    protocol: Protocol,
    request: Option<&L7Request<'_>>,
) -> Verdict {
    let local = Local {
        labels,
        is_host: true,
        named_ports: &[],
    };
    eval.evaluate(&local, Direction::Ingress, remote, port, protocol, request)
}

fn named_ports(ep: &Endpoint) -> Vec<(String, u16)> {
    ep.spec.ports.iter().map(|(k, v)| (k.clone(), *v)).collect()
}
