//! tollgate's policy model: API types, validation with precise error paths, identities and
//! selectors, the compiled rule model and its evaluator.
//!
//! This crate does no I/O beyond parsing text it is handed and has no async runtime, so the
//! proxy, the agent and the CLI share exactly one definition of what a policy means.
//!
//! Flow: [`yaml`] (text → values + line index) → [`load`] (documents → [`model`] rules and
//! [`load::Diagnostic`]s) → [`eval::Evaluator`] (rules → verdicts with attribution);
//! [`check`] runs a whole source-egress + destination-ingress path for the CLI.

pub mod api;
pub mod check;
pub mod endpoints;
pub mod eval;
pub mod l7;
pub mod labels;
pub mod load;
pub mod model;
pub mod peer;
pub mod yaml;
