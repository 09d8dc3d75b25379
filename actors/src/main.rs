//! The `gridweaver` binary: see `gridweaver --help` and the README.

fn main() -> std::process::ExitCode {
    gridweaver_actors::cli::main()
}
