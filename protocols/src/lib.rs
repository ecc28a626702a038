//! socklb's host-to-guest API. `socklb` holds the messages, `socklb_ttrpc`
//! the async client and server; nothing else depends on how they were
//! generated. `address` is how either side writes where the agent is.

pub mod address;

include!(concat!(env!("OUT_DIR"), "/modules.rs"));

/// The protobuf runtime the messages were generated for.
pub use protobuf;

/// The API version a `VersionResponse` reports; clients refuse another major.
/// 1.1 added the Sync in parts (SyncBegin/SyncPart/SyncCommit) and List pages;
/// 1.2 the opt-out cgroups (SetOptOutCgroups, ListOptOutCgroups); 1.3
/// Digest (the table's digest without the table); 1.4 external VIPs
/// (`Service.vip_kind`); 1.5 Trace (the datapath's decisions, streamed).
pub const API_VERSION: &str = "1.5";

/// The largest message ttrpc sends or accepts, either way.
pub const TTRPC_MESSAGE_LIMIT: usize = ttrpc::proto::MESSAGE_LENGTH_MAX;

/// The most bytes of services one Sync part or one List page carries, and
/// the largest whole Sync sent in one message to an agent that takes parts.
/// A sender holds what is in flight encoded (ttrpc copies it once more), so
/// this, not the table's size, bounds a node daemon's memory per sandbox it
/// is syncing. Far below [`TTRPC_MESSAGE_LIMIT`], so the envelope always
/// fits.
pub const PART_BYTES: usize = 256 * 1024;

/// The guest vsock port socklb-agent serves on unless told otherwise. Kata's
/// guest services take 1024–1027 ([`KATA_GUEST_PORTS`]) and Kata has added
/// them upward from 1024; 1100 leaves that range room to grow and is no
/// port of another common guest service.
pub const DEFAULT_AGENT_PORT: u32 = 1100;

/// Guest vsock ports Kata Containers already uses, with the service on each
/// (kata-types `config/default.rs`, Kata's Developer Guide).
pub const KATA_GUEST_PORTS: [(u32, &str); 4] = [
    (1024, "the kata-agent API"),
    (1025, "kata-agent log forwarding (agent.log_vport)"),
    (1026, "Kata's debug console"),
    (1027, "Kata's passfd channel"),
];

/// The Kata service that uses guest vsock `port`, if any.
pub fn kata_service_on(port: u32) -> Option<&'static str> {
    KATA_GUEST_PORTS
        .iter()
        .find(|(used, _)| *used == port)
        .map(|(_, service)| *service)
}
