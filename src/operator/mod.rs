//! `rook-rbd operator`: Rook's CephCluster and CephBlockPool, reconciled with kube-rs.
//!
//! - `crd`: the resources as Rust types, from which the CRDs are generated.

pub mod crd;
