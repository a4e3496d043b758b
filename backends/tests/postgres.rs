//! The PostgreSQL region store against real servers.
//!
//! Needs PostgreSQL answering at `GEOSTATE_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`; `scripts/ensure-postgres` sets that up). Every
//! backend gets its own schema, and the schemas a test created are dropped when it ends (also
//! when it fails). Tests never skip: without a server they fail and say why.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use geostate_backends::postgres::{PostgresBackend, PostgresConfig, ReadPolicy, SslMode};
use geostate_backends::{
    suite, BackendError, Expect, FeedEntry, Key, Layout, LocalWrite, PartitionDigest, StateBackend,
    Stored, TombstonePage,
};
use geostate_crdt::{ActorId, CounterOp, Crdt, Hlc, Op, SetOp, TypeTag};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn server_url() -> String {
    std::env::var("GEOSTATE_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_string())
}

/// Runs `f` on a fresh current-thread runtime in its own thread (usable from `Drop`, even
/// while a test's runtime is shutting down or unwinding).
fn blocking<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(f)
    })
    .join()
    .unwrap_or_else(|_| panic!("the helper thread panicked"))
}

/// The schemas one test creates; dropped (and only they) when the test ends.
struct Schemas {
    url: String,
    tag: &'static str,
    next: AtomicU64,
    created: Mutex<Vec<String>>,
}

impl Schemas {
    fn new(tag: &'static str) -> Arc<Self> {
        Arc::new(Self {
            url: server_url(),
            tag,
            next: AtomicU64::new(0),
            created: Mutex::new(Vec::new()),
        })
    }

    /// A fresh schema name, registered for dropping before anything is created under it.
    fn fresh(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let name = format!("gs_test_{}_{}_{n}", std::process::id(), self.tag);
        self.created.lock().unwrap().push(name.clone());
        name
    }

    fn config(&self, schema: String, layout: Layout) -> PostgresConfig {
        let mut config = PostgresConfig::new(self.url.clone());
        config.schema = schema;
        config.layout = layout;
        config.primary_pool_max = 20;
        config.rng_seed = Some(0x9e05_7a7e);
        config.application_name = format!("geostate-test-{}", self.tag);
        // The full conformance suite checks semantics, not crash durability: its commits need
        // not wait for the disk, whose ~1.5 ms flush here would bound each hot key to a few
        // hundred writes a second (the suite makes 16,000 to one key, twice). Every other test
        // here, the small-layout cases included, commits durably (the default).
        config.synchronous_commit = true;
        config
    }

    async fn backend(&self, layout: Layout, durable: bool) -> PostgresBackend {
        let mut config = self.config(self.fresh(), layout);
        config.synchronous_commit = durable;
        PostgresBackend::connect(config).await.unwrap_or_else(|e| {
            panic!(
                "cannot open a PostgreSQL backend at {}: {e}; run scripts/ensure-postgres",
                self.url
            )
        })
    }
}

