//! The one error type of this crate.

use thiserror::Error;

use crate::{Hlc, TypeTag};

/// Everything that can go wrong in the CRDT core: bad input, never a bug of ours.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Error {
    /// A remote HLC timestamp was further ahead of local physical time than allowed.
    #[error("remote timestamp {remote} is more than {max_forward_ms} ms ahead of local time {now_ms} ms")]
    ClockAhead {
        /// The refused timestamp.
        remote: Hlc,
        /// Local physical time when it arrived.
        now_ms: u64,
        /// The configured maximum forward offset.
        max_forward_ms: u64,
    },
    /// A counter update would overflow an actor's 64-bit running total.
    #[error("counter overflow: an actor's running total would exceed 2^64 - 1")]
    CounterOverflow,
    /// An operation or a merge met a value of another CRDT type.
    #[error("type mismatch: expected {expected}, found {found}")]
    TypeMismatch {
        /// The type the caller asked for.
        expected: TypeTag,
        /// The type that was there.
        found: TypeTag,
    },
    /// The bytes end before the envelope does.
    #[error("truncated envelope: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes the envelope declares or requires.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// More bytes follow the envelope than it declares.
    #[error("envelope has {extra} trailing bytes")]
    TrailingBytes {
        /// Bytes after the envelope's end.
        extra: usize,
    },
    /// The bytes do not start with the envelope magic.
    #[error("bad magic: not a geostate envelope")]
    BadMagic,
    /// The envelope's format version is not one this build reads.
    #[error("unknown envelope format version {0}")]
    UnknownVersion(u8),
    /// The envelope's type tag names no CRDT type.
    #[error("unknown type tag {0}")]
    UnknownTypeTag(u8),
    /// The envelope's flags have bits this build does not understand, or need a feature it lacks.
    #[error("unsupported envelope flags {0:#04x}")]
    UnsupportedFlags(u8),
    /// The checksum does not match the bytes: corruption in storage or in transit.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// Checksum carried by the envelope.
        stored: u32,
        /// Checksum of the bytes received.
        computed: u32,
    },
    /// The compressed payload does not decompress within the size limit.
    #[error("decompression failed: {0}")]
    Decompression(String),
    /// The payload is too large to encode or to accept.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the payload.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The payload does not decode to a well-formed value of the declared type.
    #[error("payload does not decode: {0}")]
    Payload(String),
}
