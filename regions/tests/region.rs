//! Integration tests of the region handle: typed API, replication by delta exchange between two
//! regions, conflict resolution, compare-and-set, batches, scans, corruption, concurrency,
//! configuration and hybrid logical clocks.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;

use geostate_backends::{
    BackendError, Expect, FeedEntry, Key, Layout, MemoryBackend, RawAccess, StateBackend,
};
use geostate_conflict::{value_digest, ConflictRecord, RecordedResolution, ResolvedValue, Sibling};
use geostate_crdt::{
    CounterOp, Crdt, FieldOp, GCounter, Hlc, LwwRegister, MapOp, MvRegister, Op, OrMap, OrSet,
    PnCounter, RegisterOp, SetOp, TypeTag,
};
use geostate_regions::{
    CasOutcome, FromCrdt, ManualClock, Region, RegionBuilder, RegionConfig, RegionError, RegionId,
    WriteReceipt, NODE_MAX,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A configuration for `region` with a small layout (8 partitions, 4 buckets) and `extra` TOML
/// appended (tables only: `[limits]`, `[[resolvers]]`).
fn config(region: &str, extra: &str) -> RegionConfig {
    RegionConfig::from_toml_str(&format!(
        "region = \"{region}\"\n[layout]\npartitions = 8\nbuckets = 4\n{extra}\n"
    ))
    .unwrap()
}

/// A fresh memory store laid out as `config` says.
fn store_for(config: &RegionConfig) -> Arc<MemoryBackend> {
    Arc::new(MemoryBackend::new(config.layout.to_layout().unwrap()))
}

/// A region on its own memory store, driven by `clock`.
fn region(config: RegionConfig, clock: &ManualClock) -> Region {
    let store = store_for(&config);
    Region::builder(config, store)
        .clock(clock.clone())
        .build()
        .unwrap()
}

/// Total number of feed entries ever written, over every partition.
async fn feed_len(region: &Region) -> u64 {
    let mut total = 0;
    for p in 0..region.backend().layout().partitions() {
        total += region.backend().read_feed(p, 0, 1).await.unwrap().last_seq;
    }
    total
}

/// Every feed entry currently held, over every partition.
async fn feed_entries(region: &Region) -> Vec<FeedEntry> {
    let mut out = Vec::new();
    for p in 0..region.backend().layout().partitions() {
        let mut after = 0;
        loop {
            let page = region.backend().read_feed(p, after, 50).await.unwrap();
            let Some(last) = page.entries.last() else {
                break;
            };
            after = last.seq;
            out.extend(page.entries);
        }
    }
    out
}

/// Ships `from`'s feed after `cursors` into `to`, as a replicator would: observe the origin's
/// timestamp, merge the delta, advance the cursor. Returns how many entries were shipped.
async fn ship(from: &Region, to: &Region, cursors: &mut [u64]) -> usize {
    let mut shipped = 0;
    for p in 0..from.backend().layout().partitions() {
        let slot = usize::from(p);
        loop {
            let page = from.backend().read_feed(p, cursors[slot], 3).await.unwrap();
            assert!(
                !page.missed_after(cursors[slot]),
                "feed trimmed under the test"
            );
            if page.entries.is_empty() {
                break;
            }
            for entry in &page.entries {
                to.observe(entry.hlc).unwrap();
                to.backend().merge(&entry.key, &entry.delta).await.unwrap();
                cursors[slot] = entry.seq;
                shipped += 1;
            }
        }
    }
    shipped
}

/// Two regions, each on its own store and manual clock, with replication cursors both ways.
struct Pair {
    a: Region,
    b: Region,
    clock_a: ManualClock,
    clock_b: ManualClock,
    a_to_b: Vec<u64>,
    b_to_a: Vec<u64>,
}

impl Pair {
    /// Regions `us-east` (clock at 1 000 ms) and `eu-west` (clock at 2 000 ms) with `extra`
    /// configuration, each builder passed through `customize`.
    fn with(
        extra: &str,
        customize: impl Fn(RegionBuilder<MemoryBackend>) -> RegionBuilder<MemoryBackend>,
    ) -> Self {
        let clock_a = ManualClock::new(1_000);
        let clock_b = ManualClock::new(2_000);
        let build = |name: &str, clock: &ManualClock| {
            let config = config(name, extra);
            let store = store_for(&config);
            customize(Region::builder(config, store).clock(clock.clone()))
                .build()
                .unwrap()
        };
        let a = build("us-east", &clock_a);
        let b = build("eu-west", &clock_b);
        assert_ne!(a.actor(), b.actor());
        let partitions = usize::from(a.backend().layout().partitions());
        Self {
            a,
            b,
            clock_a,
            clock_b,
            a_to_b: vec![0; partitions],
            b_to_a: vec![0; partitions],
        }
    }

    fn new(extra: &str) -> Self {
        Self::with(extra, |b| b)
    }

    /// Exchanges every new delta both ways.
    async fn exchange(&mut self) {
        ship(&self.a, &self.b, &mut self.a_to_b).await;
        ship(&self.b, &self.a, &mut self.b_to_a).await;
    }

    /// Asserts that both stores hold the same value under `key`.
    async fn assert_converged(&self, key: &str) {
        let a = self.a.read_value(key).await.unwrap().map(|s| s.value);
        let b = self.b.read_value(key).await.unwrap().map(|s| s.value);
        assert_eq!(a, b, "regions disagree on {key}");
    }
}

fn strings<T: AsRef<[u8]>>(items: impl IntoIterator<Item = T>) -> Vec<String> {
    items
        .into_iter()
        .map(|s| String::from_utf8(s.as_ref().to_vec()).unwrap())
        .collect()
}

fn set_of(set: &OrSet<String>) -> BTreeSet<String> {
    set.iter().cloned().collect()
}

fn one(value: &str) -> ResolvedValue {
    ResolvedValue::One(value.as_bytes().to_vec())
}

/// The conflict records of `key` in `region`'s conflict feed.
async fn conflicts_of(region: &Region, key: &str) -> Vec<ConflictRecord> {
    region
        .conflicts(0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| r.key == key)
        .collect()
}

fn assert_type_mismatch<T: Debug>(
    result: Result<T, RegionError>,
    key: &str,
    expected: TypeTag,
    found: TypeTag,
) {
    match result {
        Err(RegionError::TypeMismatch {
            key: k,
            expected: e,
            found: f,
        }) => {
            assert_eq!((k.as_str(), e, f), (key, expected, found));
        }
        other => panic!("expected a type mismatch on {key}, got {other:?}"),
    }
}

async fn assert_read_mismatch<T: FromCrdt + Debug>(region: &Region, key: &str, found: TypeTag) {
    assert_type_mismatch(region.read::<T>(key).await, key, T::TYPE_TAG, found);
}

fn assert_invalid_key<T: Debug>(result: &Result<T, RegionError>) {
    assert!(
        matches!(
            result,
            Err(RegionError::Backend(BackendError::InvalidKey { .. }))
        ),
        "expected an invalid key error, got {result:?}"
    );
}

fn assert_corrupt<T: Debug>(result: Result<T, RegionError>, key: &str) {
    match result {
        Err(RegionError::Backend(BackendError::Corrupt { key: k, .. })) => assert_eq!(k, key),
        other => panic!("expected a corruption error on {key}, got {other:?}"),
    }
}

fn applied(outcome: CasOutcome) -> WriteReceipt {
    match outcome {
        CasOutcome::Applied(receipt) => receipt,
        other => panic!("expected the write to be applied, got {other:?}"),
    }
}

/// A unique path under the temporary directory, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(tag: &str, contents: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "geostate-regions-test-{tag}-{}-{nanos}.toml",
            std::process::id()
        ));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Typed API
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_op_kind_reads_back_as_its_type() {
    let r = region(config("us-east", ""), &ManualClock::new(1_000));

    // Grow-only counter.
    r.merge_crdt("g", Op::GCounterInc(3)).await.unwrap();
    r.merge_crdt("g", Op::GCounterInc(4)).await.unwrap();
    assert_eq!(r.read::<GCounter>("g").await.unwrap().value(), 7);

    // Positive-negative counter.
    r.merge_crdt("pn", CounterOp::inc(10)).await.unwrap();
    r.merge_crdt("pn", CounterOp::dec(3)).await.unwrap();
    r.merge_crdt("pn", CounterOp::dec(9)).await.unwrap();
    assert_eq!(r.read::<PnCounter>("pn").await.unwrap().value(), -2);

    // Set: add, add many, remove, clear, add after clear.
    r.merge_crdt("s", SetOp::add("a")).await.unwrap();
    r.merge_crdt("s", SetOp::Add(vec![b"b".to_vec(), b"c".to_vec()]))
        .await
        .unwrap();
    r.merge_crdt("s", SetOp::remove("a")).await.unwrap();
    let set: OrSet<String> = r.read("s").await.unwrap();
    assert_eq!(set_of(&set), BTreeSet::from(["b".into(), "c".into()]));
    let raw: OrSet<Vec<u8>> = r.read("s").await.unwrap();
    assert_eq!(
        raw.iter().cloned().collect::<Vec<_>>(),
        vec![b"b".to_vec(), b"c".to_vec()]
    );
    r.merge_crdt("s", SetOp::Clear).await.unwrap();
    assert!(r.read::<OrSet<String>>("s").await.unwrap().is_empty());
    r.merge_crdt("s", SetOp::add("d")).await.unwrap();
    let set: OrSet<String> = r.read("s").await.unwrap();
    assert_eq!(set_of(&set), BTreeSet::from(["d".into()]));

    // Last-writer-wins register.
    r.merge_crdt("lww", Op::Lww(RegisterOp::write("one")))
        .await
        .unwrap();
    r.merge_crdt("lww", Op::Lww(RegisterOp::write("two")))
        .await
        .unwrap();
    let lww: LwwRegister<String> = r.read("lww").await.unwrap();
    assert_eq!(lww.value().map(String::as_str), Some("two"));
    let lww: LwwRegister<Vec<u8>> = r.read("lww").await.unwrap();
    assert_eq!(lww.value(), Some(&b"two".to_vec()));

    // Multi-value register, through merge_crdt and put (the same type).
    r.merge_crdt("mv", Op::Mv(RegisterOp::write("first")))
        .await
        .unwrap();
    r.put("mv", "second").await.unwrap();
    let mv: MvRegister<String> = r.read("mv").await.unwrap();
    assert_eq!(mv.values().cloned().collect::<Vec<_>>(), vec!["second"]);
    let mv: MvRegister<Vec<u8>> = r.read("mv").await.unwrap();
    assert_eq!(
        mv.values().cloned().collect::<Vec<_>>(),
        vec![b"second".to_vec()]
    );
    assert_eq!(r.get("mv").await.unwrap(), one("second"));
    r.merge_crdt("mv", Op::Mv(RegisterOp::Clear)).await.unwrap();
    assert!(r.read::<MvRegister<String>>("mv").await.unwrap().is_empty());
    assert_eq!(r.get("mv").await.unwrap(), ResolvedValue::Absent);

    // Map with every field kind and a nested map.
    let nested = MapOp::update(
        "profile",
        FieldOp::Map(Box::new(MapOp::update(
            "name",
            FieldOp::Lww(RegisterOp::write("Ada")),
        ))),
    );
    r.merge_crdt("m", nested).await.unwrap();
    r.merge_crdt(
        "m",
        MapOp::update("visits", FieldOp::Counter(CounterOp::inc(2))),
    )
    .await
    .unwrap();
    r.merge_crdt("m", MapOp::update("tags", FieldOp::Set(SetOp::add("x"))))
        .await
        .unwrap();
    r.merge_crdt(
        "m",
        MapOp::update("note", FieldOp::Mv(RegisterOp::write("n"))),
    )
    .await
    .unwrap();
    r.merge_crdt(
        "m",
        MapOp::update("gone", FieldOp::Lww(RegisterOp::write("g"))),
    )
    .await
    .unwrap();
    r.merge_crdt("m", MapOp::remove("gone")).await.unwrap();
    let map: OrMap = r.read("m").await.unwrap();
    assert_eq!(
        map.keys().collect::<Vec<_>>(),
        vec!["note", "profile", "tags", "visits"]
    );
    assert_eq!(map.get("visits").unwrap().counter(), 2);
    assert!(map.get("tags").unwrap().set_contains(b"x"));
    assert_eq!(strings(map.get("note").unwrap().mv()), vec!["n"]);
    let profile = map.get("profile").unwrap().map();
    assert_eq!(profile.get("name").unwrap().lww(), Some(&b"Ada"[..]));
    r.merge_crdt("m", MapOp::Clear).await.unwrap();
    assert!(r.read::<OrMap>("m").await.unwrap().is_empty());
    r.merge_crdt("m", MapOp::update("again", FieldOp::Set(SetOp::add("y"))))
        .await
        .unwrap();
    assert_eq!(r.read::<OrMap>("m").await.unwrap().len(), 1);

    // Delete of every type reads as that type's empty value, keeping the type.
    for key in ["g", "pn", "s", "lww", "m"] {
        let receipt = r.merge_crdt(key, Op::Delete).await.unwrap();
        assert!(receipt.seq.is_some(), "deleting live {key} writes a delta");
    }
    assert_eq!(r.read::<GCounter>("g").await.unwrap().value(), 0);
    assert_eq!(r.read::<PnCounter>("pn").await.unwrap().value(), 0);
    assert!(r.read::<OrSet<String>>("s").await.unwrap().is_empty());
    assert_eq!(
        r.read::<LwwRegister<String>>("lww").await.unwrap().value(),
        None
    );
    assert!(r.read::<OrMap>("m").await.unwrap().is_empty());
    assert_read_mismatch::<OrSet<String>>(&r, "pn", TypeTag::PnCounter).await;
    // A counter revived after its deletion counts from zero.
    r.merge_crdt("pn", CounterOp::inc(1)).await.unwrap();
    assert_eq!(r.read::<PnCounter>("pn").await.unwrap().value(), 1);
}

