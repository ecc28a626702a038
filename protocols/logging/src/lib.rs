//! The one way socklb's programs log: on stderr through an async drain (a
//! slow stderr never blocks the datapath's control), filtered at the level
//! chosen at start, and flushed when the returned guard drops, so the last
//! lines before an exit are not lost. Daemons write JSON lines; a one-shot
//! command at a terminal writes lines for a person.

use slog::{Drain, Level, Logger, o};

/// Keep this alive until the program's last log line: dropping it flushes
/// what is queued and stops the drain's thread.
pub type FlushGuard = slog_async::AsyncGuard;

/// How the lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One JSON object a line, with the program's name and version: for
    /// log collectors, and for scripts reading a pipe.
    Json,
    /// `time LEVEL message, key: value, ...`, coloured at a terminal: for
    /// a person. The name and version are left out: the person knows what
    /// they ran.
    Human,
}

/// The root logger of program `name` writing JSON lines, and the guard
/// that flushes it.
pub fn json(name: &'static str, level: Level) -> (Logger, FlushGuard) {
    logger(name, level, Format::Json)
}

/// The root logger of program `name` in `format`, and the guard that
/// flushes it.
pub fn logger(name: &'static str, level: Level, format: Format) -> (Logger, FlushGuard) {
    match format {
        Format::Json => {
            let json = slog_json::Json::new(std::io::stderr())
                .add_default_keys()
                .build()
                .fuse();
            root(
                json,
                level,
                o!("name" => name, "version" => env!("CARGO_PKG_VERSION")),
            )
        }
        Format::Human => {
            let decorator = slog_term::TermDecorator::new().stderr().build();
            root(human(decorator).fuse(), level, o!())
        }
    }
}

/// The human format over `decorator` (the terminal, or a buffer in tests).
fn human<D: slog_term::Decorator>(decorator: D) -> slog_term::FullFormat<D> {
    slog_term::FullFormat::new(decorator).build()
}

fn root<D>(
    drain: D,
    level: Level,
    keys: slog::OwnedKV<impl slog::SendSyncRefUnwindSafeKV + 'static>,
) -> (Logger, FlushGuard)
where
    D: Drain<Ok = (), Err = slog::Never> + Send + 'static,
{
    let (drain, guard) = slog_async::Async::new(drain)
        .chan_size(4096)
        .build_with_guard();
    (Logger::root(drain.filter_level(level).fuse(), keys), guard)
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
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use slog::warn;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn human_lines_read_as_text_with_their_keys() {
        let buffer = Buffer::default();
        let decorator = slog_term::PlainSyncDecorator::new(buffer.clone());
        let log = Logger::root(human(decorator).fuse(), o!("agent" => "unix:///a.sock"));
        warn!(log, "the agent is not answering yet; waiting"; "up_to_s" => 2);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains(
                "WARN the agent is not answering yet; waiting, up_to_s: 2, agent: unix:///a.sock"
            ),
            "{text}"
        );
        assert!(!text.contains('{'), "{text}");
    }

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
