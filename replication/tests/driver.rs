//! The async driver with real memory stores, region handles and tokio: regions converge under
//! concurrent writes, cut links, trimmed feeds, replicator crashes and a lossy network.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use geostate_backends::{Layout, MemoryBackend, StateBackend};
use geostate_conflict::ResolvedValue;
use geostate_crdt::{CounterOp, OrSet, PnCounter, SetOp};
use geostate_regions::{Region, RegionConfig, SystemClock};
use geostate_replication::core::CoreConfig;
use geostate_replication::driver::{
    DriverConfig, InProcessTransport, Replicator, Status, Transport,
};
use geostate_replication::wire::{Request, Response};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const NAMES: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const PARTITIONS: u16 = 8;
const BUCKETS: u16 = 8;
const CONVERGE_WITHIN: Duration = Duration::from_secs(10);
/// An anti-entropy interval long enough that no periodic sweep happens during a test.
const NO_SWEEP_MS: u64 = 600_000;

fn driver_config(anti_entropy_interval_ms: u64) -> DriverConfig {
    DriverConfig {
        core: CoreConfig {
            partitions: PARTITIONS,
            polls_per_peer: 3,
            pull_wait_ms: 200,
            feed_batch_max: 32,
            requests_in_flight_max: 8,
            request_timeout_ms: 300,
            retry_backoff_ms: 20,
            retry_backoff_max_ms: 200,
            anti_entropy_interval_ms,
            ae_items_per_round: 1_000,
            ae_symbols_first: 16,
            ae_symbols_per_round_max: 1_024,
            ae_buckets_per_round_max: usize::from(BUCKETS),
            ae_keys_per_round_max: 256,
            gc_interval_ms: 1_000,
            gc_keys_per_round_max: 64,
        },
        tick_ms: 10,
        answers_max: 256,
    }
}

// ---------------------------------------------------------------------------------------------
// A transport with faults
// ---------------------------------------------------------------------------------------------

/// Faults shared by every region's transport.
#[derive(Debug, Default)]
struct Faults {
    /// Cut links, both directions (pairs stored in name order).
    cut: Mutex<HashSet<(String, String)>>,
    /// Lose every `drop_every`-th request (0: never).
    drop_every: u64,
    /// How long a lost request takes to be reported (past the request timeout).
    lost_ms: u64,
    requests: AtomicU64,
    dropped: AtomicU64,
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

impl Faults {
    fn lossy(drop_every: u64, lost_ms: u64) -> Self {
        Self {
            drop_every,
            lost_ms,
            ..Self::default()
        }
    }

    fn cut(&self, a: &str, b: &str) {
        self.cut.lock().unwrap().insert(pair(a, b));
    }

    fn heal(&self) {
        self.cut.lock().unwrap().clear();
    }

