//! Region configuration, loadable from TOML.

use std::fmt;
use std::path::{Path, PathBuf};

use geostate_backends::{fnv1a64, redact_url, Layout};
use geostate_crdt::ActorId;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::{RegionError, RegionId};

/// Which store a region keeps its state in: the `[store]` table, chosen by its `kind`
/// (`memory`, `redis` or `postgres`).
///
/// The configuration is plain data: this crate does not connect to Redis or PostgreSQL.
/// `geostate::open_region` (in the facade crate, which has both store drivers) opens the region
/// on whichever store the configuration names; [`crate::Region::connect`] opens only the
/// memory store. Every key under `[store]` and its sub-tables must be known: a misspelled
/// key is an error, never silently ignored.
///
/// ```
/// use geostate_regions::{RegionConfig, StoreConfig};
/// let config = RegionConfig::from_toml_str("region = \"us-east\"\n[store]\nkind = \"memory\"\n")
///     .unwrap();
/// assert_eq!(config.store, StoreConfig::Memory);
/// // Without a [store] table the region is on the memory store too.
/// assert_eq!(RegionConfig::from_toml_str("region = \"us-east\"").unwrap().store, StoreConfig::Memory);
/// assert!(RegionConfig::from_toml_str("region = \"us-east\"\n[store]\nkind = \"mysql\"\n").is_err());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "StoreTable")]
#[non_exhaustive]
pub enum StoreConfig {
    /// The embedded in-memory store (the default): `kind = "memory"`, no other keys.
    #[default]
    Memory,
    /// A Redis store (standalone, Cluster or Sentinel): `kind = "redis"`.
    Redis(RedisStoreConfig),
    /// A PostgreSQL store (a primary and optional read replicas): `kind = "postgres"`.
    Postgres(PostgresStoreConfig),
}

impl StoreConfig {
    /// `"memory"`, `"redis"` or `"postgres"`: the `kind` this configuration has in TOML.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreConfig::Memory => "memory",
            StoreConfig::Redis(_) => "redis",
            StoreConfig::Postgres(_) => "postgres",
        }
    }

    /// Checks that the keys every store needs are there and fit together (a URL, a
    /// sentinel's service name, client certificates with their keys). Parsing runs this; call
    /// it on a configuration built in code. The store checks the values themselves (URL
    /// syntax, key prefix, schema name, limits) when it is opened.
    pub fn validate(&self) -> Result<(), RegionError> {
        match self {
            StoreConfig::Memory => Ok(()),
            StoreConfig::Redis(redis) => redis.validate(),
            StoreConfig::Postgres(postgres) => postgres.validate(),
        }
    }
}

/// The `[store]` table as written, by `kind`. Serde does not enforce `deny_unknown_fields` on
/// the unit variants of an internally tagged enum (serde-rs/serde#2123), so the memory store
/// is read through an empty strict struct: a stray key under `[store]` is an error, not
/// silently ignored. (The tag itself is taken out before a variant's struct sees the table.)
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum StoreTable {
    Memory(MemoryTable),
    Redis(RedisStoreConfig),
    Postgres(PostgresStoreConfig),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryTable {}

impl TryFrom<StoreTable> for StoreConfig {
    type Error = String;

    fn try_from(table: StoreTable) -> Result<Self, String> {
        let config = match table {
            StoreTable::Memory(MemoryTable {}) => StoreConfig::Memory,
            StoreTable::Redis(redis) => StoreConfig::Redis(redis),
            StoreTable::Postgres(postgres) => StoreConfig::Postgres(postgres),
        };
        // Only the message: the TOML error around it already says "configuration".
        config.validate().map_err(|e| match e {
            RegionError::Config(message) => message,
            other => other.to_string(),
        })?;
        Ok(config)
    }
}

/// `[store]` needs `key` for `kind`.
fn missing(kind: &str, key: &str, what: &str) -> RegionError {
    RegionError::Config(format!("[store] kind = \"{kind}\" needs `{key}`: {what}"))
}

/// Client certificate and key files come in pairs.
fn check_client_pair(
    kind: &str,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> Result<(), RegionError> {
    if cert.is_some() != key.is_some() {
        return Err(RegionError::Config(format!(
            "[store.tls] of kind = \"{kind}\": `client_cert_file` and `client_key_file` go \
             together (set both or neither)"
        )));
    }
    Ok(())
}

/// Reads `url = "..."` or `urls = ["...", ...]` (either spelling, either shape).
fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct Urls;

    impl<'de> Visitor<'de> for Urls {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a URL or a list of URLs")
        }

        fn visit_str<E: de::Error>(self, url: &str) -> Result<Self::Value, E> {
            Ok(vec![url.to_string()])
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut urls = Vec::new();
            while let Some(url) = seq.next_element::<String>()? {
                urls.push(url);
            }
            Ok(urls)
        }
    }

    deserializer.deserialize_any(Urls)
}

