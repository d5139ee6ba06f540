//! The Kubernetes source: reflectors for every watched kind, a debounced recompile, and the
//! status/event/identity writes that follow it.
//!
//! Each kind has a kube-runtime `watcher` (list, then watch from the list's resourceVersion;
//! bookmarks; a 410 Gone relists; a dropped watch resumes from the last resourceVersion seen;
//! errors back off) feeding a `reflector` store. Any change wakes the compile loop, which waits
//! until no change came for [`Options::debounce`] (at most [`Options::max_delay`] after the
//! first), then builds a [`Snapshot`] from the stores — policy documents and an inventory, the
//! same inputs as directory mode — and publishes it on a `tokio::sync::watch` channel. A
//! snapshot whose inputs equal the last one's is not published again (a status patch comes back
//! as a watch event and changes nothing).
//!
//! Kinds the cluster does not serve (no Cilium CRDs installed, say) are not watched, and the
//! snapshot says so; `TollgateIdentity` must be served when cluster identities are on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tollgate_policy::endpoints::Inventory;
use tollgate_policy::eval::Evaluator;
use tollgate_policy::load::PolicySet;

use super::identity::{ClusterIdentities, security_labels};
use super::objects::{self, POLICY_KINDS, PolicyKind, TOLLGATE_POLICY};
use super::status::StatusWriter;
use crate::crd::TollgateIdentity;

/// How identities are numbered.
#[derive(Debug, Clone)]
pub enum Identities {
    /// Per agent, in order of first sight (directory mode's allocator, kept across revisions
    /// so a label set keeps its number while the agent runs): only for tests and single-node
    /// clusters, since other nodes would number differently.
    Local,
    /// `TollgateIdentity` objects ([`super::identity`]); unused ones are deleted after
    /// `gc_grace`.
    Cluster { gc_grace: Duration },
}

/// Settings of [`start`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Quiet time after a change before recompiling.
    pub debounce: Duration,
    /// Longest wait between the first change of a burst and its recompile.
    pub max_delay: Duration,
    pub identities: Identities,
    /// Write TollgatePolicy conditions and events for invalid Cilium/NetworkPolicy objects.
    pub write_status: bool,
    /// This agent's name in events (the node name).
    pub instance: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            // A quiet window: long enough to take a `kubectl apply` of a directory (events
            // microseconds apart, `tests/kube_source.rs`) as one recompile, short enough for the
            // < 100 ms change-to-enforcement target (it is paid on every change; 20 ms until
            // the compile itself got cheap, then 10 ms).
            debounce: Duration::from_millis(10),
            max_delay: Duration::from_secs(1),
            identities: Identities::Cluster {
                gc_grace: Duration::from_secs(300),
            },
            write_status: true,
            instance: "tollgate-agent".to_string(),
        }
    }
}

/// What the cluster's objects compile to, at one revision.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// 1, 2, …: one per published change.
    pub revision: u64,
    /// The policy objects, loaded as directory mode loads files (each object its own source).
    pub policies: PolicySet,
    /// Pods (with an IP, not host-network) with labels, namespace labels, service account and
    /// identity.
    pub inventory: Inventory,
    /// Every problem, one line each: `CiliumNetworkPolicy ns/name: spec…: reason`, and pods
    /// that are not endpoints and why.
    pub problems: Vec<String>,
    /// Policy kinds the cluster does not serve (not watched).
    pub not_served: Vec<&'static str>,
    /// Each policy object's source name and document text, in load order (the rule sets a
    /// proxy is served: `super::node::rule_sets`).
    pub documents: Vec<(String, Arc<str>)>,
}

impl Snapshot {
    /// The evaluator of this snapshot's rules.
    pub fn evaluator(&self) -> Evaluator {
        Evaluator::new(self.policies.rules.clone())
    }
}

