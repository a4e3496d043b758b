//! Conflict records: what the conflict feed keeps about each resolved conflict.
//!
//! A record names the key, every sibling (dot, timestamp, length and digest of its bytes, not
//! the bytes themselves), the resolver and its decision. The serialized form is part of the
//! conflict feed's format: fields keep their order and types; new [`RecordedResolution`]
//! variants are only ever appended; a new field means a new feed entry version, decided by the
//! feed's writer.

use serde::{Deserialize, Serialize};

use crate::{Dot, Hlc, Resolution, Sibling};

/// The digest of a value recorded in conflict records: 64-bit FNV-1a of the bytes.
///
/// Cheap and stable (part of the record format, never changed), enough for an operator to tell
/// which sibling a chosen value came from. Not collision resistant: do not use it to
/// authenticate or deduplicate values.
///
/// ```
/// use geostate_conflict::value_digest;
/// assert_eq!(value_digest(b""), 0xcbf2_9ce4_8422_2325);
/// assert_eq!(value_digest(b"a"), 0xaf63_dc4c_8601_ec8c);
/// assert_ne!(value_digest(b"left"), value_digest(b"right"));
/// ```
pub fn value_digest(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// A byte length as recorded: `u64` on every platform.
fn recorded_len(bytes: &[u8]) -> u64 {
    u64::try_from(bytes.len()).unwrap_or(u64::MAX)
}

/// One sibling of a conflict, as recorded: its identity, timestamp, and the length and
/// [`value_digest`] of its bytes.
///
/// ```
/// use geostate_conflict::{value_digest, ActorId, Dot, Hlc, Sibling, SiblingRecord};
/// let sibling = Sibling::new(Dot::new(ActorId::new(1), 4), Hlc::new(9, 0), b"bytes");
/// let record = SiblingRecord::from(sibling);
/// assert_eq!(record.dot, sibling.dot);
/// assert_eq!(record.value_len, 5);
/// assert_eq!(record.value_digest, value_digest(b"bytes"));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SiblingRecord {
    /// The write's event identity; its actor names the writer.
    pub dot: Dot,
    /// The write's timestamp.
    pub hlc: Hlc,
    /// Length of the written bytes.
    pub value_len: u64,
    /// [`value_digest`] of the written bytes.
    pub value_digest: u64,
}

impl From<Sibling<'_>> for SiblingRecord {
    fn from(sibling: Sibling<'_>) -> Self {
        Self {
            dot: sibling.dot,
            hlc: sibling.hlc,
            value_len: recorded_len(sibling.value),
            value_digest: value_digest(sibling.value),
        }
    }
}

/// The decision of a resolver, as recorded.
///
/// ```
/// use geostate_conflict::{value_digest, RecordedResolution, Resolution};
/// let recorded = RecordedResolution::from(&Resolution::Chosen(b"v".to_vec()));
/// assert_eq!(
///     recorded,
///     RecordedResolution::Chosen { value_len: 1, value_digest: value_digest(b"v") }
/// );
/// assert_eq!(
///     RecordedResolution::from(&Resolution::KeepSiblings),
///     RecordedResolution::KeepSiblings
/// );
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RecordedResolution {
    /// Reads show one value; compare its digest with the siblings' to see which one it is (a
    /// digest matching none means the resolver merged them).
    Chosen {
        /// Length of the chosen bytes.
        value_len: u64,
        /// [`value_digest`] of the chosen bytes.
        value_digest: u64,
    },
    /// Reads show every sibling; the application resolves them.
    KeepSiblings,
}

impl From<&Resolution> for RecordedResolution {
    fn from(resolution: &Resolution) -> Self {
        match resolution {
            Resolution::Chosen(value) => RecordedResolution::Chosen {
                value_len: recorded_len(value),
                value_digest: value_digest(value),
            },
            Resolution::KeepSiblings => RecordedResolution::KeepSiblings,
        }
    }
}

