//! From Kubernetes objects to exactly the inputs directory mode uses: policy documents for
//! [`PolicySet`] and endpoint specs for [`Inventory`]. Pure functions, no I/O.
//!
//! Each policy object is loaded as its own "file" named after the object
//! (`CiliumNetworkPolicy prod/api`, `CiliumClusterwideNetworkPolicy base`), so every diagnostic
//! names the object and the rule path; [`describe`] prints them without the (meaningless)
//! line number. The document given to the loader is the object's `apiVersion`/`kind` (from the
//! watched resource), `metadata.name`/`namespace`/`annotations`, and every other top-level field
//! as it came (`spec`, `specs`, and anything unknown, which the loader rejects by name).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ApiResource, DynamicObject};
use serde_json::{Map, Value};
use tollgate_policy::endpoints::{EndpointSpec, Inventory, NamespaceSpec};
use tollgate_policy::load::{Diagnostic, PolicySet};
use tollgate_policy::model::{CompiledRule, PolicyMeta};

/// A policy kind the agent watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKind {
    pub kind: &'static str,
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
}

pub const CILIUM_NETWORK_POLICY: PolicyKind = PolicyKind {
    kind: "CiliumNetworkPolicy",
    group: "cilium.io",
    version: "v2",
    plural: "ciliumnetworkpolicies",
    namespaced: true,
};
pub const CILIUM_CLUSTERWIDE_NETWORK_POLICY: PolicyKind = PolicyKind {
    kind: "CiliumClusterwideNetworkPolicy",
    group: "cilium.io",
    version: "v2",
    plural: "ciliumclusterwidenetworkpolicies",
    namespaced: false,
};
pub const NETWORK_POLICY: PolicyKind = PolicyKind {
    kind: "NetworkPolicy",
    group: "networking.k8s.io",
    version: "v1",
    plural: "networkpolicies",
    namespaced: true,
};
pub const TOLLGATE_POLICY: PolicyKind = PolicyKind {
    kind: "TollgatePolicy",
    group: "tollgate.io",
    version: "v1alpha1",
    plural: "tollgatepolicies",
    namespaced: true,
};

/// Every policy kind, in load order.
pub const POLICY_KINDS: [PolicyKind; 4] = [
    CILIUM_NETWORK_POLICY,
    CILIUM_CLUSTERWIDE_NETWORK_POLICY,
    NETWORK_POLICY,
    TOLLGATE_POLICY,
];

impl PolicyKind {
    pub fn api_version(&self) -> String {
        format!("{}/{}", self.group, self.version)
    }

    pub fn api_resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.to_string(),
            version: self.version.to_string(),
            api_version: self.api_version(),
            kind: self.kind.to_string(),
            plural: self.plural.to_string(),
        }
    }

    /// `CiliumNetworkPolicy prod/api`, `CiliumClusterwideNetworkPolicy base`: the "file" of
    /// the object's diagnostics.
    pub fn source_name(&self, obj: &DynamicObject) -> String {
        self.source_name_of(
            obj.metadata.namespace.as_deref(),
            obj.metadata.name.as_deref().unwrap_or(""),
        )
    }

    /// [`PolicyKind::source_name`] of the object `namespace`/`name`.
    pub fn source_name_of(&self, namespace: Option<&str>, name: &str) -> String {
        match (namespace, self.namespaced) {
            (Some(ns), true) => format!("{} {ns}/{name}", self.kind),
            _ => format!("{} {name}", self.kind),
        }
    }
}

/// The prefix of the annotations given to the loader.
pub const TOLLGATE_ANNOTATIONS: &str = "tollgate.io/";