/// A running source; dropping it stops every task.
#[derive(Debug)]
pub struct Running {
    /// The latest snapshot (the first is there when [`start`] returns).
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Problems writing status, events or identities, newest last (bounded).
    pub write_errors: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Watch `api` into a store (kube-runtime watcher + reflector, default backoff); every change
/// counts one in `changes` and wakes `notify`. Watch errors are logged (the watcher recovers by itself). `strip` runs on
/// every object before it is stored (drop what the agent never reads).
pub fn reflect<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    what: String,
    notify: Arc<Notify>,
    changes: Arc<AtomicU64>,
    strip: fn(&mut K),
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + Hash + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let stream = reflector::reflector(
        writer,
        watcher::watcher(api, watcher::Config::default())
            .modify(strip)
            .default_backoff(),
    );
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Apply(_) | Event::Delete(_) | Event::InitDone) => {
                    changes.fetch_add(1, Ordering::SeqCst);
                    notify.notify_one()
                }
                Ok(Event::Init | Event::InitApply(_)) => {}
                // The watcher relists or re-watches by itself; say why.
                Err(e) => tracing::warn!("watching {what}: {e}"),
            }
        }
    });
    (reader, task)
}

/// What the agent keeps of one policy object: the object without its spec, labels, annotations
/// and managedFields (metadata and `status` are what the status writer reads), and the document
/// the loader reads ([`objects::policy_document`]) as text. Keeping the whole object as a JSON
/// tree cost ~8 KiB per small CNP (80 MiB at 10,000); the text is a tenth of that.
#[derive(Debug)]
pub struct StoredPolicy {
    pub obj: DynamicObject,
    pub text: Arc<str>,
}

impl StoredPolicy {
    pub fn new(kind: &PolicyKind, mut obj: DynamicObject) -> StoredPolicy {
        let text = objects::document_text(kind, &obj).into();
        let status = match &mut obj.data {
            Value::Object(data) => data.remove("status"),
            _ => None,
        };
        obj.data = match status {
            Some(st) => serde_json::json!({ "status": st }),
            None => Value::Object(Default::default()),
        };
        let m = &mut obj.metadata;
        m.managed_fields = None;
        m.annotations = None;
        m.labels = None;
        StoredPolicy { obj, text }
    }
}

/// (namespace, name) of a policy object.
pub type PolicyKey = (Option<String>, Option<String>);

/// A store of one policy kind, filled by [`reflect_policies`].
#[derive(Debug, Clone)]
pub struct PolicyStore {
    objects: Arc<std::sync::RwLock<HashMap<PolicyKey, Arc<StoredPolicy>>>>,
    /// What changed since the last [`PolicyStore::take_changes`]: a recompile after one
    /// object changed reloads that object without walking the other 10,000.
    changes: Arc<std::sync::Mutex<Changes>>,
    ready: watch::Receiver<bool>,
}

#[derive(Debug, Default)]
struct Changes {
    /// The store was replaced (a first list or a relist).
    all: bool,
    keys: std::collections::HashSet<PolicyKey>,
}

/// What [`PolicyStore::take_changes`] returns.
#[derive(Debug)]
pub enum StoreChanges {
    /// Every object (the store was relisted).
    All(Vec<Arc<StoredPolicy>>),
    /// The objects changed since the last take: (namespace, name) and the object now (`None`:
    /// deleted).
    Some(Vec<(PolicyKey, Option<Arc<StoredPolicy>>)>),
}

