//! Simulations with every region on a real store of its own: a `redis-server` per region, a
//! PostgreSQL schema per region, and both mixed in one deployment. Faults stay in the
//! simulated network; the same checks run against what the real stores hold.
//!
//! Needs `redis-server` (Redis 7 or newer) and PostgreSQL at `GEOSTATE_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); this file runs `scripts/ensure-redis` and
//! `scripts/ensure-postgres` first. It never skips: without a server a test fails and says
//! why. The tests run one at a time (each starts servers of its own), and each checks that
//! its run left nothing behind: no `redis-server` process, no temporary directory, no schema.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use geostate_sim::{
    checks, run, Outcome, RunOptions, Scenario, SimError, StoreChoice, StoreKind, StoreOptions,
};
use sqlx::Connection as _;

const PG_DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The tests of this file run one at a time: each starts its own servers, and the checks that
/// nothing is left behind look at every child process of this test binary.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

/// Runs one of the `scripts/ensure-*` scripts once; fails the test with its message if it
/// fails.
fn ensure_servers() {
    static ENSURED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ENSURED.get_or_init(|| {
        for script in ["ensure-redis", "ensure-postgres"] {
            let path = repo_root().join("scripts").join(script);
            let out = Command::new(&path)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
            assert!(
                out.status.success(),
                "{} failed, so there is no server to simulate on:\n{}{}",
                path.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
}

fn pg_url() -> String {
    std::env::var("GEOSTATE_PG_URL").unwrap_or_else(|_| PG_DEFAULT_URL.into())
}

fn options(seed: u64) -> RunOptions {
    RunOptions {
        stores: StoreOptions {
            postgres_url: pg_url(),
            ..StoreOptions::default()
        },
        ..RunOptions::new(seed)
    }
}

/// The partition-heal scenario, small: three regions, us-east cut off for most of the run.
fn partition_heal(store: StoreChoice) -> Scenario {
    let mut scenario = Scenario::from_toml_str(
        r#"
name = "real-partition-heal"
description = "Three regions; us-east is isolated for most of the run, then the network heals."
regions = 3
keys = 300
duration_s = 3.0
[workload]
writes_per_s = 300.0
[[faults]]
kind = "isolate"
region = 0
from_s = 0.5
until_s = 2.5
"#,
    )
    .unwrap();
    scenario.store = store;
    scenario
}

/// Every fault kind the network model has at once, on four regions (two of each store when
/// mixed): isolation, a crashed replicator, loss, duplication, reordering and a skewed clock.
fn hostile(store: StoreChoice) -> Scenario {
    let mut scenario = Scenario::from_toml_str(
        r#"
name = "real-hostile"
description = "Four regions under isolation, a crash, a lossy duplicating network and skew."
regions = 4
keys = 200
duration_s = 3.0
[workload]
writes_per_s = 250.0
[[faults]]
kind = "isolate"
region = 1
from_s = 0.3
until_s = 1.5
[[faults]]
kind = "crash"
region = 2
at_s = 1.0
down_s = 1.0
[[faults]]
kind = "degrade"
from_s = 1.5
until_s = 3.0
[faults.link]
latency_ms = 30
jitter_ms = 30
loss = 0.05
duplicate = 0.05
reorder_ms = 80
[[faults]]
kind = "skew"
region = 3
offset_ms = -2000
from_s = 0.0
"#,
    )
    .unwrap();
    scenario.store = store;
    scenario
}

/// The children of this process, as `(pid, command name, state)`, zombies included.
fn children() -> Vec<(u32, String, char)> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = rest.next().and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(me) {
            found.push((pid, comm, state));
        }
    }
    found
}

/// This process's `geostate-sim-*` temporary directories (a Redis region's working
/// directory).
fn temp_dirs() -> Vec<String> {
    let mine = format!("geostate-sim-{}_", std::process::id());
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&mine))
        .collect()
}

/// The schemas of this process's runs still in the database.
fn leftover_schemas() -> Vec<String> {
    let url = pg_url();
    let pattern = format!("gs_sim_{}_%", std::process::id());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            let mut conn = sqlx::PgConnection::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
            let names: Vec<(String,)> =
                sqlx::query_as("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1")
                    .bind(pattern)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap();
            let _ = conn.close().await;
            names.into_iter().map(|(n,)| n).collect()
        })
}

/// Asserts that no run of this process left anything behind.
fn assert_nothing_left() {
    let children = children();
    assert!(
        children.is_empty(),
        "processes left behind (pid, name, state): {children:?}"
    );
    let dirs = temp_dirs();
    assert!(
        dirs.is_empty(),
        "temporary directories left behind: {dirs:?}"
    );
    let schemas = leftover_schemas();
    assert!(schemas.is_empty(), "schemas left behind: {schemas:?}");
}

/// The port of a Redis region's server, from its location.
fn redis_port(location: &str) -> u16 {
    location
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {location:?}"))
}