/// Which Redis deployment a Redis store talks to (`mode` under `[store]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum RedisStoreMode {
    /// One server (the default): exactly one URL.
    #[default]
    Standalone,
    /// Redis Cluster: the URLs are seed nodes; the client learns the rest of the cluster.
    Cluster,
    /// A primary watched by Redis Sentinel: the URLs are the sentinels and `service` names the
    /// monitored master.
    Sentinel,
}

/// TLS files of a Redis store (`[store.tls]`); TLS itself is switched on by `rediss://` URLs,
/// and these files with `redis://` URLs are refused when the store opens. Read when the store
/// connects; never logged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisTlsConfig {
    /// PEM file of the CA certificate(s) to trust instead of the system trust store.
    pub ca_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate chain (mutual TLS); set with `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub client_key_file: Option<PathBuf>,
}

/// Durability of a Redis store's writes beyond the primary (`[store.wait]`): after each write,
/// `WAIT replicas timeout`. Without this table a write is acknowledged once the primary has
/// applied it (Redis replicates asynchronously).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisWaitConfig {
    /// Replicas that must confirm each write (at least 1).
    pub replicas: u32,
    /// How long to wait for them, in milliseconds; if fewer confirm in time the write is
    /// reported as failed although the primary applied it.
    pub timeout_ms: u64,
}

impl RedisWaitConfig {
    /// Wait for `replicas` replicas for at most `timeout_ms` milliseconds.
    pub fn new(replicas: u32, timeout_ms: u64) -> Self {
        Self {
            replicas,
            timeout_ms,
        }
    }
}

/// A Redis store (`kind = "redis"`): where the servers are, the namespace, TLS, durability
/// and timeouts. Defaults are those of `geostate_backends::redis::RedisConfig`; the layout
/// comes from the region's `[layout]`.
///
/// ```
/// use geostate_regions::{RedisStoreMode, RegionConfig, StoreConfig};
/// let config = RegionConfig::from_toml_str(r#"
///     region = "us-east"
///
///     [store]
///     kind = "redis"
///     mode = "sentinel"                      # standalone (default) | cluster | sentinel
///     urls = ["rediss://10.0.0.1:26379", "rediss://10.0.0.2:26379"]
///     service = "geostate-us-east"           # the master the sentinels monitor
///     key_prefix = "gs:us-east:"
///     connect_timeout_ms = 1000
///     response_timeout_ms = 3000
///
///     [store.tls]
///     ca_cert_file = "/etc/geostate/redis-ca.pem"
///
///     [store.wait]                           # WAIT 1 200 after each write
///     replicas = 1
///     timeout_ms = 200
/// "#).unwrap();
/// let StoreConfig::Redis(redis) = &config.store else { panic!("not redis") };
/// assert_eq!(redis.mode, RedisStoreMode::Sentinel);
/// assert_eq!(redis.urls.len(), 2);
/// assert_eq!(redis.service.as_deref(), Some("geostate-us-east"));
/// assert_eq!(redis.wait.as_ref().map(|w| w.replicas), Some(1));
/// assert_eq!(redis.retry_attempts_max, 5); // a default
///
/// // One server: `url` (or `urls` with one entry).
/// let one = RegionConfig::from_toml_str(
///     "region = \"eu-west\"\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/\"\n",
/// ).unwrap();
/// assert!(matches!(&one.store, StoreConfig::Redis(r) if r.urls == ["redis://127.0.0.1:6379/"]));
/// // No URL: refused, naming the key.
/// let err = RegionConfig::from_toml_str("region = \"eu-west\"\n[store]\nkind = \"redis\"\n")
///     .unwrap_err();
/// assert!(err.to_string().contains("`url`"), "{err}");
/// ```
///
/// `Debug` hides passwords in the URLs.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default = "RedisStoreConfig::unset", deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisStoreConfig {
    /// The deployment kind (`standalone`, `cluster` or `sentinel`; default `standalone`).
    pub mode: RedisStoreMode,
    /// Server URLs (`redis://[user:password@]host:port[/db]`, `rediss://` for TLS): the server,
    /// cluster seed nodes or sentinels, by `mode`. Required; written `url = "..."` or
    /// `urls = [...]`.
    #[serde(alias = "url", deserialize_with = "one_or_many")]
    pub urls: Vec<String>,
    /// The master name the sentinels monitor; required with `mode = "sentinel"`, refused
    /// otherwise.
    pub service: Option<String>,
    /// Namespace of every Redis key of this store (default `gs:`): regions sharing one server
    /// need different prefixes. 1 to 64 bytes, without `{`, `}` or control characters.
    pub key_prefix: String,
    /// CA and client certificate files for `rediss://` URLs.
    pub tls: RedisTlsConfig,
    /// Wait for replicas after each write (`[store.wait]`); `None` (the default): the primary's
    /// acknowledgement is enough.
    pub wait: Option<RedisWaitConfig>,
    /// Longest wait to open a connection, in milliseconds (default 2000).
    pub connect_timeout_ms: u64,
    /// Longest wait for a reply, in milliseconds (default 5000).
    pub response_timeout_ms: u64,
    /// Attempts of an operation that is safe to repeat after a transport error, the first
    /// included (default 5).
    pub retry_attempts_max: u32,
    /// Bound of the first retry delay, in milliseconds (default 10).
    pub retry_backoff_min_ms: u64,
    /// Largest bound of a retry delay, in milliseconds (default 1000).
    pub retry_backoff_max_ms: u64,
    /// Attempts of a write that keeps losing optimistic-concurrency races to other processes
    /// (default 200).
    pub contention_attempts_max: u32,
    /// Keys in the write cache (default 16384; 0 disables it).
    pub write_cache_entries_max: usize,
    /// Bytes of values in the write cache (default 64 MiB).
    pub write_cache_bytes_max: usize,
    /// Consecutive transport failures that open the circuit breaker (default 5; 0 disables
    /// the breaker).
    pub breaker_failures_to_open: u32,
    /// How long the open breaker fails operations at once, in milliseconds (default 2000).
    pub breaker_open_ms: u64,
}

