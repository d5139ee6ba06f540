//! Kubernetes as the source of policy and endpoints (issue 7 items 1–2).
//!
//! [`source::start`] watches CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy,
//! TollgatePolicy, Pods and Namespaces (and TollgateIdentity for cluster-wide identities) with
//! kube-runtime reflectors and turns them into exactly the inputs of directory mode
//! ([`objects`]: one policy document per object for `tollgate_policy::load::PolicySet`, pods and
//! namespaces into a `tollgate_policy::endpoints::Inventory`), debounced into one recompile per
//! burst of changes. [`status`] reports what was wrong (a `Valid` condition on TollgatePolicy,
//! Events on the kinds we do not own), [`identity`] numbers label sets cluster-wide, and
//! [`node`] takes what one node enforces out of a snapshot (`tollgate up --kubernetes`).
//!
//! Tested against an in-process fake API server (`tests/kube_*.rs`); no real API server runs in
//! this project's test environment.

pub mod identity;
pub mod node;
pub mod objects;
pub mod source;
pub mod status;

/// Every (API group, resource, verbs) the Kubernetes source uses. The ClusterRole in `deploy/`
/// grants these, and for the resources the agent writes nothing more (`cli/tests/deploy.rs`).
pub const API_ACCESS: &[(&str, &str, &[&str])] = &[
    ("cilium.io", "ciliumnetworkpolicies", &["list", "watch"]),
    (
        "cilium.io",
        "ciliumclusterwidenetworkpolicies",
        &["list", "watch"],
    ),
    ("networking.k8s.io", "networkpolicies", &["list", "watch"]),
    ("tollgate.io", "tollgatepolicies", &["list", "watch"]),
    ("tollgate.io", "tollgatepolicies/status", &["patch"]),
    (
        "tollgate.io",
        "tollgateidentities",
        &["get", "list", "watch", "create", "delete"],
    ),
    ("", "pods", &["list", "watch"]),
    ("", "namespaces", &["list", "watch"]),
    ("", "events", &["create"]),
];

/// A client from `kubeconfig`, or else the usual places (in-cluster service account,
/// `$KUBECONFIG`, `~/.kube/config`).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<::kube::Client> {
    use anyhow::Context;
    let config = match kubeconfig {
        Some(path) => {
            let kc = ::kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            ::kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using {}", path.display()))?
        }
        None => ::kube::Config::infer()
            .await
            .context("no Kubernetes configuration (in-cluster, $KUBECONFIG or ~/.kube/config)")?,
    };
    ::kube::Client::try_from(config).context("building the Kubernetes client")
}