impl Drop for Schemas {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.created.lock().unwrap_or_else(|e| e.into_inner()));
        if names.is_empty() {
            return;
        }
        let url = self.url.clone();
        // Never panics: this may run while a failed test unwinds.
        blocking(async move {
            use sqlx::Connection;
            let mut conn = match sqlx::PgConnection::connect(&url).await {
                Ok(conn) => conn,
                Err(e) => return eprintln!("cannot drop the test schemas {names:?}: {e}"),
            };
            for name in names {
                let drop = format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE");
                if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(drop))
                    .execute(&mut conn)
                    .await
                {
                    eprintln!("cannot drop the test schema {name}: {e}");
                }
            }
            let _ = conn.close().await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_backend_passes_the_suite() {
    let schemas = Schemas::new("suite");
    let started = std::time::Instant::now();
    suite::test_all(|| schemas.backend(Layout::default(), false)).await;
    println!("suite::test_all took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_backend_passes_the_small_layout_cases() {
    let schemas = Schemas::new("small");
    // With durable commits, the server's default: these cases are cheap enough.
    suite::test_small_layout(|| schemas.backend(suite::small_layout(), true)).await;
}
// ---------------------------------------------------------------------------------------------
// Helpers for the tests below
// ---------------------------------------------------------------------------------------------

fn key(name: &str) -> Key {
    Key::new(name).expect("a valid key")
}

/// An increment of `n` by `actor`; `tag` goes into the HLC's logical part so the feed shows
/// who wrote each entry.
fn inc(k: &Key, n: u64, actor: u64, tag: u32, i: u64) -> LocalWrite {
    LocalWrite {
        key: k.clone(),
        op: Op::from(CounterOp::inc(n)),
        actor: ActorId::new(actor),
        hlc: Hlc::new(1_700_000_000_000 + i, tag),
        expect: Expect::Any,
    }
}

fn counter(value: &Crdt) -> i128 {
    match value {
        Crdt::PnCounter(c) => c.value(),
        other => panic!("expected a counter, found a {}", other.type_tag()),
    }
}

async fn counter_of<B: StateBackend>(b: &B, k: &Key) -> i128 {
    match b.get(k).await {
        Ok(Some(stored)) => counter(&stored.value),
        other => panic!("get({k}): {other:?}"),
    }
}

fn assert_corrupt<T: std::fmt::Debug>(result: &Result<T, BackendError>, k: &Key, what: &str) {
    match result {
        Err(BackendError::Corrupt { key, .. }) if key == k.as_str() => {}
        other => panic!("{what}: expected Corrupt for {k}, got {other:?}"),
    }
}

/// Runs one statement with the `psql` client; returns its unaligned output.
fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .arg(url)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
        .output()
        .unwrap_or_else(|e| panic!("cannot run psql ({e}); run scripts/ensure-postgres"));
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every entry of a partition's feed, checking that sequence numbers are contiguous.
async fn whole_feed<B: StateBackend>(b: &B, partition: u16) -> Vec<FeedEntry> {
    let mut out: Vec<FeedEntry> = Vec::new();
    let mut after = 0;
    loop {
        let page = b.read_feed(partition, after, 1_000).await.unwrap();
        let Some(last) = page.entries.last() else {
            break;
        };
        after = last.seq;
        for e in page.entries {
            if let Some(previous) = out.last() {
                assert_eq!(e.seq, previous.seq + 1, "feed seqs are contiguous");
            }
            out.push(e);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Opening a store
// ---------------------------------------------------------------------------------------------

/// A schema keeps the partition and bucket counts it was created with; schema names and
/// unreachable servers are reported as such; opening a schema again is idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_keeps_its_layout_and_bad_configs_are_refused() {
    let schemas = Schemas::new("open");
    let schema = schemas.fresh();
    let first = PostgresBackend::connect(schemas.config(schema.clone(), Layout::default()))
        .await
        .unwrap();
    let k = key("open:k");
    first.apply(inc(&k, 5, 1, 0, 0)).await.unwrap();
    let again = PostgresBackend::connect(schemas.config(schema.clone(), Layout::default()))
        .await
        .expect("opening a schema again (migrations already applied)");
    assert_eq!(counter_of(&again, &k).await, 5);
    let other_layout = Layout::new(8, 4, 1 << 20, 100).unwrap();
    match PostgresBackend::connect(schemas.config(schema.clone(), other_layout)).await {
        Err(BackendError::InvalidArgument(message)) => {
            assert!(message.contains("256 partitions"), "{message}")
        }
        other => panic!("another layout on the same schema: {other:?}"),
    }
    for bad in [
        "Bad",
        "pg_x",
        "a-b",
        "",
        "1abc",
        "x\"; DROP SCHEMA public; --",
    ] {
        let result = PostgresBackend::connect(schemas.config(bad.to_string(), Layout::default()));
        assert!(
            matches!(result.await, Err(BackendError::InvalidArgument(_))),
            "schema name {bad:?} must be refused"
        );
    }
    let mut unreachable = schemas.config(schemas.fresh(), Layout::default());
    unreachable.primary_url = "postgres://postgres@127.0.0.1:1/test".into();
    assert!(matches!(
        PostgresBackend::connect(unreachable).await,
        Err(BackendError::Unavailable(_))
    ));
    let debug = format!("{:?}", {
        let mut c = schemas.config("x".into(), Layout::default());
        c.primary_url = "postgres://u:secret@h/db".into();
        c
    });
    assert!(!debug.contains("secret"), "Debug hides passwords: {debug}");
}

// ---------------------------------------------------------------------------------------------
// Corruption written behind the store's back
// ---------------------------------------------------------------------------------------------

/// Bytes changed with `psql` (garbage, and one flipped bit inside a valid envelope) read as
/// `Corrupt` from every read path, make every write of the key fail with `Corrupt` (plain,
/// no-op, deletion, compare-and-set, merge, batch items), and are never overwritten, merged or
/// fed: the bytes, the version, the partition's feed and digest stay as they were. A physical
/// delete repairs the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_bytes_written_by_psql_are_reported_and_left_alone() {
    let schemas = Schemas::new("corrupt");
    let schema = schemas.fresh();
    let mut config = schemas.config(schema.clone(), Layout::default());
    config.synchronous_commit = true;
    let b = PostgresBackend::connect(config).await.unwrap();
    let layout = b.layout().clone();
    let good = key("psql:good");
    // Victims live in other partitions than the good key, whose writes must not disturb them.
    let victims: Vec<Key> = (0..100)
        .map(|i| key(&format!("psql:victim:{i}")))
        .filter(|k| layout.partition_of(k) != layout.partition_of(&good))
        .take(2)
        .collect();
    for k in victims.iter().chain([&good]) {
        for i in 0..3 {
            b.apply(inc(k, 1, 1, 0, i)).await.unwrap();
        }
    }
    let url = server_url();
    let table = format!("\"{schema}\".gs_values");
    psql(
        &url,
        &format!(
            "UPDATE {table} SET envelope = '\\x00deadbeef'::bytea WHERE key = '{}'",
            victims[0]
        ),
    );
    // Byte 13 is inside the payload (the header is 11 bytes): the checksum catches the flip.
    psql(
        &url,
        &format!(
            "UPDATE {table} SET envelope = set_byte(envelope, 13, get_byte(envelope, 13) # 16) \
             WHERE key = '{}'",
            victims[1]
        ),
    );
    let remote = Crdt::empty(TypeTag::PnCounter)
        .apply(
            ActorId::new(9),
            Hlc::new(1, 0),
            &Op::from(CounterOp::inc(1)),
        )
        .unwrap();
    for k in &victims {
        let p = layout.partition_of(k);
        let row = |url: &str| {
            psql(
                url,
                &format!("SELECT encode(envelope, 'hex') || ' ' || version FROM {table} WHERE key = '{k}'"),
            )
        };
        let bytes_before = row(&url);
        let feed_before = b.read_feed(p, 0, 1).await.unwrap();
        let digest_before = b.digest(p).await.unwrap();

        assert_corrupt(&b.get(k).await, k, "get");
        let many = b.get_many(&[good.clone(), k.clone()]).await.unwrap();
        assert!(matches!(many[0], Ok(Some(_))), "get_many of the good key");
        assert_corrupt(&many[1], k, "get_many");
        let page = b.scan("psql:", None, 100).await.unwrap();
        for item in &page.items {
            if &item.key == k {
                assert_corrupt(&item.value, k, "scan");
            } else if item.key == good {
                assert!(item.value.is_ok(), "scan of the good key");
            }
        }
        assert_corrupt(&b.apply(inc(k, 1, 1, 0, 10)).await, k, "apply");
        let mut deletion = inc(k, 1, 1, 0, 11);
        deletion.op = Op::Delete;
        assert_corrupt(&b.apply(deletion).await, k, "a deletion");
        let mut cas = inc(k, 1, 1, 0, 12);
        cas.expect = Expect::Version(3);
        assert_corrupt(&b.apply(cas).await, k, "a compare-and-set");
        assert_corrupt(&b.merge(k, &remote).await, k, "merge");
        let results = b
            .apply_many(vec![inc(&good, 1, 1, 0, 13), inc(k, 1, 1, 0, 13)])
            .await
            .unwrap();
        assert!(results[0].is_ok(), "apply_many of the good key");
        assert_corrupt(&results[1], k, "apply_many");
        let results = b
            .merge_many(&[(k.clone(), remote.clone()), (good.clone(), remote.clone())])
            .await
            .unwrap();
        assert_corrupt(&results[0], k, "merge_many");
        assert!(results[1].is_ok(), "merge_many of the good key");

        assert_eq!(
            row(&url),
            bytes_before,
            "{k}: the bytes and version are untouched"
        );
        let feed_after = b.read_feed(p, 0, 1).await.unwrap();
        assert_eq!(
            (feed_after.first_seq, feed_after.last_seq),
            (feed_before.first_seq, feed_before.last_seq),
            "{k}: nothing was fed"
        );
        assert_eq!(
            b.digest(p).await.unwrap(),
            digest_before,
            "{k}: digest untouched"
        );
    }
    // A physical delete repairs the key; it can then be written afresh.
    for k in &victims {
        assert!(b.delete(k).await.unwrap());
        let mut fresh = inc(k, 4, 2, 0, 20);
        fresh.expect = Expect::Absent;
        b.apply(fresh).await.unwrap();
        assert_eq!(counter_of(&b, k).await, 4);
        assert!(b
            .verify_digest(layout.partition_of(k))
            .await
            .unwrap()
            .is_empty());
    }
}

/// Writers and a garbage collector on two stores opened on one schema (two connection pools,
/// as two processes have): no acknowledged write is lost nor any dot minted twice (see
/// `suite::purge_race`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purges_race_the_writes_of_another_store() {
    let schemas = Schemas::new("gcrace");
    let config = schemas.config(schemas.fresh(), Layout::default());
    let a = Arc::new(PostgresBackend::connect(config.clone()).await.unwrap());
    let b = Arc::new(PostgresBackend::connect(config).await.unwrap());
    suite::purge_race(Arc::clone(&a), Arc::clone(&b)).await;
    println!("store a: {:?}; store b: {:?}", a.stats(), b.stats());
}

// ---------------------------------------------------------------------------------------------
// The optimistic write path and its cache
// ---------------------------------------------------------------------------------------------

/// A write of `op` to `k` by `actor`.
fn write_op(k: &Key, op: impl Into<Op>, actor: u64, i: u64) -> LocalWrite {
    LocalWrite {
        key: k.clone(),
        op: op.into(),
        actor: ActorId::new(actor),
        hlc: Hlc::new(1_700_000_000_000 + i, 0),
        expect: Expect::Any,
    }
}

fn set_of(value: &Crdt) -> BTreeSet<Vec<u8>> {
    match value {
        Crdt::OrSet(set) => set.iter().cloned().collect(),
        other => panic!("expected a set, found a {}", other.type_tag()),
    }
}

/// The first `n` keys named `prefix<i>` that fall in `partition`.
fn keys_in(layout: &Layout, partition: u16, prefix: &str, n: usize) -> Vec<Key> {
    (0u64..)
        .map(|i| key(&format!("{prefix}{i}")))
        .filter(|k| layout.partition_of(k) == partition)
        .take(n)
        .collect()
}

/// For every key of the feed of `partition`, the counters `actor` reached in the contexts of
/// its deltas, in feed order: a key's writes are serialised, so these climb strictly if no
/// dot was minted twice.
async fn minted_per_key(
    b: &PostgresBackend,
    partition: u16,
    actor: u64,
) -> BTreeMap<Key, Vec<u64>> {
    let mut out: BTreeMap<Key, Vec<u64>> = BTreeMap::new();
    for e in whole_feed(b, partition).await {
        let top = e.delta.context().maxima().get(ActorId::new(actor));
        out.entry(e.key.clone()).or_default().push(top);
    }
    out
}

/// Two stores on one schema (two connection pools and two write caches, as two processes
/// have), four tasks each, write the same few keys at the same time as ONE actor: counters and
/// sets on keys of one partition. Nothing is lost (counter sums exact, every add present), the
/// feed holds one entry per write with contiguous sequence numbers, replaying it rebuilds every
/// value, and no dot was minted twice (each key's deltas climb strictly). The stores' caches
/// went stale under one another, which the version condition caught: races were counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_sharing_an_actor_lose_nothing_and_mint_each_dot_once() {
    const TASKS_PER_STORE: u64 = 4;
    const WRITES: u64 = 150;
    const ACTOR: u64 = 5;
    let schemas = Schemas::new("optim");
    let config = schemas.config(schemas.fresh(), Layout::default());
    let a = Arc::new(PostgresBackend::connect(config.clone()).await.unwrap());
    let b = Arc::new(PostgresBackend::connect(config).await.unwrap());
    let p = 7;
    let keys = Arc::new(keys_in(a.layout(), p, "optim:", 4));
    let tasks: Vec<_> = (0..2 * TASKS_PER_STORE)
        .map(|t| {
            let store = Arc::clone(if t % 2 == 0 { &a } else { &b });
            let keys = Arc::clone(&keys);
            tokio::spawn(async move {
                let mut added = Vec::new();
                let mut incremented = [0u64; 2];
                for i in 0..WRITES {
                    let which = ((i + t) % 4) as usize;
                    let k = &keys[which];
                    if which < 2 {
                        let n = 1 + (i % 3);
                        store
                            .apply(write_op(k, CounterOp::inc(n), ACTOR, i))
                            .await
                            .unwrap_or_else(|e| panic!("task {t}, write {i} to {k}: {e}"));
                        incremented[which] += n;
                    } else {
                        let element = format!("t{t}-{i}").into_bytes();
                        store
                            .apply(write_op(k, SetOp::add(element.clone()), ACTOR, i))
                            .await
                            .unwrap_or_else(|e| panic!("task {t}, write {i} to {k}: {e}"));
                        added.push((which, element));
                    }
                }
                (incremented, added)
            })
        })
        .collect();
    let mut totals = [0u64; 2];
    let mut adds: BTreeMap<usize, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for task in tasks {
        let (incremented, added) = task.await.unwrap();
        totals[0] += incremented[0];
        totals[1] += incremented[1];
        for (which, element) in added {
            adds.entry(which).or_default().insert(element);
        }
    }
    for (which, total) in totals.iter().enumerate() {
        assert_eq!(
            counter_of(&*a, &keys[which]).await,
            i128::from(*total),
            "counter {} lost updates",
            keys[which]
        );
        assert_eq!(counter_of(&*b, &keys[which]).await, i128::from(*total));
    }
    for (which, elements) in &adds {
        let value = a.get(&keys[*which]).await.unwrap().unwrap().value;
        assert_eq!(&set_of(&value), elements, "set {} lost adds", keys[*which]);
    }
    let feed = whole_feed(&*a, p).await;
    assert_eq!(
        feed.len() as u64,
        2 * TASKS_PER_STORE * WRITES,
        "one entry per write"
    );
    let mut replay: BTreeMap<Key, Crdt> = BTreeMap::new();
    for e in &feed {
        let value = replay
            .entry(e.key.clone())
            .or_insert_with(|| Crdt::empty(e.delta.type_tag()));
        value.merge(&e.delta).unwrap();
    }
    for k in keys.iter() {
        assert_eq!(
            replay.get(k),
            Some(&a.get(k).await.unwrap().unwrap().value),
            "{k}"
        );
    }
    for (k, minted) in minted_per_key(&a, p, ACTOR).await {
        assert!(
            minted.windows(2).all(|w| w[0] < w[1]),
            "{k}: a dot was minted twice: {minted:?}"
        );
    }
    assert!(a.verify_digest(p).await.unwrap().is_empty());
    let (sa, sb) = (a.stats(), b.stats());
    println!("store a: {sa:?}\nstore b: {sb:?}");
    assert!(
        sa.races + sb.races > 0,
        "the two stores never raced: the stale-cache path was not exercised"
    );
    assert!(sa.optimistic_commits > 0 && sb.optimistic_commits > 0);
}

/// A store's cached entry goes stale when another store writes the key: its next write is
/// retried from a fresh read (one race counted), and nothing computed from the stale entry is
/// answered without that read: a compare-and-set against the stale version fails with the
/// current version, one against the current version succeeds, and removing an element that
/// only the other store added removes it (not a no-op computed from the stale set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cache_entry_is_detected_and_retried() {
    let schemas = Schemas::new("stale");
    let config = schemas.config(schemas.fresh(), Layout::default());
    let a = PostgresBackend::connect(config.clone()).await.unwrap();
    let b = PostgresBackend::connect(config).await.unwrap();
    let k = key("stale:counter");
    let first = a.apply(inc(&k, 1, 1, 0, 0)).await.unwrap();
    let second = a.apply(inc(&k, 1, 1, 0, 1)).await.unwrap();
    let before = a.stats();
    assert_eq!(before.races, 0);
    assert!(before.optimistic_commits >= 1, "{before:?}");
    assert!(
        before.write_cache.hits >= 1,
        "the second write used the cache: {before:?}"
    );
    let other = b.apply(inc(&k, 10, 2, 0, 2)).await.unwrap();
    assert!(other.version > second.version && second.version > first.version);
    let third = a.apply(inc(&k, 1, 1, 0, 3)).await.unwrap();
    let after = a.stats();
    assert_eq!(after.races, before.races + 1, "{after:?}");
    assert!(third.version > other.version);
    assert_eq!(counter_of(&a, &k).await, 13);

    // Compare-and-set against a stale cached version.
    let fourth = b.apply(inc(&k, 1, 2, 0, 4)).await.unwrap();
    let mut stale = inc(&k, 1, 1, 0, 5);
    stale.expect = Expect::Version(third.version);
    match a.apply(stale).await {
        Err(BackendError::VersionConflict { actual, .. }) => {
            assert_eq!(actual, Some(fourth.version));
        }
        other => panic!("a compare-and-set on a stale version: {other:?}"),
    }
    let mut current = inc(&k, 1, 1, 0, 6);
    current.expect = Expect::Version(fourth.version);
    a.apply(current).await.unwrap();
    assert_eq!(counter_of(&a, &k).await, 15);

    // A removal that is a no-op on the stale cached set is not one on the stored set.
    let s = key("stale:set");
    a.apply(write_op(&s, SetOp::add("x"), 1, 7)).await.unwrap();
    b.apply(write_op(&s, SetOp::add("y"), 2, 8)).await.unwrap();
    let removed = a
        .apply(write_op(&s, SetOp::remove("y"), 1, 9))
        .await
        .unwrap();
    assert!(removed.seq.is_some(), "the removal of y was written");
    let value = b.get(&s).await.unwrap().unwrap().value;
    assert_eq!(set_of(&value), BTreeSet::from([b"x".to_vec()]));
    let p = a.layout().partition_of(&s);
    assert!(a.verify_digest(p).await.unwrap().is_empty());
    println!("store a: {:?}", a.stats());
}

