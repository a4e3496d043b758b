//! The PostgreSQL region store: a primary plus optional hot-standby read replicas.
//!
//! # Schema
//!
//! One store lives in one PostgreSQL schema ([`PostgresConfig::schema`]), created by the
//! embedded migrations (`backends/migrations/postgres/`, run with sqlx's migrator, which keeps
//! its `_sqlx_migrations` table in the same schema, so many stores can share a database):
//!
//! | table | holds |
//! |---|---|
//! | `gs_meta` | the partition and bucket counts the schema was created with (pinned) |
//! | `gs_partitions` | per partition: the version clock, the feed's `last_seq` and how far it is trimmed, the floor epoch (bumped by every purge and delete) |
//! | `gs_values` | key (`text COLLATE "C"`, primary key), partition, bucket, envelope (`bytea`), version, value hash, entry hash, whether it is a tombstone (partial index per partition) |
//! | `gs_dot_floors` | per `(partition, actor)`, the highest counter of the actor in any value removed from the partition |
//! | `gs_feed` | per partition, `(seq, key, delta envelope, origin actor, HLC)` of local writes |
//! | `gs_digests` | per `(partition, bucket)`, the XOR of the bucket's entry hashes |
//! | `gs_cursors` | replication cursors `(origin, partition) -> seq` |
//! | `gs_conflict_log`, `gs_conflicts` | the conflict feed and its counter |
//!
//! Keys compare bytewise (`COLLATE "C"`), which for UTF-8 is Rust's `str` order; a prefix
//! scan is the index range `key >= prefix AND key < successor(prefix)` (no `LIKE`, so `%`, `_`
//! and `\` in a prefix are ordinary characters).
//!
//! # The write path
//!
//! Every write ends in one statement (`write_cas`, `write_new` or `write_existing` in
//! `sql.rs`) that bumps the partition's row in `gs_partitions` (next version, next feed
//! sequence number, new trim point), inserts or updates the value (with its tombstone flag),
//! appends the feed entry (local writes only), deletes the entries beyond `feed_entries_max`,
//! and XORs the key's old and new entry hashes into its digest bucket. What differs is how the
//! state the write is computed from is obtained and kept current until that statement runs.
//!
//! ## Optimistic: one statement
//!
//! [`apply`](StateBackend::apply) first tries, at most
//! [`RetryPolicy::optimistic_attempts_max`] times:
//!
//! 1. the starting state: the **write cache**'s entry for the key (what this process last read
//!    or wrote for it: its version, decoded value, entry hash, envelope hash, and the
//!    writer's dot floor entry with the partition's floor epoch it was read at; see
//!    [`crate::cache`]) if there is one for this writer, else one plain `SELECT` (no
//!    transaction, no lock) of the key's row, the writer's dot floor entry and the
//!    partition's floor epoch, in one snapshot (undecodable bytes: [`BackendError::Corrupt`],
//!    nothing written);
//! 2. in Rust: check the compare-and-set condition, compute the delta with [`local_delta`]
//!    and that floor, join it, check the size limit, hash the result;
//! 3. the write statement, on its own (autocommit), conditional: for an existing key
//!    (`write_cas`) it first locks the key's row **if it still holds the version and the
//!    envelope (by SHA-256) that the write was computed from**, then updates the partition row
//!    **if its floor epoch is still the one read with the floor**; for an absent key
//!    (`write_new`) the partition row is updated under the same epoch condition and the value
//!    inserted (a writer that created the key meanwhile makes the insert fail on the primary
//!    key). Under `READ COMMITTED` both conditions are re-checked on the newest row versions
//!    after waiting for the row locks, so a concurrent writer (this process or another, the
//!    same actor or not), a delete, a purge, or a purge or delete of any key of the partition
//!    (which raises the dot floor and bumps the epoch in one transaction) since the read
//!    leaves the statement writing **nothing**;
//! 4. it wrote: acknowledge and cache the new version and value. It wrote nothing (a *race*,
//!    counted in [`PostgresStats::races`]): drop the cache entry and try again at once from a
//!    fresh read.
//!
//! A cache hit is one round trip; a miss two (read, write). Only a write is ever made of a
//! cached entry: a no-op, an error or a failed compare-and-set computed from it is confirmed
//! on a fresh read before it is answered, so a stale entry costs one wasted statement, never a
//! wrong result. The cache is bounded ([`PostgresConfig::write_cache_entries`],
//! [`PostgresConfig::write_cache_bytes`], least recently used forgotten first) and the entry
//! of a key is dropped on every race, failure, delete and purge through this store. Writes to
//! one key from tasks of this process are serialised by a striped in-process lock, so they do
//! not race one another; writers in other processes are kept correct by the conditions alone.
//!
//! Why this keeps the store's promises: the key's row lock, then the partition row lock, are
//! held from the check to the commit, as in the locking transaction below; versions never
//! repeat in a partition, so an unchanged version and envelope hash mean the state the delta
//! was computed from is the current one and no dot of it can have been minted by another
//! writer (even one sharing the actor); an unchanged floor epoch means the floor used is the
//! current floor. Feed entries are still numbered under the partition row lock, in commit
//! order.
//!
//! ## Locking: the fallback transaction
//!
//! After the optimistic attempts (two by default) have lost their races, and always when
//! `optimistic_attempts_max` is 0, a write runs in one `READ COMMITTED` transaction, which
//! cannot lose a race:
//!
//! 1. `SELECT ... FROM gs_values WHERE key = $1 FOR UPDATE`: locks the key's row, so
//!    concurrent writers of one key queue here (the writer's dot floor entry and the floor
//!    epoch are read by the same statement); when there is no row (the key is absent), one
//!    more statement reads the partition's floor epoch and the writer's dot floor, in one
//!    snapshot;
//! 2. as step 2 above, from the locked state;
//! 3. the write statement (`write_existing`, or `write_new` with the epoch condition);
//! 4. `COMMIT`, then acknowledge (and cache what was written).
//!
//! A key that does not exist yet has no row to lock: two writers creating it race on the
//! primary key, and the loser's transaction is retried (it then finds and locks the row).
//! Nor does that lock keep a purge away: between step 1 and step 3 another writer could
//! create the key and a collector purge it, raising the floor above the one the delta was
//! computed from. So a write to an absent key updates the partition row in step 3 only if its
//! floor epoch is still the one read in step 1; every purge and delete bumps the epoch in the
//! transaction that raises the floor, so a removal that committed in between leaves nothing
//! written and the attempt is retried. (Any removal in the partition does; a harmless extra
//! attempt. The locking transaction's writes to existing keys pass no epoch: they hold the
//! key's row, which a removal of the key must lock first, and a removal of another key cannot
//! put a dot of this key under the floor.)
//!
//! Locks are taken in the order key rows, partition rows, dot floor rows, digest rows: a
//! write takes one of each (no floor row); a purge locks its key row, then bumps the
//! partition's epoch and raises the floor, then deletes the row and its digest contribution;
//! a physical delete of many keys locks their rows in key order, decodes them, then locks
//! their partitions' rows in partition order, raises the floors and deletes. Writes and
//! removals therefore never deadlock one another. The partition row is held from the write
//! statement to the commit, so feed sequence numbers are handed out in commit order: a reader
//! that has seen entry `n` has seen every entry before it.
//!
//! [`tombstones`](StateBackend::tombstones) reads the partial index on tombstones in key order
//! (on the primary, like everything replication decides on). Values written before migration
//! 2 read as no tombstone until they are written again (kept, never listed: safe).
//!
//! ## HOT updates
//!
//! No index of `gs_values` holds a column that an ordinary write changes (since migration 3:
//! the secondary indexes hold only `partition`, `bucket`, `key` and the tombstone predicate),
//! and the table keeps a fifth of each page free (`fillfactor = 80`), so a write's value
//! update is a HOT (heap-only tuple) update: no index entry is written. Only a write that
//! makes a value a tombstone or revives one updates the indexes. `gs_partitions` and
//! `gs_digests` (`fillfactor = 50`, no indexed column changes) are HOT-updated too; the feed
//! entry is the one index insertion a write makes. The price: `bucket_entries` and
//! `tombstones` read the listed rows' hashes and versions from the heap, not the index
//! alone; both serve anti-entropy and garbage collection, not the write path.
//!
//! [`merge`](StateBackend::merge) takes the same paths without a feed entry, dot floor or
//! epoch condition.
//!
//! Batch forms: [`apply_many`](StateBackend::apply_many) and
//! [`merge_many`](StateBackend::merge_many) split the batch into waves of contiguous items on
//! distinct keys (at most [`PREFETCH_MAX`] items, and never more than `feed_entries_max`).
//! A wave first reads the keys it has no cache entry for in one statement (for local writes,
//! with the first item's writer's floor), then writes every item whose key is cached (and
//! whose write is a write, not a no-op or an error) with **one statement** (`write_many`):
//! it locks the items' key rows in key order where they still hold the version and envelope
//! their writes were computed from, then their partitions' rows in partition order, keeps the
//! items whose partition's floor epoch is still the one their floor was read at, and writes
//! those: the partitions' next versions and feed sequence numbers in item order, the values,
//! the feed entries, the trims and every bucket's fingerprint once. The wave's other items
//! (absent keys, writers without a cached floor, no-ops, errors, and the items the statement
//! left out because they lost a race) then run one by one as above, in item order, on the
//! same connection. Each item has its own outcome; items on one key commit in batch order,
//! while items on different keys may commit in another order than listed (those run one by
//! one commit after the wave's statement). A connection lost while the wave's statement is
//! in flight leaves its local writes in doubt: each is reported as such, none is repeated.
//! [`get_many`](StateBackend::get_many) is one statement;
//! [`delete_many`](StateBackend::delete_many) one transaction per [`DELETE_BATCH_MAX`] keys.
//!
//! # Failures
//!
//! Serialization failures and deadlocks (SQLSTATE 40001, 40P01), a lost race to create a
//! key, and connection failures before anything could have committed are retried with
//! jittered exponential backoff, at most [`RetryPolicy::attempts_max`] times (lost optimistic
//! races are not counted there: they are retried at once, and at most
//! [`RetryPolicy::optimistic_attempts_max`] attempts can lose one). Everything else
//! that goes wrong with the server is [`BackendError::Unavailable`]. When a connection fails
//! while a local write could be committing, the write **may or may not have taken effect**
//! (the message says so) and it is not retried: callers retry local writes only if the
//! operation is safe to repeat, and rely on the change feed to find out. For the locking
//! transaction that window is its `COMMIT`; for an optimistic write it is the round trip of
//! its one statement (which commits by itself), so a connection that breaks while that
//! statement is in flight is reported this way where the locking transaction would have
//! retried. (Resending the statement could not apply the write twice, the version condition
//! makes a second copy write nothing, but that "nothing" could not be told apart from a race
//! lost to another writer, so the store reports the doubt instead of guessing.) Merges are
//! idempotent and are retried after such failures. The same doubt holds for an operation
//! whose future is dropped before it completes (a caller's timeout): a write may have
//! committed or not.
//!
//! # Replicas
//!
//! Value reads ([`get`](StateBackend::get), [`get_many`](StateBackend::get_many),
//! [`scan`](StateBackend::scan)) go to a replica chosen by [`ReadPolicy`] among those whose
//! staleness is within [`PostgresConfig::max_replica_lag`] (see [`ReplicaStatus`] and the lag
//! monitor's definition of staleness), and to the primary when none is. **A replica read may
//! miss writes acknowledged up to `max_replica_lag` earlier**, including the caller's own.
//! Everything else always goes to the primary: writes (and the state a compare-and-set checks,
//! which is read inside the write's transaction), change feeds, digests, bucket entries,
//! cursors and the conflict feed, since replication decisions need current data. A replica
//! read that fails marks the replica unhealthy and is served by the primary.
//!
//! ```no_run
//! use geostate_backends::postgres::{PostgresBackend, PostgresConfig};
//! use geostate_backends::{Expect, Key, LocalWrite, StateBackend};
//! use geostate_crdt::{ActorId, CounterOp, Hlc, Op};
//!
//! # async fn example() -> Result<(), geostate_backends::BackendError> {
//! let mut config = PostgresConfig::new("postgres://geostate@127.0.0.1:5432/geostate");
//! config.schema = "region_us_east".into();
//! let store = PostgresBackend::connect(config).await?;
//! let receipt = store
//!     .apply(LocalWrite {
//!         key: Key::new("visits")?,
//!         op: Op::from(CounterOp::inc(1)),
//!         actor: ActorId::new(7),
//!         hlc: Hlc::new(1_700_000_000_000, 0),
//!         expect: Expect::Any,
//!     })
//!     .await?;
//! assert_eq!(receipt.seq, Some(1));
//! # Ok(())
//! # }
//! ```

mod config;
mod replicas;
mod retry;
mod sql;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use geostate_crdt::{envelope, ActorId, Crdt, Hlc, TypeTag, VersionVector};
use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgSslMode, Postgres};
use sqlx::{Connection, Row, Transaction};

pub use config::{redact_url, PostgresConfig, ReadPolicy, RetryPolicy, SslMode};
pub use replicas::ReplicaStatus;

