//! The embedded in-memory backend: the default store, a real backend in its own right.
//!
//! Each partition is a mutex over its values, change feed and digest, so a write locks one
//! partition (never the whole store) and changes value, version, feed and digest in one
//! critical section. Values are kept decoded; digests are brought up to date lazily: a write
//! takes its key's old fingerprint out of the bucket at once and the new one is hashed when the
//! digest is next read, so a write never pays for hashing a large value.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use geostate_crdt::{envelope, Crdt, TypeTag, VersionVector};

use crate::backend::{check_origin, local_delta, page_limit};
use crate::digest::{entry_hash, raw_hash, value_hash};
use crate::{
    BackendError, FeedEntry, FeedPage, Key, Layout, LocalWrite, PartitionDigest, Receipt, ScanItem,
    ScanPage, StateBackend, Stored, Tombstone, TombstonePage,
};

/// Conflict records kept; older ones are dropped first.
const CONFLICTS_MAX: usize = 100_000;

/// What a key holds.
#[derive(Debug)]
enum Content {
    Value(Crdt),
    /// Bytes that did not decode (only reachable through the raw test hook, or a future
    /// persistence layer reading a damaged file). Never merged, overwritten or fed.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    Corrupt(Vec<u8>),
}

#[derive(Debug)]
struct Slot {
    content: Content,
    version: u64,
    /// The value's hash while it is folded into the bucket fingerprint; `None` while the
    /// fingerprint still lacks it.
    hash: Option<u64>,
    /// An upper bound of the value's encoded payload size.
    size_bound: usize,
    /// The key's digest bucket (kept so that listing a bucket hashes no key).
    bucket: u16,
}

/// A change-feed entry as held in memory: the delta as its envelope (one allocation, the
/// bytes a replicator ships), decoded when the feed is read.
#[derive(Debug)]
struct FedDelta {
    seq: u64,
    key: Key,
    delta: Box<[u8]>,
    origin: geostate_crdt::ActorId,
    hlc: geostate_crdt::Hlc,
}

#[derive(Debug)]
struct Partition {
    values: BTreeMap<Key, Slot>,
    version_clock: u64,
    last_seq: u64,
    feed: VecDeque<FedDelta>,
    buckets: Vec<u64>,
    /// Some slot's hash is out of date (`None`): the bucket fingerprints need a refresh.
    stale: bool,
    /// Every dot of every value removed from the partition (see
    /// [`StateBackend::dot_floor`]).
    floor: VersionVector,
}

impl Partition {
    fn new(buckets: u16) -> Self {
        Self {
            values: BTreeMap::new(),
            version_clock: 0,
            last_seq: 0,
            feed: VecDeque::new(),
            buckets: vec![0; usize::from(buckets)],
            stale: false,
            floor: VersionVector::new(),
        }
    }
}

/// The in-memory store. Cheap to create; share it behind an `Arc`.
///
/// ```
/// use geostate_backends::{Expect, Key, Layout, LocalWrite, MemoryBackend, StateBackend};
/// use geostate_crdt::{ActorId, CounterOp, Hlc, Op};
/// # tokio_test_block_on(async {
/// let store = MemoryBackend::new(Layout::default());
/// let key = Key::new("visits").unwrap();
/// let write = LocalWrite {
///     key: key.clone(),
///     op: Op::from(CounterOp::inc(2)),
///     actor: ActorId::new(1),
///     hlc: Hlc::new(1, 0),
///     expect: Expect::Any,
/// };
/// let receipt = store.apply(write).await.unwrap();
/// assert_eq!(receipt.seq, Some(1));
/// let feed = store.read_feed(receipt.partition, 0, 10).await.unwrap();
/// assert_eq!(feed.entries.len(), 1);
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     // The memory backend never awaits anything that is not ready: a trivial executor works.
/// #     let waker = std::task::Waker::noop();
/// #     let mut cx = std::task::Context::from_waker(&waker);
/// #     let mut f = std::pin::pin!(f);
/// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
/// # }
/// ```
#[derive(Debug)]
pub struct MemoryBackend {
    layout: Layout,
    partitions: Box<[Mutex<Partition>]>,
    cursors: Mutex<HashMap<(String, u16), u64>>,
    conflicts: Mutex<ConflictLog>,
}

