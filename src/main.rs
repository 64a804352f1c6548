#![forbid(unsafe_code)]
//! The `sipmail` command. Library errors are typed; `anyhow` only lives here.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
