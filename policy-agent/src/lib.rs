//! The policy agent: turns policy and endpoints into enforcement.
//!
//! Today: [`plan`] compiles a policy set and an endpoints inventory into the kernel datapath's
//! map contents (endpoints, ipcache, policy entries, redirects to the proxy), and [`apply`]
//! writes a plan through the datapath loader. Sources (directory watch, Kubernetes), identity
//! allocation across nodes and the rule-set stream to the proxy are the rest of issue 7.

pub mod apply;
pub mod crd;
pub mod kubernetes;
pub mod plan;
