//! Opening a region on the store its configuration names.
//!
//! A region's TOML names its store in `[store]` (see [`StoreConfig`]): the embedded memory
//! store, Redis or PostgreSQL. [`open_region`] connects that store and builds the
//! [`Region`] in one call; [`open_store`] only connects the store (for
//! [`Region::builder`], to add a clock or custom resolvers); [`redis_config`] and
//! [`postgres_config`] turn the TOML settings into the stores' own configurations.
//!
//! ```no_run
//! # async fn run() -> Result<(), geostate::RegionError> {
//! use geostate::{open_region, PnCounter, RegionConfig};
//!
//! let config = RegionConfig::from_file("examples/config/us-east.toml")?;
//! let region = open_region(config).await?;
//! region.merge_crdt("visits", geostate::CounterOp::inc(1)).await?;
//! let _visits: PnCounter = region.read("visits").await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use geostate_backends::postgres::{PostgresBackend, PostgresConfig, ReadPolicy, SslMode};
use geostate_backends::redis::{Durability, RedisBackend, RedisConfig, RedisTls};
use geostate_backends::{AnyStore, Layout, MemoryBackend};
use geostate_regions::{
    PostgresReadPolicy, PostgresSslMode, PostgresStoreConfig, RedisStoreConfig, RedisStoreMode,
    Region, RegionConfig, RegionError, StoreConfig,
};

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// A store's refusal of its configuration, as the configuration error it is.
fn invalid(kind: &str, e: geostate_backends::BackendError) -> RegionError {
    RegionError::Config(format!("[store] kind = \"{kind}\": {e}"))
}

/// The Redis store's configuration for the `[store]` settings `store`, laid out as `layout`
/// (the region's `[layout]`), checked without connecting.
///
/// Errors: [`RegionError::Config`] for a missing or invalid setting (no URL, a bad key
/// prefix, TLS files with `redis://` URLs, a zero timeout, ...).
///
/// ```
/// use geostate::open::redis_config;
/// use geostate::{Layout, RegionConfig, StoreConfig};
///
/// let config = RegionConfig::from_toml_str(r#"
///     region = "us-east"
///     [store]
///     kind = "redis"
///     mode = "cluster"
///     urls = ["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"]
///     key_prefix = "gs:us-east:"
/// "#).unwrap();
/// let StoreConfig::Redis(store) = &config.store else { unreachable!() };
/// let redis = redis_config(store, &config.layout.to_layout().unwrap()).unwrap();
/// assert_eq!(redis.urls.len(), 2);
/// assert_eq!(redis.key_prefix, "gs:us-east:");
///
/// // What the store refuses is a configuration error too.
/// let bad = store.clone().with_key_prefix("a{b");
/// assert!(redis_config(&bad, &Layout::default()).is_err());
/// ```
pub fn redis_config(store: &RedisStoreConfig, layout: &Layout) -> Result<RedisConfig, RegionError> {
    const KIND: &str = "redis";
    StoreConfig::Redis(store.clone()).validate()?;
    let none: [&str; 0] = [];
    let mut config = match store.mode {
        RedisStoreMode::Standalone => RedisConfig::standalone(""),
        RedisStoreMode::Cluster => RedisConfig::cluster(none),
        RedisStoreMode::Sentinel => {
            RedisConfig::sentinel(none, store.service.clone().unwrap_or_default())
        }
        other => {
            return Err(RegionError::Config(format!(
                "[store] kind = \"{KIND}\": mode {other:?} is not supported by this build"
            )))
        }
    };
    config.urls = store.urls.clone();
    config.key_prefix = store.key_prefix.clone();
    config.layout = layout.clone();
    let mut tls = RedisTls::default();
    tls.ca_cert_file = store.tls.ca_cert_file.clone();
    tls.client_cert_file = store.tls.client_cert_file.clone();
    tls.client_key_file = store.tls.client_key_file.clone();
    config.tls = tls;
    config.durability = match &store.wait {
        None => Durability::Primary,
        Some(wait) => Durability::Wait {
            replicas: wait.replicas,
            timeout: ms(wait.timeout_ms),
        },
    };
    config.connect_timeout = ms(store.connect_timeout_ms);
    config.response_timeout = ms(store.response_timeout_ms);
    config.retry.attempts_max = store.retry_attempts_max;
    config.retry.backoff_min = ms(store.retry_backoff_min_ms);
    config.retry.backoff_max = ms(store.retry_backoff_max_ms);
    config.contention.attempts_max = store.contention_attempts_max;
    config.write_cache.entries_max = store.write_cache_entries_max;
    config.write_cache.bytes_max = store.write_cache_bytes_max;
    config.breaker.failures_to_open = store.breaker_failures_to_open;
    config.breaker.open_for = ms(store.breaker_open_ms);
    config.validate().map_err(|e| invalid(KIND, e))?;
    Ok(config)
}

