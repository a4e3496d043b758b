//! The conformance suite: one set of checks that every [`StateBackend`] must pass, in the
//! manner of openraft's `Suite::test_all(builder)`.
//!
//! A backend's test file hands [`test_all`] a *builder*, an async closure that returns a fresh,
//! empty backend; every case asks it for its own backends, so a Redis or PostgreSQL backend
//! gives each case its own key prefix or schema. Those cases work with any ordinary layout
//! (at least 4 partitions and 2,000 feed entries per partition; they check and say so), such
//! as [`Layout::default`]. The few cases that need *tight* limits run from
//! [`test_small_layout`], whose builder must return backends built with a layout like
//! [`small_layout`].
//!
//! ```
//! use geostate_backends::{suite, Layout, MemoryBackend};
//!
//! #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! async fn main() {
//!     // Every case is also a function of its own, for running one at a time:
//!     suite::cursors(&|| async { MemoryBackend::new(Layout::default()) }).await;
//!     // A backend's test file runs them all:
//!     // suite::test_all(|| async { MemoryBackend::new(Layout::default()) }).await;
//!     // suite::test_small_layout(|| async { MemoryBackend::new(suite::small_layout()) }).await;
//! }
//! ```
//!
//! The suite spawns tasks with `tokio::spawn` to write concurrently, so it must run inside a
//! Tokio runtime, preferably a multi-thread one
//! (`#[tokio::test(flavor = "multi_thread", worker_threads = 4)]`) so that the writers really
//! run in parallel. A failure is an assertion panic naming the case (each case prints its name
//! as it starts) and what was expected. Randomness is seeded: a run is reproducible.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use geostate_crdt::{
    envelope, ActorId, CounterOp, Crdt, Dot, FieldOp, Hlc, MapOp, Op, OrSet, RegisterOp, SetOp,
    TypeTag, VersionVector,
};
use tokio::task::JoinHandle;

use crate::digest::{entry_hash, value_hash};
use crate::{
    BackendError, Expect, FeedEntry, Key, Layout, LocalWrite, PartitionDigest, RawAccess, Receipt,
    ScanItem, StateBackend, Stored, Tombstone, KEY_BYTES_MAX, PAGE_LIMIT_MAX,
};

macro_rules! run_cases {
    ($builder:expr; $($case:ident),+ $(,)?) => {$(
        println!("geostate-backends suite: {}", stringify!($case));
        $case($builder).await;
    )+};
}

/// Runs every case that works with the builder's (default-sized) layout, each against fresh
/// backends from `builder`, printing each case's name as it starts.
///
/// The builder's layout needs at least 4 partitions and `feed_entries_max >= 2_000` (the cases
/// check); other limits may be anything. Run inside a multi-thread Tokio runtime.
pub async fn test_all<B, F, Fut>(builder: F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    run_cases!(&builder;
        read_write_every_type,
        merge_out_of_order,
        concurrent_increments_own_actors,
        concurrent_increments_shared_actor,
        concurrent_increments_many_keys,
        concurrent_set_adds,
        concurrent_compare_and_set,
        feed_records_every_write,
        damaged_feed_entries_are_reported,
        feed_trim,
        digests_order_independent,
        compare_and_set,
        scan_prefix_pages,
        corrupt_values,
        key_and_argument_limits,
        page_limits_capped,
        value_too_large,
        cursors,
        conflict_feed,
        batch_forms,
        tombstones_are_listed_and_purged,
        purge_races_local_writes,
    );
}

/// The layout [`test_small_layout`] expects: 8 partitions of 4 digest buckets, values of at
/// most 4 KiB and at most 16 feed entries per partition.
pub fn small_layout() -> Layout {
    Layout::new(8, 4, 4096, 16).expect("the small layout is valid")
}

/// Runs the cases that need tight limits (a feed bound, a value size limit that a test can
/// reach cheaply). `builder` must return fresh backends whose layout has
/// `feed_entries_max <= 1_000` and `4 KiB <= value_bytes_max <= 64 KiB`, such as
/// [`small_layout`].
pub async fn test_small_layout<B, F, Fut>(builder: F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    run_cases!(&builder;
        feed_bounded,
        set_growth_limit,
        value_size_boundary,
        join_size_exact,
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// SplitMix64: the suite's only source of randomness, always seeded.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

fn key(name: impl Into<String>) -> Key {
    Key::new(name).expect("the suite's keys are valid")
}

fn at(time: u64) -> Hlc {
    Hlc::new(1_700_000_000_000 + time, 0)
}

fn write(key: &Key, op: impl Into<Op>, actor: u64, time: u64) -> LocalWrite {
    LocalWrite {
        key: key.clone(),
        op: op.into(),
        actor: ActorId::new(actor),
        hlc: at(time),
        expect: Expect::Any,
    }
}

fn cas(mut write: LocalWrite, expect: Expect) -> LocalWrite {
    write.expect = expect;
    write
}

fn lww(value: impl Into<Vec<u8>>) -> Op {
    Op::Lww(RegisterOp::write(value))
}

/// The type an operation creates (the suite never needs it for `Op::Delete`).
fn tag_of(op: &Op) -> TypeTag {
    op.type_tag().expect("an op that creates a value")
}

fn joined(a: &Crdt, b: &Crdt) -> Crdt {
    let mut out = a.clone();
    out.merge(b).expect("joined values have one type");
    out
}

fn counter_value(value: &Crdt) -> i128 {
    match value {
        Crdt::PnCounter(c) => c.value(),
        Crdt::GCounter(c) => i128::try_from(c.value()).expect("counter fits i128"),
        other => panic!("expected a counter, found a {}", other.type_tag()),
    }
}

fn or_set(value: &Crdt) -> &OrSet<Vec<u8>> {
    match value {
        Crdt::OrSet(s) => s,
        other => panic!("expected a set, found a {}", other.type_tag()),
    }
}

fn payload_len(value: &Crdt) -> usize {
    envelope::payload_len(value).expect("the suite's values encode")
}

/// A short description of a write's outcome (never the value: it may be megabytes).
fn outcome(result: &Result<Receipt, BackendError>) -> String {
    match result {
        Ok(r) => format!(
            "Ok(partition {}, version {}, seq {:?})",
            r.partition, r.version, r.seq
        ),
        Err(e) => format!("Err({e})"),
    }
}

/// Awaits spawned tasks, re-raising a task's panic as this task's panic.
async fn join_all<T>(handles: Vec<JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        match handle.await {
            Ok(value) => out.push(value),
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("a suite task failed: {e}"),
            },
        }
    }
    out
}

/// `n` keys `{prefix}{i}` that all fall in `partition`.
fn keys_in_partition(layout: &Layout, partition: u16, prefix: &str, n: usize) -> Vec<Key> {
    (0u64..)
        .map(|i| key(format!("{prefix}{i}")))
        .filter(|k| layout.partition_of(k) == partition)
        .take(n)
        .collect()
}

async fn must_get<B: StateBackend>(b: &B, k: &Key) -> Stored {
    match b.get(k).await {
        Ok(Some(stored)) => stored,
        other => panic!("get({k}): expected a value, got {other:?}"),
    }
}

async fn apply_ok<B: StateBackend>(b: &B, w: LocalWrite) -> Receipt {
    let (k, tag, expect) = (w.key.clone(), w.op.type_tag(), w.expect);
    match b.apply(w).await {
        Ok(r) => r,
        Err(e) => panic!("apply({k}, an op on {tag:?}, {expect:?}) failed: {e}"),
    }
}

async fn merge_ok<B: StateBackend>(b: &B, k: &Key, delta: &Crdt) -> Receipt {
    let r = b
        .merge(k, delta)
        .await
        .unwrap_or_else(|e| panic!("merge({k}) failed: {e}"));
    assert_eq!(r.seq, None, "merge({k}): a remote merge must not be fed");
    r
}

/// Reads a partition's whole feed in pages of `page`, checking that pages respect the limit and
/// that sequence numbers are contiguous.
async fn whole_feed<B: StateBackend>(b: &B, partition: u16, page: usize) -> Vec<FeedEntry> {
    let mut out: Vec<FeedEntry> = Vec::new();
    let mut after = 0;
    loop {
        let p = b
            .read_feed(partition, after, page)
            .await
            .unwrap_or_else(|e| panic!("read_feed({partition}, {after}, {page}): {e}"));
        assert!(
            p.entries.len() <= page,
            "read_feed({partition}, {after}, {page}) returned {} entries",
            p.entries.len()
        );
        let Some(first) = p.entries.first() else {
            assert!(
                after >= p.last_seq || p.first_seq > p.last_seq,
                "read_feed({partition}, {after}, {page}) is empty, yet the feed holds {}..={}",
                p.first_seq,
                p.last_seq
            );
            break;
        };
        assert_eq!(
            first.seq,
            (after + 1).max(p.first_seq),
            "read_feed({partition}, {after}, {page}) does not start at the next held entry"
        );
        for pair in p.entries.windows(2) {
            assert_eq!(
                pair[1].seq,
                pair[0].seq + 1,
                "partition {partition}: feed sequence numbers are not contiguous"
            );
        }
        let last = p.entries.last().map_or(after, |e| e.seq);
        assert!(
            last <= p.last_seq,
            "partition {partition}: entry past last_seq"
        );
        after = last;
        out.extend(p.entries);
    }
    out
}

/// `(first_seq, last_seq)` of a partition's feed.
async fn feed_bounds<B: StateBackend>(b: &B, partition: u16) -> (u64, u64) {
    let page = b
        .read_feed(partition, 0, 1)
        .await
        .unwrap_or_else(|e| panic!("read_feed({partition}): {e}"));
    (page.first_seq, page.last_seq)
}

/// Everything about a key that a write could change.
#[derive(Debug, PartialEq)]
struct Observed {
    value: Result<Option<Stored>, BackendError>,
    raw: Option<Vec<u8>>,
    feed: (u64, u64),
    digest: PartitionDigest,
    bucket: Vec<(Key, u64)>,
}

async fn observe<B: StateBackend + RawAccess>(b: &B, k: &Key) -> Observed {
    let layout = b.layout();
    let partition = layout.partition_of(k);
    Observed {
        value: b.get(k).await,
        raw: b.raw_get(k).await.expect("raw_get"),
        feed: feed_bounds(b, partition).await,
        digest: b.digest(partition).await.expect("digest"),
        bucket: b
            .bucket_entries(partition, layout.bucket_of(k))
            .await
            .expect("bucket_entries"),
    }
}

/// Asserts that a failed write left the key exactly as it was (compared without printing the
/// raw bytes, which may be large).
fn assert_unchanged(before: &Observed, after: &Observed, what: &str) {
    assert!(
        before.value == after.value,
        "{what}: the value changed (before {:?}, after {:?})",
        before.value.as_ref().map(|v| v.as_ref().map(|s| s.version)),
        after.value.as_ref().map(|v| v.as_ref().map(|s| s.version)),
    );
    assert!(before.raw == after.raw, "{what}: the stored bytes changed");
    assert_eq!(before.feed, after.feed, "{what}: the change feed changed");
    assert_eq!(before.digest, after.digest, "{what}: the digest changed");
    assert_eq!(
        before.bucket, after.bucket,
        "{what}: the digest bucket changed"
    );
}

fn assert_corrupt<T: Debug>(result: &Result<T, BackendError>, k: &Key, what: &str) {
    match result {
        Err(BackendError::Corrupt { key, .. }) if key == k.as_str() => {}
        other => panic!("{what}: expected Corrupt for {k}, got {other:?}"),
    }
}

fn assert_conflict<T: Debug>(result: &Result<T, BackendError>, k: &Key, what: &str) {
    match result {
        Err(BackendError::VersionConflict { key, .. }) if key == k.as_str() => {}
        other => panic!("{what}: expected VersionConflict for {k}, got {other:?}"),
    }
}

/// A `VersionConflict` that reports what was expected and what was found.
fn assert_conflict_at<T: Debug>(
    result: &Result<T, BackendError>,
    k: &Key,
    expect: Expect,
    found: Option<u64>,
    what: &str,
) {
    match result {
        Err(BackendError::VersionConflict {
            key,
            expected,
            actual,
        }) if key == k.as_str() && *expected == expect && *actual == found => {}
        other => panic!(
            "{what}: expected VersionConflict for {k} (expected {expect:?}, found {found:?}), \
             got {other:?}"
        ),
    }
}

fn assert_type_mismatch<T: Debug>(result: &Result<T, BackendError>, what: &str) {
    match result {
        Err(BackendError::Crdt(geostate_crdt::Error::TypeMismatch { .. })) => {}
        other => panic!("{what}: expected a type mismatch, got {other:?}"),
    }
}

fn assert_invalid_argument<T: Debug>(result: &Result<T, BackendError>, what: &str) {
    match result {
        Err(BackendError::InvalidArgument(_)) => {}
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    }
}

fn assert_too_large(result: &Result<Receipt, BackendError>, k: &Key, limit: usize, what: &str) {
    match result {
        Err(BackendError::ValueTooLarge {
            key,
            size,
            limit: reported,
        }) if key == k.as_str() && *reported == limit && *size > limit => {}
        other => panic!(
            "{what}: expected ValueTooLarge for {k} (limit {limit}), got {}",
            outcome(other)
        ),
    }
}

/// The digest every backend must compute for `contents` (see [`crate::digest`]): per bucket,
/// the XOR of `entry_hash(key, value_hash(value))`. Checks every partition's digest and, for
/// buckets holding keys, `bucket_entries`.
async fn assert_digests_match<B: StateBackend>(b: &B, contents: &BTreeMap<Key, Crdt>, what: &str) {
    let layout = b.layout();
    let mut expected: HashMap<u16, Vec<u64>> = HashMap::new();
    let mut entries: BTreeMap<(u16, u16), Vec<(Key, u64)>> = BTreeMap::new();
    for (k, v) in contents {
        let (p, bucket) = (layout.partition_of(k), layout.bucket_of(k));
        let h = value_hash(v).expect("value_hash");
        expected
            .entry(p)
            .or_insert_with(|| vec![0; usize::from(layout.buckets())])[usize::from(bucket)] ^=
            entry_hash(k, h);
        entries.entry((p, bucket)).or_default().push((k.clone(), h));
    }
    let empty = vec![0; usize::from(layout.buckets())];
    for p in 0..layout.partitions() {
        let digest = b.digest(p).await.expect("digest");
        let want = expected.get(&p).unwrap_or(&empty);
        assert_eq!(
            digest.buckets(),
            want.as_slice(),
            "{what}: digest of partition {p} is not the XOR of its keys' entry hashes"
        );
    }
    for ((p, bucket), want) in entries {
        let got = b.bucket_entries(p, bucket).await.expect("bucket_entries");
        assert_eq!(
            got, want,
            "{what}: bucket_entries({p}, {bucket}) must list the bucket's keys in key order with \
             their value hashes"
        );
    }
}

async fn all_digests<B: StateBackend>(b: &B) -> Vec<PartitionDigest> {
    let mut out = Vec::new();
    for p in 0..b.layout().partitions() {
        out.push(b.digest(p).await.expect("digest"));
    }
    out
}

fn need_feed(layout: &Layout, entries: usize, case: &str) {
    assert!(
        layout.feed_entries_max() >= entries,
        "{case} needs a layout keeping at least {entries} feed entries per partition"
    );
}

// ---------------------------------------------------------------------------------------------
// Reads and writes
// ---------------------------------------------------------------------------------------------

