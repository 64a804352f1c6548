//! The log on standard error: plain text for people, or one JSON object per line for log
//! collectors (`--log-format json`), both from tracing-subscriber.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's
    /// fields (`queue_id`, `call_id`, `peer`, `rcpt`, `reason`, ...) at the top level; the
    /// fields of the enclosing span (the call, the SMTP session) under `span`.
    Json,
}

/// Install the global subscriber. `filter` is used unless RUST_LOG is set.
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // Never colored: escape codes inside JSON strings would break parsers downstream.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_ansi(false)
            .init(),
    }
}
