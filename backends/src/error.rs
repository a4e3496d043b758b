//! The one error type of the backends crate.

use thiserror::Error;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The key is empty, too long, or contains a control character.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The offending key (at most its first 64 characters).
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An argument is out of range (a partition number, a limit, a layout parameter).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The value (or the delta) would exceed the configured size limit; nothing was written.
    #[error("value of key {key:?} would be {size} bytes, above the limit of {limit} bytes")]
    ValueTooLarge {
        /// The key written.
        key: String,
        /// Encoded size it would reach (an upper bound when it was not computed exactly).
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The bytes stored under a key do not decode. They are left exactly as they are: never
    /// overwritten, never merged, never fed to the change feed.
    #[error("corrupt value under key {key:?}: {source}")]
    Corrupt {
        /// The key whose value is corrupt.
        key: String,
        /// What the decoder found.
        source: geostate_crdt::Error,
    },
    /// A compare-and-set found another version than the one expected; nothing was written.
    #[error("version conflict on key {key:?}: expected {expected}, found {}", match actual { Some(v) => format!("version {v}"), None => "absent".to_string() })]
    VersionConflict {
        /// The key written.
        key: String,
        /// What the caller expected.
        expected: crate::Expect,
        /// The version that was there (`None`: the key held no value).
        actual: Option<u64>,
    },
    /// The CRDT core refused the operation (wrong type, counter overflow, ...).
    #[error(transparent)]
    Crdt(#[from] geostate_crdt::Error),
    /// A TLS connection to the store could not be set up: the server's certificate is not
    /// trusted or does not name the host, the server does not speak TLS, or a certificate or
    /// key file is unreadable. Nothing was sent to the store. Retrying does not help until the
    /// configuration or the server's certificate changes; the store never falls back to an
    /// unencrypted connection.
    #[error("TLS failure: {0}")]
    Tls(String),
    /// Other writers changed the key under every one of `attempts` optimistic attempts in a
    /// row (write contention on one key from other processes); nothing was written. Retrying
    /// later may succeed.
    #[error("key {key:?} changed under {attempts} attempts in a row (write contention); nothing was written")]
    Contention {
        /// The key written.
        key: String,
        /// Attempts made, the first included.
        attempts: u32,
    },
    /// The store cannot be reached or failed; the operation may or may not have taken effect.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}
