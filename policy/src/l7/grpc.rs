//! gRPC rules (TollgatePolicy): `service` (full name, e.g. `helloworld.Greeter`) and optional
//! `method`, matched exactly against the call's `/package.Service/Method` path.

use super::L7Error;
use crate::api;

/// A gRPC call as parsed from its HTTP/2 `:path`.
#[derive(Debug, Clone, Copy)]
pub struct GrpcCall<'a> {
    pub service: &'a str,
    pub method: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledGrpcRule {
    service: String,
    method: Option<String>,
}

fn valid_ident(s: &str, dots: bool) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || (dots && c == '.'))
}

pub fn compile_grpc_rule(r: &api::GrpcRule) -> Result<CompiledGrpcRule, L7Error> {
    let Some(service) = &r.service else {
        return Err(L7Error::new(
            "service",
            "a gRPC rule needs `service` (e.g. helloworld.Greeter)",
        ));
    };
    if !valid_ident(service, true) || service.starts_with('.') || service.ends_with('.') {
        return Err(L7Error::new(
            "service",
            format!("`{service}` is not a fully-qualified gRPC service name"),
        ));
    }
    if let Some(m) = &r.method
        && !valid_ident(m, false)
    {
        return Err(L7Error::new(
            "method",
            format!("`{m}` is not a gRPC method name"),
        ));
    }
    Ok(CompiledGrpcRule {
        service: service.clone(),
        method: r.method.clone(),
    })
}

#[derive(Debug, Clone, Default)]
pub struct GrpcRuleSet {
    rules: Vec<CompiledGrpcRule>,
}

impl GrpcRuleSet {
    pub fn new(rules: Vec<CompiledGrpcRule>) -> GrpcRuleSet {
        GrpcRuleSet { rules }
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Push the index of every rule matching `call`.
    pub fn matching(&self, call: &GrpcCall<'_>, out: &mut Vec<usize>) {
        for (i, r) in self.rules.iter().enumerate() {
            if r.service == call.service && r.method.as_deref().is_none_or(|m| m == call.method) {
                out.push(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(service: Option<&str>, method: Option<&str>) -> api::GrpcRule {
        api::GrpcRule {
            service: service.map(str::to_string),
            method: method.map(str::to_string),
            action: None,
        }
    }

    #[test]
    fn service_and_optional_method() {
        let set = GrpcRuleSet::new(vec![
            compile_grpc_rule(&r(Some("helloworld.Greeter"), Some("SayHello"))).unwrap(),
            compile_grpc_rule(&r(Some("helloworld.Admin"), None)).unwrap(),
        ]);
        let mut out = Vec::new();
        set.matching(
            &GrpcCall {
                service: "helloworld.Greeter",
                method: "SayHello",
            },
            &mut out,
        );
        set.matching(
            &GrpcCall {
                service: "helloworld.Greeter",
                method: "Other",
            },
            &mut out,
        );
        set.matching(
            &GrpcCall {
                service: "helloworld.Admin",
                method: "Any",
            },
            &mut out,
        );
        assert_eq!(out, vec![0, 1]);
    }

    #[test]
    fn validation() {
        assert_eq!(
            compile_grpc_rule(&r(None, Some("x"))).unwrap_err().message,
            "a gRPC rule needs `service` (e.g. helloworld.Greeter)"
        );
        assert_eq!(
            compile_grpc_rule(&r(Some("/pkg.Svc"), None))
                .unwrap_err()
                .message,
            "`/pkg.Svc` is not a fully-qualified gRPC service name"
        );
        assert_eq!(
            compile_grpc_rule(&r(Some("pkg.Svc"), Some("a/b")))
                .unwrap_err()
                .path,
            "method"
        );
    }
}
