//! How to reach a Redis region store and how hard to try.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::secure::redact_url;
use crate::{BackendError, Layout};

/// Longest key prefix (namespace) accepted, in bytes.
pub const KEY_PREFIX_BYTES_MAX: usize = 64;

/// Which Redis deployment the store talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisMode {
    /// One server (a primary, possibly with replicas that this client never uses). `urls`
    /// holds exactly one URL.
    Standalone,
    /// Redis Cluster: `urls` are seed nodes; the client learns the topology from them and
    /// follows `MOVED`/`ASK` redirections and resharding.
    Cluster,
    /// A primary watched by Redis Sentinel: `urls` are the sentinels, `service_name` the
    /// monitored master's name. After a connection error or a `READONLY` reply the client asks
    /// the sentinels for the current master again and reconnects.
    Sentinel {
        /// The master name the sentinels monitor (`sentinel monitor <name> ...`).
        service_name: String,
    },
}

/// Retries of operations that are safe to repeat (reads, remote merges, deletes, cursor
/// advances) after a transport error, and of any operation the server refused before running
/// it (`READONLY`, `CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`, `LOADING`, a refused connection).
/// Delays grow exponentially from `backoff_min` to `backoff_max`, each drawn uniformly below
/// its bound ("full jitter").
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Attempts in all, the first included (1 = never retry).
    pub attempts_max: u32,
    /// Bound of the first delay.
    pub backoff_min: Duration,
    /// Largest bound a delay may have.
    pub backoff_max: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts_max: 5,
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(1_000),
        }
    }
}

/// Optimistic-concurrency retries of local writes and merges: a write computed from a
/// snapshot that another writer changed before it committed is computed again from the new
/// state. Delays grow exponentially with full jitter, like [`RetryConfig`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ContentionConfig {
    /// Attempts per write, the first included. A write that loses this many races fails with
    /// [`BackendError::Contention`] (nothing was written). An attempt from a stale write
    /// cache entry does not count.
    pub attempts_max: u32,
    /// Bound of the first delay after a lost race (the first retry waits up to this).
    pub backoff_min: Duration,
    /// Largest bound a delay may have.
    pub backoff_max: Duration,
    /// Serialise writes to one key within this process (an async lock per key) before they go
    /// to Redis, so that only writers in *other* processes can race. Correctness never depends
    /// on it; it saves wasted round trips under contention.
    pub local_key_locks: bool,
}

impl Default for ContentionConfig {
    fn default() -> Self {
        Self {
            attempts_max: 200,
            backoff_min: Duration::from_micros(200),
            backoff_max: Duration::from_millis(20),
            local_key_locks: true,
        }
    }
}

/// The write cache: what this process last committed to each recently written key (its
/// decoded value, meta and envelope checksum), so that the next local write or merge to that
/// key commits in one round trip without reading it first. The commit still checks that the
/// key holds exactly what the cache says: an entry made stale by another process costs one
/// lost race and a read, never a wrong result. Reads never use it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteCacheConfig {
    /// Most keys cached (0 disables the cache: every write reads first).
    pub entries_max: usize,
    /// Most bytes of cached values (counted as their envelopes' length); a value larger than
    /// this is never cached.
    pub bytes_max: usize,
}

impl Default for WriteCacheConfig {
    fn default() -> Self {
        Self {
            entries_max: 16_384,
            bytes_max: 64 << 20,
        }
    }
}

impl WriteCacheConfig {
    /// No cache: every write reads its key first.
    pub fn disabled() -> Self {
        Self {
            entries_max: 0,
            bytes_max: 0,
        }
    }
}

/// The circuit breaker: after `failures_to_open` consecutive transport failures it opens and
/// every operation fails at once with [`BackendError::Unavailable`] for `open_for`; then one
/// probe operation is let through (half-open): its success closes the breaker, its failure
/// opens it again.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker (0 disables the breaker).
    pub failures_to_open: u32,
    /// How long the breaker stays open before it lets a probe through.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures_to_open: 5,
            open_for: Duration::from_secs(2),
        }
    }
}