/// Another store deletes or purges a key that this store has cached, or purges another key of
/// the same partition (raising the dot floor this store's cached write was computed with): the
/// cached write changes nothing, is retried from a fresh read, and mints dots above the floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removals_by_another_store_invalidate_cached_writes() {
    const ACTOR: u64 = 3;
    let schemas = Schemas::new("purged");
    let config = schemas.config(schemas.fresh(), Layout::default());
    let a = PostgresBackend::connect(config.clone()).await.unwrap();
    let b = PostgresBackend::connect(config).await.unwrap();
    let p = 11;
    let ks = keys_in(a.layout(), p, "purged:", 3);
    let (k, other) = (&ks[0], &ks[1]);

    // A purge of the cached key itself.
    for i in 0..3 {
        a.apply(write_op(k, CounterOp::inc(1), ACTOR, i))
            .await
            .unwrap();
    }
    let deleted = b.apply(write_op(k, Op::Delete, ACTOR, 3)).await.unwrap();
    assert!(
        b.purge(k, deleted.version).await.unwrap(),
        "the tombstone was purged"
    );
    let floor = b.dot_floor(p).await.unwrap().get(ActorId::new(ACTOR));
    assert!(floor >= 3, "the floor covers the purged dots ({floor})");
    let races = a.stats().races;
    let after = a
        .apply(write_op(k, CounterOp::inc(5), ACTOR, 4))
        .await
        .unwrap();
    assert!(a.stats().races > races, "the stale entry cost a race");
    assert!(
        after.delta.context().maxima().get(ActorId::new(ACTOR)) > floor,
        "the write after the purge mints above the floor"
    );
    assert_eq!(counter_of(&a, k).await, 5);

    // A physical delete of the cached key.
    a.apply(write_op(k, CounterOp::inc(1), ACTOR, 5))
        .await
        .unwrap();
    assert!(b.delete(k).await.unwrap());
    let floor = b.dot_floor(p).await.unwrap().get(ActorId::new(ACTOR));
    let after = a
        .apply(write_op(k, CounterOp::inc(2), ACTOR, 6))
        .await
        .unwrap();
    assert!(after.delta.context().maxima().get(ActorId::new(ACTOR)) > floor);
    assert_eq!(counter_of(&a, k).await, 2);

    // A purge of another key of the partition raises the floor above what the cached entry
    // of `k` was read with: the write is computed again with the new floor (lifted).
    a.apply(write_op(k, CounterOp::inc(1), ACTOR, 7))
        .await
        .unwrap();
    let mut top = 0;
    for i in 0..20 {
        let r = b
            .apply(write_op(other, CounterOp::inc(1), ACTOR, 8 + i))
            .await
            .unwrap();
        top = r.delta.context().maxima().get(ActorId::new(ACTOR));
    }
    let deleted = b
        .apply(write_op(other, Op::Delete, ACTOR, 30))
        .await
        .unwrap();
    assert!(b.purge(other, deleted.version).await.unwrap());
    let floor = b.dot_floor(p).await.unwrap().get(ActorId::new(ACTOR));
    assert!(floor >= top && floor > 4, "floor {floor}, top {top}");
    let races = a.stats().races;
    let lifted = a
        .apply(write_op(k, CounterOp::inc(1), ACTOR, 31))
        .await
        .unwrap();
    assert!(a.stats().races > races, "the epoch change cost a race");
    assert!(
        lifted.delta.context().maxima().get(ActorId::new(ACTOR)) > floor,
        "computed with the raised floor"
    );
    assert_eq!(counter_of(&a, k).await, 4);
    assert!(a.verify_digest(p).await.unwrap().is_empty());
    println!("store a: {:?}; store b: {:?}", a.stats(), b.stats());
}

