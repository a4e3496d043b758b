//! The values that cross the store contract.

use geostate_crdt::{ActorId, Crdt, Hlc, Op};

use crate::{BackendError, Key};

/// A value as stored, with its region-local version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The CRDT state.
    pub value: Crdt,
    /// Region-local version: changes on every write, never repeats within the key's partition
    /// (not even after the key is deleted and written again), so compare-and-set cannot suffer
    /// ABA.
    pub version: u64,
}

/// What a compare-and-set expects to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Expect {
    /// No condition: a plain write.
    Any,
    /// The key holds no value.
    Absent,
    /// The key holds a value at exactly this version.
    Version(u64),
}

impl Expect {
    pub(crate) fn check(self, key: &Key, current: Option<u64>) -> Result<(), BackendError> {
        let ok = match (self, current) {
            (Expect::Any, _) => true,
            (Expect::Absent, None) => true,
            (Expect::Version(v), Some(c)) => v == c,
            _ => false,
        };
        if ok {
            return Ok(());
        }
        Err(BackendError::VersionConflict {
            key: key.to_string(),
            expected: self,
            actual: current,
        })
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Any => f.write_str("any version"),
            Expect::Absent => f.write_str("absent"),
            Expect::Version(v) => write!(f, "version {v}"),
        }
    }
}

/// A local write: an operation applied to the key's current state, atomically, by the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalWrite {
    /// The key written.
    pub key: Key,
    /// What to do.
    pub op: Op,
    /// The writer.
    pub actor: ActorId,
    /// The write's timestamp (orders register writes; recorded in the feed for lag).
    pub hlc: Hlc,
    /// The compare-and-set condition.
    pub expect: Expect,
}

/// What a write did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The key's partition.
    pub partition: u16,
    /// The key's version after the write (`0` if the key holds no value and the write was a
    /// no-op).
    pub version: u64,
    /// The change-feed sequence number of the write, for local writes that changed something.
    pub seq: Option<u64>,
    /// The delta merged (for local writes, the delta the operation produced; for a no-op, an
    /// empty value).
    pub delta: Crdt,
}

/// One change-feed entry: a local write's delta.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedEntry {
    /// Position in the partition's feed; starts at 1, increases by 1 per entry.
    pub seq: u64,
    /// The key written.
    pub key: Key,
    /// The delta the write merged.
    pub delta: Crdt,
    /// The writer.
    pub origin: ActorId,
    /// The write's timestamp.
    pub hlc: Hlc,
}

/// A page of a partition's change feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedPage {
    /// Entries after the requested sequence number, in order.
    pub entries: Vec<FeedEntry>,
    /// The oldest sequence number still held (`last_seq + 1` when the feed is empty).
    pub first_seq: u64,
    /// The newest sequence number ever written (`0` when nothing was).
    pub last_seq: u64,
    /// Sequence numbers, in order, of entries in this page's range that the store holds but
    /// cannot read (corrupt bytes). They count toward the page's limit; `entries` skips them.
    /// A damaged entry never fails the page, so a reader is never stuck behind it: it must
    /// repair the keys it may have missed by anti-entropy (the value itself is stored apart
    /// from its feed entry).
    pub damaged: Vec<u64>,
}

impl FeedPage {
    /// Whether entries after `after` were trimmed before they could be read: the reader fell
    /// behind and must repair by anti-entropy.
    pub fn missed_after(&self, after: u64) -> bool {
        after < self.last_seq && after.saturating_add(1) < self.first_seq
    }
}

/// One key of a scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanItem {
    /// The key.
    pub key: Key,
    /// Its value, or why it could not be read (a corrupt value does not stop the scan).
    pub value: Result<Stored, BackendError>,
}

/// A page of a prefix scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanPage {
    /// Keys with the prefix, in key order.
    pub items: Vec<ScanItem>,
    /// Where to resume (pass as `after`), or `None` when the scan is complete.
    pub next: Option<Key>,
}

/// A tombstone: a key whose value holds no live dot (it was deleted or cleared) and keeps only
/// the causal context that stops a delayed write from resurrecting what was removed. Once
/// every region has applied it (causal stability), it can be purged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tombstone {
    /// The key.
    pub key: Key,
    /// Its region-local version (a purge is conditional on it).
    pub version: u64,
    /// Its value hash (see [`crate::digest::value_hash`]): equal hashes in two regions mean
    /// they hold the same tombstone.
    pub hash: u64,
}

/// A page of a partition's tombstones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TombstonePage {
    /// Tombstones in key order.
    pub items: Vec<Tombstone>,
    /// Where to resume (pass as `after`), or `None` when the partition has no more.
    pub next: Option<Key>,
}
