//! The policy agent: turns policy and endpoints into enforcement.
//!
//! * [`plan`] compiles a policy set and an endpoints inventory into the kernel datapath's map
//!   contents (endpoints, ipcache, policy entries, redirects to the proxy); [`apply`] writes a
//!   plan, or the diff between two, through the datapath loader.
//! * [`kubernetes`] is the Kubernetes source: watches the policy kinds, Pods and Namespaces and
//!   turns them into the same inputs as a policy directory and inventory file, allocates
//!   cluster-wide identities (`TollgateIdentity` objects), writes TollgatePolicy status and
//!   events for the kinds we do not own. [`kubernetes::node`] turns a snapshot into what one
//!   node enforces (its pods, their interfaces from the kernel's routes: [`route`]) and the
//!   rule sets a proxy is served.
//! * [`rulesets`] serves versioned rule sets to proxies (`tollgate_api::v1::RuleSets`) and
//!   keeps each proxy's ACK/NACK; [`learned`] keeps the IPs proxies learned from DNS answers
//!   (`toFQDNs`), by proxy, and serves the stream they report them on (`tollgate_api::v1::Fqdn`).
//! * [`metrics`]: the agent's Prometheus metrics.
//! * [`crd`] generates the CRDs (`TollgatePolicy` from the policy types, `TollgateIdentity`).

pub mod apply;
pub mod crd;
pub mod kubernetes;
pub mod learned;
pub mod metrics;
pub mod plan;
pub mod route;
pub mod rulesets;
