//! Sans-IO protocol parsers: bytes in, typed values or a precise error out.

pub mod dns;
pub mod grpc;
pub mod http1;
pub mod kafka;
pub mod path;
pub mod tls;
