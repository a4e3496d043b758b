//! The store contract every region store implements.

use std::future::Future;

use geostate_crdt::{Crdt, VersionVector};

use crate::{
    BackendError, FeedPage, Key, Layout, LocalWrite, PartitionDigest, Receipt, ScanPage, Stored,
    TombstonePage,
};

/// Largest page a scan, feed read or conflict read returns.
pub const PAGE_LIMIT_MAX: usize = 10_000;

/// The page size a store serves for a requested `limit`: positive, capped at
/// [`PAGE_LIMIT_MAX`]. Every store applies the same rule.
///
/// ```
/// use geostate_backends::backend::page_limit;
/// assert_eq!(page_limit(20_000).unwrap(), 10_000);
/// assert!(page_limit(0).is_err());
/// ```
pub fn page_limit(limit: usize) -> Result<usize, BackendError> {
    if limit == 0 {
        return Err(BackendError::InvalidArgument(
            "limit must be positive".into(),
        ));
    }
    Ok(limit.min(PAGE_LIMIT_MAX))
}

/// Splits `0..n` into waves: runs of contiguous items, each at most `max` long and naming
/// each key at most once (`key(i)` is item i's key), so that a wave's items can be read and
/// committed together while items on one key still run in order. Returns `(start, end)`
/// ranges.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn waves<'a>(
    n: usize,
    max: usize,
    key: impl Fn(usize) -> &'a str,
) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let mut seen = std::collections::HashSet::new();
        let mut end = start;
        while end < n && end - start < max.max(1) && seen.insert(key(end)) {
            end += 1;
        }
        out.push((start, end));
        start = end;
    }
    out
}

/// The outcomes of a batch whose every item got one; an item without one (a bug) is reported
/// as such rather than dropped.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn outcomes<T>(
    out: Vec<Option<Result<T, BackendError>>>,
) -> Vec<Result<T, BackendError>> {
    out.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(BackendError::Unavailable(
                    "internal: a batch item got no outcome".into(),
                ))
            })
        })
        .collect()
}

/// Checks a replication origin's name (cursors are keyed by it): 1 to 64 bytes, no control
/// characters. Every store applies the same rule.
///
/// ```
/// use geostate_backends::backend::check_origin;
/// assert!(check_origin("us-east").is_ok());
/// assert!(check_origin("").is_err());
/// ```
pub fn check_origin(origin: &str) -> Result<(), BackendError> {
    if origin.is_empty() || origin.len() > 64 || origin.chars().any(char::is_control) {
        return Err(BackendError::InvalidArgument(format!(
            "invalid origin region name {origin:?}"
        )));
    }
    Ok(())
}

/// The delta of a local write on `state` (the stored value, or the empty value of the
/// operation's type for an absent key), given the partition's dot floor for the writer (see
/// [`StateBackend::dot_floor`]). Every store computes local writes with this.
///
/// If `state` has not seen the writer's events up to the floor (the key was purged and written
/// again), the write is computed on the [lifted](Crdt::lifted) state and the delta carries the
/// lifted state with it, so the writer never mints a dot twice for one key and every region
/// ends up with the same compact context.
///
/// ```
/// use geostate_backends::backend::local_delta;
/// use geostate_backends::{Expect, Key, LocalWrite};
/// use geostate_crdt::{ActorId, CounterOp, Crdt, Dot, Hlc, Op, TypeTag};
/// let a = ActorId::new(1);
/// let write = LocalWrite {
///     key: Key::new("k").unwrap(),
///     op: Op::from(CounterOp::inc(1)),
///     actor: a,
///     hlc: Hlc::new(1, 0),
///     expect: Expect::Any,
/// };
/// let delta = local_delta(&Crdt::empty(TypeTag::PnCounter), &write, 4).unwrap();
/// assert!(delta.context().contains(Dot::new(a, 5)));
/// assert_eq!(delta.context().cloud_len(), 0);
/// ```
pub fn local_delta(
    state: &Crdt,
    write: &LocalWrite,
    floor: u64,
) -> Result<Crdt, geostate_crdt::Error> {
    let Some(lifted) = state.lifted(write.actor, floor) else {
        return state.apply(write.actor, write.hlc, &write.op);
    };
    let mut delta = lifted.apply(write.actor, write.hlc, &write.op)?;
    if !delta.context().is_empty() {
        delta.merge(&lifted)?;
    }
    Ok(delta)
}