    fn is_cut(&self, a: &str, b: &str) -> bool {
        self.cut.lock().unwrap().contains(&pair(a, b))
    }
}

/// One region's view of the network: the in-process transport behind [`Faults`].
#[derive(Debug)]
struct FaultyTransport {
    from: String,
    inner: Arc<InProcessTransport<MemoryBackend>>,
    faults: Arc<Faults>,
}

impl Transport for FaultyTransport {
    async fn request(&self, peer: &str, request: Request) -> Result<Response, String> {
        if self.faults.is_cut(&self.from, peer) {
            return Err(format!("link {} - {peer} is cut", self.from));
        }
        let n = self.faults.requests.fetch_add(1, Ordering::SeqCst);
        let every = self.faults.drop_every;
        if every > 0 && n % every == every - 1 {
            self.faults.dropped.fetch_add(1, Ordering::SeqCst);
            // Alternately the request or its answer is lost; either way the caller hears
            // nothing until after its timeout.
            if (n / every) % 2 == 1 {
                let _ = self.inner.request(peer, request).await;
            }
            tokio::time::sleep(Duration::from_millis(self.faults.lost_ms)).await;
            return Err("lost".into());
        }
        self.inner.request(peer, request).await
    }
}

// ---------------------------------------------------------------------------------------------
// A cluster of regions
// ---------------------------------------------------------------------------------------------

struct Running {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    status: watch::Receiver<Status>,
}

struct Cluster {
    names: Vec<String>,
    stores: Vec<Arc<MemoryBackend>>,
    regions: Vec<Region<MemoryBackend>>,
    transport: Arc<InProcessTransport<MemoryBackend>>,
    faults: Arc<Faults>,
    config: DriverConfig,
    replicators: Vec<Option<Running>>,
}

impl Cluster {
    /// `n` regions (no replicators yet). `aliases` are extra names the transport knows for
    /// existing regions: `(alias, index)`.
    fn new(
        n: usize,
        feed_entries_max: usize,
        config: DriverConfig,
        faults: Faults,
        aliases: &[(&str, usize)],
    ) -> Self {
        let layout = Layout::new(PARTITIONS, BUCKETS, 1 << 20, feed_entries_max).unwrap();
        let names: Vec<String> = NAMES[..n].iter().map(|s| s.to_string()).collect();
        let stores: Vec<Arc<MemoryBackend>> = (0..n)
            .map(|_| Arc::new(MemoryBackend::new(layout.clone())))
            .collect();
        let regions = names
            .iter()
            .zip(&stores)
            .map(|(name, store)| {
                let mut config = RegionConfig::new(name.parse().unwrap());
                config.layout.partitions = PARTITIONS;
                config.layout.buckets = BUCKETS;
                config.layout.value_bytes_max = 1 << 20;
                config.layout.feed_entries_max = feed_entries_max;
                Region::builder(config, store.clone()).build().unwrap()
            })
            .collect();
        let mut known: Vec<(String, Arc<MemoryBackend>)> =
            names.iter().cloned().zip(stores.iter().cloned()).collect();
        for (alias, i) in aliases {
            known.push((alias.to_string(), stores[*i].clone()));
        }
        Self {
            names,
            stores,
            regions,
            transport: Arc::new(InProcessTransport::new(known)),
            faults: Arc::new(faults),
            config,
            replicators: (0..n).map(|_| None).collect(),
        }
    }

