//! The `[store]` table of a region's TOML: every key of the Redis and PostgreSQL stores, their
//! defaults, and what is refused (unknown keys, a missing URL, a bad mode); and the example
//! configurations in `examples/config/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use geostate_regions::{
    PostgresReadPolicy, PostgresSslMode, PostgresStoreConfig, RedisStoreConfig, RedisStoreMode,
    Region, RegionConfig, RegionError, StoreConfig,
};

fn parse(store: &str) -> Result<RegionConfig, RegionError> {
    RegionConfig::from_toml_str(&format!("region = \"us-east\"\n\n{store}"))
}

fn redis(store: &str) -> RedisStoreConfig {
    match parse(store)
        .unwrap_or_else(|e| panic!("{store}\n{e}"))
        .store
    {
        StoreConfig::Redis(redis) => redis,
        other => panic!("expected a redis store, got {other:?}"),
    }
}

fn postgres(store: &str) -> PostgresStoreConfig {
    match parse(store)
        .unwrap_or_else(|e| panic!("{store}\n{e}"))
        .store
    {
        StoreConfig::Postgres(pg) => pg,
        other => panic!("expected a postgres store, got {other:?}"),
    }
}

/// The configuration error `store` gives; asserts that it names `needle`.
fn refused(store: &str, needle: &str) -> String {
    match parse(store) {
        Err(RegionError::Config(message)) => {
            assert!(
                message.contains(needle),
                "the error for\n{store}\nshould name {needle:?}: {message}"
            );
            message
        }
        other => panic!("accepted\n{store}\n{other:?}"),
    }
}

#[test]
fn redis_reads_every_key() {
    let r = redis(
        r#"
        [store]
        kind = "redis"
        mode = "sentinel"
        urls = ["rediss://:pw@10.0.0.1:26379", "rediss://10.0.0.2:26379"]
        service = "geostate-us-east"
        key_prefix = "app:us-east:"
        connect_timeout_ms = 1500
        response_timeout_ms = 2500
        retry_attempts_max = 7
        retry_backoff_min_ms = 3
        retry_backoff_max_ms = 300
        contention_attempts_max = 50
        write_cache_entries_max = 100
        write_cache_bytes_max = 4096
        breaker_failures_to_open = 9
        breaker_open_ms = 750

        [store.tls]
        ca_cert_file = "/etc/geostate/ca.pem"
        client_cert_file = "/etc/geostate/client.pem"
        client_key_file = "/etc/geostate/client.key"

        [store.wait]
        replicas = 2
        timeout_ms = 150
        "#,
    );
    assert_eq!(r.mode, RedisStoreMode::Sentinel);
    assert_eq!(
        r.urls,
        ["rediss://:pw@10.0.0.1:26379", "rediss://10.0.0.2:26379"]
    );
    assert_eq!(r.service.as_deref(), Some("geostate-us-east"));
    assert_eq!(r.key_prefix, "app:us-east:");
    assert_eq!(r.connect_timeout_ms, 1500);
    assert_eq!(r.response_timeout_ms, 2500);
    assert_eq!(r.retry_attempts_max, 7);
    assert_eq!(r.retry_backoff_min_ms, 3);
    assert_eq!(r.retry_backoff_max_ms, 300);
    assert_eq!(r.contention_attempts_max, 50);
    assert_eq!(r.write_cache_entries_max, 100);
    assert_eq!(r.write_cache_bytes_max, 4096);
    assert_eq!(r.breaker_failures_to_open, 9);
    assert_eq!(r.breaker_open_ms, 750);
    assert_eq!(
        r.tls.ca_cert_file.as_deref(),
        Some(Path::new("/etc/geostate/ca.pem"))
    );
    assert_eq!(
        r.tls.client_cert_file.as_deref(),
        Some(Path::new("/etc/geostate/client.pem"))
    );
    assert_eq!(
        r.tls.client_key_file.as_deref(),
        Some(Path::new("/etc/geostate/client.key"))
    );
    let wait = r.wait.clone().unwrap();
    assert_eq!((wait.replicas, wait.timeout_ms), (2, 150));

    // Debug hides the password.
    let shown = format!("{r:?}");
    assert!(!shown.contains(":pw@"), "{shown}");
    assert!(shown.contains(":***@10.0.0.1"), "{shown}");

    // Cluster seeds.
    let c = redis("[store]\nkind = \"redis\"\nmode = \"cluster\"\nurls = [\"redis://a:1\", \"redis://b:2\"]\n");
    assert_eq!(c, RedisStoreConfig::cluster(["redis://a:1", "redis://b:2"]));
    // The same in Rust.
    assert_eq!(
        r.mode,
        RedisStoreConfig::sentinel(["x"], "s").mode,
        "constructors set the mode"
    );
}