/// Local writes of every CRDT type: each receipt names the key's partition, carries the delta
/// computed from the stored state (the same one a local model computes), the next feed
/// sequence number of its partition and a version not used before in that partition; `get`
/// returns the joined value at that version; `Op::Delete` empties a value of any type. Writes
/// that change nothing (removing an absent element, clearing an empty set or register,
/// deleting an absent or already emptied key) return `seq: None` with the unchanged version
/// (`0` for an absent key) and change nothing at all. Then: an operation or a merge of another
/// type is a type mismatch that writes nothing; a remote `merge` joins the delta, bumps the
/// version, and is not fed; `delete` removes the key, returns whether it existed, and is not
/// fed.
pub async fn read_write_every_type<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = builder().await;
    let layout = b.layout().clone();
    let absent = key("basic:absent");
    assert_eq!(
        b.get(&absent).await.unwrap(),
        None,
        "a fresh store holds nothing"
    );

    let steps: Vec<(&str, Op, u64, u64)> = vec![
        ("basic:g", Op::GCounterInc(3), 1, 1),
        ("basic:g", Op::GCounterInc(4), 2, 2),
        ("basic:pn", CounterOp::inc(5).into(), 1, 1),
        ("basic:pn", CounterOp::dec(2).into(), 2, 2),
        ("basic:pn", CounterOp::inc(1).into(), 1, 3),
        ("basic:set", SetOp::remove("a").into(), 1, 1),
        ("basic:set", SetOp::add("a").into(), 1, 2),
        ("basic:set", SetOp::add("b").into(), 2, 3),
        ("basic:set", SetOp::remove("a").into(), 1, 4),
        ("basic:set", SetOp::remove("zz").into(), 1, 5),
        ("basic:set", SetOp::Clear.into(), 2, 6),
        ("basic:set", SetOp::Clear.into(), 2, 7),
        ("basic:set", SetOp::add("c").into(), 3, 8),
        ("basic:gone", Op::Delete, 1, 1),
        ("basic:gone", SetOp::add("a").into(), 1, 2),
        ("basic:gone", SetOp::add("b").into(), 2, 3),
        ("basic:gone", Op::Delete, 1, 4),
        ("basic:gone", Op::Delete, 1, 5),
        ("basic:gone", SetOp::add("c").into(), 3, 6),
        ("basic:lww-gone", lww("v"), 1, 1),
        ("basic:lww-gone", Op::Delete, 2, 2),
        ("basic:lww", lww("x"), 1, 20),
        ("basic:lww", lww("y"), 2, 10),
        ("basic:lww", Op::Lww(RegisterOp::Clear), 1, 30),
        ("basic:lww", Op::Lww(RegisterOp::Clear), 1, 31),
        ("basic:lww", lww("z"), 3, 40),
        ("basic:mv", Op::Mv(RegisterOp::write("p")), 1, 1),
        ("basic:mv", Op::Mv(RegisterOp::write("q")), 2, 2),
        ("basic:mv", Op::Mv(RegisterOp::Clear), 1, 3),
        ("basic:mv", Op::Mv(RegisterOp::Clear), 1, 4),
        (
            "basic:map",
            MapOp::update("f", FieldOp::Counter(CounterOp::inc(2))).into(),
            1,
            1,
        ),
        (
            "basic:map",
            MapOp::update("g", FieldOp::Set(SetOp::add("e"))).into(),
            2,
            2,
        ),
        ("basic:map", MapOp::remove("f").into(), 1, 3),
        ("basic:map", MapOp::remove("f").into(), 1, 4),
        (
            "basic:map",
            MapOp::update("h", FieldOp::Lww(RegisterOp::write("w"))).into(),
            3,
            5,
        ),
    ];

    let mut models: BTreeMap<Key, (Crdt, u64)> = BTreeMap::new();
    let mut last_seq: HashMap<u16, u64> = HashMap::new();
    let mut versions: HashSet<(u16, u64)> = HashSet::new();
    let mut noops = 0;
    for (i, (name, op, actor, time)) in steps.into_iter().enumerate() {
        let k = key(name);
        let p = layout.partition_of(&k);
        let (model, version) = match (models.get(&k), op.type_tag()) {
            (Some(m), _) => m.clone(),
            (None, Some(tag)) => (Crdt::empty(tag), 0),
            (None, None) => {
                // Deleting an absent key: nothing to delete, nothing written.
                let before = observe(&b, &k).await;
                let r = apply_ok(&b, write(&k, op.clone(), actor, time)).await;
                assert_eq!(
                    (r.seq, r.version),
                    (None, 0),
                    "step {i}: deleting an absent key"
                );
                assert_unchanged(&before, &observe(&b, &k).await, "deleting an absent key");
                noops += 1;
                continue;
            }
        };
        let delta = model
            .apply(ActorId::new(actor), at(time), &op)
            .expect("the model applies the op");
        let before = observe(&b, &k).await;
        let r = apply_ok(&b, write(&k, op.clone(), actor, time)).await;
        let what = format!("step {i}: {name} {op:?}");
        assert_eq!(r.partition, p, "{what}: receipt names the wrong partition");
        assert_eq!(
            r.delta, delta,
            "{what}: the delta must be the op applied to the stored state"
        );
        if delta.context().is_empty() {
            noops += 1;
            assert_eq!(r.seq, None, "{what}: a no-op write must not be fed");
            assert_eq!(
                r.version, version,
                "{what}: a no-op write keeps the version"
            );
            assert_unchanged(&before, &observe(&b, &k).await, &what);
        } else {
            let seq = last_seq.entry(p).or_insert(0);
            *seq += 1;
            assert_eq!(
                r.seq,
                Some(*seq),
                "{what}: feed seq must be the partition's next"
            );
            assert!(
                versions.insert((p, r.version)),
                "{what}: version {} was used before in partition {p}",
                r.version
            );
            let value = joined(&model, &delta);
            assert_eq!(
                must_get(&b, &k).await,
                Stored {
                    value: value.clone(),
                    version: r.version
                },
                "{what}: get must return the joined value at the receipt's version"
            );
            models.insert(k, (value, r.version));
        }
    }
    assert!(noops >= 4, "the steps include at least four no-op writes");
    let value_of = |name: &str| models[&key(name)].0.clone();
    assert_eq!(counter_value(&value_of("basic:g")), 7);
    assert_eq!(counter_value(&value_of("basic:pn")), 4);
    let set = value_of("basic:set");
    let elements: Vec<&Vec<u8>> = or_set(&set).iter().collect();
    assert_eq!(
        elements,
        vec![&b"c".to_vec()],
        "add, add, remove, clear, add"
    );
    let gone = value_of("basic:gone");
    let elements: Vec<&Vec<u8>> = or_set(&gone).iter().collect();
    assert_eq!(elements, vec![&b"c".to_vec()], "add, add, delete, add");
    match value_of("basic:lww-gone") {
        Crdt::LwwRegister(r) => assert_eq!(r.value(), None, "a deleted register is empty"),
        other => panic!("basic:lww-gone holds a {}", other.type_tag()),
    }
    match value_of("basic:lww") {
        Crdt::LwwRegister(r) => assert_eq!(r.value(), Some(&b"z".to_vec())),
        other => panic!("basic:lww holds a {}", other.type_tag()),
    }
    for (k, (value, _)) in &models {
        let feed = whole_feed(&b, layout.partition_of(k), 100).await;
        let mut replay = Crdt::empty(value.type_tag());
        for e in feed.iter().filter(|e| &e.key == k) {
            replay
                .merge(&e.delta)
                .expect("feed deltas have the key's type");
        }
        assert_eq!(
            &replay, value,
            "{k}: replaying the feed must rebuild the value"
        );
    }

    // Wrong types write nothing.
    let pn = key("basic:pn");
    let before = observe(&b, &pn).await;
    let r = b.apply(write(&pn, SetOp::add("x"), 1, 50)).await;
    assert_type_mismatch(&r, "a set op on a counter");
    assert_unchanged(&before, &observe(&b, &pn).await, "a set op on a counter");
    let set_delta = Crdt::empty(TypeTag::OrSet)
        .apply(ActorId::new(9), at(1), &SetOp::add("x").into())
        .unwrap();
    let r = b.merge(&pn, &set_delta).await;
    assert_type_mismatch(&r, "merging a set into a counter");
    assert_unchanged(
        &before,
        &observe(&b, &pn).await,
        "merging a set into a counter",
    );

    // Remote merges: joined, versioned, not fed.
    let remote = Crdt::empty(TypeTag::PnCounter)
        .apply(ActorId::new(50), at(1), &CounterOp::inc(10).into())
        .unwrap();
    let old = must_get(&b, &pn).await;
    let r = merge_ok(&b, &pn, &remote).await;
    assert_eq!(r.partition, layout.partition_of(&pn));
    assert_eq!(r.delta, remote, "a merge receipt carries the merged delta");
    assert_ne!(
        r.version, old.version,
        "a merge is a write: the version changes"
    );
    assert!(
        versions.insert((r.partition, r.version)),
        "merge reused a version"
    );
    let now = must_get(&b, &pn).await;
    assert_eq!(now.version, r.version);
    assert_eq!(now.value, joined(&old.value, &remote));
    assert_eq!(counter_value(&now.value), 14);
    assert_eq!(
        observe(&b, &pn).await.feed,
        before.feed,
        "a remote merge must not append to the feed"
    );
    let again = merge_ok(&b, &pn, &remote).await;
    assert_eq!(
        must_get(&b, &pn).await.value,
        now.value,
        "merging a delta twice changes nothing"
    );
    assert!(
        versions.insert((again.partition, again.version)),
        "merge reused a version"
    );
    let fresh = key("basic:remote-only");
    merge_ok(&b, &fresh, &remote).await;
    assert_eq!(
        must_get(&b, &fresh).await.value,
        joined(&Crdt::empty(TypeTag::PnCounter), &remote)
    );

    // Physical deletes.
    let feed_before = feed_bounds(&b, layout.partition_of(&pn)).await;
    assert!(
        b.delete(&pn).await.unwrap(),
        "delete of a present key returns true"
    );
    assert_eq!(b.get(&pn).await.unwrap(), None, "a deleted key is absent");
    assert!(
        !b.delete(&pn).await.unwrap(),
        "delete of an absent key returns false"
    );
    assert!(
        !b.delete(&absent).await.unwrap(),
        "delete of a never-written key returns false"
    );
    assert_eq!(
        feed_bounds(&b, layout.partition_of(&pn)).await,
        feed_before,
        "a delete is not fed"
    );
}

/// Remote deltas arrive in any order, removals before the adds they remove included (a region
/// may hear of a removal first, over another path). For every type, a sender makes an update
/// and then a removal (set remove and clear, map entry and field removal, register clear,
/// `Op::Delete`); one key receives the removal first, into an absent key, another receives
/// them in order. The stored value after the removal alone is the join of the empty value with
/// it (a removed element is not present); after both, both keys hold exactly the sender's
/// state, and the digest hashes them equally.
pub async fn merge_out_of_order<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = builder().await;
    let layout = b.layout().clone();
    let map_set = |op: SetOp| MapOp::update("f", FieldOp::Set(op)).into();
    let scenarios: Vec<(&str, Op, Op)> = vec![
        (
            "set remove",
            SetOp::add("x").into(),
            SetOp::remove("x").into(),
        ),
        (
            "set clear",
            SetOp::Add(vec![b"x".to_vec(), b"y".to_vec()]).into(),
            SetOp::Clear.into(),
        ),
        ("set delete", SetOp::add("x").into(), Op::Delete),
        (
            "map remove",
            MapOp::update("f", FieldOp::Counter(CounterOp::inc(3))).into(),
            MapOp::remove("f").into(),
        ),
        ("map clear", map_set(SetOp::add("x")), MapOp::Clear.into()),
        (
            "map field remove",
            map_set(SetOp::add("x")),
            map_set(SetOp::remove("x")),
        ),
        ("lww clear", lww("v"), Op::Lww(RegisterOp::Clear)),
        (
            "mv clear",
            Op::Mv(RegisterOp::write("v")),
            Op::Mv(RegisterOp::Clear),
        ),
        ("counter delete", CounterOp::inc(5).into(), Op::Delete),
    ];
    for (i, (name, update, removal)) in scenarios.into_iter().enumerate() {
        let empty = Crdt::empty(tag_of(&update));
        let d1 = empty.apply(ActorId::new(60), at(1), &update).unwrap();
        let after_update = joined(&empty, &d1);
        let d2 = after_update
            .apply(ActorId::new(60), at(2), &removal)
            .unwrap();
        assert!(
            !d2.context().is_empty(),
            "{name}: the removal removes something"
        );
        let sender = joined(&after_update, &d2);
        let (reversed, in_order) = (
            key(format!("ooo:{i}:reversed")),
            key(format!("ooo:{i}:in-order")),
        );

        merge_ok(&b, &reversed, &d2).await;
        let alone = must_get(&b, &reversed).await.value;
        assert_eq!(
            alone,
            joined(&empty, &d2),
            "{name}: a removal merged into an absent key must be stored as its join with the \
             empty value"
        );
        if let Crdt::OrSet(set) = &alone {
            assert!(
                set.is_empty(),
                "{name}: removed elements must not be present"
            );
        }
        merge_ok(&b, &reversed, &d1).await;
        merge_ok(&b, &in_order, &d1).await;
        merge_ok(&b, &in_order, &d2).await;
        for k in [&reversed, &in_order] {
            assert_eq!(
                must_get(&b, k).await.value,
                sender,
                "{name}: {k} must hold the sender's state"
            );
        }
        let hash_of = |k: &Key| {
            let (p, bucket) = (layout.partition_of(k), layout.bucket_of(k));
            let (b, k) = (&b, k.clone());
            async move {
                b.bucket_entries(p, bucket)
                    .await
                    .unwrap()
                    .into_iter()
                    .find(|(x, _)| *x == k)
                    .map(|(_, h)| h)
            }
        };
        let want = Some(value_hash(&sender).unwrap());
        assert_eq!(
            hash_of(&reversed).await,
            want,
            "{name}: digest hash, removal first"
        );
        assert_eq!(
            hash_of(&in_order).await,
            want,
            "{name}: digest hash, in order"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

const TASKS: u64 = 16;
const INCREMENTS: u64 = 1_000;

async fn increments_on_one_key<B: StateBackend>(b: B, shared_actor: bool) {
    let b = Arc::new(b);
    let k = key(if shared_actor {
        "concurrent:shared-actor"
    } else {
        "concurrent:own-actors"
    });
    let handles = (0..TASKS)
        .map(|t| {
            let (b, k) = (Arc::clone(&b), k.clone());
            tokio::spawn(async move {
                let actor = if shared_actor { 1 } else { t + 1 };
                let mut receipts = Vec::with_capacity(INCREMENTS as usize);
                for i in 0..INCREMENTS {
                    let r = b
                        .apply(write(&k, CounterOp::inc(1), actor, i))
                        .await
                        .unwrap_or_else(|e| panic!("task {t}, increment {i}: {e}"));
                    receipts.push(r);
                }
                receipts
            })
        })
        .collect();
    let per_task = join_all(handles).await;
    let total = TASKS * INCREMENTS;
    let stored = must_get(&*b, &k).await;
    assert_eq!(
        counter_value(&stored.value),
        i128::from(total),
        "{TASKS} tasks x {INCREMENTS} increments (shared actor: {shared_actor}): updates were lost"
    );
    let mut by_seq: BTreeMap<u64, &Receipt> = BTreeMap::new();
    let mut versions = HashSet::new();
    let mut replay = Crdt::empty(TypeTag::PnCounter);
    for (t, receipts) in per_task.iter().enumerate() {
        let mut previous = 0;
        for r in receipts {
            let seq = r.seq.expect("an increment is always fed");
            assert!(
                seq > previous,
                "task {t}: feed order differs from acknowledgement order"
            );
            previous = seq;
            assert!(
                by_seq.insert(seq, r).is_none(),
                "feed seq {seq} acknowledged twice"
            );
            assert!(
                versions.insert(r.version),
                "version {} acknowledged twice",
                r.version
            );
        }
    }
    // In feed order, which is causal order (a shared actor's dots arrive in sequence).
    for r in by_seq.values() {
        replay.merge(&r.delta).unwrap();
    }
    assert_eq!(by_seq.len() as u64, total);
    assert_eq!(
        by_seq.keys().last(),
        Some(&total),
        "seqs must be exactly 1..={total}"
    );
    assert_eq!(
        replay, stored.value,
        "the join of the acknowledged deltas is the value"
    );
    // The feed holds the newest entries (all of them unless the layout bounds it lower).
    let kept = total.min(b.layout().feed_entries_max() as u64);
    let feed = whole_feed(&*b, b.layout().partition_of(&k), 1_000).await;
    assert_eq!(
        feed.len() as u64,
        kept,
        "the feed keeps min(total, feed_entries_max) entries"
    );
    for e in &feed {
        assert_eq!(e.key, k);
        assert_eq!(
            e.delta, by_seq[&e.seq].delta,
            "feed entry {} carries its write's delta",
            e.seq
        );
    }
    assert_eq!(
        feed.first().map(|e| e.seq),
        Some(total - kept + 1),
        "only the oldest are trimmed"
    );
}

/// 16 tasks, each with its own actor, increment one counter 1,000 times each, in parallel: the
/// value is 16,000 and is the join of the acknowledged deltas; every increment got its own feed
/// seq (1..=16,000, in each task's order) and its own version; the feed holds the newest
/// `min(16,000, feed_entries_max)` of them, each with its write's delta.
pub async fn concurrent_increments_own_actors<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    increments_on_one_key(builder().await, false).await;
}

/// As [`concurrent_increments_own_actors`], but all 16 tasks write as ONE actor: the backend
/// mints dots inside its atomic section, so even a shared actor loses no update.
pub async fn concurrent_increments_shared_actor<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    increments_on_one_key(builder().await, true).await;
}