#[tokio::test]
async fn absent_keys_read_as_empty_values_of_every_type() {
    let r = region(config("us-east", ""), &ManualClock::new(1_000));
    assert_eq!(r.read::<GCounter>("none").await.unwrap().value(), 0);
    assert_eq!(r.read::<PnCounter>("none").await.unwrap().value(), 0);
    assert!(r.read::<OrSet<Vec<u8>>>("none").await.unwrap().is_empty());
    assert!(r.read::<OrSet<String>>("none").await.unwrap().is_empty());
    assert_eq!(
        r.read::<LwwRegister<Vec<u8>>>("none")
            .await
            .unwrap()
            .value(),
        None
    );
    assert_eq!(
        r.read::<LwwRegister<String>>("none").await.unwrap().value(),
        None
    );
    assert!(r
        .read::<MvRegister<Vec<u8>>>("none")
        .await
        .unwrap()
        .is_empty());
    assert!(r
        .read::<MvRegister<String>>("none")
        .await
        .unwrap()
        .is_empty());
    assert!(r.read::<OrMap>("none").await.unwrap().is_empty());
    let (value, version) = r.read_versioned::<PnCounter>("none").await.unwrap();
    assert_eq!((value.value(), version), (0, None));
    assert_eq!(r.read_value("none").await.unwrap(), None);
    assert_eq!(r.get("none").await.unwrap(), ResolvedValue::Absent);
    // Deleting a key that holds nothing writes nothing.
    let receipt = r.delete("none").await.unwrap();
    assert_eq!(receipt.seq, None);
    assert_eq!(r.read_value("none").await.unwrap(), None);
    assert_eq!(feed_len(&r).await, 0);
    // Reads of invalid keys are errors, not empty values.
    assert_invalid_key(&r.read::<PnCounter>("").await);
    assert_invalid_key(&r.get("bad\nkey").await);
}

