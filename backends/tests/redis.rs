//! The Redis store against real servers: the conformance suite on the shared standalone
//! server (127.0.0.1:6379, made sure of by `scripts/ensure-redis`) and on a 3-primary,
//! 3-replica cluster this file starts itself; raw corruption written by `redis-cli`; a second
//! OS process writing to the same key; the circuit breaker and a Sentinel failover on servers
//! this file starts and stops itself (never the shared one); TLS on a server this file starts
//! with a throwaway CA made by `openssl`.
//!
//! Every store gets a unique key prefix; the keys a test created are deleted when it ends,
//! also when it panics. Nothing here runs FLUSHALL or FLUSHDB.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use geostate_backends::redis::{RedisBackend, RedisConfig, RedisTls};
use geostate_backends::{suite, BackendError, Layout};

const SHARED_URL: &str = "redis://127.0.0.1:6379/";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

/// Makes sure the shared server runs (installing and starting it if needed).
fn shared_server() -> &'static str {
    static ENSURED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ENSURED.get_or_init(|| {
        let script = repo_root().join("scripts/ensure-redis");
        let out = Command::new(&script)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed, so there is no Redis server to test against:\n{}{}",
            script.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
    SHARED_URL
}

/// A unique family of key prefixes on one server; deletes every key under them when dropped.
struct Namespace {
    url: String,
    run: String,
    next: AtomicU64,
}

impl Namespace {
    fn new(url: &str, name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Self {
            url: url.to_string(),
            run: format!("gst-{name}-{}-{nanos}-", std::process::id()),
            next: AtomicU64::new(0),
        }
    }

    /// A fresh prefix of this namespace.
    fn prefix(&self) -> String {
        format!("{}{}:", self.run, self.next.fetch_add(1, Ordering::Relaxed))
    }

    fn config(&self, layout: Layout) -> RedisConfig {
        RedisConfig::standalone(self.url.clone())
            .with_key_prefix(self.prefix())
            .with_layout(layout)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        geostate_tests::unlink_redis_keys(&self.url, &format!("{{{}*", self.run));
    }
}

async fn connect(config: RedisConfig) -> RedisBackend {
    let what = format!("{:?} {:?}", config.mode, config.urls);
    RedisBackend::connect(config)
        .await
        .unwrap_or_else(|e| panic!("connect to {what}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Standalone
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standalone_passes_the_suite() {
    let ns = Namespace::new(shared_server(), "suite");
    let started = Instant::now();
    suite::test_all(|| {
        let config = ns.config(Layout::default());
        async move { connect(config).await }
    })
    .await;
    println!("standalone suite: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standalone_passes_the_small_layout_cases() {
    let ns = Namespace::new(shared_server(), "small");
    suite::test_small_layout(|| {
        let config = ns.config(suite::small_layout());
        async move { connect(config).await }
    })
    .await;
}

/// The optimistic write path alone (no local lock): 16 tasks of one process race on one key,
/// as one shared actor, and on compare-and-set; the lost races are counted and printed. Then
/// the same increments with the local per-key lock (the default), for comparison.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standalone_contention_with_and_without_local_locks() {
    let ns = Namespace::new(shared_server(), "contention");
    for local_key_locks in [false, true] {
        let handles = std::sync::Mutex::new(Vec::new());
        let builder = || {
            let mut config = ns.config(Layout::default());
            config.contention.local_key_locks = local_key_locks;
            let handles = &handles;
            async move {
                let b = connect(config).await;
                handles.lock().unwrap().push(b.stats_handle());
                b
            }
        };
        let started = Instant::now();
        suite::concurrent_increments_shared_actor(&builder).await;
        let increments = started.elapsed();
        let started = Instant::now();
        if !local_key_locks {
            suite::concurrent_compare_and_set(&builder).await;
        }
        let cas = started.elapsed();
        for (i, h) in handles.lock().unwrap().iter().enumerate() {
            let s = h.snapshot();
            println!(
                "local_key_locks={local_key_locks} case {i}: commits {}, lost races {}, gave up {}, \
                 transport retries {} (increments {increments:?}, cas {cas:?})",
                s.commits, s.races, s.gave_up, s.transport_retries
            );
            assert_eq!(s.gave_up, 0, "no write may give up in this case");
            if local_key_locks {
                assert_eq!(
                    s.races, 0,
                    "one process with local locks never races itself"
                );
            }
        }
    }
}

/// Writers and a garbage collector on two handles of one store (each with its own
/// connections and local key locks, as two processes have), so that writes to one key and
/// purges race through the scripts' checks alone: no acknowledged write is lost nor any dot
/// minted twice (see `suite::purge_race`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purges_race_the_writes_of_another_handle() {
    use std::sync::Arc;

    let ns = Namespace::new(shared_server(), "gc-race");
    let config = ns.config(Layout::default());
    let a = Arc::new(connect(config.clone()).await);
    let b = Arc::new(connect(config).await);
    suite::purge_race(Arc::clone(&a), Arc::clone(&b)).await;
    println!("handle a: {:?}; handle b: {:?}", a.stats(), b.stats());
}

/// The write cache: a key this handle committed is written again without a read; another
/// handle's write in between makes the entry stale, which costs one lost race and a read, never
/// a lost or doubled increment; a delete by another handle in between makes the next write
/// start from the raised dot floor; with the cache disabled every write reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_cache_saves_reads_and_a_stale_entry_costs_only_a_race() {
    use geostate_backends::redis::WriteCacheConfig;
    use geostate_backends::{Expect, Key, LocalWrite, StateBackend};
    use geostate_crdt::{ActorId, CounterOp, Crdt, Hlc, Op, SetOp};

    let ns = Namespace::new(shared_server(), "wcache");
    let config = ns.config(Layout::default());
    let a = connect(config.clone()).await;
    let b = connect(config.clone()).await;
    let write = |key: &Key, op: Op, actor: u64| LocalWrite {
        key: key.clone(),
        op,
        actor: ActorId::new(actor),
        hlc: Hlc::new(1, 0),
        expect: Expect::Any,
    };
    let counter = |stored: Option<geostate_backends::Stored>| match stored.map(|s| s.value) {
        Some(Crdt::PnCounter(c)) => c.value(),
        other => panic!("expected a counter, got {other:?}"),
    };

    let k = Key::new("wc:counter").unwrap();
    for _ in 0..3 {
        a.apply(write(&k, CounterOp::inc(1).into(), 1))
            .await
            .unwrap();
    }
    let stats = a.stats();
    assert_eq!(
        (stats.commits, stats.cached_commits, stats.races),
        (3, 2, 0)
    );
    // Another handle (another process, as far as the store can tell) writes the key.
    b.apply(write(&k, CounterOp::inc(10).into(), 2))
        .await
        .unwrap();
    let receipt = a
        .apply(write(&k, CounterOp::inc(100).into(), 1))
        .await
        .unwrap();
    let stats = a.stats();
    assert_eq!(
        (stats.commits, stats.cached_commits, stats.races),
        (4, 2, 1)
    );
    assert_eq!(counter(a.get(&k).await.unwrap()), 113);
    // Every acknowledged write was fed once, in order.
    let feed = a.read_feed(receipt.partition, 0, 100).await.unwrap();
    let fed: Vec<u64> = feed
        .entries
        .iter()
        .filter(|e| e.key == k)
        .map(|e| e.seq)
        .collect();
    assert_eq!(fed.len(), 5, "{fed:?}");
    assert!(fed.windows(2).all(|w| w[0] < w[1]));

    // A delete by the other handle raises the dot floor; the cached entry is stale and the
    // next write must mint above the floor (a reused dot would be lost against the delete's
    // context on a replica that merged it).
    let s = Key::new("wc:set").unwrap();
    for e in ["x", "y"] {
        a.apply(write(&s, SetOp::add(e).into(), 1)).await.unwrap();
    }
    let before = a.get(&s).await.unwrap().unwrap().value;
    assert!(b.delete(&s).await.unwrap());
    let receipt = a.apply(write(&s, SetOp::add("z").into(), 1)).await.unwrap();
    let after = a.get(&s).await.unwrap().unwrap().value;
    let Crdt::OrSet(set) = &after else {
        panic!("expected a set, got {after:?}");
    };
    let elements: Vec<&[u8]> = set.iter().map(|e| e.as_ref()).collect();
    assert_eq!(elements, vec![b"z".as_slice()]);
    let floor = before.context().maxima().get(ActorId::new(1));
    let minted = receipt.delta.context().maxima().get(ActorId::new(1));
    assert!(
        minted > floor,
        "minted {minted} at or below the floor {floor}"
    );

    // A stale entry never answers alone: a compare-and-set against the version another
    // handle wrote, and a remove of an element only the other handle added, both take effect.
    let cas = Key::new("wc:cas").unwrap();
    a.apply(write(&cas, CounterOp::inc(1).into(), 1))
        .await
        .unwrap();
    let theirs = b
        .apply(write(&cas, CounterOp::inc(1).into(), 2))
        .await
        .unwrap();
    let mut expecting = write(&cas, CounterOp::inc(1).into(), 1);
    expecting.expect = Expect::Version(theirs.version);
    a.apply(expecting).await.unwrap();
    assert_eq!(counter(a.get(&cas).await.unwrap()), 3);
    let set = Key::new("wc:remove").unwrap();
    a.apply(write(&set, SetOp::add("x").into(), 1))
        .await
        .unwrap();
    b.apply(write(&set, SetOp::add("y").into(), 2))
        .await
        .unwrap();
    a.apply(write(&set, SetOp::remove("y").into(), 1))
        .await
        .unwrap();
    match a.get(&set).await.unwrap().map(|s| s.value) {
        Some(Crdt::OrSet(s)) => {
            let elements: Vec<&[u8]> = s.iter().map(|e| e.as_ref()).collect();
            assert_eq!(elements, vec![b"x".as_slice()]);
        }
        other => panic!("expected a set, got {other:?}"),
    }

    // With the cache disabled, every write reads first.
    let mut off = config;
    off.write_cache = WriteCacheConfig::disabled();
    let c = connect(off).await;
    for _ in 0..3 {
        c.apply(write(&k, CounterOp::inc(1).into(), 3))
            .await
            .unwrap();
    }
    assert_eq!(c.stats().cached_commits, 0);
    assert_eq!(counter(c.get(&k).await.unwrap()), 116);
    a.purge_namespace().await.unwrap();
}

/// Group commit: single writes from many tasks at once ride shared write script calls (fewer
/// calls than commits), lose nothing and mint nothing twice; callers that give up while their
/// write is queued or in flight (a zero timeout) never make the others' writes fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_single_writes_are_grouped_and_lose_nothing() {
    use geostate_backends::{Key, StateBackend};
    use std::sync::Arc;

    const TASKS: u64 = 48;
    const WRITES: u64 = 40;
    const KEYS: u64 = 16;
    let ns = Namespace::new(shared_server(), "group");
    let b = Arc::new(connect(ns.config(Layout::default())).await);
    let keys: Arc<Vec<Key>> = Arc::new(
        (0..KEYS)
            .map(|i| Key::new(format!("group:{i}")).unwrap())
            .collect(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let (b, keys) = (Arc::clone(&b), Arc::clone(&keys));
        tasks.spawn(async move {
            let (mut acknowledged, mut abandoned) = (0u64, 0u64);
            for i in 0..WRITES {
                let write = counter_write(&keys[((t + i) % KEYS) as usize], t * WRITES + i);
                // Every eighth task gives up on every fourth write at once.
                if t % 8 == 0 && i % 4 == 0 {
                    match tokio::time::timeout(Duration::ZERO, b.apply(write)).await {
                        Ok(outcome) => {
                            outcome.unwrap();
                            acknowledged += 1;
                        }
                        Err(_) => abandoned += 1,
                    }
                } else {
                    b.apply(write).await.unwrap();
                    acknowledged += 1;
                }
            }
            (acknowledged, abandoned)
        });
    }
    let (mut acknowledged, mut abandoned) = (0u64, 0u64);
    while let Some(done) = tasks.join_next().await {
        let (a, g) = done.unwrap();
        acknowledged += a;
        abandoned += g;
    }
    // Abandoned writes may still commit: their drainer owns them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut total: i128 = 0;
    for key in keys.iter() {
        total += counter_of(&b.get(key).await.unwrap().unwrap());
    }
    let stats = b.stats();
    println!(
        "acknowledged {acknowledged}, abandoned {abandoned}, total {total}; {:?}",
        stats
    );
    assert!(abandoned > 0, "some callers gave up");
    assert!(
        total >= i128::from(acknowledged) && total <= i128::from(acknowledged + abandoned),
        "every acknowledged write counted once, abandoned ones at most once"
    );
    assert_eq!(stats.commits as i128, total, "one commit per increment");
    let mut fed = 0u64;
    for p in 0..b.layout().partitions() {
        fed += b.read_feed(p, 0, 10_000).await.unwrap().entries.len() as u64;
    }
    assert_eq!(fed, stats.commits, "one feed entry per commit");
    assert!(stats.grouped_writes > 0, "writes were grouped: {stats:?}");
    assert!(
        stats.write_calls < stats.commits,
        "grouped writes share write script calls: {stats:?}"
    );
}

/// One write script call carries many commits, each checked and committed on its own: a
/// command failing for one item (its partition's feed replaced by a string, written by
/// `redis-cli`) fails that item only; the other items of the same call commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_item_does_not_fail_the_rest_of_its_script_call() {
    use geostate_backends::{Key, StateBackend};

    let ns = Namespace::new(shared_server(), "isolate");
    let config = ns.config(Layout::default());
    let prefix = config.key_prefix.clone();
    let b = connect(config).await;
    let layout = b.layout().clone();
    let keys: Vec<Key> = (0..40)
        .map(|i| Key::new(format!("isolate:{i}")).unwrap())
        .collect();
    let broken = layout.partition_of(&keys[7]);
    let feed = format!("{{{prefix}p{broken}}}:f");
    redis_cli(6379, &["SET", &feed, "not a stream"]);
    let writes = keys
        .iter()
        .enumerate()
        .map(|(i, k)| counter_write(k, i as u64 + 1))
        .collect();
    let outcomes = b.apply_many(writes).await.unwrap();
    assert_eq!(b.stats().write_calls, 1, "one script call for the batch");
    for (key, outcome) in keys.iter().zip(&outcomes) {
        if layout.partition_of(key) == broken {
            match outcome {
                Err(BackendError::Unavailable(m)) => {
                    assert!(m.contains("WRONGTYPE"), "{key}: {m}")
                }
                other => panic!("{key}: expected the feed's error, got {other:?}"),
            }
        } else {
            let receipt = outcome.as_ref().unwrap_or_else(|e| panic!("{key}: {e}"));
            assert_eq!(receipt.seq, Some(1), "{key}: the first entry of its feed");
            assert_eq!(counter_of(&b.get(key).await.unwrap().unwrap()), 1, "{key}");
        }
    }
    assert_eq!(
        redis_cli(6379, &["GET", &feed]),
        "not a stream",
        "left as found"
    );
}

/// The feed is trimmed by whole stream nodes (`XADD .. MAXLEN ~`, cheap) rather than one entry
/// per write: the stream may hold a few entries more than `feed_entries_max`, and reads hide
/// them, so a reader sees exactly the newest `feed_entries_max` entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_is_trimmed_by_whole_nodes_and_reads_see_the_bound() {
    use geostate_backends::{Key, StateBackend};

    const KEPT: usize = 200;
    let ns = Namespace::new(shared_server(), "trim");
    let config = ns.config(Layout::new(4, 4, 1 << 20, KEPT).unwrap());
    let prefix = config.key_prefix.clone();
    let b = connect(config).await;
    let p = 0;
    let keys: Vec<Key> = (0u64..)
        .map(|i| Key::new(format!("trim:{i}")).unwrap())
        .filter(|k| b.layout().partition_of(k) == p)
        .take(10)
        .collect();
    let total = 3 * KEPT as u64 + 57;
    for i in 0..total {
        b.apply(counter_write(&keys[(i % 10) as usize], i + 1))
            .await
            .unwrap();
    }
    let held: usize = redis_cli(6379, &["XLEN", &format!("{{{prefix}p{p}}}:f")])
        .parse()
        .unwrap();
    println!("the stream holds {held} entries for a bound of {KEPT}");
    assert!(
        (KEPT..KEPT + 200).contains(&held),
        "the stream holds about {KEPT} entries, by whole nodes: {held}"
    );
    let mut seqs = Vec::new();
    let mut after = 0;
    loop {
        let page = b.read_feed(p, after, 64).await.unwrap();
        if after == 0 {
            assert_eq!(
                (page.first_seq, page.last_seq),
                (total - KEPT as u64 + 1, total)
            );
            assert!(page.missed_after(0));
        }
        let Some(last) = page.entries.last() else {
            break;
        };
        after = last.seq;
        seqs.extend(page.entries.iter().map(|e| e.seq));
    }
    assert_eq!(
        seqs,
        (total - KEPT as u64 + 1..=total).collect::<Vec<_>>(),
        "a reader sees exactly the newest {KEPT}"
    );
}