impl PolicyStore {
    /// Every object now.
    pub fn state(&self) -> Vec<Arc<StoredPolicy>> {
        self.objects
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// What changed since the last call. Writers record a key after storing its object, so an
    /// object changed while this runs is either read here in its new state or taken next time.
    pub fn take_changes(&self) -> StoreChanges {
        let taken = match self.changes.lock() {
            Ok(mut c) => std::mem::take(&mut *c),
            Err(_) => Changes {
                all: true,
                ..Changes::default()
            },
        };
        let Ok(objects) = self.objects.read() else {
            return StoreChanges::Some(Vec::new());
        };
        if taken.all {
            return StoreChanges::All(objects.values().cloned().collect());
        }
        StoreChanges::Some(
            taken
                .keys
                .into_iter()
                .map(|k| {
                    let now = objects.get(&k).cloned();
                    (k, now)
                })
                .collect(),
        )
    }

    fn changed(&self, key: Option<PolicyKey>) {
        if let Ok(mut c) = self.changes.lock() {
            match key {
                Some(k) if !c.all => {
                    c.keys.insert(k);
                }
                Some(_) => {}
                None => {
                    c.all = true;
                    c.keys.clear();
                }
            }
        }
    }

    /// Once the first list is in.
    pub async fn wait_until_ready(&self) -> Result<()> {
        let mut ready = self.ready.clone();
        ready
            .wait_for(|r| *r)
            .await
            .map(|_| ())
            .map_err(|_| anyhow::anyhow!("the watch ended before its first list"))
    }
}

/// [`reflect`] for a policy kind, into a [`PolicyStore`] of [`StoredPolicy`]s: the same
/// kube-runtime watcher (list, watch, relist on 410, backoff) and the reflector's semantics
/// (a relist replaces the store when it is complete), but each object is turned into its
/// stored form as it arrives, so the full objects of a list are never all held at once.
pub fn reflect_policies(
    api: Api<DynamicObject>,
    kind: PolicyKind,
    notify: Arc<Notify>,
) -> (PolicyStore, JoinHandle<()>) {
    let (ready_tx, ready) = watch::channel(false);
    let store = PolicyStore {
        objects: Default::default(),
        changes: Default::default(),
        ready,
    };
    let objects = store.objects.clone();
    let recorder = store.clone();
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let key = |o: &DynamicObject| (o.metadata.namespace.clone(), o.metadata.name.clone());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut buffer: HashMap<PolicyKey, Arc<StoredPolicy>> = HashMap::new();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Init) => buffer = HashMap::new(),
                Ok(Event::InitApply(o)) => {
                    buffer.insert(key(&o), Arc::new(StoredPolicy::new(&kind, o)));
                }
                Ok(Event::InitDone) => {
                    if let Ok(mut m) = objects.write() {
                        *m = std::mem::take(&mut buffer);
                    }
                    recorder.changed(None);
                    ready_tx.send_replace(true);
                    notify.notify_one();
                }
                Ok(Event::Apply(o)) => {
                    let k = key(&o);
                    let stored = Arc::new(StoredPolicy::new(&kind, o));
                    if let Ok(mut m) = objects.write() {
                        m.insert(k.clone(), stored);
                    }
                    recorder.changed(Some(k));
                    notify.notify_one();
                }
                Ok(Event::Delete(o)) => {
                    let k = key(&o);
                    if let Ok(mut m) = objects.write() {
                        m.remove(&k);
                    }
                    recorder.changed(Some(k));
                    notify.notify_one();
                }
                Err(e) => tracing::warn!("watching {}: {e}", kind.kind),
            }
        }
    });
    (store, task)
}

/// Whether the cluster serves `ar` (a 404 on list means it does not).
async fn served(client: &Client, ar: &ApiResource) -> Result<bool> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), ar);
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e).with_context(|| format!("listing {}", ar.plural)),
    }
}

struct Loop {
    opts: Options,
    policies: Vec<(PolicyKind, PolicyStore)>,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    identities: Option<ClusterIdentities>,
    /// [`Identities::Local`]'s numbers.
    local_ids: tollgate_policy::endpoints::IdentityAllocator,
    status: StatusWriter,
    not_served: Vec<&'static str>,
    revision: u64,
    last_inputs: Option<u64>,
    cache: objects::PolicyCache,
    /// Counts changes of Pods, Namespaces and identities.
    inventory_changes: Arc<AtomicU64>,
    /// The inventory built at a count of `inventory_changes`, reused while it stays.
    inventory: Option<BuiltInventory>,
    write_errors: Arc<std::sync::Mutex<Vec<String>>>,
}

/// An inventory with its problems and fingerprint, as of one count of changes.
#[derive(Debug)]
struct BuiltInventory {
    changes: u64,
    inventory: Inventory,
    notes: Vec<String>,
    key: u64,
}

