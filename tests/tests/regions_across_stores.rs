//! A deployment as its operators run it: three regions, each opened from its TOML on a store
//! of its own (us-east on Redis, eu-west on PostgreSQL, ap-south on the embedded store), each
//! with a replicator pulling from the other two. Writes in every region, then us-east cut off
//! while every region keeps writing, then the link healed: every region ends with the same
//! state (the same digests, the same values read back), and every acknowledged write is in it.
//!
//! Real servers: Redis on 127.0.0.1:6379 and PostgreSQL at `GEOSTATE_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), made sure of by `scripts/test`. The Redis
//! region lives under a key prefix of its own and the PostgreSQL region in a schema of its
//! own; both are removed when the test ends, also when it fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use geostate::{
    open_store, AnyStore, CounterOp, LwwRegister, Op, OrSet, PnCounter, Region, RegionConfig,
    RegisterOp, SetOp, StateBackend, SystemClock,
};
use geostate_replication::core::CoreConfig;
use geostate_replication::driver::{
    DriverConfig, InProcessTransport, Replicator, Status, Transport,
};
use geostate_replication::wire::{Request, Response};
use geostate_tests::{pg_url, run_id, PgSchema, RedisPrefix, REDIS_URL};
use tokio::sync::watch;

const NAMES: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const PARTITIONS: u16 = 8;
const BUCKETS: u16 = 8;
const CONVERGE_WITHIN: Duration = Duration::from_secs(60);

