//! The service table both ends of socklb share. A table is validated
//! whole before anything touches the kernel; every error names the service
//! and the field.
//!
//! - [`model`]: services, keys, tables and their validation;
//! - [`file`]: the file format people write (YAML or JSON);
//! - [`api`]: the `socklb.v1` message form;
//! - [`digest`]: what both ends compare after a Sync;
//! - [`memory`]: the heap a whole table freed, handed back;
//! - [`error`]: what goes wrong, naming service and field.

pub mod api;
pub mod digest;
pub mod error;
pub mod file;
pub mod memory;
pub mod model;

pub use error::TableError;
pub use file::TableFile;
pub use memory::release_freed_memory;
pub use model::{
    DEFAULT_AFFINITY_TIMEOUT_SECS, MAX_AFFINITY_TIMEOUT_SECS, MAX_BACKENDS_PER_SERVICE, Protocol,
    Service, ServiceKey, Table, VipKind, check_capacity, fit_capacity,
};
/// The datapath's capacity, which every table is checked against.
pub use socklb_common::{MAX_BACKEND_SLOTS, MAX_SERVICES};