#[test]
fn redis_defaults_are_the_stores() {
    let r = redis("[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/\"\n");
    assert_eq!(r, RedisStoreConfig::standalone("redis://127.0.0.1:6379/"));
    assert_eq!(r.mode, RedisStoreMode::Standalone);
    assert_eq!(r.urls, ["redis://127.0.0.1:6379/"]);
    assert_eq!(r.service, None);
    assert_eq!(r.key_prefix, "gs:");
    assert_eq!(r.tls, Default::default());
    assert_eq!(r.wait, None);
    assert_eq!(
        (r.connect_timeout_ms, r.response_timeout_ms),
        (2_000, 5_000)
    );
    assert_eq!(
        (
            r.retry_attempts_max,
            r.retry_backoff_min_ms,
            r.retry_backoff_max_ms
        ),
        (5, 10, 1_000)
    );
    assert_eq!(r.contention_attempts_max, 200);
    assert_eq!(
        (r.write_cache_entries_max, r.write_cache_bytes_max),
        (16_384, 64 << 20)
    );
    assert_eq!((r.breaker_failures_to_open, r.breaker_open_ms), (5, 2_000));
    // `urls` with one entry is the same as `url`.
    assert_eq!(
        redis("[store]\nkind = \"redis\"\nurls = [\"redis://127.0.0.1:6379/\"]\n"),
        r
    );
}

#[test]
fn postgres_reads_every_key() {
    let pg = postgres(
        r#"
        [store]
        kind = "postgres"
        url = "postgres://app:s3cret@db-primary:5432/geostate"
        replicas = ["postgres://app@db-r1/geostate", "postgres://app@db-r2/geostate"]
        read_policy = "random"
        replica_lag_ms_max = 2500
        lag_check_interval_ms = 100
        schema = "region_us_east"
        create_schema = false
        primary_pool_max = 32
        replica_pool_max = 4
        acquire_timeout_ms = 3000
        statement_timeout_ms = 0
        synchronous_commit = false
        retry_attempts_max = 3
        write_cache_entries_max = 50
        write_cache_bytes_max = 8192
        application_name = "geostate-us-east"

        [store.tls]
        mode = "verify-ca"
        ca_cert_file = "/etc/geostate/db-ca.pem"
        client_cert_file = "/etc/geostate/db-client.pem"
        client_key_file = "/etc/geostate/db-client.key"
        "#,
    );
    assert_eq!(pg.url, "postgres://app:s3cret@db-primary:5432/geostate");
    assert_eq!(
        pg.replicas,
        [
            "postgres://app@db-r1/geostate",
            "postgres://app@db-r2/geostate"
        ]
    );
    assert_eq!(pg.read_policy, PostgresReadPolicy::Random);
    assert_eq!(pg.replica_lag_ms_max, 2500);
    assert_eq!(pg.lag_check_interval_ms, 100);
    assert_eq!(pg.schema, "region_us_east");
    assert!(!pg.create_schema);
    assert_eq!((pg.primary_pool_max, pg.replica_pool_max), (32, 4));
    assert_eq!(pg.acquire_timeout_ms, 3000);
    assert_eq!(pg.statement_timeout_ms, 0);
    assert!(!pg.synchronous_commit);
    assert_eq!(pg.retry_attempts_max, 3);
    assert_eq!(
        (pg.write_cache_entries_max, pg.write_cache_bytes_max),
        (50, 8192)
    );
    assert_eq!(pg.application_name, "geostate-us-east");
    assert_eq!(pg.tls.mode, Some(PostgresSslMode::VerifyCa));
    assert_eq!(
        pg.tls.ca_cert_file.as_deref(),
        Some(Path::new("/etc/geostate/db-ca.pem"))
    );
    assert_eq!(
        pg.tls.client_cert_file.as_deref(),
        Some(Path::new("/etc/geostate/db-client.pem"))
    );
    assert_eq!(
        pg.tls.client_key_file.as_deref(),
        Some(Path::new("/etc/geostate/db-client.key"))
    );
    let shown = format!("{pg:?}");
    assert!(!shown.contains("s3cret"), "{shown}");

    for (name, policy) in [
        ("least-lag", PostgresReadPolicy::LeastLag),
        ("round-robin", PostgresReadPolicy::RoundRobin),
        ("random", PostgresReadPolicy::Random),
    ] {
        let text = format!(
            "[store]\nkind = \"postgres\"\nurl = \"postgres://h/d\"\nread_policy = \"{name}\"\n"
        );
        assert_eq!(postgres(&text).read_policy, policy);
    }
    for (name, mode) in [
        ("disable", PostgresSslMode::Disable),
        ("prefer", PostgresSslMode::Prefer),
        ("require", PostgresSslMode::Require),
        ("verify-ca", PostgresSslMode::VerifyCa),
        ("verify-full", PostgresSslMode::VerifyFull),
    ] {
        let text = format!(
            "[store]\nkind = \"postgres\"\nurl = \"postgres://h/d\"\n[store.tls]\nmode = \"{name}\"\n"
        );
        assert_eq!(postgres(&text).tls.mode, Some(mode));
    }
}