#[derive(Debug, Default)]
struct ConflictLog {
    last_seq: u64,
    records: VecDeque<(u64, Vec<u8>)>,
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every critical
/// section here leaves its data consistent before anything that could panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn payload_len(value: &Crdt) -> Result<usize, BackendError> {
    envelope::payload_len(value).map_err(BackendError::Crdt)
}

impl MemoryBackend {
    /// An empty store with the given layout.
    pub fn new(layout: Layout) -> Self {
        let partitions = (0..layout.partitions())
            .map(|_| Mutex::new(Partition::new(layout.buckets())))
            .collect();
        Self {
            layout,
            partitions,
            cursors: Mutex::new(HashMap::new()),
            conflicts: Mutex::new(ConflictLog::default()),
        }
    }

    fn partition(&self, index: u16) -> Result<MutexGuard<'_, Partition>, BackendError> {
        self.layout.check_partition(index)?;
        Ok(lock(&self.partitions[usize::from(index)]))
    }

    fn get_sync(&self, key: &Key) -> Result<Option<Stored>, BackendError> {
        let partition = self.partition(self.layout.partition_of(key))?;
        match partition.values.get(key) {
            None => Ok(None),
            Some(slot) => stored(key, slot).map(Some),
        }
    }

    fn apply_sync(&self, write: LocalWrite) -> Result<Receipt, BackendError> {
        let index = self.layout.partition_of(&write.key);
        let bucket = usize::from(self.layout.bucket_of(&write.key));
        let mut guard = self.partition(index)?;
        let part = &mut *guard;
        let current = match part.values.get(&write.key) {
            Some(slot) => Some((usable(&write.key, slot)?, slot.version)),
            None => None,
        };
        write.expect.check(&write.key, current.map(|(_, v)| v))?;
        let empty;
        let state = match (current, write.op.type_tag()) {
            (Some((value, _)), _) => value,
            (None, Some(tag)) => {
                empty = Crdt::empty(tag);
                &empty
            }
            // A deletion of a key that holds nothing changes nothing.
            (None, None) => {
                return Ok(Receipt {
                    partition: index,
                    version: 0,
                    seq: None,
                    delta: Crdt::empty(TypeTag::GCounter),
                })
            }
        };
        let delta = local_delta(state, &write, part.floor.get(write.actor))?;
        if delta.context().is_empty() {
            return Ok(Receipt {
                partition: index,
                version: current.map_or(0, |(_, v)| v),
                seq: None,
                delta,
            });
        }
        let encoded = envelope::encode(&delta, &envelope::Options::default())?;
        let version = commit(part, &self.layout, &write.key, bucket, &delta)?;
        part.last_seq += 1;
        let seq = part.last_seq;
        part.feed.push_back(FedDelta {
            seq,
            key: write.key,
            delta: encoded.into_boxed_slice(),
            origin: write.actor,
            hlc: write.hlc,
        });
        while part.feed.len() > self.layout.feed_entries_max() {
            part.feed.pop_front();
        }
        Ok(Receipt {
            partition: index,
            version,
            seq: Some(seq),
            delta,
        })
    }

    fn merge_sync(&self, key: &Key, delta: &Crdt) -> Result<Receipt, BackendError> {
        if !delta.is_well_formed() {
            return Err(BackendError::Crdt(geostate_crdt::Error::Payload(
                "delta violates its invariants".into(),
            )));
        }
        let index = self.layout.partition_of(key);
        let bucket = usize::from(self.layout.bucket_of(key));
        let mut guard = self.partition(index)?;
        let part = &mut *guard;
        if let Some(slot) = part.values.get(key) {
            usable(key, slot)?;
        }
        let version = commit(part, &self.layout, key, bucket, delta)?;
        Ok(Receipt {
            partition: index,
            version,
            seq: None,
            delta: delta.clone(),
        })
    }

    fn delete_sync(&self, key: &Key) -> Result<bool, BackendError> {
        self.remove(key, None)
    }

    /// Removes `key`, if `tombstone_at` is given only when it holds a tombstone at that
    /// version, and raises the partition's dot floor by the removed value's context.
    fn remove(&self, key: &Key, tombstone_at: Option<u64>) -> Result<bool, BackendError> {
        let bucket = usize::from(self.layout.bucket_of(key));
        let mut guard = self.partition(self.layout.partition_of(key))?;
        let part = &mut *guard;
        let Some(slot) = part.values.get(key) else {
            return Ok(false);
        };
        if let Some(version) = tombstone_at {
            let is_tombstone = matches!(&slot.content, Content::Value(v) if v.is_bottom());
            if slot.version != version || !is_tombstone {
                return Ok(false);
            }
        }
        let Some(slot) = part.values.remove(key) else {
            return Ok(false);
        };
        if let Some(h) = slot.hash {
            part.buckets[bucket] ^= entry_hash(key, h);
        }
        if let Content::Value(v) = &slot.content {
            part.floor.merge(&v.context().maxima());
        }
        Ok(true)
    }

    /// Brings every bucket fingerprint of a partition up to date (at once if none is stale).
    fn refresh_digest(&self, part: &mut Partition) -> Result<(), BackendError> {
        if !part.stale {
            return Ok(());
        }
        for (key, slot) in part.values.iter_mut() {
            if slot.hash.is_some() {
                continue;
            }
            let h = match &slot.content {
                Content::Value(v) => value_hash(v)?,
                Content::Corrupt(bytes) => raw_hash(bytes),
            };
            slot.hash = Some(h);
            part.buckets[usize::from(slot.bucket)] ^= entry_hash(key, h);
        }
        part.stale = false;
        Ok(())
    }
}