#[tokio::test]
async fn wrong_type_is_a_mismatch_on_read_and_on_write_and_writes_nothing() {
    let r = region(config("us-east", ""), &ManualClock::new(1_000));
    r.merge_crdt("g", Op::GCounterInc(1)).await.unwrap();
    r.merge_crdt("pn", CounterOp::inc(5)).await.unwrap();
    r.merge_crdt("s", SetOp::add("a")).await.unwrap();
    r.merge_crdt("lww", Op::Lww(RegisterOp::write("v")))
        .await
        .unwrap();
    r.put("mv", "v").await.unwrap();
    r.merge_crdt("m", MapOp::update("k", FieldOp::Counter(CounterOp::inc(1))))
        .await
        .unwrap();

    // Reads: every key read as every other type.
    assert_read_mismatch::<PnCounter>(&r, "g", TypeTag::GCounter).await;
    assert_read_mismatch::<GCounter>(&r, "pn", TypeTag::PnCounter).await;
    assert_read_mismatch::<OrSet<Vec<u8>>>(&r, "pn", TypeTag::PnCounter).await;
    assert_read_mismatch::<OrSet<String>>(&r, "pn", TypeTag::PnCounter).await;
    assert_read_mismatch::<LwwRegister<Vec<u8>>>(&r, "s", TypeTag::OrSet).await;
    assert_read_mismatch::<LwwRegister<String>>(&r, "mv", TypeTag::MvRegister).await;
    assert_read_mismatch::<MvRegister<Vec<u8>>>(&r, "lww", TypeTag::LwwRegister).await;
    assert_read_mismatch::<MvRegister<String>>(&r, "m", TypeTag::Map).await;
    assert_read_mismatch::<OrMap>(&r, "s", TypeTag::OrSet).await;
    assert_type_mismatch(
        r.get("pn").await,
        "pn",
        TypeTag::MvRegister,
        TypeTag::PnCounter,
    );
    assert_type_mismatch(
        r.get("lww").await,
        "lww",
        TypeTag::MvRegister,
        TypeTag::LwwRegister,
    );

    // Writes: nothing changes, neither value, version nor feed.
    let before_feed = feed_len(&r).await;
    let before: Vec<_> = {
        let mut v = Vec::new();
        for key in ["g", "pn", "s", "lww", "mv", "m"] {
            v.push(r.read_value(key).await.unwrap().unwrap());
        }
        v
    };
    let writes: Vec<(&str, Op, TypeTag, TypeTag)> = vec![
        (
            "pn",
            Op::Set(SetOp::add("x")),
            TypeTag::OrSet,
            TypeTag::PnCounter,
        ),
        (
            "g",
            Op::Counter(CounterOp::inc(1)),
            TypeTag::PnCounter,
            TypeTag::GCounter,
        ),
        (
            "pn",
            Op::GCounterInc(1),
            TypeTag::GCounter,
            TypeTag::PnCounter,
        ),
        (
            "s",
            Op::Lww(RegisterOp::write("x")),
            TypeTag::LwwRegister,
            TypeTag::OrSet,
        ),
        (
            "lww",
            Op::Mv(RegisterOp::write("x")),
            TypeTag::MvRegister,
            TypeTag::LwwRegister,
        ),
        (
            "mv",
            Op::Map(MapOp::remove("k")),
            TypeTag::Map,
            TypeTag::MvRegister,
        ),
        ("m", Op::Set(SetOp::Clear), TypeTag::OrSet, TypeTag::Map),
    ];
    for (key, op, expected, found) in writes {
        assert_type_mismatch(r.merge_crdt(key, op).await, key, expected, found);
    }
    assert_type_mismatch(
        r.put("pn", "x").await,
        "pn",
        TypeTag::MvRegister,
        TypeTag::PnCounter,
    );
    let batch = r.put_many([("s", "x"), ("mv", "fine")]).await.unwrap();
    assert_type_mismatch(batch[0].clone(), "s", TypeTag::MvRegister, TypeTag::OrSet);
    assert!(batch[1].is_ok());
    // Only the put to "mv" wrote.
    assert_eq!(feed_len(&r).await, before_feed + 1);
    for (key, old) in ["g", "pn", "s", "lww", "mv", "m"].into_iter().zip(before) {
        let now = r.read_value(key).await.unwrap().unwrap();
        if key == "mv" {
            assert_ne!(now.version, old.version);
        } else {
            assert_eq!(now, old, "{key} changed after a refused write");
        }
    }
    assert_eq!(r.read::<PnCounter>("pn").await.unwrap().value(), 5);
}

#[tokio::test]
async fn non_utf8_bytes_read_as_string_are_a_conversion_error() {
    let r = region(config("us-east", ""), &ManualClock::new(1_000));
    r.merge_crdt("s", SetOp::Add(vec![b"ok".to_vec(), vec![0xff, 0xfe]]))
        .await
        .unwrap();
    r.merge_crdt("lww", Op::Lww(RegisterOp::Write(vec![0xc3])))
        .await
        .unwrap();
    r.put("mv", vec![0x80, b'a']).await.unwrap();

    for result in [
        r.read::<OrSet<String>>("s").await.map(|_| ()),
        r.read::<LwwRegister<String>>("lww").await.map(|_| ()),
        r.read::<MvRegister<String>>("mv").await.map(|_| ()),
    ] {
        assert!(
            matches!(result, Err(RegionError::Conversion { .. })),
            "expected a conversion error, got {result:?}"
        );
    }
    match r.read::<OrSet<String>>("s").await {
        Err(RegionError::Conversion { key, .. }) => assert_eq!(key, "s"),
        other => panic!("unexpected {other:?}"),
    }
    // As bytes they read fine.
    assert_eq!(r.read::<OrSet<Vec<u8>>>("s").await.unwrap().len(), 2);
    assert_eq!(
        r.read::<LwwRegister<Vec<u8>>>("lww").await.unwrap().value(),
        Some(&vec![0xc3])
    );
    assert_eq!(
        r.get("mv").await.unwrap(),
        ResolvedValue::One(vec![0x80, b'a'])
    );
    // Removing the bad element makes the set readable as strings again.
    r.merge_crdt("s", SetOp::Remove(vec![vec![0xff, 0xfe]]))
        .await
        .unwrap();
    let set: OrSet<String> = r.read("s").await.unwrap();
    assert_eq!(set_of(&set), BTreeSet::from(["ok".into()]));
}

// ---------------------------------------------------------------------------------------------
// Two regions exchanging deltas
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn counters_sum_and_sets_are_add_wins_across_regions() {
    let mut pair = Pair::new("");
    pair.a.merge_crdt("c", CounterOp::inc(5)).await.unwrap();
    pair.a.merge_crdt("c", CounterOp::dec(1)).await.unwrap();
    pair.b.merge_crdt("c", CounterOp::inc(10)).await.unwrap();
    pair.a.merge_crdt("g", Op::GCounterInc(2)).await.unwrap();
    pair.b.merge_crdt("g", Op::GCounterInc(3)).await.unwrap();
    pair.a.merge_crdt("cart", SetOp::add("x")).await.unwrap();
    pair.a.merge_crdt("cart", SetOp::add("z")).await.unwrap();
    pair.exchange().await;

    for r in [&pair.a, &pair.b] {
        assert_eq!(r.read::<PnCounter>("c").await.unwrap().value(), 14);
        assert_eq!(r.read::<GCounter>("g").await.unwrap().value(), 5);
        let set: OrSet<String> = r.read("cart").await.unwrap();
        assert_eq!(set_of(&set), BTreeSet::from(["x".into(), "z".into()]));
    }

    // Concurrently: A removes x and z, B adds x again and adds y.
    pair.a.merge_crdt("cart", SetOp::remove("x")).await.unwrap();
    pair.a.merge_crdt("cart", SetOp::remove("z")).await.unwrap();
    pair.b.merge_crdt("cart", SetOp::add("x")).await.unwrap();
    pair.b.merge_crdt("cart", SetOp::add("y")).await.unwrap();
    pair.a.merge_crdt("c", CounterOp::dec(4)).await.unwrap();
    pair.b.merge_crdt("c", CounterOp::inc(1)).await.unwrap();
    pair.exchange().await;

    for r in [&pair.a, &pair.b] {
        let set: OrSet<String> = r.read("cart").await.unwrap();
        // x: B's add was concurrent with A's remove and wins; z: removed, nobody re-added.
        assert_eq!(set_of(&set), BTreeSet::from(["x".into(), "y".into()]));
        assert_eq!(r.read::<PnCounter>("c").await.unwrap().value(), 11);
    }
    for key in ["c", "g", "cart"] {
        pair.assert_converged(key).await;
    }

    // Redelivery of everything (a replicator that lost its cursors) changes nothing.
    let mut from_zero = vec![0; pair.a_to_b.len()];
    assert!(ship(&pair.a, &pair.b, &mut from_zero).await > 0);
    let mut from_zero = vec![0; pair.b_to_a.len()];
    assert!(ship(&pair.b, &pair.a, &mut from_zero).await > 0);
    for r in [&pair.a, &pair.b] {
        assert_eq!(r.read::<PnCounter>("c").await.unwrap().value(), 11);
        assert_eq!(r.read::<GCounter>("g").await.unwrap().value(), 5);
        let set: OrSet<String> = r.read("cart").await.unwrap();
        assert_eq!(set_of(&set), BTreeSet::from(["x".into(), "y".into()]));
    }
    // Applying remote deltas never feeds them again: each feed holds local writes only.
    assert_eq!(ship(&pair.a, &pair.b, &mut pair.a_to_b).await, 0);
    assert!(feed_entries(&pair.a)
        .await
        .iter()
        .all(|e| e.origin == pair.a.actor()));
}

