//! Cluster-wide identities through the Kubernetes API: one `TollgateIdentity` object per
//! identity (name = the number, spec = the security-relevant labels; [`crate::crd`]).
//!
//! Allocation for a label set: an object with exactly those labels (in the watched store, or
//! allocated by this agent moments ago and not yet seen by the watch) gives its number;
//! otherwise create one with the smallest number free in this node's view, from
//! [`FIRST_CLUSTER_IDENTITY`]. The API server refuses a create of an existing name with 409
//! Conflict — that is the optimistic concurrency: two nodes racing for the same labels pick the
//! same number, one create wins, the other reads the object back, sees its labels and takes the
//! number too; a node that lost the number to *other* labels tries the next one. Attempts are
//! bounded ([`MAX_ATTEMPTS`]).
//!
//! Two nodes with different views (one already saw a number freed by garbage collection) can
//! still create two objects for one label set. Both numbers then carry the same labels, so
//! policy treats them alike; the unused one is collected. A number never stands for two label
//! sets, which is what enforcement needs.
//!
//! Garbage collection: an object whose labels no pod in the cluster has (every node watches all
//! pods) is deleted once it has been unused for the grace period, with a UID precondition so a
//! re-created object of the same name is never deleted. Reserved identities (1–255, Cilium's
//! numbers in `tollgate_policy::endpoints::reserved`) are never objects: objects named outside
//! the allocation range are ignored (and never deleted).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::runtime::reflector::Store;
use tollgate_policy::endpoints::reserved;
use tollgate_policy::labels::LabelSet;

use crate::crd::{TollgateIdentity, TollgateIdentitySpec};

/// The first number allocated cluster-wide (below it: Cilium's reserved identities).
pub const FIRST_CLUSTER_IDENTITY: u32 = reserved::FIRST_LOCAL;
/// The last: Cilium's cluster-local identity range ends here.
pub const LAST_CLUSTER_IDENTITY: u32 = 65_535;
/// Create attempts per allocation before giving up (each lost race costs one).
pub const MAX_ATTEMPTS: usize = 64;
/// How long an identity this agent allocated is trusted before the watch has shown it.
const RECENT_TTL: Duration = Duration::from_secs(30);

/// `k8s:app` → `frontend`: the spec form of a label set.
pub fn security_labels(labels: &LabelSet) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|l| (format!("{}:{}", l.source, l.key), l.value.clone()))
        .collect()
}

/// The number an object stands for, if its name is one in the allocation range.
pub fn number_of(obj: &TollgateIdentity) -> Option<u32> {
    let n: u32 = obj.metadata.name.as_deref()?.parse().ok()?;
    (FIRST_CLUSTER_IDENTITY..=LAST_CLUSTER_IDENTITY)
        .contains(&n)
        .then_some(n)
}

/// Allocates and collects `TollgateIdentity` objects (see the module docs).
#[derive(Debug)]
pub struct ClusterIdentities {
    api: Api<TollgateIdentity>,
    store: Store<TollgateIdentity>,
    grace: Duration,
    /// Numbers this agent created or confirmed, until the store shows them.
    recent: HashMap<u32, (BTreeMap<String, String>, Instant)>,
    /// Objects (by UID) no pod uses, since when.
    unused_since: HashMap<String, Instant>,
    /// Conflicts seen (lost races), for logs and tests.
    pub conflicts: usize,
}

impl ClusterIdentities {
    /// `store` must be fed by a watch of `api`'s objects (`crate::kubernetes::source` does).
    pub fn new(
        api: Api<TollgateIdentity>,
        store: Store<TollgateIdentity>,
        grace: Duration,
    ) -> Self {
        ClusterIdentities {
            api,
            store,
            grace,
            recent: HashMap::new(),
            unused_since: HashMap::new(),
            conflicts: 0,
        }
    }

    fn live(&self) -> Vec<(u32, std::sync::Arc<TollgateIdentity>)> {
        self.store
            .state()
            .into_iter()
            .filter(|o| o.metadata.deletion_timestamp.is_none())
            .filter_map(|o| Some((number_of(&o)?, o)))
            .collect()
    }

    /// Forget recent allocations the store now shows (or that are too old); returns the
    /// numbers in the store.
    fn prune_recent(&mut self, live: &[(u32, std::sync::Arc<TollgateIdentity>)]) -> HashSet<u32> {
        let now = Instant::now();
        let in_store: HashSet<u32> = live.iter().map(|(n, _)| *n).collect();
        self.recent
            .retain(|n, (_, at)| !in_store.contains(n) && now.duration_since(*at) < RECENT_TTL);
        in_store
    }

