//! Writing a [`Plan`] into the kernel maps through the datapath loader.

use tollgate_datapath::{Datapath, DatapathError, PolicyEntry};

use crate::plan::Plan;

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
        let who = format!("{}/{}", ep.namespace, ep.name);
        let Some(ifname) = &ep.interface else {
            out.unattached
                .push(format!("{who}: no interface in the inventory"));
            continue;
        };
        if !interface_exists(ifname) {
            out.unattached
                .push(format!("{who}: interface {ifname} does not exist"));
            continue;
        }
        dp.upsert_endpoint(ifname, ep.info)?;
        dp.attach(ifname)?;
        out.endpoints += 1;
    }
    Ok(out)
}

/// In the calling thread's network namespace (sysfs would show the namespace it was mounted in).
fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string; the call has no other preconditions.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}
