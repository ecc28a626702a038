//! The agent's one logger: JSON lines on stderr through an async drain.

use slog::{Drain as _, Logger, o};

pub fn logger(level: slog::Level) -> Logger {
    let json = slog_json::Json::new(std::io::stderr())
        .add_default_keys()
        .build()
        .fuse();
    let drain = slog_async::Async::new(json)
        .chan_size(4096)
        .build()
        .filter_level(level)
        .fuse();
    Logger::root(
        drain,
        o!("name" => "socklb-agent", "version" => env!("CARGO_PKG_VERSION")),
    )
}