/// The PostgreSQL store's configuration for the `[store]` settings `store`, laid out as
/// `layout` (the region's `[layout]`), checked without connecting.
///
/// Errors: [`RegionError::Config`] for a missing or invalid setting (no URL, a bad schema
/// name, a zero pool size, a CA file with a TLS mode that does not verify, ...).
///
/// ```
/// use geostate::open::postgres_config;
/// use geostate::{Layout, RegionConfig, StoreConfig};
///
/// let config = RegionConfig::from_toml_str(r#"
///     region = "eu-west"
///     [store]
///     kind = "postgres"
///     url = "postgres://geostate@db.internal/geostate"
///     schema = "region_eu_west"
///     [store.tls]
///     mode = "verify-full"
/// "#).unwrap();
/// let StoreConfig::Postgres(store) = &config.store else { unreachable!() };
/// let pg = postgres_config(store, &Layout::default()).unwrap();
/// assert_eq!(pg.schema, "region_eu_west");
/// assert!(postgres_config(&store.clone().with_schema("Bad-Name"), &Layout::default()).is_err());
/// ```
pub fn postgres_config(
    store: &PostgresStoreConfig,
    layout: &Layout,
) -> Result<PostgresConfig, RegionError> {
    const KIND: &str = "postgres";
    StoreConfig::Postgres(store.clone()).validate()?;
    let unsupported = |what: String| {
        RegionError::Config(format!(
            "[store] kind = \"{KIND}\": {what} is not supported by this build"
        ))
    };
    let mut config = PostgresConfig::new(store.url.clone());
    config.replica_urls = store.replicas.clone();
    config.read_policy = match store.read_policy {
        PostgresReadPolicy::LeastLag => ReadPolicy::LeastLag,
        PostgresReadPolicy::RoundRobin => ReadPolicy::RoundRobin,
        PostgresReadPolicy::Random => ReadPolicy::Random,
        other => return Err(unsupported(format!("read_policy {other:?}"))),
    };
    config.max_replica_lag = ms(store.replica_lag_ms_max);
    config.lag_check_interval = ms(store.lag_check_interval_ms);
    config.schema = store.schema.clone();
    config.create_schema = store.create_schema;
    config.layout = layout.clone();
    config.primary_pool_max = store.primary_pool_max;
    config.replica_pool_max = store.replica_pool_max;
    config.acquire_timeout = ms(store.acquire_timeout_ms);
    config.statement_timeout =
        (store.statement_timeout_ms != 0).then(|| ms(store.statement_timeout_ms));
    config.synchronous_commit = store.synchronous_commit;
    config.retry.attempts_max = store.retry_attempts_max;
    config.write_cache_entries = store.write_cache_entries_max;
    config.write_cache_bytes = store.write_cache_bytes_max;
    config.application_name = store.application_name.clone();
    config.ssl_mode = match store.tls.mode {
        None => None,
        Some(PostgresSslMode::Disable) => Some(SslMode::Disable),
        Some(PostgresSslMode::Prefer) => Some(SslMode::Prefer),
        Some(PostgresSslMode::Require) => Some(SslMode::Require),
        Some(PostgresSslMode::VerifyCa) => Some(SslMode::VerifyCa),
        Some(PostgresSslMode::VerifyFull) => Some(SslMode::VerifyFull),
        Some(other) => return Err(unsupported(format!("TLS mode {other:?}"))),
    };
    config.ssl_root_cert = store.tls.ca_cert_file.clone();
    config.ssl_client_cert = match (&store.tls.client_cert_file, &store.tls.client_key_file) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        _ => None,
    };
    config.validate().map_err(|e| invalid(KIND, e))?;
    Ok(config)
}

/// Connects the store `config` names (`[store]`), laid out as its `[layout]`: an empty
/// memory store, or a connection to Redis or PostgreSQL (a PostgreSQL store creates its
/// schema and tables on first use). For [`Region::builder`] when the region needs more than
/// its configuration (a clock, custom resolvers); [`open_region`] does both steps.
///
/// Errors: [`RegionError::Config`] for an invalid configuration;
/// [`RegionError::Backend`] when the store cannot be reached or refuses the layout (a Redis
/// key prefix or PostgreSQL schema already used with other partition or bucket counts).
pub async fn open_store(config: &RegionConfig) -> Result<AnyStore, RegionError> {
    let layout = config.layout.to_layout()?;
    match &config.store {
        StoreConfig::Memory => Ok(AnyStore::from(MemoryBackend::new(layout))),
        StoreConfig::Redis(store) => {
            let redis = redis_config(store, &layout)?;
            Ok(AnyStore::from(RedisBackend::connect(redis).await?))
        }
        StoreConfig::Postgres(store) => {
            let postgres = postgres_config(store, &layout)?;
            Ok(AnyStore::from(PostgresBackend::connect(postgres).await?))
        }
        other => Err(RegionError::Config(format!(
            "[store] kind = {:?} is not supported by this build",
            other.kind()
        ))),
    }
}

/// Opens the region `config` describes on the store it names: connects the store (see
/// [`open_store`]) and builds the [`Region`] with the configuration's resolvers and limits and
/// the system clock. The same call opens a region on the memory store, Redis or PostgreSQL;
/// the handle's type is the same for all three.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use geostate::{open_region, PnCounter, RegionConfig};
///
/// let config = RegionConfig::from_toml_str("region = \"us-east\"\n[store]\nkind = \"memory\"\n")?;
/// let region = open_region(config).await?;
/// assert_eq!(region.backend().kind(), "memory");
/// region.merge_crdt("visits", geostate::CounterOp::inc(2)).await?;
/// assert_eq!(region.read::<PnCounter>("visits").await?.value(), 2);
/// # Ok::<(), geostate::RegionError>(())
/// # }).unwrap();
/// ```
///
/// Errors: as [`open_store`], and [`RegionError::Config`] for an invalid node, actor or
/// resolver.
pub async fn open_region(config: RegionConfig) -> Result<Region<AnyStore>, RegionError> {
    // The parts that need no store first: a bad node number costs no connection.
    config.actor()?;
    let store = open_store(&config).await?;
    Region::builder(config, Arc::new(store)).build()
}