/// One conflict, for the conflict feed: a key held two or more concurrent writes and a
/// resolver decided what reads show.
///
/// Made by [`resolve`](fn@crate::resolve); callers append it to the feed, together with
/// whatever they know and this pure crate does not (region, time of detection).
///
/// ```
/// use geostate_conflict::{
///     resolve, ActorId, Hlc, MvRegister, RecordedResolution, ResolverRegistry,
/// };
/// let base = MvRegister::new();
/// let mut register = base.write(ActorId::new(1), Hlc::new(10, 0), b"left".to_vec());
/// register.merge(&base.write(ActorId::new(2), Hlc::new(20, 0), b"right".to_vec()));
///
/// let record = resolve(&ResolverRegistry::new(), "profile:7", &register).record.unwrap();
/// assert_eq!(record.key, "profile:7");
/// assert_eq!(record.resolver, "lww");
/// assert_eq!(record.siblings.len(), 2);
/// // The chosen value is the second sibling's (actor 2 wrote last).
/// assert_eq!(
///     record.resolution,
///     RecordedResolution::Chosen { value_len: 5, value_digest: record.siblings[1].value_digest }
/// );
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConflictRecord {
    /// The key in conflict.
    pub key: String,
    /// Every sibling, sorted by dot.
    pub siblings: Vec<SiblingRecord>,
    /// [`Resolver::name`](crate::Resolver::name) of the resolver that decided.
    pub resolver: String,
    /// What it decided.
    pub resolution: RecordedResolution,
}

impl ConflictRecord {
    /// The record of `resolver` deciding `resolution` for `siblings` (already sorted).
    pub(crate) fn new(
        key: &str,
        siblings: &[Sibling<'_>],
        resolver: &str,
        resolution: &Resolution,
    ) -> Self {
        Self {
            key: key.to_owned(),
            siblings: siblings.iter().copied().map(SiblingRecord::from).collect(),
            resolver: resolver.to_owned(),
            resolution: RecordedResolution::from(resolution),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ActorId;

    fn config() -> impl bincode::config::Config {
        bincode::config::standard()
    }

    fn sample() -> ConflictRecord {
        let a = Sibling::new(Dot::new(ActorId::new(1), 2), Hlc::new(1_000, 1), b"left");
        let b = Sibling::new(Dot::new(ActorId::new(2), 1), Hlc::new(1_000, 0), b"right");
        ConflictRecord::new("k:1", &[a, b], "lww", &Resolution::Chosen(b"left".to_vec()))
    }

    #[test]
    fn fnv1a_64_reference_vectors() {
        // From the FNV reference test suite.
        assert_eq!(value_digest(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(value_digest(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(value_digest(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn record_keeps_sibling_order_and_digests() {
        let r = sample();
        assert_eq!(r.siblings[0].dot, Dot::new(ActorId::new(1), 2));
        assert_eq!(r.siblings[1].value_len, 5);
        assert_eq!(r.siblings[1].value_digest, value_digest(b"right"));
        assert_eq!(
            r.resolution,
            RecordedResolution::Chosen {
                value_len: 4,
                value_digest: r.siblings[0].value_digest
            }
        );
    }

    /// Golden vector: the bytes of a record under the store's payload codec (bincode 2,
    /// standard configuration). If this test fails, the feed format changed.
    #[test]
    fn golden_record_bytes() {
        let bytes = bincode::serde::encode_to_vec(sample(), config()).unwrap();
        let golden: Vec<u8> = [
            &[3, b'k', b':', b'1'][..],
            // siblings: 2, then actor, counter, physical_ms (251 = u16 follows), logical,
            // value_len, value_digest (253 = u64 follows)
            &[2],
            &[1, 2, 251, 0xe8, 0x03, 1, 4],
            &[253, 0xb0, 0x1c, 0x04, 0xa2, 0xad, 0x70, 0xb0, 0x24],
            &[2, 1, 251, 0xe8, 0x03, 0, 5],
            &[253, 0x05, 0xd8, 0x14, 0x57, 0x53, 0xaa, 0xaa, 0x76],
            &[3, b'l', b'w', b'w'],
            // resolution: variant 0 (Chosen), value_len, value_digest
            &[0, 4],
            &[253, 0xb0, 0x1c, 0x04, 0xa2, 0xad, 0x70, 0xb0, 0x24],
        ]
        .concat();
        assert_eq!(bytes, golden);
        let (decoded, read): (ConflictRecord, usize) =
            bincode::serde::decode_from_slice(&golden, config()).unwrap();
        assert_eq!(read, golden.len());
        assert_eq!(decoded, sample());
    }

    #[test]
    fn keep_siblings_round_trips() {
        let mut r = sample();
        r.resolution = RecordedResolution::KeepSiblings;
        let bytes = bincode::serde::encode_to_vec(&r, config()).unwrap();
        assert_eq!(bytes.last(), Some(&1)); // variant 1, no payload
        let (decoded, _): (ConflictRecord, usize) =
            bincode::serde::decode_from_slice(&bytes, config()).unwrap();
        assert_eq!(decoded, r);
    }
}
