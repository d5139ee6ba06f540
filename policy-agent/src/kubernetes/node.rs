//! What one node enforces of a [`Snapshot`] (`tollgate up --kubernetes`), and the rule sets a
//! separate proxy is served from a snapshot.
//!
//! Every pod stays in the inventory: the pods of other nodes are the remote peers whose
//! identities and ipcache entries the datapath needs. The pods whose `spec.nodeName` is this
//! node are the local endpoints, and each needs its host-side interface, found the way a
//! CNI-agnostic node agent must: the kernel's route to the pod's IP ([`crate::route`]), unless
//! the pod names it in the `tollgate.io/interface` annotation. A local pod whose interface
//! cannot be found is not enforced, and said so with the reason ([`NodeView::not_enforced`]);
//! the caller looks again on the next change.

use std::collections::HashMap;
use std::net::IpAddr;

use tollgate_api::v1::RuleSet;
use tollgate_policy::endpoints::{Endpoint, EndpointSpec, Inventory};

use super::objects::INTERFACE_ANNOTATION;
use super::source::Snapshot;
use crate::route::{self, RTN_LOCAL, RTN_UNICAST};

/// The name of the inventory's rule set when it comes from the Kubernetes source.
pub const INVENTORY_RULE_SET: &str = "Kubernetes Pods and Namespaces";

/// The rule sets of `snap`: each policy object its own rule set named `Kind ns/name` with the
/// document the agent loaded, and the inventory in the inventory file format with the
/// cluster's identity numbers ([`Inventory::to_document`]), so that a proxy fed by them
/// (`tollgate proxy --agent SOCK`) loads exactly what the agent compiled.
pub fn rule_sets(snap: &Snapshot) -> Vec<RuleSet> {
    let inventory = snap.inventory.to_document();
    crate::rulesets::rule_sets(
        snap.documents.iter().map(|(n, t)| (n.as_str(), &**t)),
        (INVENTORY_RULE_SET, inventory.as_str()),
    )
}

/// A snapshot's inventory as one node sees it.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    /// Every endpoint; this node's enforced ones have their interface set, every other
    /// endpoint has none.
    pub inventory: Inventory,
    /// `namespace/name → interface` of this node's enforced endpoints.
    pub attached: Vec<(String, String)>,
    /// This node's pods that are not enforced, one line each: `Pod ns/name: reason`.
    pub not_enforced: Vec<String>,
}

/// Whether the datapath attaches to `ep` on `node`: one of the node's pods whose interface
/// was found (the endpoints of a [`NodeView`] inventory).
pub fn attached_here(node: &str, ep: &Endpoint) -> bool {
    ep.spec.node.as_deref() == Some(node) && ep.spec.interface.is_some()
}

/// The view of `inventory` from `node`, finding each local pod's interface with `resolve`
/// ([`interface_of`] on a real node). Two local pods whose interface is the same (the route to
/// both leads to one bridge, say) are both left out: one interface carries one endpoint.
pub fn view(
    inventory: &Inventory,
    node: &str,
    resolve: &mut dyn FnMut(&EndpointSpec) -> Result<String, String>,
) -> NodeView {
    let mut out = NodeView {
        inventory: inventory.clone(),
        ..NodeView::default()
    };
    let mut found: Vec<(usize, String)> = Vec::new();
    for (i, ep) in out.inventory.endpoints.iter_mut().enumerate() {
        let here = ep.spec.node.as_deref() == Some(node);
        let interface = ep.spec.interface.take();
        if !here {
            continue;
        }
        let spec = EndpointSpec {
            interface,
            ..ep.spec.clone()
        };
        match resolve(&spec) {
            Ok(ifname) => found.push((i, ifname)),
            Err(why) => out
                .not_enforced
                .push(format!("Pod {}/{}: {why}", ep.spec.namespace, ep.spec.name)),
        }
    }
    let mut by_interface: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, ifname) in &found {
        by_interface.entry(ifname.as_str()).or_default().push(*i);
    }
    let who = |i: usize| {
        let s = &inventory.endpoints[i].spec;
        format!("{}/{}", s.namespace, s.name)
    };
    for (i, ifname) in &found {
        let sharing = &by_interface[ifname.as_str()];
        if sharing.len() > 1 {
            let others: Vec<String> = sharing
                .iter()
                .filter(|o| *o != i)
                .map(|o| format!("Pod {}", who(*o)))
                .collect();
            out.not_enforced.push(format!(
                "Pod {}: its interface {ifname} is also that of {} (a bridge?); give each pod \
                 its own with the {INTERFACE_ANNOTATION} annotation",
                who(*i),
                others.join(", ")
            ));
            continue;
        }
        out.inventory.endpoints[*i].spec.interface = Some(ifname.clone());
        out.attached.push((who(*i), ifname.clone()));
    }
    out
}

