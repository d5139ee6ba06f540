//! gRPC request paths: `:path` is `/` Service-Name `/` Method-Name (gRPC over HTTP/2, "Requests").
//!
//! Why its own parser: policy matches gRPC rules on the service and the method, so the split must
//! be exact and anything that is not one service and one method must be visible as such — a
//! request whose path does not parse is judged as a plain HTTP request, where gRPC rules never
//! match (fail closed). Sans-IO and borrowing: the parts are slices of the path.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcPath<'a> {
    /// Fully qualified service name, e.g. `helloworld.Greeter`.
    pub service: &'a str,
    pub method: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcPathError {
    NoLeadingSlash,
    /// No `/` between service and method.
    NoMethod,
    EmptyService,
    EmptyMethod,
    /// More than two segments.
    ExtraSegments,
    /// A control character or a space.
    InvalidByte(u8),
}

impl fmt::Display for GrpcPathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrpcPathError::NoLeadingSlash => write!(f, "a gRPC path starts with `/`"),
            GrpcPathError::NoMethod => write!(f, "no `/Method` after the service"),
            GrpcPathError::EmptyService => write!(f, "empty service name"),
            GrpcPathError::EmptyMethod => write!(f, "empty method name"),
            GrpcPathError::ExtraSegments => write!(f, "more than `/Service/Method`"),
            GrpcPathError::InvalidByte(b) => write!(f, "byte 0x{b:02x} in a gRPC path"),
        }
    }
}

impl std::error::Error for GrpcPathError {}

/// Split `/Service/Method`.
pub fn parse_path(path: &str) -> Result<GrpcPath<'_>, GrpcPathError> {
    if let Some(b) = path.bytes().find(|b| b.is_ascii_control() || *b == b' ') {
        return Err(GrpcPathError::InvalidByte(b));
    }
    let rest = path
        .strip_prefix('/')
        .ok_or(GrpcPathError::NoLeadingSlash)?;
    let (service, method) = rest.split_once('/').ok_or(GrpcPathError::NoMethod)?;
    if service.is_empty() {
        return Err(GrpcPathError::EmptyService);
    }
    if method.is_empty() {
        return Err(GrpcPathError::EmptyMethod);
    }
    if method.contains('/') {
        return Err(GrpcPathError::ExtraSegments);
    }
    Ok(GrpcPath { service, method })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_and_method_are_split_exactly() {
        assert_eq!(
            parse_path("/helloworld.Greeter/SayHello"),
            Ok(GrpcPath {
                service: "helloworld.Greeter",
                method: "SayHello"
            })
        );
        assert_eq!(
            parse_path("/grpc.health.v1.Health/Check").unwrap().service,
            "grpc.health.v1.Health"
        );
    }

    #[test]
    fn anything_else_is_an_error_not_a_guess() {
        for (p, e) in [
            ("helloworld.Greeter/SayHello", GrpcPathError::NoLeadingSlash),
            ("/helloworld.Greeter", GrpcPathError::NoMethod),
            ("//SayHello", GrpcPathError::EmptyService),
            ("/helloworld.Greeter/", GrpcPathError::EmptyMethod),
            ("/a/b/c", GrpcPathError::ExtraSegments),
            ("/a/b\n", GrpcPathError::InvalidByte(b'\n')),
            ("/a b/c", GrpcPathError::InvalidByte(b' ')),
        ] {
            assert_eq!(parse_path(p), Err(e), "{p:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn a_parsed_path_is_exactly_its_parts(s in "/?[a-zA-Z./ ]{0,12}") {
            if let Ok(g) = parse_path(&s) {
                proptest::prop_assert_eq!(format!("/{}/{}", g.service, g.method), s.clone());
                proptest::prop_assert!(!g.method.contains('/'));
            }
        }
    }
}