/// The slot's value, or the corruption error it stands for.
fn usable<'a>(key: &Key, slot: &'a Slot) -> Result<&'a Crdt, BackendError> {
    match &slot.content {
        Content::Value(v) => Ok(v),
        Content::Corrupt(bytes) => Err(corrupt(key, bytes)),
    }
}

fn corrupt(key: &Key, bytes: &[u8]) -> BackendError {
    let source = match envelope::decode(bytes, &envelope::Limits::default()) {
        Err(e) => e,
        Ok(_) => geostate_crdt::Error::Payload("stored bytes failed validation".into()),
    };
    BackendError::Corrupt {
        key: key.to_string(),
        source,
    }
}

fn stored(key: &Key, slot: &Slot) -> Result<Stored, BackendError> {
    Ok(Stored {
        value: usable(key, slot)?.clone(),
        version: slot.version,
    })
}

/// Merges `delta` into the key's value within the partition's critical section, enforcing the
/// size limit, and bumps the version. Nothing changes on error.
fn commit(
    part: &mut Partition,
    layout: &Layout,
    key: &Key,
    bucket: usize,
    delta: &Crdt,
) -> Result<u64, BackendError> {
    let limit = layout.value_bytes_max();
    let delta_len = payload_len(delta)?;
    let too_large = |size| BackendError::ValueTooLarge {
        key: key.to_string(),
        size,
        limit,
    };
    if delta_len > limit {
        return Err(too_large(delta_len));
    }
    part.version_clock += 1;
    let version = part.version_clock;
    match part.values.get_mut(key) {
        None => {
            // Join into the empty value rather than storing the delta as is: a removal delta
            // names the elements it removes with empty entries, which a join drops. Stored as
            // is, they would read as present elements and hash differently from other regions.
            let mut value = Crdt::empty(delta.type_tag());
            if let Err(e) = value.merge(delta) {
                part.version_clock -= 1;
                return Err(e.into());
            }
            part.values.insert(
                key.clone(),
                Slot {
                    content: Content::Value(value),
                    version,
                    hash: None,
                    size_bound: delta_len,
                    bucket: u16::try_from(bucket).unwrap_or(u16::MAX),
                },
            );
            part.stale = true;
        }
        Some(slot) => {
            let Content::Value(value) = &mut slot.content else {
                part.version_clock -= 1;
                return Err(corrupt(key, &[]));
            };
            // The encoded size of a join is NOT bounded by the sum of its sides' sizes: every
            // sequence both sides hold may cross a bincode length-prefix size (1, 3, 5, 9
            // bytes), one byte more than the two prefixes together. Each such sequence has a
            // prefix of at least one byte in the delta, so the join is at most the value's size
            // plus twice the delta's, and only needs an exact check when that could cross the
            // limit.
            let bound = slot.size_bound.saturating_add(delta_len.saturating_mul(2));
            let size_bound = if bound <= limit {
                if let Err(e) = value.merge(delta) {
                    part.version_clock -= 1;
                    return Err(e.into());
                }
                bound
            } else {
                let mut merged = value.clone();
                if let Err(e) = merged.merge(delta) {
                    part.version_clock -= 1;
                    return Err(e.into());
                }
                let exact = payload_len(&merged)?;
                if exact > limit {
                    part.version_clock -= 1;
                    return Err(too_large(exact));
                }
                *value = merged;
                exact
            };
            slot.size_bound = size_bound;
            slot.version = version;
            if let Some(h) = slot.hash.take() {
                part.buckets[bucket] ^= entry_hash(key, h);
            }
            part.stale = true;
        }
    }
    Ok(version)
}

