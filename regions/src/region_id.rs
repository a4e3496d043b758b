//! Region names.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::RegionError;

/// A region's name, such as `us-east`: 1 to 32 characters of lowercase ASCII letters, digits
/// and `-`, starting with a letter.
///
/// ```
/// use geostate_regions::RegionId;
/// assert!(RegionId::new("us-east").is_ok());
/// assert!(RegionId::new("US East").is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RegionId(String);

impl RegionId {
    /// Validates a region name.
    pub fn new(name: impl Into<String>) -> Result<Self, RegionError> {
        let name = name.into();
        let valid = (1..=32).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if valid {
            Ok(Self(name))
        } else {
            Err(RegionError::Config(format!(
                "invalid region name {name:?}: use 1-32 of a-z, 0-9 and '-', starting with a letter"
            )))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for RegionId {
    type Error = RegionError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        RegionId::new(value)
    }
}

impl From<RegionId> for String {
    fn from(value: RegionId) -> Self {
        value.0
    }
}
