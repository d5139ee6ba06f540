//! Sans-IO protocol parsers: bytes in, typed values or a precise error out.