impl RedisStoreConfig {
    /// Every default and no URL: what the missing keys of a `[store]` table are filled from.
    fn unset() -> Self {
        Self {
            mode: RedisStoreMode::Standalone,
            urls: Vec::new(),
            service: None,
            key_prefix: "gs:".to_string(),
            tls: RedisTlsConfig::default(),
            wait: None,
            connect_timeout_ms: 2_000,
            response_timeout_ms: 5_000,
            retry_attempts_max: 5,
            retry_backoff_min_ms: 10,
            retry_backoff_max_ms: 1_000,
            contention_attempts_max: 200,
            write_cache_entries_max: 16_384,
            write_cache_bytes_max: 64 << 20,
            breaker_failures_to_open: 5,
            breaker_open_ms: 2_000,
        }
    }

    /// One server at `url`, every other setting at its default.
    pub fn standalone(url: impl Into<String>) -> Self {
        Self {
            urls: vec![url.into()],
            ..Self::unset()
        }
    }

    /// A Redis Cluster reached through `seeds`.
    pub fn cluster<S: Into<String>>(seeds: impl IntoIterator<Item = S>) -> Self {
        Self {
            mode: RedisStoreMode::Cluster,
            urls: seeds.into_iter().map(Into::into).collect(),
            ..Self::unset()
        }
    }

