//! Endpoints (pods, or "pods" on a plain host) and numeric identities.
//!
//! An endpoint inventory file lists the workloads tollgate protects when there is no
//! Kubernetes API (directory mode, tests, `tollgate eval`):
//!
//! ```yaml
//! endpoints:
//!   - {name: frontend, namespace: prod, labels: {app: frontend}, ips: [10.0.0.1]}
//!   - {name: api, namespace: prod, labels: {app: api}, ips: [10.0.0.2], ports: {http: 8080}}
//! namespaces:                       # optional: namespace labels for namespace selectors
//!   - {name: prod, labels: {env: prod}}
//! ```
//!
//! A bare list of endpoints is accepted too. Identities are numbers for label sets; reserved
//! identities keep Cilium's numbers, others are allocated from 256 upwards in order of first
//! sight, so the same inventory always yields the same numbers. An endpoint may give its number
//! (`identity: 300`, as the Kubernetes source's rendered inventory does with the cluster-wide
//! numbers, [`Inventory::to_document`]) and the node it runs on (`node:`).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::labels::{Label, LabelSet, pod_labels};

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    /// Named container ports (`http: 8080`) for named-port rules.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The endpoint's host-side network interface (its veth), where the datapath attaches;
    /// for `tollgate up` on a host without Kubernetes, or a pod's `tollgate.io/interface`
    /// annotation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The node the endpoint runs on (a pod's `spec.nodeName`): `tollgate up --kubernetes`
    /// attaches to its own node's endpoints only; the others are remote identities.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The endpoint's identity number, when it is given rather than allocated here (the
    /// cluster-wide number of the Kubernetes source). Endpoints with the same labels must give
    /// the same number, and a number stands for one label set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<u32>,
}

fn default_namespace() -> String {
    "default".to_string()
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct InventoryFile {
    #[serde(default)]
    endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    namespaces: Vec<NamespaceSpec>,
    #[serde(rename = "apiVersion")]
    _api_version: Option<String>,
    #[serde(rename = "kind")]
    _kind: Option<String>,
}

/// Reserved identities (Cilium's numbers).
pub mod reserved {
    pub const HOST: u32 = 1;
    pub const WORLD: u32 = 2;
    pub const UNMANAGED: u32 = 3;
    pub const HEALTH: u32 = 4;
    pub const INIT: u32 = 5;
    pub const REMOTE_NODE: u32 = 6;
    pub const KUBE_APISERVER: u32 = 7;
    pub const INGRESS: u32 = 8;
    /// First identity allocated for label sets.
    pub const FIRST_LOCAL: u32 = 256;
}

/// An endpoint with its derived labels and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub spec: EndpointSpec,
    pub labels: LabelSet,
    pub identity: u32,
}

/// Label set → identity allocation, stable for a given order of first sight.
#[derive(Debug, Clone, Default)]
pub struct IdentityAllocator {
    by_labels: HashMap<LabelSet, u32>,
    /// Numbers given with [`IdentityAllocator::reserve`], never allocated.
    given: HashMap<u32, LabelSet>,
    next: u32,
}

impl IdentityAllocator {
    pub fn allocate(&mut self, labels: &LabelSet) -> u32 {
        if let Some(id) = self.by_labels.get(labels) {
            return *id;
        }
        if self.next < reserved::FIRST_LOCAL {
            self.next = reserved::FIRST_LOCAL;
        }
        while self.given.contains_key(&self.next) {
            self.next += 1;
        }
        let id = self.next;
        self.next += 1;
        self.by_labels.insert(labels.clone(), id);
        id
    }

    /// Give `labels` the number `id` (allocated elsewhere); an error when either already has
    /// another.
    pub fn reserve(&mut self, labels: &LabelSet, id: u32) -> Result<(), String> {
        if let Some(other) = self.by_labels.get(labels).filter(|o| **o != id) {
            return Err(format!(
                "identity {id} given to labels that have identity {other}"
            ));
        }
        if let Some(other) = self.given.get(&id).filter(|o| *o != labels) {
            return Err(format!(
                "identity {id} given to two label sets ({other} and {labels})"
            ));
        }
        self.by_labels.insert(labels.clone(), id);
        self.given.insert(id, labels.clone());
        Ok(())
    }
}

