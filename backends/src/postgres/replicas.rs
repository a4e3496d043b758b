//! Read replicas: lag measurement and read routing.
//!
//! **What staleness means here.** The monitor samples the primary's WAL position
//! (`pg_current_wal_lsn()`) at instants `t1, t2, ...` and each replica's replay position
//! (`pg_last_wal_replay_lsn()`). A replica whose replay position has reached the primary's
//! position sampled at `t` holds every transaction the primary had committed by `t` (a commit
//! record precedes the insert position, and a replayed commit is visible to new queries on a
//! hot standby). The replica's *known-through* instant is the latest such `t`, and its
//! staleness at any later instant `now` is `now - known_through`. A replica serves a read only
//! while that staleness is at most `max_replica_lag`, so a replica read reflects every write
//! acknowledged more than `max_replica_lag` before it (plus the monitor's measurement
//! latency), and possibly more. Between measurements staleness keeps growing, so a replica that
//! stops replaying, or a monitor that cannot reach the primary, ages out of routing on its own.
//!
//! `pg_last_xact_replay_timestamp()` (the commit time of the last replayed transaction) is
//! reported too, for operators, but not used for routing: on an idle primary it grows without
//! the replica being behind.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;
use sqlx::Row;

use super::config::ReadPolicy;
use super::retry::Rng;

/// Primary WAL position samples kept (older ones are dropped first).
const LSN_SAMPLES_MAX: usize = 4096;

/// What the store knows about one replica.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicaStatus {
    /// The replica's URL, password hidden.
    pub url: String,
    /// Whether the last measurement succeeded and found a server in recovery.
    pub healthy: bool,
    /// Whether value reads may be routed to it now (healthy and staleness within the bound).
    pub eligible: bool,
    /// How far behind the primary it may be now (`None`: not known to have caught up to any
    /// sampled primary position).
    pub staleness: Option<Duration>,
    /// `now() - pg_last_xact_replay_timestamp()` on the replica at the last measurement (the
    /// age of the last transaction it replayed; grows while the primary is idle).
    pub replay_delay: Option<Duration>,
    /// Why the replica is unhealthy, if it is.
    pub last_error: Option<String>,
    /// Value reads it has served.
    pub reads: u64,
}