fn driver_config() -> DriverConfig {
    DriverConfig {
        core: CoreConfig {
            partitions: PARTITIONS,
            polls_per_peer: 3,
            pull_wait_ms: 200,
            feed_batch_max: 64,
            requests_in_flight_max: 8,
            request_timeout_ms: 2_000,
            retry_backoff_ms: 20,
            retry_backoff_max_ms: 200,
            anti_entropy_interval_ms: 1_000,
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

/// One region's view of the network: the in-process transport, with us-east's links cut
/// while `cut` holds.
struct Link {
    from: &'static str,
    inner: Arc<InProcessTransport<AnyStore>>,
    cut: Arc<AtomicBool>,
}

impl Transport for Link {
    async fn request(&self, peer: &str, request: Request) -> Result<Response, String> {
        let isolated = self.from == NAMES[0] || peer == NAMES[0];
        let cut = || isolated && self.cut.load(Ordering::SeqCst);
        if cut() {
            return Err(format!("link {} - {peer} is cut", self.from));
        }
        let response = self.inner.request(peer, request).await;
        // A long poll that started before the cut and answers after it is lost with the link.
        if cut() {
            return Err(format!("link {} - {peer} was cut", self.from));
        }
        response
    }
}

fn config(name: &str, store: &str) -> RegionConfig {
    let text = format!(
        "region = \"{name}\"\n{store}\n[layout]\npartitions = {PARTITIONS}\nbuckets = {BUCKETS}\n"
    );
    RegionConfig::from_toml_str(&text).unwrap_or_else(|e| panic!("{text}\n{e}"))
}

async fn digests(store: &AnyStore) -> Vec<Vec<u64>> {
    let mut all = Vec::new();
    for p in 0..PARTITIONS {
        all.push(store.digest(p).await.unwrap().buckets().to_vec());
    }
    all
}

/// Every region's writes of one phase: counter increments, set adds and a register write.
async fn write_phase(regions: &[Region<AnyStore>], phase: &str, increments: u64) -> u64 {
    let mut total = 0;
    let mut writers = tokio::task::JoinSet::new();
    for (i, region) in regions.iter().enumerate() {
        let region = region.clone();
        let phase = phase.to_string();
        writers.spawn(async move {
            let mut added = 0;
            for n in 0..increments {
                let by = (i as u64 + 1) * (n + 1);
                region.merge_crdt("hits", CounterOp::inc(by)).await.unwrap();
                added += by;
                let tag = format!("{}:{phase}:{n}", NAMES[i]);
                region.merge_crdt("tags", SetOp::add(tag)).await.unwrap();
            }
            let leader = format!("{}:{phase}", NAMES[i]);
            region
                .merge_crdt("leader", Op::Lww(RegisterOp::write(leader)))
                .await
                .unwrap();
            added
        });
    }
    while let Some(added) = writers.join_next().await {
        total += added.unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regions_on_redis_postgres_and_memory_converge_after_a_partition() {
    let run = run_id();
    let prefix = RedisPrefix(format!("gst-e2e-{run}:"));
    let schema = PgSchema {
        url: pg_url(),
        name: format!("gs_test_e2e_{run}"),
    };
    let configs = [
        config(
            NAMES[0],
            &format!(
                "[store]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\nkey_prefix = \"{}\"",
                prefix.0
            ),
        ),
        config(
            NAMES[1],
            &format!(
                "[store]\nkind = \"postgres\"\nurl = \"{}\"\nschema = \"{}\"\nprimary_pool_max = 4",
                schema.url, schema.name
            ),
        ),
        config(NAMES[2], "[store]\nkind = \"memory\""),
    ];
    let mut stores = Vec::new();
    let mut regions = Vec::new();
    for config in configs {
        let store = Arc::new(open_store(&config).await.unwrap_or_else(|e| {
            panic!(
                "opening {}'s {} store: {e}; do the local servers run (scripts/ensure-redis, \
                 scripts/ensure-postgres)?",
                config.region,
                config.store.kind()
            )
        }));
        regions.push(Region::builder(config, Arc::clone(&store)).build().unwrap());
        stores.push(store);
    }
    assert_eq!(
        stores.iter().map(|s| s.kind()).collect::<Vec<_>>(),
        ["redis", "postgres", "memory"]
    );

    let transport = Arc::new(InProcessTransport::new(
        NAMES
            .iter()
            .map(|n| n.to_string())
            .zip(stores.iter().cloned()),
    ));
    let cut = Arc::new(AtomicBool::new(false));
    let mut running = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let peers = NAMES
            .iter()
            .filter(|n| *n != name)
            .map(|n| n.to_string())
            .collect();
        let link = Arc::new(Link {
            from: name,
            inner: Arc::clone(&transport),
            cut: Arc::clone(&cut),
        });
        let replicator = Replicator::new(
            driver_config(),
            name,
            Arc::clone(&stores[i]),
            link,
            peers,
            Arc::new(SystemClock),
        );
        let (stop, shutdown) = watch::channel(false);
        let (status_tx, status) = watch::channel(Status::default());
        running.push((
            tokio::spawn(replicator.run(shutdown, status_tx)),
            stop,
            status,
        ));
    }

    let mut expected = write_phase(&regions, "connected", 30).await;
    cut.store(true, Ordering::SeqCst);
    expected += write_phase(&regions, "partitioned", 30).await;
    // While cut off, us-east cannot have seen the others' partitioned writes.
    let tags: OrSet<String> = regions[0].read("tags").await.unwrap();
    assert!(
        !tags.contains(&"eu-west:partitioned:0".to_string()),
        "us-east saw a write across the cut"
    );
    cut.store(false, Ordering::SeqCst);
    expected += write_phase(&regions, "healed", 10).await;

    let started = Instant::now();
    loop {
        let first = digests(&stores[0]).await;
        let mut equal = true;
        for store in &stores[1..] {
            equal &= digests(store).await == first;
        }
        if equal {
            break;
        }
        if started.elapsed() > CONVERGE_WITHIN {
            let statuses: Vec<Status> = running.iter().map(|r| r.2.borrow().clone()).collect();
            panic!("no convergence within {CONVERGE_WITHIN:?}: {statuses:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("converged {:?} after the last write", started.elapsed());

    let want_tags: BTreeSet<String> = NAMES
        .iter()
        .flat_map(|name| {
            [("connected", 30), ("partitioned", 30), ("healed", 10)]
                .into_iter()
                .flat_map(move |(phase, n)| (0..n).map(move |k| format!("{name}:{phase}:{k}")))
        })
        .collect();
    let mut leaders = BTreeSet::new();
    for (i, region) in regions.iter().enumerate() {
        let hits: PnCounter = region.read("hits").await.unwrap();
        assert_eq!(hits.value(), i128::from(expected), "{}: hits", NAMES[i]);
        let tags: OrSet<String> = region.read("tags").await.unwrap();
        assert_eq!(
            tags.iter().cloned().collect::<BTreeSet<_>>(),
            want_tags,
            "{}: tags",
            NAMES[i]
        );
        let leader: LwwRegister<String> = region.read("leader").await.unwrap();
        leaders.insert(leader.value().cloned());
    }
    assert_eq!(
        leaders.len(),
        1,
        "one register winner everywhere: {leaders:?}"
    );
    let winner = leaders.into_iter().next().flatten().unwrap();
    assert!(
        winner.ends_with(":healed"),
        "the last phase's write wins: {winner}"
    );

    for (task, stop, _) in running {
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("a replicator stops when told to")
            .unwrap();
    }
    if let AnyStore::Redis(redis) = stores[0].as_ref() {
        redis.purge_namespace().await.unwrap();
    }
    for store in &stores {
        store.close().await;
    }
    drop(regions);
    drop(stores);
    drop(schema);
    assert_eq!(
        prefix.keys(),
        Vec::<Vec<u8>>::new(),
        "Redis keys left behind"
    );
}
