//! Thin gRPC adapters: validate fields, translate protobuf to domain types and back, and map
//! domain errors to `tonic::Status` in one place (`status`).

pub mod codec;
pub mod controller;
pub mod driver;
pub mod identity;
pub mod node;
pub mod registration;
pub mod server;
pub mod status;

/// Generated from `csi-spec/csi.proto` by `build.rs`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("csi_descriptor");
}

pub const DEFAULT_DRIVER_NAME: &str = "rbd.csi.ceph.rook.io";

/// `require(field, "volume_id")?` turns an empty required field into InvalidArgument.
pub fn require<'a>(value: &'a str, field: &str) -> Result<&'a str, tonic::Status> {
    if value.is_empty() {
        Err(tonic::Status::invalid_argument(format!(
            "{field} is required"
        )))
    } else {
        Ok(value)
    }
}
