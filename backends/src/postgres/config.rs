//! Configuration of the PostgreSQL region store.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::{BackendError, Layout};

/// How reads of values ([`get`](crate::StateBackend::get),
/// [`get_many`](crate::StateBackend::get_many), [`scan`](crate::StateBackend::scan)) choose
/// among the read replicas whose staleness is within
/// [`PostgresConfig::max_replica_lag`]. When no replica qualifies, reads go to the primary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadPolicy {
    /// The replica with the smallest measured staleness.
    #[default]
    LeastLag,
    /// Each eligible replica in turn.
    RoundRobin,
    /// A replica drawn at random (seeded: see [`PostgresConfig::rng_seed`]).
    Random,
}

/// Whether and how connections are encrypted and the server authenticated (libpq's
/// `sslmode`). The store's TLS is rustls; what each mode promises:
///
/// | mode | encrypted | server authenticated |
/// |---|---|---|
/// | `Disable` | never | no |
/// | `Prefer` | if the server offers TLS, else plaintext | no |
/// | `Require` | always (fails if the server refuses TLS) | no: any certificate is accepted |
/// | `VerifyCa` | always | the certificate chains to a trusted CA; its host name is not checked |
/// | `VerifyFull` | always | the certificate chains to a trusted CA *and* names the host of the URL |
///
/// Only `VerifyFull` protects against an active man in the middle in general; `VerifyCa` does
/// when the trusted CA signs only your database servers. Unlike libpq, `Require` does not
/// turn into `VerifyCa` when a root certificate is given: the store refuses that combination
/// instead (see [`PostgresConfig::ssl_root_cert`]). Trusted CAs are the system's trust store
/// plus `ssl_root_cert`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS if the server supports it, without verifying its certificate; plaintext otherwise
    /// (an attacker on the path can force plaintext). sqlx's and libpq's default.
    Prefer,
    /// TLS or fail; the certificate is not verified.
    Require,
    /// TLS or fail; the certificate must chain to a trusted CA (host name not checked).
    VerifyCa,
    /// TLS or fail; the certificate must chain to a trusted CA and name the host.
    VerifyFull,
}

impl SslMode {
    /// Whether the mode checks the server's certificate against trusted CAs.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// How failed attempts are retried: serialization failures and deadlocks (SQLSTATE 40001,
/// 40P01), a lost race to create a key, a lost optimistic race (the key or the partition's dot
/// floor changed between the read a write was computed from and its commit), and connection
/// failures that happened before anything could have committed. A connection failure while a
/// local write could be committing (during `COMMIT`, or during the single statement of an
/// optimistic write) is never retried (the write may have taken effect); it is reported as
/// [`BackendError::Unavailable`].
///
/// ```
/// use std::time::Duration;
/// use geostate_backends::postgres::RetryPolicy;
/// let retry = RetryPolicy::default();
/// assert!(retry.attempts_max >= 1);
/// assert!(retry.backoff(1) <= retry.backoff_max);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts per operation, the first included (at least 1).
    pub attempts_max: u32,
    /// Backoff before the second attempt; doubled for each further one (before jitter).
    pub backoff_base: Duration,
    /// Largest backoff before jitter.
    pub backoff_max: Duration,
    /// Optimistic attempts of a write before it falls back to the locking transaction (see
    /// the module documentation of [`crate::postgres`]): the first from the write cache if the
    /// key is cached, the others from a fresh read. An attempt that loses a race is retried at
    /// once (no backoff): the next one reads afresh, and the locking transaction cannot lose
    /// one. 0 makes every write take the locking transaction.
    pub optimistic_attempts_max: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts_max: 10,
            backoff_base: Duration::from_millis(2),
            backoff_max: Duration::from_millis(500),
            optimistic_attempts_max: 2,
        }
    }
}

impl RetryPolicy {
    /// The backoff ceiling before retry number `retry` (1 for the first retry): `backoff_base *
    /// 2^(retry - 1)`, at most `backoff_max`. The store sleeps a uniformly random duration
    /// between half of it and all of it ("equal jitter").
    pub fn backoff(&self, retry: u32) -> Duration {
        let shift = retry.saturating_sub(1).min(20);
        self.backoff_base
            .saturating_mul(1u32 << shift)
            .min(self.backoff_max)
    }
}

