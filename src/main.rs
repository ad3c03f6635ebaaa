fn main() {
    println!("rook-rbd {}", env!("CARGO_PKG_VERSION"));
}
