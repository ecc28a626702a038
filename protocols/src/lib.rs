//! socklb's host-to-guest API. `socklb` holds the messages, `socklb_ttrpc`
//! the async client and server; nothing else depends on how they were
//! generated.

include!(concat!(env!("OUT_DIR"), "/modules.rs"));

/// The protobuf runtime the messages were generated for.
pub use protobuf;

/// The API version a `VersionResponse` reports; clients refuse another major.
/// 1.1 added the Sync in parts (SyncBegin/SyncPart/SyncCommit) and List pages.
pub const API_VERSION: &str = "1.1";

/// The largest message ttrpc sends or accepts, either way.
pub const TTRPC_MESSAGE_LIMIT: usize = ttrpc::proto::MESSAGE_LENGTH_MAX;

/// The most bytes of services one Sync part or one List page carries: half
/// of [`TTRPC_MESSAGE_LIMIT`], leaving ample room for the envelope.
pub const PART_BYTES: usize = TTRPC_MESSAGE_LIMIT / 2;
