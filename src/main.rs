#![forbid(unsafe_code)]
//! The `sipmail` command. Library errors are typed; `anyhow` only lives here.

mod cli;

/// mimalloc rather than glibc's malloc: the relay allocates and frees many small buffers per
/// message across tokio's worker threads; docs/PERFORMANCE.md has the measurement.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
