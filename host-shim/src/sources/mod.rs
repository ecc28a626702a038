//! Where service tables come from: a table file, or a Kubernetes cluster.

pub mod file;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