/// What a write waits for before it is acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Acknowledged once the primary has applied it (in memory, and in its AOF according to
    /// the server's `appendfsync`). Redis replicates asynchronously: a failover may lose
    /// writes acknowledged just before it.
    #[default]
    Primary,
    /// After each write, `WAIT replicas timeout`: the write is acknowledged only when at least
    /// `replicas` replicas have received it. If fewer confirm within `timeout`, the caller gets
    /// [`BackendError::Unavailable`] although the primary did apply the write (it may survive
    /// or be lost). This narrows the window in which a failover loses acknowledged writes; it
    /// is not consensus: a replica that received a write can still lose an election to one
    /// that did not, and nothing is fsynced by `WAIT`.
    Wait {
        /// Replicas that must confirm each write.
        replicas: u32,
        /// How long to wait for them.
        timeout: Duration,
    },
}

/// TLS for `rediss://` URLs: whom to trust and, for mutual TLS, who we are.
///
/// TLS is switched on by the URL scheme: `rediss://` (TLS) or `redis://` (plaintext). Every
/// URL of a config must use the same scheme, and setting any file here with `redis://` URLs
/// is refused by [`RedisConfig::validate`]: a config that asks for TLS never connects
/// unencrypted. A TLS connection always verifies that the server's certificate chains to a
/// trusted CA and names the host of the URL (so connect by the name or IP address the
/// certificate holds); there is no way to switch the verification off (`#insecure` URLs are
/// refused). In Sentinel mode, `rediss://` sentinel URLs make both the sentinel connections
/// and the connections to the master they name use TLS, with the same files.
///
/// The files are read when the store connects; their contents are never logged, and `Debug`
/// shows only the paths.
///
/// ```
/// use geostate_backends::redis::{RedisConfig, RedisTls};
///
/// let config = RedisConfig::standalone("rediss://cache.internal:6380/")
///     .with_tls(RedisTls::trusting("/etc/geostate/redis-ca.pem")
///         .with_client_cert("/etc/geostate/client.pem", "/etc/geostate/client.key"));
/// assert!(config.validate().is_ok());
/// // CA files with a plaintext URL: refused rather than silently ignored.
/// let plain = RedisConfig::standalone("redis://cache.internal:6379/")
///     .with_tls(RedisTls::trusting("/etc/geostate/redis-ca.pem"));
/// assert!(plain.validate().is_err());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisTls {
    /// PEM file of the CA certificate(s) to trust *instead of* the system trust store.
    /// `None`: the system's trust store (e.g. `/etc/ssl/certs`).
    pub ca_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate chain presented to servers that require client
    /// certificates (`tls-auth-clients yes`); set with `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub client_key_file: Option<PathBuf>,
}

impl RedisTls {
    /// Trust only the CA certificate(s) in the PEM file `ca_cert_file`.
    pub fn trusting(ca_cert_file: impl Into<PathBuf>) -> Self {
        Self {
            ca_cert_file: Some(ca_cert_file.into()),
            ..Self::default()
        }
    }

    /// These settings, presenting the client certificate `cert_file` with key `key_file`.
    pub fn with_client_cert(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.client_cert_file = Some(cert_file.into());
        self.client_key_file = Some(key_file.into());
        self
    }

    /// Whether any file is set.
    pub fn is_set(&self) -> bool {
        self.ca_cert_file.is_some()
            || self.client_cert_file.is_some()
            || self.client_key_file.is_some()
    }
}

/// Whether `url` asks for TLS (`rediss://`, or `valkeys://`, which redis-rs also accepts).
pub(crate) fn is_tls_url(url: &str) -> bool {
    let scheme = url.split("://").next().unwrap_or_default();
    scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys")
}

