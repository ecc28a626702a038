//! Where service tables come from: a table file, or a Kubernetes cluster.

pub mod file;
pub mod kube_watch;
pub mod kubernetes;
pub mod trim;
