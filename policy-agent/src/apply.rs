//! Writing a [`Plan`] into the kernel maps through the datapath loader.

use tollgate_datapath::{Datapath, DatapathError, PolicyEntry};

use crate::plan::Plan;
use crate::route::ifindex;

/// What [`apply`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub endpoints: usize,
    pub ipcache: usize,
    pub policy: usize,
    /// Endpoints of the plan without an interface, or whose interface does not exist: their
    /// traffic is not enforced by the kernel (reported, never silently).
    pub unattached: Vec<String>,
}

/// Attach to every endpoint's interface and write the plan's map entries (ipcache and policy
/// first, then each endpoint's entry, then its programs, so no endpoint is enforced before its
/// entries are in place).
pub fn apply(dp: &mut Datapath, plan: &Plan) -> Result<Applied, DatapathError> {
    let mut out = Applied::default();
    dp.upsert_ipcache(&plan.ipcache)?;
    out.ipcache = plan.ipcache.len();
    let entries: Vec<PolicyEntry> = plan
        .policy
        .iter()
        .map(|e| PolicyEntry {
            key: e.key,
            value: e.value,
        })
        .collect();
    dp.upsert_policy(&entries)?;
    out.policy = entries.len();
    for ep in &plan.endpoints {
        let ifname = match attachable(ep) {
            Ok(i) => i,
            Err(why) => {
                out.unattached.push(why);
                continue;
            }
        };
        dp.upsert_endpoint(ifname, ep.info)?;
        dp.attach(ifname)?;
        out.endpoints += 1;
    }
    Ok(out)
}

/// The endpoint's interface, or why the kernel cannot enforce for it. Looked up in the calling
/// thread's network namespace (sysfs would show the namespace it was mounted in).
fn attachable(ep: &crate::plan::PlanEndpoint) -> Result<&str, String> {
    let who = format!("{}/{}", ep.namespace, ep.name);
    let ifname = ep
        .interface
        .as_deref()
        .ok_or_else(|| format!("{who}: no interface in the inventory"))?;
    ifindex(ifname)
        .map(|_| ifname)
        .ok_or_else(|| format!("{who}: interface {ifname} does not exist"))
}

/// What [`update`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Updated {
    pub policy_written: usize,
    pub policy_removed: usize,
    pub ipcache_written: usize,
    pub ipcache_removed: usize,
    pub endpoints_written: usize,
    pub endpoints_removed: usize,
    pub unattached: Vec<String>,
}

/// Move the kernel from `old` to `new`, writing only what changed: new and changed entries
/// first, then endpoints, then removal of what `new` no longer has, so that at no point a flow
/// the new policy allows finds its entry missing. Established flows keep their verdict (the
/// connection tracker), as in Cilium; new flows see the new policy.
pub fn update(dp: &mut Datapath, old: &Plan, new: &Plan) -> Result<Updated, DatapathError> {
    use std::collections::{HashMap, HashSet};
    let mut out = Updated::default();

    let old_ip: HashMap<_, _> = old.ipcache.iter().copied().collect();
    let ip_changed: Vec<_> = new
        .ipcache
        .iter()
        .copied()
        .filter(|(n, id)| old_ip.get(n) != Some(id))
        .collect();
    dp.upsert_ipcache(&ip_changed)?;
    out.ipcache_written = ip_changed.len();

    let old_pol: HashMap<_, _> = old.policy.iter().map(|e| (e.key, e.value)).collect();
    let pol_changed: Vec<PolicyEntry> = new
        .policy
        .iter()
        .filter(|e| old_pol.get(&e.key) != Some(&e.value))
        .map(|e| PolicyEntry {
            key: e.key,
            value: e.value,
        })
        .collect();
    dp.upsert_policy(&pol_changed)?;
    out.policy_written = pol_changed.len();

    let old_eps: HashMap<_, _> = old
        .endpoints
        .iter()
        .filter_map(|e| e.interface.as_ref().map(|i| (i.clone(), e.info)))
        .collect();
    let mut present = HashSet::new();
    for ep in &new.endpoints {
        let ifname = match attachable(ep) {
            Ok(i) => i,
            Err(why) => {
                out.unattached.push(why);
                continue;
            }
        };
        present.insert(ifname.to_string());
        // An interface the old plan had, but not the one it attached to: the name came back
        // on a new interface (a pod deleted and created again under its name, whose veth name
        // the CNI derives from it). Its links are stale: attach afresh.
        let renewed = old_eps.contains_key(ifname)
            && match ifindex(ifname) {
                Some(idx) => dp.endpoint(idx)?.is_none(),
                None => false,
            };
        if renewed {
            dp.detach(ifname)?;
        }
        if old_eps.get(ifname) != Some(&ep.info) || renewed {
            dp.upsert_endpoint(ifname, ep.info)?;
            if !old_eps.contains_key(ifname) || renewed {
                dp.attach(ifname)?;
            }
            out.endpoints_written += 1;
        }
    }
    for ifname in old_eps.keys().filter(|i| !present.contains(*i)) {
        if let Some(idx) = ifindex(ifname) {
            dp.remove_endpoint(idx)?;
        }
        // The pinned links go even when the interface is gone (a deleted pod's veth): an
        // interface created later under the same name (the pod recreated) gets fresh ones.
        dp.detach(ifname)?;
        out.endpoints_removed += 1;
    }

    let new_keys: HashSet<_> = new.policy.iter().map(|e| e.key).collect();
    let stale: Vec<_> = old
        .policy
        .iter()
        .map(|e| e.key)
        .filter(|k| !new_keys.contains(k))
        .collect();
    dp.remove_policy(&stale)?;
    out.policy_removed = stale.len();
    let new_nets: HashSet<_> = new.ipcache.iter().map(|(n, _)| *n).collect();
    let stale_nets: Vec<_> = old
        .ipcache
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| !new_nets.contains(n))
        .collect();
    dp.remove_ipcache(&stale_nets)?;
    out.ipcache_removed = stale_nets.len();
    Ok(out)
}
