//! Node side: mapping images to block devices, filesystems and mounts.