/// Where and how to connect, and how to route reads.
///
/// Build one with [`PostgresConfig::new`] and set the public fields you need:
///
/// ```
/// use std::time::Duration;
/// use geostate_backends::postgres::{PostgresConfig, ReadPolicy};
/// let mut config = PostgresConfig::new("postgres://geostate@db-primary:5432/geostate");
/// config.replica_urls = vec!["postgres://geostate@db-replica-1:5432/geostate".into()];
/// config.read_policy = ReadPolicy::RoundRobin;
/// config.max_replica_lag = Duration::from_secs(2);
/// config.schema = "region_us_east".into();
/// assert!(config.validate().is_ok());
/// ```
///
/// TLS is set either in the URLs (`?sslmode=verify-full&sslrootcert=/path/ca.pem`) or with
/// [`ssl_mode`](Self::ssl_mode) and [`ssl_root_cert`](Self::ssl_root_cert), which override
/// the URLs' for the primary and every replica:
///
/// ```
/// use geostate_backends::postgres::{PostgresConfig, SslMode};
/// let mut config = PostgresConfig::new("postgres://geostate@db-primary.internal/geostate");
/// config.ssl_mode = Some(SslMode::VerifyFull);
/// config.ssl_root_cert = Some("/etc/geostate/db-ca.pem".into());
/// assert!(config.validate().is_ok());
/// ```
///
/// Its `Debug` output hides passwords in the URLs.
#[derive(Clone)]
#[non_exhaustive]
pub struct PostgresConfig {
    /// The primary: every write, and every read that must be current (feeds, digests,
    /// cursors, conflicts, the state a compare-and-set checks), goes here.
    pub primary_url: String,
    /// Hot-standby replicas of the primary (streaming replication); may be empty.
    pub replica_urls: Vec<String>,
    /// How value reads choose among eligible replicas.
    pub read_policy: ReadPolicy,
    /// A replica serves value reads only while it is known to hold every write the primary
    /// had committed at most this long ago. This bounds how stale a replica read can be.
    pub max_replica_lag: Duration,
    /// How often the lag monitor measures the replicas.
    pub lag_check_interval: Duration,
    /// How long one lag measurement (or a replica connection attempt) may take before the
    /// replica is marked unhealthy.
    pub lag_check_timeout: Duration,
    /// The schema holding the store's tables: one region store per schema. Lowercase ASCII
    /// letters, digits and `_`, starting with a letter or `_`, at most 63 bytes, not
    /// starting with `pg_`.
    pub schema: String,
    /// Partitions, digest buckets and limits. The partition and bucket counts are pinned in
    /// the schema when it is first opened; opening it with others is an error.
    pub layout: Layout,
    /// Most connections to the primary.
    pub primary_pool_max: u32,
    /// Most connections to each replica.
    pub replica_pool_max: u32,
    /// How long an operation waits for a primary connection before failing with
    /// [`BackendError::Unavailable`].
    pub acquire_timeout: Duration,
    /// Server-side `statement_timeout` for the store's connections (`None`: the server's).
    pub statement_timeout: Option<Duration>,
    /// Whether a commit waits for its WAL to reach disk (`synchronous_commit`). Keep `true`
    /// (the default) for any store whose data matters: with `false`, a server crash can lose
    /// the last acknowledged writes, and their change-feed sequence numbers are then handed
    /// out again for other writes, which breaks every replicator that had read them. `false`
    /// is for tests and throwaway stores, where it takes the disk flush out of the latency of
    /// every write (on a slow disk, the flush bounds the write rate of one key).
    pub synchronous_commit: bool,
    /// A pooled connection idle for longer than this is pinged before it is handed out (one
    /// round trip), so connections broken while idle (a server restart) are replaced before
    /// use. Connections broken more recently surface as failed attempts: retried when nothing
    /// can have been committed, reported otherwise.
    pub ping_if_idle_for: Duration,
    /// Retries of transient failures, and how many optimistic attempts a write makes.
    pub retry: RetryPolicy,
    /// Most keys the write cache holds (what this process last read or wrote for a key, so
    /// that the next write to it is one statement). 0 disables the cache: every optimistic
    /// write then reads first (two statements).
    pub write_cache_entries: usize,
    /// Most bytes the write cache holds, each entry charged about twice its envelope's size
    /// (a rough measure of the decoded value). 0 disables the cache.
    pub write_cache_bytes: usize,
    /// Seed of the random choices (replica choice under [`ReadPolicy::Random`], backoff
    /// jitter). `None` seeds from the process id and the time; tests should set it.
    pub rng_seed: Option<u64>,
    /// Create the schema if it does not exist.
    pub create_schema: bool,
    /// Run the embedded migrations on connect (idempotent; concurrent connectors serialise
    /// on sqlx's migration lock).
    pub run_migrations: bool,
    /// `application_name` of the connections (shows in `pg_stat_activity`).
    pub application_name: String,
    /// TLS mode of every connection (see [`SslMode`] for what each promises). `None`: what
    /// each URL's `sslmode` says, [`SslMode::Prefer`] if it says nothing.
    pub ssl_mode: Option<SslMode>,
    /// PEM file of CA certificate(s) trusted in addition to the system trust store, for
    /// [`SslMode::VerifyCa`] and [`SslMode::VerifyFull`] (overrides a URL's `sslrootcert`).
    /// With a mode that does not verify, connecting is refused rather than silently not
    /// checking the certificate.
    pub ssl_root_cert: Option<PathBuf>,
    /// PEM files of a client certificate and its key, presented for certificate
    /// authentication (`hostssl ... cert` in `pg_hba.conf`); both or neither. Override a URL's
    /// `sslcert` / `sslkey`. The key is read by the driver and never logged.
    pub ssl_client_cert: Option<(PathBuf, PathBuf)>,
}