/// The endpoints tollgate knows, with lookups by name and by IP.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub endpoints: Vec<Endpoint>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    by_ip: HashMap<IpAddr, usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("{0}")]
    Yaml(#[from] crate::yaml::YamlError),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Inventory {
    /// Parse an inventory document (see the module docs).
    pub fn from_yaml(src: &str) -> Result<Inventory, InventoryError> {
        let docs = crate::yaml::parse_documents(src)?;
        let mut file = InventoryFile::default();
        for doc in docs {
            let part: InventoryFile = if doc.value.is_array() {
                let endpoints = from_value_at(&doc, doc.value.clone())?;
                InventoryFile {
                    endpoints,
                    ..Default::default()
                }
            } else {
                from_value_at(&doc, doc.value.clone())?
            };
            file.endpoints.extend(part.endpoints);
            file.namespaces.extend(part.namespaces);
        }
        Inventory::new(file.endpoints, file.namespaces).map_err(|message| InventoryError::Invalid {
            path: "endpoints".to_string(),
            message,
        })
    }

    pub fn new(specs: Vec<EndpointSpec>, namespaces: Vec<NamespaceSpec>) -> Result<Self, String> {
        let mut inv = Inventory {
            namespaces: namespaces.into_iter().map(|n| (n.name, n.labels)).collect(),
            ..Default::default()
        };
        let mut alloc = IdentityAllocator::default();
        let empty = BTreeMap::new();
        let labelled: Vec<(EndpointSpec, LabelSet)> = specs
            .into_iter()
            .map(|spec| {
                let ns_labels = inv.namespaces.get(&spec.namespace).unwrap_or(&empty);
                let labels = pod_labels(
                    &spec.namespace,
                    &spec.labels,
                    ns_labels,
                    spec.service_account.as_deref(),
                );
                (spec, labels)
            })
            .collect();
        // Given numbers first, so that none is allocated to another label set.
        for (spec, labels) in &labelled {
            if let Some(id) = spec.identity {
                alloc
                    .reserve(labels, id)
                    .map_err(|e| format!("`{}/{}`: {e}", spec.namespace, spec.name))?;
            }
        }
        for (spec, labels) in labelled {
            // Names are unique per namespace (as pods are): `db-0` may exist in two namespaces.
            if inv
                .endpoints
                .iter()
                .any(|e| e.spec.name == spec.name && e.spec.namespace == spec.namespace)
            {
                return Err(format!(
                    "duplicate endpoint name `{}` in namespace `{}`",
                    spec.name, spec.namespace
                ));
            }
            let identity = alloc.allocate(&labels);
            let idx = inv.endpoints.len();
            for ip in &spec.ips {
                if let Some(other) = inv.by_ip.insert(*ip, idx) {
                    return Err(format!(
                        "IP {ip} is used by both `{}` and `{}`",
                        inv.endpoints[other].spec.name, spec.name
                    ));
                }
            }
            inv.endpoints.push(Endpoint {
                spec,
                labels,
                identity,
            });
        }
        Ok(inv)
    }

    /// The endpoint called `name`, or `namespace/name` (the first of that name when it is
    /// used in several namespaces and no namespace is given).
    pub fn by_name(&self, name: &str) -> Option<&Endpoint> {
        if let Some(e) = self.endpoints.iter().find(|e| e.spec.name == name) {
            return Some(e);
        }
        let (ns, name) = name.split_once('/')?;
        self.endpoints
            .iter()
            .find(|e| e.spec.name == name && e.spec.namespace == ns)
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<&Endpoint> {
        self.by_ip.get(&ip).map(|i| &self.endpoints[*i])
    }

    /// The namespaces with their labels.
    pub fn namespaces(&self) -> impl Iterator<Item = (&str, &BTreeMap<String, String>)> {
        self.namespaces.iter().map(|(n, l)| (n.as_str(), l))
    }

    /// This inventory in the inventory file format (JSON, which is YAML), every endpoint with
    /// its identity: [`Inventory::from_yaml`] of it gives the same endpoints, labels and
    /// identities. How the Kubernetes source hands its inventory to a separate proxy.
    pub fn to_document(&self) -> String {
        #[derive(Serialize)]
        struct Doc<'a> {
            endpoints: Vec<EndpointSpec>,
            namespaces: Vec<NamespaceRef<'a>>,
        }
        #[derive(Serialize)]
        struct NamespaceRef<'a> {
            name: &'a str,
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            labels: &'a BTreeMap<String, String>,
        }
        let doc = Doc {
            endpoints: self
                .endpoints
                .iter()
                .map(|e| EndpointSpec {
                    identity: Some(e.identity),
                    ..e.spec.clone()
                })
                .collect(),
            namespaces: self
                .namespaces()
                .map(|(name, labels)| NamespaceRef { name, labels })
                .collect(),
        };
        serde_json::to_string(&doc).unwrap_or_default()
    }
}