/// 16 tasks (four actors, each shared by four tasks) make 1,000 increments each of 1 to 3,
/// spread over 100 keys: every key's total and the grand total are exact; feed seqs are
/// contiguous from 1 per partition and versions never repeat within a partition.
pub async fn concurrent_increments_many_keys<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    const KEYS: u64 = 100;
    let b = Arc::new(builder().await);
    let keys: Arc<Vec<Key>> = Arc::new((0..KEYS).map(|i| key(format!("spread:{i:03}"))).collect());
    let plan = |t: u64, i: u64| ((t * 37 + i * 13) % KEYS, 1 + (t + i) % 3);
    let handles = (0..TASKS)
        .map(|t| {
            let (b, keys) = (Arc::clone(&b), Arc::clone(&keys));
            tokio::spawn(async move {
                let mut receipts = Vec::with_capacity(INCREMENTS as usize);
                for i in 0..INCREMENTS {
                    let (k, n) = plan(t, i);
                    let r = b
                        .apply(write(&keys[k as usize], CounterOp::inc(n), 1 + t % 4, i))
                        .await
                        .unwrap_or_else(|e| panic!("task {t}, write {i}: {e}"));
                    receipts.push(r);
                }
                receipts
            })
        })
        .collect();
    let receipts: Vec<Receipt> = join_all(handles).await.into_iter().flatten().collect();
    let mut expected = vec![0i128; KEYS as usize];
    for t in 0..TASKS {
        for i in 0..INCREMENTS {
            let (k, n) = plan(t, i);
            expected[k as usize] += i128::from(n);
        }
    }
    let mut sum = 0;
    for (k, want) in keys.iter().zip(&expected) {
        let got = counter_value(&must_get(&*b, k).await.value);
        assert_eq!(got, *want, "{k}: updates were lost");
        sum += got;
    }
    assert_eq!(sum, expected.iter().sum::<i128>(), "the grand total is off");
    let mut seqs: HashMap<u16, BTreeSet<u64>> = HashMap::new();
    let mut versions = HashSet::new();
    for r in &receipts {
        let seq = r.seq.expect("an increment is always fed");
        assert!(
            seqs.entry(r.partition).or_default().insert(seq),
            "seq acknowledged twice"
        );
        assert!(
            versions.insert((r.partition, r.version)),
            "version {} repeated in partition {}",
            r.version,
            r.partition
        );
    }
    let kept = b.layout().feed_entries_max() as u64;
    for (p, seqs) in seqs {
        let n = seqs.len() as u64;
        assert_eq!(
            seqs.last().copied(),
            Some(n),
            "partition {p}: seqs not 1..=n"
        );
        assert_eq!(
            feed_bounds(&*b, p).await,
            (n.saturating_sub(kept) + 1, n),
            "partition {p}"
        );
    }
}

/// 16 tasks each add 100 distinct elements to one set, each task with its own actor, and
/// (interleaved) the same elements to a second set as one shared actor: both sets hold exactly
/// the 1,600 elements.
pub async fn concurrent_set_adds<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    const ELEMENTS: u64 = 100;
    let b = Arc::new(builder().await);
    let own = key("concurrent:set:own-actors");
    let shared = key("concurrent:set:shared-actor");
    let element = |t: u64, i: u64| format!("t{t:02}-e{i:03}").into_bytes();
    let handles = (0..TASKS)
        .map(|t| {
            let (b, own, shared) = (Arc::clone(&b), own.clone(), shared.clone());
            tokio::spawn(async move {
                for i in 0..ELEMENTS {
                    for (k, actor) in [(&own, t + 1), (&shared, 1)] {
                        b.apply(write(k, SetOp::add(element(t, i)), actor, i))
                            .await
                            .unwrap_or_else(|e| panic!("task {t}, add {i} to {k}: {e}"));
                    }
                }
            })
        })
        .collect();
    join_all(handles).await;
    let expected: BTreeSet<Vec<u8>> = (0..TASKS)
        .flat_map(|t| (0..ELEMENTS).map(move |i| element(t, i)))
        .collect();
    for k in [&own, &shared] {
        let stored = must_get(&*b, k).await;
        let got: BTreeSet<Vec<u8>> = or_set(&stored.value).iter().cloned().collect();
        assert_eq!(
            got.len(),
            expected.len(),
            "{k}: adds were lost (or invented)"
        );
        assert!(
            got == expected,
            "{k}: the set differs from the elements added"
        );
    }
}

/// 8 tasks race to make 25 compare-and-set increments each (read the version, write with
/// `Expect::Version`, retry on `VersionConflict`): no two writes succeed against the same
/// version, the successful writes form one chain from `Absent` to the final version, and the
/// counter equals the number of successes.
pub async fn concurrent_compare_and_set<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    const CAS_TASKS: u64 = 8;
    const WINS: usize = 25;
    let b = Arc::new(builder().await);
    let k = key("concurrent:cas");
    let handles = (0..CAS_TASKS)
        .map(|t| {
            let (b, k) = (Arc::clone(&b), k.clone());
            tokio::spawn(async move {
                let mut wins = Vec::with_capacity(WINS);
                let mut attempts = 0u64;
                while wins.len() < WINS {
                    attempts += 1;
                    assert!(attempts < 1_000_000, "task {t}: no progress");
                    let current = b.get(&k).await.expect("get").map(|s| s.version);
                    let expect = current.map_or(Expect::Absent, Expect::Version);
                    let w = cas(write(&k, CounterOp::inc(1), t + 1, attempts), expect);
                    match b.apply(w).await {
                        Ok(r) => wins.push((current, r.version)),
                        Err(BackendError::VersionConflict { .. }) => tokio::task::yield_now().await,
                        Err(e) => panic!("task {t}: CAS failed with {e}"),
                    }
                }
                wins
            })
        })
        .collect();
    let mut chain: HashMap<Option<u64>, u64> = HashMap::new();
    for (from, to) in join_all(handles).await.into_iter().flatten() {
        if let Some(other) = chain.insert(from, to) {
            panic!("two writes expecting {from:?} both succeeded (versions {other} and {to})");
        }
    }
    let wins = chain.len();
    assert_eq!(wins, CAS_TASKS as usize * WINS);
    let mut link = None;
    for step in 0..wins {
        link = Some(
            *chain
                .get(&link)
                .unwrap_or_else(|| panic!("the CAS chain breaks after {step} steps at {link:?}")),
        );
    }
    let stored = must_get(&*b, &k).await;
    assert_eq!(
        Some(stored.version),
        link,
        "the chain must end at the current version"
    );
    assert_eq!(counter_value(&stored.value), wins as i128);
}

// ---------------------------------------------------------------------------------------------
// Change feed
// ---------------------------------------------------------------------------------------------

/// A feed entry whose bytes are damaged (written raw, as a broken disk or a buggy writer
/// would) never fails a page: the page lists it under `damaged`, counts it toward the limit,
/// and the entries around it read as usual, so a reader is never stuck behind it. The value
/// of its key is not touched.
pub async fn damaged_feed_entries_are_reported<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = builder().await;
    need_feed(b.layout(), 4, "damaged_feed_entries_are_reported");
    let k = key("feed:damaged");
    let p = b.layout().partition_of(&k);
    let before = b.read_feed(p, u64::MAX, 1).await.unwrap().last_seq;
    let first = b.apply(write(&k, CounterOp::inc(1), 1, 1)).await.unwrap();
    let good = b.get(&k).await.unwrap();
    let mut damaged = Vec::new();
    for bytes in [b"garbage".to_vec(), Vec::new()] {
        damaged.push(b.raw_append_feed(&k, bytes).await.unwrap());
    }
    let last = b.apply(write(&k, CounterOp::inc(2), 1, 2)).await.unwrap();
    // The value is untouched by the damaged entries and takes later writes as usual.
    assert!(good.is_some());
    match b.get(&k).await.unwrap().map(|s| s.value) {
        Some(Crdt::PnCounter(c)) => assert_eq!(c.value(), 3),
        other => panic!("expected the counter, got {other:?}"),
    }

    let page = b.read_feed(p, before, 100).await.unwrap();
    let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![first.seq.unwrap(), last.seq.unwrap()]);
    assert_eq!(page.damaged, damaged);
    assert_eq!(page.last_seq, last.seq.unwrap());
    // Damaged entries count toward the limit: a page of 2 ends at the first damaged one.
    let page = b.read_feed(p, before, 2).await.unwrap();
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.damaged, damaged[..1].to_vec());
    // A page that starts past them holds none.
    let page = b.read_feed(p, damaged[1], 100).await.unwrap();
    assert!(page.damaged.is_empty());
    assert_eq!(page.entries.len(), 1);
}

/// 8 tasks make 150 local writes each (counters, set adds and removes, register writes over 70
/// keys) while a ninth merges remote deltas into the same keys. Then, reading every partition's
/// feed in pages of 7: each partition's seqs are exactly 1..=n, n being the number of fed
/// receipts in it; every fed receipt's (partition, seq) holds its key, delta, origin and HLC;
/// each task's writes to a partition appear in its order; a receipt is fed iff its delta is not
/// empty; the feed holds no remote merge; replaying each key's feed entries plus the remote
/// deltas rebuilds its value. A no-op write (removing an absent element) returns `seq: None`
/// and the current version and appends nothing.
pub async fn feed_records_every_write<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    const WRITERS: u64 = 8;
    const WRITES: u64 = 150;
    const REMOTE_ACTOR: u64 = 1_000;
    let b = builder().await;
    need_feed(
        b.layout(),
        (WRITERS * WRITES) as usize,
        "feed_records_every_write",
    );
    let layout = b.layout().clone();
    let b = Arc::new(b);
    let counters: Vec<Key> = (0..40).map(|i| key(format!("feed:c:{i}"))).collect();
    let sets: Vec<Key> = (0..20).map(|i| key(format!("feed:s:{i}"))).collect();
    let registers: Vec<Key> = (0..10).map(|i| key(format!("feed:l:{i}"))).collect();
    let keys = Arc::new((counters, sets, registers));

    let handles = (0..WRITERS)
        .map(|t| {
            let (b, keys) = (Arc::clone(&b), Arc::clone(&keys));
            tokio::spawn(async move {
                let mut rng = Rng::new(0xfeed_0000 + t);
                let mut out = Vec::with_capacity(WRITES as usize);
                for i in 0..WRITES {
                    let w = match rng.below(3) {
                        0 => {
                            let k = &keys.0[rng.below(40) as usize];
                            write(k, CounterOp::inc(1 + rng.below(5)), t + 1, i)
                        }
                        1 => {
                            let k = &keys.1[rng.below(20) as usize];
                            let e = format!("e{}", rng.below(8));
                            let op = if rng.below(3) == 0 {
                                SetOp::remove(e)
                            } else {
                                SetOp::add(e)
                            };
                            write(k, op, t + 1, i)
                        }
                        _ => {
                            let k = &keys.2[rng.below(10) as usize];
                            write(k, lww(format!("t{t}-w{i}")), t + 1, i)
                        }
                    };
                    let r = b
                        .apply(w.clone())
                        .await
                        .unwrap_or_else(|e| panic!("task {t}, write {i}: {e}"));
                    out.push((w, r));
                }
                out
            })
        })
        .collect::<Vec<_>>();
    let remote = {
        let (b, keys) = (Arc::clone(&b), Arc::clone(&keys));
        tokio::spawn(async move {
            let mut rng = Rng::new(0x2e_30_7e);
            let mut replicas: BTreeMap<Key, Crdt> = BTreeMap::new();
            let mut out = Vec::new();
            for i in 0..60 {
                let (k, op) = match i % 3 {
                    0 => (&keys.0[rng.below(40) as usize], CounterOp::inc(7).into()),
                    1 => (
                        &keys.1[rng.below(20) as usize],
                        SetOp::add(format!("remote-{i}")).into(),
                    ),
                    _ => (&keys.2[rng.below(10) as usize], lww(format!("remote-{i}"))),
                };
                let replica = replicas
                    .entry(k.clone())
                    .or_insert_with(|| Crdt::empty(tag_of(&op)));
                let delta = replica
                    .apply(ActorId::new(REMOTE_ACTOR), at(i), &op)
                    .unwrap();
                replica.merge(&delta).unwrap();
                merge_ok(&*b, k, &delta).await;
                out.push((k.clone(), delta));
                tokio::task::yield_now().await;
            }
            out
        })
    };
    let per_task = join_all(handles).await;
    let remote = join_all(vec![remote]).await.pop().expect("one remote task");

    let mut fed: HashMap<(u16, u64), (&LocalWrite, &Receipt)> = HashMap::new();
    for (t, writes) in per_task.iter().enumerate() {
        let mut last: HashMap<u16, u64> = HashMap::new();
        for (w, r) in writes {
            assert_eq!(
                r.partition,
                layout.partition_of(&w.key),
                "receipt partition"
            );
            assert_eq!(
                r.seq.is_some(),
                !r.delta.context().is_empty(),
                "task {t}: a write is fed iff its delta changes something ({})",
                outcome(&Ok(r.clone()))
            );
            if let Some(seq) = r.seq {
                let previous = last.insert(r.partition, seq).unwrap_or(0);
                assert!(
                    seq > previous,
                    "task {t}: feed order differs from acknowledgement order"
                );
                assert!(
                    fed.insert((r.partition, seq), (w, r)).is_none(),
                    "(partition {}, seq {seq}) acknowledged twice",
                    r.partition
                );
            }
        }
    }
    let mut per_partition: HashMap<u16, u64> = HashMap::new();
    for (p, _) in fed.keys() {
        *per_partition.entry(*p).or_default() += 1;
    }
    let mut replay: BTreeMap<Key, Crdt> = BTreeMap::new();
    let mut entries_seen = 0;
    for p in 0..layout.partitions() {
        let n = per_partition.get(&p).copied().unwrap_or(0);
        assert_eq!(
            feed_bounds(&*b, p).await,
            (1, n),
            "partition {p}: feed bounds"
        );
        let feed = whole_feed(&*b, p, 7).await;
        assert_eq!(feed.len() as u64, n, "partition {p}: entry count");
        for e in feed {
            let Some((w, r)) = fed.get(&(p, e.seq)) else {
                panic!(
                    "partition {p}: feed entry {} matches no acknowledged write",
                    e.seq
                );
            };
            assert_eq!(e.key, w.key, "partition {p} seq {}: key", e.seq);
            assert_eq!(e.delta, r.delta, "partition {p} seq {}: delta", e.seq);
            assert_eq!(e.origin, w.actor, "partition {p} seq {}: origin", e.seq);
            assert_eq!(e.hlc, w.hlc, "partition {p} seq {}: hlc", e.seq);
            let value = replay
                .entry(e.key.clone())
                .or_insert_with(|| Crdt::empty(e.delta.type_tag()));
            value.merge(&e.delta).unwrap();
            entries_seen += 1;
        }
        let tail = b.read_feed(p, n, 10).await.unwrap();
        assert!(
            tail.entries.is_empty(),
            "partition {p}: entries after last_seq"
        );
    }
    assert_eq!(
        entries_seen,
        fed.len(),
        "every fed write appears exactly once"
    );
    for (k, delta) in &remote {
        let value = replay
            .entry(k.clone())
            .or_insert_with(|| Crdt::empty(delta.type_tag()));
        value.merge(delta).unwrap();
    }
    for (k, want) in &replay {
        assert_eq!(
            &must_get(&*b, k).await.value,
            want,
            "{k}: feed deltas plus remote deltas must rebuild the value"
        );
    }

    // No-op writes: nothing fed, nothing changed.
    let set = &keys.1[0];
    let current = must_get(&*b, set).await;
    let before = observe(&*b, set).await;
    let r = apply_ok(&*b, write(set, SetOp::remove("never-added"), 1, 0)).await;
    assert_eq!(r.seq, None, "removing an absent element is not fed");
    assert_eq!(r.version, current.version, "a no-op keeps the version");
    assert!(r.delta.context().is_empty(), "a no-op's delta is empty");
    assert_unchanged(&before, &observe(&*b, set).await, "a no-op write");
    let nowhere = key("feed:never-written");
    let before = observe(&*b, &nowhere).await;
    let r = apply_ok(&*b, write(&nowhere, SetOp::remove("x"), 1, 0)).await;
    assert_eq!((r.seq, r.version), (None, 0), "a no-op on an absent key");
    assert_unchanged(
        &before,
        &observe(&*b, &nowhere).await,
        "a no-op on an absent key",
    );
}

