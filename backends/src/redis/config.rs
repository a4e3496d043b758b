//! How to reach a Redis region store and how hard to try.

use std::time::Duration;

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
    /// [`BackendError::Unavailable`] (nothing was written).
    pub attempts_max: u32,
    /// Bound of the first delay after a lost race (the first retry waits up to this).
    pub backoff_min: Duration,
    /// Largest bound a delay may have.
    pub backoff_max: Duration,
    /// Serialise writes to one key within this process (a striped async lock) before they go
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
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The deployment kind.
    pub mode: RedisMode,
    /// Server URLs (`redis://[user:password@]host:port[/db]`): the server, cluster seed nodes
    /// or sentinels, depending on `mode`.
    pub urls: Vec<String>,
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
            key_prefix: "gs:".to_string(),
            layout: Layout::default(),
            retry: RetryConfig::default(),
            contention: ContentionConfig::default(),
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