    /// The master `service` watched by `sentinels`.
    pub fn sentinel<S: Into<String>>(
        sentinels: impl IntoIterator<Item = S>,
        service: impl Into<String>,
    ) -> Self {
        Self {
            mode: RedisStoreMode::Sentinel,
            urls: sentinels.into_iter().map(Into::into).collect(),
            service: Some(service.into()),
            ..Self::unset()
        }
    }

    /// This configuration with another key prefix.
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    fn validate(&self) -> Result<(), RegionError> {
        const KIND: &str = "redis";
        if self.urls.is_empty() || self.urls.iter().any(String::is_empty) {
            return Err(missing(
                KIND,
                "url",
                "the server's URL (or `urls`: the cluster's seed nodes or the sentinels)",
            ));
        }
        match (self.mode, self.service.as_deref()) {
            (RedisStoreMode::Sentinel, None | Some("")) => {
                return Err(missing(
                    KIND,
                    "service",
                    "with mode = \"sentinel\", the name of the master the sentinels monitor",
                ))
            }
            (RedisStoreMode::Standalone | RedisStoreMode::Cluster, Some(_)) => {
                return Err(RegionError::Config(
                    "[store] `service` is only for mode = \"sentinel\"".into(),
                ))
            }
            _ => {}
        }
        if self.mode == RedisStoreMode::Standalone && self.urls.len() > 1 {
            return Err(RegionError::Config(format!(
                "[store] mode = \"standalone\" takes one URL, got {}; use mode = \"cluster\" \
                 or \"sentinel\" for several",
                self.urls.len()
            )));
        }
        check_client_pair(KIND, &self.tls.client_cert_file, &self.tls.client_key_file)
    }
}

impl fmt::Debug for RedisStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreConfig")
            .field("mode", &self.mode)
            .field(
                "urls",
                &self.urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>(),
            )
            .field("service", &self.service)
            .field("key_prefix", &self.key_prefix)
            .field("tls", &self.tls)
            .field("wait", &self.wait)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("response_timeout_ms", &self.response_timeout_ms)
            .field("retry_attempts_max", &self.retry_attempts_max)
            .field("retry_backoff_min_ms", &self.retry_backoff_min_ms)
            .field("retry_backoff_max_ms", &self.retry_backoff_max_ms)
            .field("contention_attempts_max", &self.contention_attempts_max)
            .field("write_cache_entries_max", &self.write_cache_entries_max)
            .field("write_cache_bytes_max", &self.write_cache_bytes_max)
            .field("breaker_failures_to_open", &self.breaker_failures_to_open)
            .field("breaker_open_ms", &self.breaker_open_ms)
            .finish()
    }
}

/// How a PostgreSQL store's value reads choose among replicas within the lag bound
/// (`read_policy` under `[store]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum PostgresReadPolicy {
    /// The replica with the smallest measured lag (the default).
    #[default]
    LeastLag,
    /// Each eligible replica in turn.
    RoundRobin,
    /// A replica drawn at random.
    Random,
}

/// libpq's `sslmode` for a PostgreSQL store (`mode` under `[store.tls]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum PostgresSslMode {
    /// Plaintext only.
    Disable,
    /// TLS if the server offers it, unverified; plaintext otherwise.
    Prefer,
    /// TLS or fail; the certificate is not verified.
    Require,
    /// TLS or fail; the certificate must chain to a trusted CA.
    VerifyCa,
    /// TLS or fail; the certificate must chain to a trusted CA and name the host.
    VerifyFull,
}