/// The document the loader reads for `obj` (see the module docs).
pub fn policy_document(kind: &PolicyKind, obj: &DynamicObject) -> Value {
    let mut doc = Map::new();
    doc.insert("apiVersion".into(), Value::String(kind.api_version()));
    doc.insert("kind".into(), Value::String(kind.kind.into()));
    let mut meta = Map::new();
    if let Some(n) = &obj.metadata.name {
        meta.insert("name".into(), Value::String(n.clone()));
    }
    if let Some(ns) = &obj.metadata.namespace {
        meta.insert("namespace".into(), Value::String(ns.clone()));
    }
    // Only our own annotations mean anything to the loader (`tollgate.io/enforcement`); the
    // others (kubectl's last-applied-configuration is a whole copy of the object) are left out.
    if let Some(a) = &obj.metadata.annotations {
        let ours: BTreeMap<&String, &String> = a
            .iter()
            .filter(|(k, _)| k.starts_with(TOLLGATE_ANNOTATIONS))
            .collect();
        if !ours.is_empty() {
            meta.insert(
                "annotations".into(),
                serde_json::to_value(ours).unwrap_or_default(),
            );
        }
    }
    doc.insert("metadata".into(), Value::Object(meta));
    if let Value::Object(data) = &obj.data {
        for (k, v) in data {
            // `status` is the server's (and ours), not policy.
            if !["apiVersion", "kind", "metadata", "status"].contains(&k.as_str()) {
                doc.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(doc)
}

/// [`policy_document`] as the text the loader reads: JSON is YAML, so the loader's own parser
/// reads it and kube objects and files take the same path through validation.
pub fn document_text(kind: &PolicyKind, obj: &DynamicObject) -> String {
    serde_json::to_string_pretty(&policy_document(kind, obj)).unwrap_or_default()
}

/// A pod annotation naming the pod's host-side interface, for a node where the route to the
/// pod's IP does not lead to it (a bridge CNI, say): `tollgate up --kubernetes` attaches there
/// instead of where the route goes (see `super::node`).
pub const INTERFACE_ANNOTATION: &str = "tollgate.io/interface";

/// What the agent reads of a pod ([`endpoint_of`], [`build_inventory`]): everything else is
/// dropped before the reflector stores it (`managedFields`, annotations, container images,
/// env, volumes, conditions, container statuses…).
pub fn strip_pod(pod: &mut Pod) {
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus};
    let m = &mut pod.metadata;
    m.managed_fields = None;
    m.annotations = m
        .annotations
        .take()
        .and_then(|mut a| a.remove_entry(INTERFACE_ANNOTATION))
        .map(|kv| BTreeMap::from([kv]));
    m.owner_references = None;
    if let Some(spec) = &mut pod.spec {
        *spec = PodSpec {
            containers: std::mem::take(&mut spec.containers)
                .into_iter()
                .map(|c| Container {
                    name: c.name,
                    ports: c.ports,
                    ..Default::default()
                })
                .collect(),
            host_network: spec.host_network,
            node_name: spec.node_name.take(),
            service_account_name: spec.service_account_name.take(),
            ..Default::default()
        };
    }
    if let Some(st) = &mut pod.status {
        *st = PodStatus {
            phase: st.phase.take(),
            pod_ip: st.pod_ip.take(),
            pod_ips: st.pod_ips.take(),
            ..Default::default()
        };
    }
}

/// What the agent reads of a namespace: its name and labels.
pub fn strip_namespace(ns: &mut Namespace) {
    let m = &mut ns.metadata;
    m.managed_fields = None;
    m.annotations = None;
    m.owner_references = None;
    ns.spec = None;
    ns.status = None;
}

/// The loader's input for `objects`: (source name, document text), in a stable order (so the
/// same objects always give the same rule order).
pub fn policy_sources<'a>(
    objects: impl IntoIterator<Item = (PolicyKind, &'a DynamicObject)>,
) -> Vec<(String, String)> {
    let mut objects: Vec<(PolicyKind, &DynamicObject)> = objects.into_iter().collect();
    objects.sort_by_key(|(k, o)| (*k, o.metadata.namespace.clone(), o.metadata.name.clone()));
    objects
        .into_iter()
        .map(|(kind, obj)| (kind.source_name(obj), document_text(&kind, obj)))
        .collect()
}

/// Load `sources` (from [`policy_sources`]) into one policy set, each as its own "file".
pub fn load_sources(sources: &[(String, String)]) -> PolicySet {
    let mut set = PolicySet::default();
    for (name, text) in sources {
        set.load_str(name, text);
    }
    set
}

/// The loaded policy objects, reloaded only where they changed: each object's document text and
/// loaded set are kept with its resourceVersion, so after one object changed only that object
/// is serialised, parsed and validated again. (Kubernetes names are unique per kind and
/// namespace, so the per-object sets never clash.)
#[derive(Debug, Default)]
pub struct PolicyCache {
    by_object: BTreeMap<(PolicyKind, Option<String>, Option<String>), Cached>,
    /// Of the last full refresh ([`PolicyCache::refresh_documents`], [`PolicyCache::replace_kind`]):
    /// entries it did not see are dropped.
    generation: u64,
}

#[derive(Debug)]
struct Cached {
    resource_version: Option<String>,
    /// Shared with the store's copy ([`super::source::StoredPolicy`]).
    text: Arc<str>,
    /// FNV-1a of `text`.
    hash: u64,
    set: Loaded,
    /// The last refresh that saw the object.
    seen: u64,
}

/// One object's part of a [`PolicySet`], without the set's duplicate index and spare
/// capacity (10,000 objects each had their own).
#[derive(Debug)]
struct Loaded {
    rules: Box<[CompiledRule]>,
    policies: Box<[Arc<PolicyMeta>]>,
    diagnostics: Box<[Diagnostic]>,
    skipped: Box<[String]>,
}

impl From<PolicySet> for Loaded {
    fn from(set: PolicySet) -> Loaded {
        Loaded {
            rules: set.rules.into_boxed_slice(),
            policies: set.policies.into_boxed_slice(),
            diagnostics: set.diagnostics.into_boxed_slice(),
            skipped: set.skipped.into_boxed_slice(),
        }
    }
}

fn fnv(bytes: impl IntoIterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

type CacheKey = (PolicyKind, Option<String>, Option<String>);

fn cache_key(kind: PolicyKind, obj: &DynamicObject) -> CacheKey {
    (
        kind,
        obj.metadata.namespace.clone(),
        obj.metadata.name.clone(),
    )
}

impl PolicyCache {
    /// Bring the cache to `objects` (the complete current set); returns a fingerprint of the
    /// documents, equal for equal inputs (a status-only change leaves it as it was).
    pub fn refresh<'a>(
        &mut self,
        objects: impl IntoIterator<Item = (PolicyKind, &'a DynamicObject)>,
    ) -> u64 {
        let objects: Vec<(PolicyKind, &DynamicObject, Arc<str>)> = objects
            .into_iter()
            .map(|(k, o)| (k, o, document_text(&k, o).into()))
            .collect();
        self.refresh_documents(objects.iter().map(|(k, o, t)| (*k, *o, t)))
    }

    /// [`PolicyCache::refresh`] with each object's [`document_text`] given (the object itself
    /// is read for its name, namespace and resourceVersion only).
    pub fn refresh_documents<'a>(
        &mut self,
        objects: impl IntoIterator<Item = (PolicyKind, &'a DynamicObject, &'a Arc<str>)>,
    ) -> u64 {
        let generation = self.next_generation();
        for (kind, obj, text) in objects {
            self.upsert(kind, obj, text);
        }
        self.by_object.retain(|_, c| c.seen == generation);
        self.fingerprint()
    }

    /// Every object of `kind` is in `objects` (a relist): others of that kind are dropped.
    pub fn replace_kind<'a>(
        &mut self,
        kind: PolicyKind,
        objects: impl IntoIterator<Item = (&'a DynamicObject, &'a Arc<str>)>,
    ) {
        let generation = self.next_generation();
        for (obj, text) in objects {
            self.upsert(kind, obj, text);
        }
        self.by_object
            .retain(|(k, ..), c| *k != kind || c.seen == generation);
    }

    /// One object was added or changed (kept as it was when only its status changed).
    pub fn upsert(&mut self, kind: PolicyKind, obj: &DynamicObject, text: &Arc<str>) {
        let generation = self.generation;
        let rv = &obj.metadata.resource_version;
        match self.by_object.get_mut(&cache_key(kind, obj)) {
            // The same object, or (a status-only change) the same document: keep what was
            // loaded, and take the store's copy of the text so only one is kept.
            Some(c)
                if (c.resource_version.is_some() && c.resource_version == *rv)
                    || *c.text == **text =>
            {
                c.resource_version.clone_from(rv);
                c.text = text.clone();
                c.seen = generation;
            }
            _ => {
                let name = kind.source_name(obj);
                let set = load_sources(&[(name, text.to_string())]).into();
                self.by_object.insert(
                    cache_key(kind, obj),
                    Cached {
                        resource_version: rv.clone(),
                        hash: fnv(text.bytes(), FNV_OFFSET),
                        text: text.clone(),
                        set,
                        seen: generation,
                    },
                );
            }
        }
    }

    /// One object of `kind` was deleted.
    pub fn remove(&mut self, kind: PolicyKind, namespace: Option<String>, name: Option<String>) {
        self.by_object.remove(&(kind, namespace, name));
    }

    /// A fingerprint of the documents now in the cache (see [`PolicyCache::refresh`]).
    pub fn fingerprint(&self) -> u64 {
        self.by_object
            .values()
            .fold(FNV_OFFSET, |h, c| fnv(c.hash.to_le_bytes(), h))
    }

    fn next_generation(&mut self) -> u64 {
        self.generation = self.generation.wrapping_add(1);
        self.generation
    }

    /// Every object's source name (`Kind ns/name`) and document text, in the order of
    /// [`PolicyCache::policy_set`]: what the agent serves to proxies as rule sets.
    pub fn documents(&self) -> Vec<(String, Arc<str>)> {
        self.by_object
            .iter()
            .map(|((kind, ns, name), c)| {
                let source = kind.source_name_of(ns.as_deref(), name.as_deref().unwrap_or(""));
                (source, c.text.clone())
            })
            .collect()
    }

    /// Every object's rules, policies and problems, in a stable order.
    pub fn policy_set(&self) -> PolicySet {
        let mut out = PolicySet::default();
        let count = |f: fn(&Loaded) -> usize| self.by_object.values().map(|c| f(&c.set)).sum();
        out.rules.reserve_exact(count(|l| l.rules.len()));
        out.policies.reserve_exact(count(|l| l.policies.len()));
        for c in self.by_object.values() {
            out.rules.extend(c.set.rules.iter().cloned());
            out.policies.extend(c.set.policies.iter().cloned());
            out.diagnostics.extend(c.set.diagnostics.iter().cloned());
            out.skipped.extend(c.set.skipped.iter().cloned());
        }
        out
    }
}

/// [`load_sources`] of [`policy_sources`].
pub fn load_policies<'a>(
    objects: impl IntoIterator<Item = (PolicyKind, &'a DynamicObject)>,
) -> PolicySet {
    load_sources(&policy_sources(objects))
}

/// A diagnostic of a Kubernetes object: `CiliumNetworkPolicy ns/name: spec.ingress[0]…: reason`
/// (the line of the generated document means nothing to a user).
pub fn describe(d: &Diagnostic) -> String {
    if d.path.is_empty() {
        format!("{}: {}", d.file, d.message)
    } else {
        format!("{}: {}: {}", d.file, d.path, d.message)
    }
}

/// Pod labels that are not part of a pod's identity, as in Cilium's default label filter: they
/// change with every rollout (or name one pod), so they would give each pod generation its own
/// identity. Policies cannot select on them.
pub const IGNORED_POD_LABELS: [&str; 6] = [
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
];

/// Why a pod is not an endpoint (yet): reported with [`PodSkip::reason`], never silently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodSkip {
    /// Uses the node's network namespace: it is the host identity, not an endpoint.
    HostNetwork,
    /// Has no IP yet (pending) or any more (finished).
    NoIp,
    /// Succeeded or Failed: its IP may already belong to another pod.
    Finished,
}