#[test]
fn postgres_defaults_are_the_stores() {
    let pg =
        postgres("[store]\nkind = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1/test\"\n");
    assert_eq!(
        pg,
        PostgresStoreConfig::new("postgres://postgres@127.0.0.1/test")
    );
    assert!(pg.replicas.is_empty());
    assert_eq!(pg.read_policy, PostgresReadPolicy::LeastLag);
    assert_eq!(
        (pg.replica_lag_ms_max, pg.lag_check_interval_ms),
        (1_000, 200)
    );
    assert_eq!(pg.schema, "geostate");
    assert!(pg.create_schema);
    assert_eq!((pg.primary_pool_max, pg.replica_pool_max), (16, 8));
    assert_eq!(
        (pg.acquire_timeout_ms, pg.statement_timeout_ms),
        (10_000, 30_000)
    );
    assert!(pg.synchronous_commit);
    assert_eq!(pg.retry_attempts_max, 10);
    assert_eq!(
        (pg.write_cache_entries_max, pg.write_cache_bytes_max),
        (10_000, 64 << 20)
    );
    assert_eq!(pg.application_name, "geostate");
    assert_eq!(pg.tls, Default::default());
}

#[test]
fn unknown_keys_are_refused_everywhere() {
    let redis = "[store]\nkind = \"redis\"\nurl = \"redis://h:1/\"\n";
    let pg = "[store]\nkind = \"postgres\"\nurl = \"postgres://h/d\"\n";
    for (text, key) in [
        (format!("{redis}keyprefix = \"x\"\n"), "keyprefix"),
        (format!("{redis}schema = \"x\"\n"), "schema"),
        (
            format!("{redis}[store.tls]\nca_file = \"/ca\"\n"),
            "ca_file",
        ),
        (format!("{redis}[store.tls]\nmode = \"require\"\n"), "mode"),
        (
            format!("{redis}[store.wait]\nreplicas = 1\ntimeout_ms = 5\nfsync = true\n"),
            "fsync",
        ),
        (format!("{pg}replica = [\"postgres://r/d\"]\n"), "replica"),
        (format!("{pg}key_prefix = \"x\"\n"), "key_prefix"),
        (
            format!("{pg}[store.tls]\nsslmode = \"require\"\n"),
            "sslmode",
        ),
        (
            "[store]\nkind = \"memory\"\nurl = \"redis://h:1/\"\n".to_string(),
            "url",
        ),
    ] {
        refused(&text, key);
    }
}

#[test]
fn a_missing_url_is_refused_naming_the_key() {
    let redis = refused("[store]\nkind = \"redis\"\nkey_prefix = \"a:\"\n", "`url`");
    assert!(redis.contains("redis"), "{redis}");
    refused("[store]\nkind = \"redis\"\nurls = []\n", "`url`");
    refused("[store]\nkind = \"redis\"\nurl = \"\"\n", "`url`");
    let pg = refused("[store]\nkind = \"postgres\"\nschema = \"x\"\n", "`url`");
    assert!(pg.contains("postgres"), "{pg}");
    refused("[store]\nkind = \"postgres\"\nurl = \"\"\n", "`url`");
    // The same check on a configuration built in code.
    let mut config = RegionConfig::new("us-east".parse().unwrap());
    config.store = StoreConfig::Redis(RedisStoreConfig::cluster(Vec::<String>::new()));
    assert!(matches!(config.store.validate(), Err(RegionError::Config(m)) if m.contains("`url`")));
    config.store = StoreConfig::Postgres(PostgresStoreConfig::new(""));
    assert!(matches!(config.store.validate(), Err(RegionError::Config(m)) if m.contains("`url`")));
}

