//! Deterministic image names from CSI request names: the same request name always maps to the
//! same image, so idempotency needs no journal and no extra round trip.

use sha2::{Digest, Sha256};

pub const VOLUME_PREFIX: &str = "csi-vol-";
pub const SNAPSHOT_PREFIX: &str = "csi-snap-";
/// A snapshot taken on a source image only long enough to clone it.
pub const TEMP_SNAP_PREFIX: &str = "csi-tmp-";

/// 80 bits of SHA-256, hex: collisions are out of reach and IDs stay well under 128 bytes.
pub fn digest(name: &str) -> String {
    let d = Sha256::digest(name.as_bytes());
    d.iter().take(10).map(|b| format!("{b:02x}")).collect()
}

pub fn volume_image(prefix: Option<&str>, request_name: &str) -> String {
    format!(
        "{}{}",
        prefix.unwrap_or(VOLUME_PREFIX),
        digest(request_name)
    )
}

pub fn snapshot_image(request_name: &str) -> String {
    format!("{SNAPSHOT_PREFIX}{}", digest(request_name))
}

/// The temporary snapshot on a source used to build `target` (a clone or a snapshot image).
pub fn temp_snap(target: &str) -> String {
    format!("{TEMP_SNAP_PREFIX}{target}")
}

pub fn is_snapshot_image(image: &str) -> bool {
    image.starts_with(SNAPSHOT_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_deterministic_and_distinct() {
        assert_eq!(volume_image(None, "pvc-1"), volume_image(None, "pvc-1"));
        assert_ne!(volume_image(None, "pvc-1"), volume_image(None, "pvc-2"));
        assert_eq!(volume_image(None, "pvc-1").len(), VOLUME_PREFIX.len() + 20);
        assert!(is_snapshot_image(&snapshot_image("s")));
        assert!(!is_snapshot_image(&volume_image(None, "s")));
    }
}
