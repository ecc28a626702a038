//! socklb's host-to-guest API. `socklb` holds the messages, `socklb_ttrpc`
//! the async client and server; nothing else depends on how they were
//! generated.

include!(concat!(env!("OUT_DIR"), "/modules.rs"));

/// The protobuf runtime the messages were generated for.
pub use protobuf;

/// The API version a `VersionResponse` reports; clients refuse another major.
pub const API_VERSION: &str = "1.0";