#[tokio::test]
async fn concurrent_puts_resolve_last_writer_wins_by_hlc_in_both_regions() {
    let mut pair = Pair::new("");
    // p:1 — B writes with the greater timestamp; p:2 — A does. Actor order cannot decide both.
    let a1 = pair.a.put("p:1", "a1").await.unwrap();
    let b1 = pair.b.put("p:1", "b1").await.unwrap();
    assert!(b1.hlc > a1.hlc);
    pair.clock_a.set(5_000);
    pair.clock_b.set(3_000);
    let a2 = pair.a.put("p:2", "a2").await.unwrap();
    let b2 = pair.b.put("p:2", "b2").await.unwrap();
    assert!(a2.hlc > b2.hlc);
    // Before the exchange, each region sees only its own write.
    assert_eq!(pair.a.get("p:1").await.unwrap(), one("a1"));
    assert_eq!(pair.b.get("p:1").await.unwrap(), one("b1"));
    pair.exchange().await;

    for r in [&pair.a, &pair.b] {
        // The register holds both siblings; the default resolver shows the later write.
        assert_eq!(r.read::<MvRegister<String>>("p:1").await.unwrap().len(), 2);
        for _ in 0..3 {
            assert_eq!(r.get("p:1").await.unwrap(), one("b1"));
            assert_eq!(r.get("p:2").await.unwrap(), one("a2"));
        }
        let many = r.get_many(&["p:1", "p:2"]).await.unwrap();
        assert_eq!(many, vec![Ok(one("b1")), Ok(one("a2"))]);
    }

    // Exactly one record per conflicting key and region, however often it was read.
    for r in [&pair.a, &pair.b] {
        assert_eq!(r.conflicts(0, 100).await.unwrap().len(), 2);
        let records = conflicts_of(r, "p:1").await;
        assert_eq!(records.len(), 1, "{}: {records:?}", r.id());
        let record = &records[0];
        assert_eq!(record.resolver, "lww");
        let mut hlcs: Vec<Hlc> = record.siblings.iter().map(|s| s.hlc).collect();
        hlcs.sort();
        assert_eq!(hlcs, vec![a1.hlc, b1.hlc]);
        let actors: BTreeSet<_> = record.siblings.iter().map(|s| s.dot.actor).collect();
        assert_eq!(actors, BTreeSet::from([pair.a.actor(), pair.b.actor()]));
        assert_eq!(
            record.resolution,
            RecordedResolution::Chosen {
                value_len: 2,
                value_digest: value_digest(b"b1")
            }
        );
        assert_eq!(conflicts_of(r, "p:2").await.len(), 1);
    }
    // Both regions recorded the same conflict.
    assert_eq!(
        conflicts_of(&pair.a, "p:1").await,
        conflicts_of(&pair.b, "p:1").await
    );

    // A later put that saw both siblings ends the conflict: one value, no new record.
    let fin = pair.a.put("p:1", "final").await.unwrap();
    assert!(
        fin.hlc > b1.hlc,
        "a write after observing b1 is later than b1"
    );
    assert_eq!(pair.a.get("p:1").await.unwrap(), one("final"));
    pair.exchange().await;
    for r in [&pair.a, &pair.b] {
        assert_eq!(r.get("p:1").await.unwrap(), one("final"));
        assert_eq!(r.read::<MvRegister<String>>("p:1").await.unwrap().len(), 1);
        assert_eq!(conflicts_of(r, "p:1").await.len(), 1);
        assert_eq!(r.conflicts(0, 100).await.unwrap().len(), 2);
    }
    pair.assert_converged("p:1").await;
    pair.assert_converged("p:2").await;
    // Paging the conflict feed.
    let first = pair.a.conflicts(0, 1).await.unwrap();
    assert_eq!(first.len(), 1);
    let rest = pair.a.conflicts(first[0].0, 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert!(rest[0].0 > first[0].0);
}

#[tokio::test]
async fn keep_siblings_policy_returns_every_value_in_both_regions() {
    let mut pair = Pair::new(
        "[[resolvers]]\nprefix = \"doc:\"\npolicy = \"keep-siblings\"\n\
         [[resolvers]]\nprefix = \"doc:lww:\"\npolicy = \"lww\"\n",
    );
    for key in ["doc:1", "doc:lww:1", "other:1"] {
        pair.a.put(key, "from-a").await.unwrap();
        pair.b.put(key, "from-b").await.unwrap();
    }
    pair.exchange().await;

    let shown_a = pair.a.get("doc:1").await.unwrap();
    let shown_b = pair.b.get("doc:1").await.unwrap();
    assert_eq!(
        shown_a, shown_b,
        "both regions show the same siblings in the same order"
    );
    let ResolvedValue::Siblings(values) = shown_a else {
        panic!("expected siblings, got {shown_a:?}")
    };
    assert_eq!(
        strings(&values).into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from(["from-a".into(), "from-b".into()])
    );
    assert_eq!(values.len(), 2);
    for r in [&pair.a, &pair.b] {
        // The longest prefix wins; keys outside every prefix use the default.
        assert_eq!(r.get("doc:lww:1").await.unwrap(), one("from-b"));
        assert_eq!(r.get("other:1").await.unwrap(), one("from-b"));
        let _ = r.get("doc:1").await.unwrap();
        let records = conflicts_of(r, "doc:1").await;
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].resolver, "keep-siblings");
        assert_eq!(records[0].resolution, RecordedResolution::KeepSiblings);
        assert_eq!(conflicts_of(r, "doc:lww:1").await[0].resolver, "lww");
    }

    // The application resolves by writing; the siblings are gone everywhere.
    pair.b.put("doc:1", "merged").await.unwrap();
    pair.exchange().await;
    for r in [&pair.a, &pair.b] {
        assert_eq!(r.get("doc:1").await.unwrap(), one("merged"));
        assert_eq!(conflicts_of(r, "doc:1").await.len(), 1);
    }
}

#[tokio::test]
async fn custom_resolver_function_decides_in_both_regions() {
    // The config's policy for the same prefix is overridden by the builder's function.
    let mut pair = Pair::with(
        "[[resolvers]]\nprefix = \"merge:\"\npolicy = \"keep-siblings\"\n",
        |builder| {
            builder.resolver_fn(
                "merge:",
                "sorted-join",
                |_key: &str, siblings: &[Sibling<'_>]| {
                    let mut values: Vec<&[u8]> = siblings.iter().map(|s| s.value).collect();
                    values.sort_unstable();
                    values.join(&b'|')
                },
            )
        },
    );
    pair.a.put("merge:1", "apple").await.unwrap();
    pair.b.put("merge:1", "banana").await.unwrap();
    pair.a.put("plain", "apple").await.unwrap();
    pair.b.put("plain", "banana").await.unwrap();
    pair.exchange().await;
    for r in [&pair.a, &pair.b] {
        assert_eq!(r.get("merge:1").await.unwrap(), one("apple|banana"));
        assert_eq!(r.get("merge:1").await.unwrap(), one("apple|banana"));
        assert_eq!(r.get("plain").await.unwrap(), one("banana"));
        let records = conflicts_of(r, "merge:1").await;
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].resolver, "sorted-join");
        assert_eq!(
            records[0].resolution,
            RecordedResolution::Chosen {
                value_len: 12,
                value_digest: value_digest(b"apple|banana")
            }
        );
    }
}