/// FNV-1a over the inputs, to tell whether a recompile would change anything.
fn fingerprint(parts: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Loop {
    fn note_error(&self, e: &anyhow::Error) {
        tracing::warn!("{e:#}");
        if let Ok(mut v) = self.write_errors.lock() {
            if v.len() >= 100 {
                v.remove(0);
            }
            v.push(format!("{e:#}"));
        }
    }

    /// Every policy object in the stores, with its kind.
    fn policy_objects(&self) -> Vec<(PolicyKind, Arc<StoredPolicy>)> {
        self.policies
            .iter()
            .flat_map(|(k, s)| s.state().into_iter().map(move |o| (*k, o)))
            .collect()
    }

    /// Bring the policy cache up to the stores' changes; only changed objects are reloaded.
    fn refresh_policies(&mut self) -> u64 {
        for (kind, store) in &self.policies {
            match store.take_changes() {
                StoreChanges::All(objects) => self
                    .cache
                    .replace_kind(*kind, objects.iter().map(|o| (&o.obj, &o.text))),
                StoreChanges::Some(changed) => {
                    for ((namespace, name), now) in changed {
                        match now {
                            Some(o) => self.cache.upsert(*kind, &o.obj, &o.text),
                            None => self.cache.remove(*kind, namespace, name),
                        }
                    }
                }
            }
        }
        self.cache.fingerprint()
    }

    /// The inventory of the pods, namespaces and identities now; rebuilt only when one of
    /// them changed since the last build.
    async fn inventory(&mut self) -> Result<&BuiltInventory> {
        // Read before the stores: a change while building bumps it, and is built next time.
        let changes = self.inventory_changes.load(Ordering::SeqCst);
        if let Some(b) = &self.inventory
            && b.changes == changes
        {
            return Ok(self.inventory.as_ref().expect("checked"));
        }
        self.inventory = None;
        let pods = self.pods.state();
        let namespaces = self.namespaces.state();
        let (mut inventory, notes) = objects::build_inventory(
            pods.iter().map(|p| p.as_ref()),
            namespaces.iter().map(|n| n.as_ref()),
        );
        if self.identities.is_none() {
            for ep in &mut inventory.endpoints {
                ep.identity = self.local_ids.allocate(&ep.labels);
            }
        }
        if let Some(ids) = &mut self.identities {
            let mut sets: Vec<&tollgate_policy::labels::LabelSet> =
                inventory.endpoints.iter().map(|e| &e.labels).collect();
            sets.sort();
            sets.dedup();
            let numbers = ids
                .allocate_all(&sets)
                .await
                .context("allocating cluster identities")?;
            for ep in &mut inventory.endpoints {
                if let Some(n) = numbers.get(&ep.labels) {
                    ep.identity = *n;
                }
            }
        }
        let mut parts: Vec<String> = inventory
            .endpoints
            .iter()
            .map(|e| format!("{:?} {} {}", e.spec, e.labels, e.identity))
            .collect();
        parts.extend(notes.iter().cloned());
        let key = fingerprint(&parts);
        Ok(self.inventory.insert(BuiltInventory {
            changes,
            inventory,
            notes,
            key,
        }))
    }

    /// Build a snapshot from the stores; `None` when the inputs are those of the last one.
    async fn compile(&mut self) -> Result<Option<Snapshot>> {
        let policies_key = self.refresh_policies();
        let inventory_key = self.inventory().await?.key;
        let key = fingerprint(&[policies_key.to_string(), inventory_key.to_string()]);
        if self.last_inputs == Some(key) {
            return Ok(None);
        }
        let built = self.inventory.as_ref().context("inventory just built")?;
        let (inventory, notes) = (built.inventory.clone(), built.notes.clone());
        self.last_inputs = Some(key);
        let policies = self.cache.policy_set();
        let mut problems: Vec<String> =
            policies.diagnostics.iter().map(objects::describe).collect();
        problems.extend(notes);
        self.revision += 1;
        Ok(Some(Snapshot {
            revision: self.revision,
            policies,
            inventory,
            problems,
            not_served: self.not_served.clone(),
            documents: self.cache.documents(),
        }))
    }

    /// Conditions on TollgatePolicies, events on the other kinds (see [`super::status`]).
    async fn write_status(&mut self, snap: &Snapshot) {
        let mut by_source: HashMap<&str, Vec<String>> = HashMap::new();
        for d in &snap.policies.diagnostics {
            by_source
                .entry(d.file.as_str())
                .or_default()
                .push(objects::describe(d));
        }
        let objects = self.policy_objects();
        self.status.forget_others(
            objects
                .iter()
                .filter_map(|(_, o)| o.obj.metadata.uid.as_deref()),
        );
        for (kind, stored) in objects {
            let obj = &stored.obj;
            let problems = by_source
                .get(kind.source_name(obj).as_str())
                .cloned()
                .unwrap_or_default();
            let r = if kind == TOLLGATE_POLICY {
                self.status.tollgate_policy(&kind, obj, &problems).await
            } else if !problems.is_empty() {
                self.status.invalid_event(&kind, obj, &problems).await
            } else {
                Ok(false)
            };
            if let Err(e) = r {
                self.note_error(&e);
            }
        }
    }

    async fn collect_garbage(&mut self, inventory: &Inventory) {
        let in_use: HashSet<BTreeMap<String, String>> = inventory
            .endpoints
            .iter()
            .map(|e| security_labels(&e.labels))
            .collect();
        if let Some(ids) = &mut self.identities {
            match ids.collect_garbage(&in_use, Instant::now()).await {
                Ok(gone) if !gone.is_empty() => {
                    tracing::info!("deleted unused TollgateIdentity objects {gone:?}")
                }
                Ok(_) => {}
                Err(e) => {
                    let e = e.context("collecting unused identities");
                    self.note_error(&e);
                }
            }
        }
    }
}

/// Start watching through `client`; returns once the first snapshot is compiled.
pub async fn start(client: Client, opts: Options) -> Result<Running> {
    let notify = Arc::new(Notify::new());
    // Pods, Namespaces and identities: the inventory is rebuilt only when one of them changed.
    let inventory_changes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut policies = Vec::new();
    let mut not_served = Vec::new();
    for kind in POLICY_KINDS {
        let ar = kind.api_resource();
        if !served(&client, &ar).await? {
            tracing::warn!(
                "{} ({}) is not served by this cluster: not watched",
                kind.kind,
                kind.api_version()
            );
            not_served.push(kind.kind);
            continue;
        }
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let (store, task) = reflect_policies(api, kind, notify.clone());
        tasks.push(task);
        policies.push((kind, store));
    }
    let (pods, t) = reflect(
        Api::<Pod>::all(client.clone()),
        (),
        "Pods".into(),
        notify.clone(),
        inventory_changes.clone(),
        objects::strip_pod,
    );
    tasks.push(t);
    let (namespaces, t) = reflect(
        Api::<Namespace>::all(client.clone()),
        (),
        "Namespaces".into(),
        notify.clone(),
        inventory_changes.clone(),
        objects::strip_namespace,
    );
    tasks.push(t);
    type Ready = futures::future::BoxFuture<'static, Result<(), reflector::store::WriterDropped>>;
    fn ready<K: kube::runtime::reflector::Lookup + Clone + Send + Sync + 'static>(
        s: &Store<K>,
    ) -> Ready
    where
        K::DynamicType: Eq + Hash + Clone + Send + Sync,
    {
        let s = s.clone();
        Box::pin(async move { s.wait_until_ready().await })
    }
    let mut stores_ready: Vec<Ready> = vec![ready(&pods), ready(&namespaces)];
    let identities = match &opts.identities {
        Identities::Local => None,
        Identities::Cluster { gc_grace } => {
            let api: Api<TollgateIdentity> = Api::all(client.clone());
            if let Err(e) = api.list(&ListParams::default().limit(1)).await {
                bail!(
                    "cluster identities need the TollgateIdentity CRD (deploy/crds/tollgate.io_tollgateidentities.yaml): {e}"
                );
            }
            let (store, t) = reflect(
                api.clone(),
                (),
                "TollgateIdentities".into(),
                notify.clone(),
                inventory_changes.clone(),
                |o: &mut TollgateIdentity| o.metadata.managed_fields = None,
            );
            tasks.push(t);
            stores_ready.push(ready(&store));
            Some(ClusterIdentities::new(api, store, *gc_grace))
        }
    };
    for r in futures::future::join_all(stores_ready).await {
        r.context("a watch ended before its first list")?;
    }
    for (_, s) in &policies {
        s.wait_until_ready().await?;
    }
    let write_errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut lp = Loop {
        status: StatusWriter::new(client.clone(), opts.instance.clone()),
        opts,
        policies,
        pods,
        namespaces,
        identities,
        local_ids: Default::default(),
        not_served,
        revision: 0,
        last_inputs: None,
        cache: objects::PolicyCache::default(),
        inventory_changes,
        inventory: None,
        write_errors: write_errors.clone(),
    };
    let first = lp.compile().await?.context("first compile")?;
    let (tx, rx) = watch::channel(Arc::new(first));
    tasks.push(tokio::spawn(async move { lp.run(tx, notify).await }));
    Ok(Running {
        snapshots: rx,
        write_errors,
        tasks,
    })
}