/// TLS of a PostgreSQL store (`[store.tls]`); overrides the URLs' `sslmode`, `sslrootcert`,
/// `sslcert` and `sslkey` for the primary and every replica.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PostgresTlsConfig {
    /// The TLS mode; `None` (the default): each URL's `sslmode`, `prefer` if it has none.
    pub mode: Option<PostgresSslMode>,
    /// PEM file of CA certificate(s) trusted besides the system store; only with
    /// `verify-ca` or `verify-full`.
    pub ca_cert_file: Option<PathBuf>,
    /// PEM file of a client certificate (certificate authentication); set with
    /// `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's key.
    pub client_key_file: Option<PathBuf>,
}

/// A PostgreSQL store (`kind = "postgres"`): the primary, read replicas and how reads use
/// them, the schema, pool sizes and TLS. Defaults are those of
/// `geostate_backends::postgres::PostgresConfig`; the layout comes from the region's
/// `[layout]`.
///
/// ```
/// use geostate_regions::{PostgresReadPolicy, PostgresSslMode, RegionConfig, StoreConfig};
/// let config = RegionConfig::from_toml_str(r#"
///     region = "eu-west"
///
///     [store]
///     kind = "postgres"
///     url = "postgres://geostate@db-primary.internal:5432/geostate"
///     replicas = ["postgres://geostate@db-replica-1.internal:5432/geostate"]
///     read_policy = "round-robin"            # least-lag (default) | round-robin | random
///     replica_lag_ms_max = 2000
///     schema = "region_eu_west"
///     primary_pool_max = 32
///
///     [store.tls]
///     mode = "verify-full"
///     ca_cert_file = "/etc/geostate/db-ca.pem"
/// "#).unwrap();
/// let StoreConfig::Postgres(pg) = &config.store else { panic!("not postgres") };
/// assert_eq!(pg.replicas.len(), 1);
/// assert_eq!(pg.read_policy, PostgresReadPolicy::RoundRobin);
/// assert_eq!(pg.tls.mode, Some(PostgresSslMode::VerifyFull));
/// assert_eq!(pg.replica_pool_max, 8); // a default
///
/// // No URL: refused, naming the key.
/// let err = RegionConfig::from_toml_str("region = \"eu-west\"\n[store]\nkind = \"postgres\"\n")
///     .unwrap_err();
/// assert!(err.to_string().contains("`url`"), "{err}");
/// ```
///
/// `Debug` hides passwords in the URLs.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default = "PostgresStoreConfig::unset", deny_unknown_fields)]
#[non_exhaustive]
pub struct PostgresStoreConfig {
    /// The primary's URL (`postgres://[user[:password]@]host[:port]/database[?...]`): every
    /// write and every read that must be current goes there. Required.
    pub url: String,
    /// Hot-standby replicas of the primary that may serve value reads (default none).
    pub replicas: Vec<String>,
    /// How value reads choose among eligible replicas (default `least-lag`).
    pub read_policy: PostgresReadPolicy,
    /// A replica serves reads only while its lag is at most this, in milliseconds (default
    /// 1000): the bound on how stale a replica read can be.
    pub replica_lag_ms_max: u64,
    /// How often replica lag is measured, in milliseconds (default 200).
    pub lag_check_interval_ms: u64,
    /// The schema holding the store's tables, one region store per schema (default
    /// `geostate`). Lowercase ASCII letters, digits and `_`, at most 63 bytes.
    pub schema: String,
    /// Create the schema if it does not exist (default true).
    pub create_schema: bool,
    /// Most connections to the primary (default 16).
    pub primary_pool_max: u32,
    /// Most connections to each replica (default 8).
    pub replica_pool_max: u32,
    /// How long an operation waits for a primary connection, in milliseconds (default
    /// 10000).
    pub acquire_timeout_ms: u64,
    /// Server-side `statement_timeout`, in milliseconds (default 30000; 0: the server's own).
    pub statement_timeout_ms: u64,
    /// Whether a commit waits for its WAL to reach disk (default true; false only for
    /// throwaway stores: a crash can then lose acknowledged writes).
    pub synchronous_commit: bool,
    /// Attempts per operation after transient failures, the first included (default 10).
    pub retry_attempts_max: u32,
    /// Keys in the write cache (default 10000; 0 disables it).
    pub write_cache_entries_max: usize,
    /// Bytes in the write cache (default 64 MiB; 0 disables it).
    pub write_cache_bytes_max: usize,
    /// `application_name` of the connections (default `geostate`).
    pub application_name: String,
    /// TLS mode and files.
    pub tls: PostgresTlsConfig,
}