#[tokio::test]
async fn delete_loses_to_a_concurrent_write_and_nothing_it_saw_comes_back() {
    let mut pair = Pair::new("");
    let add_x = pair.a.merge_crdt("s", SetOp::add("x")).await.unwrap();
    let put_v1 = pair.a.put("doc", "v1").await.unwrap();
    let old_ctr = pair.a.merge_crdt("ctr", CounterOp::inc(7)).await.unwrap();
    pair.exchange().await;
    assert!(pair
        .b
        .read::<OrSet<String>>("s")
        .await
        .unwrap()
        .contains(&"x".into()));
    assert_eq!(pair.b.get("doc").await.unwrap(), one("v1"));

    // Concurrently: A deletes the keys, B writes to them.
    pair.a.delete("s").await.unwrap();
    pair.a.delete("doc").await.unwrap();
    pair.a.delete("ctr").await.unwrap();
    pair.b.merge_crdt("s", SetOp::add("y")).await.unwrap();
    pair.b.put("doc", "v2").await.unwrap();
    pair.b.merge_crdt("ctr", CounterOp::inc(2)).await.unwrap();
    assert!(pair.a.read::<OrSet<String>>("s").await.unwrap().is_empty());
    assert_eq!(pair.a.get("doc").await.unwrap(), ResolvedValue::Absent);
    pair.exchange().await;

    for r in [&pair.a, &pair.b] {
        let set: OrSet<String> = r.read("s").await.unwrap();
        assert_eq!(set_of(&set), BTreeSet::from(["y".into()]), "{}", r.id());
        assert_eq!(r.get("doc").await.unwrap(), one("v2"), "{}", r.id());
        assert_eq!(r.read::<PnCounter>("ctr").await.unwrap().value(), 2);
    }
    // B's write survived the deletion without a conflict: the delete is not a sibling.
    assert!(pair.a.conflicts(0, 100).await.unwrap().is_empty());

    // A delayed (re)delivery of the writes the deletion saw does not resurrect them.
    let old: Vec<FeedEntry> = feed_entries(&pair.a)
        .await
        .into_iter()
        .filter(|e| {
            (e.key.as_str() == "s" && Some(e.seq) == add_x.seq)
                || (e.key.as_str() == "doc" && Some(e.seq) == put_v1.seq)
                || (e.key.as_str() == "ctr" && Some(e.seq) == old_ctr.seq)
        })
        .collect();
    assert_eq!(old.len(), 3);
    for r in [&pair.a, &pair.b] {
        for entry in &old {
            r.backend().merge(&entry.key, &entry.delta).await.unwrap();
        }
        let set: OrSet<String> = r.read("s").await.unwrap();
        assert_eq!(set_of(&set), BTreeSet::from(["y".into()]));
        assert_eq!(r.get("doc").await.unwrap(), one("v2"));
        assert_eq!(r.read::<PnCounter>("ctr").await.unwrap().value(), 2);
    }
    for key in ["s", "doc", "ctr"] {
        pair.assert_converged(key).await;
    }

    // A deletion nobody raced: the key stays empty in both regions, even on redelivery.
    pair.a.put("solo", "v").await.unwrap();
    pair.exchange().await;
    pair.b.delete("solo").await.unwrap();
    pair.exchange().await;
    let mut from_zero = vec![0; pair.a_to_b.len()];
    ship(&pair.a, &pair.b, &mut from_zero).await;
    let mut from_zero = vec![0; pair.a_to_b.len()];
    ship(&pair.a, &pair.a, &mut from_zero).await;
    for r in [&pair.a, &pair.b] {
        assert_eq!(r.get("solo").await.unwrap(), ResolvedValue::Absent);
    }
}

// ---------------------------------------------------------------------------------------------
// Compare-and-set
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn compare_and_set_checks_the_region_local_version() {
    let r = region(config("us-east", ""), &ManualClock::new(1_000));

    // Absent on a missing key applies; a second Absent conflicts with the version now there.
    let first = applied(
        r.compare_and_set("seats", Expect::Absent, CounterOp::inc(10))
            .await
            .unwrap(),
    );
    assert!(first.seq.is_some());
    let (value, version) = r.read_versioned::<PnCounter>("seats").await.unwrap();
    assert_eq!((value.value(), version), (10, Some(first.version)));
    let feed = feed_len(&r).await;
    assert_eq!(
        r.compare_and_set("seats", Expect::Absent, CounterOp::inc(1))
            .await
            .unwrap(),
        CasOutcome::Conflict {
            actual: Some(first.version)
        }
    );

    // The version from read_versioned applies; it is stale afterwards.
    let second = applied(
        r.compare_and_set("seats", Expect::Version(first.version), CounterOp::dec(3))
            .await
            .unwrap(),
    );
    assert_ne!(second.version, first.version);
    assert_eq!(
        r.compare_and_set("seats", Expect::Version(first.version), CounterOp::dec(5))
            .await
            .unwrap(),
        CasOutcome::Conflict {
            actual: Some(second.version)
        }
    );
    // Another writer moves the version: the holder of the old one loses.
    let other = r.merge_crdt("seats", CounterOp::inc(1)).await.unwrap();
    assert_eq!(
        r.compare_and_set("seats", Expect::Version(second.version), CounterOp::dec(1))
            .await
            .unwrap(),
        CasOutcome::Conflict {
            actual: Some(other.version)
        }
    );
    // Version on a missing key.
    assert_eq!(
        r.compare_and_set("nothing", Expect::Version(1), CounterOp::inc(1))
            .await
            .unwrap(),
        CasOutcome::Conflict { actual: None }
    );
    assert_eq!(r.read_value("nothing").await.unwrap(), None);

    // Failed CASes wrote nothing: two successful writes since `feed` was taken.
    assert_eq!(feed_len(&r).await, feed + 2);
    let (value, version) = r.read_versioned::<PnCounter>("seats").await.unwrap();
    assert_eq!((value.value(), version), (8, Some(other.version)));

    // CAS does not hide other errors.
    assert_type_mismatch(
        r.compare_and_set("seats", Expect::Version(other.version), SetOp::add("x"))
            .await,
        "seats",
        TypeTag::OrSet,
        TypeTag::PnCounter,
    );
    assert_invalid_key(
        &r.compare_and_set("", Expect::Absent, CounterOp::inc(1))
            .await,
    );

    // After a deletion, the version read is the one to use, and versions never repeat.
    let deleted = r.delete("seats").await.unwrap();
    let (value, version) = r.read_versioned::<PnCounter>("seats").await.unwrap();
    assert_eq!((value.value(), version), (0, Some(deleted.version)));
    let revived = applied(
        r.compare_and_set("seats", Expect::Version(deleted.version), CounterOp::inc(4))
            .await
            .unwrap(),
    );
    let versions = BTreeSet::from([
        first.version,
        second.version,
        other.version,
        deleted.version,
        revived.version,
    ]);
    assert_eq!(versions.len(), 5);
    assert_eq!(r.read::<PnCounter>("seats").await.unwrap().value(), 4);
}