/// The write cache keeps at most its configured entries and bytes, forgetting the least
/// recently used; evicted keys are simply read again (values stay exact), and a cache of 0
/// entries disables it without changing any result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_cache_is_bounded() {
    let schemas = Schemas::new("bound");
    let mut config = schemas.config(schemas.fresh(), Layout::default());
    config.write_cache_entries = 8;
    let a = PostgresBackend::connect(config.clone()).await.unwrap();
    let ks: Vec<Key> = (0..50).map(|i| key(&format!("bound:{i}"))).collect();
    for round in 0..2 {
        for (i, k) in ks.iter().enumerate() {
            a.apply(inc(k, 1, 1, 0, (round * 50 + i) as u64))
                .await
                .unwrap();
            let cache = a.stats().write_cache;
            assert!(cache.entries <= 8, "{cache:?}");
        }
    }
    let stats = a.stats();
    assert!(stats.write_cache.evictions >= 90, "{stats:?}");
    for k in &ks {
        assert_eq!(counter_of(&a, k).await, 2);
    }

    // A byte bound: values of about 2 KiB, a budget of about three of them.
    let mut config = schemas.config(schemas.fresh(), Layout::default());
    config.write_cache_bytes = 3 * (2 * 2_200 + 200);
    let b = PostgresBackend::connect(config.clone()).await.unwrap();
    for (i, k) in ks.iter().take(20).enumerate() {
        let element = vec![b'a' + (i % 26) as u8; 2_000];
        b.apply(write_op(k, SetOp::add(element), 1, i as u64))
            .await
            .unwrap();
        let cache = b.stats().write_cache;
        assert!(
            cache.bytes as usize <= config.write_cache_bytes,
            "{cache:?}"
        );
        assert!(cache.entries <= 3, "{cache:?}");
    }
    assert!(b.stats().write_cache.entries >= 1);

    // No cache: every write reads first; same results.
    let mut config = schemas.config(schemas.fresh(), Layout::default());
    config.write_cache_entries = 0;
    let c = PostgresBackend::connect(config).await.unwrap();
    for i in 0..5 {
        c.apply(inc(&ks[0], 2, 1, 0, i)).await.unwrap();
    }
    assert_eq!(counter_of(&c, &ks[0]).await, 10);
    let stats = c.stats();
    assert_eq!(stats.write_cache.entries, 0);
    assert_eq!(stats.write_cache.hits, 0);
    assert_eq!(stats.optimistic_commits, 5, "{stats:?}");
}

/// Batches of writes to cached keys go in one statement per wave of distinct keys: each item
/// gets its own version and, in item order, its partition's next feed sequence number. Items
/// whose key another store changed, or whose partition's floor moved (a purge), are left out
/// of that statement and written one by one: nothing is lost, the feed replays to the values
/// and the digests stay right. Remote merges batch the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_cached_keys_are_one_statement_and_races_are_redone() {
    const ACTOR: u64 = 4;
    let schemas = Schemas::new("batch");
    let config = schemas.config(schemas.fresh(), Layout::default());
    let a = PostgresBackend::connect(config.clone()).await.unwrap();
    let b = PostgresBackend::connect(config).await.unwrap();
    let p = 13;
    let ks = keys_in(a.layout(), p, "batch:", 12);
    let (keys, victim) = (&ks[..10], &ks[10]);
    let batch = |round: u64| -> Vec<LocalWrite> {
        // Every key twice: two waves of distinct keys.
        (0..20u64)
            .map(|i| {
                write_op(
                    &keys[(i % 10) as usize],
                    CounterOp::inc(1),
                    ACTOR,
                    round * 100 + i,
                )
            })
            .collect()
    };
    let check_ok = |results: Vec<Result<geostate_backends::Receipt, BackendError>>| {
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("a batch item failed: {e}")))
            .collect::<Vec<_>>()
    };
    // Absent keys: written one by one (and cached).
    check_ok(a.apply_many(batch(0)).await.unwrap());
    // Cached: one statement per wave, sequence numbers in item order.
    let before = a.stats();
    let receipts = check_ok(a.apply_many(batch(1)).await.unwrap());
    let after = a.stats();
    assert_eq!(
        after.optimistic_commits - before.optimistic_commits,
        20,
        "{after:?}"
    );
    assert_eq!(after.races, before.races);
    let seqs: Vec<u64> = receipts.iter().map(|r| r.seq.unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] + 1 == w[1]),
        "seqs in item order: {seqs:?}"
    );
    let versions: Vec<u64> = receipts.iter().map(|r| r.version).collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions: {versions:?}"
    );

    // Another store writes one key and purges another key of the partition: the purge moves
    // the floor epoch every cached entry of the partition was read with, so the whole wave
    // loses its race and is redone one by one.
    b.apply(write_op(&keys[3], CounterOp::inc(10), ACTOR, 500))
        .await
        .unwrap();
    b.apply(write_op(victim, CounterOp::inc(1), ACTOR, 501))
        .await
        .unwrap();
    let deleted = b
        .apply(write_op(victim, Op::Delete, ACTOR, 502))
        .await
        .unwrap();
    assert!(b.purge(victim, deleted.version).await.unwrap());
    let before = a.stats();
    check_ok(a.apply_many(batch(2)).await.unwrap());
    let after = a.stats();
    assert!(after.races >= before.races + 10, "{before:?} -> {after:?}");
    // Now cached again, and only one key goes stale.
    b.apply(write_op(&keys[7], CounterOp::inc(10), ACTOR, 600))
        .await
        .unwrap();
    let before = a.stats();
    check_ok(a.apply_many(batch(3)).await.unwrap());
    let after = a.stats();
    assert_eq!(after.races, before.races + 1, "{before:?} -> {after:?}");

    for (i, k) in keys.iter().enumerate() {
        let extra = if i == 3 || i == 7 { 10 } else { 0 };
        assert_eq!(counter_of(&a, k).await, 8 + extra, "{k}");
    }
    let feed = whole_feed(&a, p).await;
    let mut replay: BTreeMap<Key, Crdt> = BTreeMap::new();
    for e in &feed {
        replay
            .entry(e.key.clone())
            .or_insert_with(|| Crdt::empty(e.delta.type_tag()))
            .merge(&e.delta)
            .unwrap();
    }
    for k in keys {
        assert_eq!(
            replay.get(k),
            Some(&a.get(k).await.unwrap().unwrap().value),
            "{k}"
        );
    }
    for (k, minted) in minted_per_key(&a, p, ACTOR).await {
        if &k != victim {
            assert!(minted.windows(2).all(|w| w[0] < w[1]), "{k}: {minted:?}");
        }
    }
    assert!(a.verify_digest(p).await.unwrap().is_empty());

    // Remote merges into cached keys: one statement, never fed.
    let last_seq = a.read_feed(p, 0, 1).await.unwrap().last_seq;
    let remote: Vec<(Key, Crdt)> = keys
        .iter()
        .map(|k| {
            let delta = Crdt::empty(TypeTag::PnCounter)
                .apply(
                    ActorId::new(99),
                    Hlc::new(1, 0),
                    &Op::from(CounterOp::inc(100)),
                )
                .unwrap();
            (k.clone(), delta)
        })
        .collect();
    let before = a.stats();
    for r in a.merge_many(&remote).await.unwrap() {
        assert_eq!(r.unwrap().seq, None);
    }
    let after = a.stats();
    assert_eq!(after.optimistic_commits - before.optimistic_commits, 10);
    // Merged twice: idempotent.
    a.merge_many(&remote).await.unwrap();
    for (i, k) in keys.iter().enumerate() {
        let extra = if i == 3 || i == 7 { 10 } else { 0 };
        assert_eq!(counter_of(&a, k).await, 108 + extra, "{k}");
    }
    assert_eq!(a.read_feed(p, 0, 1).await.unwrap().last_seq, last_seq);
    assert!(a.verify_digest(p).await.unwrap().is_empty());
    println!("store a: {:?}", a.stats());
}

