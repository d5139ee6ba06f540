//! `tollgate crd [KIND]`: print tollgate's CustomResourceDefinitions generated from the Rust
//! types — tollgate's own (`TollgatePolicy`, `TollgateIdentity`), or the one of `KIND`, which
//! may also be one of Cilium's (`CiliumNetworkPolicy`, `CiliumClusterwideNetworkPolicy`, for
//! clusters without Cilium; never printed unasked, so `tollgate crd | kubectl apply -f -` leaves
//! an installed Cilium's CRDs alone). Each committed `deploy/crds/<group>_<plural>.yaml` must
//! equal `tollgate crd KIND`.

use anyhow::bail;

pub fn run(kind: Option<&str>) -> anyhow::Result<bool> {
    let all: Vec<_> = tollgate_agent::crd::all_crds()
        .into_iter()
        .map(|c| (c, true))
        .chain(
            tollgate_agent::crd::cilium_crds()
                .into_iter()
                .map(|c| (c, false)),
        )
        .collect();
    let chosen: Vec<_> = all
        .iter()
        .filter(|((k, _), own)| kind.map_or(*own, |want| want == *k))
        .map(|(c, _)| c)
        .collect();
    if chosen.is_empty() {
        let kinds: Vec<&str> = all.iter().map(|((k, _), _)| *k).collect();
        bail!(
            "no CRD of kind `{}` (known: {})",
            kind.unwrap_or(""),
            kinds.join(", ")
        );
    }
    for (k, crd) in chosen {
        print!("{}", tollgate_agent::crd::crd_file(k, crd));
    }
    Ok(true)
}