/// Trimming: `trim_feed(p, k)` drops exactly the entries up to `k` and returns how many (0 when
/// repeated or below what is already trimmed); reads start at the oldest entry held;
/// `first_seq`/`last_seq` and [`FeedPage::missed_after`](crate::FeedPage::missed_after) report
/// readers that fell behind; other partitions are untouched; after trimming everything the
/// next write continues the numbering.
pub async fn feed_trim<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = builder().await;
    need_feed(b.layout(), 64, "feed_trim");
    let layout = b.layout().clone();
    let p = layout.partition_of(&key("trim:0"));
    let keys = keys_in_partition(&layout, p, "trim:", 5);
    for i in 0..30u64 {
        let r = apply_ok(&b, write(&keys[i as usize % 5], CounterOp::inc(1), 1, i)).await;
        assert_eq!(r.seq, Some(i + 1));
    }
    let other = (0u64..)
        .map(|i| key(format!("trim-other:{i}")))
        .find(|k| layout.partition_of(k) != p)
        .expect("a key in another partition");
    let q = layout.partition_of(&other);
    for i in 0..3 {
        apply_ok(&b, write(&other, CounterOp::inc(1), 1, i)).await;
    }

    assert_eq!(
        b.trim_feed(p, 10).await.unwrap(),
        10,
        "trim through 10 drops 10 entries"
    );
    let page = b.read_feed(p, 0, 100).await.unwrap();
    assert_eq!((page.first_seq, page.last_seq), (11, 30));
    let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (11..=30).collect::<Vec<_>>(),
        "only the oldest entries are trimmed"
    );
    for after in 0..10 {
        assert!(
            page.missed_after(after),
            "a reader at {after} missed trimmed entries"
        );
    }
    for after in [10, 20, 30] {
        assert!(
            !page.missed_after(after),
            "a reader at {after} missed nothing"
        );
    }
    assert_eq!(
        b.trim_feed(p, 10).await.unwrap(),
        0,
        "trimming again drops nothing"
    );
    assert_eq!(
        b.trim_feed(p, 5).await.unwrap(),
        0,
        "trimming below drops nothing"
    );
    let page = b.read_feed(p, 15, 3).await.unwrap();
    let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![16, 17, 18], "read after 15, limit 3");
    assert_eq!(
        feed_bounds(&b, q).await,
        (1, 3),
        "another partition's feed is untouched"
    );

    assert_eq!(b.trim_feed(p, 1_000).await.unwrap(), 20, "trim everything");
    let page = b.read_feed(p, 0, 100).await.unwrap();
    assert!(page.entries.is_empty());
    assert_eq!(
        (page.first_seq, page.last_seq),
        (31, 30),
        "an empty feed: first = last + 1"
    );
    assert!(!page.missed_after(30));
    assert!(page.missed_after(29), "a reader at 29 missed entry 30");
    let r = apply_ok(&b, write(&keys[0], CounterOp::inc(1), 1, 99)).await;
    assert_eq!(r.seq, Some(31), "numbering continues after a trim");
    let page = b.read_feed(p, 30, 10).await.unwrap();
    assert_eq!(page.entries.len(), 1);
    assert_eq!((page.first_seq, page.last_seq), (31, 31));
    assert_eq!(page.entries[0].key, keys[0]);

    let untouched = (0..layout.partitions())
        .find(|x| *x != p && *x != q)
        .expect("a third partition");
    assert_eq!(b.trim_feed(untouched, 100).await.unwrap(), 0);
    let page = b.read_feed(untouched, 0, 10).await.unwrap();
    assert_eq!(
        (page.first_seq, page.last_seq),
        (1, 0),
        "a never-written feed"
    );
    assert!(!page.missed_after(0));
}

/// The feed keeps at most `feed_entries_max` entries per partition, dropping the oldest: after
/// `max + 5` writes to one partition its feed holds seqs `6..=max + 5`, a reader at 0 missed
/// entries and one at 5 did not; a partition written `max - 1` times keeps every entry.
/// Needs a small layout (see [`test_small_layout`]).
pub async fn feed_bounded<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = builder().await;
    let layout = b.layout().clone();
    let max = layout.feed_entries_max() as u64;
    assert!(
        max <= 1_000,
        "feed_bounded needs a layout with feed_entries_max <= 1000"
    );
    let p = layout.partition_of(&key("bound:0"));
    let keys = keys_in_partition(&layout, p, "bound:", 3);
    for i in 0..max + 5 {
        let r = apply_ok(&b, write(&keys[i as usize % 3], CounterOp::inc(1), 1, i)).await;
        assert_eq!(r.seq, Some(i + 1));
    }
    let feed = whole_feed(&b, p, 7).await;
    let seqs: Vec<u64> = feed.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (6..=max + 5).collect::<Vec<_>>(),
        "the feed keeps the newest {max}"
    );
    let page = b.read_feed(p, 0, 1).await.unwrap();
    assert_eq!((page.first_seq, page.last_seq), (6, max + 5));
    assert!(page.missed_after(0) && page.missed_after(4));
    assert!(!page.missed_after(5) && !page.missed_after(max + 5));
    let other = (0u64..)
        .map(|i| key(format!("bound-other:{i}")))
        .find(|k| layout.partition_of(k) != p)
        .expect("a key in another partition");
    for i in 0..max - 1 {
        apply_ok(&b, write(&other, CounterOp::inc(1), 1, i)).await;
    }
    let q = layout.partition_of(&other);
    assert_eq!(whole_feed(&b, q, 7).await.len() as u64, max - 1);
    assert_eq!(feed_bounds(&b, q).await, (1, max - 1));
}

// ---------------------------------------------------------------------------------------------
// Digests
// ---------------------------------------------------------------------------------------------

/// Deltas for 60 keys of every type, three actors each making three updates; each actor starts
/// from the join of the previous actors' replicas, so later deltas overwrite earlier dots.
fn digest_deltas() -> (Vec<(Key, Crdt)>, BTreeMap<Key, Crdt>) {
    let mut deltas = Vec::new();
    let mut finals = BTreeMap::new();
    for i in 0..60u64 {
        let k = key(format!("digest:{i:03}"));
        let kind = i % 5;
        let op = |actor: u64, j: u64| -> Op {
            match kind {
                0 => CounterOp::inc(actor + j).into(),
                1 if j == 2 => SetOp::remove(format!("e{}", actor - 1)).into(),
                1 => SetOp::add(format!("e{}", actor + j)).into(),
                2 => lww(format!("v{actor}{j}")),
                3 => Op::Mv(RegisterOp::write(format!("m{actor}{j}"))),
                _ => MapOp::update(format!("f{j}"), FieldOp::Counter(CounterOp::inc(actor))).into(),
            }
        };
        let mut seen = Crdt::empty(tag_of(&op(1, 0)));
        for actor in 1..=3u64 {
            let mut replica = seen.clone();
            for j in 0..3 {
                let delta = replica
                    .apply(ActorId::new(actor), at(actor * 10 + j), &op(actor, j))
                    .unwrap();
                replica.merge(&delta).unwrap();
                deltas.push((k.clone(), delta));
            }
            seen.merge(&replica).unwrap();
        }
        finals.insert(k, seen);
    }
    (deltas, finals)
}

/// Two backends merge the same remote deltas in different (seeded) orders: every key's value
/// is equal (and equal to the join of its deltas), every partition's digest is equal and is the
/// documented XOR of `entry_hash(key, value_hash)`, and `bucket_entries` agree. One more write
/// to one key in one backend changes exactly one bucket of exactly one partition (the key's
/// `partition_of`/`bucket_of`) and, in `bucket_entries`, only that key's hash; merging that
/// write's delta into the other makes them equal again. Deleting a key removes its
/// contribution: the digests equal those of a third backend that never had the key.
pub async fn digests_order_independent<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let a = builder().await;
    let b = builder().await;
    let layout = a.layout().clone();
    assert_eq!(&layout, b.layout(), "the builder must give equal layouts");
    let (deltas, mut contents) = digest_deltas();
    let mut shuffled = deltas.clone();
    Rng::new(0xd1_6e57).shuffle(&mut shuffled);
    assert_ne!(
        shuffled.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        deltas.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    for (k, d) in &deltas {
        merge_ok(&a, k, d).await;
    }
    for (k, d) in &shuffled {
        merge_ok(&b, k, d).await;
    }
    for (k, want) in &contents {
        assert_eq!(&must_get(&a, k).await.value, want, "{k}: merge in order");
        assert_eq!(
            &must_get(&b, k).await.value,
            want,
            "{k}: merge in another order"
        );
    }
    assert_digests_match(&a, &contents, "in-order merges").await;
    assert_digests_match(&b, &contents, "shuffled merges").await;

    // One more write to one key: one bucket of one partition differs.
    let changed = key("digest:000");
    let (p, bucket) = (layout.partition_of(&changed), layout.bucket_of(&changed));
    let entries_before = a.bucket_entries(p, bucket).await.unwrap();
    let r = apply_ok(&b, write(&changed, CounterOp::inc(1), 9, 99)).await;
    let (da, db) = (all_digests(&a).await, all_digests(&b).await);
    for q in 0..layout.partitions() {
        let differing = da[usize::from(q)].differing_buckets(&db[usize::from(q)]);
        if q == p {
            assert_eq!(
                differing,
                vec![bucket],
                "the changed key's bucket, and only it"
            );
        } else {
            assert!(differing.is_empty(), "partition {q} holds no changed key");
        }
    }
    let entries_after = b.bucket_entries(p, bucket).await.unwrap();
    assert_eq!(entries_before, a.bucket_entries(p, bucket).await.unwrap());
    assert_eq!(entries_before.len(), entries_after.len());
    for ((k1, h1), (k2, h2)) in entries_before.iter().zip(&entries_after) {
        assert_eq!(k1, k2, "bucket_entries lists the same keys");
        if k1 == &changed {
            assert_ne!(h1, h2, "the changed key's hash changes");
        } else {
            assert_eq!(h1, h2, "{k1}: an unchanged key's hash stays");
        }
    }
    merge_ok(&a, &changed, &r.delta).await;
    contents.insert(changed.clone(), must_get(&b, &changed).await.value);
    assert_eq!(
        all_digests(&a).await,
        all_digests(&b).await,
        "converged again"
    );
    assert_digests_match(&a, &contents, "after the extra write").await;

    // Delete removes the key's contribution.
    assert!(a.delete(&changed).await.unwrap());
    assert!(b.delete(&changed).await.unwrap());
    contents.remove(&changed);
    let c = builder().await;
    for (k, d) in deltas.iter().rev().filter(|(k, _)| k != &changed) {
        merge_ok(&c, k, d).await;
    }
    let dc = all_digests(&c).await;
    assert_eq!(
        all_digests(&a).await,
        dc,
        "a deleted key leaves no trace in the digest"
    );
    assert_eq!(
        all_digests(&b).await,
        dc,
        "a deleted key leaves no trace in the digest"
    );
    assert_digests_match(&a, &contents, "after delete").await;
    assert!(
        a.bucket_entries(p, bucket)
            .await
            .unwrap()
            .iter()
            .all(|(k, _)| k != &changed),
        "a deleted key is not listed"
    );
}

// ---------------------------------------------------------------------------------------------
// Compare-and-set and versions
// ---------------------------------------------------------------------------------------------