/// With `optimistic_attempts_max = 0` every write takes the locking transaction, and the
/// results are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_locking_transaction_alone_still_works() {
    let schemas = Schemas::new("locking");
    let mut config = schemas.config(schemas.fresh(), Layout::default());
    config.retry.optimistic_attempts_max = 0;
    let a = PostgresBackend::connect(config).await.unwrap();
    let k = key("locking:counter");
    for i in 0..10 {
        a.apply(inc(&k, 1, 1, 0, i)).await.unwrap();
    }
    assert_eq!(counter_of(&a, &k).await, 10);
    let stats = a.stats();
    assert_eq!(
        (stats.optimistic_commits, stats.locking_commits),
        (0, 10),
        "{stats:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Schema version 3: value updates that can be HOT
// ---------------------------------------------------------------------------------------------

/// The indexes of `schema`'s `gs_values`: name -> definition.
fn value_indexes(url: &str, schema: &str) -> BTreeMap<String, String> {
    psql(
        url,
        &format!(
            "SELECT indexname || '|' || indexdef FROM pg_indexes \
             WHERE schemaname = '{schema}' AND tablename = 'gs_values' ORDER BY indexname"
        ),
    )
    .lines()
    .map(|line| {
        let (name, def) = line.split_once('|').unwrap();
        (name.to_string(), def.to_string())
    })
    .collect()
}

/// Asserts that `schema`'s `gs_values` has the indexes and page fill of schema version 3.
fn assert_version_3_shape(url: &str, schema: &str) {
    let indexes = value_indexes(url, schema);
    let names: Vec<&str> = indexes.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["gs_values_bucket", "gs_values_pkey", "gs_values_tombstones"],
        "{indexes:?}"
    );
    assert!(
        indexes["gs_values_bucket"].ends_with("USING btree (partition, bucket, key)"),
        "{indexes:?}"
    );
    assert!(
        indexes["gs_values_tombstones"].ends_with("USING btree (partition, key) WHERE tombstone"),
        "{indexes:?}"
    );
    assert!(
        indexes.values().all(|def| !def.contains("INCLUDE")),
        "no index may hold a column that writes change: {indexes:?}"
    );
    let reloptions = psql(
        url,
        &format!(
            "SELECT array_to_string(c.reloptions, ',') FROM pg_class AS c \
             JOIN pg_namespace AS n ON n.oid = c.relnamespace \
             WHERE n.nspname = '{schema}' AND c.relname = 'gs_values'"
        ),
    );
    assert_eq!(reloptions, "fillfactor=80");
    let applied = psql(
        url,
        &format!("SELECT string_agg(version::text, ',' ORDER BY version) FROM \"{schema}\"._sqlx_migrations"),
    );
    assert_eq!(applied, "1,2,3");
}