    /// Starts region `i`'s replicator, pulling from every other region.
    fn start(&mut self, i: usize) {
        let peers = self
            .names
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, name)| name.clone())
            .collect();
        self.start_with_peers(i, peers);
    }

    fn start_all(&mut self) {
        for i in 0..self.names.len() {
            self.start(i);
        }
    }

    fn start_with_peers(&mut self, i: usize, peers: Vec<String>) {
        assert!(self.replicators[i].is_none(), "already running");
        let transport = Arc::new(FaultyTransport {
            from: self.names[i].clone(),
            inner: self.transport.clone(),
            faults: self.faults.clone(),
        });
        let replicator = Replicator::new(
            self.config.clone(),
            &self.names[i],
            self.stores[i].clone(),
            transport,
            peers,
            Arc::new(SystemClock),
        );
        let (stop, shutdown) = watch::channel(false);
        let (status_tx, status) = watch::channel(Status::default());
        let task = tokio::spawn(replicator.run(shutdown, status_tx));
        self.replicators[i] = Some(Running { task, stop, status });
    }

    /// Kills region `i`'s replicator wherever it is (no orderly shutdown).
    async fn crash(&mut self, i: usize) {
        let running = self.replicators[i].take().expect("not running");
        running.task.abort();
        let outcome = running.task.await;
        assert!(
            outcome.as_ref().is_err_and(|e| e.is_cancelled()),
            "{outcome:?}"
        );
    }

    async fn stop_all(&mut self) {
        for running in self.replicators.iter_mut().filter_map(Option::take) {
            running.stop.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(2), running.task)
                .await
                .expect("the replicator stops when told to")
                .unwrap();
        }
    }

    fn status(&self, i: usize) -> Status {
        self.replicators[i]
            .as_ref()
            .expect("not running")
            .status
            .borrow()
            .clone()
    }

    async fn digests(&self, i: usize) -> Vec<Vec<u64>> {
        let mut all = Vec::new();
        for p in 0..PARTITIONS {
            all.push(self.stores[i].digest(p).await.unwrap().buckets().to_vec());
        }
        all
    }

    /// Newest feed sequence number of each partition of region `i`.
    async fn heads(&self, i: usize) -> Vec<u64> {
        let mut heads = Vec::new();
        for p in 0..PARTITIONS {
            heads.push(
                self.stores[i]
                    .read_feed(p, u64::MAX, 1)
                    .await
                    .unwrap()
                    .last_seq,
            );
        }
        heads
    }

    /// Region `i`'s stored cursors for `peer`'s feed.
    async fn cursors(&self, i: usize, peer: &str) -> Vec<u64> {
        let mut cursors = Vec::new();
        for p in 0..PARTITIONS {
            cursors.push(self.stores[i].cursor(peer, p).await.unwrap());
        }
        cursors
    }

    async fn all_digests_equal(&self) -> bool {
        let first = self.digests(0).await;
        for i in 1..self.stores.len() {
            if self.digests(i).await != first {
                return false;
            }
        }
        true
    }

    /// Whether every running replicator has applied every peer's whole feed.
    async fn cursors_caught_up(&self) -> bool {
        for i in 0..self.stores.len() {
            if self.replicators[i].is_none() {
                continue;
            }
            for j in (0..self.stores.len()).filter(|j| *j != i) {
                if self.cursors(i, &self.names[j]).await != self.heads(j).await {
                    return false;
                }
            }
        }
        true
    }

    /// Waits (bounded) until every store holds the same state and, if asked, every cursor has
    /// reached its peer's feed head.
    async fn wait_converged(&self, with_cursors: bool) -> Duration {
        let start = Instant::now();
        loop {
            if self.all_digests_equal().await && (!with_cursors || self.cursors_caught_up().await) {
                return start.elapsed();
            }
            if start.elapsed() > CONVERGE_WITHIN {
                let statuses: Vec<Option<Status>> = self
                    .replicators
                    .iter()
                    .map(|r| r.as_ref().map(|r| r.status.borrow().clone()))
                    .collect();
                panic!(
                    "no convergence within {CONVERGE_WITHIN:?}; digests equal: {}; statuses: {statuses:#?}",
                    self.all_digests_equal().await
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) until region `i`'s replicator status satisfies `ok`.
    async fn wait_status(&self, i: usize, what: &str, ok: impl Fn(&Status) -> bool) {
        let start = Instant::now();
        while !ok(&self.status(i)) {
            assert!(
                start.elapsed() < CONVERGE_WITHIN,
                "{what}: {:#?}",
                self.status(i)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Checks that every store holds the same values and that they are what was written.
    async fn assert_state(&self, expected: &Expected) {
        let mut scans = Vec::new();
        for store in &self.stores {
            let page = store.scan("", None, 10_000).await.unwrap();
            assert!(page.next.is_none());
            let items: Vec<_> = page
                .items
                .into_iter()
                .map(|item| (item.key, item.value.unwrap().value))
                .collect();
            scans.push(items);
        }
        for (i, scan) in scans.iter().enumerate().skip(1) {
            assert_eq!(
                scan, &scans[0],
                "{} differs from {}",
                self.names[i], self.names[0]
            );
        }
        assert_eq!(
            scans[0].len(),
            expected.counters.len() + expected.sets.len() + expected.puts.len()
        );
        for region in &self.regions {
            for (key, total) in &expected.counters {
                let counter: PnCounter = region.read(key).await.unwrap();
                assert_eq!(counter.value(), *total, "{key} in {}", region.id().as_str());
            }
            for (key, elements) in &expected.sets {
                let set: OrSet<String> = region.read(key).await.unwrap();
                let got: BTreeSet<String> = set.iter().cloned().collect();
                assert_eq!(&got, elements, "{key} in {}", region.id().as_str());
            }
            for (key, written) in &expected.puts {
                let value = region.get(key).await.unwrap();
                let ResolvedValue::One(bytes) = &value else {
                    panic!("{key} in {}: {value:?}", region.id().as_str())
                };
                let chosen = String::from_utf8(bytes.clone()).unwrap();
                assert!(
                    written.contains(&chosen),
                    "{key} in {} resolved to {chosen}, never written",
                    region.id().as_str()
                );
            }
        }
        // The same resolution everywhere.
        for key in expected.puts.keys() {
            let first = self.regions[0].get(key).await.unwrap();
            for region in &self.regions[1..] {
                assert_eq!(region.get(key).await.unwrap(), first, "{key}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for running in self.replicators.iter().flatten() {
            running.task.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------------------------

/// What the writes should have produced.
#[derive(Debug, Default)]
struct Expected {
    counters: BTreeMap<String, i128>,
    sets: BTreeMap<String, BTreeSet<String>>,
    puts: BTreeMap<String, Vec<String>>,
}

impl Expected {
    fn add(&mut self, other: Expected) {
        for (k, v) in other.counters {
            *self.counters.entry(k).or_default() += v;
        }
        for (k, v) in other.sets {
            self.sets.entry(k).or_default().extend(v);
        }
        for (k, v) in other.puts {
            self.puts.entry(k).or_default().extend(v);
        }
    }
}

/// `rounds` rounds of a counter increment (or decrement), a set add and a put, on keys every
/// writer shares; `tag` makes this writer's elements and values unique.
async fn write_load(region: Region<MemoryBackend>, tag: usize, rounds: usize) -> Expected {
    let mut expected = Expected::default();
    for i in 0..rounds {
        let key = format!("count:{}", i % 5);
        if i % 11 == 10 {
            region.merge_crdt(&key, CounterOp::dec(3)).await.unwrap();
            *expected.counters.entry(key).or_default() -= 3;
        } else {
            let n = (i % 7 + 1 + tag) as u64;
            region.merge_crdt(&key, CounterOp::inc(n)).await.unwrap();
            *expected.counters.entry(key).or_default() += i128::from(n);
        }
        let key = format!("set:{}", i % 3);
        let element = format!("w{tag}-{i}");
        region
            .merge_crdt(&key, SetOp::add(element.clone()))
            .await
            .unwrap();
        expected.sets.entry(key).or_default().insert(element);
        let key = format!("put:{}", i % 4);
        let value = format!("w{tag}-{i}");
        region.put(&key, value.clone().into_bytes()).await.unwrap();
        expected.puts.entry(key).or_default().push(value);
        if i % 8 == 7 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
    expected
}

/// Two concurrent writers in each of the given regions.
fn spawn_writes(cluster: &Cluster, regions: &[usize], rounds: usize) -> Vec<JoinHandle<Expected>> {
    let mut tasks = Vec::new();
    for &i in regions {
        for w in 0..2 {
            let region = cluster.regions[i].clone();
            tasks.push(tokio::spawn(write_load(region, i * 2 + w, rounds)));
        }
    }
    tasks
}

async fn join_writes(tasks: Vec<JoinHandle<Expected>>) -> Expected {
    let mut expected = Expected::default();
    for task in tasks {
        expected.add(task.await.unwrap());
    }
    expected
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_converge_under_concurrent_writes() {
    // No periodic sweep: the feeds alone carry every write.
    let mut cluster = Cluster::new(
        3,
        10_000,
        driver_config(NO_SWEEP_MS),
        Faults::default(),
        &[],
    );
    cluster.start_all();
    let writes = spawn_writes(&cluster, &[0, 1, 2], 60);
    let expected = join_writes(writes).await;
    cluster.wait_converged(true).await;
    cluster.assert_state(&expected).await;
    let mut applied = 0;
    for i in 0..3 {
        let status = cluster.status(i);
        assert_eq!(status.stats.gaps, 0);
        assert_eq!(status.stats.ae_rounds, 0, "no anti-entropy was needed");
        applied += status.stats.entries_applied;
    }
    // Every region's writes applied in both other regions (each write makes one entry).
    let mut written = 0;
    for i in 0..3 {
        written += cluster.heads(i).await.iter().sum::<u64>();
    }
    assert_eq!(written, 3 * 2 * 60 * 3);
    assert!(
        applied >= 2 * written,
        "applied {applied} of {written} writes"
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_c_cut_writes_reach_c_through_b() {
    let mut cluster = Cluster::new(3, 10_000, driver_config(200), Faults::default(), &[]);
    cluster.faults.cut(NAMES[0], NAMES[2]);
    cluster.start_all();
    let writes = spawn_writes(&cluster, &[0, 1, 2], 40);
    let expected = join_writes(writes).await;
    cluster.wait_converged(false).await;
    cluster.assert_state(&expected).await;
    // Nothing crossed the cut link: A and C never pulled each other's feed.
    assert_eq!(cluster.cursors(0, NAMES[2]).await, vec![0; 8]);
    assert_eq!(cluster.cursors(2, NAMES[0]).await, vec![0; 8]);
    assert!(cluster.status(0).stats.failures > 0);
    assert!(cluster.status(2).stats.failures > 0);
    // C got A's writes as B's states (pulled by C or pushed by B).
    let exchanged = cluster.status(1).stats.ae_keys + cluster.status(2).stats.ae_keys;
    assert!(exchanged > 0);
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_trimmed_before_the_peer_pulled_is_repaired_by_anti_entropy() {
    // Feeds keep 4 entries per partition, and no periodic sweep: only the gap-triggered
    // anti-entropy can repair.
    let mut cluster = Cluster::new(3, 4, driver_config(NO_SWEEP_MS), Faults::default(), &[]);
    cluster.faults.cut(NAMES[0], NAMES[1]);
    cluster.faults.cut(NAMES[0], NAMES[2]);
    cluster.start_all();
    // A writes while isolated, far more than its feed keeps.
    let expected = join_writes(spawn_writes(&cluster, &[0], 40)).await;
    let heads = cluster.heads(0).await;
    for p in 0..PARTITIONS {
        let page = cluster.stores[0].read_feed(p, 0, 100).await.unwrap();
        assert!(page.first_seq > 1, "partition {p} was trimmed: {heads:?}");
    }
    let mut expected_all = expected;
    let others = spawn_writes(&cluster, &[1, 2], 20);
    cluster.faults.heal();
    expected_all.add(join_writes(others).await);
    cluster.wait_converged(false).await;
    cluster.assert_state(&expected_all).await;
    // B and C found A's feed trimmed past their cursors; the repair is anti-entropy's (rounds
    // of any region: A's own gap rounds may push to C before C's round finds nothing left).
    for i in [1, 2] {
        let stats = cluster.status(i).stats;
        assert!(stats.gaps > 0, "{} saw no gap: {stats:?}", NAMES[i]);
        assert!(stats.ae_rounds > 0, "{stats:?}");
    }
    let exchanged: u64 = (0..3).map(|i| cluster.status(i).stats.ae_keys).sum();
    assert!(exchanged > 0);
    cluster.stop_all().await;
}

/// A's store holds a feed entry it cannot read, for a key whose value reached the store
/// without a readable entry (a broken disk, a buggy writer). B is not stuck behind it: later
/// writes still arrive by the feed, the skipped entry is counted, and anti-entropy (no
/// periodic sweep here) copies the key's value, so the regions converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_feed_entry_is_skipped_and_repaired_by_anti_entropy() {
    use geostate_backends::{Key, RawAccess};
    use geostate_crdt::{envelope, ActorId, Hlc};

    let mut cluster = Cluster::new(2, 1_000, driver_config(NO_SWEEP_MS), Faults::default(), &[]);
    let lost = Key::new("damaged:lost").unwrap();
    let value = geostate_crdt::Crdt::empty(geostate_crdt::TypeTag::PnCounter)
        .apply(ActorId::new(9), Hlc::new(1, 0), &CounterOp::inc(5).into())
        .unwrap();
    let a = &cluster.stores[0];
    a.raw_put(
        &lost,
        envelope::encode(&value, &envelope::Options::default()).unwrap(),
    )
    .await
    .unwrap();
    a.raw_append_feed(&lost, b"not an envelope".to_vec())
        .await
        .unwrap();
    // A later write to the same partition, behind the damaged entry in A's feed.
    cluster.regions[0]
        .merge_crdt("damaged:lost", CounterOp::inc(1))
        .await
        .unwrap();
    cluster.start_all();
    cluster.wait_converged(true).await;
    let stats = cluster.status(1).stats;
    assert_eq!(stats.damaged_entries, 1, "{stats:?}");
    assert!(stats.ae_keys > 0, "{stats:?}");
    let b = cluster.stores[1].get(&lost).await.unwrap().unwrap();
    match b.value {
        geostate_crdt::Crdt::PnCounter(c) => assert_eq!(c.value(), 6),
        other => panic!("expected the counter, got {other:?}"),
    }
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replicator_resumes_from_its_stored_cursors() {
    let mut cluster = Cluster::new(
        3,
        10_000,
        driver_config(NO_SWEEP_MS),
        Faults::default(),
        &[],
    );
    cluster.start_all();
    let writes = spawn_writes(&cluster, &[0, 1, 2], 80);
    cluster
        .wait_status(2, "C applies something", |s| s.stats.entries_applied >= 20)
        .await;
    // Killed mid-run, while the others keep writing.
    cluster.crash(2).await;
    let resumed_from: u64 = cluster.cursors(2, NAMES[0]).await.iter().sum::<u64>()
        + cluster.cursors(2, NAMES[1]).await.iter().sum::<u64>();
    assert!(resumed_from > 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    cluster.start(2);
    let expected = join_writes(writes).await;
    cluster.wait_converged(true).await;
    cluster.assert_state(&expected).await;
    // The new replicator pulled only what lay after the stored cursors, each entry once.
    let to_pull: u64 =
        cluster.heads(0).await.iter().sum::<u64>() + cluster.heads(1).await.iter().sum::<u64>();
    assert_eq!(
        cluster.status(2).stats.entries_applied,
        to_pull - resumed_from,
        "resumed from {resumed_from} of {to_pull}"
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reapplying_a_whole_feed_counts_nothing_twice() {
    // "us-east-again" reaches us-east's store under a name eu-west has no cursors for.
    let mut cluster = Cluster::new(
        2,
        10_000,
        driver_config(NO_SWEEP_MS),
        Faults::default(),
        &[("us-east-again", 0)],
    );
    cluster.start_all();
    let expected = join_writes(spawn_writes(&cluster, &[0, 1], 40)).await;
    cluster.wait_converged(true).await;
    cluster.assert_state(&expected).await;
    let before = cluster.digests(1).await;
    // Restart eu-west pulling us-east's whole feed again from sequence 1.
    cluster.crash(1).await;
    cluster.start_with_peers(1, vec!["us-east-again".into()]);
    let total: u64 = cluster.heads(0).await.iter().sum();
    cluster
        .wait_status(1, "the whole feed is re-applied", |s| {
            s.stats.entries_applied == total && s.idle
        })
        .await;
    assert_eq!(
        cluster.cursors(1, "us-east-again").await,
        cluster.heads(0).await
    );
    assert_eq!(
        cluster.digests(1).await,
        before,
        "re-applying changed nothing"
    );
    cluster.assert_state(&expected).await;
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_network_still_converges() {
    // Every third request is lost (alternately before and after the peer served it), and its
    // loss is only reported after the request timeout.
    let config = driver_config(200);
    let lost_ms = config.core.request_timeout_ms + 100;
    let mut cluster = Cluster::new(3, 10_000, config, Faults::lossy(3, lost_ms), &[]);
    cluster.start_all();
    let expected = join_writes(spawn_writes(&cluster, &[0, 1, 2], 40)).await;
    cluster.wait_converged(false).await;
    cluster.assert_state(&expected).await;
    let requests = cluster.faults.requests.load(Ordering::SeqCst);
    let dropped = cluster.faults.dropped.load(Ordering::SeqCst);
    assert!(
        dropped > 0 && dropped * 3 + 3 >= requests,
        "{dropped} of {requests}"
    );
    for i in 0..3 {
        assert!(cluster.status(i).stats.failures > 0);
    }
    cluster.stop_all().await;
}

/// A transport whose requests never complete, counting how many are alive at once.
#[derive(Default)]
struct HangingTransport {
    live: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
}

/// Decrements the live count when a request's future is dropped (answered or abandoned).
struct LiveGuard(Arc<AtomicU64>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Transport for HangingTransport {
    async fn request(&self, _peer: &str, _request: Request) -> Result<Response, String> {
        let now = self.live.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let _guard = LiveGuard(Arc::clone(&self.live));
        std::future::pending::<()>().await;
        Err("unreachable".into())
    }
}

/// Regression: the driver abandons a request at the core's deadline, so a peer that never
/// answers costs a bounded number of live requests, not one more per retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_transport_does_not_pile_up_requests() {
    let layout = Layout::new(PARTITIONS, BUCKETS, 1 << 20, 1_000).unwrap();
    let store = Arc::new(MemoryBackend::new(layout));
    let transport = Arc::new(HangingTransport::default());
    let mut config = driver_config(200);
    config.core.request_timeout_ms = 30;
    config.core.pull_wait_ms = 20;
    config.core.retry_backoff_ms = 5;
    config.core.retry_backoff_max_ms = 10;
    let max = config.core.requests_in_flight_max as u64;
    let replicator = Replicator::new(
        config,
        "lonely",
        store,
        Arc::clone(&transport),
        vec!["silent".to_string()],
        Arc::new(SystemClock),
    );
    let (stop, shutdown) = watch::channel(false);
    let (status, _) = watch::channel(Status::default());
    let task = tokio::spawn(replicator.run(shutdown, status));
    // About 30 timeouts' worth of retries.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    let peak = transport.peak.load(Ordering::SeqCst);
    // The core frees a slot at the first tick past the deadline while the task's own timer
    // ends at about the same moment, so a few may briefly overlap; without the timeout, every
    // retry adds one more hung request (54 in 1.5 s when this was written).
    assert!(
        peak <= 2 * max,
        "{peak} requests were alive at once; the in-flight bound is {max}"
    );
}

/// Tombstones held by region `i`'s store.
async fn tombstones(cluster: &Cluster, i: usize) -> usize {
    let mut n = 0;
    for p in 0..PARTITIONS {
        n += cluster.stores[i]
            .tombstones(p, None, 10_000)
            .await
            .unwrap()
            .items
            .len();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_keys_are_purged_once_every_region_applied_them_and_can_be_written_again() {
    let mut cluster = Cluster::new(3, 10_000, driver_config(300), Faults::default(), &[]);
    // ap-south is cut off from us-east: nothing deleted may be purged until it has applied
    // the deletes (through eu-west's anti-entropy) and pulled us-east's feed past them.
    cluster.faults.cut(NAMES[0], NAMES[2]);
    cluster.start_all();
    let keys: Vec<String> = (0..12).map(|i| format!("gc:{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        for (r, region) in cluster.regions.iter().enumerate() {
            region
                .merge_crdt(key, SetOp::add(format!("old-{r}-{i}")))
                .await
                .unwrap();
        }
    }
    cluster.wait_converged(false).await;
    for key in &keys {
        cluster.regions[0].delete(key).await.unwrap();
    }
    cluster.wait_converged(false).await;
    // Three GC sweeps' time with the cut in place: every region holds every tombstone.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    for i in 0..3 {
        assert_eq!(tombstones(&cluster, i).await, keys.len(), "region {i}");
        assert_eq!(cluster.status(i).stats.tombstones_purged, 0);
    }
    cluster.faults.heal();
    let start = Instant::now();
    loop {
        let mut left = 0;
        for i in 0..3 {
            left += tombstones(&cluster, i).await;
        }
        if left == 0 {
            break;
        }
        assert!(
            start.elapsed() < CONVERGE_WITHIN,
            "{left} tombstones still held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let purged: u64 = (0..3)
        .map(|i| cluster.status(i).stats.tombstones_purged)
        .sum();
    assert!(purged >= keys.len() as u64);
    // Written again in every region: nothing old comes back and no dot is reused (a reused
    // dot would be taken for one already removed, and the new element would be lost).
    for (i, key) in keys.iter().enumerate() {
        for (r, region) in cluster.regions.iter().enumerate() {
            region
                .merge_crdt(key, SetOp::add(format!("new-{r}-{i}")))
                .await
                .unwrap();
        }
    }
    cluster.wait_converged(false).await;
    for (i, key) in keys.iter().enumerate() {
        let want: BTreeSet<String> = (0..3).map(|r| format!("new-{r}-{i}")).collect();
        for region in &cluster.regions {
            let set: OrSet<String> = region.read(key).await.unwrap();
            let got: BTreeSet<String> = set.iter().cloned().collect();
            assert_eq!(got, want, "{key}");
        }
    }
    cluster.stop_all().await;
}