/// Everything the Redis store needs: where the servers are, the namespace, the layout, and
/// the retry, contention, breaker and durability policies.
///
/// ```
/// use geostate_backends::redis::{Durability, RedisConfig};
/// use std::time::Duration;
///
/// let mut config = RedisConfig::standalone("redis://127.0.0.1:6379/").with_key_prefix("app1:");
/// config.durability = Durability::Wait { replicas: 1, timeout: Duration::from_millis(200) };
/// assert!(config.validate().is_ok());
/// assert!(RedisConfig::standalone("redis://x/").with_key_prefix("a{b").validate().is_err());
/// ```
///
/// Its `Debug` output hides the passwords in the URLs.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The deployment kind.
    pub mode: RedisMode,
    /// Server URLs (`redis://[user:password@]host:port[/db]`, or `rediss://...` for TLS):
    /// the server, cluster seed nodes or sentinels, depending on `mode`. All of one scheme.
    pub urls: Vec<String>,
    /// CA and client certificate files for `rediss://` URLs (see [`RedisTls`]).
    pub tls: RedisTls,
    /// Namespace of every Redis key this store uses (default `gs:`). Stores with different
    /// prefixes share a server without seeing each other. 1 to [`KEY_PREFIX_BYTES_MAX`] bytes,
    /// without `{`, `}` (they would break the hash tags) or control characters.
    pub key_prefix: String,
    /// Partitions and limits; every region of a deployment must use the same.
    pub layout: Layout,
    /// Retries after transport errors.
    pub retry: RetryConfig,
    /// Retries after lost optimistic-concurrency races.
    pub contention: ContentionConfig,
    /// The write cache (what this process last committed per key; see [`WriteCacheConfig`]).
    pub write_cache: WriteCacheConfig,
    /// The circuit breaker.
    pub breaker: BreakerConfig,
    /// What an acknowledged write has reached.
    pub durability: Durability,
    /// Longest wait to open a connection.
    pub connect_timeout: Duration,
    /// Longest wait for a reply (then the operation fails as a transport error).
    pub response_timeout: Duration,
}

impl RedisConfig {
    fn with_mode(mode: RedisMode, urls: Vec<String>) -> Self {
        Self {
            mode,
            urls,
            tls: RedisTls::default(),
            key_prefix: "gs:".to_string(),
            layout: Layout::default(),
            retry: RetryConfig::default(),
            contention: ContentionConfig::default(),
            write_cache: WriteCacheConfig::default(),
            breaker: BreakerConfig::default(),
            durability: Durability::default(),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
        }
    }

    /// One server at `url`.
    pub fn standalone(url: impl Into<String>) -> Self {
        Self::with_mode(RedisMode::Standalone, vec![url.into()])
    }

    /// A Redis Cluster reached through `seeds`.
    pub fn cluster<S: Into<String>>(seeds: impl IntoIterator<Item = S>) -> Self {
        Self::with_mode(
            RedisMode::Cluster,
            seeds.into_iter().map(Into::into).collect(),
        )
    }

    /// The master `service_name` watched by `sentinels`.
    pub fn sentinel<S: Into<String>>(
        sentinels: impl IntoIterator<Item = S>,
        service_name: impl Into<String>,
    ) -> Self {
        Self::with_mode(
            RedisMode::Sentinel {
                service_name: service_name.into(),
            },
            sentinels.into_iter().map(Into::into).collect(),
        )
    }

    /// This config with another key prefix.
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// This config with another layout.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// This config with TLS files (the URLs must be `rediss://`).
    pub fn with_tls(mut self, tls: RedisTls) -> Self {
        self.tls = tls;
        self
    }

    /// Whether the store connects with TLS (its URLs are `rediss://`).
    pub fn uses_tls(&self) -> bool {
        self.urls.first().is_some_and(|u| is_tls_url(u))
    }