#[test]
fn bad_modes_and_mismatched_keys_are_refused() {
    let url = "url = \"redis://h:1/\"\n";
    refused(
        &format!("[store]\nkind = \"redis\"\nmode = \"replicated\"\n{url}"),
        "replicated",
    );
    refused(
        &format!("[store]\nkind = \"redis\"\nmode = \"Cluster\"\n{url}"),
        "Cluster",
    );
    refused(
        "[store]\nkind = \"postgres\"\nurl = \"postgres://h/d\"\nread_policy = \"fastest\"\n",
        "fastest",
    );
    refused(
        "[store]\nkind = \"postgres\"\nurl = \"postgres://h/d\"\n[store.tls]\nmode = \"verify_full\"\n",
        "verify_full",
    );
    refused("[store]\nkind = \"mysql\"\n", "mysql");
    refused("[store]\nurl = \"redis://h:1/\"\n", "kind");
    // Sentinel needs its service; the others refuse one.
    refused(
        &format!("[store]\nkind = \"redis\"\nmode = \"sentinel\"\n{url}"),
        "`service`",
    );
    refused(
        &format!("[store]\nkind = \"redis\"\nservice = \"m\"\n{url}"),
        "service",
    );
    // Standalone takes one URL; `url` and `urls` are one key.
    refused(
        "[store]\nkind = \"redis\"\nurls = [\"redis://a:1\", \"redis://b:1\"]\n",
        "standalone",
    );
    refused(
        &format!("[store]\nkind = \"redis\"\n{url}urls = [\"redis://b:1\"]\n"),
        "urls",
    );
    refused("[store]\nkind = \"redis\"\nurl = 6379\n", "URL");
    // A client certificate needs its key.
    refused(
        &format!("[store]\nkind = \"redis\"\n{url}[store.tls]\nclient_cert_file = \"/c.pem\"\n"),
        "client_key_file",
    );
    refused(
        "[store]\nkind = \"postgres\"\nurl = \"postgres://h/d\"\n[store.tls]\nclient_key_file = \"/k\"\n",
        "client_cert_file",
    );
    // WAIT needs both of its keys; numbers must fit (the message names the value and the
    // table: serde reads a tagged table whole before the variant's fields see it).
    refused(
        &format!("[store]\nkind = \"redis\"\n{url}[store.wait]\nreplicas = 1\n"),
        "timeout_ms",
    );
    refused(
        &format!("[store]\nkind = \"redis\"\n{url}connect_timeout_ms = -1\n"),
        "-1",
    );
}

#[tokio::test]
async fn region_connect_opens_only_the_memory_store() {
    let config = parse("[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/\"\n").unwrap();
    match Region::connect(config).await {
        Err(RegionError::Config(message)) => assert!(message.contains("open_region"), "{message}"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

fn example_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn example_configs_parse_and_make_one_deployment() {
    let files = example_files();
    assert_eq!(files.len(), 3, "{files:?}");
    let configs: Vec<RegionConfig> = files
        .iter()
        .map(|path| {
            RegionConfig::from_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect();
    let mut namespaces = Vec::new();
    for (path, config) in files.iter().zip(&configs) {
        // Each file is named after its region.
        assert_eq!(
            path.file_stem().unwrap().to_str().unwrap(),
            config.region.as_str()
        );
        // One deployment: the same partitions and buckets everywhere.
        assert_eq!(config.layout, configs[0].layout);
        namespaces.push(match &config.store {
            StoreConfig::Redis(r) => format!("{} {}", r.urls[0], r.key_prefix),
            StoreConfig::Postgres(pg) => format!("{} {}", pg.url, pg.schema),
            other => panic!("{}: a real store, not {other:?}", path.display()),
        });
    }
    // Every region keeps its state apart from the others'.
    let mut distinct = namespaces.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), namespaces.len(), "{namespaces:?}");
    // Both store kinds are shown, and the actors differ.
    assert!(configs.iter().any(|c| c.store.kind() == "redis"));
    assert!(configs.iter().any(|c| c.store.kind() == "postgres"));
    let mut actors: Vec<_> = configs.iter().map(|c| c.actor().unwrap()).collect();
    actors.dedup();
    assert_eq!(actors.len(), 3);
}
