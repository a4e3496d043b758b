//! The one error type of this crate.

use thiserror::Error;

/// What can go wrong while configuring conflict resolution. Resolving itself never fails.
///
/// ```
/// use std::sync::Arc;
/// use geostate_conflict::{Error, KeepSiblings, ResolverRegistry};
/// let mut registry = ResolverRegistry::new();
/// let err = registry.register("", Arc::new(KeepSiblings)).unwrap_err();
/// assert_eq!(err, Error::EmptyPrefix);
/// assert!(err.to_string().contains("empty"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Error {
    /// A resolver was registered for the empty prefix, which would be a second default.
    #[error("resolver prefix is empty: set the default resolver instead")]
    EmptyPrefix,
    /// A resolver was registered for a prefix that already has one.
    #[error("a resolver is already registered for key prefix {prefix:?}")]
    DuplicatePrefix {
        /// The prefix registered twice.
        prefix: String,
    },
}
