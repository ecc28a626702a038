//! socklb's host side: a client library for socklb-agent (what a Kata
//! runtime links to push service tables into a sandbox) and the sources of
//! those tables.

pub mod addr;
pub mod backoff;
pub mod client;
pub mod connect;
pub mod node;
pub mod sources;

pub use addr::AgentAddr;
pub use client::{AgentClient, ClientError, Options, WriteResult};