    /// The identity of `labels`, creating its object if there is none.
    pub async fn allocate(&mut self, labels: &LabelSet) -> Result<u32> {
        let mut ids = self.allocate_all(&[labels]).await?;
        ids.remove(labels)
            .with_context(|| format!("no identity for {labels}"))
    }

    /// The identities of `sets` (see the module docs): the store is read once, and numbers
    /// are handed out from one moving candidate, so a thousand new label sets cost a thousand
    /// creates, not a million look-ups.
    pub async fn allocate_all(&mut self, sets: &[&LabelSet]) -> Result<HashMap<LabelSet, u32>> {
        let live = self.live();
        let mut taken: BTreeSet<u32> = self.prune_recent(&live).into_iter().collect();
        taken.extend(self.recent.keys());
        let mut known: HashMap<BTreeMap<String, String>, u32> = HashMap::new();
        for (n, o) in &live {
            let e = known.entry(o.spec.security_labels.clone()).or_insert(*n);
            *e = (*e).min(*n);
        }
        for (n, (l, _)) in &self.recent {
            known.entry(l.clone()).or_insert(*n);
        }
        let mut out = HashMap::new();
        let mut candidate = FIRST_CLUSTER_IDENTITY;
        for labels in sets {
            let want = security_labels(labels);
            let n = match known.get(&want) {
                Some(n) => *n,
                None => {
                    let n = self
                        .create(labels, &want, &mut taken, &mut candidate)
                        .await?;
                    known.insert(want, n);
                    n
                }
            };
            out.insert((*labels).clone(), n);
        }
        Ok(out)
    }

    /// Create the object for `want` with the smallest free number from `candidate` on.
    async fn create(
        &mut self,
        labels: &LabelSet,
        want: &BTreeMap<String, String>,
        taken: &mut BTreeSet<u32>,
        candidate: &mut u32,
    ) -> Result<u32> {
        for _ in 0..MAX_ATTEMPTS {
            while taken.contains(candidate) {
                *candidate += 1;
            }
            if *candidate > LAST_CLUSTER_IDENTITY {
                bail!("no free cluster identity left for {labels}");
            }
            let n = *candidate;
            let name = n.to_string();
            let obj = TollgateIdentity::new(
                &name,
                TollgateIdentitySpec {
                    security_labels: want.clone(),
                },
            );
            match self.api.create(&PostParams::default(), &obj).await {
                Ok(_) => {
                    self.recent.insert(n, (want.clone(), Instant::now()));
                    taken.insert(n);
                    return Ok(n);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    self.conflicts += 1;
                    let other = self
                        .api
                        .get_opt(&name)
                        .await
                        .with_context(|| format!("reading TollgateIdentity {name} back"))?;
                    match other {
                        Some(o)
                            if o.spec.security_labels == *want
                                && o.metadata.deletion_timestamp.is_none() =>
                        {
                            self.recent.insert(n, (want.clone(), Instant::now()));
                            taken.insert(n);
                            return Ok(n);
                        }
                        Some(_) => {
                            taken.insert(n);
                        }
                        // Deleted in between: the same number is free again.
                        None => {}
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("creating TollgateIdentity {name}"));
                }
            }
        }
        bail!("no cluster identity for {labels} after {MAX_ATTEMPTS} attempts (lost every race)")
    }

    /// Delete the objects whose labels no pod has had for the grace period (`in_use`: the
    /// label sets of all pods now). Returns the numbers deleted.
    pub async fn collect_garbage(
        &mut self,
        in_use: &HashSet<BTreeMap<String, String>>,
        now: Instant,
    ) -> Result<Vec<u32>> {
        let mut deleted = Vec::new();
        let mut unused = HashSet::new();
        let live = self.live();
        self.prune_recent(&live);
        for (n, obj) in live {
            let uid = obj.metadata.uid.clone().unwrap_or_default();
            if in_use.contains(&obj.spec.security_labels) || self.recent.contains_key(&n) {
                continue;
            }
            unused.insert(uid.clone());
            let since = *self.unused_since.entry(uid.clone()).or_insert(now);
            if now.duration_since(since) < self.grace {
                continue;
            }
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match self.api.delete(&n.to_string(), &dp).await {
                Ok(_) => deleted.push(n),
                // Already gone, or re-created (another UID): nothing to do.
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("deleting TollgateIdentity {n}"));
                }
            }
            unused.remove(&uid);
        }
        self.unused_since.retain(|uid, _| unused.contains(uid));
        Ok(deleted)
    }

    /// Whether garbage collection has to look again later: an object is waiting for its grace
    /// period to end, or one this agent allocated is not in the watched store yet (so whether
    /// it is used cannot be judged now).
    pub fn gc_pending(&self) -> bool {
        !self.unused_since.is_empty() || !self.recent.is_empty()
    }
}