use crate::backend::{check_origin, local_delta, outcomes, page_limit, waves};
use crate::cache::{CacheStats, SnapshotCache};
use crate::digest::entry_hash;
use crate::{
    fnv1a64, BackendError, FeedEntry, FeedPage, Key, Layout, LocalWrite, PartitionDigest, Receipt,
    ScanItem, ScanPage, StateBackend, Stored, Tombstone, TombstonePage,
};
use replicas::Replicas;
use retry::{
    at_commit, autocommit_write, before_commit, outcome_unknown, unknown_outcome, Attempt,
    RetryKind, Rng,
};
use sql::{query, Sql};

/// The embedded migrations (`backends/migrations/postgres/`).
static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// Most keys one `delete_many` transaction deletes (larger batches take several).
pub const DELETE_BATCH_MAX: usize = 1_000;

/// Conflict records kept; older ones are dropped first.
pub const CONFLICTS_MAX: u64 = 100_000;

/// Stripes of the per-process write lock (writes to keys of one stripe queue in this process).
const KEY_LOCK_STRIPES: usize = 1_024;

/// Most keys one read of a batch's starting states asks for (larger batches take several).
pub const PREFETCH_MAX: usize = 1_000;

/// Counters of what the store did since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostgresStats {
    /// Write transactions committed (local writes, merges; not no-ops).
    pub commits: u64,
    /// Attempts retried after a serialization failure, a deadlock or a lost race to create a
    /// key.
    pub conflict_retries: u64,
    /// Optimistic writes whose compare-and-set changed nothing (another writer changed the
    /// key, or a purge or delete changed the partition's dot floor, since the state the write
    /// was computed from was read): retried from a fresh read or by the locking transaction.
    pub races: u64,
    /// Writes committed by one optimistic statement (included in `commits`).
    pub optimistic_commits: u64,
    /// Writes committed by the locking transaction (included in `commits`).
    pub locking_commits: u64,
    /// The write cache's counters and size (see [`crate::cache`]).
    pub write_cache: CacheStats,
    /// Attempts retried on another connection after a connection failure.
    pub connection_retries: u64,
    /// Value reads served by the primary.
    pub primary_reads: u64,
    /// Value reads served by a replica.
    pub replica_reads: u64,
    /// Value reads that failed on a replica and were served by the primary.
    pub replica_fallbacks: u64,
}

#[derive(Debug, Default)]
struct Stats {
    commits: AtomicU64,
    conflict_retries: AtomicU64,
    races: AtomicU64,
    optimistic_commits: AtomicU64,
    locking_commits: AtomicU64,
    connection_retries: AtomicU64,
    primary_reads: AtomicU64,
    replica_reads: AtomicU64,
    replica_fallbacks: AtomicU64,
}

/// The PostgreSQL region store. See the [module documentation](self) for the schema, the
/// write path and the replica routing.
///
/// Open it with [`PostgresBackend::connect`] inside a Tokio runtime (with replicas, it spawns
/// the lag monitor, stopped when the backend is dropped). Share it behind an `Arc`.
pub struct PostgresBackend {
    shared: Arc<Shared>,
    monitor: Option<tokio::task::JoinHandle<()>>,
}

struct Shared {
    layout: Layout,
    schema: String,
    sql: Sql,
    primary: PgPool,
    replicas: Replicas,
    retry: RetryPolicy,
    rng: Rng,
    stats: Stats,
    /// What this process last read or wrote per key (see the module docs).
    cache: SnapshotCache<Seen>,
    /// Serialises this process's writes to one key (striped), so that they do not race one
    /// another; writers in other processes are kept correct by the version condition alone.
    key_locks: Vec<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("schema", &self.shared.schema)
            .field("layout", &self.shared.layout)
            .field("replicas", &self.shared.replicas.status())
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresBackend {
    fn drop(&mut self) {
        if let Some(monitor) = self.monitor.take() {
            monitor.abort();
        }
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable(format!("{what}: {e}"))
}

fn connect_options(
    url: &str,
    config: &PostgresConfig,
    role: &str,
) -> Result<PgConnectOptions, BackendError> {
    let mut options = PgConnectOptions::from_str(url).map_err(|e| {
        BackendError::InvalidArgument(format!("invalid {role} URL {}: {e}", redact_url(url)))
    })?;
    options = options.application_name(&config.application_name);
    if let Some(mode) = config.ssl_mode {
        options = options.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyCa => PgSslMode::VerifyCa,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        });
    }
    if let Some(root) = &config.ssl_root_cert {
        options = options.ssl_root_cert(root);
    }
    if let Some((cert, key)) = &config.ssl_client_cert {
        options = options.ssl_client_cert(cert).ssl_client_key(key);
    }
    // sqlx trusts the root certificate only when verifying: a root certificate with a mode
    // that does not verify would look safer than it is.
    let verifies = matches!(
        options.get_ssl_mode(),
        PgSslMode::VerifyCa | PgSslMode::VerifyFull
    );
    let url_root_cert = url.split_once('?').is_some_and(|(_, query)| {
        query.split('&').any(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            matches!(name, "sslrootcert" | "ssl-root-cert" | "ssl-ca")
        })
    });
    if (config.ssl_root_cert.is_some() || url_root_cert) && !verifies {
        return Err(BackendError::InvalidArgument(format!(
            "{role} URL {}: a root certificate (sslrootcert) needs sslmode verify-ca or \
             verify-full; with another mode the server's certificate would not be checked",
            redact_url(url)
        )));
    }
    if let Some(timeout) = config.statement_timeout {
        options = options.options([("statement_timeout", timeout.as_millis().to_string())]);
    }
    if !config.synchronous_commit {
        options = options.options([("synchronous_commit", "off")]);
    }
    Ok(options)
}

/// A pool that pings a connection before handing it out only if it sat idle for longer than
/// `ping_if_idle_for` (sqlx also pings every connection when it is returned).
fn pool_options(max: u32, acquire_timeout: Duration, ping_if_idle_for: Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max)
        .min_connections(0)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            Box::pin(async move {
                if meta.idle_for > ping_if_idle_for {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

impl PostgresBackend {
    /// Connects to the primary (and lazily to the replicas), creates the schema and runs the
    /// migrations if so configured, pins or checks the layout, and, with replicas, measures
    /// them once and starts the lag monitor.
    ///
    /// Errors: [`BackendError::InvalidArgument`] for a bad configuration or a schema created
    /// with another partition or bucket count; [`BackendError::Unavailable`] when the primary
    /// cannot be reached or a migration fails.
    pub async fn connect(config: PostgresConfig) -> Result<Self, BackendError> {
        config.validate()?;
        let primary_options = connect_options(&config.primary_url, &config, "primary")?;
        prepare_schema(&primary_options, &config).await?;
        let primary = pool_options(
            config.primary_pool_max,
            config.acquire_timeout,
            config.ping_if_idle_for,
        )
        .connect_lazy_with(primary_options);
        let mut replicas = Vec::with_capacity(config.replica_urls.len());
        for url in &config.replica_urls {
            let options = connect_options(url, &config, "replica")?;
            let pool = pool_options(
                config.replica_pool_max,
                config.lag_check_timeout,
                config.ping_if_idle_for,
            )
            .connect_lazy_with(options);
            replicas.push((redact_url(url), pool));
        }
        let shared = Arc::new(Shared {
            layout: config.layout.clone(),
            sql: Sql::new(&config.schema),
            schema: config.schema.clone(),
            primary,
            replicas: Replicas::new(
                replicas,
                config.read_policy,
                config.max_replica_lag,
                config.lag_check_timeout,
            ),
            retry: config.retry.clone(),
            rng: Rng::new(config.rng_seed),
            stats: Stats::default(),
            cache: SnapshotCache::new(config.write_cache_entries, config.write_cache_bytes),
            key_locks: (0..KEY_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        });
        shared.pin_layout().await?;
        let monitor = if shared.replicas.is_empty() {
            None
        } else {
            shared.replicas.check(&shared.primary, true).await;
            let weak = Arc::downgrade(&shared);
            let interval = config.lag_check_interval;
            Some(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    let Some(shared) = weak.upgrade() else {
                        return;
                    };
                    shared.replicas.check(&shared.primary, false).await;
                }
            }))
        };
        Ok(Self { shared, monitor })
    }

    /// The schema holding this store.
    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    /// What the store knows about each replica, in configuration order.
    pub fn replica_status(&self) -> Vec<ReplicaStatus> {
        self.shared.replicas.status()
    }

    /// Measures the replicas now and returns when the measurements are recorded (the lag
    /// monitor does this every [`PostgresConfig::lag_check_interval`], without waiting for
    /// slow replicas). A replica whose previous measurement is still in flight is skipped.
    pub async fn check_replicas(&self) {
        self.shared.replicas.check(&self.shared.primary, true).await;
    }

    /// Counters of what the store did since it was opened.
    pub fn stats(&self) -> PostgresStats {
        let s = &self.shared.stats;
        PostgresStats {
            commits: s.commits.load(Relaxed),
            conflict_retries: s.conflict_retries.load(Relaxed),
            races: s.races.load(Relaxed),
            optimistic_commits: s.optimistic_commits.load(Relaxed),
            locking_commits: s.locking_commits.load(Relaxed),
            write_cache: self.shared.cache.stats(),
            connection_retries: s.connection_retries.load(Relaxed),
            primary_reads: s.primary_reads.load(Relaxed),
            replica_reads: s.replica_reads.load(Relaxed),
            replica_fallbacks: s.replica_fallbacks.load(Relaxed),
        }
    }

    /// Checks `partition`'s stored digest against the entry hashes of its values, in one
    /// snapshot, and returns the buckets whose fingerprints disagree (empty when all is
    /// well). They can only disagree if rows were changed behind the store's back.
    pub async fn verify_digest(&self, partition: u16) -> Result<Vec<u16>, BackendError> {
        self.shared.layout.check_partition(partition)?;
        let sh = &self.shared;
        let mut slot = Slot::new(&sh.primary);
        let mut tries = 0;
        loop {
            let r = sh.try_verify_digest(&mut slot, partition).await;
            if let Some(done) = sh.settle(r, &mut slot, &mut tries, "verify_digest").await {
                return done;
            }
        }
    }

    /// Closes the connection pools, waiting for connections in use to be returned.
    pub async fn close(&self) {
        if let Some(monitor) = &self.monitor {
            monitor.abort();
        }
        self.shared.primary.close().await;
        for pool in self.shared.replicas.pools() {
            pool.close().await;
        }
    }
}

/// Creates the schema and runs the migrations on a dedicated connection whose `search_path`
/// is the schema, so that the migrations' unqualified names land there.
async fn prepare_schema(
    options: &PgConnectOptions,
    config: &PostgresConfig,
) -> Result<(), BackendError> {
    if !config.create_schema && !config.run_migrations {
        return Ok(());
    }
    let schema = &config.schema;
    let connecting = PgConnection::connect_with(options);
    let mut conn = match tokio::time::timeout(config.acquire_timeout, connecting).await {
        Ok(connected) => connected.map_err(|e| {
            retry::tls_failure(&e).unwrap_or_else(|| unavailable("connecting to the primary", e))
        })?,
        Err(_) => {
            return Err(BackendError::Unavailable(format!(
                "connecting to the primary: no answer within {:?}",
                config.acquire_timeout
            )))
        }
    };
    if config.create_schema {
        let create = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(create))
            .execute(&mut conn)
            .await
        {
            // Two connectors creating the schema at once: one of them loses the race.
            let raced = matches!(&e, sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("23505" | "42P06")));
            if !raced {
                return Err(unavailable("creating the schema", e));
            }
        }
    }
    if config.run_migrations {
        let set_path = format!("SET search_path TO \"{schema}\"");
        sqlx::query(sqlx::AssertSqlSafe(set_path))
            .execute(&mut conn)
            .await
            .map_err(|e| unavailable("setting search_path", e))?;
        let mut migrator = Migrator::with_migrations(MIGRATOR.iter().cloned().collect());
        migrator.dangerous_set_table_name(format!("\"{schema}\"._sqlx_migrations"));
        migrator
            .run(&mut conn)
            .await
            .map_err(|e| unavailable("running the migrations", e))?;
    }
    // The work is done; a failure to say goodbye changes nothing.
    let _ = conn.close().await;
    Ok(())
}

/// A connection slot: acquires from the pool on first use and keeps the connection for the
/// rest of an operation (a batch uses one connection), unless it fails.
struct Slot<'p> {
    pool: &'p PgPool,
    conn: Option<PoolConnection<Postgres>>,
}

impl<'p> Slot<'p> {
    fn new(pool: &'p PgPool) -> Self {
        Self { pool, conn: None }
    }

    async fn get(&mut self) -> Result<&mut PgConnection, Attempt> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.pool.acquire().await.map_err(before_commit)?,
        };
        Ok(&mut **self.conn.insert(conn))
    }

    /// Returns the connection to the pool (the next use acquires one again).
    fn release(&mut self) {
        self.conn = None;
    }

    /// Drops the connection instead of returning it to the pool.
    fn discard(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.close_on_drop();
        }
    }
}

/// What a write transaction decided.
enum Step<T> {
    /// Something was written: commit.
    Commit(T),
    /// Nothing to write (a no-op): roll back.
    Rollback(T),
}

