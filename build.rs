//! Compiles csi-spec/csi.proto and csi-spec/pluginregistration.proto with tonic-prost-build, and
//! links librados/librbd.
//! protoc comes from Debian's protobuf-compiler (the Makefile's `deps` target installs it).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csi-spec/csi.proto");
    println!("cargo:rerun-if-changed=csi-spec/pluginregistration.proto");
    println!("cargo:rustc-link-lib=rados");
    println!("cargo:rustc-link-lib=rbd");

    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut includes = vec!["csi-spec"];
    // Debian keeps the well-known types (descriptor, timestamp, wrappers) here.
    if std::path::Path::new("/usr/include/google/protobuf/descriptor.proto").exists() {
        includes.push("/usr/include");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(out.join("csi_descriptor.bin"))
        .codec_path("crate::csi::codec::StrictCodec")
        .compile_protos(&["csi-spec/csi.proto"], &includes)?;
    // kubelet's plugin registration API: we serve it; the client is for tests that play kubelet.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["csi-spec/pluginregistration.proto"], &["csi-spec"])?;
    Ok(())
}
