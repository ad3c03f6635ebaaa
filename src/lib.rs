//! rook-rbd: Ceph RBD block storage for Kubernetes.
//!
//! The library holds everything; `src/main.rs` is a thin command-line front end.

pub mod bench;
pub mod ceph;
pub mod client;
pub mod csi;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod operator;
pub mod secret;
pub mod volume;
