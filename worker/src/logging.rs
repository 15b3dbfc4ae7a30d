//! Installs the `tracing` subscriber. Only the binary does this; libraries just emit events.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Logs go to standard error so that standard output stays machine-readable (`--json`).
pub fn install(format: LogFormat, verbose: u8) {
    // lapin logs every returned (unroutable) message at WARN with its whole body: the
    // worker reports those itself, once, without the body.
    let default = match verbose {
        0 => "info,lapin=error",
        1 => "debug,lapin=warn",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    // A second install (tests calling into the binary's library) is harmless.
    let _ = result;
}