/// The host-side interface of a local pod, in the calling thread's network namespace: the
/// `tollgate.io/interface` annotation's (which must exist), else the output interface of the
/// kernel's route to each of its IPs (they must agree), which must be a route on the link (no
/// gateway) and not one of this host's own addresses.
pub fn interface_of(spec: &EndpointSpec) -> Result<String, String> {
    if let Some(ifname) = &spec.interface {
        return match route::ifindex(ifname) {
            Some(_) => Ok(ifname.clone()),
            None => Err(format!(
                "its {INTERFACE_ANNOTATION} annotation names {ifname}, which does not exist on \
                 this node"
            )),
        };
    }
    let mut found: Option<(IpAddr, String)> = None;
    for ip in &spec.ips {
        let r = route::route_to(*ip)
            .map_err(|e| format!("no route to its IP {ip} on this node ({e})"))?;
        if r.kind == RTN_LOCAL {
            return Err(format!(
                "its IP {ip} is an address of this node, not of a pod interface"
            ));
        }
        if r.kind != RTN_UNICAST {
            return Err(format!(
                "the route to its IP {ip} is not a unicast route (type {})",
                r.kind
            ));
        }
        if let Some(gw) = r.gateway {
            return Err(format!(
                "the route to its IP {ip} goes via {gw} on {}, not to a pod interface on this \
                 node",
                r.ifname
            ));
        }
        if r.ifname == "lo" {
            return Err(format!("the route to its IP {ip} is through lo"));
        }
        if let Some((first, ifname)) = found.as_ref()
            && *ifname != r.ifname
        {
            return Err(format!(
                "the routes to its IPs lead to different interfaces ({first} via {ifname}, \
                 {ip} via {})",
                r.ifname
            ));
        }
        if found.is_none() {
            found = Some((*ip, r.ifname));
        }
    }
    found
        .map(|(_, ifname)| ifname)
        .ok_or_else(|| "it has no IP".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory() -> Inventory {
        Inventory::from_yaml(
            "endpoints:
- {name: a, namespace: prod, labels: {app: a}, ips: [10.0.0.1], node: n1}
- {name: b, namespace: prod, labels: {app: b}, ips: [10.0.0.2], node: n2, interface: veth-b}
- {name: c, namespace: prod, labels: {app: c}, ips: [10.0.0.3], node: n1, interface: veth-c}
- {name: d, namespace: prod, labels: {app: d}, ips: [10.0.0.4], node: n1}
- {name: e, namespace: prod, labels: {app: d}, ips: [10.0.0.5], node: n1}
- {name: f, namespace: prod, labels: {app: d}, ips: [10.0.0.6], node: n1}
- {name: g, namespace: prod, labels: {app: g}, ips: [10.0.0.7]}
",
        )
        .unwrap()
    }

    #[test]
    fn only_this_nodes_pods_are_attached_and_each_one_left_out_is_reported() {
        let inv = inventory();
        let mut asked = Vec::new();
        let v = view(&inv, "n1", &mut |spec: &EndpointSpec| {
            asked.push(spec.name.clone());
            match spec.name.as_str() {
                "a" => Ok("veth-a".into()),
                // The annotation reaches the resolver.
                "c" => Ok(spec.interface.clone().unwrap()),
                "d" => Err("no route to its IP 10.0.0.4 on this node (unreachable)".into()),
                _ => Ok("cni0".into()),
            }
        });
        assert_eq!(asked, ["a", "c", "d", "e", "f"], "n1's pods only");
        assert_eq!(
            v.attached,
            [
                ("prod/a".to_string(), "veth-a".to_string()),
                ("prod/c".into(), "veth-c".into())
            ]
        );
        assert_eq!(
            v.not_enforced,
            [
                "Pod prod/d: no route to its IP 10.0.0.4 on this node (unreachable)",
                "Pod prod/e: its interface cni0 is also that of Pod prod/f (a bridge?); give each \
                 pod its own with the tollgate.io/interface annotation",
                "Pod prod/f: its interface cni0 is also that of Pod prod/e (a bridge?); give each \
                 pod its own with the tollgate.io/interface annotation",
            ]
        );
        // Every pod is still a known peer with its identity; only the attached ones have an
        // interface, and only they are this node's endpoints.
        assert_eq!(v.inventory.endpoints.len(), inv.endpoints.len());
        for (mine, theirs) in v.inventory.endpoints.iter().zip(&inv.endpoints) {
            assert_eq!(
                (mine.identity, &mine.labels),
                (theirs.identity, &theirs.labels)
            );
        }
        let here: Vec<&str> = v
            .inventory
            .endpoints
            .iter()
            .filter(|e| attached_here("n1", e))
            .map(|e| e.spec.name.as_str())
            .collect();
        assert_eq!(here, ["a", "c"]);
        assert!(
            v.inventory.by_name("b").unwrap().spec.interface.is_none(),
            "another node's annotation is not ours"
        );
        assert_eq!(
            v.inventory
                .by_ip("10.0.0.5".parse().unwrap())
                .unwrap()
                .spec
                .name,
            "e"
        );
    }

    #[test]
    fn an_annotation_naming_no_interface_and_a_pod_without_a_route_are_refused_with_the_reason() {
        let spec = EndpointSpec {
            name: "x".into(),
            interface: Some("tg-no-such-if0".into()),
            ..Default::default()
        };
        assert_eq!(
            interface_of(&spec).unwrap_err(),
            "its tollgate.io/interface annotation names tg-no-such-if0, which does not exist on \
             this node"
        );
        let lo = EndpointSpec {
            name: "y".into(),
            ips: vec!["127.0.0.1".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(
            interface_of(&lo).unwrap_err(),
            "its IP 127.0.0.1 is an address of this node, not of a pod interface"
        );
        let none = EndpointSpec {
            name: "z".into(),
            ..Default::default()
        };
        assert_eq!(interface_of(&none).unwrap_err(), "it has no IP");
    }
}