fn from_value_at<T: serde::de::DeserializeOwned>(
    doc: &crate::yaml::Document,
    v: serde_json::Value,
) -> Result<T, InventoryError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        InventoryError::Invalid {
            message: format!("line {}: {}", doc.line_of(&path), e.inner()),
            path,
        }
    })
}

/// The labels of a reserved peer (`host`, `world`, …).
pub fn reserved_labels(name: &str) -> LabelSet {
    LabelSet::new(vec![Label::new("reserved", name, "")])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_allocates_stable_identities_and_indexes_ips() {
        let inv = Inventory::from_yaml(
            "endpoints:\n- {name: a, namespace: prod, labels: {app: x}, ips: [10.0.0.1]}\n- {name: b, namespace: prod, labels: {app: x}, ips: [10.0.0.2]}\n- {name: c, labels: {app: y}}\n",
        )
        .unwrap();
        assert_eq!(inv.by_name("a").unwrap().identity, 256);
        assert_eq!(
            inv.by_name("b").unwrap().identity,
            256,
            "same labels, same identity"
        );
        assert_eq!(inv.by_name("c").unwrap().identity, 257);
        assert_eq!(inv.by_name("c").unwrap().spec.namespace, "default");
        assert_eq!(
            inv.by_ip("10.0.0.2".parse().unwrap()).unwrap().spec.name,
            "b"
        );
    }

    #[test]
    fn bare_list_is_accepted_and_errors_name_the_field() {
        assert!(Inventory::from_yaml("- {name: a}\n").is_ok());
        let err = Inventory::from_yaml("endpoints:\n- {name: a, lables: {}}\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown field `lables`"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn names_are_unique_per_namespace() {
        let inv = Inventory::from_yaml(
            "- {name: db-0, namespace: a, labels: {app: x}}\n- {name: db-0, namespace: b, labels: {app: y}}\n",
        )
        .unwrap();
        assert_eq!(inv.by_name("b/db-0").unwrap().spec.labels["app"], "y");
        assert_eq!(inv.by_name("db-0").unwrap().spec.namespace, "a");
        let err =
            Inventory::from_yaml("- {name: db-0, namespace: a}\n- {name: db-0, namespace: a}\n")
                .unwrap_err();
        assert!(
            err.to_string()
                .contains("duplicate endpoint name `db-0` in namespace `a`")
        );
    }

    #[test]
    fn given_identities_are_kept_and_the_rendered_document_reads_back_the_same() {
        let inv = Inventory::from_yaml(
            "endpoints:\n- {name: a, namespace: prod, labels: {app: x}, ips: [10.0.0.1], identity: 256, node: n1}\n- {name: b, namespace: prod, labels: {app: y}, ips: ['fd00::2'], ports: {http: 8080}, serviceAccount: sa, interface: veth-b}\n- {name: c, namespace: prod, labels: {app: z}, identity: 4000}\nnamespaces:\n- {name: prod, labels: {env: prod}}\n",
        )
        .unwrap();
        assert_eq!(inv.by_name("a").unwrap().identity, 256);
        assert_eq!(
            inv.by_name("b").unwrap().identity,
            257,
            "an allocated number skips the given ones"
        );
        assert_eq!(inv.by_name("c").unwrap().identity, 4000);
        let doc = inv.to_document();
        let back = Inventory::from_yaml(&doc).unwrap();
        let view = |i: &Inventory| {
            i.endpoints
                .iter()
                .map(|e| (e.spec.clone(), e.labels.clone(), e.identity))
                .collect::<Vec<_>>()
        };
        let given: Vec<_> = view(&inv)
            .into_iter()
            .map(|(s, l, id)| {
                (
                    EndpointSpec {
                        identity: Some(id),
                        ..s
                    },
                    l,
                    id,
                )
            })
            .collect();
        assert_eq!(view(&back), given, "{doc}");
        assert_eq!(back.namespaces().count(), 1);
        assert_eq!(back.to_document(), doc, "rendering is stable");

        let err = Inventory::from_yaml(
            "- {name: a, labels: {app: x}, identity: 300}\n- {name: b, labels: {app: y}, identity: 300}\n",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("`default/b`: identity 300 given to two label sets"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_ips_are_rejected() {
        let err =
            Inventory::from_yaml("- {name: a, ips: [10.0.0.1]}\n- {name: b, ips: [10.0.0.1]}\n")
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "endpoints: IP 10.0.0.1 is used by both `a` and `b`"
        );
    }
}