/// The endpoint of a pod, or why it is none; `Err` for a pod the agent cannot read (an IP that
/// does not parse, a port out of range), naming the field.
pub fn endpoint_of(pod: &Pod) -> Result<Result<EndpointSpec, PodSkip>, String> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Ok(Err(PodSkip::HostNetwork));
    }
    let status = pod.status.as_ref();
    if let Some(phase) = status.and_then(|s| s.phase.as_deref())
        && (phase == "Succeeded" || phase == "Failed")
    {
        return Ok(Err(PodSkip::Finished));
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    let mut texts: Vec<(String, String)> = Vec::new();
    if let Some(s) = status {
        for (i, p) in s.pod_ips.iter().flatten().enumerate() {
            texts.push((format!("status.podIPs[{i}].ip"), p.ip.clone()));
        }
        if texts.is_empty()
            && let Some(ip) = &s.pod_ip
        {
            texts.push(("status.podIP".to_string(), ip.clone()));
        }
    }
    for (path, t) in texts {
        let ip: IpAddr = t
            .parse()
            .map_err(|_| format!("{path}: `{t}` is not an IP address"))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return Ok(Err(PodSkip::NoIp));
    }
    let labels: BTreeMap<String, String> = pod
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| !IGNORED_POD_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut ports = BTreeMap::new();
    for (ci, c) in spec
        .map(|s| s.containers.as_slice())
        .unwrap_or(&[])
        .iter()
        .enumerate()
    {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            let Some(pname) = &p.name else { continue };
            let port = u16::try_from(p.container_port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    format!(
                        "spec.containers[{ci}].ports[{pi}].containerPort: {} is not a port",
                        p.container_port
                    )
                })?;
            ports.insert(pname.clone(), port);
        }
    }
    let service_account = spec
        .and_then(|s| s.service_account_name.clone())
        .or_else(|| Some("default".to_string()));
    Ok(Ok(EndpointSpec {
        name,
        namespace,
        labels,
        ips,
        ports,
        service_account,
        interface: pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(INTERFACE_ANNOTATION))
            .filter(|i| !i.is_empty())
            .cloned(),
        node: spec.and_then(|s| s.node_name.clone()),
        identity: None,
    }))
}

