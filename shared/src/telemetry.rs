//! Tracing set-up shared by every binary.

use tracing_subscriber::EnvFilter;

/// Logs to stderr; `RUST_LOG` filters (default `info`), `CHAT_LOG_FORMAT=json`
/// switches to JSON lines.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests running several services) is harmless.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
