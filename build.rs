fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-lib=rados");
    println!("cargo:rustc-link-lib=rbd");
}
