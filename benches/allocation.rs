//! Allocation benchmarks.
fn main() {}
