//! tollgate's policy model: API types, validation with precise error paths, identities and
//! selectors, the compiled rule model and its evaluator.
//!
//! This crate does no I/O beyond parsing bytes it is handed and has no async runtime, so the
//! proxy, the agent and the CLI all share exactly one definition of what a policy means.

pub mod api;
pub mod yaml;