/// Runs `scenario` on its real stores and on the embedded store with the same seed, checks
/// every invariant, and checks that the two runs were the same run.
fn run_and_compare(scenario: &Scenario, seed: u64) -> Outcome {
    ensure_servers();
    let started = Instant::now();
    let outcome = run(scenario, &options(seed))
        .unwrap_or_else(|e| panic!("{} on {}: {e}", scenario.name, scenario.store));
    eprintln!(
        "{} on {} (seed {seed}): {} writes in {:.1} s",
        scenario.name,
        scenario.store,
        outcome.acked.len(),
        started.elapsed().as_secs_f64()
    );
    let results = checks::run_all(&outcome);
    assert!(
        checks::all_passed(&results),
        "{} on {}, seed {seed}:\n{}",
        scenario.name,
        scenario.store,
        checks::failure_report(&results)
    );
    assert!(!outcome.acked.is_empty());
    assert!(outcome.converged_ms.is_some());
    // Each region ran on the store the choice names, each its own.
    assert_eq!(outcome.stores.len(), scenario.regions);
    for (i, info) in outcome.stores.iter().enumerate() {
        assert_eq!(info.kind, scenario.store.kind_of(i), "region {i}: {info:?}");
    }
    let mut locations: Vec<&str> = outcome.stores.iter().map(|s| s.location.as_str()).collect();
    locations.sort_unstable();
    locations.dedup();
    assert_eq!(locations.len(), scenario.regions, "{:?}", outcome.stores);

    // The real stores answered every operation exactly as the embedded store does, so the
    // run is the embedded run, event for event, and ends in the same states.
    let mut embedded = scenario.clone();
    embedded.store = StoreChoice::Memory;
    let reference = run(&embedded, &RunOptions::new(seed)).unwrap();
    assert_eq!(
        outcome.trace_hash, reference.trace_hash,
        "{}: the run on {} differs from the run on the embedded store",
        scenario.name, scenario.store
    );
    assert_eq!(outcome.events, reference.events);
    assert_eq!(outcome.acked, reference.acked);
    assert_eq!(outcome.payloads, reference.payloads);
    assert_eq!(outcome.resolved, reference.resolved);
    assert_eq!(outcome.conflicts, reference.conflicts);
    assert_eq!(outcome.samples, reference.samples);
    assert_eq!(outcome.stats, reference.stats);

    // Everything the run made is gone.
    for info in &outcome.stores {
        if info.kind == StoreKind::Redis {
            let port = redis_port(&info.location);
            assert!(
                std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
                "something still listens on {}",
                info.location
            );
        }
    }
    assert_nothing_left();
    outcome
}

#[test]
fn partition_heal_on_redis_regions() {
    let _serial = serial();
    let o = run_and_compare(&partition_heal(StoreChoice::Redis), 3);
    assert!(o.messages_dropped > 0, "the isolation bit");
}

#[test]
fn partition_heal_on_postgres_regions() {
    let _serial = serial();
    let o = run_and_compare(&partition_heal(StoreChoice::Postgres), 4);
    assert!(o.messages_dropped > 0, "the isolation bit");
    assert!(o.stores[0].location.contains("schema gs_sim_"));
}

#[test]
fn every_fault_on_mixed_redis_and_postgres_regions() {
    let _serial = serial();
    let o = run_and_compare(&hostile(StoreChoice::Mixed), 5);
    let kinds: Vec<StoreKind> = o.stores.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        [
            StoreKind::Redis,
            StoreKind::Postgres,
            StoreKind::Redis,
            StoreKind::Postgres
        ]
    );
    assert!(o.messages_dropped > 0);
    assert!(o.messages_duplicated > 0);
    assert!(
        o.stats[2].failures + o.stats[0].failures > 0,
        "the crash bit"
    );
}

#[test]
fn a_failed_start_leaves_nothing_behind_and_says_why() {
    let _serial = serial();
    ensure_servers();
    // Region 0 gets its redis-server, then region 1's PostgreSQL cannot be reached: the
    // server already started must be stopped.
    let mut bad_pg = options(1);
    bad_pg.stores.postgres_url = "postgres://postgres@127.0.0.1:1/test".into();
    match run(&partition_heal(StoreChoice::Mixed), &bad_pg) {
        Err(SimError::Store(m)) => {
            assert!(m.contains("cannot connect to PostgreSQL"), "{m}");
            assert!(m.contains("127.0.0.1:1"), "{m}");
        }
        other => panic!("expected a store error, got {other:?}"),
    }
    assert_nothing_left();

    let mut no_redis = options(1);
    no_redis.stores.redis_server = PathBuf::from("/definitely/not/redis-server");
    match run(&partition_heal(StoreChoice::Redis), &no_redis) {
        Err(SimError::Store(m)) => {
            assert!(
                m.contains("cannot start /definitely/not/redis-server"),
                "{m}"
            );
            assert!(m.contains("scripts/ensure-redis"), "{m}");
        }
        other => panic!("expected a store error, got {other:?}"),
    }
    assert_nothing_left();

    // A real-store run blocks on every operation: inside an async runtime it refuses to start.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let refused = runtime.block_on(async { run(&partition_heal(StoreChoice::Redis), &options(1)) });
    match refused {
        Err(SimError::Scenario(m)) => assert!(m.contains("outside an async runtime"), "{m}"),
        other => panic!("expected a scenario error, got {other:?}"),
    }
    assert_nothing_left();
}