impl PostgresStoreConfig {
    /// Every default and no URL: what the missing keys of a `[store]` table are filled from.
    fn unset() -> Self {
        Self {
            url: String::new(),
            replicas: Vec::new(),
            read_policy: PostgresReadPolicy::LeastLag,
            replica_lag_ms_max: 1_000,
            lag_check_interval_ms: 200,
            schema: "geostate".to_string(),
            create_schema: true,
            primary_pool_max: 16,
            replica_pool_max: 8,
            acquire_timeout_ms: 10_000,
            statement_timeout_ms: 30_000,
            synchronous_commit: true,
            retry_attempts_max: 10,
            write_cache_entries_max: 10_000,
            write_cache_bytes_max: 64 << 20,
            application_name: "geostate".to_string(),
            tls: PostgresTlsConfig::default(),
        }
    }

    /// The primary at `url`, no replicas, every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::unset()
        }
    }

    /// This configuration with another schema.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    fn validate(&self) -> Result<(), RegionError> {
        const KIND: &str = "postgres";
        if self.url.is_empty() {
            return Err(missing(KIND, "url", "the primary's postgres:// URL"));
        }
        if self.replicas.iter().any(String::is_empty) {
            return Err(RegionError::Config(
                "[store] `replicas` holds an empty URL".into(),
            ));
        }
        check_client_pair(KIND, &self.tls.client_cert_file, &self.tls.client_key_file)
    }
}

impl fmt::Debug for PostgresStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStoreConfig")
            .field("url", &redact_url(&self.url))
            .field(
                "replicas",
                &self
                    .replicas
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("read_policy", &self.read_policy)
            .field("replica_lag_ms_max", &self.replica_lag_ms_max)
            .field("lag_check_interval_ms", &self.lag_check_interval_ms)
            .field("schema", &self.schema)
            .field("create_schema", &self.create_schema)
            .field("primary_pool_max", &self.primary_pool_max)
            .field("replica_pool_max", &self.replica_pool_max)
            .field("acquire_timeout_ms", &self.acquire_timeout_ms)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field("synchronous_commit", &self.synchronous_commit)
            .field("retry_attempts_max", &self.retry_attempts_max)
            .field("write_cache_entries_max", &self.write_cache_entries_max)
            .field("write_cache_bytes_max", &self.write_cache_bytes_max)
            .field("application_name", &self.application_name)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Partitioning and limits of the store; every region of a deployment must agree on
/// `partitions` and `buckets`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LayoutConfig {
    /// Partitions of the keyspace (1..=4096).
    pub partitions: u16,
    /// Digest buckets per partition (1..=4096).
    pub buckets: u16,
    /// Largest encoded value, in bytes.
    pub value_bytes_max: usize,
    /// Change-feed entries kept per partition.
    pub feed_entries_max: usize,
}

impl Default for LayoutConfig {
    fn default() -> Self {
        let layout = Layout::default();
        Self {
            partitions: layout.partitions(),
            buckets: layout.buckets(),
            value_bytes_max: layout.value_bytes_max(),
            feed_entries_max: layout.feed_entries_max(),
        }
    }
}

impl LayoutConfig {
    /// The validated layout.
    pub fn to_layout(&self) -> Result<Layout, RegionError> {
        Ok(Layout::new(
            self.partitions,
            self.buckets,
            self.value_bytes_max,
            self.feed_entries_max,
        )?)
    }
}

/// A built-in conflict resolution policy for opaque values, by key prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ResolverPolicy {
    /// Last writer wins by `(HLC, actor)` (the default for every key).
    Lww,
    /// Keep every sibling; the application resolves on read.
    KeepSiblings,
}