fn is_corrupt<T: std::fmt::Debug>(r: &Result<T, geostate_backends::BackendError>, what: &str) {
    match r {
        Err(geostate_backends::BackendError::Corrupt { .. }) => {}
        other => panic!("{what}: expected Corrupt, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Corruption written by another client
// ---------------------------------------------------------------------------------------------

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
    assert!(out.status.success(), "redis-cli {args:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_written_by_redis_cli_is_reported_and_kept() {
    use geostate_backends::{Expect, Key, LocalWrite, StateBackend};
    use geostate_crdt::{ActorId, CounterOp, Crdt, Hlc, Op, TypeTag};

    let ns = Namespace::new(shared_server(), "cli");
    let config = ns.config(Layout::default());
    let prefix = config.key_prefix.clone();
    let b = connect(config).await;
    let layout = b.layout().clone();
    let inc = |k: &Key, n: u64| LocalWrite {
        key: k.clone(),
        op: Op::from(CounterOp::inc(n)),
        actor: ActorId::new(1),
        hlc: Hlc::new(1, 0),
        expect: Expect::Any,
    };
    let delta = Crdt::empty(TypeTag::PnCounter)
        .apply(ActorId::new(2), Hlc::new(1, 0), &CounterOp::inc(1).into())
        .unwrap();
    let name_of = |k: &Key| format!("{{{prefix}p{}}}:v:{k}", layout.partition_of(k));

    let victim = Key::new("cli:victim").unwrap();
    b.apply(inc(&victim, 5)).await.unwrap();
    let p = layout.partition_of(&victim);
    let feed_before = b.read_feed(p, 0, 100).await.unwrap();
    let digest_before = b.digest(p).await.unwrap();
    let name = name_of(&victim);

    for (how, commands) in [
        ("SET garbage", vec![vec!["SET", name.as_str(), "garbage"]]),
        ("SET empty", vec![vec!["SET", name.as_str(), ""]]),
        (
            "a hash instead of a string",
            vec![
                vec!["DEL", name.as_str()],
                vec!["HSET", name.as_str(), "f", "v"],
            ],
        ),
    ] {
        for c in &commands {
            redis_cli(6379, c);
        }
        let raw_type = redis_cli(6379, &["TYPE", &name]);
        let raw = redis_cli(6379, &["DUMP", &name]);
        is_corrupt(&b.get(&victim).await, &format!("{how}: get"));
        is_corrupt(&b.apply(inc(&victim, 1)).await, &format!("{how}: apply"));
        is_corrupt(&b.merge(&victim, &delta).await, &format!("{how}: merge"));
        let many = b.apply_many(vec![inc(&victim, 1)]).await.unwrap();
        is_corrupt(&many[0], &format!("{how}: apply_many"));
        let page = b.scan("cli:", None, 10).await.unwrap();
        is_corrupt(&page.items[0].value, &format!("{how}: scan"));
        assert_eq!(
            redis_cli(6379, &["TYPE", &name]),
            raw_type,
            "{how}: type kept"
        );
        assert_eq!(redis_cli(6379, &["DUMP", &name]), raw, "{how}: bytes kept");
        assert_eq!(
            b.read_feed(p, 0, 100).await.unwrap(),
            feed_before,
            "{how}: nothing fed"
        );
        assert_eq!(
            b.digest(p).await.unwrap(),
            digest_before,
            "{how}: digest kept"
        );
    }
    assert!(b.delete(&victim).await.unwrap(), "delete repairs");
    b.apply(inc(&victim, 2)).await.unwrap();

    // A key written only by redis-cli, never by the store.
    let stray = Key::new("cli:stray").unwrap();
    redis_cli(6379, &["SET", &name_of(&stray), "\u{1}\u{2}"]);
    is_corrupt(&b.get(&stray).await, "stray: get");
    is_corrupt(&b.apply(inc(&stray, 1)).await, "stray: apply");
    assert!(
        b.delete(&stray).await.unwrap(),
        "a stray key can be deleted"
    );
    assert_eq!(b.get(&stray).await.unwrap(), None);
}

/// A namespace keeps its layout: a store with other partition or bucket counts is refused.
/// `purge` deletes every key of its namespace and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layout_is_fixed_per_namespace_and_purge_cleans_it() {
    use geostate_backends::{BackendError, Key, StateBackend};

    let ns = Namespace::new(shared_server(), "purge");
    let config = ns.config(Layout::default());
    let prefix = config.key_prefix.clone();
    let neighbour = connect(ns.config(Layout::default())).await;
    let b = connect(config.clone()).await;
    let other = config
        .clone()
        .with_layout(Layout::new(128, 64, 1 << 20, 1_000).unwrap());
    match RedisBackend::connect(other).await {
        Err(BackendError::InvalidArgument(m)) => assert!(m.contains("laid out"), "{m}"),
        other => panic!("another layout on the same prefix: {other:?}"),
    }
    let same_counts = config.with_layout(Layout::new(256, 64, 4096, 16).unwrap());
    connect(same_counts).await; // other limits are fine

    for i in 0..300u64 {
        let k = Key::new(format!("purge:{i}")).unwrap();
        b.apply(counter_write(&k, i)).await.unwrap();
        neighbour.apply(counter_write(&k, i)).await.unwrap();
    }
    b.advance_cursor("us-east", 3, 7).await.unwrap();
    b.append_conflict(b"c".to_vec()).await.unwrap();
    let count = |pattern: String| {
        let client = redis::Client::open(SHARED_URL).unwrap();
        let mut con = client.get_connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query(&mut con).unwrap();
        keys.len()
    };
    let mine = format!("{{{prefix}*");
    assert!(count(mine.clone()) > 300);
    let deleted = b.purge_namespace().await.unwrap();
    assert!(deleted > 300, "purge deleted {deleted} keys");
    assert_eq!(count(mine), 0, "purge leaves nothing of its namespace");
    let k = Key::new("purge:1").unwrap();
    assert!(
        neighbour.get(&k).await.unwrap().is_some(),
        "another namespace is untouched"
    );
}

// ---------------------------------------------------------------------------------------------
// Two processes
// ---------------------------------------------------------------------------------------------

const CHILD_PREFIX_VAR: &str = "GEOSTATE_REDIS_CHILD_PREFIX";
const PROCESS_TASKS: u64 = 4;
const PROCESS_INCREMENTS: u64 = 500;

/// Both processes' part: `PROCESS_TASKS` tasks making `PROCESS_INCREMENTS` increments each on
/// one key, all as actor 1 (one actor shared by two processes: dots must be minted inside the
/// store's atomic step). Waits for the other process first, through a counter in Redis.
async fn increment_as_one_of_two(prefix: &str) -> geostate_backends::redis::RedisStats {
    use geostate_backends::{Expect, Key, LocalWrite, StateBackend};
    use geostate_crdt::{ActorId, CounterOp, Hlc, Op};

    let config = RedisConfig::standalone(shared_server()).with_key_prefix(prefix);
    let b = std::sync::Arc::new(connect(config).await);
    let client = redis::Client::open(SHARED_URL).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let ready = format!("{{{prefix}x}}:test-ready");
    let _: u64 = redis::cmd("INCR")
        .arg(&ready)
        .query_async(&mut con)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: u64 = redis::cmd("GET")
            .arg(&ready)
            .query_async(&mut con)
            .await
            .unwrap();
        if n >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other process never showed up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let key = Key::new("two-processes").unwrap();
    let tasks: Vec<_> = (0..PROCESS_TASKS)
        .map(|t| {
            let (b, key) = (std::sync::Arc::clone(&b), key.clone());
            tokio::spawn(async move {
                for i in 0..PROCESS_INCREMENTS {
                    b.apply(LocalWrite {
                        key: key.clone(),
                        op: Op::from(CounterOp::inc(1)),
                        actor: ActorId::new(1),
                        hlc: Hlc::new(i, 0),
                        expect: Expect::Any,
                    })
                    .await
                    .unwrap_or_else(|e| panic!("task {t}, increment {i}: {e}"));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    b.stats()
}

/// Two OS processes increment one key concurrently. The test binary re-runs this same test
/// as the second process: with `GEOSTATE_REDIS_CHILD_PREFIX` set it is the child and only writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_increment_one_key() {
    use geostate_backends::{Key, StateBackend};
    use geostate_crdt::{Crdt, TypeTag};

    if let Ok(prefix) = std::env::var(CHILD_PREFIX_VAR) {
        let stats = increment_as_one_of_two(&prefix).await;
        println!("child process: {stats:?}");
        return;
    }
    let ns = Namespace::new(shared_server(), "procs");
    let prefix = ns.prefix();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "two_processes_increment_one_key", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_PREFIX_VAR, &prefix)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let child = ChildGuard(Some(child));
    let started = Instant::now();
    let stats = increment_as_one_of_two(&prefix).await;
    let out = child.wait_output();
    let child_out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the child process failed:\n{child_out}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        child_out.contains("child process:"),
        "the child did not run its writes:\n{child_out}"
    );
    println!("parent process: {stats:?} ({:?})", started.elapsed());
    for line in child_out.lines().filter(|l| l.contains("child process:")) {
        println!("{line}");
    }

    let b = connect(RedisConfig::standalone(SHARED_URL).with_key_prefix(&prefix)).await;
    let key = Key::new("two-processes").unwrap();
    let total = 2 * PROCESS_TASKS * PROCESS_INCREMENTS;
    let stored = b.get(&key).await.unwrap().expect("the key holds a counter");
    let Crdt::PnCounter(counter) = &stored.value else {
        panic!("not a counter: {:?}", stored.value.type_tag());
    };
    assert_eq!(
        counter.value(),
        i128::from(total),
        "two processes x {PROCESS_TASKS} tasks x {PROCESS_INCREMENTS} increments: updates lost"
    );
    let p = b.layout().partition_of(&key);
    let mut replay = Crdt::empty(TypeTag::PnCounter);
    let mut after = 0;
    let mut seqs = 0;
    loop {
        let page = b.read_feed(p, after, 1_000).await.unwrap();
        let Some(last) = page.entries.last() else {
            break;
        };
        after = last.seq;
        for e in &page.entries {
            seqs += 1;
            assert_eq!(e.seq, seqs, "feed seqs are 1, 2, 3, ...");
            replay.merge(&e.delta).unwrap();
        }
    }
    assert_eq!(seqs, total, "every increment was fed once");
    assert_eq!(replay, stored.value, "the feed rebuilds the value");
}

/// Kills a child process when dropped (a failed test must not leave it running).
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn wait_output(mut self) -> std::process::Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Servers this file starts itself
// ---------------------------------------------------------------------------------------------

/// Redis processes started by a test in a temporary directory; all killed and the directory
/// removed when dropped.
struct Servers {
    dir: PathBuf,
    children: Vec<(u16, Child)>,
}

impl Servers {
    fn new(name: &str) -> Self {
        shared_server(); // installs redis-server if needed
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "geostate-redis-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            dir,
            children: Vec::new(),
        }
    }

    /// Free loopback ports whose cluster bus ports (+10,000) are free too.
    fn free_ports(n: usize) -> Vec<u16> {
        let mut held = Vec::new();
        let mut ports = Vec::new();
        while ports.len() < n {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            if port < 55_000 {
                if let Ok(bus) = std::net::TcpListener::bind(("127.0.0.1", port + 10_000)) {
                    ports.push(port);
                    held.push(bus);
                }
            }
            held.push(l);
        }
        ports
    }

    /// Starts `redis-server` on `port` with `args` (a config file path first, if any).
    fn start(&mut self, port: u16, args: &[String]) {
        let log = std::fs::File::create(self.dir.join(format!("{port}.log"))).unwrap();
        let child = Command::new("redis-server")
            .args(args)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", self.dir.to_str().unwrap()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"));
        self.children.push((port, child));
        wait_for_ping(port);
    }

    /// Starts a sentinel with the config file `conf` (which names its port).
    fn start_sentinel(&mut self, port: u16, conf: &Path) {
        let log = std::fs::File::create(self.dir.join(format!("{port}.log"))).unwrap();
        let child = Command::new("redis-server")
            .arg(conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start a sentinel: {e}"));
        self.children.push((port, child));
        wait_for_ping(port);
    }

    /// Kills the server on `port` (SIGKILL: no goodbye to clients or replicas).
    fn kill(&mut self, port: u16) {
        if let Some(i) = self.children.iter().position(|(p, _)| *p == port) {
            let (_, mut child) = self.children.remove(i);
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether a `SENTINEL MASTER gs` reply shows the replica and the two other sentinels.
fn sentinels_met(info: &str) -> bool {
    let lines: Vec<&str> = info.lines().collect();
    let field = |name: &str| {
        lines
            .iter()
            .position(|l| *l == name)
            .and_then(|i| lines.get(i + 1))
            .copied()
    };
    field("num-slaves") == Some("1") && field("num-other-sentinels") == Some("2")
}

fn wait_for_ping(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pong = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "ping"])
            .stdin(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
            .unwrap_or(false);
        if pong {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on port {port} does not answer"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A 3-primary, 3-replica Redis Cluster on loopback.
fn start_cluster(servers: &mut Servers) -> Vec<String> {
    let ports = Servers::free_ports(6);
    for &port in &ports {
        let conf = format!("nodes-{port}.conf");
        servers.start(
            port,
            &[
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                conf,
                "--cluster-node-timeout".into(),
                "3000".into(),
            ],
        );
    }
    let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&nodes)
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "redis-cli --cluster create failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for &port in &ports {
        loop {
            if redis_cli(port, &["cluster", "info"]).contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster never became ok");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}/"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_passes_the_suite() {
    let mut servers = Servers::new("cluster");
    let started = Instant::now();
    let urls = start_cluster(&mut servers);
    println!("cluster up in {:?}", started.elapsed());
    let counter = AtomicU64::new(0);
    let config = |layout: Layout| {
        RedisConfig::cluster(urls.clone())
            .with_key_prefix(format!("c{}:", counter.fetch_add(1, Ordering::Relaxed)))
            .with_layout(layout)
    };
    let started = Instant::now();
    suite::test_all(|| {
        let config = config(Layout::default());
        async move { connect(config).await }
    })
    .await;
    suite::test_small_layout(|| {
        let config = config(suite::small_layout());
        async move { connect(config).await }
    })
    .await;
    println!("cluster suite: {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Circuit breaker (on a server this test starts and kills)
// ---------------------------------------------------------------------------------------------

fn counter_write(key: &geostate_backends::Key, i: u64) -> geostate_backends::LocalWrite {
    geostate_backends::LocalWrite {
        key: key.clone(),
        op: geostate_crdt::Op::from(geostate_crdt::CounterOp::inc(1)),
        actor: geostate_crdt::ActorId::new(1),
        hlc: geostate_crdt::Hlc::new(i, 0),
        expect: geostate_backends::Expect::Any,
    }
}

fn counter_of(stored: &geostate_backends::Stored) -> i128 {
    match &stored.value {
        geostate_crdt::Crdt::PnCounter(c) => c.value(),
        other => panic!("not a counter: {:?}", other.type_tag()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_while_the_store_is_down_and_closes_when_it_is_back() {
    use geostate_backends::redis::BreakerState;
    use geostate_backends::{BackendError, Key, StateBackend};

    let mut servers = Servers::new("breaker");
    let port = Servers::free_ports(1)[0];
    servers.start(port, &[]);
    let mut config =
        RedisConfig::standalone(format!("redis://127.0.0.1:{port}/")).with_key_prefix("br:");
    config.breaker.failures_to_open = 3;
    config.breaker.open_for = Duration::from_millis(300);
    config.retry.attempts_max = 2;
    config.retry.backoff_min = Duration::from_millis(5);
    config.retry.backoff_max = Duration::from_millis(20);
    config.connect_timeout = Duration::from_millis(300);
    config.response_timeout = Duration::from_millis(500);
    let b = connect(config).await;
    let k = Key::new("breaker:counter").unwrap();
    b.apply(counter_write(&k, 1)).await.unwrap();
    assert_eq!(b.breaker_state(), BreakerState::Closed);

    servers.kill(port);
    let down = Instant::now();
    let mut failures = 0;
    while b.breaker_state() != BreakerState::Open {
        match b.get(&k).await {
            Err(BackendError::Unavailable(_)) => failures += 1,
            other => panic!("a read from a dead store: {other:?}"),
        }
        assert!(failures < 20, "the breaker never opened");
    }
    println!(
        "breaker opened after {failures} failed reads, {:?}",
        down.elapsed()
    );
    let t = Instant::now();
    match b.get(&k).await {
        Err(BackendError::Unavailable(m)) => assert!(m.contains("circuit breaker"), "{m}"),
        other => panic!("an open breaker must refuse: {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_millis(50),
        "an open breaker fails fast"
    );
    match b.apply(counter_write(&k, 2)).await {
        Err(BackendError::Unavailable(m)) => {
            assert!(m.contains("nothing was written"), "{m}");
        }
        other => panic!("a write to an open breaker: {other:?}"),
    }
    assert!(b.ping().await.is_err(), "PING of a dead store");

    // Back (empty: this server keeps nothing on disk).
    servers.start(port, &[]);
    let back = Instant::now();
    let deadline = back + Duration::from_secs(15);
    let mut refused = 0;
    loop {
        match b.apply(counter_write(&k, 3)).await {
            Ok(_) => break,
            Err(BackendError::Unavailable(_)) => refused += 1,
            Err(e) => panic!("unexpected error after the store came back: {e}"),
        }
        assert!(Instant::now() < deadline, "the breaker never closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "store back: the first write succeeded after {:?} ({refused} refused meanwhile)",
        back.elapsed()
    );
    assert_eq!(b.breaker_state(), BreakerState::Closed);
    assert_eq!(counter_of(&b.get(&k).await.unwrap().unwrap()), 1);
    let stats = b.stats();
    assert!(
        stats.breaker_trips >= 1 && stats.breaker_rejections >= 1,
        "{stats:?}"
    );
    assert!(b.ping().await.is_ok());
}

// ---------------------------------------------------------------------------------------------
// Sentinel failover (servers this test starts and kills)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_resumes_writes_and_keeps_waited_writes() {
    use geostate_backends::redis::Durability;
    use geostate_backends::{BackendError, Key, StateBackend};

    let mut servers = Servers::new("sentinel");
    let ports = Servers::free_ports(5);
    let (master, replica, sentinels) = (ports[0], ports[1], &ports[2..]);
    servers.start(master, &[]);
    servers.start(
        replica,
        &["--replicaof".into(), "127.0.0.1".into(), master.to_string()],
    );
    for &port in sentinels {
        let conf = servers.dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor gs 127.0.0.1 {master} 2\n\
                 sentinel down-after-milliseconds gs 1000\n\
                 sentinel failover-timeout gs 4000\n\
                 sentinel parallel-syncs gs 1\n",
                servers.dir.display()
            ),
        )
        .unwrap();
        servers.start_sentinel(port, &conf);
    }
    // Every sentinel knows the replica and the other sentinels.
    let deadline = Instant::now() + Duration::from_secs(30);
    for &port in sentinels {
        loop {
            let info = redis_cli(port, &["sentinel", "master", "gs"]);
            if sentinels_met(&info) {
                break;
            }
            assert!(Instant::now() < deadline, "the sentinels never met: {info}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // The replica is in sync (WAIT needs it).
    loop {
        let info = redis_cli(master, &["info", "replication"]);
        if info.contains("connected_slaves:1") && info.contains("state=online") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never synced: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let urls: Vec<String> = sentinels
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}/"))
        .collect();
    let mut config = RedisConfig::sentinel(urls, "gs").with_key_prefix("sn:");
    config.durability = Durability::Wait {
        replicas: 1,
        timeout: Duration::from_millis(500),
    };
    config.connect_timeout = Duration::from_millis(500);
    config.response_timeout = Duration::from_millis(1_000);
    config.breaker.open_for = Duration::from_millis(200);
    let b = std::sync::Arc::new(connect(config).await);
    let k = Key::new("failover:counter").unwrap();

    // A writer that runs through the failover.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (b, k, stop) = (
            std::sync::Arc::clone(&b),
            k.clone(),
            std::sync::Arc::clone(&stop),
        );
        tokio::spawn(async move {
            let (mut acked, mut maybe, mut refused) = (0u64, 0u64, 0u64);
            let mut last_ok = Instant::now();
            let mut gap_max = Duration::ZERO;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                match b.apply(counter_write(&k, i)).await {
                    Ok(_) => {
                        acked += 1;
                        gap_max = gap_max.max(last_ok.elapsed());
                        last_ok = Instant::now();
                    }
                    Err(BackendError::Unavailable(m)) if m.contains("nothing was written") => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(BackendError::Unavailable(_)) => {
                        maybe += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("write {i}: {e}"),
                }
            }
            (acked, maybe, refused, gap_max)
        })
    };
    let acked_before = |b: &RedisBackend| b.stats().commits;
    let deadline = Instant::now() + Duration::from_secs(10);
    while acked_before(&b) < 200 {
        assert!(Instant::now() < deadline, "the writer makes no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    servers.kill(master);
    let killed = Instant::now();
    let commits_at_kill = b.stats().commits;
    // Wait for the sentinels to promote the replica, then bring the old master back as a
    // replica of the new one (as an operator would; the sentinels would too, after their next
    // INFO round), so that WAIT can be satisfied again.
    let deadline = killed + Duration::from_secs(30);
    loop {
        let addr = redis_cli(sentinels[0], &["sentinel", "get-master-addr-by-name", "gs"]);
        if addr.lines().nth(1) == Some(replica.to_string().as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "no failover: {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let promoted = killed.elapsed();
    servers.start(
        master,
        &[
            "--replicaof".into(),
            "127.0.0.1".into(),
            replica.to_string(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.stats().commits < commits_at_kill + 200 {
        assert!(
            Instant::now() < deadline,
            "writes did not resume after the failover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = killed.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (acked, maybe, refused, gap_max) = writer.await.unwrap();
    let value = counter_of(&b.get(&k).await.unwrap().unwrap());
    let stats = b.stats();
    println!(
        "sentinel failover: replica promoted {promoted:?} after the kill, writes resumed \
         {resumed:?} after the kill (longest gap between acknowledged writes {gap_max:?}); \
         acknowledged {acked}, ambiguous {maybe}, refused {refused}; counter {value}; {stats:?}"
    );
    assert!(stats.rediscoveries >= 1, "the client followed the failover");
    // With WAIT, every acknowledged write reached the replica that was promoted.
    assert!(
        value >= i128::from(acked) && value <= i128::from(acked + maybe),
        "acknowledged {acked}, ambiguous {maybe}, but the counter is {value}"
    );
}

// ---------------------------------------------------------------------------------------------
// TLS (on a server this test starts, with a throwaway CA)
// ---------------------------------------------------------------------------------------------

/// Runs `openssl` with `args` in `dir`; fails the test with its output if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (needed to make test certificates): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway CA named `name` in `dir` (`<name>.pem`, `<name>.key`).
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=geostate test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
    dir.join(format!("{name}.pem"))
}

/// A server certificate for 127.0.0.1 and localhost signed by the CA `ca` (made by
/// [`make_ca`]): returns the certificate and key files.
fn make_server_cert(dir: &Path, ca: &str) -> (PathBuf, PathBuf) {
    make_cert(dir, ca, "server", "serverAuth")
}

/// A certificate `<name>.pem` (key `<name>.key`) for 127.0.0.1 and localhost signed by the CA
/// `ca`, for the extended key usages `usages` (e.g. `serverAuth,clientAuth`).
fn make_cert(dir: &Path, ca: &str, name: &str, usages: &str) -> (PathBuf, PathBuf) {
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage={usages}\n"
        ),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

impl Servers {
    /// Starts `redis-server` listening only with TLS (`--port 0`) on `tls_port`, presenting
    /// `cert`, not asking clients for certificates.
    fn start_tls(&mut self, tls_port: u16, ca: &Path, cert: &Path, key: &Path) {
        let no_client_certs = ["--tls-auth-clients".to_string(), "no".to_string()];
        self.start_tls_with(tls_port, ca, cert, key, &no_client_certs, None);
    }

    /// Starts `redis-server` listening only with TLS on `tls_port` with `extra` arguments;
    /// `client` is the certificate and key that `redis-cli` presents to check it is up.
    fn start_tls_with(
        &mut self,
        tls_port: u16,
        ca: &Path,
        cert: &Path,
        key: &Path,
        extra: &[String],
        client: Option<(&Path, &Path)>,
    ) {
        let log = std::fs::File::create(self.dir.join(format!("{tls_port}.log"))).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &tls_port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--tls-cert-file")
            .arg(cert)
            .arg("--tls-key-file")
            .arg(key)
            .arg("--tls-ca-cert-file")
            .arg(ca)
            .args(extra)
            .args(["--dir", self.dir.to_str().unwrap()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"));
        self.children.push((tls_port, child));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let pong = tls_cli(ca, client, tls_port)
                .arg("ping")
                .stdin(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
                .unwrap_or(false);
            if pong {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server with TLS on port {tls_port} does not answer; its log:\n{}",
                std::fs::read_to_string(self.dir.join(format!("{tls_port}.log")))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `redis-cli` over TLS to `port`, trusting `ca`, presenting `client` if given.
fn tls_cli(ca: &Path, client: Option<(&Path, &Path)>, port: u16) -> Command {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["--tls", "--cacert"]).arg(ca);
    if let Some((cert, key)) = client {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    cmd
}

fn assert_tls_refused(result: Result<RedisBackend, BackendError>, what: &str) {
    match result {
        Err(BackendError::Tls(message)) => {
            assert!(message.contains("certificate"), "{what}: {message}");
            println!("{what}: refused as expected: {message}");
        }
        Err(other) => panic!("{what}: expected a TLS error, got {other:?}"),
        Ok(_) => panic!("{what}: connected although the server's certificate is not trusted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_server_passes_the_small_layout_cases_and_untrusted_ones_are_refused() {
    let mut servers = Servers::new("tls");
    let dir = servers.dir.clone();
    let ca = make_ca(&dir, "ca");
    let other_ca = make_ca(&dir, "other-ca");
    let (cert, key) = make_server_cert(&dir, "ca");
    let port = Servers::free_ports(1)[0];
    servers.start_tls(port, &ca, &cert, &key);
    let url = format!("rediss://127.0.0.1:{port}/");

    let counter = AtomicU64::new(0);
    let config = |layout: Layout| {
        RedisConfig::standalone(url.clone())
            .with_tls(RedisTls::trusting(&ca))
            .with_key_prefix(format!("t{}:", counter.fetch_add(1, Ordering::Relaxed)))
            .with_layout(layout)
    };
    let started = Instant::now();
    suite::test_small_layout(|| {
        let config = config(suite::small_layout());
        async move { connect(config).await }
    })
    .await;
    println!("small-layout cases over TLS: {:?}", started.elapsed());

    // The server has no plaintext port, so the suite above ran over TLS; it also serves a
    // client that trusts the CA through its own handle.
    let store = connect(config(Layout::default())).await;
    store.ping().await.unwrap();

    // Not trusting the test CA: the system trust store, then another CA.
    let untrusted = RedisConfig::standalone(url.clone()).with_key_prefix("t-untrusted:");
    assert_tls_refused(RedisBackend::connect(untrusted).await, "system trust store");
    let other = RedisConfig::standalone(url.clone())
        .with_tls(RedisTls::trusting(&other_ca))
        .with_key_prefix("t-other:");
    assert_tls_refused(RedisBackend::connect(other).await, "another CA");

    // TLS settings with a plaintext URL are refused before connecting.
    let plain = RedisConfig::standalone(format!("redis://127.0.0.1:{port}/"))
        .with_tls(RedisTls::trusting(&ca));
    assert!(matches!(
        RedisBackend::connect(plain).await,
        Err(BackendError::InvalidArgument(_))
    ));
    // A CA file that does not exist is a TLS error naming the file.
    let missing =
        RedisConfig::standalone(url.clone()).with_tls(RedisTls::trusting(dir.join("missing.pem")));
    match RedisBackend::connect(missing).await {
        Err(BackendError::Tls(m)) => assert!(m.contains("missing.pem"), "{m}"),
        Err(other) => panic!("a missing CA file: expected a TLS error, got {other:?}"),
        Ok(_) => panic!("connected with a missing CA file"),
    }
    drop(store);
    drop(servers);
}

/// Redis Cluster over TLS with client certificates required (`tls-auth-clients yes`), nodes
/// talking TLS to each other too: the small-layout cases pass through the cluster client's
/// secure mode, and a client without a certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_cluster_with_client_certificates_passes_the_small_layout_cases() {
    let mut servers = Servers::new("tls-cluster");
    let dir = servers.dir.clone();
    let ca = make_ca(&dir, "ca");
    // One certificate for the nodes (servers to clients, clients to each other) and one for
    // our client.
    let (node_cert, node_key) = make_cert(&dir, "ca", "node", "serverAuth,clientAuth");
    let (client_cert, client_key) = make_cert(&dir, "ca", "client", "clientAuth");
    let ports = Servers::free_ports(6);
    let started = Instant::now();
    for &port in &ports {
        let extra: Vec<String> = [
            "--tls-auth-clients",
            "yes",
            "--tls-cluster",
            "yes",
            "--tls-replication",
            "yes",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &format!("nodes-{port}.conf"),
            "--cluster-node-timeout",
            "3000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        servers.start_tls_with(
            port,
            &ca,
            &node_cert,
            &node_key,
            &extra,
            Some((&client_cert, &client_key)),
        );
    }
    let client = Some((client_cert.as_path(), client_key.as_path()));
    let out = tls_cli(&ca, client, ports[0])
        .args(["--cluster", "create"])
        .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "redis-cli --cluster create over TLS failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for &port in &ports {
        loop {
            let info = tls_cli(&ca, client, port)
                .args(["cluster", "info"])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "the TLS cluster never became ok");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("TLS cluster up in {:?}", started.elapsed());
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("rediss://127.0.0.1:{p}/"))
        .collect();
    let tls = RedisTls::trusting(&ca).with_client_cert(&client_cert, &client_key);
    let counter = AtomicU64::new(0);
    let config = |layout: Layout| {
        RedisConfig::cluster(urls.clone())
            .with_tls(tls.clone())
            .with_key_prefix(format!("tc{}:", counter.fetch_add(1, Ordering::Relaxed)))
            .with_layout(layout)
    };
    let started = Instant::now();
    suite::test_small_layout(|| {
        let config = config(suite::small_layout());
        async move { connect(config).await }
    })
    .await;
    println!(
        "small-layout cases on the TLS cluster: {:?}",
        started.elapsed()
    );

    // Trusting the CA but presenting no certificate: the nodes refuse the handshake.
    let anonymous = RedisConfig::cluster(urls.clone())
        .with_tls(RedisTls::trusting(&ca))
        .with_key_prefix("tc-anonymous:");
    match RedisBackend::connect(anonymous).await {
        Err(BackendError::Tls(e)) => println!("no client certificate: refused as expected: {e}"),
        Err(other) => panic!("no client certificate: expected a TLS error, got {other:?}"),
        Ok(_) => panic!("the cluster served a client without a certificate"),
    }
    drop(servers);
}

/// Sentinel over TLS: a master and its replica listening only with TLS (replication over TLS
/// too), and three sentinels reached over TLS that watch the master over TLS. The client
/// finds the master through the sentinels and the small-layout cases pass on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_sentinel_finds_the_master_and_passes_the_small_layout_cases() {
    let mut servers = Servers::new("tls-sentinel");
    let dir = servers.dir.clone();
    let ca = make_ca(&dir, "ca");
    let (cert, key) = make_cert(&dir, "ca", "node", "serverAuth,clientAuth");
    let ports = Servers::free_ports(5);
    let (master, replica, sentinels) = (ports[0], ports[1], &ports[2..]);
    let tls_args = |more: &[&str]| -> Vec<String> {
        ["--tls-auth-clients", "no", "--tls-replication", "yes"]
            .iter()
            .chain(more)
            .map(|s| s.to_string())
            .collect()
    };
    servers.start_tls_with(master, &ca, &cert, &key, &tls_args(&[]), None);
    let master_port = master.to_string();
    servers.start_tls_with(
        replica,
        &ca,
        &cert,
        &key,
        &tls_args(&["--replicaof", "127.0.0.1", &master_port]),
        None,
    );
    for &port in sentinels {
        let conf = dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port 0\ntls-port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {ca}\n\
                 tls-auth-clients no\ntls-replication yes\n\
                 sentinel monitor gs 127.0.0.1 {master} 2\n\
                 sentinel down-after-milliseconds gs 1000\n\
                 sentinel failover-timeout gs 4000\n",
                dir = dir.display(),
                cert = cert.display(),
                key = key.display(),
                ca = ca.display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join(format!("{port}.log"))).unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start a sentinel: {e}"));
        servers.children.push((port, child));
    }
    // Every sentinel answers over TLS and knows the replica and the other sentinels.
    let deadline = Instant::now() + Duration::from_secs(30);
    for &port in sentinels {
        loop {
            let out = tls_cli(&ca, None, port)
                .args(["sentinel", "master", "gs"])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let info = String::from_utf8_lossy(&out.stdout).to_string();
            if sentinels_met(&info) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels never met over TLS: {info}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let urls: Vec<String> = sentinels
        .iter()
        .map(|p| format!("rediss://127.0.0.1:{p}/"))
        .collect();
    let counter = AtomicU64::new(0);
    let config = |layout: Layout| {
        RedisConfig::sentinel(urls.clone(), "gs")
            .with_tls(RedisTls::trusting(&ca))
            .with_key_prefix(format!("ts{}:", counter.fetch_add(1, Ordering::Relaxed)))
            .with_layout(layout)
    };
    suite::test_small_layout(|| {
        let config = config(suite::small_layout());
        async move { connect(config).await }
    })
    .await;
    // The writes went to the master (the only server the replica copies from).
    let out = tls_cli(&ca, None, master)
        .args(["info", "keyspace"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("keys="),
        "the master holds no keys"
    );
    drop(servers);
}

/// Writers in two handles hammer one key with a single attempt each: every write either
/// commits or fails with `Contention`, and a failed one wrote nothing (the counter equals the
/// committed increments). A write whose only lost race came from a stale cache entry is not
/// contention: it reads and commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contention_give_up_is_typed_and_writes_nothing() {
    use geostate_backends::{BackendError, Expect, Key, LocalWrite, StateBackend};
    use geostate_crdt::{ActorId, CounterOp, Crdt, Hlc, Op};
    use std::sync::Arc;

    let ns = Namespace::new(shared_server(), "contention");
    let mut config = ns.config(Layout::default());
    config.contention.attempts_max = 1;
    let a = Arc::new(connect(config.clone()).await);
    let b = Arc::new(connect(config).await);
    let k = Key::new("contended").unwrap();
    let inc = |actor: u64| LocalWrite {
        key: k.clone(),
        op: Op::from(CounterOp::inc(1)),
        actor: ActorId::new(actor),
        hlc: Hlc::new(1, 0),
        expect: Expect::Any,
    };
    // A stale cache entry with one attempt allowed: still commits.
    a.apply(inc(1)).await.unwrap();
    b.apply(inc(2)).await.unwrap();
    a.apply(inc(1)).await.unwrap();
    let mut committed = 3u64;

    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let store = if t % 2 == 0 {
            Arc::clone(&a)
        } else {
            Arc::clone(&b)
        };
        let write = inc(10 + t);
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0u64, 0u64);
            for _ in 0..100 {
                match store.apply(write.clone()).await {
                    Ok(_) => ok += 1,
                    Err(BackendError::Contention { attempts, .. }) => {
                        assert_eq!(attempts, 1);
                        refused += 1;
                    }
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            (ok, refused)
        }));
    }
    let mut refused = 0;
    for task in tasks {
        let (ok, r) = task.await.unwrap();
        committed += ok;
        refused += r;
    }
    let total = match a.get(&k).await.unwrap().map(|s| s.value) {
        Some(Crdt::PnCounter(c)) => c.value(),
        other => panic!("expected a counter, got {other:?}"),
    };
    assert_eq!(total, i128::from(committed as i64), "{refused} refused");
    println!("committed {committed}, refused with Contention {refused}");
    assert!(
        refused > 0,
        "no write met contention: the case tested nothing"
    );
    a.purge_namespace().await.unwrap();
}
