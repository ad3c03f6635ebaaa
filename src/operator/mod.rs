//! `rook-rbd operator`: Rook's CephCluster and CephBlockPool, reconciled with kube-rs.
//!
//! - `crd`: the resources as Rust types, from which the CRDs are generated.
//! - `fields`: which spec fields are kept but not acted on (the `FieldsNotImplemented` condition).
//! - `installed`: whether the CRDs the API server serves are this binary's.
//! - `identity`, `endpoints`: the cluster's fsid and keys, and its mons' addresses, in Rook's form.
//! - `cluster_controller`: the CephCluster reconciler; `run`: the `operator` subcommand.

pub mod cluster_controller;
pub mod crd;
pub mod endpoints;
pub mod external;
pub mod fields;
pub mod identity;
pub mod installed;
pub mod pool_controller;
pub mod run;
