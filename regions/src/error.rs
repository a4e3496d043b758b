//! The one error type of the regions crate.

use geostate_backends::BackendError;
use geostate_crdt::TypeTag;
use thiserror::Error;

/// Why a region operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RegionError {
    /// The store refused or failed the operation (invalid key, corrupt value, size limit,
    /// version conflict, store unavailable, ...).
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The key holds a value of another type than the one asked for.
    #[error("key {key:?} holds a {found}, not a {expected}")]
    TypeMismatch {
        /// The key read or written.
        key: String,
        /// The type asked for.
        expected: TypeTag,
        /// The type stored.
        found: TypeTag,
    },
    /// A stored element or value does not convert to the type asked for (for example bytes
    /// that are not UTF-8 read as `String`).
    #[error("key {key:?}: {reason}")]
    Conversion {
        /// The key read.
        key: String,
        /// What did not convert.
        reason: String,
    },
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// The CRDT core refused the operation (a remote clock too far ahead, a counter overflow).
    #[error(transparent)]
    Crdt(#[from] geostate_crdt::Error),
}