/// (updates, HOT updates) of `schema`'s `gs_values` once the statistics count `updates`
/// updates at least (the store's connections must be closed: a server process reports its
/// counts when it exits).
async fn value_updates(url: &str, schema: &str, updates: u64) -> (u64, u64) {
    let started = Instant::now();
    loop {
        let row = psql(
            url,
            &format!(
                "SELECT n_tup_upd || ' ' || n_tup_hot_upd FROM pg_stat_user_tables \
                 WHERE schemaname = '{schema}' AND relname = 'gs_values'"
            ),
        );
        let (all, hot) = row.split_once(' ').unwrap();
        let counts: (u64, u64) = (all.parse().unwrap(), hot.parse().unwrap());
        if counts.0 >= updates || started.elapsed() > Duration::from_secs(20) {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A new schema has the indexes of schema version 3 (no `INCLUDE` column, which every write
/// would change) and room on its pages, so writes that do not make or revive a tombstone
/// update their value rows HOT (no index entry written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_updates_are_hot() {
    let schemas = Schemas::new("hot");
    let schema = schemas.fresh();
    let b = PostgresBackend::connect(schemas.config(schema.clone(), Layout::default()))
        .await
        .unwrap();
    assert_version_3_shape(&schemas.url, &schema);
    let keys: Vec<Key> = (0..10).map(|i| key(&format!("hot:{i}"))).collect();
    // The first write of each key inserts its row; the other 4 update it: 40 updates, which
    // fit on the rows' page even if nothing is pruned meanwhile.
    for round in 0..5 {
        for (i, k) in keys.iter().enumerate() {
            b.apply(inc(k, 1, 1, 0, round * 10 + i as u64))
                .await
                .unwrap();
        }
    }
    for k in &keys {
        assert_eq!(counter_of(&b, k).await, 5);
    }
    b.close().await;
    drop(b);
    let (updates, hot) = value_updates(&schemas.url, &schema, 40).await;
    assert_eq!(
        (updates, hot),
        (40, 40),
        "updates of gs_values, HOT among them"
    );
}

/// What a store shows of `keys`: their values, and the digests, bucket entries and
/// tombstones of their partitions and buckets (checking every digest on the way).
type Snapshot = (
    Vec<Option<Stored>>,
    Vec<PartitionDigest>,
    Vec<Vec<(Key, u64)>>,
    Vec<TombstonePage>,
);

async fn store_snapshot(
    b: &PostgresBackend,
    keys: &[Key],
    partitions: &BTreeSet<u16>,
    buckets: &BTreeSet<(u16, u16)>,
) -> Snapshot {
    let mut values = Vec::new();
    for k in keys {
        values.push(b.get(k).await.unwrap());
    }
    let (mut digests, mut tombstones) = (Vec::new(), Vec::new());
    for &p in partitions {
        assert!(
            b.verify_digest(p).await.unwrap().is_empty(),
            "partition {p}"
        );
        digests.push(b.digest(p).await.unwrap());
        tombstones.push(b.tombstones(p, None, 100).await.unwrap());
    }
    let mut entries = Vec::new();
    for &(p, bucket) in buckets {
        entries.push(b.bucket_entries(p, bucket).await.unwrap());
    }
    (values, digests, entries, tombstones)
}

/// A store created before migration 3 (migrations 1 and 2 only, written to by the store) is
/// migrated to version 3 when it is opened again, and keeps its values, versions, digests,
/// bucket entries and tombstones; then writes, purges and digests work as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_schema_upgrades_to_version_3_with_its_data() {
    use sqlx::Connection;

    let schemas = Schemas::new("upgrade");
    let schema = schemas.fresh();
    let layout = Layout::default();
    psql(&schemas.url, &format!("CREATE SCHEMA \"{schema}\""));
    let mut conn = sqlx::PgConnection::connect(&schemas.url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET search_path TO \"{schema}\""
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres");
    let mut migrator = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
    migrator.dangerous_set_table_name(format!("\"{schema}\"._sqlx_migrations"));
    migrator.run_to(2, &mut conn).await.unwrap();
    conn.close().await.unwrap();
    let old_indexes = value_indexes(&schemas.url, &schema);
    assert!(
        old_indexes["gs_values_bucket"].contains("INCLUDE (value_hash)"),
        "version 2's index: {old_indexes:?}"
    );

    // Data written by the store on the version 2 schema (it must not migrate it).
    let mut old_config = schemas.config(schema.clone(), layout.clone());
    old_config.run_migrations = false;
    old_config.create_schema = false;
    let old = PostgresBackend::connect(old_config).await.unwrap();
    let counters = keys_in(&layout, 1, "upgrade:counter:", 6);
    let (cleared, deleted) = (key("upgrade:cleared"), key("upgrade:deleted"));
    let mut i = 0;
    for (n, k) in counters.iter().enumerate() {
        for _ in 0..=n {
            i += 1;
            old.apply(inc(k, 1, 1, 0, i)).await.unwrap();
        }
    }
    for (k, op) in [
        (&cleared, Op::from(SetOp::add("a"))),
        (&cleared, Op::from(SetOp::Clear)),
        (&deleted, Op::from(CounterOp::inc(3))),
        (&deleted, Op::Delete),
    ] {
        i += 1;
        old.apply(write_op(k, op, 2, i)).await.unwrap();
    }
    let mut all_keys = counters.clone();
    all_keys.extend([cleared.clone(), deleted.clone()]);
    let partitions: BTreeSet<u16> = all_keys.iter().map(|k| layout.partition_of(k)).collect();
    let buckets: BTreeSet<(u16, u16)> = all_keys
        .iter()
        .map(|k| (layout.partition_of(k), layout.bucket_of(k)))
        .collect();
    let before = store_snapshot(&old, &all_keys, &partitions, &buckets).await;
    let listed: usize = before.3.iter().map(|page| page.items.len()).sum();
    assert_eq!(
        listed, 2,
        "the cleared and the deleted key are tombstones: {:?}",
        before.3
    );
    old.close().await;
    drop(old);

    // Opened again with migrations: version 3, same data.
    let new = PostgresBackend::connect(schemas.config(schema.clone(), layout.clone()))
        .await
        .unwrap();
    assert_version_3_shape(&schemas.url, &schema);
    assert_eq!(
        store_snapshot(&new, &all_keys, &partitions, &buckets).await,
        before
    );

    // And it keeps working: writes, a purge, digests.
    for k in &counters {
        i += 1;
        new.apply(inc(k, 10, 1, 0, i)).await.unwrap();
    }
    for (n, k) in counters.iter().enumerate() {
        assert_eq!(counter_of(&new, k).await, n as i128 + 11);
    }
    let tombstone = new.get(&cleared).await.unwrap().unwrap();
    assert!(new.purge(&cleared, tombstone.version).await.unwrap());
    assert!(new.get(&cleared).await.unwrap().is_none());
    for &p in &partitions {
        assert!(
            new.verify_digest(p).await.unwrap().is_empty(),
            "partition {p}"
        );
    }
    let listed: Vec<Key> = {
        let mut out = Vec::new();
        for &p in &partitions {
            out.extend(
                new.tombstones(p, None, 100)
                    .await
                    .unwrap()
                    .items
                    .into_iter()
                    .map(|t| t.key),
            );
        }
        out
    };
    assert_eq!(listed, [deleted]);
}

// ---------------------------------------------------------------------------------------------
// Two OS processes writing one key
// ---------------------------------------------------------------------------------------------

const HELPER_ENV: &str = "GEOSTATE_PG_HELPER";
const HELPER_TAG: u32 = 2;

/// The second process of [`two_processes_writing_one_key_lose_nothing`]: that test re-runs
/// this binary with `GEOSTATE_PG_HELPER` set, and then only this half runs.
async fn two_process_helper(spec: String) {
    let parts: Vec<&str> = spec.split_whitespace().collect();
    let [url, schema, name, writes] = parts.as_slice() else {
        panic!("{HELPER_ENV}={spec:?}: expected 'url schema key writes'");
    };
    let writes: u64 = writes.parse().unwrap();
    let mut config = PostgresConfig::new(*url);
    config.schema = schema.to_string();
    config.rng_seed = Some(0x2);
    let b = PostgresBackend::connect(config).await.unwrap();
    let k = key(name);
    println!("GEOSTATE-READY");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    for i in 0..writes {
        // The same actor as the other process: the store mints every dot.
        b.apply(inc(&k, 1, 1, HELPER_TAG, i)).await.unwrap();
    }
    println!(
        "GEOSTATE-DONE {writes} conflict_retries={}",
        b.stats().conflict_retries
    );
}

/// The first line the helper process prints that starts with `prefix` (within a minute).
async fn wait_for(
    prefix: &str,
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
) -> String {
    let found = async {
        while let Some(line) = lines.recv().await {
            if line.contains(prefix) {
                return line;
            }
        }
        panic!("the helper process ended without printing {prefix}");
    };
    tokio::time::timeout(Duration::from_secs(60), found)
        .await
        .unwrap_or_else(|_| panic!("the helper process did not print {prefix} within a minute"))
}

/// This process and a second one (this test binary, re-run as its helper half) each
/// make 1,500 increments of one counter as the same actor, at the same time, with the
/// default (durable) commit: the counter is 3,000, the partition's feed holds seqs 1..=3,000
/// from both processes, interleaved, and replaying it rebuilds the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_writing_one_key_lose_nothing() {
    const WRITES: u64 = 1_500;
    if let Ok(spec) = std::env::var(HELPER_ENV) {
        two_process_helper(spec).await;
        return;
    }
    let schemas = Schemas::new("procs");
    let schema = schemas.fresh();
    let mut config = schemas.config(schema.clone(), Layout::default());
    config.synchronous_commit = true;
    let b = PostgresBackend::connect(config).await.unwrap();
    let k = key("procs:counter");
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "two_processes_writing_one_key_lose_nothing",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(HELPER_ENV, format!("{} {schema} {k} {WRITES}", schemas.url))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    wait_for("GEOSTATE-READY", &mut lines).await;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let started = Instant::now();
    for i in 0..WRITES {
        b.apply(inc(&k, 1, 1, 1, i)).await.unwrap();
    }
    let done = wait_for("GEOSTATE-DONE", &mut lines).await;
    let elapsed = started.elapsed();
    assert!(child.wait().unwrap().success(), "the helper process failed");
    reader.join().unwrap();

    assert_eq!(
        counter_of(&b, &k).await,
        i128::from(2 * WRITES),
        "updates were lost"
    );
    let p = b.layout().partition_of(&k);
    let feed = whole_feed(&b, p).await;
    assert_eq!(feed.len() as u64, 2 * WRITES, "one feed entry per write");
    assert_eq!(feed[0].seq, 1);
    let mut replay = Crdt::empty(TypeTag::PnCounter);
    let mut switches = 0;
    for pair in feed.windows(2) {
        if pair[0].hlc.logical() != pair[1].hlc.logical() {
            switches += 1;
        }
    }
    for e in &feed {
        assert_eq!(e.key, k);
        replay.merge(&e.delta).unwrap();
    }
    let from_helper = feed
        .iter()
        .filter(|e| e.hlc.logical() == HELPER_TAG)
        .count();
    assert_eq!(
        from_helper as u64, WRITES,
        "the helper's writes are all fed"
    );
    assert!(
        switches >= 2,
        "the two processes' writes interleave ({switches} switches)"
    );
    assert_eq!(replay, b.get(&k).await.unwrap().unwrap().value);
    assert!(b.verify_digest(p).await.unwrap().is_empty());
    println!(
        "two processes: {} writes to one key in {elapsed:?} ({:.0}/s), {switches} switches \
         between writers; this process: {:?}; helper: {done}",
        2 * WRITES,
        (2 * WRITES) as f64 / elapsed.as_secs_f64(),
        b.stats()
    );
}

// ---------------------------------------------------------------------------------------------
// Throwaway clusters (for replicas and restarts; never the shared server on 5432)
// ---------------------------------------------------------------------------------------------

/// The directory of PostgreSQL's server programs: `GEOSTATE_PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/*/bin`.
fn pg_bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("GEOSTATE_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!("no PostgreSQL server programs under /usr/lib/postgresql; run scripts/ensure-postgres or set GEOSTATE_PG_BINDIR")
    })
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A server program, run as the `postgres` user when we are root (PostgreSQL refuses root).
fn pg_program(name: &str) -> Command {
    let program = pg_bindir().join(name);
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(mut command: Command, what: &str) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run ({e})"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A temporary directory owned by the server's user; removed on drop (panics included).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("geostate-pg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        if running_as_root() {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&path);
            run(chown, "chown");
        }
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A throwaway PostgreSQL cluster on a free port; stopped on drop (panics included).
struct Cluster {
    data: PathBuf,
    log: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    running: bool,
}

impl Cluster {
    fn at(dir: &TempDir, name: &str) -> Self {
        Self {
            data: dir.0.join(name),
            log: dir.0.join(format!("{name}.log")),
            socket_dir: dir.0.clone(),
            port: free_port(),
            running: false,
        }
    }

    /// `initdb`: a new primary (trust authentication on loopback, replication allowed).
    fn init(dir: &TempDir, name: &str) -> Self {
        let cluster = Self::at(dir, name);
        let mut initdb = pg_program("initdb");
        initdb
            .arg("-D")
            .arg(&cluster.data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"]);
        run(initdb, "initdb");
        let conf = cluster.data.join("postgresql.conf");
        let mut settings = std::fs::read_to_string(&conf).unwrap();
        settings.push_str(
            "\nlisten_addresses = '127.0.0.1'\nmax_connections = 60\nshared_buffers = 16MB\n\
             max_wal_senders = 10\nwal_level = replica\nhot_standby = on\n",
        );
        std::fs::write(&conf, settings).unwrap();
        cluster
    }

    /// `pg_basebackup -R`: a streaming replica of `primary`.
    fn replica_of(primary: &Cluster, dir: &TempDir, name: &str) -> Self {
        let cluster = Self::at(dir, name);
        let mut backup = pg_program("pg_basebackup");
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(&cluster.data)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        run(backup, "pg_basebackup");
        cluster
    }

    fn pg_ctl(&self, action: &str, mode: Option<&str>) -> Command {
        let mut command = pg_program("pg_ctl");
        command
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "-o"])
            .arg(format!("-p {} -k {}", self.port, self.socket_dir.display()));
        if let Some(mode) = mode {
            command.args(["-m", mode]);
        }
        command.arg(action);
        command
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn start(&mut self) {
        let out = self.pg_ctl("start", None).output().unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed:\n{}",
            self.log_tail()
        );
        self.running = true;
    }

    fn stop(&mut self, mode: &str) {
        let out = self.pg_ctl("stop", Some(mode)).output().unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop failed:\n{}",
            self.log_tail()
        );
        self.running = false;
    }

    fn restart(&mut self, mode: &str) {
        let out = self.pg_ctl("restart", Some(mode)).output().unwrap();
        assert!(
            out.status.success(),
            "pg_ctl restart failed:\n{}",
            self.log_tail()
        );
        self.running = true;
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl("stop", Some("immediate")).output();
        }
    }
}

