//! A redacting wrapper for cephx keys and other credentials.
//!
//! `Secret` can be cloned and passed around, but its `Debug` and `Display` never show the value,
//! so a key cannot leak through a log line, an error message or a panic.

use std::fmt;

#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The raw value. Call this only where the key is handed to librados or written to a 0600 file.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("AQBkey==");
        assert!(!format!("{s:?}").contains("AQB"));
        assert!(!format!("{s}").contains("AQB"));
        assert_eq!(s.expose(), "AQBkey==");
    }
}
