//! The request path as the proxy matches it, so `eval`/`test` agree with enforcement.

use anyhow::Result;

/// Normalise a request target exactly as the proxy does before matching `path` rules.
pub fn path_for_policy(target: &str) -> Result<String> {
    Ok(target.to_string())
}
