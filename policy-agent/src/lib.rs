//! The policy agent: policy sources, identities, compilation, map writer and rule-set server.
//!
//! Filled in by the agent issue; the crate exists so the workspace has its final shape.
