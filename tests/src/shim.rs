//! Driving the shim library from synchronous tests.

/// A single-threaded tokio runtime for driving the async shim library.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A socklb-shim library client for `addr`, logging nowhere.
pub fn agent_client(addr: &str, options: socklb_shim::Options) -> socklb_shim::AgentClient {
    let log = slog::Logger::root(slog::Discard, slog::o!());
    socklb_shim::AgentClient::new(addr.parse().expect("agent address"), options, &log)
}