/// Compare-and-set on the region-local version: `Expect::Version` on an absent key and
/// `Expect::Absent` on a present one fail with `VersionConflict` and write nothing (value,
/// version, feed, digest unchanged); a stale version fails, the current one succeeds, `Any`
/// always writes; a remote merge changes the version too; a no-op write still checks its
/// condition first. ABA cannot happen: after a physical delete and a rewrite the old version is
/// stale. Versions never repeat within a partition over writes, merges, deletes and rewrites of
/// several keys of that partition.
pub async fn compare_and_set<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = builder().await;
    let layout = b.layout().clone();
    let k = key("cas:key");
    let mut versions: HashSet<u64> = HashSet::new();
    let note = |versions: &mut HashSet<u64>, v: u64, what: &str| {
        assert!(
            versions.insert(v),
            "{what}: version {v} was used before in this partition"
        );
    };

    let before = observe(&b, &k).await;
    let r = b
        .apply(cas(write(&k, CounterOp::inc(1), 1, 1), Expect::Version(1)))
        .await;
    assert_conflict_at(
        &r,
        &k,
        Expect::Version(1),
        None,
        "Expect::Version on an absent key",
    );
    assert_unchanged(
        &before,
        &observe(&b, &k).await,
        "Expect::Version on an absent key",
    );

    let r1 = apply_ok(&b, cas(write(&k, CounterOp::inc(1), 1, 2), Expect::Absent)).await;
    note(&mut versions, r1.version, "first write");
    let before = observe(&b, &k).await;
    let r = b
        .apply(cas(write(&k, CounterOp::inc(1), 1, 3), Expect::Absent))
        .await;
    assert_conflict_at(
        &r,
        &k,
        Expect::Absent,
        Some(r1.version),
        "Expect::Absent, present",
    );
    assert_unchanged(
        &before,
        &observe(&b, &k).await,
        "Expect::Absent on a present key",
    );

    let r2 = apply_ok(
        &b,
        cas(
            write(&k, CounterOp::inc(1), 1, 4),
            Expect::Version(r1.version),
        ),
    )
    .await;
    note(&mut versions, r2.version, "CAS at the current version");
    let before = observe(&b, &k).await;
    let r = b
        .apply(cas(
            write(&k, CounterOp::inc(1), 1, 5),
            Expect::Version(r1.version),
        ))
        .await;
    assert_conflict_at(
        &r,
        &k,
        Expect::Version(r1.version),
        Some(r2.version),
        "a stale version",
    );
    assert_unchanged(&before, &observe(&b, &k).await, "a stale version");
    assert_eq!(counter_value(&must_get(&b, &k).await.value), 2);

    let r3 = apply_ok(&b, write(&k, CounterOp::inc(1), 2, 6)).await;
    note(&mut versions, r3.version, "Expect::Any");
    let remote = Crdt::empty(TypeTag::PnCounter)
        .apply(ActorId::new(77), at(1), &CounterOp::inc(1).into())
        .unwrap();
    let r4 = merge_ok(&b, &k, &remote).await;
    note(&mut versions, r4.version, "remote merge");
    let r = b
        .apply(cas(
            write(&k, CounterOp::inc(1), 1, 7),
            Expect::Version(r3.version),
        ))
        .await;
    assert_conflict(&r, &k, "a version from before a remote merge");

    // A no-op write checks its condition first.
    let set = keys_in_partition(&layout, layout.partition_of(&k), "cas:set:", 1).remove(0);
    let s1 = apply_ok(&b, write(&set, SetOp::add("x"), 1, 1)).await;
    note(&mut versions, s1.version, "set add");
    let noop = apply_ok(
        &b,
        cas(
            write(&set, SetOp::remove("y"), 1, 2),
            Expect::Version(s1.version),
        ),
    )
    .await;
    assert_eq!(
        (noop.seq, noop.version),
        (None, s1.version),
        "a no-op at the current version"
    );
    let before = observe(&b, &set).await;
    let r = b
        .apply(cas(
            write(&set, SetOp::remove("y"), 1, 3),
            Expect::Version(r1.version),
        ))
        .await;
    assert_conflict(&r, &set, "a no-op at a wrong version");
    let r = b
        .apply(cas(write(&set, SetOp::remove("y"), 1, 3), Expect::Absent))
        .await;
    assert_conflict(&r, &set, "a no-op expecting absence");
    assert_unchanged(&before, &observe(&b, &set).await, "failed no-ops");

    // ABA: delete and rewrite; the old version must not match the new value.
    let old = must_get(&b, &k).await.version;
    assert!(b.delete(&k).await.unwrap());
    let r = b
        .apply(cas(
            write(&k, CounterOp::inc(1), 1, 8),
            Expect::Version(old),
        ))
        .await;
    assert_conflict_at(
        &r,
        &k,
        Expect::Version(old),
        None,
        "Expect::Version after a delete",
    );
    let again = apply_ok(&b, cas(write(&k, CounterOp::inc(1), 1, 9), Expect::Absent)).await;
    note(&mut versions, again.version, "rewrite after delete");
    assert_ne!(
        again.version, old,
        "ABA: a rewritten key must not get its old version back"
    );
    let r = b
        .apply(cas(
            write(&k, CounterOp::inc(1), 1, 10),
            Expect::Version(old),
        ))
        .await;
    assert_conflict_at(&r, &k, Expect::Version(old), Some(again.version), "ABA");
    assert_eq!(
        counter_value(&must_get(&b, &k).await.value),
        1,
        "a rewrite starts afresh"
    );

    // Many writes, merges, deletes and rewrites of keys in one partition: no version repeats.
    let keys = keys_in_partition(&layout, layout.partition_of(&k), "cas:many:", 6);
    let mut rng = Rng::new(0xca5);
    let mut replica = Crdt::empty(TypeTag::PnCounter);
    for i in 0..300u64 {
        let k = &keys[rng.below(6) as usize];
        match rng.below(5) {
            0 => {
                if b.delete(k).await.unwrap() {
                    assert_eq!(b.get(k).await.unwrap(), None);
                }
            }
            1 => {
                let delta = replica
                    .apply(ActorId::new(500), at(i), &CounterOp::inc(1).into())
                    .unwrap();
                replica.merge(&delta).unwrap();
                note(
                    &mut versions,
                    merge_ok(&b, k, &delta).await.version,
                    "merge",
                );
            }
            _ => note(
                &mut versions,
                apply_ok(&b, write(k, CounterOp::inc(1), 1 + i % 3, i))
                    .await
                    .version,
                "write",
            ),
        }
        if let Some(s) = b.get(k).await.unwrap() {
            assert!(
                versions.contains(&s.version),
                "get returns the last write's version"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scans
// ---------------------------------------------------------------------------------------------

/// Scans a whole prefix in pages of `limit`, checking every page; returns the items.
async fn scan_all<B: StateBackend>(
    b: &B,
    prefix: &str,
    after: Option<Key>,
    limit: usize,
) -> Vec<ScanItem> {
    let mut out: Vec<ScanItem> = Vec::new();
    let mut cursor = after.clone();
    for _ in 0..100_000 {
        let page = b
            .scan(prefix, cursor.as_ref(), limit)
            .await
            .unwrap_or_else(|e| panic!("scan({prefix:?}, {cursor:?}, {limit}): {e}"));
        let what = format!("scan({prefix:?}, {cursor:?}, {limit})");
        assert!(
            page.items.len() <= limit.min(PAGE_LIMIT_MAX),
            "{what}: {} items",
            page.items.len()
        );
        for item in &page.items {
            assert!(
                item.key.as_str().starts_with(prefix),
                "{what}: {} lacks the prefix",
                item.key
            );
            if let Some(c) = &cursor {
                assert!(
                    &item.key > c,
                    "{what}: {} is not after the cursor",
                    item.key
                );
            }
            if let Some(last) = out.last() {
                assert!(item.key > last.key, "{what}: {} out of key order", item.key);
            }
            out.push(item.clone());
        }
        match page.next {
            None => return out,
            Some(next) => {
                let last = page.items.last().unwrap_or_else(|| {
                    panic!("{what}: an empty page must end the scan, yet next is {next}")
                });
                assert!(
                    next >= last.key,
                    "{what}: next {next} is before the page's last key"
                );
                cursor = Some(next);
            }
        }
    }
    panic!("scan({prefix:?}) did not finish in 100,000 pages");
}

/// 1,000 keys under `scan:` plus keys that are not (`scam:1`, `sca`, `scan`, `scan;`, `SCAN:1`,
/// ...) and some that are (`scan:`, `scan:~`, `scan:é`), scanned in pages of 1, 7, 100,
/// [`PAGE_LIMIT_MAX`] and more (capped): every key with the prefix appears exactly once, in
/// byte order overall, none without it, each with its value. Resuming after a key (present or
/// not, before or beyond the prefix) starts at the next key. Prefixes holding glob or LIKE
/// metacharacters (`*`, `?`, `[`, `%`, `_`, `\`) match literally. `limit` 0 is InvalidArgument.
pub async fn scan_prefix_pages<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = builder().await;
    let mut names: Vec<String> = (0..1_000).map(|i| format!("scan:{i:04}")).collect();
    names.extend(["scan:", "scan:~", "scan:\u{e9}", "scan:Z", "scan::"].map(String::from));
    let decoys = [
        "scam:1",
        "sca",
        "scan",
        "scan;",
        "scan;x",
        "SCAN:1",
        "Scan:2",
        "scao",
        "a",
        "zzz",
        "scan\u{e9}",
        "sc:an:1",
    ];
    let specials = [
        "glob*1",
        "glob?2",
        "glob[3]",
        "globx",
        "like%1",
        "like_2",
        "likeX3",
        "back\\slash",
        "backXslash",
    ];
    let mut all: Vec<String> = names.clone();
    all.extend(decoys.iter().chain(&specials).map(|s| s.to_string()));
    let mut versions: BTreeMap<Key, u64> = BTreeMap::new();
    for (i, name) in all.iter().enumerate() {
        let k = key(name.as_str());
        let r = apply_ok(&b, write(&k, lww(name.as_bytes()), 1, i as u64)).await;
        versions.insert(k, r.version);
    }
    let expected: Vec<Key> = names
        .iter()
        .map(|n| key(n.as_str()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for limit in [1, 7, 100, PAGE_LIMIT_MAX, PAGE_LIMIT_MAX + 1] {
        let items = scan_all(&b, "scan:", None, limit).await;
        let got: Vec<Key> = items.iter().map(|i| i.key.clone()).collect();
        assert!(
            got == expected,
            "scan(\"scan:\", limit {limit}): {} keys instead of {}, or not in key order",
            got.len(),
            expected.len()
        );
        for item in &items {
            match &item.value {
                Ok(Stored {
                    value: Crdt::LwwRegister(r),
                    version,
                }) => {
                    assert_eq!(
                        r.value().map(Vec::as_slice),
                        Some(item.key.as_str().as_bytes())
                    );
                    assert_eq!(*version, versions[&item.key], "{}: version", item.key);
                }
                other => panic!("scan item {}: unexpected value {other:?}", item.key),
            }
        }
    }
    let everything: Vec<Key> = scan_all(&b, "", None, 100)
        .await
        .into_iter()
        .map(|i| i.key)
        .collect();
    let want: Vec<Key> = versions.keys().cloned().collect();
    assert!(
        everything == want,
        "scan(\"\") must list every key once, in order"
    );

    let from = |after: &str, limit| {
        let after = key(after);
        let b = &b;
        async move {
            b.scan("scan:", Some(&after), limit)
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|i| i.key.to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        from("scan:0500", 3).await,
        ["scan:0501", "scan:0502", "scan:0503"]
    );
    assert_eq!(
        from("scan:0500x", 2).await,
        ["scan:0501", "scan:0502"],
        "after an absent key"
    );
    assert_eq!(
        from("a", 2).await,
        ["scan:", "scan:0000"],
        "after a key before the prefix"
    );
    assert_eq!(
        from("scan:", 1).await,
        ["scan:0000"],
        "after the prefix itself"
    );
    assert_eq!(
        from("scan:\u{e9}", 5).await,
        Vec::<String>::new(),
        "after the last key"
    );
    let page = b.scan("scan:", Some(&key("scan;")), 5).await.unwrap();
    assert!(
        page.items.is_empty() && page.next.is_none(),
        "after the whole prefix"
    );
    let page = b.scan("nothing-here:", None, 5).await.unwrap();
    assert!(
        page.items.is_empty() && page.next.is_none(),
        "an unused prefix"
    );

    for (prefix, want) in [
        ("glob*", vec!["glob*1"]),
        ("glob?", vec!["glob?2"]),
        ("glob[", vec!["glob[3]"]),
        ("like%", vec!["like%1"]),
        ("like_", vec!["like_2"]),
        ("back\\", vec!["back\\slash"]),
        ("sca", {
            let mut v: Vec<&str> = names.iter().map(String::as_str).collect();
            v.extend([
                "scam:1",
                "sca",
                "scan",
                "scan;",
                "scan;x",
                "scao",
                "scan\u{e9}",
            ]);
            v.sort_unstable();
            v
        }),
    ] {
        let got: Vec<String> = scan_all(&b, prefix, None, 7)
            .await
            .into_iter()
            .map(|i| i.key.to_string())
            .collect();
        assert!(
            got == want,
            "scan({prefix:?}) must match the prefix literally: got {} keys, first {:?}",
            got.len(),
            got.first()
        );
    }
    assert_invalid_argument(&b.scan("scan:", None, 0).await, "scan with limit 0");
}

// ---------------------------------------------------------------------------------------------
// Corruption
// ---------------------------------------------------------------------------------------------

/// Undecodable bytes under a key (random bytes, nothing at all, a bare magic, every single-bit
/// flip of a valid envelope, truncations, a trailing byte, a flipped bit in a compressed
/// payload) give `Corrupt` on `get`, per item in `get_many` and `scan` (other items fine), and
/// on `apply` (even a no-op removal: a corrupt value is never taken for an empty one), on
/// `merge`, and per item in `apply_many`/`merge_many`; after each failed write the raw bytes,
/// the feed and the digest are unchanged. A corrupt key still counts in the digest and is
/// listed by `bucket_entries`; `delete` removes it and the key can be written afresh. A valid
/// envelope of another type is not corruption: reads work, and a write of the wrong type is a
/// type mismatch that changes nothing.
pub async fn corrupt_values<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = builder().await;
    let layout = b.layout().clone();
    let options = envelope::Options::default();
    let mut counter = Crdt::empty(TypeTag::PnCounter);
    let d = counter
        .apply(ActorId::new(1), at(1), &CounterOp::inc(7).into())
        .unwrap();
    counter.merge(&d).unwrap();
    let valid = envelope::encode(&counter, &options).unwrap();
    let mut big_set = Crdt::empty(TypeTag::OrSet);
    let elements: Vec<Vec<u8>> = (0..2_000)
        .map(|i| format!("element-{i}").into_bytes())
        .collect();
    let d = big_set
        .apply(ActorId::new(1), at(1), &Op::Set(SetOp::Add(elements)))
        .unwrap();
    big_set.merge(&d).unwrap();
    let compressed = envelope::encode(&big_set, &options).unwrap();
    assert_ne!(
        compressed[6] & envelope::FLAG_COMPRESSED,
        0,
        "the large set's envelope is compressed"
    );

    // Every single-bit flip of a valid envelope is detected on read.
    let probe = key("corrupt:probe");
    for bit in 0..valid.len() * 8 {
        let mut bytes = valid.clone();
        bytes[bit / 8] ^= 1 << (bit % 8);
        b.raw_put(&probe, bytes).await.unwrap();
        assert_corrupt(&b.get(&probe).await, &probe, &format!("bit {bit} flipped"));
    }
    assert!(
        b.delete(&probe).await.unwrap(),
        "a corrupt key can be deleted"
    );

    let mut rng = Rng::new(0xbad);
    let mut garbage: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", rng.bytes(64)),
        ("no bytes", Vec::new()),
        ("a bare magic", envelope::MAGIC.to_vec()),
        ("a truncated envelope", valid[..valid.len() - 1].to_vec()),
        ("a header only", valid[..envelope::HEADER_LEN].to_vec()),
        ("a trailing byte", [valid.as_slice(), &[0u8][..]].concat()),
        ("a compressed payload with a flipped bit", {
            let mut c = compressed.clone();
            let middle = c.len() / 2;
            c[middle] ^= 0x10;
            c
        }),
    ];
    for byte in [0, 4, 5, 6, 7, envelope::HEADER_LEN, valid.len() - 1] {
        let mut bytes = valid.clone();
        bytes[byte] ^= 0x04;
        garbage.push(("one flipped bit", bytes));
    }

    // The good key lives in another partition than the corrupt ones, so writes to it do not
    // disturb the corrupt keys' feed and digest.
    let good = key("corrupt:good");
    apply_ok(&b, write(&good, CounterOp::inc(1), 1, 1)).await;
    let absent = key("corrupt:absent");
    for (i, (what, bytes)) in garbage.into_iter().enumerate() {
        let k = (0..1_000)
            .map(|j| key(format!("corrupt:{i:02}:{j}")))
            .find(|k| layout.partition_of(k) != layout.partition_of(&good))
            .expect("the layout has more than one partition");
        let what = format!("{k} ({what})");
        let p = layout.partition_of(&k);
        let empty_digest = b.digest(p).await.unwrap();
        b.raw_put(&k, bytes.clone()).await.unwrap();
        assert_eq!(
            b.raw_get(&k).await.unwrap(),
            Some(bytes.clone()),
            "{what}: raw_get"
        );
        assert_corrupt(&b.get(&k).await, &k, &format!("{what}: get"));
        let many = b
            .get_many(&[good.clone(), k.clone(), absent.clone()])
            .await
            .unwrap();
        assert_eq!(many.len(), 3, "{what}: get_many returns one result per key");
        assert!(
            matches!(&many[0], Ok(Some(_))),
            "{what}: get_many of a good key"
        );
        assert_corrupt(&many[1], &k, &format!("{what}: get_many"));
        assert!(
            matches!(&many[2], Ok(None)),
            "{what}: get_many of an absent key"
        );
        assert_ne!(
            b.digest(p).await.unwrap(),
            empty_digest,
            "{what}: a corrupt value still counts in the digest"
        );
        let listed = b.bucket_entries(p, layout.bucket_of(&k)).await.unwrap();
        assert!(
            listed.iter().any(|(x, _)| x == &k),
            "{what}: bucket_entries lists the key"
        );

        let before = observe(&b, &k).await;
        let r = b.apply(write(&k, CounterOp::inc(1), 1, 2)).await;
        assert_corrupt(&r, &k, &format!("{what}: apply"));
        let r = b.apply(write(&k, SetOp::remove("x"), 1, 3)).await;
        assert_corrupt(&r, &k, &format!("{what}: a no-op apply"));
        let r = b.apply(write(&k, Op::Delete, 1, 3)).await;
        assert_corrupt(&r, &k, &format!("{what}: a deletion"));
        let r = b
            .apply(cas(write(&k, CounterOp::inc(1), 1, 4), Expect::Absent))
            .await;
        assert!(
            r.is_err(),
            "{what}: Expect::Absent on a corrupt key must fail"
        );
        let delta = Crdt::empty(TypeTag::PnCounter)
            .apply(ActorId::new(2), at(5), &CounterOp::inc(1).into())
            .unwrap();
        assert_corrupt(&b.merge(&k, &delta).await, &k, &format!("{what}: merge"));
        let results = b
            .apply_many(vec![
                write(&good, CounterOp::inc(1), 1, 6),
                write(&k, CounterOp::inc(1), 1, 6),
            ])
            .await
            .unwrap();
        assert!(results[0].is_ok(), "{what}: apply_many of a good key");
        assert_corrupt(&results[1], &k, &format!("{what}: apply_many"));
        let results = b
            .merge_many(&[(k.clone(), delta.clone()), (good.clone(), delta.clone())])
            .await
            .unwrap();
        assert_corrupt(&results[0], &k, &format!("{what}: merge_many"));
        assert!(results[1].is_ok(), "{what}: merge_many of a good key");
        assert_unchanged(
            &before,
            &observe(&b, &k).await,
            &format!("{what}: failed writes"),
        );

        let page = b.scan("corrupt:", None, 100).await.unwrap();
        let item = page
            .items
            .iter()
            .find(|i| i.key == k)
            .expect("scan lists the corrupt key");
        assert_corrupt(&item.value, &k, &format!("{what}: scan"));
        let fine = page
            .items
            .iter()
            .find(|i| i.key == good)
            .expect("scan lists the good key");
        assert!(fine.value.is_ok(), "{what}: other scan items are fine");

        assert!(b.delete(&k).await.unwrap(), "{what}: delete repairs");
        assert_eq!(
            b.digest(p).await.unwrap(),
            empty_digest,
            "{what}: delete restores the digest"
        );
        apply_ok(&b, cas(write(&k, CounterOp::inc(1), 1, 7), Expect::Absent)).await;
        assert_eq!(
            counter_value(&must_get(&b, &k).await.value),
            1,
            "{what}: a fresh value"
        );
    }

    // A valid envelope of another type is a value, not corruption.
    let typed = key("corrupt:typed");
    let set_bytes = envelope::encode(&big_set, &options).unwrap();
    b.raw_put(&typed, set_bytes).await.unwrap();
    assert_eq!(
        must_get(&b, &typed).await.value,
        big_set,
        "a valid envelope decodes"
    );
    let before = observe(&b, &typed).await;
    assert_type_mismatch(
        &b.apply(write(&typed, CounterOp::inc(1), 1, 1)).await,
        "counter op on a set",
    );
    let delta = Crdt::empty(TypeTag::PnCounter)
        .apply(ActorId::new(2), at(5), &CounterOp::inc(1).into())
        .unwrap();
    assert_type_mismatch(
        &b.merge(&typed, &delta).await,
        "merging a counter into a set",
    );
    assert_unchanged(&before, &observe(&b, &typed).await, "wrong-type writes");
    let r = apply_ok(&b, write(&typed, SetOp::add("one-more"), 1, 2)).await;
    assert!(r.seq.is_some());
    assert_eq!(or_set(&must_get(&b, &typed).await.value).len(), 2_001);
}

// ---------------------------------------------------------------------------------------------
// Limits and arguments
// ---------------------------------------------------------------------------------------------

/// Keys: empty, with a control character, or longer than 1,024 bytes are `InvalidKey`; a key of
/// exactly 1,024 bytes (multi-byte characters included) is written, read and scanned. Partition
/// numbers out of range (for `read_feed`, `trim_feed`, `digest`, `bucket_entries`, `cursor`,
/// `advance_cursor`), bucket numbers out of range and page limits of 0 (`scan`, `read_feed`,
/// `read_conflicts`) are `InvalidArgument`; digests have `Layout::buckets` buckets.
pub async fn key_and_argument_limits<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = builder().await;
    let layout = b.layout().clone();
    let bad = [
        String::new(),
        "a\u{0}b".to_string(),
        "line\nbreak".to_string(),
        "del\u{7f}".to_string(),
        "c1\u{85}".to_string(),
        "x".repeat(KEY_BYTES_MAX + 1),
        format!("{}a", "\u{e9}".repeat(KEY_BYTES_MAX / 2)),
    ];
    for name in bad {
        match Key::new(name.clone()) {
            Err(BackendError::InvalidKey { .. }) => {}
            other => panic!(
                "Key::new({:?}...) must be InvalidKey, got {other:?}",
                name.chars().take(20).collect::<String>()
            ),
        }
    }
    let longest = key("\u{e9}".repeat(KEY_BYTES_MAX / 2));
    assert_eq!(longest.as_str().len(), KEY_BYTES_MAX);
    let r = apply_ok(&b, write(&longest, CounterOp::inc(1), 1, 1)).await;
    assert_eq!(
        must_get(&b, &longest).await.version,
        r.version,
        "the longest key reads back"
    );
    let page = b.scan("\u{e9}", None, 10).await.unwrap();
    assert_eq!(page.items.len(), 1, "the longest key is scanned");
    assert_eq!(page.items[0].key, longest);
    let ascii = key("k".repeat(KEY_BYTES_MAX));
    apply_ok(&b, write(&ascii, CounterOp::inc(1), 1, 1)).await;
    assert!(b.get(&ascii).await.unwrap().is_some());

    for p in [
        layout.partitions(),
        layout.partitions().saturating_add(1),
        u16::MAX,
    ] {
        assert_invalid_argument(&b.read_feed(p, 0, 10).await, &format!("read_feed({p})"));
        assert_invalid_argument(&b.trim_feed(p, 10).await, &format!("trim_feed({p})"));
        assert_invalid_argument(&b.digest(p).await, &format!("digest({p})"));
        assert_invalid_argument(
            &b.bucket_entries(p, 0).await,
            &format!("bucket_entries({p})"),
        );
        assert_invalid_argument(&b.cursor("us-east", p).await, &format!("cursor({p})"));
        assert_invalid_argument(
            &b.advance_cursor("us-east", p, 1).await,
            &format!("advance_cursor({p})"),
        );
    }
    assert_invalid_argument(
        &b.bucket_entries(0, layout.buckets()).await,
        "bucket_entries with a bucket out of range",
    );
    assert_invalid_argument(&b.bucket_entries(0, u16::MAX).await, "bucket u16::MAX");
    assert_invalid_argument(&b.scan("", None, 0).await, "scan limit 0");
    assert_invalid_argument(&b.read_feed(0, 0, 0).await, "read_feed limit 0");
    assert_invalid_argument(&b.read_conflicts(0, 0).await, "read_conflicts limit 0");
    let last = layout.partitions() - 1;
    for p in [0, last] {
        assert_eq!(
            b.digest(p).await.unwrap().buckets().len(),
            usize::from(layout.buckets()),
            "digest({p}) has one fingerprint per bucket"
        );
        b.read_feed(p, 0, PAGE_LIMIT_MAX + 1)
            .await
            .expect("a limit above the cap is capped");
        b.bucket_entries(p, layout.buckets() - 1)
            .await
            .expect("the last bucket");
    }
}

/// Page limits above [`PAGE_LIMIT_MAX`] (`usize::MAX` included) are capped, not refused: with
/// `PAGE_LIMIT_MAX + 50` keys under one prefix, conflict records, and local writes to one
/// partition, a first page holds exactly `PAGE_LIMIT_MAX` items (of the feed: of the entries
/// still held, if fewer) and the rest follows.
pub async fn page_limits_capped<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = builder().await;
    let layout = b.layout().clone();
    let n = PAGE_LIMIT_MAX + 50;
    let delta = Crdt::empty(TypeTag::PnCounter)
        .apply(ActorId::new(1), at(1), &CounterOp::inc(1).into())
        .unwrap();
    let keys: Vec<Key> = (0..n).map(|i| key(format!("cap:{i:05}"))).collect();
    for chunk in keys.chunks(1_000) {
        let items: Vec<(Key, Crdt)> = chunk.iter().map(|k| (k.clone(), delta.clone())).collect();
        for r in b.merge_many(&items).await.unwrap() {
            r.unwrap();
        }
    }
    let page = b.scan("cap:", None, usize::MAX).await.unwrap();
    assert_eq!(
        page.items.len(),
        PAGE_LIMIT_MAX,
        "scan with limit usize::MAX"
    );
    let next = page.next.expect("the scan is not complete");
    let rest = scan_all(&b, "cap:", Some(next), PAGE_LIMIT_MAX + 1).await;
    assert_eq!(rest.len(), 50, "the scan resumes after the capped page");

    for i in 0..n {
        b.append_conflict(format!("conflict {i}").into_bytes())
            .await
            .unwrap();
    }
    let records = b.read_conflicts(0, usize::MAX).await.unwrap();
    assert_eq!(
        records.len(),
        PAGE_LIMIT_MAX,
        "read_conflicts with limit usize::MAX"
    );
    let last = records.last().map(|r| r.0).unwrap();
    assert_eq!(b.read_conflicts(last, usize::MAX).await.unwrap().len(), 50);

    let p = layout.partition_of(&key("cap-feed:0"));
    let feed_keys = keys_in_partition(&layout, p, "cap-feed:", 10);
    let writes = (0..n)
        .map(|i| write(&feed_keys[i % 10], CounterOp::inc(1), 1, i as u64))
        .collect();
    for r in b.apply_many(writes).await.unwrap() {
        r.unwrap();
    }
    let held = n.min(layout.feed_entries_max());
    let page = b.read_feed(p, 0, usize::MAX).await.unwrap();
    assert_eq!(
        page.entries.len(),
        held.min(PAGE_LIMIT_MAX),
        "read_feed with limit usize::MAX"
    );
    assert_eq!(page.last_seq, n as u64);
}

/// A value above `Layout::value_bytes_max` is `ValueTooLarge` (naming the key and the limit)
/// and writes nothing: a register write of `value_bytes_max + 1 KiB` random bytes to an absent
/// key and to a present one, a remote merge of such a delta, and such an item in `apply_many`
/// (whose other items succeed).
pub async fn value_too_large<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = builder().await;
    let limit = b.layout().value_bytes_max();
    let big = Rng::new(0xb16).bytes(limit + 1024);
    let k = key("large:new");
    let before = observe(&b, &k).await;
    let r = b.apply(write(&k, lww(big.clone()), 1, 1)).await;
    assert_too_large(&r, &k, limit, "a large write to an absent key");
    assert_unchanged(
        &before,
        &observe(&b, &k).await,
        "a large write to an absent key",
    );

    let small = key("large:small");
    apply_ok(&b, write(&small, lww("small"), 1, 1)).await;
    let before = observe(&b, &small).await;
    let r = b.apply(write(&small, lww(big.clone()), 1, 2)).await;
    assert_too_large(&r, &small, limit, "a large write to a present key");
    assert_unchanged(
        &before,
        &observe(&b, &small).await,
        "a large write to a present key",
    );

    let delta = Crdt::empty(TypeTag::LwwRegister)
        .apply(ActorId::new(9), at(3), &lww(big.clone()))
        .unwrap();
    let r = b.merge(&small, &delta).await;
    assert_too_large(&r, &small, limit, "a large remote merge");
    assert_unchanged(&before, &observe(&b, &small).await, "a large remote merge");

    let other = key("large:other");
    let results = b
        .apply_many(vec![
            write(&k, lww(big), 1, 4),
            write(&other, lww("fine"), 1, 4),
        ])
        .await
        .unwrap();
    assert_too_large(&results[0], &k, limit, "a large write in apply_many");
    assert!(results[1].is_ok(), "the other item of the batch succeeds");
    assert_eq!(
        b.get(&k).await.unwrap(),
        None,
        "nothing was written for the large item"
    );
}

