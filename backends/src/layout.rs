//! How the keyspace is split: partitions, digest buckets, limits.

use crate::{BackendError, Key};

/// FNV-1a, 64-bit. The partition and bucket of every key derive from it, so **it never
/// changes**: stored data, change feeds, cursors and digests are all laid out by it.
///
/// ```
/// use geostate_backends::fnv1a64;
/// assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
/// assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
/// ```
pub const fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// The partitioning and limits of one region's store. Every region of a deployment must use
/// the same partition and bucket counts, or their feeds and digests do not line up.
///
/// - partition of a key = `fnv1a64(key) % partitions`;
/// - digest bucket of a key within its partition = `(fnv1a64(key) >> 32) % buckets`.
///
/// ```
/// use geostate_backends::{Key, Layout};
/// let layout = Layout::default();
/// let key = Key::new("cart:42").unwrap();
/// assert!(layout.partition_of(&key) < layout.partitions());
/// assert!(layout.bucket_of(&key) < layout.buckets());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    partitions: u16,
    buckets: u16,
    value_bytes_max: usize,
    feed_entries_max: usize,
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            partitions: 256,
            buckets: 64,
            value_bytes_max: 8 * 1024 * 1024,
            feed_entries_max: 10_000,
        }
    }
}

impl Layout {
    /// Most partitions a store may have.
    pub const PARTITIONS_MAX: u16 = 4096;
    /// Most digest buckets a partition may have.
    pub const BUCKETS_MAX: u16 = 4096;

    /// A layout with `partitions` partitions of `buckets` digest buckets each, values of at
    /// most `value_bytes_max` canonical payload bytes, and at most `feed_entries_max` feed
    /// entries kept per partition (older ones are trimmed).
    pub fn new(
        partitions: u16,
        buckets: u16,
        value_bytes_max: usize,
        feed_entries_max: usize,
    ) -> Result<Self, BackendError> {
        if partitions == 0 || partitions > Self::PARTITIONS_MAX {
            return Err(BackendError::InvalidArgument(format!(
                "partitions must be 1..={}, got {partitions}",
                Self::PARTITIONS_MAX
            )));
        }
        if buckets == 0 || buckets > Self::BUCKETS_MAX {
            return Err(BackendError::InvalidArgument(format!(
                "buckets must be 1..={}, got {buckets}",
                Self::BUCKETS_MAX
            )));
        }
        if value_bytes_max == 0 || feed_entries_max == 0 {
            return Err(BackendError::InvalidArgument(
                "value_bytes_max and feed_entries_max must be positive".into(),
            ));
        }
        Ok(Self {
            partitions,
            buckets,
            value_bytes_max,
            feed_entries_max,
        })
    }

    /// Number of partitions.
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// Digest buckets per partition.
    pub fn buckets(&self) -> u16 {
        self.buckets
    }

    /// Largest value accepted, in canonical payload bytes
    /// ([`geostate_crdt::envelope::payload_len`], before compression).
    pub fn value_bytes_max(&self) -> usize {
        self.value_bytes_max
    }

    /// Feed entries kept per partition.
    pub fn feed_entries_max(&self) -> usize {
        self.feed_entries_max
    }

    /// The partition holding `key`.
    pub fn partition_of(&self, key: &Key) -> u16 {
        (fnv1a64(key.as_str().as_bytes()) % u64::from(self.partitions)) as u16
    }

    /// The digest bucket of `key` within its partition.
    pub fn bucket_of(&self, key: &Key) -> u16 {
        ((fnv1a64(key.as_str().as_bytes()) >> 32) % u64::from(self.buckets)) as u16
    }

    /// Checks a partition number.
    pub fn check_partition(&self, partition: u16) -> Result<(), BackendError> {
        if partition < self.partitions {
            Ok(())
        } else {
            Err(BackendError::InvalidArgument(format!(
                "partition {partition} out of range 0..{}",
                self.partitions
            )))
        }
    }
}