#[tokio::test]
async fn compare_and_set_batch_gives_each_item_its_own_outcome() {
    let r = region(config("us-east", ""), &ManualClock::new(1_000));
    let a = r.merge_crdt("a", CounterOp::inc(1)).await.unwrap();
    let b = r.merge_crdt("b", CounterOp::inc(1)).await.unwrap();
    let b2 = r.merge_crdt("b", CounterOp::inc(1)).await.unwrap();
    let feed = feed_len(&r).await;

    let outcomes = r
        .compare_and_set_batch(vec![
            (
                "a",
                Expect::Version(a.version),
                Op::from(CounterOp::inc(10)),
            ),
            (
                "b",
                Expect::Version(b.version),
                Op::from(CounterOp::inc(10)),
            ),
            ("bad\nkey", Expect::Any, Op::from(CounterOp::inc(1))),
            ("new", Expect::Absent, Op::from(SetOp::add("x"))),
            ("a", Expect::Absent, Op::from(CounterOp::inc(100))),
            ("b", Expect::Version(b2.version), Op::from(SetOp::add("x"))),
            ("missing", Expect::Version(7), Op::from(CounterOp::inc(1))),
        ])
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 7);
    let a_after = match &outcomes[0] {
        Ok(CasOutcome::Applied(receipt)) => receipt.version,
        other => panic!("item 0: {other:?}"),
    };
    assert_eq!(
        outcomes[1],
        Ok(CasOutcome::Conflict {
            actual: Some(b2.version)
        })
    );
    assert_invalid_key(&outcomes[2]);
    assert!(
        matches!(outcomes[3], Ok(CasOutcome::Applied(_))),
        "{:?}",
        outcomes[3]
    );
    // Items apply in order: item 4 sees item 0's version.
    assert_eq!(
        outcomes[4],
        Ok(CasOutcome::Conflict {
            actual: Some(a_after)
        })
    );
    assert_type_mismatch(outcomes[5].clone(), "b", TypeTag::OrSet, TypeTag::PnCounter);
    assert_eq!(outcomes[6], Ok(CasOutcome::Conflict { actual: None }));

    assert_eq!(feed_len(&r).await, feed + 2);
    assert_eq!(r.read::<PnCounter>("a").await.unwrap().value(), 11);
    assert_eq!(r.read::<PnCounter>("b").await.unwrap().value(), 2);
    assert!(r
        .read::<OrSet<String>>("new")
        .await
        .unwrap()
        .contains(&"x".into()));
    assert_eq!(r.read_value("missing").await.unwrap(), None);
}