/// Ends a transaction as `outcome` says.
async fn finish<T>(
    tx: Transaction<'_, Postgres>,
    outcome: Result<Step<T>, Attempt>,
) -> Result<T, Attempt> {
    match outcome {
        Ok(Step::Commit(value)) => {
            tx.commit().await.map_err(at_commit)?;
            Ok(value)
        }
        Ok(Step::Rollback(value)) => {
            // Nothing was written, so the outcome is known whatever the rollback does; a
            // broken connection is dropped by the pool when it is returned.
            let _ = tx.rollback().await;
            Ok(value)
        }
        Err(Attempt::Retry {
            kind: RetryKind::Connection,
            error,
        }) => {
            // Dropping the transaction queues its rollback; the slot discards the connection.
            drop(tx);
            Err(Attempt::Retry {
                kind: RetryKind::Connection,
                error,
            })
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// A value ready to be stored.
struct Prepared {
    envelope: Vec<u8>,
    value_hash: u64,
    entry_hash: u64,
    /// Whether the value holds no live dot (listed by [`StateBackend::tombstones`]).
    tombstone: bool,
}

impl Prepared {
    /// What the write cache records of the new value: its envelope's length, its entry hash
    /// and its envelope's SHA-256.
    fn fingerprint(&self) -> (usize, u64, EnvelopeHash) {
        (
            self.envelope.len(),
            self.entry_hash,
            envelope_hash(&self.envelope),
        )
    }
}

/// The change-feed part of a local write.
struct FeedRow {
    delta: Vec<u8>,
    origin: ActorId,
    hlc: Hlc,
}

/// The locked row of a key.
struct Locked {
    envelope: Vec<u8>,
    version: u64,
    entry_hash: u64,
}

impl Locked {
    /// The row as the locking write saw it (the lock makes an envelope check needless).
    fn old(&self) -> Old {
        Old {
            version: self.version,
            entry_hash: self.entry_hash,
            envelope_hash: None,
        }
    }
}

/// A key's row as a write saw it: its version and digest contribution.
#[derive(Clone, Copy, Debug)]
struct Old {
    version: u64,
    entry_hash: u64,
    /// The SHA-256 of the envelope the write was computed from (optimistic writes only).
    envelope_hash: Option<EnvelopeHash>,
}

/// The SHA-256 of an envelope (what an optimistic write expects the stored bytes to hash to).
type EnvelopeHash = [u8; 32];

fn envelope_hash(bytes: &[u8]) -> EnvelopeHash {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// A partition's floor epoch and one actor's entry of its dot floor, read in one snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FloorSeen {
    epoch: i64,
    actor: ActorId,
    counter: u64,
}

/// What this process last read or wrote for a key: the write cache's snapshot of one version
/// of the key (the cache entry holds the version).
#[derive(Debug)]
struct Seen {
    /// The value, decoded.
    state: Crdt,
    /// Its digest contribution (what a write XORs out of the bucket).
    entry_hash: u64,
    /// The SHA-256 of its envelope as stored.
    envelope_hash: EnvelopeHash,
    /// The floor of the writer of the last local write, with the epoch it was read at; `None`
    /// when no local write read one (merges).
    floor: Option<FloorSeen>,
}

/// What an optimistic attempt starts from.
struct Base {
    /// The key's version and snapshot (`None`: absent).
    current: Option<(u64, Arc<Seen>)>,
    /// For a local write, the writer's dot floor and the partition's epoch.
    floor: Option<FloorSeen>,
    /// Whether it came from the write cache (then only a write may come of it).
    cached: bool,
}

impl Base {
    /// What an optimistic commit from this base expects the key to hold.
    fn old(&self) -> Option<Old> {
        self.current.as_ref().map(|(version, seen)| Old {
            version: *version,
            entry_hash: seen.entry_hash,
            envelope_hash: Some(seen.envelope_hash),
        })
    }
}

/// What a local write computed from a [`Base`] comes to.
enum Plan {
    /// A write to commit.
    Write {
        prepared: Prepared,
        merged: Crdt,
        delta: Crdt,
        feed: FeedRow,
    },
    /// Nothing to write (a no-op): this is the answer.
    Answer(Receipt),
}

/// The outcome of an optimistic attempt that did not fail.
enum Optimistic {
    /// Committed (or a no-op confirmed on a fresh read).
    Done(Receipt),
    /// The compare-and-set changed nothing: another writer or a removal came first.
    Raced,
}

/// An item of a batch.
enum Item<'a> {
    Apply(&'a LocalWrite),
    Merge(&'a Key, &'a Crdt),
}

impl Item<'_> {
    fn key(&self) -> &Key {
        match self {
            Item::Apply(w) => &w.key,
            Item::Merge(key, _) => key,
        }
    }
}

/// A batch item's write, computed from the write cache.
struct Planned {
    old: Old,
    prepared: Prepared,
    merged: Crdt,
    delta: Crdt,
    feed: Option<FeedRow>,
    floor: Option<FloorSeen>,
}

/// Why a batch's write statement wrote nothing, or may have written.
enum WaveError {
    /// Nothing was written (the server said so, or the statement was never sent).
    NotWritten(Attempt),
    /// The connection failed with the statement in flight: it may have committed.
    Unknown(BackendError),
}

/// The retry after a lost optimistic race on `key`.
fn raced(key: &Key) -> Attempt {
    Attempt::Retry {
        kind: RetryKind::Race,
        error: format!(
            "key {:?} or its partition's dot floor changed after it was read",
            key.as_str()
        ),
    }
}

/// The receipt of a write that changed nothing on a key at `version` (0: absent).
fn noop(partition: u16, version: u64) -> Receipt {
    Receipt {
        partition,
        version,
        seq: None,
        delta: Crdt::empty(TypeTag::GCounter),
    }
}

/// Decodes stored bytes; undecodable ones are [`BackendError::Corrupt`].
fn decode_value(key: &Key, bytes: &[u8]) -> Result<Crdt, BackendError> {
    envelope::decode(bytes, &envelope::Limits::default()).map_err(|source| BackendError::Corrupt {
        key: key.to_string(),
        source,
    })
}

fn stored_key(key: String) -> Result<Key, Attempt> {
    Key::new(key).map_err(|e| {
        Attempt::Fail(BackendError::Unavailable(format!(
            "the store holds an invalid key (changed behind the store's back?): {e}"
        )))
    })
}

/// A dot floor counter (`numeric`, read as text) read back.
fn floor_counter(text: &str) -> Result<u64, Attempt> {
    text.parse().map_err(|_| {
        Attempt::Fail(BackendError::Unavailable(format!(
            "the store holds an invalid dot floor counter {text:?} (changed behind the store's \
             back?)"
        )))
    })
}

/// Non-negative numbers the store wrote (versions, sequence numbers) read back.
fn unsigned(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn signed(n: u64, what: &str) -> Result<i64, BackendError> {
    i64::try_from(n)
        .map_err(|_| BackendError::InvalidArgument(format!("{what} {n} is above 2^63 - 1")))
}

/// The least string greater than every string starting with `prefix`, if there is one:
/// `prefix` with its last incrementable character incremented and what follows dropped. In
/// UTF-8 byte order (PostgreSQL's `COLLATE "C"`, Rust's `str`), the strings starting with
/// `prefix` are exactly those in `[prefix, successor)`.
fn prefix_successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last {
            '\u{d7ff}' => Some('\u{e000}'),
            c => char::from_u32(u32::from(c) + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// A raw value row: key, envelope, version.
type RawRow = (String, Vec<u8>, i64);

/// Decodes `(key, envelope, version)` rows, as the value queries return them.
fn raw_rows(rows: &[sqlx::postgres::PgRow]) -> Result<Vec<RawRow>, Attempt> {
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get(0).map_err(before_commit)?,
                row.try_get(1).map_err(before_commit)?,
                row.try_get(2).map_err(before_commit)?,
            ))
        })
        .collect()
}

impl Shared {
    /// Settles one attempt: `Some` to return, `None` to try again (after a backoff).
    async fn settle<T>(
        &self,
        result: Result<T, Attempt>,
        slot: &mut Slot<'_>,
        tries: &mut u32,
        what: &str,
    ) -> Option<Result<T, BackendError>> {
        let (kind, error) = match result {
            Ok(value) => return Some(Ok(value)),
            Err(Attempt::Fail(e)) => return Some(Err(e)),
            Err(Attempt::Retry { kind, error }) => (kind, error),
        };
        match kind {
            RetryKind::Conflict => self.stats.conflict_retries.fetch_add(1, Relaxed),
            RetryKind::Connection => {
                slot.discard();
                self.stats.connection_retries.fetch_add(1, Relaxed)
            }
            // Lost races are bounded by `optimistic_attempts_max` (the attempts after them
            // take the locking transaction), not counted here.
            RetryKind::Race => {
                self.stats.races.fetch_add(1, Relaxed);
                tracing::debug!(operation = what, %error, "PostgreSQL: lost a race; retrying");
                return None;
            }
        };
        *tries += 1;
        if *tries >= self.retry.attempts_max {
            tracing::warn!(operation = what, attempts = *tries, %error, "PostgreSQL: giving up");
            return Some(Err(BackendError::Unavailable(format!(
                "{what}: gave up after {tries} attempts; last error: {error}"
            ))));
        }
        tracing::debug!(operation = what, attempt = *tries, ?kind, %error, "PostgreSQL: retrying");
        tokio::time::sleep(self.rng.jitter(self.retry.backoff(*tries))).await;
        None
    }

    async fn pin_layout(&self) -> Result<(), BackendError> {
        let failed = |e| unavailable("pinning the layout", e);
        let partitions = i32::from(self.layout.partitions());
        let buckets = i32::from(self.layout.buckets());
        let mut conn = self.primary.acquire().await.map_err(failed)?;
        query(&self.sql.pin_layout)
            .bind(partitions)
            .bind(buckets)
            .execute(&mut *conn)
            .await
            .map_err(failed)?;
        let row = query(&self.sql.read_layout)
            .fetch_one(&mut *conn)
            .await
            .map_err(failed)?;
        let (p, b): (i32, i32) = (
            row.try_get(0).map_err(failed)?,
            row.try_get(1).map_err(failed)?,
        );
        if (p, b) != (partitions, buckets) {
            return Err(BackendError::InvalidArgument(format!(
                "schema {} was created with {p} partitions of {b} buckets; the layout asks for \
                 {partitions} of {buckets}",
                self.schema
            )));
        }
        query(&self.sql.init_partitions)
            .bind(partitions)
            .execute(&mut *conn)
            .await
            .map_err(failed)?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Writes
    // -----------------------------------------------------------------------------------------

    async fn lock_row(&self, tx: &mut PgConnection, key: &Key) -> Result<Option<Locked>, Attempt> {
        let row = query(&self.sql.lock_value)
            .bind(key.as_str())
            .fetch_optional(tx)
            .await
            .map_err(before_commit)?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(Locked {
            envelope: row.try_get(0).map_err(before_commit)?,
            version: unsigned(row.try_get(1).map_err(before_commit)?),
            entry_hash: row.try_get::<i64, _>(2).map_err(before_commit)? as u64,
        }))
    }

    /// [`Self::lock_row`] for a local write by `actor`: also the writer's dot floor entry and
    /// the partition's floor epoch (for the write cache), read by the same statement.
    async fn lock_row_for_write(
        &self,
        tx: &mut PgConnection,
        key: &Key,
        actor: ActorId,
    ) -> Result<(Option<Locked>, u64, Option<i64>), Attempt> {
        let row = query(&self.sql.lock_value_for_write)
            .bind(key.as_str())
            .bind(i32::from(self.layout.partition_of(key)))
            .bind(actor.get() as i64)
            .fetch_optional(tx)
            .await
            .map_err(before_commit)?;
        let Some(row) = row else {
            return Ok((None, 0, None));
        };
        let counter: Option<String> = row.try_get(3).map_err(before_commit)?;
        let floor = match counter {
            Some(c) => floor_counter(&c)?,
            None => 0,
        };
        let epoch: Option<i64> = row.try_get(4).map_err(before_commit)?;
        Ok((
            Some(Locked {
                envelope: row.try_get(0).map_err(before_commit)?,
                version: unsigned(row.try_get(1).map_err(before_commit)?),
                entry_hash: row.try_get::<i64, _>(2).map_err(before_commit)? as u64,
            }),
            floor,
            epoch,
        ))
    }

    /// Joins `delta` into `state` (the current value or the empty one) and prepares the result,
    /// enforcing the size limit on the delta and, exactly, on the join. Returns the joined
    /// value too (for the write cache).
    fn prepare(
        &self,
        key: &Key,
        state: &Crdt,
        delta: &Crdt,
    ) -> Result<(Prepared, Crdt), BackendError> {
        let limit = self.layout.value_bytes_max();
        let too_large = |size| BackendError::ValueTooLarge {
            key: key.to_string(),
            size,
            limit,
        };
        let delta_len = envelope::payload_len(delta)?;
        if delta_len > limit {
            return Err(too_large(delta_len));
        }
        let mut merged = state.clone();
        merged.merge(delta)?;
        let payload = envelope::canonical_payload(&merged)?;
        if payload.len() > limit {
            return Err(too_large(payload.len()));
        }
        let value_hash = fnv1a64(&payload);
        let prepared = Prepared {
            envelope: envelope::encode(&merged, &envelope::Options::default())?,
            value_hash,
            entry_hash: entry_hash(key, value_hash),
            tombstone: merged.is_bottom(),
        };
        Ok((prepared, merged))
    }

    /// The write statement (step 3 of the locking transaction, or the one statement of an
    /// optimistic write): returns `(version, last_seq)`, or `None` if its condition left
    /// everything unchanged.
    ///
    /// `old`: the key's row as the write saw it (`None`: absent, the value is inserted).
    /// `optimistic`: the statement runs on its own (autocommit) and updates an existing row
    /// only if it still holds `old`'s version (`write_cas`); otherwise the row is locked by
    /// the caller's transaction (`write_existing`). `floor_epoch`: the partition's floor
    /// epoch read with the writer's dot floor; the write then takes place only if no purge or
    /// delete in the partition has committed since.
    #[allow(clippy::too_many_arguments)]
    async fn store(
        &self,
        conn: &mut PgConnection,
        key: &Key,
        old: Option<Old>,
        optimistic: bool,
        value: Prepared,
        feed: Option<FeedRow>,
        floor_epoch: Option<i64>,
    ) -> Result<Option<(u64, u64)>, Attempt> {
        let statement = match (old, optimistic) {
            (None, _) => &self.sql.write_new,
            (Some(_), false) => &self.sql.write_existing,
            (Some(_), true) => &self.sql.write_cas,
        };
        // A local write's single statement may have committed when its connection fails; a
        // merge is idempotent, and a transaction's statement commits nothing by itself.
        let classify = if optimistic && feed.is_some() {
            autocommit_write
        } else {
            before_commit
        };
        let xor = old.map_or(0, |o| o.entry_hash) ^ value.entry_hash;
        let keep = i64::try_from(self.layout.feed_entries_max()).unwrap_or(i64::MAX);
        let (fed, delta, origin, hlc) = match feed {
            Some(f) => (1i64, Some(f.delta), f.origin.get(), f.hlc),
            None => (0i64, None, 0, Hlc::ZERO),
        };
        let mut q = query(statement)
            .bind(i32::from(self.layout.partition_of(key)))
            .bind(key.as_str())
            .bind(i32::from(self.layout.bucket_of(key)))
            .bind(value.envelope)
            .bind(value.value_hash as i64)
            .bind(value.entry_hash as i64)
            .bind(fed)
            .bind(keep)
            .bind(delta)
            .bind(origin as i64)
            .bind(hlc.physical_ms() as i64)
            .bind(i64::from(hlc.logical()))
            .bind(xor as i64)
            .bind(floor_epoch)
            .bind(value.tombstone);
        if let (Some(o), true) = (old, optimistic) {
            // Without a hash (never the case) the condition is NULL: nothing is written.
            q = q
                .bind(signed(o.version, "version")?)
                .bind(o.envelope_hash.map(|h| h.to_vec()));
        }
        let row = q.fetch_optional(conn).await.map_err(classify)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let version: i64 = row.try_get(0).map_err(before_commit)?;
        let last_seq: i64 = row.try_get(1).map_err(before_commit)?;
        Ok(Some((unsigned(version), unsigned(last_seq))))
    }

    /// [`Self::store`] in the locking transaction, where changing nothing means the
    /// partition's floor epoch moved (a retry) or its row is missing.
    #[allow(clippy::too_many_arguments)]
    async fn store_locked(
        &self,
        tx: &mut PgConnection,
        key: &Key,
        old: Option<Old>,
        value: Prepared,
        feed: Option<FeedRow>,
        floor_epoch: Option<i64>,
    ) -> Result<(u64, u64), Attempt> {
        match self
            .store(tx, key, old, false, value, feed, floor_epoch)
            .await?
        {
            Some(done) => Ok(done),
            // The partition row exists (the epoch was read from it): its epoch moved.
            None if floor_epoch.is_some() => Err(Attempt::Retry {
                kind: RetryKind::Conflict,
                error: "a purge or delete raised the partition's dot floor meanwhile".into(),
            }),
            None => Err(Attempt::Fail(BackendError::Unavailable(format!(
                "partition row missing in schema {}: was it initialised with this layout?",
                self.schema
            )))),
        }
    }

    /// Caches what a committed write left under `key`.
    fn remember(&self, key: &Key, version: u64, seen: Seen, envelope_len: usize) {
        self.cache.insert(
            key.as_str(),
            version,
            Arc::new(seen),
            envelope_len.saturating_mul(2),
        );
    }

    // --- The locking transaction -------------------------------------------------------------

    async fn try_apply(&self, slot: &mut Slot<'_>, w: &LocalWrite) -> Result<Receipt, Attempt> {
        let conn = slot.get().await?;
        let mut tx = conn.begin().await.map_err(before_commit)?;
        let outcome = self.apply_in(&mut tx, w).await;
        let (receipt, seen) = finish(tx, outcome).await?;
        if receipt.seq.is_some() {
            self.stats.commits.fetch_add(1, Relaxed);
            self.stats.locking_commits.fetch_add(1, Relaxed);
        }
        if let Some((version, seen, len)) = seen {
            self.remember(&w.key, version, seen, len);
        }
        Ok(receipt)
    }

    async fn apply_in(
        &self,
        tx: &mut PgConnection,
        w: &LocalWrite,
    ) -> Result<Step<(Receipt, Option<(u64, Seen, usize)>)>, Attempt> {
        let key = &w.key;
        let partition = self.layout.partition_of(key);
        let (locked, mut floor, mut epoch_read) = self.lock_row_for_write(tx, key, w.actor).await?;
        let current = match &locked {
            Some(row) => Some((decode_value(key, &row.envelope)?, row.version)),
            None => None,
        };
        w.expect.check(key, current.as_ref().map(|(_, v)| *v))?;
        let empty;
        let mut floor_epoch = None;
        let state = match (&current, w.op.type_tag()) {
            (Some((value, _)), _) => value,
            (None, Some(tag)) => {
                let (epoch, absent_floor) = self.absent_floor(tx, partition, w.actor).await?;
                floor_epoch = Some(epoch);
                epoch_read = Some(epoch);
                floor = absent_floor.get(w.actor);
                empty = Crdt::empty(tag);
                &empty
            }
            // A deletion of a key that holds nothing changes nothing.
            (None, None) => return Ok(Step::Rollback((noop(partition, 0), None))),
        };
        let delta = local_delta(state, w, floor).map_err(BackendError::from)?;
        if delta.context().is_empty() {
            let version = current.map_or(0, |(_, v)| v);
            return Ok(Step::Rollback((
                Receipt {
                    partition,
                    version,
                    seq: None,
                    delta,
                },
                None,
            )));
        }
        let (prepared, merged) = self.prepare(key, state, &delta)?;
        let feed = FeedRow {
            delta: envelope::encode(&delta, &envelope::Options::default())
                .map_err(BackendError::from)?,
            origin: w.actor,
            hlc: w.hlc,
        };
        let old = locked.as_ref().map(Locked::old);
        let (len, new_hash, new_sha) = prepared.fingerprint();
        let (version, seq) = self
            .store_locked(tx, key, old, prepared, Some(feed), floor_epoch)
            .await?;
        let seen = epoch_read.map(|epoch| {
            let seen = Seen {
                state: merged,
                entry_hash: new_hash,
                envelope_hash: new_sha,
                floor: Some(FloorSeen {
                    epoch,
                    actor: w.actor,
                    counter: floor,
                }),
            };
            (version, seen, len)
        });
        Ok(Step::Commit((
            Receipt {
                partition,
                version,
                seq: Some(seq),
                delta,
            },
            seen,
        )))
    }

    async fn try_merge(
        &self,
        slot: &mut Slot<'_>,
        key: &Key,
        delta: &Crdt,
    ) -> Result<Receipt, Attempt> {
        let conn = slot.get().await?;
        let mut tx = conn.begin().await.map_err(before_commit)?;
        let outcome = self.merge_in(&mut tx, key, delta).await;
        let (receipt, (version, seen, len)) = finish(tx, outcome).await?;
        self.stats.commits.fetch_add(1, Relaxed);
        self.stats.locking_commits.fetch_add(1, Relaxed);
        self.remember(key, version, seen, len);
        Ok(receipt)
    }

    async fn merge_in(
        &self,
        tx: &mut PgConnection,
        key: &Key,
        delta: &Crdt,
    ) -> Result<Step<(Receipt, (u64, Seen, usize))>, Attempt> {
        let locked = self.lock_row(tx, key).await?;
        let current = match &locked {
            Some(row) => decode_value(key, &row.envelope)?,
            None => Crdt::empty(delta.type_tag()),
        };
        let (prepared, merged) = self.prepare(key, &current, delta)?;
        let old = locked.as_ref().map(Locked::old);
        let (len, new_hash, new_sha) = prepared.fingerprint();
        let (version, _) = self
            .store_locked(tx, key, old, prepared, None, None)
            .await?;
        let seen = Seen {
            state: merged,
            entry_hash: new_hash,
            envelope_hash: new_sha,
            floor: None,
        };
        Ok(Step::Commit((
            Receipt {
                partition: self.layout.partition_of(key),
                version,
                seq: None,
                delta: delta.clone(),
            },
            (version, seen, len),
        )))
    }

    // --- The optimistic path -----------------------------------------------------------------

    /// What an optimistic write to `key` starts from, read afresh (no transaction, no lock):
    /// the key's row if any, decoded, and, for a local write by `actor`, the writer's dot
    /// floor with the partition's floor epoch, all in one snapshot.
    async fn read_for_write(
        &self,
        slot: &mut Slot<'_>,
        key: &Key,
        actor: Option<ActorId>,
    ) -> Result<Base, Attempt> {
        let conn = slot.get().await?;
        let row = query(&self.sql.read_for_write)
            .bind(key.as_str())
            .bind(i32::from(self.layout.partition_of(key)))
            .bind(actor.map(|a| a.get() as i64))
            .fetch_optional(conn)
            .await
            .map_err(before_commit)?;
        let Some(row) = row else {
            return Err(Attempt::Fail(BackendError::Unavailable(format!(
                "partition row {} missing in schema {}",
                self.layout.partition_of(key),
                self.schema
            ))));
        };
        let epoch: i64 = row.try_get(0).map_err(before_commit)?;
        let counter: Option<String> = row.try_get(1).map_err(before_commit)?;
        let counter = match counter {
            Some(c) => floor_counter(&c)?,
            None => 0,
        };
        let floor = actor.map(|actor| FloorSeen {
            epoch,
            actor,
            counter,
        });
        let envelope: Option<Vec<u8>> = row.try_get(2).map_err(before_commit)?;
        let current = match envelope {
            None => None,
            Some(bytes) => {
                let version: i64 = row.try_get(3).map_err(before_commit)?;
                let hash: i64 = row.try_get(4).map_err(before_commit)?;
                let state =
                    decode_value(key, &bytes).inspect_err(|_| self.cache.remove(key.as_str()))?;
                let seen = Seen {
                    state,
                    entry_hash: hash as u64,
                    envelope_hash: envelope_hash(&bytes),
                    floor,
                };
                Some((unsigned(version), Arc::new(seen)))
            }
        };
        Ok(Base {
            current,
            floor,
            cached: false,
        })
    }

    /// The starting point of an optimistic local write: the cached entry if there is one
    /// (with this writer's floor), else a fresh read.
    async fn base_for_write(
        &self,
        slot: &mut Slot<'_>,
        w: &LocalWrite,
        use_cache: bool,
    ) -> Result<Base, Attempt> {
        if use_cache {
            if let Some((version, seen)) = self.cache.get(w.key.as_str()) {
                if let Some(floor) = seen.floor.filter(|f| f.actor == w.actor) {
                    return Ok(Base {
                        current: Some((version, seen)),
                        floor: Some(floor),
                        cached: true,
                    });
                }
            }
        }
        self.read_for_write(slot, &w.key, Some(w.actor)).await
    }

    /// One optimistic attempt of a local write: compute the delta from the cached or freshly
    /// read state, then one autocommit statement that writes only if the key still holds that
    /// version (or is still absent) and the partition's floor epoch is unchanged. Anything but
    /// a write computed from a cached state (a no-op, an error, a failed condition) is
    /// confirmed on a fresh read before it is answered.
    async fn try_apply_optimistic(
        &self,
        slot: &mut Slot<'_>,
        w: &LocalWrite,
        mut use_cache: bool,
    ) -> Result<Optimistic, Attempt> {
        let key = &w.key;
        let partition = self.layout.partition_of(key);
        loop {
            let base = self.base_for_write(slot, w, use_cache).await?;
            use_cache = false;
            let Some(floor) = base.floor else {
                return Err(Attempt::Fail(BackendError::Unavailable(
                    "internal: a local write's floor was not read".into(),
                )));
            };
            let planned = self.plan_local(w, partition, &base, floor);
            let (prepared, merged, delta, feed) = match planned {
                Ok(Plan::Write {
                    prepared,
                    merged,
                    delta,
                    feed,
                }) => (prepared, merged, delta, feed),
                answer if base.cached => {
                    // Computed from what this process saw earlier: confirm on a fresh read.
                    drop(answer);
                    self.cache.remove(key.as_str());
                    continue;
                }
                Ok(Plan::Answer(receipt)) => return Ok(Optimistic::Done(receipt)),
                Err(e) => return Err(Attempt::Fail(e)),
            };
            let old = base.old();
            let (len, new_hash, new_sha) = prepared.fingerprint();
            let conn = slot.get().await?;
            let stored = self
                .store(
                    conn,
                    key,
                    old,
                    true,
                    prepared,
                    Some(feed),
                    Some(floor.epoch),
                )
                .await;
            return match stored {
                Ok(Some((version, seq))) => {
                    self.stats.commits.fetch_add(1, Relaxed);
                    self.stats.optimistic_commits.fetch_add(1, Relaxed);
                    let seen = Seen {
                        state: merged,
                        entry_hash: new_hash,
                        envelope_hash: new_sha,
                        floor: Some(floor),
                    };
                    self.remember(key, version, seen, len);
                    Ok(Optimistic::Done(Receipt {
                        partition,
                        version,
                        seq: Some(seq),
                        delta,
                    }))
                }
                Ok(None) => {
                    self.cache.remove(key.as_str());
                    Ok(Optimistic::Raced)
                }
                Err(e) => {
                    self.cache.remove(key.as_str());
                    Err(e)
                }
            };
        }
    }

    /// One optimistic attempt of a merge (see [`Self::try_apply_optimistic`]); merges need no
    /// dot floor, and a merge applied twice is the merge applied once, so a connection that
    /// fails under it is retried.
    async fn try_merge_optimistic(
        &self,
        slot: &mut Slot<'_>,
        key: &Key,
        delta: &Crdt,
        mut use_cache: bool,
    ) -> Result<Optimistic, Attempt> {
        loop {
            let cached = if use_cache {
                self.cache.get(key.as_str())
            } else {
                None
            };
            let base = match cached {
                Some((version, seen)) => Base {
                    floor: seen.floor,
                    current: Some((version, seen)),
                    cached: true,
                },
                None => self.read_for_write(slot, key, None).await?,
            };
            use_cache = false;
            let empty;
            let state = match &base.current {
                Some((_, seen)) => &seen.state,
                None => {
                    empty = Crdt::empty(delta.type_tag());
                    &empty
                }
            };
            let (prepared, merged) = match self.prepare(key, state, delta) {
                Ok(done) => done,
                Err(_) if base.cached => {
                    // Computed from what this process saw earlier: confirm on a fresh read.
                    self.cache.remove(key.as_str());
                    continue;
                }
                Err(e) => return Err(Attempt::Fail(e)),
            };
            let old = base.old();
            let (len, new_hash, new_sha) = prepared.fingerprint();
            let conn = slot.get().await?;
            return match self.store(conn, key, old, true, prepared, None, None).await {
                Ok(Some((version, _))) => {
                    self.stats.commits.fetch_add(1, Relaxed);
                    self.stats.optimistic_commits.fetch_add(1, Relaxed);
                    let seen = Seen {
                        state: merged,
                        entry_hash: new_hash,
                        envelope_hash: new_sha,
                        // Still paired with the epoch it was read at, which a local write
                        // checks.
                        floor: base.floor,
                    };
                    self.remember(key, version, seen, len);
                    Ok(Optimistic::Done(Receipt {
                        partition: self.layout.partition_of(key),
                        version,
                        seq: None,
                        delta: delta.clone(),
                    }))
                }
                Ok(None) => {
                    self.cache.remove(key.as_str());
                    Ok(Optimistic::Raced)
                }
                Err(e) => {
                    self.cache.remove(key.as_str());
                    Err(e)
                }
            };
        }
    }

    /// The result of a local write computed from `base` (see [`Plan`]).
    fn plan_local(
        &self,
        w: &LocalWrite,
        partition: u16,
        base: &Base,
        floor: FloorSeen,
    ) -> Result<Plan, BackendError> {
        let key = &w.key;
        let current = base.current.as_ref().map(|(v, seen)| (*v, &seen.state));
        w.expect.check(key, current.map(|(v, _)| v))?;
        let empty;
        let state = match (current, w.op.type_tag()) {
            (Some((_, value)), _) => value,
            (None, Some(tag)) => {
                empty = Crdt::empty(tag);
                &empty
            }
            // A deletion of a key that holds nothing changes nothing.
            (None, None) => return Ok(Plan::Answer(noop(partition, 0))),
        };
        let delta = local_delta(state, w, floor.counter)?;
        if delta.context().is_empty() {
            return Ok(Plan::Answer(Receipt {
                partition,
                version: current.map_or(0, |(v, _)| v),
                seq: None,
                delta,
            }));
        }
        let (prepared, merged) = self.prepare(key, state, &delta)?;
        let feed = FeedRow {
            delta: envelope::encode(&delta, &envelope::Options::default())?,
            origin: w.actor,
            hlc: w.hlc,
        };
        Ok(Plan::Write {
            prepared,
            merged,
            delta,
            feed,
        })
    }

    /// Locks the write stripe of `key` in this process. A task never waits for a stripe while
    /// holding a connection (it gives the slot's back to the pool first), so stripe holders
    /// waiting for a connection and connection holders waiting for a stripe cannot block
    /// one another for good.
    async fn key_lock(&self, key: &Key, slot: &mut Slot<'_>) -> tokio::sync::MutexGuard<'_, ()> {
        let stripe = (fnv1a64(key.as_str().as_bytes()).rotate_left(17) as usize)
            % self.key_locks.len().max(1);
        let lock = &self.key_locks[stripe];
        match lock.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                slot.release();
                lock.lock().await
            }
        }
    }

    /// A local write, to the end: optimistic attempts first (at most
    /// [`RetryPolicy::optimistic_attempts_max`]), then the locking transaction.
    async fn apply_one(
        &self,
        slot: &mut Slot<'_>,
        w: &LocalWrite,
    ) -> Result<Receipt, BackendError> {
        let _stripe = self.key_lock(&w.key, slot).await;
        let mut tries = 0;
        let mut optimistic = 0;
        loop {
            let r = if optimistic < self.retry.optimistic_attempts_max {
                optimistic += 1;
                match self.try_apply_optimistic(slot, w, optimistic == 1).await {
                    Ok(Optimistic::Done(receipt)) => Ok(receipt),
                    Ok(Optimistic::Raced) => Err(raced(&w.key)),
                    Err(e) => Err(e),
                }
            } else {
                self.try_apply(slot, w).await
            };
            if r.is_err() {
                self.cache.remove(w.key.as_str());
            }
            if let Some(done) = self.settle(r, slot, &mut tries, "apply").await {
                return done;
            }
        }
    }

    /// A merge, to the end: as [`Self::apply_one`].
    async fn merge_one(
        &self,
        slot: &mut Slot<'_>,
        key: &Key,
        delta: &Crdt,
    ) -> Result<Receipt, BackendError> {
        if !delta.is_well_formed() {
            return Err(BackendError::Crdt(geostate_crdt::Error::Payload(
                "delta violates its invariants".into(),
            )));
        }
        let _stripe = self.key_lock(key, slot).await;
        let mut tries = 0;
        let mut optimistic = 0;
        loop {
            let r = if optimistic < self.retry.optimistic_attempts_max {
                optimistic += 1;
                match self
                    .try_merge_optimistic(slot, key, delta, optimistic == 1)
                    .await
                {
                    Ok(Optimistic::Done(receipt)) => Ok(receipt),
                    Ok(Optimistic::Raced) => Err(raced(key)),
                    Err(e) => Err(e),
                }
            } else {
                self.try_merge(slot, key, delta).await
            };
            if r.is_err() {
                self.cache.remove(key.as_str());
            }
            if let Some(done) = self.settle(r, slot, &mut tries, "merge").await {
                return done;
            }
        }
    }

    /// Reads into the write cache, in one statement per [`PREFETCH_MAX`] keys, the keys of
    /// `keys` that are not cached, with `actor`'s dot floor (`None`: for merges): what a
    /// batch's writes then start from. Keys that do not exist or do not decode are left out
    /// (their writes read them on their own). Best effort: a failure only costs those reads.
    async fn prefetch(&self, slot: &mut Slot<'_>, keys: &[&Key], actor: Option<ActorId>) {
        let mut wanted: Vec<String> = keys
            .iter()
            .filter(|k| !self.cache.contains(k.as_str()))
            .map(|k| k.as_str().to_string())
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        for chunk in wanted.chunks(PREFETCH_MAX) {
            if let Err(e) = self.try_prefetch(slot, chunk, actor).await {
                if let Attempt::Retry {
                    kind: RetryKind::Connection,
                    ..
                } = e
                {
                    slot.discard();
                }
                return;
            }
        }
    }

    async fn try_prefetch(
        &self,
        slot: &mut Slot<'_>,
        keys: &[String],
        actor: Option<ActorId>,
    ) -> Result<(), Attempt> {
        let conn = slot.get().await?;
        let rows = query(&self.sql.read_many_for_write)
            .bind(keys)
            .bind(actor.map(|a| a.get() as i64))
            .fetch_all(conn)
            .await
            .map_err(before_commit)?;
        for row in &rows {
            let name: String = row.try_get(0).map_err(before_commit)?;
            let bytes: Vec<u8> = row.try_get(1).map_err(before_commit)?;
            let version: i64 = row.try_get(2).map_err(before_commit)?;
            let hash: i64 = row.try_get(3).map_err(before_commit)?;
            let epoch: i64 = row.try_get(4).map_err(before_commit)?;
            let counter: Option<String> = row.try_get(5).map_err(before_commit)?;
            let counter = match counter {
                Some(c) => floor_counter(&c)?,
                None => 0,
            };
            let Ok(state) = envelope::decode(&bytes, &envelope::Limits::default()) else {
                continue;
            };
            let seen = Seen {
                state,
                entry_hash: hash as u64,
                envelope_hash: envelope_hash(&bytes),
                floor: actor.map(|actor| FloorSeen {
                    epoch,
                    actor,
                    counter,
                }),
            };
            self.cache.insert(
                &name,
                unsigned(version),
                Arc::new(seen),
                bytes.len().saturating_mul(2),
            );
        }
        Ok(())
    }

    /// The floor epoch of `partition` and `actor`'s entry of its dot floor, in one snapshot.
    async fn absent_floor(
        &self,
        tx: &mut PgConnection,
        partition: u16,
        actor: ActorId,
    ) -> Result<(i64, VersionVector), Attempt> {
        let row = query(&self.sql.absent_floor)
            .bind(i32::from(partition))
            .bind(actor.get() as i64)
            .fetch_optional(tx)
            .await
            .map_err(before_commit)?;
        let Some(row) = row else {
            return Err(Attempt::Fail(BackendError::Unavailable(format!(
                "partition row {partition} missing in schema {}",
                self.schema
            ))));
        };
        let epoch: i64 = row.try_get(0).map_err(before_commit)?;
        let counter: Option<String> = row.try_get(1).map_err(before_commit)?;
        let mut floor = VersionVector::new();
        if let Some(counter) = counter {
            floor.observe(actor, floor_counter(&counter)?);
        }
        Ok((epoch, floor))
    }

    /// Bumps the floor epochs of `floors`' partitions and raises their dot floors (see
    /// `raise_floors` in `sql.rs`): the step of a purge or delete after it locked its rows.
    async fn raise_floors(
        &self,
        tx: &mut PgConnection,
        floors: &BTreeMap<u16, VersionVector>,
    ) -> Result<(), Attempt> {
        let partitions: Vec<i32> = floors.keys().map(|&p| i32::from(p)).collect();
        let (mut ps, mut actors, mut counters) = (Vec::new(), Vec::new(), Vec::new());
        for (&p, floor) in floors {
            for (actor, counter) in floor.iter() {
                ps.push(i32::from(p));
                actors.push(actor.get() as i64);
                counters.push(counter.to_string());
            }
        }
        query(&self.sql.raise_floors)
            .bind(partitions)
            .bind(ps)
            .bind(actors)
            .bind(counters)
            .execute(tx)
            .await
            .map_err(before_commit)?;
        Ok(())
    }

    // --- Batches -----------------------------------------------------------------------------

    /// Runs a batch of writes: waves of contiguous items on distinct keys; in each, the items
    /// whose keys are cached are written by one `write_many` statement, and the others (and
    /// those that lost a race) one by one with [`Self::apply_one`] / [`Self::merge_one`].
    async fn run_batch(&self, items: &[Item<'_>]) -> Vec<Result<Receipt, BackendError>> {
        let mut slot = Slot::new(&self.primary);
        let n = items.len();
        let mut out: Vec<Option<Result<Receipt, BackendError>>> = (0..n).map(|_| None).collect();
        let wave_max = PREFETCH_MAX.min(self.layout.feed_entries_max()).max(1);
        for (start, end) in waves(n, wave_max, |i| items[i].key().as_str()) {
            self.run_wave(&mut slot, &items[start..end], &mut out[start..end])
                .await;
        }
        outcomes(out)
    }

    async fn run_wave(
        &self,
        slot: &mut Slot<'_>,
        items: &[Item<'_>],
        out: &mut [Option<Result<Receipt, BackendError>>],
    ) {
        // What the wave starts from: the cache, filled by one read for the keys it lacks.
        let actor = items.iter().find_map(|item| match item {
            Item::Apply(w) => Some(w.actor),
            Item::Merge(..) => None,
        });
        let keys: Vec<&Key> = items
            .iter()
            .filter(|item| match (item, actor) {
                (Item::Apply(w), Some(a)) => w.actor == a,
                (Item::Merge(..), _) => actor.is_none(),
                _ => false,
            })
            .map(Item::key)
            .collect();
        if keys.len() > 1 {
            self.prefetch(slot, &keys, actor).await;
        }
        let mut planned: Vec<(usize, Planned)> = Vec::new();
        let mut single: Vec<usize> = Vec::new();
        for (j, item) in items.iter().enumerate() {
            match self.plan_cached(item) {
                Some(p) => planned.push((j, p)),
                None => single.push(j),
            }
        }
        if planned.len() > 1 {
            self.write_planned(slot, items, planned, out, &mut single)
                .await;
        } else {
            single.extend(planned.into_iter().map(|(j, _)| j));
        }
        single.sort_unstable();
        for j in single {
            out[j] = Some(match &items[j] {
                Item::Apply(w) => self.apply_one(slot, w).await,
                Item::Merge(key, delta) => self.merge_one(slot, key, delta).await,
            });
        }
    }

    /// An item's write computed from the write cache, if its key is cached (for a local
    /// write, with this writer's floor) and the result is a write (anything else is left to
    /// the single path, which confirms it on a fresh read).
    fn plan_cached(&self, item: &Item<'_>) -> Option<Planned> {
        let key = item.key();
        let (version, seen) = self.cache.get(key.as_str())?;
        let old = Old {
            version,
            entry_hash: seen.entry_hash,
            envelope_hash: Some(seen.envelope_hash),
        };
        match item {
            Item::Apply(w) => {
                let floor = seen.floor.filter(|f| f.actor == w.actor)?;
                let partition = self.layout.partition_of(key);
                let base = Base {
                    current: Some((version, seen)),
                    floor: Some(floor),
                    cached: true,
                };
                match self.plan_local(w, partition, &base, floor).ok()? {
                    Plan::Write {
                        prepared,
                        merged,
                        delta,
                        feed,
                    } => Some(Planned {
                        old,
                        prepared,
                        merged,
                        delta,
                        feed: Some(feed),
                        floor: Some(floor),
                    }),
                    Plan::Answer(_) => None,
                }
            }
            Item::Merge(_, delta) => {
                if !delta.is_well_formed() {
                    return None;
                }
                let (prepared, merged) = self.prepare(key, &seen.state, delta).ok()?;
                Some(Planned {
                    old,
                    prepared,
                    merged,
                    delta: (*delta).clone(),
                    feed: None,
                    floor: seen.floor,
                })
            }
        }
    }

    /// Writes the planned items of a wave with one `write_many` statement; records the
    /// outcomes of those written, and adds the others to `single` (or fails them, if the
    /// statement's outcome is unknown).
    async fn write_planned(
        &self,
        slot: &mut Slot<'_>,
        items: &[Item<'_>],
        planned: Vec<(usize, Planned)>,
        out: &mut [Option<Result<Receipt, BackendError>>],
        single: &mut Vec<usize>,
    ) {
        let written = match self.try_write_many(slot, items, &planned).await {
            Ok(written) => written,
            Err(WaveError::Unknown(e)) => {
                // The connection was lost with the statement in flight: it may have committed.
                // Local writes are not repeated; merges are safe to do again.
                let message = e.to_string();
                for (j, p) in planned {
                    self.cache.remove(items[j].key().as_str());
                    if p.feed.is_some() {
                        out[j] = Some(Err(BackendError::Unavailable(message.clone())));
                    } else {
                        single.push(j);
                    }
                }
                return;
            }
            Err(WaveError::NotWritten(e)) => {
                // Nothing was written: every item goes the single way.
                if let Attempt::Retry {
                    kind: RetryKind::Connection,
                    ..
                } = e
                {
                    slot.discard();
                }
                for (j, _) in planned {
                    self.cache.remove(items[j].key().as_str());
                    single.push(j);
                }
                return;
            }
        };
        let mut raced = 0;
        for (k, (j, p)) in planned.into_iter().enumerate() {
            let key = items[j].key();
            let Some(&(version, seq)) = written.get(&(k as i64 + 1)) else {
                raced += 1;
                self.cache.remove(key.as_str());
                single.push(j);
                continue;
            };
            let (len, new_hash, new_sha) = (
                p.prepared.envelope.len(),
                p.prepared.entry_hash,
                envelope_hash(&p.prepared.envelope),
            );
            let seen = Seen {
                state: p.merged,
                entry_hash: new_hash,
                envelope_hash: new_sha,
                floor: p.floor,
            };
            self.remember(key, version, seen, len);
            out[j] = Some(Ok(Receipt {
                partition: self.layout.partition_of(key),
                version,
                seq: if p.feed.is_some() { seq } else { None },
                delta: p.delta,
            }));
        }
        let committed = written.len() as u64;
        self.stats.commits.fetch_add(committed, Relaxed);
        self.stats.optimistic_commits.fetch_add(committed, Relaxed);
        self.stats.races.fetch_add(raced, Relaxed);
    }

    /// The `write_many` statement: returns, by item number (1-based, in `planned`'s order),
    /// the version and sequence number of each item written.
    async fn try_write_many(
        &self,
        slot: &mut Slot<'_>,
        items: &[Item<'_>],
        planned: &[(usize, Planned)],
    ) -> Result<HashMap<i64, (u64, Option<u64>)>, WaveError> {
        let m = planned.len();
        let mut partitions = Vec::with_capacity(m);
        let mut keys = Vec::with_capacity(m);
        let mut buckets = Vec::with_capacity(m);
        let mut envelopes = Vec::with_capacity(m);
        let mut value_hashes = Vec::with_capacity(m);
        let mut entry_hashes = Vec::with_capacity(m);
        let mut fed = Vec::with_capacity(m);
        let mut deltas = Vec::with_capacity(m);
        let mut origins = Vec::with_capacity(m);
        let mut hlc_ms = Vec::with_capacity(m);
        let mut hlc_logical = Vec::with_capacity(m);
        let mut xors = Vec::with_capacity(m);
        let mut epochs = Vec::with_capacity(m);
        let mut tombstones = Vec::with_capacity(m);
        let mut expected = Vec::with_capacity(m);
        let mut shas = Vec::with_capacity(m);
        for (j, p) in planned {
            let key = items[*j].key();
            partitions.push(i32::from(self.layout.partition_of(key)));
            keys.push(key.as_str());
            buckets.push(i32::from(self.layout.bucket_of(key)));
            envelopes.push(p.prepared.envelope.as_slice());
            value_hashes.push(p.prepared.value_hash as i64);
            entry_hashes.push(p.prepared.entry_hash as i64);
            xors.push((p.old.entry_hash ^ p.prepared.entry_hash) as i64);
            tombstones.push(p.prepared.tombstone);
            expected.push(
                signed(p.old.version, "version")
                    .map_err(|e| WaveError::NotWritten(Attempt::Fail(e)))?,
            );
            shas.push(p.old.envelope_hash.map(|h| h.to_vec()));
            match &p.feed {
                Some(f) => {
                    fed.push(1i32);
                    deltas.push(Some(f.delta.as_slice()));
                    origins.push(f.origin.get() as i64);
                    hlc_ms.push(f.hlc.physical_ms() as i64);
                    hlc_logical.push(i64::from(f.hlc.logical()));
                    epochs.push(p.floor.map(|f| f.epoch));
                }
                None => {
                    fed.push(0);
                    deltas.push(None);
                    origins.push(0);
                    hlc_ms.push(0);
                    hlc_logical.push(0);
                    epochs.push(None);
                }
            }
        }
        let keep = i64::try_from(self.layout.feed_entries_max()).unwrap_or(i64::MAX);
        let local = fed.contains(&1);
        let conn = slot.get().await.map_err(WaveError::NotWritten)?;
        let rows = query(&self.sql.write_many)
            .bind(partitions)
            .bind(keys)
            .bind(buckets)
            .bind(envelopes)
            .bind(value_hashes)
            .bind(entry_hashes)
            .bind(fed)
            .bind(keep)
            .bind(deltas)
            .bind(origins)
            .bind(hlc_ms)
            .bind(hlc_logical)
            .bind(xors)
            .bind(epochs)
            .bind(tombstones)
            .bind(expected)
            .bind(shas)
            .fetch_all(conn)
            .await
            .map_err(|e| {
                if !outcome_unknown(&e) {
                    WaveError::NotWritten(before_commit(e))
                } else if local {
                    WaveError::Unknown(unknown_outcome(&e))
                } else {
                    // Merges only: safe to do again.
                    WaveError::NotWritten(Attempt::Retry {
                        kind: RetryKind::Connection,
                        error: e.to_string(),
                    })
                }
            })?;
        let unreadable = |e: sqlx::Error| {
            WaveError::Unknown(BackendError::Unavailable(format!(
                "the answer to a batch's write statement was unreadable ({e}); its writes may \
                 or may not have taken effect"
            )))
        };
        let mut written = HashMap::with_capacity(rows.len());
        for row in &rows {
            let n: i64 = row.try_get(0).map_err(unreadable)?;
            let version: i64 = row.try_get(1).map_err(unreadable)?;
            let seq: Option<i64> = row.try_get(2).map_err(unreadable)?;
            written.insert(n, (unsigned(version), seq.map(unsigned)));
        }
        Ok(written)
    }

    /// Deletes `keys` (distinct) in one transaction; returns the ones that existed. The rows
    /// are locked first and decoded, so the partitions' dot floors are raised by exactly the
    /// values removed (a value that does not decode raises nothing: its dots are unknown).
    async fn try_delete(
        &self,
        slot: &mut Slot<'_>,
        keys: &[String],
    ) -> Result<HashSet<String>, Attempt> {
        let conn = slot.get().await?;
        let mut tx = conn.begin().await.map_err(before_commit)?;
        let outcome = self.delete_in(&mut tx, keys).await;
        finish(tx, outcome).await
    }

    async fn delete_in(
        &self,
        tx: &mut PgConnection,
        keys: &[String],
    ) -> Result<Step<HashSet<String>>, Attempt> {
        let rows = query(&self.sql.lock_values)
            .bind(keys)
            .fetch_all(&mut *tx)
            .await
            .map_err(before_commit)?;
        if rows.is_empty() {
            return Ok(Step::Rollback(HashSet::new()));
        }
        let mut found = Vec::with_capacity(rows.len());
        let mut floors: BTreeMap<u16, VersionVector> = BTreeMap::new();
        for row in &rows {
            let key: String = row.try_get(0).map_err(before_commit)?;
            let partition: i32 = row.try_get(1).map_err(before_commit)?;
            let bytes: Vec<u8> = row.try_get(2).map_err(before_commit)?;
            let partition = u16::try_from(partition).map_err(|_| {
                Attempt::Fail(BackendError::Unavailable(format!(
                    "key {key:?} is stored with partition {partition} (changed behind the \
                     store's back?)"
                )))
            })?;
            let floor = floors.entry(partition).or_default();
            if let Ok(value) = envelope::decode(&bytes, &envelope::Limits::default()) {
                floor.merge(&value.context().maxima());
            }
            found.push(key);
        }
        self.raise_floors(tx, &floors).await?;
        let deleted = query(&self.sql.delete)
            .bind(&found)
            .fetch_all(&mut *tx)
            .await
            .map_err(before_commit)?;
        let deleted = deleted
            .iter()
            .map(|row| row.try_get::<String, _>(0).map_err(before_commit))
            .collect::<Result<HashSet<String>, Attempt>>()?;
        Ok(Step::Commit(deleted))
    }

    /// [`StateBackend::purge`] in one transaction: lock the row, check it holds a tombstone at
    /// `version`, raise the floor, delete the row and its digest contribution.
    async fn try_purge(
        &self,
        slot: &mut Slot<'_>,
        key: &Key,
        version: u64,
    ) -> Result<bool, Attempt> {
        let conn = slot.get().await?;
        let mut tx = conn.begin().await.map_err(before_commit)?;
        let outcome = self.purge_in(&mut tx, key, version).await;
        finish(tx, outcome).await
    }

    async fn purge_in(
        &self,
        tx: &mut PgConnection,
        key: &Key,
        version: u64,
    ) -> Result<Step<bool>, Attempt> {
        let Some(row) = self.lock_row(tx, key).await? else {
            return Ok(Step::Rollback(false));
        };
        if row.version != version {
            return Ok(Step::Rollback(false));
        }
        let value = match envelope::decode(&row.envelope, &envelope::Limits::default()) {
            Ok(value) if value.is_bottom() => value,
            _ => return Ok(Step::Rollback(false)),
        };
        let floors = BTreeMap::from([(self.layout.partition_of(key), value.context().maxima())]);
        self.raise_floors(tx, &floors).await?;
        let deleted = query(&self.sql.delete)
            .bind(vec![key.as_str().to_string()])
            .fetch_all(&mut *tx)
            .await
            .map_err(before_commit)?;
        Ok(Step::Commit(!deleted.is_empty()))
    }

    async fn try_tombstones(
        &self,
        slot: &mut Slot<'_>,
        partition: u16,
        after: Option<&Key>,
        fetch: i64,
    ) -> Result<Vec<Tombstone>, Attempt> {
        let conn = slot.get().await?;
        let statement = match after {
            None => query(&self.sql.tombstones_first),
            Some(_) => query(&self.sql.tombstones_after),
        };
        let mut statement = statement.bind(i32::from(partition)).bind(fetch);
        if let Some(after) = after {
            statement = statement.bind(after.as_str());
        }
        let rows = statement.fetch_all(conn).await.map_err(before_commit)?;
        rows.iter()
            .map(|row| {
                let key: String = row.try_get(0).map_err(before_commit)?;
                let version: i64 = row.try_get(1).map_err(before_commit)?;
                let hash: i64 = row.try_get(2).map_err(before_commit)?;
                Ok(Tombstone {
                    key: stored_key(key)?,
                    version: unsigned(version),
                    hash: hash as u64,
                })
            })
            .collect()
    }

    async fn try_dot_floor(
        &self,
        slot: &mut Slot<'_>,
        partition: u16,
    ) -> Result<VersionVector, Attempt> {
        let conn = slot.get().await?;
        let rows = query(&self.sql.dot_floor)
            .bind(i32::from(partition))
            .fetch_all(conn)
            .await
            .map_err(before_commit)?;
        let mut floor = VersionVector::new();
        for row in &rows {
            let actor: i64 = row.try_get(0).map_err(before_commit)?;
            let counter: String = row.try_get(1).map_err(before_commit)?;
            floor.observe(ActorId::new(actor as u64), floor_counter(&counter)?);
        }
        Ok(floor)
    }

    /// [`StateBackend::delete_many`]: in transactions of at most [`DELETE_BATCH_MAX`] distinct
    /// keys. A key listed twice is deleted by its first mention (`true` if it existed) and
    /// absent at the next (`false`), as if deleted one by one.
    async fn delete_keys(&self, keys: &[Key]) -> Result<Vec<bool>, BackendError> {
        let result = self.delete_keys_uncached(keys).await;
        for key in keys {
            self.cache.remove(key.as_str());
        }
        result
    }

    async fn delete_keys_uncached(&self, keys: &[Key]) -> Result<Vec<bool>, BackendError> {
        let mut distinct: Vec<String> = keys.iter().map(|k| k.as_str().to_string()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let mut existed = HashSet::new();
        let mut slot = Slot::new(&self.primary);
        for chunk in distinct.chunks(DELETE_BATCH_MAX) {
            let mut tries = 0;
            let deleted = loop {
                let r = self.try_delete(&mut slot, chunk).await;
                if let Some(done) = self.settle(r, &mut slot, &mut tries, "delete").await {
                    break done?;
                }
            };
            existed.extend(deleted);
        }
        Ok(keys.iter().map(|k| existed.remove(k.as_str())).collect())
    }

    // -----------------------------------------------------------------------------------------
    // Value reads (routed)
    // -----------------------------------------------------------------------------------------

    async fn try_get(
        &self,
        slot: &mut Slot<'_>,
        key: &Key,
    ) -> Result<Option<(Vec<u8>, i64)>, Attempt> {
        let conn = slot.get().await?;
        let row = query(&self.sql.get)
            .bind(key.as_str())
            .fetch_optional(conn)
            .await
            .map_err(before_commit)?;
        match row {
            None => Ok(None),
            Some(row) => Ok(Some((
                row.try_get(0).map_err(before_commit)?,
                row.try_get(1).map_err(before_commit)?,
            ))),
        }
    }

    async fn try_get_many(
        &self,
        slot: &mut Slot<'_>,
        keys: &[String],
    ) -> Result<Vec<RawRow>, Attempt> {
        let conn = slot.get().await?;
        let rows = query(&self.sql.get_many)
            .bind(keys)
            .fetch_all(conn)
            .await
            .map_err(before_commit)?;
        raw_rows(&rows)
    }

    async fn try_scan(
        &self,
        slot: &mut Slot<'_>,
        statement: &Arc<str>,
        lower: &str,
        upper: Option<&str>,
        fetch: i64,
    ) -> Result<Vec<RawRow>, Attempt> {
        let conn = slot.get().await?;
        let rows = query(statement)
            .bind(lower)
            .bind(upper)
            .bind(fetch)
            .fetch_all(conn)
            .await
            .map_err(before_commit)?;
        raw_rows(&rows)
    }

    // -----------------------------------------------------------------------------------------
    // Feeds, digests, cursors, conflicts (primary only)
    // -----------------------------------------------------------------------------------------

    async fn try_read_feed(
        &self,
        slot: &mut Slot<'_>,
        partition: u16,
        after: u64,
        limit: usize,
    ) -> Result<FeedPage, Attempt> {
        let conn = slot.get().await?;
        let rows = query(&self.sql.read_feed)
            .bind(i32::from(partition))
            .bind(i64::try_from(after).unwrap_or(i64::MAX))
            .bind(limit as i64)
            .fetch_all(conn)
            .await
            .map_err(before_commit)?;
        let Some(first) = rows.first() else {
            return Err(Attempt::Fail(BackendError::Unavailable(format!(
                "partition row {partition} missing in schema {}",
                self.schema
            ))));
        };
        let last_seq = unsigned(first.try_get(0).map_err(before_commit)?);
        let trimmed = unsigned(first.try_get(1).map_err(before_commit)?);
        let mut entries = Vec::with_capacity(rows.len());
        let mut damaged = Vec::new();
        for row in &rows {
            let Some(seq) = row.try_get::<Option<i64>, _>(2).map_err(before_commit)? else {
                continue;
            };
            let key: String = row.try_get(3).map_err(before_commit)?;
            let delta: Vec<u8> = row.try_get(4).map_err(before_commit)?;
            let origin: i64 = row.try_get(5).map_err(before_commit)?;
            let hlc_ms: i64 = row.try_get(6).map_err(before_commit)?;
            let hlc_logical: i64 = row.try_get(7).map_err(before_commit)?;
            let (Ok(key), Ok(delta)) = (
                stored_key(key),
                envelope::decode(&delta, &envelope::Limits::default()),
            ) else {
                damaged.push(unsigned(seq));
                continue;
            };
            entries.push(FeedEntry {
                seq: unsigned(seq),
                key,
                delta,
                origin: ActorId::new(origin as u64),
                hlc: Hlc::new(
                    hlc_ms as u64,
                    u32::try_from(hlc_logical).unwrap_or(u32::MAX),
                ),
            });
        }
        Ok(FeedPage {
            entries,
            first_seq: trimmed + 1,
            last_seq,
            damaged,
        })
    }

    async fn try_trim_feed(
        &self,
        slot: &mut Slot<'_>,
        partition: u16,
        through: u64,
    ) -> Result<usize, Attempt> {
        let conn = slot.get().await?;
        let row = query(&self.sql.trim_feed)
            .bind(i32::from(partition))
            .bind(i64::try_from(through).unwrap_or(i64::MAX))
            .fetch_one(conn)
            .await
            .map_err(before_commit)?;
        let trimmed: i64 = row.try_get(0).map_err(before_commit)?;
        Ok(usize::try_from(trimmed).unwrap_or(0))
    }

    async fn try_digest(
        &self,
        slot: &mut Slot<'_>,
        partition: u16,
    ) -> Result<PartitionDigest, Attempt> {
        let conn = slot.get().await?;
        let rows = query(&self.sql.digest)
            .bind(i32::from(partition))
            .fetch_all(conn)
            .await
            .map_err(before_commit)?;
        let mut buckets = vec![0u64; usize::from(self.layout.buckets())];
        for row in &rows {
            let bucket: i32 = row.try_get(0).map_err(before_commit)?;
            let fingerprint: i64 = row.try_get(1).map_err(before_commit)?;
            if let Some(slot) = usize::try_from(bucket)
                .ok()
                .and_then(|b| buckets.get_mut(b))
            {
                *slot = fingerprint as u64;
            }
        }
        Ok(PartitionDigest::new(buckets))
    }

    async fn try_bucket_entries(
        &self,
        slot: &mut Slot<'_>,
        partition: u16,
        bucket: u16,
    ) -> Result<Vec<(Key, u64)>, Attempt> {
        let conn = slot.get().await?;
        let rows = query(&self.sql.bucket_entries)
            .bind(i32::from(partition))
            .bind(i32::from(bucket))
            .fetch_all(conn)
            .await
            .map_err(before_commit)?;
        rows.iter()
            .map(|row| {
                let key: String = row.try_get(0).map_err(before_commit)?;
                let hash: i64 = row.try_get(1).map_err(before_commit)?;
                Ok((stored_key(key)?, hash as u64))
            })
            .collect()
    }

    async fn try_verify_digest(
        &self,
        slot: &mut Slot<'_>,
        partition: u16,
    ) -> Result<Vec<u16>, Attempt> {
        let conn = slot.get().await?;
        let mut tx = conn
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(before_commit)?;
        let stored = self
            .try_digest_rows(&mut tx, &self.sql.digest, partition)
            .await;
        let fresh = self
            .try_digest_rows(&mut tx, &self.sql.recompute_digest, partition)
            .await;
        let _ = tx.rollback().await;
        let (stored, fresh) = (stored?, fresh?);
        Ok((0..self.layout.buckets())
            .filter(|b| stored.get(b).copied().unwrap_or(0) != fresh.get(b).copied().unwrap_or(0))
            .collect())
    }

    async fn try_digest_rows(
        &self,
        tx: &mut PgConnection,
        statement: &Arc<str>,
        partition: u16,
    ) -> Result<HashMap<u16, u64>, Attempt> {
        let rows = query(statement)
            .bind(i32::from(partition))
            .fetch_all(tx)
            .await
            .map_err(before_commit)?;
        let mut out = HashMap::new();
        for row in &rows {
            let bucket: i32 = row.try_get(0).map_err(before_commit)?;
            let fingerprint: i64 = row.try_get(1).map_err(before_commit)?;
            out.insert(
                u16::try_from(bucket).unwrap_or(u16::MAX),
                fingerprint as u64,
            );
        }
        Ok(out)
    }

    async fn try_cursor(
        &self,
        slot: &mut Slot<'_>,
        origin: &str,
        partition: u16,
    ) -> Result<u64, Attempt> {
        let conn = slot.get().await?;
        let row = query(&self.sql.cursor)
            .bind(origin)
            .bind(i32::from(partition))
            .fetch_optional(conn)
            .await
            .map_err(before_commit)?;
        match row {
            None => Ok(0),
            Some(row) => Ok(unsigned(row.try_get(0).map_err(before_commit)?)),
        }
    }

    async fn try_advance_cursor(
        &self,
        slot: &mut Slot<'_>,
        origin: &str,
        partition: u16,
        seq: i64,
    ) -> Result<u64, Attempt> {
        let conn = slot.get().await?;
        // Idempotent (GREATEST), so safe to retry even when a broken connection leaves the
        // first attempt's outcome unknown.
        let row = query(&self.sql.advance_cursor)
            .bind(origin)
            .bind(i32::from(partition))
            .bind(seq)
            .fetch_one(conn)
            .await
            .map_err(before_commit)?;
        Ok(unsigned(row.try_get(0).map_err(before_commit)?))
    }

    async fn try_append_conflict(
        &self,
        slot: &mut Slot<'_>,
        record: &[u8],
    ) -> Result<u64, Attempt> {
        let conn = slot.get().await?;
        let row = query(&self.sql.append_conflict)
            .bind(record)
            .bind(CONFLICTS_MAX as i64)
            .fetch_one(conn)
            .await
            // Not idempotent: a broken connection is reported, never retried.
            .map_err(at_commit)?;
        Ok(unsigned(row.try_get(0).map_err(before_commit)?))
    }

    async fn try_read_conflicts(
        &self,
        slot: &mut Slot<'_>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Attempt> {
        let conn = slot.get().await?;
        let rows = query(&self.sql.read_conflicts)
            .bind(i64::try_from(after).unwrap_or(i64::MAX))
            .bind(limit as i64)
            .fetch_all(conn)
            .await
            .map_err(before_commit)?;
        rows.iter()
            .map(|row| {
                let seq: i64 = row.try_get(0).map_err(before_commit)?;
                let record: Vec<u8> = row.try_get(1).map_err(before_commit)?;
                Ok((unsigned(seq), record))
            })
            .collect()
    }
}

/// Runs a value read on an eligible replica if there is one, else (or if it fails) on the
/// primary with retries. `$attempt` is an expression using the slot named `$slot`.
macro_rules! routed_read {
    ($shared:expr, $what:expr, $slot:ident => $attempt:expr) => {{
        let shared: &Shared = $shared;
        let mut on_replica = None;
        if let Some(index) = shared.replicas.pick(&shared.rng) {
            let mut $slot = Slot::new(shared.replicas.pool(index));
            match $attempt.await {
                Ok(value) => {
                    shared.stats.replica_reads.fetch_add(1, Relaxed);
                    shared.replicas.note_read(index);
                    on_replica = Some(value);
                }
                Err(e) => {
                    $slot.discard();
                    let error = match e {
                        Attempt::Retry { error, .. } => error,
                        Attempt::Fail(e) => e.to_string(),
                    };
                    shared.replicas.mark_failed(index, error);
                    shared.stats.replica_fallbacks.fetch_add(1, Relaxed);
                }
            }
        }
        match on_replica {
            Some(value) => Ok(value),
            None => {
                shared.stats.primary_reads.fetch_add(1, Relaxed);
                let mut $slot = Slot::new(&shared.primary);
                let mut tries = 0;
                loop {
                    let r = $attempt.await;
                    if let Some(done) = shared.settle(r, &mut $slot, &mut tries, $what).await {
                        break done;
                    }
                }
            }
        }
    }};
}

/// Runs `$attempt` (using the primary slot `$slot`) until it settles.
macro_rules! on_primary {
    ($shared:expr, $what:expr, $slot:ident => $attempt:expr) => {{
        let shared: &Shared = $shared;
        let mut $slot = Slot::new(&shared.primary);
        let mut tries = 0;
        loop {
            let r = $attempt.await;
            if let Some(done) = shared.settle(r, &mut $slot, &mut tries, $what).await {
                break done;
            }
        }
    }};
}

impl StateBackend for PostgresBackend {
    fn layout(&self) -> &Layout {
        &self.shared.layout
    }

    async fn get(&self, key: &Key) -> Result<Option<Stored>, BackendError> {
        let sh = &*self.shared;
        let raw = routed_read!(sh, "get", slot => sh.try_get(&mut slot, key))?;
        match raw {
            None => Ok(None),
            Some((envelope, version)) => Ok(Some(Stored {
                value: decode_value(key, &envelope)?,
                version: unsigned(version),
            })),
        }
    }

    async fn get_many(
        &self,
        keys: &[Key],
    ) -> Result<Vec<Result<Option<Stored>, BackendError>>, BackendError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let sh = &*self.shared;
        let names: Vec<String> = keys.iter().map(|k| k.as_str().to_string()).collect();
        let rows = routed_read!(sh, "get_many", slot => sh.try_get_many(&mut slot, &names))?;
        let found: HashMap<String, (Vec<u8>, i64)> = rows
            .into_iter()
            .map(|(key, envelope, version)| (key, (envelope, version)))
            .collect();
        Ok(keys
            .iter()
            .map(|key| match found.get(key.as_str()) {
                None => Ok(None),
                Some((envelope, version)) => Ok(Some(Stored {
                    value: decode_value(key, envelope)?,
                    version: unsigned(*version),
                })),
            })
            .collect())
    }

    async fn apply(&self, write: LocalWrite) -> Result<Receipt, BackendError> {
        let sh = &*self.shared;
        let mut slot = Slot::new(&sh.primary);
        sh.apply_one(&mut slot, &write).await
    }

    async fn apply_many(
        &self,
        writes: Vec<LocalWrite>,
    ) -> Result<Vec<Result<Receipt, BackendError>>, BackendError> {
        let sh = &*self.shared;
        if writes.len() > 1 && sh.retry.optimistic_attempts_max > 0 {
            let items: Vec<Item<'_>> = writes.iter().map(Item::Apply).collect();
            return Ok(sh.run_batch(&items).await);
        }
        let mut slot = Slot::new(&sh.primary);
        let mut out = Vec::with_capacity(writes.len());
        for write in &writes {
            out.push(sh.apply_one(&mut slot, write).await);
        }
        Ok(out)
    }

    async fn merge(&self, key: &Key, delta: &Crdt) -> Result<Receipt, BackendError> {
        let sh = &*self.shared;
        let mut slot = Slot::new(&sh.primary);
        sh.merge_one(&mut slot, key, delta).await
    }

    async fn merge_many(
        &self,
        items: &[(Key, Crdt)],
    ) -> Result<Vec<Result<Receipt, BackendError>>, BackendError> {
        let sh = &*self.shared;
        if items.len() > 1 && sh.retry.optimistic_attempts_max > 0 {
            let batch: Vec<Item<'_>> = items.iter().map(|(k, d)| Item::Merge(k, d)).collect();
            return Ok(sh.run_batch(&batch).await);
        }
        let mut slot = Slot::new(&sh.primary);
        let mut out = Vec::with_capacity(items.len());
        for (key, delta) in items {
            out.push(sh.merge_one(&mut slot, key, delta).await);
        }
        Ok(out)
    }

    async fn delete(&self, key: &Key) -> Result<bool, BackendError> {
        let deleted = self.shared.delete_keys(std::slice::from_ref(key)).await?;
        Ok(deleted.first().copied().unwrap_or(false))
    }

    async fn delete_many(&self, keys: &[Key]) -> Result<Vec<bool>, BackendError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.shared.delete_keys(keys).await
    }

    async fn tombstones(
        &self,
        partition: u16,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<TombstonePage, BackendError> {
        let limit = page_limit(limit)?;
        self.shared.layout.check_partition(partition)?;
        let sh = &*self.shared;
        let fetch = limit as i64 + 1;
        let mut items = on_primary!(sh, "tombstones", slot =>
            sh.try_tombstones(&mut slot, partition, after, fetch))?;
        let more = items.len() > limit;
        items.truncate(limit);
        let next = if more {
            items.last().map(|t| t.key.clone())
        } else {
            None
        };
        Ok(TombstonePage { items, next })
    }

    async fn purge(&self, key: &Key, version: u64) -> Result<bool, BackendError> {
        let sh = &*self.shared;
        let purged = on_primary!(sh, "purge", slot => sh.try_purge(&mut slot, key, version));
        sh.cache.remove(key.as_str());
        purged
    }

    async fn dot_floor(&self, partition: u16) -> Result<VersionVector, BackendError> {
        self.shared.layout.check_partition(partition)?;
        let sh = &*self.shared;
        on_primary!(sh, "dot_floor", slot => sh.try_dot_floor(&mut slot, partition))
    }

    async fn scan(
        &self,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<ScanPage, BackendError> {
        let limit = page_limit(limit)?;
        let nothing = ScanPage {
            items: Vec::new(),
            next: None,
        };
        // No key holds a control character, so no key starts with such a prefix (and text
        // parameters cannot carry NUL).
        if prefix.chars().any(char::is_control) {
            return Ok(nothing);
        }
        let upper = prefix_successor(prefix);
        let (lower, exclusive) = match after {
            Some(a) if a.as_str() >= prefix => (a.as_str(), true),
            _ => (prefix, false),
        };
        if upper.as_deref().is_some_and(|u| lower >= u) {
            return Ok(nothing);
        }
        let sh = &*self.shared;
        let statement = match (exclusive, upper.is_some()) {
            (false, false) => &sh.sql.scan_ge,
            (true, false) => &sh.sql.scan_gt,
            (false, true) => &sh.sql.scan_ge_lt,
            (true, true) => &sh.sql.scan_gt_lt,
        };
        let fetch = limit as i64 + 1;
        let mut rows = routed_read!(sh, "scan", slot =>
            sh.try_scan(&mut slot, statement, lower, upper.as_deref(), fetch))?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let mut items = Vec::with_capacity(rows.len());
        for (name, envelope, version) in rows {
            let key = stored_key(name).map_err(|e| match e {
                Attempt::Fail(e) => e,
                Attempt::Retry { error, .. } => BackendError::Unavailable(error),
            })?;
            let value = decode_value(&key, &envelope).map(|value| Stored {
                value,
                version: unsigned(version),
            });
            items.push(ScanItem { key, value });
        }
        let next = if more {
            items.last().map(|i| i.key.clone())
        } else {
            None
        };
        Ok(ScanPage { items, next })
    }

    async fn read_feed(
        &self,
        partition: u16,
        after: u64,
        limit: usize,
    ) -> Result<FeedPage, BackendError> {
        let limit = page_limit(limit)?;
        self.shared.layout.check_partition(partition)?;
        let sh = &*self.shared;
        on_primary!(sh, "read_feed", slot => sh.try_read_feed(&mut slot, partition, after, limit))
    }

    async fn trim_feed(&self, partition: u16, through: u64) -> Result<usize, BackendError> {
        self.shared.layout.check_partition(partition)?;
        let sh = &*self.shared;
        on_primary!(sh, "trim_feed", slot => sh.try_trim_feed(&mut slot, partition, through))
    }

    async fn digest(&self, partition: u16) -> Result<PartitionDigest, BackendError> {
        self.shared.layout.check_partition(partition)?;
        let sh = &*self.shared;
        on_primary!(sh, "digest", slot => sh.try_digest(&mut slot, partition))
    }

    async fn bucket_entries(
        &self,
        partition: u16,
        bucket: u16,
    ) -> Result<Vec<(Key, u64)>, BackendError> {
        let layout = &self.shared.layout;
        if bucket >= layout.buckets() {
            return Err(BackendError::InvalidArgument(format!(
                "bucket {bucket} out of range 0..{}",
                layout.buckets()
            )));
        }
        layout.check_partition(partition)?;
        let sh = &*self.shared;
        on_primary!(sh, "bucket_entries", slot =>
            sh.try_bucket_entries(&mut slot, partition, bucket))
    }

    async fn cursor(&self, origin: &str, partition: u16) -> Result<u64, BackendError> {
        check_origin(origin)?;
        self.shared.layout.check_partition(partition)?;
        let sh = &*self.shared;
        on_primary!(sh, "cursor", slot => sh.try_cursor(&mut slot, origin, partition))
    }

    async fn advance_cursor(
        &self,
        origin: &str,
        partition: u16,
        seq: u64,
    ) -> Result<u64, BackendError> {
        check_origin(origin)?;
        self.shared.layout.check_partition(partition)?;
        let seq = signed(seq, "cursor sequence number")?;
        let sh = &*self.shared;
        on_primary!(sh, "advance_cursor", slot =>
            sh.try_advance_cursor(&mut slot, origin, partition, seq))
    }

    async fn append_conflict(&self, record: Vec<u8>) -> Result<u64, BackendError> {
        let sh = &*self.shared;
        on_primary!(sh, "append_conflict", slot => sh.try_append_conflict(&mut slot, &record))
    }

    async fn read_conflicts(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, BackendError> {
        let limit = page_limit(limit)?;
        let sh = &*self.shared;
        on_primary!(sh, "read_conflicts", slot => sh.try_read_conflicts(&mut slot, after, limit))
    }
}

#[cfg(feature = "testing")]
impl Shared {
    async fn try_raw_put(
        &self,
        slot: &mut Slot<'_>,
        key: &Key,
        bytes: &[u8],
    ) -> Result<(), Attempt> {
        let conn = slot.get().await?;
        let mut tx = conn.begin().await.map_err(before_commit)?;
        let outcome = self.raw_put_in(&mut tx, key, bytes).await;
        finish(tx, outcome).await
    }

    async fn raw_put_in(
        &self,
        tx: &mut PgConnection,
        key: &Key,
        bytes: &[u8],
    ) -> Result<Step<()>, Attempt> {
        let locked = self.lock_row(tx, key).await?;
        let (value_hash, tombstone) = match envelope::decode(bytes, &envelope::Limits::default()) {
            Ok(value) => (crate::digest::value_hash(&value)?, value.is_bottom()),
            Err(_) => (crate::digest::raw_hash(bytes), false),
        };
        let prepared = Prepared {
            envelope: bytes.to_vec(),
            value_hash,
            entry_hash: entry_hash(key, value_hash),
            tombstone,
        };
        let old = locked.as_ref().map(Locked::old);
        self.store_locked(tx, key, old, prepared, None, None)
            .await?;
        Ok(Step::Commit(()))
    }

    async fn try_raw_append_feed(
        &self,
        slot: &mut Slot<'_>,
        key: &Key,
        delta: &[u8],
    ) -> Result<u64, Attempt> {
        let conn = slot.get().await?;
        let row = query(&self.sql.raw_append_feed)
            .bind(i32::from(self.layout.partition_of(key)))
            .bind(key.as_str())
            .bind(delta)
            .fetch_one(conn)
            .await
            .map_err(before_commit)?;
        Ok(unsigned(row.try_get(0).map_err(before_commit)?))
    }

    async fn try_raw_get(
        &self,
        slot: &mut Slot<'_>,
        key: &Key,
    ) -> Result<Option<Vec<u8>>, Attempt> {
        let conn = slot.get().await?;
        let row = query(&self.sql.raw_get)
            .bind(key.as_str())
            .fetch_optional(conn)
            .await
            .map_err(before_commit)?;
        row.map(|row| row.try_get(0).map_err(before_commit))
            .transpose()
    }
}

#[cfg(feature = "testing")]
impl crate::RawAccess for PostgresBackend {
    async fn raw_put(&self, key: &Key, bytes: Vec<u8>) -> Result<(), BackendError> {
        let sh = &*self.shared;
        let put = on_primary!(sh, "raw_put", slot => sh.try_raw_put(&mut slot, key, &bytes));
        sh.cache.remove(key.as_str());
        put
    }

    async fn raw_get(&self, key: &Key) -> Result<Option<Vec<u8>>, BackendError> {
        let sh = &*self.shared;
        on_primary!(sh, "raw_get", slot => sh.try_raw_get(&mut slot, key))
    }

    async fn raw_append_feed(&self, key: &Key, delta: Vec<u8>) -> Result<u64, BackendError> {
        let sh = &*self.shared;
        on_primary!(sh, "raw_append_feed", slot => sh.try_raw_append_feed(&mut slot, key, &delta))
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_successor;

    #[test]
    fn successors_bound_prefixes() {
        assert_eq!(prefix_successor(""), None);
        assert_eq!(prefix_successor("scan:").as_deref(), Some("scan;"));
        assert_eq!(prefix_successor("a\u{10ffff}").as_deref(), Some("b"));
        assert_eq!(prefix_successor("\u{10ffff}"), None);
        assert_eq!(prefix_successor("x\u{d7ff}").as_deref(), Some("x\u{e000}"));
        for (prefix, inside, outside) in [
            ("scan:", "scan:\u{e9}", "scan;"),
            ("\u{e9}", "\u{e9}\u{10ffff}", "\u{ea}"),
            ("a\u{7f}", "a\u{7f}z", "a\u{80}"),
        ] {
            let successor = prefix_successor(prefix).unwrap_or_default();
            assert!(inside < successor.as_str() && inside.starts_with(prefix));
            assert!(outside >= successor.as_str() && !outside.starts_with(prefix));
        }
    }
}