/// Polls `check` every 50 ms until it holds, for at most `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Read replicas
// ---------------------------------------------------------------------------------------------

/// Whether every listed replica is known to hold everything the primary had at `since`.
fn caught_up(b: &PostgresBackend, replicas: &[usize], since: Instant) -> bool {
    let status = b.replica_status();
    replicas
        .iter()
        .all(|i| status[*i].eligible && status[*i].staleness.is_some_and(|s| s < since.elapsed()))
}

/// A primary and two streaming replicas made with `pg_basebackup`, each a throwaway cluster.
/// Reads are served by replicas: least-lag prefers the replica that keeps up, round-robin
/// alternates (and shows a paused replica's stale value, within its generous bound), random
/// (seeded) uses both. A replica whose replay is paused ages out of least-lag routing once its
/// staleness passes the bound (while still healthy); a stopped replica is marked unhealthy and
/// reads fall back to the primary; writes always go to the primary; a replica that resumes
/// replaying is used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_reads_follow_the_lag_monitor() {
    let dir = TempDir::new("replicas");
    let mut primary = Cluster::init(&dir, "primary");
    primary.start();
    let mut r1 = Cluster::replica_of(&primary, &dir, "replica1");
    r1.start();
    let mut r2 = Cluster::replica_of(&primary, &dir, "replica2");
    r2.start();

    let config = |policy: ReadPolicy, max_lag: Duration| {
        let mut c = PostgresConfig::new(primary.url());
        c.schema = "gs_replicas".into();
        c.replica_urls = vec![r1.url(), r2.url()];
        c.read_policy = policy;
        c.max_replica_lag = max_lag;
        c.lag_check_interval = Duration::from_millis(50);
        c.lag_check_timeout = Duration::from_millis(500);
        c.rng_seed = Some(0x5eed);
        c
    };
    let tight = Duration::from_millis(1_500);
    let loose = Duration::from_secs(60);
    let least = PostgresBackend::connect(config(ReadPolicy::LeastLag, tight))
        .await
        .unwrap();
    let rr = PostgresBackend::connect(config(ReadPolicy::RoundRobin, loose))
        .await
        .unwrap();
    let random = PostgresBackend::connect(config(ReadPolicy::Random, loose))
        .await
        .unwrap();
    let all = [&least, &rr, &random];
    let k = key("replica:counter");

    least.apply(inc(&k, 1, 1, 0, 1)).await.unwrap();
    let acked = Instant::now();
    for b in all {
        eventually(
            Duration::from_secs(20),
            "both replicas caught up",
            || async {
                b.check_replicas().await;
                caught_up(b, &[0, 1], acked)
            },
        )
        .await;
    }
    let before = least.stats();
    assert_eq!(
        counter_of(&least, &k).await,
        1,
        "a caught-up replica serves the write"
    );
    let after = least.stats();
    assert_eq!(
        after.replica_reads,
        before.replica_reads + 1,
        "served by a replica"
    );
    assert_eq!(
        after.primary_reads, before.primary_reads,
        "not by the primary"
    );

    // Replica 1 stops replaying; a second write reaches only replica 2.
    psql(&r1.url(), "SELECT pg_wal_replay_pause()");
    least.apply(inc(&k, 1, 1, 0, 2)).await.unwrap();
    let acked = Instant::now();
    for b in all {
        eventually(Duration::from_secs(20), "replica 2 caught up", || async {
            b.check_replicas().await;
            caught_up(b, &[1], acked)
        })
        .await;
    }
    let reads =
        |b: &PostgresBackend| -> Vec<u64> { b.replica_status().iter().map(|s| s.reads).collect() };
    let start = reads(&least);
    for _ in 0..6 {
        assert_eq!(
            counter_of(&least, &k).await,
            2,
            "least lag reads the fresh replica"
        );
    }
    assert_eq!(
        reads(&least),
        vec![start[0], start[1] + 6],
        "least lag: replica 2 only"
    );

    let start = reads(&rr);
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        seen.insert(counter_of(&rr, &k).await);
    }
    assert_eq!(
        reads(&rr),
        vec![start[0] + 3, start[1] + 3],
        "round robin alternates"
    );
    assert_eq!(
        seen,
        BTreeSet::from([1, 2]),
        "the paused replica serves a stale value, within its (60 s) bound"
    );
    let start = reads(&random);
    for _ in 0..40 {
        let v = counter_of(&random, &k).await;
        assert!(v == 1 || v == 2);
    }
    let end = reads(&random);
    assert!(
        end[0] > start[0] && end[1] > start[1] && end[0] + end[1] == start[0] + start[1] + 40,
        "random uses both replicas: {start:?} -> {end:?}"
    );

    // Past the tight bound, the paused replica is lagging: healthy, but not eligible.
    eventually(Duration::from_secs(10), "replica 1 ages out", || async {
        let s = &least.replica_status()[0];
        s.healthy && !s.eligible && s.staleness.is_some_and(|s| s > tight)
    })
    .await;

    // Replica 2 goes down: it is marked unhealthy and reads fall back to the primary.
    r2.stop("immediate");
    eventually(
        Duration::from_secs(10),
        "replica 2 is marked unhealthy",
        || async { !least.replica_status()[1].healthy },
    )
    .await;
    let before = least.stats();
    assert_eq!(
        counter_of(&least, &k).await,
        2,
        "the primary serves the read"
    );
    let r = least
        .apply(inc(&k, 1, 1, 0, 3))
        .await
        .expect("writes go to the primary");
    assert!(r.seq.is_some());
    assert_eq!(
        counter_of(&least, &k).await,
        3,
        "read your write from the primary"
    );
    let after = least.stats();
    assert_eq!(after.primary_reads, before.primary_reads + 2);
    assert_eq!(after.replica_reads, before.replica_reads);
    let status = least.replica_status();
    assert!(
        status[1].last_error.is_some(),
        "why replica 2 is unhealthy: {status:?}"
    );

    // Replica 1 resumes replaying and is used again.
    psql(&r1.url(), "SELECT pg_wal_replay_resume()");
    let acked = Instant::now();
    eventually(
        Duration::from_secs(20),
        "replica 1 caught up again",
        || async {
            least.check_replicas().await;
            caught_up(&least, &[0], acked)
        },
    )
    .await;
    let start = reads(&least);
    assert_eq!(counter_of(&least, &k).await, 3);
    assert_eq!(
        reads(&least)[0],
        start[0] + 1,
        "replica 1 serves reads again"
    );
    // The monitor measures replicas independently: the dead one (each attempt runs into the
    // 500 ms timeout) does not hold back replica 1's measurements (every 50 ms).
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let staleness = least.replica_status()[0]
            .staleness
            .expect("replica 1 is measured");
        worst = worst.max(staleness);
    }
    assert!(
        worst < Duration::from_millis(400),
        "replica 1's staleness reached {worst:?}"
    );
    println!("replica status: {:#?}", least.replica_status());
    drop((least, rr, random));
    r1.stop("fast");
    primary.stop("fast");
}

// ---------------------------------------------------------------------------------------------
// Restart under load
// ---------------------------------------------------------------------------------------------

