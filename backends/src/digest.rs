//! Digests: per-partition, bucketed fingerprints of `(key, value)` pairs, so two stores can
//! find the keys on which they differ without listing their keyspaces.
//!
//! A bucket's fingerprint is the XOR of `entry_hash(key, value_hash)` over its keys, where
//! `value_hash` is FNV-1a 64 of the value's canonical payload
//! ([`geostate_crdt::envelope::canonical_payload`]). XOR makes the fingerprint independent of
//! write order and lets a write update it in O(1): XOR out the old entry, XOR in the new.

use geostate_crdt::{envelope, Crdt};

use crate::{fnv1a64, BackendError, Key};

/// The hash of a value: FNV-1a 64 of its canonical payload. Equal states hash equally in
/// every region and every backend.
pub fn value_hash(value: &Crdt) -> Result<u64, BackendError> {
    let payload = envelope::canonical_payload(value).map_err(BackendError::Crdt)?;
    Ok(fnv1a64(&payload))
}

/// The hash of raw bytes that do not decode (a corrupt value still has a fingerprint, so a
/// digest comparison notices it).
pub fn raw_hash(bytes: &[u8]) -> u64 {
    fnv1a64(bytes) ^ 0x5a5a_5a5a_5a5a_5a5a
}

/// One key's contribution to its bucket: both hashes mixed by SplitMix64's finaliser so that
/// XOR-ing many of them does not cancel structure.
pub fn entry_hash(key: &Key, value_hash: u64) -> u64 {
    let mut z = fnv1a64(key.as_str().as_bytes()) ^ value_hash.rotate_left(29);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The fingerprints of one partition's buckets.
///
/// ```
/// use geostate_backends::PartitionDigest;
/// let a = PartitionDigest::new(vec![1, 2, 3]);
/// let b = PartitionDigest::new(vec![1, 9, 3]);
/// assert_eq!(a.differing_buckets(&b), vec![1]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionDigest {
    buckets: Vec<u64>,
}

impl PartitionDigest {
    /// A digest from bucket fingerprints.
    pub fn new(buckets: Vec<u64>) -> Self {
        Self { buckets }
    }

    /// The bucket fingerprints.
    pub fn buckets(&self) -> &[u64] {
        &self.buckets
    }

    /// Indexes of buckets whose fingerprints differ (all of them if the bucket counts differ).
    pub fn differing_buckets(&self, other: &PartitionDigest) -> Vec<u16> {
        if self.buckets.len() != other.buckets.len() {
            return (0..self.buckets.len().max(other.buckets.len()))
                .map(|i| i as u16)
                .collect();
        }
        self.buckets
            .iter()
            .zip(&other.buckets)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i as u16)
            .collect()
    }

    /// XOR of every bucket: one number summarising the partition.
    pub fn summary(&self) -> u64 {
        self.buckets.iter().fold(0, |acc, b| acc ^ b)
    }
}
