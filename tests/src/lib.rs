//! socklb's test harness: the sandbox (cgroup + bpffs + network
//! namespaces) with the real agent, the test VM, stand-ins of the
//! Kubernetes API server and of Kata's shim and agent, and helpers to find
//! the binaries under test and drive the shim library.

pub mod agent;
#[cfg(feature = "kubernetes")]
pub mod apiserver;
pub mod binaries;
pub mod process;
pub mod root;
pub mod sandbox;
pub mod shim;
pub mod standin;
pub mod vm;
pub mod workload;

pub use agent::Agent;
pub use binaries::{agent_bin, shim_bin};
pub use process::die_with_parent;
pub use sandbox::{
    BACKEND_HOSTS, CLIENT_IP, CLIENT_IP6, RunningClient, Sandbox, backend_ip, backend_ip6,
    cgroup2_mount,
};
pub use shim::{agent_client, runtime};
