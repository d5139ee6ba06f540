//! Sans-IO protocol parsers: bytes in, typed values or a precise error out.

pub mod alloc;
pub mod dns;
pub mod grpc;
pub mod http1;
pub mod kafka;
pub mod path;
pub mod tls;

// The unit tests decode hostile frames: run them under the allocator the proxy uses.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOC: alloc::LazyHugeAlloc = alloc::LazyHugeAlloc;
