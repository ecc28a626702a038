//! The one way socklb's programs log: JSON lines on stderr through an async
//! drain (a slow stderr never blocks the datapath's control), filtered at
//! the level chosen at start, and flushed when the returned guard drops, so
//! the last lines before an exit are not lost.

use slog::{Drain as _, Level, Logger, o};

/// Keep this alive until the program's last log line: dropping it flushes
/// what is queued and stops the drain's thread.
pub type FlushGuard = slog_async::AsyncGuard;

/// The root logger of program `name`, and the guard that flushes it.
pub fn json(name: &'static str, level: Level) -> (Logger, FlushGuard) {
    let json = slog_json::Json::new(std::io::stderr())
        .add_default_keys()
        .build()
        .fuse();
    let (drain, guard) = slog_async::Async::new(json)
        .chan_size(4096)
        .build_with_guard();
    let logger = Logger::root(
        drain.filter_level(level).fuse(),
        o!("name" => name, "version" => env!("CARGO_PKG_VERSION")),
    );
    (logger, guard)
}

/// The levels, by the names `--log-level` takes.
pub const LEVELS: [(&str, Level); 6] = [
    ("critical", Level::Critical),
    ("error", Level::Error),
    ("warning", Level::Warning),
    ("info", Level::Info),
    ("debug", Level::Debug),
    ("trace", Level::Trace),
];

/// A level by name (`warn` too); the error lists the names.
pub fn parse_level(text: &str) -> Result<Level, String> {
    let text = if text == "warn" { "warning" } else { text };
    LEVELS
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, level)| *level)
        .ok_or_else(|| {
            let names: Vec<&str> = LEVELS.iter().map(|(name, _)| *name).collect();
            format!("log level {text:?} is not one of {}", names.join(", "))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_by_name() {
        assert_eq!(parse_level("debug"), Ok(Level::Debug));
        assert_eq!(parse_level("warn"), Ok(Level::Warning));
        let err = parse_level("loud").unwrap_err();
        assert!(
            err.contains("\"loud\"") && err.contains("critical, error"),
            "{err}"
        );
    }
}