impl StateBackend for MemoryBackend {
    fn layout(&self) -> &Layout {
        &self.layout
    }

    async fn get(&self, key: &Key) -> Result<Option<Stored>, BackendError> {
        self.get_sync(key)
    }

    async fn get_many(
        &self,
        keys: &[Key],
    ) -> Result<Vec<Result<Option<Stored>, BackendError>>, BackendError> {
        Ok(keys.iter().map(|k| self.get_sync(k)).collect())
    }

    async fn apply(&self, write: LocalWrite) -> Result<Receipt, BackendError> {
        self.apply_sync(write)
    }

    async fn apply_many(
        &self,
        writes: Vec<LocalWrite>,
    ) -> Result<Vec<Result<Receipt, BackendError>>, BackendError> {
        Ok(writes.into_iter().map(|w| self.apply_sync(w)).collect())
    }

    async fn merge(&self, key: &Key, delta: &Crdt) -> Result<Receipt, BackendError> {
        self.merge_sync(key, delta)
    }

    async fn merge_many(
        &self,
        items: &[(Key, Crdt)],
    ) -> Result<Vec<Result<Receipt, BackendError>>, BackendError> {
        Ok(items.iter().map(|(k, d)| self.merge_sync(k, d)).collect())
    }

    async fn delete(&self, key: &Key) -> Result<bool, BackendError> {
        self.delete_sync(key)
    }

    async fn delete_many(&self, keys: &[Key]) -> Result<Vec<bool>, BackendError> {
        keys.iter().map(|k| self.delete_sync(k)).collect()
    }