/// One `[[resolvers]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverConfig {
    /// Keys starting with this prefix use `policy` (the longest matching prefix wins).
    pub prefix: String,
    /// The policy.
    pub policy: ResolverPolicy,
}

/// Limits on region operations.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegionLimits {
    /// Most items in one batch call.
    pub batch_items_max: usize,
    /// Largest forward offset of a remote HLC timestamp accepted, in milliseconds.
    pub clock_forward_ms_max: u64,
    /// Conflicts remembered per process so a conflict read repeatedly is recorded once.
    pub conflicts_remembered_max: usize,
}

impl Default for RegionLimits {
    fn default() -> Self {
        Self {
            batch_items_max: 10_000,
            clock_forward_ms_max: 60_000,
            conflicts_remembered_max: 10_000,
        }
    }
}

/// Everything a [`crate::Region`] needs to know.
///
/// ```
/// use geostate_regions::{RegionConfig, ResolverPolicy};
/// let config = RegionConfig::from_toml_str(r#"
///     region = "us-east"
///     node = 3
///
///     [store]
///     kind = "memory"
///
///     [layout]
///     partitions = 128
///
///     [[resolvers]]
///     prefix = "profile:"
///     policy = "keep-siblings"
/// "#).unwrap();
/// assert_eq!(config.region.as_str(), "us-east");
/// assert_eq!(config.layout.partitions, 128);
/// assert_eq!(config.resolvers[0].policy, ResolverPolicy::KeepSiblings);
/// assert_ne!(config.actor().unwrap(), RegionConfig::new("eu-west".parse().unwrap()).actor().unwrap());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// This region's name.
    pub region: RegionId,
    /// This process's node number within the region (0..2^24); with the region it makes the
    /// actor id.
    #[serde(default)]
    pub node: u32,
    /// An explicit actor id, overriding the one derived from region and node.
    #[serde(default)]
    pub actor: Option<u64>,
    /// The store (`[store]`; the memory store when absent). See [`StoreConfig`].
    #[serde(default)]
    pub store: StoreConfig,
    /// Partitioning and size limits.
    #[serde(default)]
    pub layout: LayoutConfig,
    /// Conflict resolution policies by key prefix.
    #[serde(default)]
    pub resolvers: Vec<ResolverConfig>,
    /// Operation limits.
    #[serde(default)]
    pub limits: RegionLimits,
}

impl std::str::FromStr for RegionId {
    type Err = RegionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RegionId::new(s)
    }
}

/// Node numbers must fit in the low 24 bits of an actor id.
pub const NODE_MAX: u32 = (1 << 24) - 1;

impl RegionConfig {
    /// A configuration with every default: node 0, the memory store, 256 partitions.
    pub fn new(region: RegionId) -> Self {
        Self {
            region,
            node: 0,
            actor: None,
            store: StoreConfig::default(),
            layout: LayoutConfig::default(),
            resolvers: Vec::new(),
            limits: RegionLimits::default(),
        }
    }

    /// Parses a TOML document.
    pub fn from_toml_str(text: &str) -> Result<Self, RegionError> {
        toml::from_str(text).map_err(|e| RegionError::Config(e.to_string()))
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, RegionError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| RegionError::Config(format!("reading {}: {e}", path.display())))?;
        Self::from_toml_str(&text)
    }

    /// This process's actor id: the explicit `actor`, or the upper 40 bits from FNV-1a 64 of
    /// the region name and the lower 24 bits from the node number, so actors of different
    /// regions never collide by construction of their node numbers alone.
    pub fn actor(&self) -> Result<ActorId, RegionError> {
        if let Some(actor) = self.actor {
            return Ok(ActorId::new(actor));
        }
        if self.node > NODE_MAX {
            return Err(RegionError::Config(format!(
                "node {} exceeds the maximum {NODE_MAX}",
                self.node
            )));
        }
        let region_bits = fnv1a64(self.region.as_str().as_bytes()) << 24;
        Ok(ActorId::new(region_bits | u64::from(self.node)))
    }
}