/// The size limit counts the canonical payload ([`envelope::payload_len`]): register writes
/// to fresh keys are accepted exactly up to `value_bytes_max` payload bytes and refused one
/// byte above. Needs a small layout (see [`test_small_layout`]).
pub async fn value_size_boundary<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = builder().await;
    let limit = b.layout().value_bytes_max();
    assert!(
        limit <= 64 * 1024,
        "value_size_boundary needs value_bytes_max <= 64 KiB"
    );
    let mut rng = Rng::new(0x5123);
    let written = |n: usize, rng: &mut Rng| {
        let bytes = rng.bytes(n);
        let delta = Crdt::empty(TypeTag::LwwRegister)
            .apply(ActorId::new(1), at(1), &lww(bytes.clone()))
            .unwrap();
        (
            bytes,
            payload_len(&joined(&Crdt::empty(TypeTag::LwwRegister), &delta)),
        )
    };
    // The largest register value whose stored payload fits.
    let fits = (0..=limit)
        .rev()
        .find(|n| written(*n, &mut rng).1 <= limit)
        .expect("an empty register fits");
    for i in 0..4 {
        let k = key(format!("boundary:fit:{i}"));
        let (bytes, len) = written(fits, &mut rng);
        assert!(len <= limit);
        let r = apply_ok(&b, write(&k, lww(bytes), 1, 1)).await;
        assert!(r.seq.is_some());
        assert_eq!(payload_len(&must_get(&b, &k).await.value), len);
        let k = key(format!("boundary:over:{i}"));
        let (bytes, len) = written(fits + 1, &mut rng);
        assert!(len > limit);
        let before = observe(&b, &k).await;
        let r = b.apply(write(&k, lww(bytes), 1, 1)).await;
        assert_too_large(
            &r,
            &k,
            limit,
            &format!("{len} payload bytes, limit {limit}"),
        );
        assert_unchanged(
            &before,
            &observe(&b, &k).await,
            "a write one byte over the limit",
        );
    }
}

/// A set that grows by small adds is refused exactly at the add whose result would exceed
/// `value_bytes_max` (canonical payload bytes), with `ValueTooLarge` and nothing written;
/// every accepted state fits; a remote merge that would cross the limit is refused too; a
/// removal still succeeds afterwards. Needs a small layout (see [`test_small_layout`]).
pub async fn set_growth_limit<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = builder().await;
    let limit = b.layout().value_bytes_max();
    assert!(
        limit <= 64 * 1024,
        "set_growth_limit needs value_bytes_max <= 64 KiB"
    );
    let k = key("growth:set");
    let mut model = Crdt::empty(TypeTag::OrSet);
    let mut refused = false;
    for i in 0..limit as u64 {
        let op: Op = SetOp::add(format!("el{i:06}")).into();
        let delta = model.apply(ActorId::new(1), at(i), &op).unwrap();
        let next = joined(&model, &delta);
        let before = observe(&b, &k).await;
        let r = b.apply(write(&k, op, 1, i)).await;
        if payload_len(&next) <= limit {
            let r = r.unwrap_or_else(|e| {
                panic!("add {i}: {e} (payload {} <= {limit})", payload_len(&next))
            });
            assert!(r.seq.is_some());
            model = next;
            let stored = must_get(&b, &k).await;
            assert_eq!(stored.value, model, "add {i}");
            assert!(
                payload_len(&stored.value) <= limit,
                "an accepted value fits"
            );
        } else {
            assert_too_large(&r, &k, limit, &format!("add {i} crossing the limit"));
            assert_unchanged(&before, &observe(&b, &k).await, "the refused add");
            refused = true;
            break;
        }
    }
    assert!(refused, "the set reached the limit");
    assert!(or_set(&model).len() > 10, "many adds fit before the limit");

    // A remote add that would cross the limit.
    let delta = model
        .apply(
            ActorId::new(2),
            at(0),
            &SetOp::add("remote-element-0000").into(),
        )
        .unwrap();
    let next = joined(&model, &delta);
    assert!(payload_len(&next) > limit);
    let before = observe(&b, &k).await;
    assert_too_large(
        &b.merge(&k, &delta).await,
        &k,
        limit,
        "a remote add crossing the limit",
    );
    assert_unchanged(&before, &observe(&b, &k).await, "the refused merge");

    // Shrinking still works.
    let r = apply_ok(&b, write(&k, SetOp::remove("el000000"), 1, 0)).await;
    assert!(r.seq.is_some());
    assert!(!or_set(&must_get(&b, &k).await.value).contains(&b"el000000".to_vec()));
}

/// The limit applies to the joined value, not to the sum of its parts. A join can be a few
/// bytes larger than its two sides together: a set of 250 elements from 250 actors joined with
/// one more element from one more actor grows two length prefixes past bincode's one-byte
/// range. A remote merge whose two sides sum to exactly `value_bytes_max` but whose join is
/// larger is refused with nothing written, and one whose join is exactly `value_bytes_max` is
/// accepted. Needs a small layout (see [`test_small_layout`]).
pub async fn join_size_exact<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = builder().await;
    let limit = b.layout().value_bytes_max();
    assert!(
        (4 * 1024..=64 * 1024).contains(&limit),
        "join_size_exact needs 4 KiB <= value_bytes_max <= 64 KiB"
    );
    let empty = Crdt::empty(TypeTag::OrSet);
    let mut base = empty.clone();
    for a in 1..=250u64 {
        let op = SetOp::add(format!("e{a:03}")).into();
        let d = base.apply(ActorId::new(a), at(a), &op).unwrap();
        base.merge(&d).unwrap();
    }
    let base_len = payload_len(&base);
    assert!(
        base_len + 512 < limit,
        "the base set leaves room below the limit"
    );
    // One more element from one more actor, `n` bytes long.
    let extra = |n: usize| {
        let op = SetOp::add(vec![b'x'; n]).into();
        joined(
            &empty,
            &empty.apply(ActorId::new(251), at(251), &op).unwrap(),
        )
    };
    let sums_to_limit = (0..limit)
        .find(|n| base_len + payload_len(&extra(*n)) == limit)
        .expect("an element length makes the two sides sum to the limit");
    let over = extra(sums_to_limit);
    assert!(
        payload_len(&joined(&base, &over)) > limit,
        "this case needs a join larger than its two sides"
    );
    let fits = (0..sums_to_limit)
        .rev()
        .find(|n| payload_len(&joined(&base, &extra(*n))) == limit)
        .expect("an element length makes the join exactly the limit");

    let k = key("join-size:over");
    merge_ok(&b, &k, &base).await;
    let before = observe(&b, &k).await;
    let r = b.merge(&k, &over).await;
    assert_too_large(&r, &k, limit, "sides summing to the limit, join above it");
    assert_unchanged(&before, &observe(&b, &k).await, "the refused merge");

    let k = key("join-size:fits");
    merge_ok(&b, &k, &base).await;
    merge_ok(&b, &k, &extra(fits)).await;
    let stored = must_get(&b, &k).await;
    assert_eq!(
        payload_len(&stored.value),
        limit,
        "a join of exactly the limit is accepted"
    );
    assert_eq!(stored.value, joined(&base, &extra(fits)));
}

// ---------------------------------------------------------------------------------------------
// Cursors and the conflict feed
// ---------------------------------------------------------------------------------------------

/// Replication cursors start at 0 and are kept per (origin, partition); `advance_cursor`
/// returns the cursor after, never moves it back (advancing to a lower seq keeps the higher),
/// and under 8 concurrent advancers ends at the maximum. Origins that are empty, hold a control
/// character or exceed 64 bytes are `InvalidArgument`.
pub async fn cursors<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = Arc::new(builder().await);
    let last = b.layout().partitions() - 1;
    assert_eq!(
        b.cursor("us-east", 0).await.unwrap(),
        0,
        "a cursor starts at 0"
    );
    assert_eq!(b.advance_cursor("us-east", 0, 5).await.unwrap(), 5);
    assert_eq!(b.cursor("us-east", 0).await.unwrap(), 5);
    assert_eq!(
        b.advance_cursor("us-east", 0, 3).await.unwrap(),
        5,
        "a cursor never moves back"
    );
    assert_eq!(b.cursor("us-east", 0).await.unwrap(), 5);
    assert_eq!(b.advance_cursor("us-east", 0, 5).await.unwrap(), 5);
    assert_eq!(b.advance_cursor("us-east", 0, 9).await.unwrap(), 9);
    assert_eq!(b.cursor("us-east", last).await.unwrap(), 0, "per partition");
    assert_eq!(b.cursor("eu-west", 0).await.unwrap(), 0, "per origin");
    assert_eq!(b.advance_cursor("eu-west", last, 2).await.unwrap(), 2);
    assert_eq!(b.cursor("us-east", 0).await.unwrap(), 9);
    assert_eq!(b.cursor("us-east", last).await.unwrap(), 0);
    assert_eq!(b.advance_cursor("us-east", last, 0).await.unwrap(), 0);
    let far = 1u64 << 62;
    assert_eq!(
        b.advance_cursor("ap-south-1", 0, far).await.unwrap(),
        far,
        "large seqs"
    );

    for origin in [
        String::new(),
        "us\neast".to_string(),
        "tab\there".to_string(),
        "r".repeat(65),
    ] {
        assert_invalid_argument(&b.cursor(&origin, 0).await, &format!("cursor({origin:?})"));
        assert_invalid_argument(
            &b.advance_cursor(&origin, 0, 1).await,
            &format!("advance_cursor({origin:?})"),
        );
    }
    assert_eq!(
        b.cursor(&"r".repeat(64), 0).await.unwrap(),
        0,
        "a 64-byte origin is valid"
    );

    let handles = (0..8u64)
        .map(|t| {
            let b = Arc::clone(&b);
            tokio::spawn(async move {
                let mut rng = Rng::new(0xc0 + t);
                let mut max = 0;
                for _ in 0..200 {
                    let seq = rng.below(1_000_000);
                    max = max.max(seq);
                    let after = b.advance_cursor("race", 1 % (last + 1), seq).await.unwrap();
                    assert!(after >= max, "advance_cursor returned {after} below {max}");
                }
                max
            })
        })
        .collect();
    let max = join_all(handles).await.into_iter().max().unwrap_or(0);
    assert_eq!(
        b.cursor("race", 1 % (last + 1)).await.unwrap(),
        max,
        "concurrent advances"
    );
}