impl Loop {
    async fn run(mut self, tx: watch::Sender<Arc<Snapshot>>, notify: Arc<Notify>) {
        let mut current = tx.borrow().clone();
        self.after_publish(&current).await;
        // When to look for unused identities again: kept across wake-ups, so that a steady
        // stream of changes cannot postpone garbage collection forever.
        let mut gc_at: Option<tokio::time::Instant> = None;
        loop {
            if gc_at.is_none()
                && let (Some(ids), Identities::Cluster { gc_grace }) =
                    (&self.identities, &self.opts.identities)
                && ids.gc_pending()
            {
                let tick =
                    (*gc_grace / 2).clamp(Duration::from_millis(10), Duration::from_secs(30));
                gc_at = Some(tokio::time::Instant::now() + tick);
            }
            let gc_due = async {
                match gc_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = notify.notified() => {}
                _ = gc_due => {
                    gc_at = None;
                    self.collect_garbage(&current.inventory).await;
                    continue;
                }
            }
            let first = Instant::now();
            while first.elapsed() < self.opts.max_delay
                && tokio::time::timeout(self.opts.debounce, notify.notified())
                    .await
                    .is_ok()
            {}
            match self.compile().await {
                Ok(Some(snap)) => {
                    current = Arc::new(snap);
                    tracing::info!(
                        "revision {}: {} rules, {} endpoints, {} problems, compiled {:.1} ms after the first change",
                        current.revision,
                        current.policies.rules.len(),
                        current.inventory.endpoints.len(),
                        current.problems.len(),
                        first.elapsed().as_secs_f64() * 1000.0
                    );
                    if tx.send(current.clone()).is_err() {
                        return;
                    }
                    self.after_publish(&current).await;
                }
                // Nothing to recompile (e.g. our own status patch came back); a status write
                // that failed before is retried here.
                Ok(None) => {
                    if self.opts.write_status {
                        self.write_status(&current).await;
                    }
                    // E.g. the watch showed identities allocated earlier: judge them now.
                    self.collect_garbage(&current.inventory).await;
                }
                Err(e) => {
                    // The last snapshot stays in force; try again shortly.
                    let e = e.context(format!("keeping revision {}", current.revision));
                    self.note_error(&e);
                    self.last_inputs = None;
                    self.inventory = None;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    notify.notify_one();
                }
            }
        }
    }

    async fn after_publish(&mut self, snap: &Snapshot) {
        if self.opts.write_status {
            self.write_status(snap).await;
        }
        self.collect_garbage(&snap.inventory).await;
    }
}
