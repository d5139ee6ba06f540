//! `tollgate`: the one binary.
fn main() {}
