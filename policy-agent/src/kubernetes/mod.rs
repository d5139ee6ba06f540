//! Kubernetes as the source of policy and endpoints (issue 7 items 1–2).
//!
//! [`source::start`] watches CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy,
//! TollgatePolicy, Pods and Namespaces (and TollgateIdentity for cluster-wide identities) with
//! kube-runtime reflectors and turns them into exactly the inputs of directory mode
//! ([`objects`]: one policy document per object for `tollgate_policy::load::PolicySet`, pods and
//! namespaces into a `tollgate_policy::endpoints::Inventory`), debounced into one recompile per
//! burst of changes. [`status`] reports what was wrong (a `Valid` condition on TollgatePolicy,
//! Events on the kinds we do not own), [`identity`] numbers label sets cluster-wide.
//!
//! Tested against an in-process fake API server (`tests/kube_*.rs`); no real API server runs in
//! this project's test environment.

pub mod identity;
pub mod objects;
pub mod source;
pub mod status;