/// One region's store: values, per-partition change feeds and digests, replication cursors and
/// the conflict feed.
///
/// To ensure correctness, an implementation must:
/// - make every write atomic: the value, the version, the digest and (for local writes) the
///   change-feed entry change together or not at all, and a write is acknowledged only after
///   the store has committed it;
/// - serialise writes to one key: concurrent writers (tasks or processes) never lose an
///   update, and [`apply`](StateBackend::apply) computes each delta from the state it merges
///   into, so no dot is ever minted twice;
/// - never overwrite, merge or feed a value that does not decode: report
///   [`BackendError::Corrupt`] and leave the bytes as they are;
/// - assign versions that never repeat within a partition (hence never for one key), even
///   after a delete;
/// - number feed entries 1, 2, 3, ... per partition, and trim only the oldest;
/// - keep digests equal for equal contents, whatever the order of the writes that produced
///   them (see [`crate::digest`]);
/// - keep, per partition, a dot floor covering every dot of every value physically removed
///   from it ([`purge`](StateBackend::purge), [`delete`](StateBackend::delete)), and compute
///   every local write with [`local_delta`] given the writer's floor, read in the write's
///   atomic section;
/// - reject a value whose canonical payload ([`geostate_crdt::envelope::payload_len`], before
///   compression, so that every region accepts the same values) would exceed
///   [`Layout::value_bytes_max`] without writing anything.
pub trait StateBackend: Send + Sync + 'static {
    /// The partitioning and limits.
    fn layout(&self) -> &Layout;

    /// The value under `key`.
    fn get(&self, key: &Key) -> impl Future<Output = Result<Option<Stored>, BackendError>> + Send;

    /// The values under `keys`, each with its own outcome.
    fn get_many(
        &self,
        keys: &[Key],
    ) -> impl Future<Output = Result<Vec<Result<Option<Stored>, BackendError>>, BackendError>> + Send;

    /// Applies a local write atomically: checks its condition, computes the operation's delta
    /// from the current state, merges it, bumps the version, appends the delta to the
    /// partition's change feed and updates the digest. A write whose delta changes nothing
    /// (removing an absent element) writes nothing and returns `seq: None`.
    fn apply(
        &self,
        write: LocalWrite,
    ) -> impl Future<Output = Result<Receipt, BackendError>> + Send;

    /// Applies local writes, each atomically and in order, each with its own outcome.
    fn apply_many(
        &self,
        writes: Vec<LocalWrite>,
    ) -> impl Future<Output = Result<Vec<Result<Receipt, BackendError>>, BackendError>> + Send;

    /// Merges a delta or full state received from another region: atomically merges it and
    /// updates version and digest. Nothing is appended to this store's change feed (it carries
    /// local writes only). Into an absent key, the delta is joined with the empty value of its
    /// type, never stored as is (a removal delta's empty entries are not elements).
    fn merge(
        &self,
        key: &Key,
        delta: &Crdt,
    ) -> impl Future<Output = Result<Receipt, BackendError>> + Send;

    /// Merges many remote deltas, each atomically, each with its own outcome.
    fn merge_many(
        &self,
        items: &[(Key, Crdt)],
    ) -> impl Future<Output = Result<Vec<Result<Receipt, BackendError>>, BackendError>> + Send;

    /// Physically removes `key` (value and digest entry), raising the partition's dot floor by
    /// the value's context in the same atomic step; returns whether it existed. This is not a
    /// CRDT removal: other regions still hold the value and anti-entropy would bring it back.
    /// Regions delete with a removal delta; this is for repair (garbage collection uses
    /// [`purge`](StateBackend::purge)).
    fn delete(&self, key: &Key) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// [`delete`](StateBackend::delete) for many keys.
    fn delete_many(
        &self,
        keys: &[Key],
    ) -> impl Future<Output = Result<Vec<bool>, BackendError>> + Send;

    /// Tombstones of `partition` (keys whose value holds no live dot) greater than `after`, in
    /// key order, at most `limit` (capped at [`PAGE_LIMIT_MAX`]).
    fn tombstones(
        &self,
        partition: u16,
        after: Option<&Key>,
        limit: usize,
    ) -> impl Future<Output = Result<TombstonePage, BackendError>> + Send;

    /// Garbage-collects a tombstone: atomically removes `key` if it still holds a tombstone at
    /// exactly `version`, raising the partition's dot floor by the tombstone's context; returns
    /// whether it did. Only safe once the tombstone is causally stable (every region applied
    /// it and no feed still carries a delta it removed): the replicator decides that.
    fn purge(
        &self,
        key: &Key,
        version: u64,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// The partition's dot floor: for every actor, the highest counter in any value removed
    /// from the partition by [`purge`](StateBackend::purge) or
    /// [`delete`](StateBackend::delete).
    fn dot_floor(
        &self,
        partition: u16,
    ) -> impl Future<Output = Result<VersionVector, BackendError>> + Send;

    /// Keys starting with `prefix` and greater than `after`, in key order, at most `limit`
    /// (capped at [`PAGE_LIMIT_MAX`]). Resuming from each page's `next` visits every key once.
    fn scan(
        &self,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> impl Future<Output = Result<ScanPage, BackendError>> + Send;

    /// Feed entries of `partition` with sequence numbers greater than `after`, at most `limit`.
    fn read_feed(
        &self,
        partition: u16,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<FeedPage, BackendError>> + Send;

    /// Drops feed entries of `partition` up to and including `through`; returns how many.
    fn trim_feed(
        &self,
        partition: u16,
        through: u64,
    ) -> impl Future<Output = Result<usize, BackendError>> + Send;

    /// The bucket fingerprints of `partition`.
    fn digest(
        &self,
        partition: u16,
    ) -> impl Future<Output = Result<PartitionDigest, BackendError>> + Send;

    /// The keys of one digest bucket with their value hashes, in key order.
    fn bucket_entries(
        &self,
        partition: u16,
        bucket: u16,
    ) -> impl Future<Output = Result<Vec<(Key, u64)>, BackendError>> + Send;

    /// The replication cursor for `origin` region's feed of `partition` (0 if none). An origin
    /// is a region name of 1 to 64 bytes without control characters; any other is
    /// [`BackendError::InvalidArgument`], here and in
    /// [`advance_cursor`](StateBackend::advance_cursor).
    fn cursor(
        &self,
        origin: &str,
        partition: u16,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send;

    /// Raises the cursor to `seq` (a cursor never moves back); returns the cursor after.
    fn advance_cursor(
        &self,
        origin: &str,
        partition: u16,
        seq: u64,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send;

    /// Appends an encoded conflict record to the conflict feed; returns its sequence number.
    fn append_conflict(
        &self,
        record: Vec<u8>,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send;

    /// Conflict records after sequence number `after`, at most `limit`.
    fn read_conflicts(
        &self,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(u64, Vec<u8>)>, BackendError>> + Send;
}

/// Raw byte access for tests: puts bytes under a key exactly as a broken disk or a stray
/// client would. Only with the `testing` feature.
#[cfg(feature = "testing")]
pub trait RawAccess: StateBackend {
    /// Stores `bytes` under `key` as its value, bypassing every check.
    fn raw_put(
        &self,
        key: &Key,
        bytes: Vec<u8>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// The bytes stored under `key` (an envelope for a well-formed value).
    fn raw_get(
        &self,
        key: &Key,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, BackendError>> + Send;

    /// Appends a feed entry for `key` to its partition's feed with `delta` as its delta bytes,
    /// exactly as given (the way a broken disk or a buggy writer would leave one), at the next
    /// sequence number, which it returns. The value is not touched.
    fn raw_append_feed(
        &self,
        key: &Key,
        delta: Vec<u8>,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send;
}
