//! Where service tables come from: a table file, or a Kubernetes cluster.

pub mod file;
#[cfg(feature = "kubernetes")]
pub mod kube_watch;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
#[cfg(feature = "kubernetes")]
pub mod trim;
