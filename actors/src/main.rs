//! The `gridweaver` binary.
fn main() {}