    /// Checks the configuration without connecting.
    pub fn validate(&self) -> Result<(), BackendError> {
        let invalid = |what: String| Err(BackendError::InvalidArgument(what));
        let prefix = &self.key_prefix;
        if prefix.is_empty() || prefix.len() > KEY_PREFIX_BYTES_MAX {
            return invalid(format!(
                "key prefix must be 1 to {KEY_PREFIX_BYTES_MAX} bytes, got {}",
                prefix.len()
            ));
        }
        if prefix.contains(['{', '}']) || prefix.chars().any(char::is_control) {
            return invalid(format!(
                "key prefix {prefix:?} must not contain '{{', '}}' or control characters"
            ));
        }
        match (&self.mode, self.urls.len()) {
            (_, 0) => return invalid("at least one URL is needed".into()),
            (RedisMode::Standalone, n) if n > 1 => {
                return invalid(format!("standalone mode takes one URL, got {n}"))
            }
            (RedisMode::Sentinel { service_name }, _) if service_name.is_empty() => {
                return invalid("the sentinel service name is empty".into())
            }
            _ => {}
        }
        let tls_urls = self.urls.iter().filter(|u| is_tls_url(u)).count();
        if tls_urls != 0 && tls_urls != self.urls.len() {
            return invalid("mixing rediss:// (TLS) and plaintext URLs".into());
        }
        if tls_urls == 0 && self.tls.is_set() {
            return invalid(
                "TLS certificate files are set but the URLs are not rediss://; the store does \
                 not connect unencrypted when TLS is configured"
                    .into(),
            );
        }
        if self.urls.iter().any(|u| u.contains('#')) {
            return invalid(
                "URL fragments (such as #insecure) are refused: certificate verification \
                 cannot be switched off"
                    .into(),
            );
        }
        if self.tls.client_cert_file.is_some() != self.tls.client_key_file.is_some() {
            return invalid("a client certificate needs its key and vice versa".into());
        }
        if self.retry.attempts_max == 0 || self.contention.attempts_max == 0 {
            return invalid("attempt limits must be at least 1".into());
        }
        if self.retry.backoff_min > self.retry.backoff_max
            || self.contention.backoff_min > self.contention.backoff_max
        {
            return invalid("backoff_min must not exceed backoff_max".into());
        }
        if self.connect_timeout.is_zero() || self.response_timeout.is_zero() {
            return invalid("timeouts must be positive".into());
        }
        if let Durability::Wait { replicas, timeout } = &self.durability {
            if *replicas == 0 || timeout.is_zero() {
                return invalid("WAIT durability needs at least one replica and a timeout".into());
            }
        }
        Ok(())
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("mode", &self.mode)
            .field(
                "urls",
                &self.urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>(),
            )
            .field("tls", &self.tls)
            .field("key_prefix", &self.key_prefix)
            .field("layout", &self.layout)
            .field("retry", &self.retry)
            .field("contention", &self.contention)
            .field("breaker", &self.breaker)
            .field("durability", &self.durability)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_passwords() {
        let config = RedisConfig::sentinel(["rediss://:s3cret@s1:26379", "rediss://s2:26379"], "m");
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("rediss://:***@s1:26379"), "{shown}");
    }

    #[test]
    fn tls_settings_never_downgrade() {
        let ca = RedisTls::trusting("/ca.pem");
        assert!(RedisConfig::standalone("rediss://h:1/").uses_tls());
        assert!(RedisConfig::standalone("rediss://h:1/")
            .with_tls(ca.clone())
            .validate()
            .is_ok());
        assert!(RedisConfig::standalone("redis://h:1/")
            .with_tls(ca.clone())
            .validate()
            .is_err());
        assert!(RedisConfig::cluster(["rediss://a:1", "redis://b:1"])
            .validate()
            .is_err());
        assert!(RedisConfig::standalone("rediss://h:1/#insecure")
            .validate()
            .is_err());
        let mut half = ca;
        half.client_cert_file = Some("/c.pem".into());
        assert!(RedisConfig::standalone("rediss://h:1/")
            .with_tls(half)
            .validate()
            .is_err());
    }
}
