//! `open_region`: a region's TOML names its store and one call opens the region on it; run
//! against the real local servers (Redis on 127.0.0.1:6379, `scripts/ensure-redis`;
//! PostgreSQL at `GEOSTATE_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`,
//! `scripts/ensure-postgres`). Tests never skip: without a server they fail and say why.
//!
//! Each run writes under a Redis key prefix and a PostgreSQL schema of its own and removes
//! them when it ends, also when it fails. Nothing else on the servers is touched.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use geostate_tests::{
    pg_url, run_id, schema_exists, PgSchema, RedisPrefix, PG_URL_DEFAULT, REDIS_URL,
};

use geostate::backends::postgres::PostgresConfig;
use geostate::backends::redis::RedisConfig;
use geostate::open::{postgres_config, redis_config};
use geostate::{
    open_region, AnyStore, BackendError, CounterOp, Layout, PnCounter, PostgresStoreConfig,
    RedisStoreConfig, RegionConfig, RegionError, StoreConfig,
};

fn parse(text: &str) -> RegionConfig {
    RegionConfig::from_toml_str(text).unwrap_or_else(|e| panic!("{text}\n{e}"))
}

/// Writes a counter through a region opened from `text`, reads it back through a second
/// process-like region (another node) opened from the same configuration, and returns the
/// first region.
async fn counter_round_trip(text: &str, kind: &str) -> geostate::Region<AnyStore> {
    let open = |node: u32| {
        let mut config = parse(text);
        config.node = node;
        async move {
            open_region(config).await.unwrap_or_else(|e| {
                panic!("open_region on {kind}: {e}; is the local server running (scripts/ensure-{kind})?")
            })
        }
    };
    let first = open(0).await;
    assert_eq!(first.backend().kind(), kind);
    first.merge_crdt("visits", CounterOp::inc(3)).await.unwrap();
    first.merge_crdt("visits", CounterOp::inc(4)).await.unwrap();
    assert_eq!(first.read::<PnCounter>("visits").await.unwrap().value(), 7);
    // The value is in the store, not in the handle: another node of the region sees it.
    let second = open(1).await;
    assert_ne!(second.actor(), first.actor());
    second
        .merge_crdt("visits", CounterOp::dec(2))
        .await
        .unwrap();
    assert_eq!(first.read::<PnCounter>("visits").await.unwrap().value(), 5);
    assert_eq!(second.read::<PnCounter>("visits").await.unwrap().value(), 5);
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_region_on_redis_writes_and_reads_a_counter() {
    let prefix = RedisPrefix(format!("gst-open-{}:", run_id()));
    let text = format!(
        r#"
        region = "us-east"
        [store]
        kind = "redis"
        url = "{REDIS_URL}"
        key_prefix = "{}"
        connect_timeout_ms = 3000
        [layout]
        partitions = 8
        buckets = 4
        "#,
        prefix.0
    );
    let region = counter_round_trip(&text, "redis").await;
    assert!(
        !prefix.keys().is_empty(),
        "the store wrote nothing under its prefix"
    );
    let AnyStore::Redis(redis) = region.backend().as_ref() else {
        panic!("not a Redis store")
    };
    assert!(redis.purge_namespace().await.unwrap() > 0);
    assert_eq!(prefix.keys(), Vec::<Vec<u8>>::new(), "keys left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_region_on_postgres_writes_and_reads_a_counter() {
    let url = pg_url();
    let schema = PgSchema {
        url: url.clone(),
        name: format!("gs_test_open_{}", run_id()),
    };
    let text = format!(
        r#"
        region = "eu-west"
        [store]
        kind = "postgres"
        url = "{url}"
        schema = "{}"
        primary_pool_max = 4
        application_name = "geostate-test-open"
        [layout]
        partitions = 8
        buckets = 4
        "#,
        schema.name
    );
    let region = counter_round_trip(&text, "postgres").await;
    let name = schema.name.clone();
    assert!(
        schema_exists(&url, &name).await,
        "the store made no schema {name}"
    );
    region.backend().close().await;
    drop(region);
    drop(schema);
    assert!(
        !schema_exists(&url, &name).await,
        "schema {name} left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_region_on_memory_and_unreachable_or_invalid_stores() {
    let memory = open_region(parse("region = \"ap-south\"\n")).await.unwrap();
    assert_eq!(memory.backend().kind(), "memory");
    memory.merge_crdt("n", CounterOp::inc(1)).await.unwrap();
    assert_eq!(memory.read::<PnCounter>("n").await.unwrap().value(), 1);

    // Nobody listens on port 1: the store is unavailable, not misconfigured.
    let unreachable = parse(
        "region = \"us-east\"\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:1/\"\n\
         connect_timeout_ms = 500\nretry_attempts_max = 1\n",
    );
    match open_region(unreachable).await {
        Err(RegionError::Backend(BackendError::Unavailable(_))) => {}
        other => panic!("expected an unavailable store, got {:?}", other.map(|_| ())),
    }
    let unreachable = parse(
        "region = \"us-east\"\n[store]\nkind = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:1/test\"\n\
         acquire_timeout_ms = 500\nretry_attempts_max = 1\n",
    );
    match open_region(unreachable).await {
        Err(RegionError::Backend(BackendError::Unavailable(_))) => {}
        other => panic!("expected an unavailable store, got {:?}", other.map(|_| ())),
    }

    // What the store itself refuses is a configuration error, found before connecting.
    for (text, needle) in [
        (
            "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/\"\nkey_prefix = \"a{b\"\n",
            "key prefix",
        ),
        (
            "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/\"\n[store.tls]\nca_cert_file = \"/ca.pem\"\n",
            "rediss://",
        ),
        (
            "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/\"\n[store.wait]\nreplicas = 0\ntimeout_ms = 10\n",
            "WAIT",
        ),
        (
            "[store]\nkind = \"postgres\"\nurl = \"postgres://h/d\"\nschema = \"pg_x\"\n",
            "schema",
        ),
        (
            "[store]\nkind = \"postgres\"\nurl = \"postgres://h/d\"\nprimary_pool_max = 0\n",
            "primary_pool_max",
        ),
        (
            "[store]\nkind = \"postgres\"\nurl = \"postgres://h/d\"\n[store.tls]\nmode = \"require\"\nca_cert_file = \"/ca.pem\"\n",
            "ssl_root_cert",
        ),
    ] {
        let config = parse(&format!("region = \"us-east\"\n{text}"));
        match open_region(config).await {
            Err(RegionError::Config(message)) => {
                assert!(message.contains(needle), "{text}: {message}")
            }
            other => panic!("{text}: expected a configuration error, got {:?}", other.map(|_| ())),
        }
    }
    // A configuration built in code is checked the same way.
    let mut config = RegionConfig::new("us-east".parse().unwrap());
    config.store = StoreConfig::Postgres(PostgresStoreConfig::new(""));
    match open_region(config).await {
        Err(RegionError::Config(message)) => assert!(message.contains("`url`"), "{message}"),
        other => panic!(
            "expected a configuration error, got {:?}",
            other.map(|_| ())
        ),
    }
}

#[test]
fn toml_defaults_are_the_store_defaults() {
    let layout = Layout::default();
    let redis = redis_config(&RedisStoreConfig::standalone(REDIS_URL), &layout).unwrap();
    assert_eq!(redis, RedisConfig::standalone(REDIS_URL));
    let cluster = redis_config(
        &RedisStoreConfig::cluster(["redis://a:1", "redis://b:1"]),
        &layout,
    )
    .unwrap();
    assert_eq!(
        cluster,
        RedisConfig::cluster(["redis://a:1", "redis://b:1"])
    );
    let sentinel = redis_config(
        &RedisStoreConfig::sentinel(["redis://s:26379"], "m"),
        &layout,
    )
    .unwrap();
    assert_eq!(sentinel, RedisConfig::sentinel(["redis://s:26379"], "m"));
    // PostgresConfig has no PartialEq; its Debug shows every field.
    let pg = postgres_config(&PostgresStoreConfig::new(PG_URL_DEFAULT), &layout).unwrap();
    assert_eq!(
        format!("{pg:?}"),
        format!("{:?}", PostgresConfig::new(PG_URL_DEFAULT))
    );
}

#[test]
fn every_toml_setting_reaches_the_store_config() {
    let config = parse(
        r#"
        region = "us-east"
        [store]
        kind = "redis"
        mode = "sentinel"
        urls = ["rediss://s1:26379", "rediss://s2:26379"]
        service = "m1"
        key_prefix = "p:"
        connect_timeout_ms = 11
        response_timeout_ms = 12
        retry_attempts_max = 13
        retry_backoff_min_ms = 14
        retry_backoff_max_ms = 15
        contention_attempts_max = 16
        write_cache_entries_max = 17
        write_cache_bytes_max = 18
        breaker_failures_to_open = 19
        breaker_open_ms = 20
        [store.tls]
        ca_cert_file = "/ca.pem"
        client_cert_file = "/c.pem"
        client_key_file = "/c.key"
        [store.wait]
        replicas = 2
        timeout_ms = 21
        [layout]
        partitions = 16
        buckets = 8
        "#,
    );
    let StoreConfig::Redis(store) = &config.store else {
        panic!()
    };
    let layout = config.layout.to_layout().unwrap();
    let r = redis_config(store, &layout).unwrap();
    let ms = Duration::from_millis;
    let mut want = RedisConfig::sentinel(["rediss://s1:26379", "rediss://s2:26379"], "m1")
        .with_key_prefix("p:")
        .with_layout(layout.clone())
        .with_tls(
            geostate::backends::redis::RedisTls::trusting("/ca.pem")
                .with_client_cert("/c.pem", "/c.key"),
        );
    want.connect_timeout = ms(11);
    want.response_timeout = ms(12);
    want.retry.attempts_max = 13;
    want.retry.backoff_min = ms(14);
    want.retry.backoff_max = ms(15);
    want.contention.attempts_max = 16;
    want.write_cache.entries_max = 17;
    want.write_cache.bytes_max = 18;
    want.breaker.failures_to_open = 19;
    want.breaker.open_for = ms(20);
    want.durability = geostate::backends::redis::Durability::Wait {
        replicas: 2,
        timeout: ms(21),
    };
    assert_eq!(r, want);

    let config = parse(
        r#"
        region = "eu-west"
        [store]
        kind = "postgres"
        url = "postgres://app@p/db"
        replicas = ["postgres://app@r1/db"]
        read_policy = "round-robin"
        replica_lag_ms_max = 31
        lag_check_interval_ms = 32
        schema = "s_eu"
        create_schema = false
        primary_pool_max = 33
        replica_pool_max = 34
        acquire_timeout_ms = 35
        statement_timeout_ms = 0
        synchronous_commit = false
        retry_attempts_max = 36
        write_cache_entries_max = 37
        write_cache_bytes_max = 38
        application_name = "gs-eu"
        [store.tls]
        mode = "verify-full"
        ca_cert_file = "/db-ca.pem"
        client_cert_file = "/db.pem"
        client_key_file = "/db.key"
        [layout]
        partitions = 16
        buckets = 8
        "#,
    );
    let StoreConfig::Postgres(store) = &config.store else {
        panic!()
    };
    let pg = postgres_config(store, &layout).unwrap();
    use geostate::backends::postgres::{ReadPolicy, SslMode};
    assert_eq!(pg.primary_url, "postgres://app@p/db");
    assert_eq!(pg.replica_urls, ["postgres://app@r1/db"]);
    assert_eq!(pg.read_policy, ReadPolicy::RoundRobin);
    assert_eq!(pg.max_replica_lag, ms(31));
    assert_eq!(pg.lag_check_interval, ms(32));
    assert_eq!(pg.schema, "s_eu");
    assert!(!pg.create_schema);
    assert_eq!(pg.layout, layout);
    assert_eq!((pg.primary_pool_max, pg.replica_pool_max), (33, 34));
    assert_eq!(pg.acquire_timeout, ms(35));
    assert_eq!(pg.statement_timeout, None);
    assert!(!pg.synchronous_commit);
    assert_eq!(pg.retry.attempts_max, 36);
    assert_eq!((pg.write_cache_entries, pg.write_cache_bytes), (37, 38));
    assert_eq!(pg.application_name, "gs-eu");
    assert_eq!(pg.ssl_mode, Some(SslMode::VerifyFull));
    assert_eq!(pg.ssl_root_cert.as_deref(), Some(Path::new("/db-ca.pem")));
    assert_eq!(
        pg.ssl_client_cert,
        Some(("/db.pem".into(), "/db.key".into()))
    );
}

#[test]
fn example_configs_convert_to_valid_store_configs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let config = RegionConfig::from_file(&path).unwrap();
        let layout = config.layout.to_layout().unwrap();
        match &config.store {
            StoreConfig::Redis(store) => {
                redis_config(store, &layout).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            StoreConfig::Postgres(store) => {
                postgres_config(store, &layout)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            other => panic!("{}: {other:?}", path.display()),
        }
        seen += 1;
    }
    assert_eq!(seen, 3);
}