#[derive(Debug, Default)]
struct ReplicaState {
    healthy: bool,
    known_through: Option<Instant>,
    replay_delay: Option<Duration>,
    last_error: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Replica {
    url: String,
    pool: PgPool,
    state: Mutex<ReplicaState>,
    reads: AtomicU64,
    /// A measurement is in flight: later rounds skip this replica until it ends, so one
    /// unresponsive replica never delays the others' measurements.
    measuring: AtomicBool,
}

/// Primary WAL positions sampled by the monitor: `(when, position)`, oldest first.
type Samples = Mutex<VecDeque<(Instant, u64)>>;

/// The replicas of one backend and how reads choose among them.
#[derive(Debug)]
pub(crate) struct Replicas {
    replicas: Vec<Arc<Replica>>,
    policy: ReadPolicy,
    max_lag: Duration,
    check_timeout: Duration,
    next: AtomicUsize,
    samples: Arc<Samples>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Replicas {
    pub fn new(
        replicas: Vec<(String, PgPool)>,
        policy: ReadPolicy,
        max_lag: Duration,
        check_timeout: Duration,
    ) -> Self {
        Self {
            replicas: replicas
                .into_iter()
                .map(|(url, pool)| {
                    Arc::new(Replica {
                        url,
                        pool,
                        state: Mutex::new(ReplicaState {
                            last_error: Some("not measured yet".into()),
                            ..ReplicaState::default()
                        }),
                        reads: AtomicU64::new(0),
                        measuring: AtomicBool::new(false),
                    })
                })
                .collect(),
            policy,
            max_lag,
            check_timeout,
            next: AtomicUsize::new(0),
            samples: Arc::new(Mutex::new(VecDeque::new())),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    pub fn pool(&self, index: usize) -> &PgPool {
        &self.replicas[index].pool
    }

    pub fn pools(&self) -> impl Iterator<Item = &PgPool> {
        self.replicas.iter().map(|r| &r.pool)
    }

    fn eligible_at(&self, state: &ReplicaState, now: Instant) -> Option<Duration> {
        if !state.healthy {
            return None;
        }
        let staleness = now.saturating_duration_since(state.known_through?);
        (staleness <= self.max_lag).then_some(staleness)
    }

    /// The replica a value read should go to, or `None` for the primary.
    pub fn pick(&self, rng: &Rng) -> Option<usize> {
        if self.replicas.is_empty() {
            return None;
        }
        let now = Instant::now();
        let eligible: Vec<(usize, Duration)> = self
            .replicas
            .iter()
            .enumerate()
            .filter_map(|(i, r)| self.eligible_at(&lock(&r.state), now).map(|s| (i, s)))
            .collect();
        if eligible.is_empty() {
            return None;
        }
        let chosen = match self.policy {
            ReadPolicy::LeastLag => eligible.iter().min_by_key(|(_, s)| *s).map(|(i, _)| *i),
            ReadPolicy::RoundRobin => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                eligible.get(n % eligible.len()).map(|(i, _)| *i)
            }
            ReadPolicy::Random => {
                let n = rng.below(eligible.len() as u64) as usize;
                eligible.get(n).map(|(i, _)| *i)
            }
        };
        chosen
    }

    /// Replica `index` served a read.
    pub fn note_read(&self, index: usize) {
        self.replicas[index].reads.fetch_add(1, Ordering::Relaxed);
    }

    /// A read on replica `index` failed: stop routing to it until the monitor finds it well.
    pub fn mark_failed(&self, index: usize, error: String) {
        let replica = &self.replicas[index];
        let mut state = lock(&replica.state);
        if state.healthy {
            tracing::warn!(replica = %replica.url, %error, "PostgreSQL replica read failed; routing reads elsewhere");
        }
        state.healthy = false;
        state.known_through = None;
        state.last_error = Some(error);
    }

    pub fn status(&self) -> Vec<ReplicaStatus> {
        let now = Instant::now();
        self.replicas
            .iter()
            .map(|r| {
                let state = lock(&r.state);
                ReplicaStatus {
                    url: r.url.clone(),
                    healthy: state.healthy,
                    eligible: self.eligible_at(&state, now).is_some(),
                    staleness: state
                        .known_through
                        .map(|t| now.saturating_duration_since(t)),
                    replay_delay: state.replay_delay,
                    last_error: state.last_error.clone(),
                    reads: r.reads.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// One round of the lag monitor: samples the primary's WAL position, then measures every
    /// replica that is not still being measured (concurrently, each bounded by the check
    /// timeout). With `wait`, returns when those measurements are recorded; without, returns
    /// at once and they are recorded as they end.
    pub async fn check(&self, primary: &PgPool, wait: bool) {
        if self.replicas.is_empty() {
            return;
        }
        let sampled_at = Instant::now();
        let primary_lsn = tokio::time::timeout(
            self.check_timeout,
            sqlx::query("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
                .fetch_one(primary),
        )
        .await;
        match primary_lsn {
            Ok(Ok(row)) => match row.try_get::<i64, _>(0) {
                Ok(lsn) => self.record_sample(sampled_at, lsn as u64),
                Err(e) => {
                    tracing::warn!(error = %e, "lag monitor: unreadable primary WAL position")
                }
            },
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "lag monitor: primary WAL position unavailable")
            }
            Err(_) => tracing::warn!("lag monitor: primary WAL position query timed out"),
        }
        let mut tasks = Vec::new();
        for replica in &self.replicas {
            if replica.measuring.swap(true, Ordering::AcqRel) {
                continue;
            }
            let (replica, samples) = (Arc::clone(replica), Arc::clone(&self.samples));
            let timeout = self.check_timeout;
            tasks.push(tokio::spawn(async move {
                let measured = measure(&replica.pool, timeout).await;
                replica.record(&samples, measured);
                replica.measuring.store(false, Ordering::Release);
            }));
        }
        if wait {
            for task in tasks {
                let _ = task.await;
            }
        }
    }

    fn record_sample(&self, at: Instant, lsn: u64) {
        let mut samples = lock(&self.samples);
        samples.push_back((at, lsn));
        // Keep what routing can still use: samples younger than the lag bound (plus slack),
        // and always the newest.
        let horizon = self.max_lag.saturating_mul(2) + self.check_timeout.saturating_mul(2);
        while samples.len() > 1
            && (samples.len() > LSN_SAMPLES_MAX
                || samples
                    .front()
                    .is_some_and(|(t, _)| at.saturating_duration_since(*t) > horizon))
        {
            samples.pop_front();
        }
    }
}

impl Replica {
    fn record(&self, samples: &Samples, measured: Result<Measured, String>) {
        let caught_up_to = |replay_lsn: u64| {
            lock(samples)
                .iter()
                .rev()
                .find(|(_, lsn)| *lsn <= replay_lsn)
                .map(|(t, _)| *t)
        };
        let mut state = lock(&self.state);
        match measured {
            Ok(m) => {
                if !state.healthy {
                    tracing::info!(replica = %self.url, "PostgreSQL replica is healthy");
                }
                state.healthy = true;
                state.last_error = None;
                state.replay_delay = m.replay_delay;
                if let Some(t) = caught_up_to(m.replay_lsn) {
                    state.known_through = Some(state.known_through.map_or(t, |old| old.max(t)));
                }
            }
            Err(error) => {
                if state.healthy {
                    tracing::warn!(replica = %self.url, %error, "PostgreSQL replica is unhealthy");
                }
                state.healthy = false;
                state.known_through = None;
                state.replay_delay = None;
                state.last_error = Some(error);
            }
        }
    }
}

struct Measured {
    replay_lsn: u64,
    replay_delay: Option<Duration>,
}

async fn measure(pool: &PgPool, timeout: Duration) -> Result<Measured, String> {
    let query = sqlx::query(
        "SELECT pg_is_in_recovery(), \
                pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint, \
                EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8",
    );
    let row = match tokio::time::timeout(timeout, query.fetch_one(pool)).await {
        Ok(Ok(row)) => row,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("lag measurement timed out after {timeout:?}")),
    };
    let read = |e: sqlx::Error| e.to_string();
    let in_recovery: bool = row.try_get(0).map_err(read)?;
    if !in_recovery {
        return Err("the server is not in recovery: not a replica (promoted?)".into());
    }
    let replay_lsn: Option<i64> = row.try_get(1).map_err(read)?;
    let replay_delay: Option<f64> = row.try_get(2).map_err(read)?;
    let Some(replay_lsn) = replay_lsn else {
        return Err("the replica has not replayed any WAL yet".into());
    };
    Ok(Measured {
        replay_lsn: replay_lsn as u64,
        replay_delay: replay_delay
            .filter(|s| s.is_finite())
            .map(|s| Duration::from_secs_f64(s.max(0.0))),
    })
}
