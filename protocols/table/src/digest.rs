//! The digest both ends compare after a Sync.

use std::net::SocketAddr;

use sha2::{Digest as _, Sha256};

use crate::Table;

impl Table {
    /// SHA-256 (hex) of what the datapath holds: every service's key,
    /// affinity and backend set, independent of order and names. Both ends
    /// compute it: the agent from the maps, the host from what it sent.
    pub fn digest(&self) -> String {
        let mut lines: Vec<String> = self
            .services
            .iter()
            .map(|service| {
                let mut backends: Vec<SocketAddr> = service.backends.clone();
                backends.sort();
                let backends: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
                format!(
                    "{} {} {}\n",
                    service.key,
                    service.affinity_timeout_secs.unwrap_or(0),
                    backends.join(",")
                )
            })
            .collect();
        lines.sort();
        let hash = Sha256::digest(lines.concat().as_bytes());
        hash.iter().map(|byte| format!("{byte:02x}")).collect()
    }
}
