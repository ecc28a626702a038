//! socklb's host side: a client library for socklb-agent (what a Kata
//! runtime links to push service tables into a sandbox) and the sources of
//! those tables.

pub mod backoff;
pub mod client;
#[cfg(feature = "kubernetes")]
pub mod node;
/// Without the `kubernetes` feature: of the node daemon, only its HTTP over
/// unix sockets (the tests' stand-in of Kata's shim serves it).
#[cfg(not(feature = "kubernetes"))]
pub mod node {
    pub mod http;
}
pub mod output;
pub mod sources;
pub mod trace;

pub use client::{AgentAddr, AgentClient, ClientError, Options, WriteResult};