impl PostgresConfig {
    /// A configuration for `primary_url` (a `postgres://` URL) with no replicas, schema
    /// `geostate`, [`Layout::default`] and conservative pool and retry settings.
    pub fn new(primary_url: impl Into<String>) -> Self {
        Self {
            primary_url: primary_url.into(),
            replica_urls: Vec::new(),
            read_policy: ReadPolicy::default(),
            max_replica_lag: Duration::from_secs(1),
            lag_check_interval: Duration::from_millis(200),
            lag_check_timeout: Duration::from_secs(1),
            schema: "geostate".to_string(),
            layout: Layout::default(),
            primary_pool_max: 16,
            replica_pool_max: 8,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: Some(Duration::from_secs(30)),
            synchronous_commit: true,
            ping_if_idle_for: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            write_cache_entries: 10_000,
            write_cache_bytes: 64 << 20,
            rng_seed: None,
            create_schema: true,
            run_migrations: true,
            application_name: "geostate".to_string(),
            ssl_mode: None,
            ssl_root_cert: None,
            ssl_client_cert: None,
        }
    }

    /// Checks the settings that can be checked without a server.
    pub fn validate(&self) -> Result<(), BackendError> {
        check_schema_name(&self.schema)?;
        let invalid = |what: &str| Err(BackendError::InvalidArgument(what.to_string()));
        if self.primary_pool_max == 0 {
            return invalid("primary_pool_max must be positive");
        }
        if !self.replica_urls.is_empty() && self.replica_pool_max == 0 {
            return invalid("replica_pool_max must be positive");
        }
        if self.retry.attempts_max == 0 {
            return invalid("retry.attempts_max must be at least 1");
        }
        if self.lag_check_interval.is_zero() || self.lag_check_timeout.is_zero() {
            return invalid("lag_check_interval and lag_check_timeout must be positive");
        }
        if self.acquire_timeout.is_zero() {
            return invalid("acquire_timeout must be positive");
        }
        if self.application_name.len() > 63
            || self
                .application_name
                .chars()
                .any(|c| !c.is_ascii_graphic() && c != ' ')
        {
            return invalid("application_name must be at most 63 printable ASCII bytes");
        }
        if self.ssl_root_cert.is_some() && self.ssl_mode.is_some_and(|m| !m.verifies()) {
            return invalid(
                "ssl_root_cert is only used by ssl_mode verify-ca or verify-full; with \
                 another mode the server's certificate would not be checked",
            );
        }
        Ok(())
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("primary_url", &redact_url(&self.primary_url))
            .field(
                "replica_urls",
                &self
                    .replica_urls
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("read_policy", &self.read_policy)
            .field("max_replica_lag", &self.max_replica_lag)
            .field("lag_check_interval", &self.lag_check_interval)
            .field("lag_check_timeout", &self.lag_check_timeout)
            .field("schema", &self.schema)
            .field("layout", &self.layout)
            .field("primary_pool_max", &self.primary_pool_max)
            .field("replica_pool_max", &self.replica_pool_max)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("synchronous_commit", &self.synchronous_commit)
            .field("ping_if_idle_for", &self.ping_if_idle_for)
            .field("retry", &self.retry)
            .field("write_cache_entries", &self.write_cache_entries)
            .field("write_cache_bytes", &self.write_cache_bytes)
            .field("rng_seed", &self.rng_seed)
            .field("create_schema", &self.create_schema)
            .field("run_migrations", &self.run_migrations)
            .field("application_name", &self.application_name)
            .field("ssl_mode", &self.ssl_mode)
            .field("ssl_root_cert", &self.ssl_root_cert)
            .field(
                "ssl_client_cert",
                &self.ssl_client_cert.as_ref().map(|(cert, _key)| cert),
            )
            .finish()
    }
}

/// Checks a schema name: what [`PostgresConfig::schema`] accepts.
pub(crate) fn check_schema_name(schema: &str) -> Result<(), BackendError> {
    let mut chars = schema.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && schema.len() <= 63 && !schema.starts_with("pg_") {
        Ok(())
    } else {
        Err(BackendError::InvalidArgument(format!(
            "invalid schema name {schema:?}: use 1 to 63 lowercase ASCII letters, digits and \
             '_', starting with a letter or '_', not starting with 'pg_'"
        )))
    }
}

/// `url` with its password (in the userinfo or a `password=` parameter) replaced by `***`,
/// for logs and status reports.
///
/// ```
/// use geostate_backends::postgres::redact_url;
/// assert_eq!(redact_url("postgres://app:s3cret@db:5432/x"), "postgres://app:***@db:5432/x");
/// assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
/// assert_eq!(redact_url("postgres://db/x?password=s3cret"), "postgres://db/x?password=***");
/// ```
pub fn redact_url(url: &str) -> String {
    crate::secure::redact_url(url)
}
