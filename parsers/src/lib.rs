//! Sans-IO protocol parsers: bytes in, typed values or a precise error out.

pub mod path;
pub mod tls;