/// The conflict feed: `append_conflict` returns increasing sequence numbers; `read_conflicts`
/// returns the records after a sequence number, in order, at most `limit`, with their exact
/// bytes (empty and binary records included); 8 concurrent appenders get distinct sequence
/// numbers and every record reads back exactly once.
pub async fn conflict_feed<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = Arc::new(builder().await);
    assert!(
        b.read_conflicts(0, 10).await.unwrap().is_empty(),
        "a fresh conflict feed is empty"
    );
    let records: Vec<Vec<u8>> = vec![
        b"first".to_vec(),
        Vec::new(),
        vec![0, 255, 1, 254],
        Rng::new(7).bytes(3_000),
        b"last".to_vec(),
    ];
    let mut seqs = Vec::new();
    for r in &records {
        seqs.push(b.append_conflict(r.clone()).await.unwrap());
    }
    assert!(
        seqs[0] > 0,
        "conflict seqs start above 0 (reads are 'after' a seq)"
    );
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "conflict seqs increase: {seqs:?}"
    );
    let all = b.read_conflicts(0, 100).await.unwrap();
    let want: Vec<(u64, Vec<u8>)> = seqs.iter().copied().zip(records.iter().cloned()).collect();
    assert!(
        all == want,
        "read_conflicts(0) returns every record with its seq, in order"
    );
    let page = b.read_conflicts(seqs[1], 2).await.unwrap();
    assert!(page == want[2..4], "read_conflicts(after, limit) pages");
    assert!(b.read_conflicts(seqs[4], 10).await.unwrap().is_empty());

    let handles = (0..8u64)
        .map(|t| {
            let b = Arc::clone(&b);
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..50 {
                    let record = format!("task {t} record {i}").into_bytes();
                    out.push((b.append_conflict(record.clone()).await.unwrap(), record));
                }
                out
            })
        })
        .collect();
    let mut appended: BTreeMap<u64, Vec<u8>> = want.into_iter().collect();
    for (seq, record) in join_all(handles).await.into_iter().flatten() {
        assert!(
            appended.insert(seq, record).is_none(),
            "conflict seq {seq} given twice"
        );
    }
    let mut read = Vec::new();
    let mut after = 0;
    loop {
        let page = b.read_conflicts(after, 7).await.unwrap();
        assert!(page.len() <= 7);
        let Some(last) = page.last() else { break };
        after = last.0;
        read.extend(page);
    }
    let appended: Vec<(u64, Vec<u8>)> = appended.into_iter().collect();
    assert!(
        read == appended,
        "every conflict record reads back exactly once, in seq order"
    );
}

// ---------------------------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------------------------

/// A receipt or error with the parts that may legitimately differ between two stores (version
/// numbers) blanked out.
fn comparable(
    result: &Result<Receipt, BackendError>,
) -> Result<(u16, Option<u64>, Crdt), BackendError> {
    match result {
        Ok(r) => Ok((r.partition, r.seq, r.delta.clone())),
        Err(BackendError::VersionConflict { key, expected, .. }) => {
            Err(BackendError::VersionConflict {
                key: key.clone(),
                expected: *expected,
                actual: None,
            })
        }
        Err(e) => Err(e.clone()),
    }
}

/// `apply_many`, `merge_many`, `get_many` and `delete_many` behave like their single forms: one
/// backend runs a batch, another runs the same items one by one, and the outcomes (receipts,
/// per-item errors: version conflicts, type mismatches, corrupt values) and the final stores
/// (values, feeds, digests) are the same. Batch items apply in order (a later item sees an
/// earlier one), one item's error does not fail the batch, and empty batches return nothing.
pub async fn batch_forms<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let single = builder().await;
    let batch = builder().await;
    let (a, s, l, c, bad) = (
        key("batch:a"),
        key("batch:s"),
        key("batch:l"),
        key("batch:c"),
        key("batch:corrupt"),
    );
    for backend in [&single, &batch] {
        backend
            .raw_put(&bad, b"not an envelope".to_vec())
            .await
            .unwrap();
    }
    let writes = vec![
        cas(write(&a, CounterOp::inc(1), 1, 1), Expect::Absent),
        cas(write(&a, CounterOp::inc(1), 1, 2), Expect::Absent),
        write(&a, SetOp::add("x"), 1, 3),
        write(&s, SetOp::remove("absent"), 1, 4),
        write(&s, SetOp::add("y"), 2, 5),
        write(&bad, CounterOp::inc(1), 1, 6),
        cas(write(&l, lww("v"), 1, 7), Expect::Version(12_345)),
        write(&a, CounterOp::dec(3), 2, 8),
        write(&l, lww("w"), 3, 9),
    ];
    let mut one_by_one = Vec::new();
    for w in writes.clone() {
        one_by_one.push(single.apply(w).await);
    }
    let batched = batch.apply_many(writes).await.unwrap();
    assert_eq!(
        batched.len(),
        one_by_one.len(),
        "apply_many: one result per write"
    );
    for (i, (x, y)) in one_by_one.iter().zip(&batched).enumerate() {
        assert_eq!(
            comparable(x),
            comparable(y),
            "apply_many item {i} differs from apply"
        );
    }
    assert!(
        batched[0].as_ref().is_ok_and(|r| r.seq.is_some()),
        "item 0 writes"
    );
    assert_conflict(&batched[1], &a, "item 1 sees item 0");
    assert_type_mismatch(&batched[2], "item 2");
    assert!(
        batched[3].as_ref().is_ok_and(|r| r.seq.is_none()),
        "item 3 is a no-op"
    );
    assert!(batched[4].is_ok(), "item 4");
    assert_corrupt(&batched[5], &bad, "item 5");
    assert_conflict(&batched[6], &l, "item 6");
    assert!(
        batched[7].is_ok() && batched[8].is_ok(),
        "items after errors still apply"
    );

    let remote = |tag: TypeTag, op: Op| {
        Crdt::empty(tag)
            .apply(ActorId::new(40), at(1), &op)
            .unwrap()
    };
    let items = vec![
        (
            a.clone(),
            remote(TypeTag::PnCounter, CounterOp::inc(10).into()),
        ),
        (
            s.clone(),
            remote(TypeTag::PnCounter, CounterOp::inc(10).into()),
        ),
        (
            bad.clone(),
            remote(TypeTag::PnCounter, CounterOp::inc(10).into()),
        ),
        (c.clone(), remote(TypeTag::OrSet, SetOp::add("z").into())),
        (s.clone(), remote(TypeTag::OrSet, SetOp::add("z").into())),
    ];
    let mut one_by_one = Vec::new();
    for (k, d) in &items {
        one_by_one.push(single.merge(k, d).await);
    }
    let batched = batch.merge_many(&items).await.unwrap();
    assert_eq!(
        batched.len(),
        items.len(),
        "merge_many: one result per item"
    );
    for (i, (x, y)) in one_by_one.iter().zip(&batched).enumerate() {
        assert_eq!(
            comparable(x),
            comparable(y),
            "merge_many item {i} differs from merge"
        );
        if let Ok(r) = y {
            assert_eq!(r.seq, None, "merge_many item {i} must not be fed");
        }
    }
    assert!(batched[0].is_ok() && batched[3].is_ok() && batched[4].is_ok());
    assert_type_mismatch(&batched[1], "merge_many item 1");
    assert_corrupt(&batched[2], &bad, "merge_many item 2");

    let keys = [
        a.clone(),
        key("batch:missing"),
        bad.clone(),
        a.clone(),
        s.clone(),
        c.clone(),
    ];
    let got = batch.get_many(&keys).await.unwrap();
    assert_eq!(got.len(), keys.len(), "get_many: one result per key");
    for (k, result) in keys.iter().zip(&got) {
        assert_eq!(
            result,
            &batch.get(k).await,
            "get_many({k}) differs from get"
        );
    }
    assert!(matches!(got[1], Ok(None)));
    assert_corrupt(&got[2], &bad, "get_many of a corrupt key");

    for backend in [&single, &batch] {
        assert!(backend.apply_many(Vec::new()).await.unwrap().is_empty());
        assert!(backend.merge_many(&[]).await.unwrap().is_empty());
        assert!(backend.get_many(&[]).await.unwrap().is_empty());
        assert!(backend.delete_many(&[]).await.unwrap().is_empty());
    }

    // Same stores: values, feeds, digests.
    let layout = single.layout().clone();
    let mut partitions = BTreeSet::new();
    for k in [&a, &s, &l, &c] {
        let (x, y) = (must_get(&single, k).await, must_get(&batch, k).await);
        assert_eq!(
            x.value, y.value,
            "{k}: batch and single forms leave different values"
        );
        partitions.insert(layout.partition_of(k));
    }
    for p in partitions {
        let strip = |f: Vec<FeedEntry>| {
            f.into_iter()
                .map(|e| (e.seq, e.key, e.delta, e.origin, e.hlc))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            strip(whole_feed(&single, p, 100).await),
            strip(whole_feed(&batch, p, 100).await),
            "partition {p}: batch and single forms feed differently"
        );
    }
    assert_eq!(
        all_digests(&single).await,
        all_digests(&batch).await,
        "digests differ"
    );

    let doomed = [
        a.clone(),
        key("batch:missing"),
        a.clone(),
        bad.clone(),
        s.clone(),
    ];
    let mut one_by_one = Vec::new();
    for k in &doomed {
        one_by_one.push(single.delete(k).await.unwrap());
    }
    let batched = batch.delete_many(&doomed).await.unwrap();
    assert_eq!(batched, vec![true, false, false, true, true], "delete_many");
    assert_eq!(one_by_one, batched, "delete_many differs from delete");
    for backend in [&single, &batch] {
        let got = backend.get_many(&doomed).await.unwrap();
        assert!(
            got.iter().all(|r| matches!(r, Ok(None))),
            "deleted keys are gone"
        );
    }
    assert_eq!(
        all_digests(&single).await,
        all_digests(&batch).await,
        "digests after deletes"
    );
    for p in 0..layout.partitions() {
        assert_eq!(
            floor_of(&single, p).await,
            floor_of(&batch, p).await,
            "partition {p}: delete_many and delete raise the dot floor alike"
        );
    }
    assert!(
        !floor_of(&batch, layout.partition_of(&a)).await.is_empty(),
        "deleting a value raises its partition's dot floor"
    );
}

// ---------------------------------------------------------------------------------------------
// Garbage collection of tombstones
// ---------------------------------------------------------------------------------------------

/// Every page of `partition`'s tombstones, resuming from each page's `next`, with `limit` per
/// page; checks the page bounds on the way.
async fn all_tombstones<B: StateBackend>(b: &B, partition: u16, limit: usize) -> Vec<Tombstone> {
    let mut out: Vec<Tombstone> = Vec::new();
    let mut after: Option<Key> = None;
    loop {
        let page = b
            .tombstones(partition, after.as_ref(), limit)
            .await
            .unwrap_or_else(|e| panic!("tombstones({partition}, {after:?}, {limit}): {e}"));
        assert!(
            page.items.len() <= limit,
            "tombstones({partition}, {after:?}, {limit}) returned {} items",
            page.items.len()
        );
        out.extend(page.items.iter().cloned());
        match page.next {
            Some(next) => {
                assert_eq!(
                    page.items.last().map(|t| &t.key),
                    Some(&next),
                    "tombstones({partition}, {after:?}, {limit}): next must be the page's last key"
                );
                after = Some(next);
            }
            None => return out,
        }
    }
}

/// What `tombstones` must list for `keys` (of one partition): those holding a value with no
/// live dot, in key order, with their version and value hash.
async fn expected_tombstones<B: StateBackend>(b: &B, keys: &[Key]) -> Vec<Tombstone> {
    let mut sorted: Vec<&Key> = keys.iter().collect();
    sorted.sort();
    sorted.dedup();
    let mut out = Vec::new();
    for k in sorted {
        if let Ok(Some(stored)) = b.get(k).await {
            if stored.value.is_bottom() {
                out.push(Tombstone {
                    key: k.clone(),
                    version: stored.version,
                    hash: value_hash(&stored.value).expect("value_hash"),
                });
            }
        }
    }
    out
}

/// The values under `keys`, for [`assert_digests_match`].
async fn contents_of<B: StateBackend>(b: &B, keys: &[Key]) -> BTreeMap<Key, Crdt> {
    let mut out = BTreeMap::new();
    for k in keys {
        if let Some(stored) = b.get(k).await.expect("get") {
            out.insert(k.clone(), stored.value);
        }
    }
    out
}

async fn floor_of<B: StateBackend>(b: &B, partition: u16) -> VersionVector {
    b.dot_floor(partition)
        .await
        .unwrap_or_else(|e| panic!("dot_floor({partition}): {e}"))
}

