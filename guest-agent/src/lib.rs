//! socklb-agent: the guest side of socklb. It loads the socket-LB eBPF
//! programs, attaches them to the guest's root cgroup, pins everything so
//! the datapath outlives the agent, and programs service tables.

pub mod addresses;
pub mod config;
pub mod datapath;
pub mod kernel;
pub mod opt_out;
pub mod peers;
pub mod rpc;
pub mod server;
pub mod service_table;
pub mod sockets;
