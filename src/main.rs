//! The `sticky-proxy` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    sticky_proxy::cli::main()
}