// ---------------------------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn batches_fail_only_the_invalid_item() {
    let r = region(config("us-east", ""), &ManualClock::new(1_000));

    let merged = r
        .merge_batch(vec![
            ("n:1", Op::from(CounterOp::inc(1))),
            ("bad\nkey", Op::from(CounterOp::inc(1))),
            ("n:2", Op::from(CounterOp::inc(2))),
            ("n:1", Op::from(SetOp::add("wrong type"))),
            ("n:3", Op::GCounterInc(3)),
        ])
        .await
        .unwrap();
    assert_eq!(merged.len(), 5);
    assert!(merged[0].is_ok() && merged[2].is_ok() && merged[4].is_ok());
    assert_invalid_key(&merged[1]);
    assert_type_mismatch(merged[3].clone(), "n:1", TypeTag::OrSet, TypeTag::PnCounter);

    let read = r
        .read_many::<PnCounter>(&["n:1", "", "n:2", "absent", "n:3"])
        .await
        .unwrap();
    assert_eq!(read.len(), 5);
    assert_eq!(read[0].as_ref().unwrap().value(), 1);
    assert_invalid_key(&read[1]);
    assert_eq!(read[2].as_ref().unwrap().value(), 2);
    assert_eq!(read[3].as_ref().unwrap().value(), 0);
    assert_type_mismatch(
        read[4].clone(),
        "n:3",
        TypeTag::PnCounter,
        TypeTag::GCounter,
    );

    let put = r
        .put_many(vec![("p:1", "one"), ("", "nothing"), ("p:2", "two")])
        .await
        .unwrap();
    assert_eq!(put.len(), 3);
    assert!(put[0].is_ok() && put[2].is_ok());
    assert_invalid_key(&put[1]);

    let got = r
        .get_many(&["p:1", "bad\tkey", "p:2", "absent", "n:1"])
        .await
        .unwrap();
    assert_eq!(got.len(), 5);
    assert_eq!(got[0], Ok(one("one")));
    assert_invalid_key(&got[1]);
    assert_eq!(got[2], Ok(one("two")));
    assert_eq!(got[3], Ok(ResolvedValue::Absent));
    assert_type_mismatch(
        got[4].clone(),
        "n:1",
        TypeTag::MvRegister,
        TypeTag::PnCounter,
    );

    let long = "k".repeat(2_000);
    let deleted = r
        .delete_many(&["p:1", long.as_str(), "p:2", "n:1"])
        .await
        .unwrap();
    assert_eq!(deleted.len(), 4);
    assert!(deleted[0].is_ok() && deleted[2].is_ok() && deleted[3].is_ok());
    assert_invalid_key(&deleted[1]);
    assert_eq!(
        r.get_many(&["p:1", "p:2"]).await.unwrap(),
        vec![Ok(ResolvedValue::Absent), Ok(ResolvedValue::Absent)]
    );
    assert_eq!(r.read::<PnCounter>("n:1").await.unwrap().value(), 0);
    assert_eq!(r.read::<PnCounter>("n:2").await.unwrap().value(), 2);

    // Empty batches are fine and do nothing.
    let none: Vec<(&str, Op)> = Vec::new();
    assert!(r.merge_batch(none).await.unwrap().is_empty());
    assert!(r.read_many::<PnCounter>(&[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn batches_over_the_configured_limit_are_refused_whole() {
    let r = region(
        config("us-east", "[limits]\nbatch_items_max = 3\n"),
        &ManualClock::new(1_000),
    );
    let four = ["k:1", "k:2", "k:3", "k:4"];
    let three = &four[..3];
    let is_limit =
        |e: &RegionError| matches!(e, RegionError::Backend(BackendError::InvalidArgument(_)));

    let err = r
        .merge_batch(four.iter().map(|k| (*k, CounterOp::inc(1))))
        .await
        .unwrap_err();
    assert!(is_limit(&err), "{err:?}");
    let err = r
        .put_many(four.iter().map(|k| (*k, "v")))
        .await
        .unwrap_err();
    assert!(is_limit(&err), "{err:?}");
    let err = r.delete_many(&four).await.unwrap_err();
    assert!(is_limit(&err), "{err:?}");
    let err = r
        .compare_and_set_batch(four.iter().map(|k| (*k, Expect::Absent, CounterOp::inc(1))))
        .await
        .unwrap_err();
    assert!(is_limit(&err), "{err:?}");
    let err = r.read_many::<PnCounter>(&four).await.unwrap_err();
    assert!(is_limit(&err), "{err:?}");
    let err = r.get_many(&four).await.unwrap_err();
    assert!(is_limit(&err), "{err:?}");
    // Nothing was written by the refused batches.
    assert_eq!(feed_len(&r).await, 0);
    assert_eq!(r.read_value("k:1").await.unwrap(), None);

    // At the limit, batches work.
    let done = r
        .merge_batch(three.iter().map(|k| (*k, CounterOp::inc(1))))
        .await
        .unwrap();
    assert!(done.iter().all(Result::is_ok));
    let read = r.read_many::<PnCounter>(three).await.unwrap();
    assert!(read.iter().all(|c| c.as_ref().unwrap().value() == 1));
    assert_eq!(r.get_many(&["p", "q", "r"]).await.unwrap().len(), 3);
    assert_eq!(feed_len(&r).await, 3);
}

// ---------------------------------------------------------------------------------------------
// Scans
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn scan_pages_visit_every_key_of_the_prefix_once_in_order() {
    let r = region(config("us-east", ""), &ManualClock::new(1_000));
    let expected: Vec<String> = (0..25).map(|i| format!("scan:{i:02}")).collect();
    for (i, key) in expected.iter().enumerate() {
        r.merge_crdt(key, CounterOp::inc(i as u64)).await.unwrap();
    }
    for key in ["sca", "scan", "scanner:1", "other:1", "s"] {
        r.merge_crdt(key, CounterOp::inc(1)).await.unwrap();
    }

    for limit in [1, 4, 5, 7, 25, 100] {
        let mut seen: Vec<String> = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = r.scan("scan:", after.as_deref(), limit).await.unwrap();
            pages += 1;
            assert!(page.items.len() <= limit);
            for item in &page.items {
                let stored = item.value.as_ref().unwrap();
                let index: i128 = item.key.as_str()[5..].parse().unwrap();
                assert_eq!(counter_value(&stored.value), index);
                seen.push(item.key.to_string());
            }
            match page.next {
                Some(next) => {
                    assert_eq!(Some(&next), page.items.last().map(|i| &i.key));
                    after = Some(next.to_string());
                }
                None => break,
            }
            assert!(pages <= 30, "scan does not terminate");
        }
        assert_eq!(seen, expected, "limit {limit}");
        assert!(pages >= expected.len().div_ceil(limit), "limit {limit}");
    }

    // Resuming after an arbitrary key, even one that does not exist.
    let page = r.scan("scan:", Some("scan:19x"), 100).await.unwrap();
    let keys: Vec<&str> = page.items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(
        keys,
        vec!["scan:20", "scan:21", "scan:22", "scan:23", "scan:24"]
    );
    assert_eq!(page.next, None);
    // A prefix matching nothing, and an invalid resume key.
    assert!(r.scan("nothing:", None, 10).await.unwrap().items.is_empty());
    assert_invalid_key(&r.scan("scan:", Some(""), 10).await);
    assert!(r.scan("scan:", None, 0).await.is_err());
}

/// The value of a stored positive-negative counter.
fn counter_value(value: &Crdt) -> i128 {
    match value {
        Crdt::PnCounter(c) => c.value(),
        other => panic!("not a counter: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Corruption
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn corrupt_bytes_are_reported_and_left_untouched() {
    let r = region(config("us-east", ""), &ManualClock::new(1_000));
    let garbage = b"\x00\x01 definitely not an envelope \xff".to_vec();
    // One key corrupt from the start, one overwritten after holding a good value.
    r.merge_crdt("bad:2", CounterOp::inc(1)).await.unwrap();
    r.merge_crdt("good", CounterOp::inc(1)).await.unwrap();
    for key in ["bad:1", "bad:2"] {
        r.backend()
            .raw_put(&Key::new(key).unwrap(), garbage.clone())
            .await
            .unwrap();
    }
    let feed = feed_len(&r).await;

    for (round, key) in (1..).zip(["bad:1", "bad:2"]) {
        assert_corrupt(r.read::<PnCounter>(key).await, key);
        assert_corrupt(r.read::<OrSet<String>>(key).await, key);
        assert_corrupt(r.read_versioned::<PnCounter>(key).await, key);
        assert_corrupt(r.read_value(key).await, key);
        assert_corrupt(r.get(key).await, key);
        assert_corrupt(r.merge_crdt(key, CounterOp::inc(1)).await, key);
        assert_corrupt(r.put(key, "overwrite").await, key);
        assert_corrupt(r.delete(key).await, key);
        assert_corrupt(
            r.compare_and_set(key, Expect::Any, CounterOp::inc(1)).await,
            key,
        );
        let many = r.read_many::<PnCounter>(&["good", key]).await.unwrap();
        assert_eq!(many[0].as_ref().unwrap().value(), round);
        assert_corrupt(many[1].clone(), key);
        let many = r.get_many(&[key]).await.unwrap();
        assert_corrupt(many[0].clone(), key);
        let batch = r
            .merge_batch(vec![(key, CounterOp::inc(1)), ("good", CounterOp::inc(1))])
            .await
            .unwrap();
        assert_corrupt(batch[0].clone(), key);
        assert!(batch[1].is_ok());
        let batch = r.put_many(vec![(key, "v")]).await.unwrap();
        assert_corrupt(batch[0].clone(), key);
        let batch = r.delete_many(&[key]).await.unwrap();
        assert_corrupt(batch[0].clone(), key);
        // A remote delta is not merged into it either.
        let delta = PnCounter::new()
            .inc(geostate_crdt::ActorId::new(99), 1)
            .unwrap();
        assert!(matches!(
            r.backend()
                .merge(&Key::new(key).unwrap(), &delta.into())
                .await,
            Err(BackendError::Corrupt { .. })
        ));

        assert_eq!(
            r.backend().raw_get(&Key::new(key).unwrap()).await.unwrap(),
            Some(garbage.clone()),
            "{key}: the bytes were touched"
        );
    }
    // A scan reports the corrupt keys without stopping.
    let page = r.scan("", None, 100).await.unwrap();
    let summary: Vec<(&str, bool)> = page
        .items
        .iter()
        .map(|i| (i.key.as_str(), i.value.is_ok()))
        .collect();
    assert_eq!(
        summary,
        vec![("bad:1", false), ("bad:2", false), ("good", true)]
    );
    // Only the writes to "good" reached the feed.
    assert_eq!(feed_len(&r).await, feed + 2);
    assert_eq!(r.read::<PnCounter>("good").await.unwrap().value(), 3);
}

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_increments_through_clones_lose_nothing() {
    let r = Region::connect(config("us-east", "")).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            let mut receipts = Vec::with_capacity(500);
            for _ in 0..500 {
                receipts.push(r.merge_crdt("hits", CounterOp::inc(1)).await.unwrap());
            }
            receipts
        }));
    }
    let mut versions = BTreeSet::new();
    let mut seqs = BTreeSet::new();
    let mut hlcs = BTreeSet::new();
    for task in tasks {
        for receipt in task.await.unwrap() {
            versions.insert(receipt.version);
            seqs.insert(receipt.seq.unwrap());
            hlcs.insert(receipt.hlc);
        }
    }
    assert_eq!(r.read::<PnCounter>("hits").await.unwrap().value(), 4_000);
    assert_eq!(
        (versions.len(), seqs.len(), hlcs.len()),
        (4_000, 4_000, 4_000)
    );
    assert_eq!(
        seqs.iter().copied().collect::<Vec<_>>(),
        (1..=4_000).collect::<Vec<_>>()
    );
    assert_eq!(feed_len(&r).await, 4_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_of_one_region_sharing_a_store_lose_nothing() {
    let mut one_config = config("us-east", "");
    one_config.node = 1;
    let mut two_config = one_config.clone();
    two_config.node = 2;
    let store = store_for(&one_config);
    let one = Region::builder(one_config, Arc::clone(&store))
        .build()
        .unwrap();
    let two = Region::builder(two_config, Arc::clone(&store))
        .build()
        .unwrap();
    assert_ne!(one.actor(), two.actor());

    let mut tasks = Vec::new();
    for i in 0..8 {
        let r = if i % 2 == 0 { one.clone() } else { two.clone() };
        tasks.push(tokio::spawn(async move {
            for _ in 0..500 {
                r.merge_crdt("hits", CounterOp::inc(1)).await.unwrap();
                r.merge_crdt("set", SetOp::add(format!("{i}")))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    for r in [&one, &two] {
        let counter: PnCounter = r.read("hits").await.unwrap();
        assert_eq!(counter.value(), 4_000);
        let entries: Vec<_> = counter
            .entries()
            .map(|(dot, entry)| (dot.actor, entry.inc))
            .collect();
        let mut expected = vec![(one.actor(), 2_000), (two.actor(), 2_000)];
        expected.sort();
        assert_eq!(entries, expected);
        let set: OrSet<String> = r.read("set").await.unwrap();
        assert_eq!(set.len(), 8);
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn config_from_file_is_parsed_and_used() {
    let file = TempFile::new(
        "ok",
        r#"
            region = "ap-south-1"
            node = 42

            [store]
            kind = "memory"

            [layout]
            partitions = 16
            buckets = 8
            feed_entries_max = 1000

            [[resolvers]]
            prefix = "doc:"
            policy = "keep-siblings"

            [limits]
            batch_items_max = 5
            clock_forward_ms_max = 10
        "#,
    );
    let config = RegionConfig::from_file(&file.0).unwrap();
    assert_eq!(config.region.as_str(), "ap-south-1");
    assert_eq!(config.node, 42);
    assert_eq!(config.layout.partitions, 16);
    assert_eq!(config.layout.buckets, 8);
    assert_eq!(config.layout.feed_entries_max, 1000);
    assert_eq!(config.resolvers.len(), 1);
    assert_eq!(config.limits.batch_items_max, 5);
    assert_eq!(config.limits.clock_forward_ms_max, 10);
    // Unset limits keep their defaults.
    assert_eq!(config.limits.conflicts_remembered_max, 10_000);

    let r = Region::connect(config.clone()).await.unwrap();
    assert_eq!(r.id().as_str(), "ap-south-1");
    assert_eq!(r.actor(), config.actor().unwrap());
    assert_eq!(r.backend().layout().partitions(), 16);
    assert!(r.read_many::<PnCounter>(&["1"; 6]).await.is_err());
    drop(file);

    // A missing file is a configuration error naming the path.
    let missing = std::env::temp_dir().join(format!(
        "geostate-regions-test-missing-{}.toml",
        std::process::id()
    ));
    match RegionConfig::from_file(&missing) {
        Err(RegionError::Config(message)) => assert!(message.contains("missing")),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn config_rejects_unknown_fields_and_bad_values() {
    let rejected = [
        "region = \"us-east\"\nregoin = \"x\"\n",
        "region = \"us-east\"\n[layout]\npartitionz = 4\n",
        "region = \"us-east\"\n[limits]\nbatch_max = 4\n",
        "region = \"us-east\"\n[store]\nkind = \"memory\"\npath = \"/tmp\"\n",
        "region = \"us-east\"\n[store]\nkind = \"redis\"\n",
        "region = \"us-east\"\n[store]\n",
        "region = \"us-east\"\n[[resolvers]]\nprefix = \"a\"\npolicy = \"lww\"\nweight = 1\n",
        "region = \"us-east\"\n[[resolvers]]\nprefix = \"a\"\npolicy = \"newest\"\n",
        "region = \"us-east\"\nnode = -1\n",
        "node = 1\n",
        "region = \"US-East\"\n",
        "region = \"\"\n",
        "region = \"1east\"\n",
        "region = \"us_east\"\n",
        "region = \"us east\"\n",
        "region = \"abcdefghijklmnopqrstuvwxyz0123456\"\n",
        "not toml at all [",
    ];
    for text in rejected {
        match RegionConfig::from_toml_str(text) {
            Err(RegionError::Config(_)) => {}
            other => panic!("accepted {text:?}: {other:?}"),
        }
    }
    assert!(RegionConfig::from_toml_str("region = \"abcdefghijklmnopqrstuvwxyz012345\"\n").is_ok());
    for name in ["US", "", "-a", "9a", "a.b", "é"] {
        assert!(
            matches!(RegionId::new(name), Err(RegionError::Config(_))),
            "{name:?}"
        );
        assert!(name.parse::<RegionId>().is_err());
    }
    assert!("a-1".parse::<RegionId>().is_ok());
}

#[test]
fn build_rejects_bad_node_layout_and_resolvers() {
    let layout_store = |c: &RegionConfig| store_for(c);

    // Node numbers: the maximum is fine, one more is not.
    let mut c = config("us-east", "");
    c.node = NODE_MAX;
    assert!(Region::builder(c.clone(), layout_store(&c)).build().is_ok());
    c.node = NODE_MAX + 1;
    assert!(matches!(
        Region::builder(c.clone(), layout_store(&c)).build(),
        Err(RegionError::Config(_))
    ));
    // Node numbers of one region make distinct actors; regions with equal nodes too.
    let mut n1 = config("us-east", "");
    n1.node = 1;
    let mut n2 = n1.clone();
    n2.node = 2;
    let other = config("eu-west", "");
    let mut other1 = other.clone();
    other1.node = 1;
    let actors: BTreeSet<_> = [&n1, &n2, &other1]
        .iter()
        .map(|c| c.actor().unwrap())
        .collect();
    assert_eq!(actors.len(), 3);

    // A store laid out differently from the configuration.
    let c = config("us-east", "");
    for layout in [
        Layout::default(),
        Layout::new(8, 8, c.layout.value_bytes_max, c.layout.feed_entries_max).unwrap(),
        Layout::new(8, 4, 1024, c.layout.feed_entries_max).unwrap(),
        Layout::new(8, 4, c.layout.value_bytes_max, 10).unwrap(),
    ] {
        let store = Arc::new(MemoryBackend::new(layout));
        assert!(matches!(
            Region::builder(c.clone(), store).build(),
            Err(RegionError::Config(_))
        ));
    }
    // An invalid layout.
    let mut bad = config("us-east", "");
    bad.layout.partitions = 0;
    assert!(
        Region::builder(bad, Arc::new(MemoryBackend::new(Layout::default())))
            .build()
            .is_err()
    );

    // Duplicate or empty resolver prefixes.
    for extra in [
        "[[resolvers]]\nprefix = \"doc:\"\npolicy = \"lww\"\n\
         [[resolvers]]\nprefix = \"doc:\"\npolicy = \"keep-siblings\"\n",
        "[[resolvers]]\nprefix = \"\"\npolicy = \"lww\"\n",
    ] {
        let c = config("us-east", extra);
        assert!(matches!(
            Region::builder(c.clone(), layout_store(&c)).build(),
            Err(RegionError::Config(_))
        ));
    }
    // Two custom resolvers for one prefix.
    let c = config("us-east", "");
    let result = Region::builder(c.clone(), layout_store(&c))
        .resolver_fn("x:", "first", |_, _| Vec::new())
        .resolver_fn("x:", "second", |_, _| Vec::new())
        .build();
    assert!(matches!(result, Err(RegionError::Config(_))));
}

// ---------------------------------------------------------------------------------------------
// Hybrid logical clock
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn write_timestamps_increase_even_when_the_clock_goes_back() {
    let clock = ManualClock::new(10_000);
    let r = region(config("us-east", ""), &clock);
    let mut hlcs = Vec::new();
    hlcs.push(r.put("k", "1").await.unwrap().hlc);
    assert_eq!(hlcs[0], Hlc::new(10_000, 0));
    clock.set(9_000);
    hlcs.push(r.put("k", "2").await.unwrap().hlc);
    hlcs.push(r.merge_crdt("c", CounterOp::inc(1)).await.unwrap().hlc);
    clock.set(3_000);
    for receipt in r
        .merge_batch(vec![("c", CounterOp::inc(1)), ("d", CounterOp::inc(1))])
        .await
        .unwrap()
    {
        hlcs.push(receipt.unwrap().hlc);
    }
    hlcs.push(r.delete("k").await.unwrap().hlc);
    hlcs.push(
        applied(
            r.compare_and_set("e", Expect::Absent, CounterOp::inc(1))
                .await
                .unwrap(),
        )
        .hlc,
    );
    hlcs.push(r.now());
    clock.set(10_000);
    hlcs.push(r.put("k", "3").await.unwrap().hlc);
    clock.set(10_001);
    hlcs.push(r.put("k", "4").await.unwrap().hlc);
    assert!(
        hlcs.windows(2).all(|w| w[0] < w[1]),
        "timestamps not strictly increasing: {hlcs:?}"
    );
    // Behind the clock, timestamps stay on the greatest physical time seen.
    assert!(hlcs[..hlcs.len() - 1]
        .iter()
        .all(|h| h.physical_ms() == 10_000));
    assert_eq!(*hlcs.last().unwrap(), Hlc::new(10_001, 0));
    // Each put replaced the value it saw: the last one is shown.
    assert_eq!(r.get("k").await.unwrap(), one("4"));
}

#[tokio::test]
async fn observe_refuses_timestamps_too_far_ahead() {
    let clock = ManualClock::new(10_000);
    let r = region(
        config("us-east", "[limits]\nclock_forward_ms_max = 1000\n"),
        &clock,
    );
    let before = r.now();

    let too_far = Hlc::new(11_001, 0);
    match r.observe(too_far) {
        Err(RegionError::Crdt(geostate_crdt::Error::ClockAhead {
            remote,
            max_forward_ms,
            ..
        })) => assert_eq!((remote, max_forward_ms), (too_far, 1000)),
        other => panic!("expected the timestamp to be refused, got {other:?}"),
    }
    // The refused timestamp left the clock alone.
    let after = r.put("k", "v").await.unwrap().hlc;
    assert!(after > before && after < too_far, "{after}");

    // Within the bound: accepted, and later local timestamps exceed it.
    let near = Hlc::new(11_000, 5);
    let observed = r.observe(near).unwrap();
    assert!(observed > near);
    let later = r.put("k", "w").await.unwrap().hlc;
    assert!(later > observed && later > near, "{later}");
    assert!(r.merge_crdt("c", CounterOp::inc(1)).await.unwrap().hlc > later);
    assert!(r.now() > near);
    // A timestamp from the past is always accepted and does not move the clock back.
    let past = r.observe(Hlc::new(1, 0)).unwrap();
    assert!(past > later);

    // Once physical time catches up, the bound moves with it.
    clock.set(20_000);
    assert!(r.observe(Hlc::new(21_000, 0)).is_ok());
    assert!(r.observe(Hlc::new(21_002, 0)).is_err());
}
