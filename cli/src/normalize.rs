//! The request path as the proxy matches it, so `eval`/`test` agree with enforcement.

use anyhow::{Result, anyhow};
use tollgate_parsers::path::{Options, normalize};

/// Normalise a request target exactly as the proxy does before matching `path` rules
/// (`tollgate_parsers::path`): `/public/../admin` becomes `/admin`; ambiguous encodings such as
/// `%2F` are errors, which the proxy answers with 400.
pub fn path_for_policy(target: &str) -> Result<String> {
    normalize(target, Options::default())
        .map(|n| n.as_str().to_string())
        .map_err(|e| {
            anyhow!("path `{target}` is rejected before policy (the proxy answers 400): {e}")
        })
}
