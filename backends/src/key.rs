//! Keys: validated once, at the edge.

use std::fmt;

use crate::BackendError;

/// Longest key accepted, in bytes.
pub const KEY_BYTES_MAX: usize = 1024;

/// A validated key: 1 to [`KEY_BYTES_MAX`] bytes of UTF-8 without control characters.
///
/// ```
/// use geostate_backends::Key;
/// assert!(Key::new("cart:42").is_ok());
/// assert!(Key::new("").is_err());
/// assert!(Key::new("bad\nkey").is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

impl Key {
    /// Validates `key`.
    pub fn new(key: impl Into<String>) -> Result<Self, BackendError> {
        let key = key.into();
        let reason = if key.is_empty() {
            Some("empty key")
        } else if key.len() > KEY_BYTES_MAX {
            Some("key longer than 1024 bytes")
        } else if key.chars().any(char::is_control) {
            Some("key contains a control character")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(BackendError::InvalidKey {
                key: key.chars().take(64).collect(),
                reason,
            }),
            None => Ok(Self(key)),
        }
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for Key {
    type Error = BackendError;

    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Key::new(value)
    }
}

impl TryFrom<String> for Key {
    type Error = BackendError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Key::new(value)
    }
}

impl std::borrow::Borrow<str> for Key {
    fn borrow(&self) -> &str {
        &self.0
    }
}
