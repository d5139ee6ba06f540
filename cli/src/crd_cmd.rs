//! `tollgate crd [KIND]`: print tollgate's CustomResourceDefinitions generated from the Rust
//! types — all of them, or the one of `KIND` (`TollgatePolicy`, `TollgateIdentity`). Each
//! committed `deploy/crds/tollgate.io_<plural>.yaml` must equal `tollgate crd KIND`.

use anyhow::bail;

pub fn run(kind: Option<&str>) -> anyhow::Result<bool> {
    let all = tollgate_agent::crd::all_crds();
    let chosen: Vec<_> = all
        .iter()
        .filter(|(k, _)| kind.is_none_or(|want| want == *k))
        .collect();
    if chosen.is_empty() {
        let kinds: Vec<&str> = all.iter().map(|(k, _)| *k).collect();
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