/// Four tasks increment two counters while a throwaway cluster is crashed and restarted
/// (`pg_ctl restart -m immediate`, durable commits). Every write is acknowledged or fails with
/// `Unavailable` (nothing else); the backend reconnects by itself and writes succeed after the
/// restart; every acknowledged write survives: each counter is at least its acknowledged
/// increments and at most those plus the failed ones, and every acknowledged receipt's feed
/// entry is there with its delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_under_load_loses_no_acknowledged_write() {
    let dir = TempDir::new("restart");
    let mut cluster = Cluster::init(&dir, "main");
    cluster.start();
    let mut config = PostgresConfig::new(cluster.url());
    config.schema = "gs_restart".into();
    config.acquire_timeout = Duration::from_secs(3);
    config.retry.backoff_base = Duration::from_millis(20);
    config.retry.backoff_max = Duration::from_millis(400);
    config.rng_seed = Some(0x4e57);
    let b = Arc::new(PostgresBackend::connect(config).await.unwrap());
    let keys = [key("restart:a"), key("restart:b")];
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (b, stop, k) = (
                Arc::clone(&b),
                Arc::clone(&stop),
                keys[t as usize % 2].clone(),
            );
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut failed = 0u64;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    match b.apply(inc(&k, 1, t + 1, 0, i)).await {
                        Ok(r) => acked.push((Instant::now(), r)),
                        Err(BackendError::Unavailable(_)) => failed += 1,
                        Err(e) => panic!("writer {t}: unexpected error {e}"),
                    }
                }
                (k, acked, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let restart_began = Instant::now();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart("immediate");
        cluster
    })
    .await
    .unwrap();
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut per_key: BTreeMap<Key, (u64, u64)> = BTreeMap::new();
    let mut receipts = Vec::new();
    let (mut before_restart, mut after_restart) = (0, 0);
    for writer in writers {
        let (k, acked, failed) = writer.await.unwrap();
        let entry = per_key.entry(k.clone()).or_default();
        entry.0 += acked.len() as u64;
        entry.1 += failed;
        for (at, r) in acked {
            if at < restart_began {
                before_restart += 1;
            } else if at > restarted {
                after_restart += 1;
            }
            receipts.push((k.clone(), r));
        }
    }
    assert!(
        before_restart > 0,
        "writes were acknowledged before the restart"
    );
    assert!(
        after_restart > 0,
        "the backend reconnected: writes acknowledged after the restart"
    );
    for (k, (acked, failed)) in &per_key {
        let value = counter_of(&*b, k).await;
        assert!(
            value >= i128::from(*acked) && value <= i128::from(acked + failed),
            "{k}: value {value}, {acked} acknowledged, {failed} failed"
        );
    }
    let mut feeds: BTreeMap<u16, BTreeMap<u64, FeedEntry>> = BTreeMap::new();
    for (k, r) in &receipts {
        let feed = match feeds.entry(r.partition) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(
                whole_feed(&*b, r.partition)
                    .await
                    .into_iter()
                    .map(|e| (e.seq, e))
                    .collect(),
            ),
        };
        let seq = r.seq.expect("an increment is fed");
        let entry = feed
            .get(&seq)
            .unwrap_or_else(|| panic!("acknowledged seq {seq} lost"));
        assert_eq!((&entry.key, &entry.delta), (k, &r.delta), "seq {seq}");
    }
    let failed: u64 = per_key.values().map(|(_, f)| f).sum();
    println!(
        "restart under load: {} acknowledged ({before_restart} before, {after_restart} after the \
         restart), {failed} failed with Unavailable; {:?}",
        receipts.len(),
        b.stats()
    );
    drop(b);
    drop(cluster);
}

// ---------------------------------------------------------------------------------------------
// TLS: the shared server has `ssl = on` with Debian's self-signed "snakeoil" certificate
// (CN and SAN `localhost`).
// ---------------------------------------------------------------------------------------------

const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

fn assert_tls_refused(result: Result<PostgresBackend, BackendError>, what: &str) {
    match result {
        Err(BackendError::Tls(message)) => println!("{what}: refused as expected: {message}"),
        Err(other) => panic!("{what}: expected a TLS error, got {other:?}"),
        Ok(_) => panic!("{what}: connected although the certificate must not be trusted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_are_encrypted_and_untrusted_certificates_refused() {
    let schemas = Schemas::new("tls");
    let url = server_url();
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap_or_else(|e| {
            panic!("cannot reach PostgreSQL at {url}: {e}; run scripts/ensure-postgres")
        });
        let ssl: String = sqlx::query_scalar("SHOW ssl")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            ssl, "on",
            "the test server must have ssl = on (scripts/ensure-postgres)"
        );
    }

    // `require`: encrypted (the store's own connections are, per pg_stat_ssl), and a
    // small part of the suite runs over it.
    let mut config = schemas.config(schemas.fresh(), suite::small_layout());
    config.ssl_mode = Some(SslMode::Require);
    let tls_url = config.primary_url.clone();
    let store = PostgresBackend::connect(config.clone())
        .await
        .unwrap_or_else(|e| panic!("sslmode=require: {e}"));
    {
        use sqlx::Connection;
        let sep = if tls_url.contains('?') { '&' } else { '?' };
        let mut conn = sqlx::PgConnection::connect(&format!("{tls_url}{sep}sslmode=require"))
            .await
            .unwrap();
        let (ssl, version): (bool, Option<String>) =
            sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert!(ssl, "a sslmode=require session is not encrypted");
        println!("sslmode=require session: {version:?}");
        // Every connection the store holds, seen from the server, is encrypted too.
        let store_sessions: Vec<bool> = sqlx::query_scalar(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = $1",
        )
        .bind(&config.application_name)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert!(!store_sessions.is_empty(), "the store holds no connection");
        assert!(store_sessions.iter().all(|&ssl| ssl), "{store_sessions:?}");
    }
    let k = key("tls");
    store.apply(inc(&k, 5, 1, 7, 1)).await.unwrap();
    assert_eq!(counter_of(&store, &k).await, 5);
    drop(store);
    suite::test_small_layout(|| {
        let mut config = schemas.config(schemas.fresh(), suite::small_layout());
        config.ssl_mode = Some(SslMode::Require);
        async move {
            PostgresBackend::connect(config)
                .await
                .unwrap_or_else(|e| panic!("sslmode=require: {e}"))
        }
    })
    .await;

    // verify-full at 127.0.0.1: the certificate names only localhost, so it is refused
    // whoever is trusted. (Without `ssl_root_cert`, whether the snakeoil certificate's issuer
    // is trusted depends on the machine: rustls-native-certs loads every file of
    // /etc/ssl/certs, where Debian keeps the snakeoil certificate, so no assertion on that.)
    if url.contains("127.0.0.1") {
        let mut misnamed = schemas.config(schemas.fresh(), suite::small_layout());
        misnamed.ssl_mode = Some(SslMode::VerifyFull);
        assert_tls_refused(
            PostgresBackend::connect(misnamed).await,
            "verify-full at 127.0.0.1 without a root certificate",
        );
    }
    // Trusting the snakeoil certificate: verify-ca passes at 127.0.0.1, verify-full does not
    // (the certificate names localhost only), and passes for localhost.
    assert!(
        std::path::Path::new(SNAKEOIL).exists(),
        "{SNAKEOIL} is missing: the server's certificate cannot be trusted by the test"
    );
    let mut ca = schemas.config(schemas.fresh(), suite::small_layout());
    ca.ssl_mode = Some(SslMode::VerifyCa);
    ca.ssl_root_cert = Some(SNAKEOIL.into());
    let store = PostgresBackend::connect(ca.clone())
        .await
        .unwrap_or_else(|e| panic!("verify-ca with the snakeoil certificate: {e}"));
    assert!(store.get(&k).await.unwrap().is_none());
    drop(store);
    let mut misnamed = ca.clone();
    misnamed.schema = schemas.fresh();
    misnamed.ssl_mode = Some(SslMode::VerifyFull);
    if misnamed.primary_url.contains("127.0.0.1") {
        assert_tls_refused(
            PostgresBackend::connect(misnamed.clone()).await,
            "verify-full at 127.0.0.1 with a certificate for localhost",
        );
        let mut full = misnamed;
        full.schema = schemas.fresh();
        full.primary_url = full.primary_url.replace("127.0.0.1", "localhost");
        let store = PostgresBackend::connect(full)
            .await
            .unwrap_or_else(|e| panic!("verify-full at localhost: {e}"));
        assert!(store.get(&k).await.unwrap().is_none());
        drop(store);
    }

    // A root certificate with a mode that would not check it is refused, in the config and
    // in the URL.
    let mut lax = schemas.config(schemas.fresh(), suite::small_layout());
    lax.ssl_mode = Some(SslMode::Require);
    lax.ssl_root_cert = Some(SNAKEOIL.into());
    assert!(matches!(
        PostgresBackend::connect(lax).await,
        Err(BackendError::InvalidArgument(_))
    ));
    let mut lax_url = schemas.config(schemas.fresh(), suite::small_layout());
    let sep = if lax_url.primary_url.contains('?') {
        '&'
    } else {
        '?'
    };
    lax_url.primary_url = format!(
        "{}{sep}sslmode=require&sslrootcert={SNAKEOIL}",
        lax_url.primary_url
    );
    assert!(matches!(
        PostgresBackend::connect(lax_url).await,
        Err(BackendError::InvalidArgument(_))
    ));
}
