//! `rook-rbd operator`: Rook's CephCluster and CephBlockPool, reconciled with kube-rs.
//!
//! - `crd`: the resources as Rust types, from which the CRDs are generated.
//! - `fields`: which spec fields are kept but not acted on (the `FieldsNotImplemented` condition).
//! - `installed`: whether the CRDs the API server serves are this binary's.

pub mod crd;
pub mod fields;
pub mod installed;