/// Tombstones and their garbage collection. Values of every type are written in one partition
/// and some are deleted or cleared (and one is created by merging a remote removal):
/// `tombstones` lists exactly the keys holding no live dot, in key order, with the version and
/// value hash `get` shows, never another partition's, in pages of any size resumed from
/// `next` (also after a key that is no tombstone). `purge` refuses (returns false and changes
/// nothing: value, bytes, feed, digest, floor) a wrong version, a live key, an absent key and
/// a corrupt value; at the right version it removes the key and its digest contribution
/// (digests equal the XOR of what is left), is not fed, and raises the partition's dot floor
/// to exactly the tombstone's context maxima (no other partition's). A local write to a purged
/// key then mints a dot above the floor for its actor and reads back without the removed
/// value's contents; merging the purged tombstone back (a delayed delivery) does not remove
/// it. `delete` and `delete_many` raise the floor by the removed values' contexts too (a
/// corrupt value raises nothing), and a later write to a deleted key starts above the floor.
pub async fn tombstones_are_listed_and_purged<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = builder().await;
    let layout = b.layout().clone();
    assert!(
        layout.partitions() >= 4,
        "tombstones_are_listed_and_purged needs at least 4 partitions"
    );
    let p = 1;
    let ks = keys_in_partition(&layout, p, "gc:", 14);
    let elsewhere = keys_in_partition(&layout, 2, "gc:", 1).remove(0);
    let mut all_keys = ks.clone();
    all_keys.push(elsewhere.clone());
    for q in 0..layout.partitions() {
        assert!(
            floor_of(&b, q).await.is_empty(),
            "a fresh store's dot floor of partition {q} is empty"
        );
        assert!(
            b.tombstones(q, None, 10).await.unwrap().items.is_empty(),
            "a fresh store lists no tombstone in partition {q}"
        );
    }

    let map_inc = |n| Op::from(MapOp::update("f", FieldOp::Counter(CounterOp::inc(n))));
    let mut steps: Vec<(usize, Op, u64)> = Vec::new();
    for _ in 0..6 {
        steps.push((0, CounterOp::inc(1).into(), 1));
    }
    steps.extend([
        (0, CounterOp::inc(2).into(), 4),
        (1, CounterOp::inc(3).into(), 1),
        (1, CounterOp::inc(1).into(), 1),
        (1, Op::Delete, 2),
        (2, SetOp::add("a").into(), 1),
        (2, SetOp::add("b").into(), 2),
        (2, SetOp::Clear.into(), 1),
        (3, SetOp::add("x").into(), 1),
        (4, lww("v"), 1),
        (4, Op::Delete, 2),
        (5, lww("w"), 2),
        (6, Op::Mv(RegisterOp::write("p")), 1),
        (6, Op::Mv(RegisterOp::write("q")), 2),
        (6, Op::Mv(RegisterOp::Clear), 1),
        (7, map_inc(2), 1),
        (
            7,
            MapOp::update("g", FieldOp::Set(SetOp::add("e"))).into(),
            2,
        ),
        (7, Op::Delete, 1),
        (8, map_inc(1), 3),
        (9, Op::GCounterInc(3), 1),
        (9, Op::Delete, 2),
        (10, SetOp::add("y").into(), 3),
        (10, SetOp::remove("y").into(), 3),
    ]);
    for (time, (i, op, actor)) in steps.into_iter().enumerate() {
        apply_ok(&b, write(&ks[i], op, actor, time as u64)).await;
    }
    // A tombstone created by a remote removal merged into an absent key.
    let remote = Crdt::empty(TypeTag::OrSet)
        .apply(ActorId::new(5), at(1), &SetOp::add("r").into())
        .unwrap();
    merge_ok(&b, &ks[11], &remote.removal_delta()).await;
    // ks[12] and ks[13] stay absent; another partition gets a tombstone of its own.
    apply_ok(&b, write(&elsewhere, SetOp::add("o"), 1, 1)).await;
    apply_ok(&b, write(&elsewhere, Op::Delete, 1, 2)).await;

    let expected = expected_tombstones(&b, &ks).await;
    let names: BTreeSet<&Key> = expected.iter().map(|t| &t.key).collect();
    let intended: BTreeSet<&Key> = [1, 2, 4, 6, 7, 9, 10, 11].iter().map(|&i| &ks[i]).collect();
    assert_eq!(
        names, intended,
        "the deleted or cleared keys (and only they) hold no live dot"
    );
    let full = b.tombstones(p, None, 100).await.unwrap();
    assert_eq!(
        full.items, expected,
        "tombstones({p}) must list exactly the keys holding no live dot, in key order, with \
         their versions and value hashes"
    );
    assert_eq!(full.next, None, "a page holding everything has no next");
    for limit in [1, 2, 3, 7] {
        assert_eq!(
            all_tombstones(&b, p, limit).await,
            expected,
            "tombstones({p}) in pages of {limit}"
        );
    }
    let live = &ks[0];
    let after_live: Vec<Tombstone> = expected.iter().filter(|t| &t.key > live).cloned().collect();
    assert_eq!(
        b.tombstones(p, Some(live), 100).await.unwrap().items,
        after_live,
        "tombstones after a key that is no tombstone"
    );
    let last = &expected.last().unwrap().key;
    let page = b.tombstones(p, Some(last), 100).await.unwrap();
    assert!(
        page.items.is_empty() && page.next.is_none(),
        "nothing after the last tombstone"
    );
    assert_eq!(
        b.tombstones(2, None, 100)
            .await
            .unwrap()
            .items
            .iter()
            .map(|t| &t.key)
            .collect::<Vec<_>>(),
        vec![&elsewhere],
        "each partition lists its own tombstones"
    );
    assert_invalid_argument(
        &b.tombstones(layout.partitions(), None, 10).await,
        "tombstones of a partition out of range",
    );
    assert_invalid_argument(&b.tombstones(p, None, 0).await, "tombstones with limit 0");
    assert_invalid_argument(
        &b.dot_floor(layout.partitions()).await,
        "dot_floor of a partition out of range",
    );

    // Purges that must refuse.
    let victim = expected
        .iter()
        .find(|t| t.key == ks[1])
        .cloned()
        .expect("ks[1] is a tombstone");
    let live_version = must_get(&b, live).await.version;
    let refusals: Vec<(&Key, u64, &str)> = vec![
        (&victim.key, victim.version + 1, "a wrong version"),
        (&victim.key, 0, "version 0"),
        (live, live_version, "a live key at its version"),
        (&ks[12], 1, "an absent key"),
    ];
    for (k, version, what) in refusals {
        let before = observe(&b, k).await;
        let floor = floor_of(&b, p).await;
        assert!(
            !b.purge(k, version).await.unwrap(),
            "purge of {what} must return false"
        );
        assert_unchanged(&before, &observe(&b, k).await, &format!("purge of {what}"));
        assert_eq!(
            floor_of(&b, p).await,
            floor,
            "purge of {what} must not raise the floor"
        );
    }

    // Purges that succeed: a counter and a set tombstone.
    let feed = feed_bounds(&b, p).await;
    let mut floor = VersionVector::new();
    let mut purged: Vec<(Key, Crdt)> = Vec::new();
    for k in [&ks[1], &ks[2]] {
        let t = expected.iter().find(|t| &t.key == k).cloned().unwrap();
        let old = must_get(&b, k).await.value;
        assert!(
            b.purge(k, t.version).await.unwrap(),
            "purge({k}, {}) of a tombstone at its version",
            t.version
        );
        assert_eq!(b.get(k).await.unwrap(), None, "{k}: purged keys are gone");
        assert_eq!(
            b.raw_get(k).await.unwrap(),
            None,
            "{k}: purged bytes are gone"
        );
        assert!(
            !b.purge(k, t.version).await.unwrap(),
            "{k}: a second purge finds nothing"
        );
        floor.merge(&old.context().maxima());
        purged.push((k.clone(), old));
    }
    assert!(
        floor.get(ActorId::new(1)) >= 2,
        "the purged tombstones carry dots of actor 1"
    );
    assert_eq!(
        floor_of(&b, p).await,
        floor,
        "the dot floor is the join of the purged tombstones' context maxima"
    );
    for q in (0..layout.partitions()).filter(|&q| q != p) {
        assert!(
            floor_of(&b, q).await.is_empty(),
            "a purge in partition {p} raises no floor of partition {q}"
        );
    }
    assert_eq!(feed_bounds(&b, p).await, feed, "a purge is not fed");
    assert_digests_match(
        &b,
        &contents_of(&b, &all_keys).await,
        "after purges (a purged key leaves the digest)",
    )
    .await;
    let remaining: Vec<Tombstone> = expected
        .iter()
        .filter(|t| t.key != ks[1] && t.key != ks[2])
        .cloned()
        .collect();
    assert_eq!(
        all_tombstones(&b, p, 2).await,
        remaining,
        "purged tombstones are no longer listed"
    );

    // Writes to purged keys start above the floor: no dot of a purged value is minted again,
    // so its tombstone, delivered late, removes nothing new.
    for ((k, old), (op, actor)) in purged.iter().zip([
        (Op::from(CounterOp::inc(4)), 1u64),
        (SetOp::add("n").into(), 2),
    ]) {
        let a = ActorId::new(actor);
        let r = apply_ok(&b, write(k, op, actor, 100)).await;
        let dot = Dot::new(a, floor.get(a) + 1);
        assert!(
            r.delta.context().contains(dot) && r.delta.context().max(a) == dot.counter,
            "{k}: a write after a purge mints {dot}, the next dot above the floor (delta context \
             {:?})",
            r.delta.context()
        );
        let stored = must_get(&b, k).await;
        assert_eq!(stored.version, r.version);
        assert_eq!(
            stored.value, r.delta,
            "{k}: a write to a purged key stores exactly its delta"
        );
        merge_ok(&b, k, old).await;
        let after = must_get(&b, k).await.value;
        match &after {
            Crdt::PnCounter(_) => assert_eq!(
                counter_value(&after),
                4,
                "{k}: a purged counter's old counts are not back, and the new one survives \
                 its old tombstone"
            ),
            _ => assert_eq!(
                or_set(&after).iter().cloned().collect::<Vec<_>>(),
                vec![b"n".to_vec()],
                "{k}: the new element survives the purged tombstone"
            ),
        }
    }

    // A purged key that comes back through a remote merge (another region's write) holds
    // none of the local writer's old dots: the writer's next write is still lifted above the
    // floor, so it does not mint a purged dot again.
    let back = keys_in_partition(&layout, p, "gc-back:", 1).remove(0);
    all_keys.push(back.clone());
    apply_ok(&b, write(&back, SetOp::add("old"), 5, 200)).await;
    apply_ok(&b, write(&back, Op::Delete, 5, 201)).await;
    let version = must_get(&b, &back).await.version;
    assert!(b.purge(&back, version).await.unwrap(), "purge of {back}");
    let a5 = ActorId::new(5);
    let floor5 = floor_of(&b, p).await.get(a5);
    assert!(floor5 >= 1, "the purge raised actor 5's floor");
    let remote = Crdt::empty(TypeTag::OrSet)
        .apply(ActorId::new(9), at(202), &Op::from(SetOp::add("remote")))
        .unwrap();
    merge_ok(&b, &back, &remote).await;
    let r = apply_ok(&b, write(&back, SetOp::add("new"), 5, 203)).await;
    assert!(
        r.delta.context().max(a5) == floor5 + 1,
        "{back}: a write to a purged key re-created by a merge mints dot {}:{} (delta context          {:?})",
        5,
        floor5 + 1,
        r.delta.context()
    );
    let mut elements: Vec<Vec<u8>> = or_set(&must_get(&b, &back).await.value)
        .iter()
        .cloned()
        .collect();
    elements.sort();
    assert_eq!(elements, vec![b"new".to_vec(), b"remote".to_vec()]);

    // delete raises the floor by whatever it removes.
    let before = floor_of(&b, p).await;
    let removed = must_get(&b, live).await.value.context().maxima();
    assert!(
        removed.get(ActorId::new(1)) > before.get(ActorId::new(1))
            && removed.get(ActorId::new(4)) > 0,
        "the test's live counter has dots above the floor"
    );
    assert!(b.delete(live).await.unwrap(), "delete of a live key");
    let mut want = before.clone();
    want.merge(&removed);
    assert_eq!(
        floor_of(&b, p).await,
        want,
        "delete raises the floor by the removed value's context"
    );
    assert!(!b.delete(live).await.unwrap(), "delete of an absent key");
    assert_eq!(
        floor_of(&b, p).await,
        want,
        "deleting nothing raises nothing"
    );
    let mut raise = VersionVector::new();
    for k in [&ks[3], &ks[5]] {
        raise.merge(&must_get(&b, k).await.value.context().maxima());
    }
    assert_eq!(
        b.delete_many(&[ks[3].clone(), ks[3].clone(), ks[5].clone()])
            .await
            .unwrap(),
        vec![true, false, true],
        "delete_many"
    );
    want.merge(&raise);
    assert_eq!(
        floor_of(&b, p).await,
        want,
        "delete_many raises the floor by every removed value's context"
    );
    let a4 = ActorId::new(4);
    let r = apply_ok(&b, write(live, CounterOp::inc(9), 4, 200)).await;
    assert_eq!(
        r.delta.context().max(a4),
        want.get(a4) + 1,
        "a write to a deleted key starts above the floor"
    );
    assert_eq!(counter_value(&must_get(&b, live).await.value), 9);

    // A corrupt value is no tombstone: never listed, never purged; deleting it raises nothing.
    let bad = &ks[13];
    b.raw_put(bad, b"not an envelope".to_vec()).await.unwrap();
    assert!(
        !all_tombstones(&b, p, 100)
            .await
            .iter()
            .any(|t| &t.key == bad),
        "a corrupt value is not listed as a tombstone"
    );
    let floor = floor_of(&b, p).await;
    for version in 1..=100 {
        assert!(
            !b.purge(bad, version).await.unwrap(),
            "purge of a corrupt value (version {version})"
        );
    }
    assert!(
        b.raw_get(bad).await.unwrap().is_some(),
        "the corrupt bytes are kept"
    );
    assert!(b.delete(bad).await.unwrap(), "delete of a corrupt value");
    assert_eq!(
        floor_of(&b, p).await,
        floor,
        "deleting a corrupt value raises nothing"
    );
    assert_eq!(
        all_tombstones(&b, p, 3).await,
        expected_tombstones(&b, &ks).await,
        "the listing at the end"
    );
    assert_digests_match(&b, &contents_of(&b, &all_keys).await, "at the end").await;
}

/// Writers race a garbage collector on one partition of one store: see [`purge_race`].
pub async fn purge_races_local_writes<B, F, Fut>(builder: &F)
where
    B: StateBackend + RawAccess,
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
{
    let b = Arc::new(builder().await);
    purge_race(Arc::clone(&b), b).await;
}

/// One acknowledged operation of [`purge_race`], between two ticks of a shared logical clock
/// taken just before it was invoked and just after it was acknowledged.
struct Timed<T> {
    invoked: u64,
    acked: u64,
    what: T,
}

/// What one writer of [`purge_race`] did.
#[derive(Default)]
struct Writes {
    adds: Vec<Timed<Vec<u8>>>,
    /// The deletes that removed something, with their removal deltas.
    deletes: Vec<Timed<Crdt>>,
    /// Counter keys (one writer each): the increments since the last delete.
    total: i128,
}

/// Writers and a garbage collector race on one partition; `a` and `b` are two handles on one
/// store (the same one twice, or two connections, as two processes have). Sets: four keys,
/// each written by two tasks (one through each handle) that add distinct elements and now and
/// then delete the key; counters: four keys with one writer each, which now and then deletes
/// its key. All write as ONE actor, so every purge raises the floor that writes to absent keys
/// start from. Meanwhile a collector lists the partition's tombstones and purges each at its
/// listed version, over and over, through both handles in turn.
///
/// No acknowledged write is lost, none is resurrected: an element whose add was acknowledged
/// before every delete of its key was invoked is present; one added before a delete was
/// invoked is gone; a counter holds exactly the increments since its last delete. Merging back
/// every removal the writers made (a delayed delivery from another region) changes none of
/// that: no write after a purge reused a dot of a purged value. The listing agrees with `get`
/// and the floor covers what was purged.
pub async fn purge_race<B: StateBackend>(a: Arc<B>, b: Arc<B>) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    const SETS: usize = 4;
    const COUNTERS: usize = 4;
    const OPS: u64 = 120;
    const ACTOR: u64 = 7;
    let layout = a.layout().clone();
    assert!(
        layout.partitions() >= 4,
        "purge_race needs at least 4 partitions"
    );
    let p = 2;
    let keys = Arc::new(keys_in_partition(&layout, p, "gc-race:", SETS + COUNTERS));
    let done = Arc::new(AtomicBool::new(false));
    let clock = Arc::new(AtomicU64::new(0));
    let collector = {
        let (handles, done) = ([Arc::clone(&a), Arc::clone(&b)], Arc::clone(&done));
        tokio::spawn(async move {
            let (mut purged, mut refused, mut rounds) = (0u64, 0u64, 0u64);
            loop {
                let finished = done.load(SeqCst);
                let store = &handles[(rounds % 2) as usize];
                let mut after: Option<Key> = None;
                loop {
                    let page = store
                        .tombstones(p, after.as_ref(), 3)
                        .await
                        .unwrap_or_else(|e| panic!("collector: tombstones: {e}"));
                    for t in &page.items {
                        match store.purge(&t.key, t.version).await {
                            Ok(true) => purged += 1,
                            Ok(false) => refused += 1,
                            Err(e) => panic!("collector: purge({}, {}): {e}", t.key, t.version),
                        }
                    }
                    match page.next {
                        Some(next) => after = Some(next),
                        None => break,
                    }
                }
                rounds += 1;
                if finished {
                    return (purged, refused, rounds);
                }
                tokio::task::yield_now().await;
            }
        })
    };
    // Task t writes key t / 2 for sets (t < 2 * SETS), key t - SETS for counters.
    let handles = (0..2 * SETS + COUNTERS)
        .map(|t| {
            let store = Arc::clone(if t % 2 == 0 { &a } else { &b });
            let (keys, clock) = (Arc::clone(&keys), Arc::clone(&clock));
            tokio::spawn(async move {
                let set = t < 2 * SETS;
                let k = &keys[if set { t / 2 } else { t - SETS }];
                let mut rng = Rng::new(0x6c00 + t as u64);
                let mut writes = Writes::default();
                for i in 0..OPS {
                    let delete = rng.below(8) == 0;
                    let element = format!("t{t}-{i}").into_bytes();
                    let n = 1 + rng.below(3);
                    let op = if delete {
                        Op::Delete
                    } else if set {
                        SetOp::add(element.clone()).into()
                    } else {
                        CounterOp::inc(n).into()
                    };
                    let invoked = clock.fetch_add(1, SeqCst);
                    let r = store
                        .apply(write(k, op, ACTOR, i))
                        .await
                        .unwrap_or_else(|e| panic!("task {t}, op {i} on {k}: {e}"));
                    let acked = clock.fetch_add(1, SeqCst);
                    if delete {
                        if r.seq.is_some() {
                            writes.deletes.push(Timed {
                                invoked,
                                acked,
                                what: r.delta,
                            });
                        }
                        writes.total = 0;
                        // Leave the tombstone to the collector for a moment.
                        let pause = 1 + rng.below(3);
                        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                    } else if set {
                        writes.adds.push(Timed {
                            invoked,
                            acked,
                            what: element,
                        });
                    } else {
                        writes.total += i128::from(n);
                    }
                }
                writes
            })
        })
        .collect();
    let outcomes = join_all(handles).await;
    done.store(true, SeqCst);
    let (purged, refused, rounds) = join_all(vec![collector]).await.remove(0);
    println!("purge_race: {purged} tombstones purged, {refused} purges refused, {rounds} rounds");
    assert!(
        purged > 0,
        "the collector purged nothing: the race was not exercised"
    );

    let check = |what: &'static str| {
        let (a, keys, outcomes) = (&a, &keys, &outcomes);
        async move {
            for (i, k) in keys.iter().enumerate() {
                let value = a.get(k).await.unwrap().map(|s| s.value);
                if i >= SETS {
                    let got = value.as_ref().map_or(0, counter_value);
                    assert_eq!(
                        got,
                        outcomes[SETS + i].total,
                        "{what}: {k} does not hold the increments made since its last delete"
                    );
                    continue;
                }
                let got: BTreeSet<Vec<u8>> = value
                    .as_ref()
                    .map(|v| or_set(v).iter().cloned().collect())
                    .unwrap_or_default();
                let writers = &outcomes[2 * i..2 * i + 2];
                let deletes: Vec<&Timed<Crdt>> = writers.iter().flat_map(|w| &w.deletes).collect();
                for add in writers.iter().flat_map(|w| &w.adds) {
                    let name = String::from_utf8_lossy(&add.what);
                    if deletes.iter().all(|d| d.acked < add.invoked) {
                        assert!(
                            got.contains(&add.what),
                            "{what}: {k} lost {name}, added after every delete (an \
                             acknowledged write was purged, or its dot was minted again)"
                        );
                    }
                    if deletes.iter().any(|d| d.invoked > add.acked) {
                        assert!(
                            !got.contains(&add.what),
                            "{what}: {k} holds {name}, which a later delete removed"
                        );
                    }
                }
            }
        }
    };
    check("after the race").await;
    for (i, k) in keys.iter().enumerate() {
        let writers = if i < SETS {
            &outcomes[2 * i..2 * i + 2]
        } else {
            &outcomes[SETS + i..SETS + i + 1]
        };
        for d in writers.iter().flat_map(|w| &w.deletes) {
            merge_ok(&*a, k, &d.what).await;
        }
    }
    check("after merging every removal back").await;
    assert_eq!(
        all_tombstones(&*b, p, 5).await,
        expected_tombstones(&*a, &keys).await,
        "the listing agrees with get after the race"
    );
    assert!(
        floor_of(&*a, p).await.get(ActorId::new(ACTOR)) > 0,
        "purges raised the floor of the writers' actor"
    );
}
