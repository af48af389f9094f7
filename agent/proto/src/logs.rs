//! Log set-up shared by the agent and the proxy, so both read and filter alike.

/// `RUST_LOG` filters (default info); `json` writes one JSON object per line.
pub fn init(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colour only for a terminal: logs usually land in files and collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json { b.json().init() } else { b.init() }
}