    async fn tombstones(
        &self,
        partition: u16,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<TombstonePage, BackendError> {
        let limit = page_limit(limit)?;
        let part = self.partition(partition)?;
        let lower = match after {
            Some(a) => std::ops::Bound::Excluded(a),
            None => std::ops::Bound::Unbounded,
        };
        let mut items = Vec::new();
        let mut next = None;
        for (key, slot) in part
            .values
            .range::<Key, _>((lower, std::ops::Bound::Unbounded))
        {
            let Content::Value(value) = &slot.content else {
                continue;
            };
            if !value.is_bottom() {
                continue;
            }
            if items.len() == limit {
                next = items.last().map(|t: &Tombstone| t.key.clone());
                break;
            }
            items.push(Tombstone {
                key: key.clone(),
                version: slot.version,
                hash: match slot.hash {
                    Some(h) => h,
                    None => value_hash(value)?,
                },
            });
        }
        Ok(TombstonePage { items, next })
    }

    async fn purge(&self, key: &Key, version: u64) -> Result<bool, BackendError> {
        self.remove(key, Some(version))
    }

    async fn dot_floor(&self, partition: u16) -> Result<VersionVector, BackendError> {
        Ok(self.partition(partition)?.floor.clone())
    }

    async fn scan(
        &self,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<ScanPage, BackendError> {
        let limit = page_limit(limit)?;
        let mut items: Vec<ScanItem> = Vec::new();
        let mut more = false;
        for index in 0..self.layout.partitions() {
            let part = self.partition(index)?;
            let start = match after {
                Some(a) if a.as_str() >= prefix => a.as_str(),
                _ => prefix,
            };
            let mut taken = 0;
            for (key, slot) in part
                .values
                .range::<str, _>((std::ops::Bound::Included(start), std::ops::Bound::Unbounded))
            {
                if !key.as_str().starts_with(prefix) {
                    break;
                }
                if after.is_some_and(|a| key <= a) {
                    continue;
                }
                if taken == limit {
                    more = true;
                    break;
                }
                items.push(ScanItem {
                    key: key.clone(),
                    value: stored(key, slot),
                });
                taken += 1;
            }
        }
        items.sort_by(|a, b| a.key.cmp(&b.key));
        if items.len() > limit {
            items.truncate(limit);
            more = true;
        }
        let next = if more {
            items.last().map(|i| i.key.clone())
        } else {
            None
        };
        Ok(ScanPage { items, next })
    }

    async fn read_feed(
        &self,
        partition: u16,
        after: u64,
        limit: usize,
    ) -> Result<FeedPage, BackendError> {
        let limit = page_limit(limit)?;
        let part = self.partition(partition)?;
        let first_seq = part.feed.front().map_or(part.last_seq + 1, |e| e.seq);
        // Sequence numbers are contiguous in the deque, so the start is found by arithmetic.
        let skip = usize::try_from(after.saturating_add(1).saturating_sub(first_seq))
            .unwrap_or(usize::MAX);
        let mut entries = Vec::new();
        let mut damaged = Vec::new();
        for e in part.feed.iter().skip(skip).take(limit) {
            match envelope::decode(&e.delta, &envelope::Limits::default()) {
                Ok(delta) => entries.push(FeedEntry {
                    seq: e.seq,
                    key: e.key.clone(),
                    delta,
                    origin: e.origin,
                    hlc: e.hlc,
                }),
                Err(_) => damaged.push(e.seq),
            }
        }
        Ok(FeedPage {
            entries,
            first_seq,
            last_seq: part.last_seq,
            damaged,
        })
    }

    async fn trim_feed(&self, partition: u16, through: u64) -> Result<usize, BackendError> {
        let mut part = self.partition(partition)?;
        let mut trimmed = 0;
        while part.feed.front().is_some_and(|e| e.seq <= through) {
            part.feed.pop_front();
            trimmed += 1;
        }
        Ok(trimmed)
    }

    async fn digest(&self, partition: u16) -> Result<PartitionDigest, BackendError> {
        let mut part = self.partition(partition)?;
        self.refresh_digest(&mut part)?;
        Ok(PartitionDigest::new(part.buckets.clone()))
    }

    async fn bucket_entries(
        &self,
        partition: u16,
        bucket: u16,
    ) -> Result<Vec<(Key, u64)>, BackendError> {
        if bucket >= self.layout.buckets() {
            return Err(BackendError::InvalidArgument(format!(
                "bucket {bucket} out of range 0..{}",
                self.layout.buckets()
            )));
        }
        let mut part = self.partition(partition)?;
        self.refresh_digest(&mut part)?;
        Ok(part
            .values
            .iter()
            .filter(|(_, s)| s.bucket == bucket)
            .filter_map(|(k, s)| s.hash.map(|h| (k.clone(), h)))
            .collect())
    }

    async fn cursor(&self, origin: &str, partition: u16) -> Result<u64, BackendError> {
        check_origin(origin)?;
        self.layout.check_partition(partition)?;
        Ok(lock(&self.cursors)
            .get(&(origin.to_string(), partition))
            .copied()
            .unwrap_or(0))
    }

    async fn advance_cursor(
        &self,
        origin: &str,
        partition: u16,
        seq: u64,
    ) -> Result<u64, BackendError> {
        check_origin(origin)?;
        self.layout.check_partition(partition)?;
        let mut cursors = lock(&self.cursors);
        let cursor = cursors.entry((origin.to_string(), partition)).or_insert(0);
        *cursor = (*cursor).max(seq);
        Ok(*cursor)
    }

    async fn append_conflict(&self, record: Vec<u8>) -> Result<u64, BackendError> {
        let mut log = lock(&self.conflicts);
        log.last_seq += 1;
        let seq = log.last_seq;
        log.records.push_back((seq, record));
        while log.records.len() > CONFLICTS_MAX {
            log.records.pop_front();
        }
        Ok(seq)
    }

    async fn read_conflicts(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, BackendError> {
        let limit = page_limit(limit)?;
        let log = lock(&self.conflicts);
        Ok(log
            .records
            .iter()
            .filter(|(seq, _)| *seq > after)
            .take(limit)
            .cloned()
            .collect())
    }
}

#[cfg(feature = "testing")]
impl crate::RawAccess for MemoryBackend {
    async fn raw_put(&self, key: &Key, bytes: Vec<u8>) -> Result<(), BackendError> {
        let bucket = usize::from(self.layout.bucket_of(key));
        let mut guard = self.partition(self.layout.partition_of(key))?;
        let part = &mut *guard;
        let (content, size_bound) = match envelope::decode(&bytes, &envelope::Limits::default()) {
            Ok(value) => {
                let len = payload_len(&value)?;
                (Content::Value(value), len)
            }
            Err(_) => (Content::Corrupt(bytes), 0),
        };
        part.version_clock += 1;
        let version = part.version_clock;
        part.stale = true;
        if let Some(old) = part.values.insert(
            key.clone(),
            Slot {
                content,
                version,
                hash: None,
                size_bound,
                bucket: u16::try_from(bucket).unwrap_or(u16::MAX),
            },
        ) {
            if let Some(h) = old.hash {
                part.buckets[bucket] ^= entry_hash(key, h);
            }
        }
        Ok(())
    }

    async fn raw_append_feed(&self, key: &Key, delta: Vec<u8>) -> Result<u64, BackendError> {
        let mut part = self.partition(self.layout.partition_of(key))?;
        part.last_seq += 1;
        let seq = part.last_seq;
        part.feed.push_back(FedDelta {
            seq,
            key: key.clone(),
            delta: delta.into_boxed_slice(),
            origin: geostate_crdt::ActorId::new(0),
            hlc: geostate_crdt::Hlc::ZERO,
        });
        Ok(seq)
    }

    async fn raw_get(&self, key: &Key) -> Result<Option<Vec<u8>>, BackendError> {
        let part = self.partition(self.layout.partition_of(key))?;
        match part.values.get(key).map(|s| &s.content) {
            None => Ok(None),
            Some(Content::Corrupt(bytes)) => Ok(Some(bytes.clone())),
            Some(Content::Value(v)) => envelope::encode(v, &envelope::Options::default())
                .map(Some)
                .map_err(BackendError::Crdt),
        }
    }
}