impl PodSkip {
    pub fn reason(&self) -> &'static str {
        match self {
            PodSkip::HostNetwork => "uses the host network (it has the host identity)",
            PodSkip::NoIp => "has no IP yet",
            PodSkip::Finished => "has finished",
        }
    }
}

/// The inventory of `pods` and `namespaces`, and what was left out and why (one line per pod:
/// `Pod ns/name: reason`). Two pods claiming one IP (a terminating pod and its successor): the
/// one not being deleted keeps it, and the other is reported.
pub fn build_inventory<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    namespaces: impl IntoIterator<Item = &'a Namespace>,
) -> (Inventory, Vec<String>) {
    let mut notes = Vec::new();
    let (mut host_network, mut without_ip) = (0, 0);
    let mut specs: Vec<(bool, EndpointSpec)> = Vec::new();
    for pod in pods {
        let who = format!(
            "Pod {}/{}",
            pod.metadata.namespace.as_deref().unwrap_or("default"),
            pod.metadata.name.as_deref().unwrap_or("")
        );
        match endpoint_of(pod) {
            Ok(Ok(spec)) => specs.push((pod.metadata.deletion_timestamp.is_some(), spec)),
            Ok(Err(PodSkip::NoIp)) => without_ip += 1,
            Ok(Err(PodSkip::HostNetwork)) => host_network += 1,
            Ok(Err(skip)) => notes.push(format!("{who}: not an endpoint: {}", skip.reason())),
            Err(e) => notes.push(format!("{who}: {e} (not an endpoint)")),
        }
    }
    if without_ip + host_network > 0 {
        notes.push(format!(
            "{without_ip} pod(s) without an IP yet and {host_network} host-network pod(s) (host identity) are not endpoints"
        ));
    }
    // Live pods first, then by namespace/name: a stable order and a stable winner of an IP.
    specs.sort_by(|(da, a), (db, b)| (da, &a.namespace, &a.name).cmp(&(db, &b.namespace, &b.name)));
    let mut owner: HashMap<IpAddr, String> = HashMap::new();
    let mut kept = Vec::new();
    for (_, spec) in specs {
        let who = format!("{}/{}", spec.namespace, spec.name);
        if let Some(ip) = spec.ips.iter().find(|ip| owner.contains_key(ip)) {
            notes.push(format!(
                "Pod {who}: IP {ip} is also used by Pod {}; not an endpoint until one of them is gone",
                owner[ip]
            ));
            continue;
        }
        for ip in &spec.ips {
            owner.insert(*ip, who.clone());
        }
        kept.push(spec);
    }
    let ns: Vec<NamespaceSpec> = namespaces
        .into_iter()
        .filter_map(|n| {
            Some(NamespaceSpec {
                name: n.metadata.name.clone()?,
                labels: n.metadata.labels.clone().unwrap_or_default(),
            })
        })
        .collect();
    match Inventory::new(kept, ns) {
        Ok(inv) => (inv, notes),
        // Names are unique per namespace and IPs were deduplicated above; should the inventory
        // still refuse, say so and enforce for no pod rather than for a wrong set.
        Err(e) => {
            notes.push(format!("inventory: {e}; no pod is an endpoint"));
            (Inventory::default(), notes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn diagnostics_name_the_object_and_the_rule_path() {
        let cnp = obj(serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "api", "namespace": "prod", "uid": "u1", "resourceVersion": "7",
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "99999"}]}]}]},
        }));
        let set = load_policies([(CILIUM_NETWORK_POLICY, &cnp)]);
        assert_eq!(set.diagnostics.len(), 1, "{:?}", set.diagnostics);
        let line = describe(&set.diagnostics[0]);
        assert!(
            line.starts_with(
                "CiliumNetworkPolicy prod/api: spec.ingress[0].toPorts[0].ports[0].port: "
            ),
            "{line}"
        );
        // Server-side metadata (uid, managedFields…) is not a policy problem.
        assert!(!line.contains("managedFields"), "{line}");
    }

    #[test]
    fn the_cache_reloads_only_changed_objects_and_gives_what_a_full_load_gives() {
        let mk = |name: &str, port: &str, rv: &str| {
            obj(
                serde_json::json!({"metadata": {"name": name, "namespace": "n", "resourceVersion": rv},
                "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": port}]}]}]}}),
            )
        };
        let (a, b, b2) = (
            mk("a", "80", "1"),
            mk("b", "99999", "2"),
            mk("b", "81", "3"),
        );
        let mut cache = PolicyCache::default();
        let k = CILIUM_NETWORK_POLICY;
        let f1 = cache.refresh([(k, &a), (k, &b)]);
        let first = cache.policy_set();
        let full = load_policies([(k, &a), (k, &b)]);
        assert_eq!(first.diagnostics, full.diagnostics);
        assert_eq!(first.rules.len(), full.rules.len());
        assert_eq!(first.diagnostics.len(), 1);
        let kept = std::sync::Arc::as_ptr(&first.policies[0]);
        // Only the status changed (a new resourceVersion, the same document): same fingerprint.
        let mut a_status = a.clone();
        a_status.metadata.resource_version = Some("4".into());
        a_status.data["status"] = serde_json::json!({"conditions": []});
        assert_eq!(cache.refresh([(k, &a_status), (k, &b)]), f1);
        let f2 = cache.refresh([(k, &a_status), (k, &b2)]);
        assert_ne!(f2, f1);
        let second = cache.policy_set();
        assert!(second.diagnostics.is_empty(), "{:?}", second.diagnostics);
        assert_eq!(
            std::sync::Arc::as_ptr(&second.policies[0]),
            kept,
            "a was not reloaded"
        );
        cache.refresh([(k, &b2)]);
        assert_eq!(
            cache.policy_set().policies.len(),
            1,
            "a deleted object is gone"
        );
    }

    #[test]
    fn per_object_updates_touch_only_their_object_and_a_relist_only_its_kind() {
        let mk = |kind: &str, name: &str, port: &str| {
            obj(
                serde_json::json!({"metadata": {"name": name, "namespace": "n", "resourceVersion": port},
                "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": port}]}]}]},
                "kind": kind}),
            )
        };
        let text = |k: PolicyKind, o: &DynamicObject| -> Arc<str> { document_text(&k, o).into() };
        let (cnp, tgp) = (CILIUM_NETWORK_POLICY, TOLLGATE_POLICY);
        let (a, b, t) = (mk("x", "a", "80"), mk("x", "b", "81"), mk("x", "t", "82"));
        let mut cache = PolicyCache::default();
        cache.replace_kind(cnp, [(&a, &text(cnp, &a)), (&b, &text(cnp, &b))]);
        cache.replace_kind(tgp, [(&t, &text(tgp, &t))]);
        let names = |c: &PolicyCache| -> Vec<String> {
            c.policy_set()
                .policies
                .iter()
                .map(|p| p.id.to_string())
                .collect()
        };
        assert_eq!(names(&cache).len(), 3);
        let kept = Arc::as_ptr(&cache.policy_set().policies[0]);
        let before = cache.fingerprint();
        // b changes: a stays loaded as it was.
        let b2 = mk("x", "b", "99999");
        cache.upsert(cnp, &b2, &text(cnp, &b2));
        assert_ne!(cache.fingerprint(), before);
        assert_eq!(Arc::as_ptr(&cache.policy_set().policies[0]), kept);
        assert_eq!(cache.policy_set().diagnostics.len(), 1, "b's bad port");
        // A relist of the CNPs without a drops a, and leaves the TollgatePolicy alone.
        cache.replace_kind(cnp, [(&b2, &text(cnp, &b2))]);
        assert_eq!(names(&cache).len(), 2, "{:?}", names(&cache));
        cache.remove(cnp, Some("n".into()), Some("b".into()));
        assert_eq!(names(&cache).len(), 1);
        assert!(cache.policy_set().diagnostics.is_empty());
    }

    #[test]
    fn unknown_top_level_fields_are_rejected_by_name() {
        let tgp = obj(serde_json::json!({
            "metadata": {"name": "x", "namespace": "a"},
            "spec": {"endpointSelector": {}, "ingress": [{}]},
            "sepc": {},
        }));
        let set = load_policies([(TOLLGATE_POLICY, &tgp)]);
        let lines: Vec<String> = set.diagnostics.iter().map(describe).collect();
        assert_eq!(lines, ["TollgatePolicy a/x: sepc: unknown field `sepc`"]);
    }

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pods_become_endpoints_with_ports_and_service_account() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "api-1", "namespace": "prod",
                         "labels": {"app": "api", "pod-template-hash": "abc"}},
            "spec": {"serviceAccountName": "api", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080}, {"containerPort": 9090}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.2",
                       "podIPs": [{"ip": "10.0.0.2"}, {"ip": "fd00::2"}]},
        }));
        let spec = endpoint_of(&p).unwrap().unwrap();
        assert_eq!(spec.labels, BTreeMap::from([("app".into(), "api".into())]));
        assert_eq!(spec.ips.len(), 2);
        assert_eq!(spec.ports, BTreeMap::from([("http".into(), 8080)]));
        assert_eq!(spec.service_account.as_deref(), Some("api"));
        let hostnet = pod(
            serde_json::json!({"metadata": {"name": "h"}, "spec": {"hostNetwork": true, "containers": []},
            "status": {"podIP": "192.0.2.1"}}),
        );
        assert_eq!(endpoint_of(&hostnet).unwrap(), Err(PodSkip::HostNetwork));
        let bad = pod(
            serde_json::json!({"metadata": {"name": "b"}, "spec": {"containers": []},
            "status": {"podIP": "10.0.0.999"}}),
        );
        assert_eq!(
            endpoint_of(&bad).unwrap_err(),
            "status.podIP: `10.0.0.999` is not an IP address"
        );
    }

    #[test]
    fn stripped_pods_give_the_same_endpoint_and_policies_keep_only_our_annotations() {
        let full = pod(serde_json::json!({
            "metadata": {"name": "api-1", "namespace": "prod", "labels": {"app": "api"},
                         "annotations": {"big": "x", "tollgate.io/interface": "cali1"},
                         "managedFields": [{"manager": "k"}]},
            "spec": {"serviceAccountName": "api", "nodeName": "n1", "containers": [{"name": "c",
                "image": "img", "env": [{"name": "A", "value": "1"}],
                "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.2", "podIPs": [{"ip": "10.0.0.2"}],
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }));
        let mut stripped = full.clone();
        strip_pod(&mut stripped);
        assert_eq!(endpoint_of(&stripped), endpoint_of(&full));
        let spec = endpoint_of(&stripped).unwrap().unwrap();
        // What a node needs to find its pods and their interfaces stays.
        assert_eq!(spec.node.as_deref(), Some("n1"));
        assert_eq!(spec.interface.as_deref(), Some("cali1"));
        assert_eq!(
            stripped.metadata.annotations,
            Some(BTreeMap::from([(
                INTERFACE_ANNOTATION.to_string(),
                "cali1".to_string()
            )]))
        );
        assert!(
            stripped.spec.as_ref().unwrap().containers[0]
                .image
                .is_none()
        );
        assert!(stripped.status.as_ref().unwrap().conditions.is_none());

        let cnp = obj(serde_json::json!({
            "metadata": {"name": "a", "namespace": "n", "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{}",
                "tollgate.io/enforcement": "audit"}},
            "spec": {"endpointSelector": {}, "ingress": [{}]},
        }));
        let doc = policy_document(&CILIUM_NETWORK_POLICY, &cnp);
        assert_eq!(
            doc["metadata"]["annotations"],
            serde_json::json!({"tollgate.io/enforcement": "audit"})
        );
        let set = load_policies([(CILIUM_NETWORK_POLICY, &cnp)]);
        assert_eq!(
            set.rules[0].enforcement,
            tollgate_policy::api::Enforcement::Audit
        );
    }

    #[test]
    fn an_ip_claimed_twice_stays_with_the_live_pod_and_is_reported() {
        let old = pod(
            serde_json::json!({"metadata": {"name": "a", "namespace": "n",
            "deletionTimestamp": "2026-01-01T00:00:00Z"}, "spec": {"containers": []},
            "status": {"phase": "Running", "podIP": "10.0.0.5"}}),
        );
        let new = pod(
            serde_json::json!({"metadata": {"name": "b", "namespace": "n"},
            "spec": {"containers": []}, "status": {"phase": "Running", "podIP": "10.0.0.5"}}),
        );
        let (inv, notes) = build_inventory([&old, &new], []);
        assert_eq!(inv.endpoints.len(), 1);
        assert_eq!(inv.endpoints[0].spec.name, "b");
        assert_eq!(
            notes,
            [
                "Pod n/a: IP 10.0.0.5 is also used by Pod n/b; not an endpoint until one of them is gone"
            ]
        );
    }
}
