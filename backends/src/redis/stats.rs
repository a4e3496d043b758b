//! Counters of what the store did, for metrics and tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::breaker::{Breaker, BreakerState};

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) commits: AtomicU64,
    pub(crate) cached_commits: AtomicU64,
    pub(crate) write_calls: AtomicU64,
    pub(crate) grouped_writes: AtomicU64,
    pub(crate) races: AtomicU64,
    pub(crate) gave_up: AtomicU64,
    pub(crate) transport_retries: AtomicU64,
    pub(crate) script_loads: AtomicU64,
    pub(crate) breaker_rejections: AtomicU64,
    pub(crate) rediscoveries: AtomicU64,
    pub(crate) wait_shortfalls: AtomicU64,
}

/// A snapshot of a [`RedisBackend`](super::RedisBackend)'s counters since it connected.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStats {
    /// Writes and merges committed.
    pub commits: u64,
    /// Of those, commits computed from the write cache, without reading the key first.
    pub cached_commits: u64,
    /// Write script calls made (one carries up to 64 commits of a batch or of a group).
    pub write_calls: u64,
    /// Single writes (`apply`, `merge`) that arrived while others were in flight and were
    /// committed together with other queued writes (group commit) instead of on their own.
    pub grouped_writes: u64,
    /// Commits refused because the key changed after it was read (each was computed again).
    pub races: u64,
    /// Writes that lost `ContentionConfig::attempts_max` races and failed.
    pub gave_up: u64,
    /// Requests repeated after a transport error or a server that refused them.
    pub transport_retries: u64,
    /// Scripts the server did not hold and that were sent whole (`EVAL`).
    pub script_loads: u64,
    /// Times the circuit breaker opened.
    pub breaker_trips: u64,
    /// Operations refused at once by the open breaker.
    pub breaker_rejections: u64,
    /// Sentinel mode: reconnections to a master found through the sentinels.
    pub rediscoveries: u64,
    /// Writes that fewer replicas confirmed than `Durability::Wait` asks.
    pub wait_shortfalls: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self, breaker_trips: u64) -> RedisStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RedisStats {
            commits: get(&self.commits),
            cached_commits: get(&self.cached_commits),
            write_calls: get(&self.write_calls),
            grouped_writes: get(&self.grouped_writes),
            races: get(&self.races),
            gave_up: get(&self.gave_up),
            transport_retries: get(&self.transport_retries),
            script_loads: get(&self.script_loads),
            breaker_trips,
            breaker_rejections: get(&self.breaker_rejections),
            rediscoveries: get(&self.rediscoveries),
            wait_shortfalls: get(&self.wait_shortfalls),
        }
    }
}

/// A handle on a store's counters and breaker that outlives no data and may outlive the
/// store: for a metrics exporter, or a test that hands the store away.
#[derive(Clone, Debug)]
pub struct StatsHandle {
    pub(crate) counters: Arc<Counters>,
    pub(crate) breaker: Arc<Breaker>,
}

impl StatsHandle {
    /// The counters now.
    pub fn snapshot(&self) -> RedisStats {
        self.counters
            .snapshot(self.breaker.trips.load(Ordering::Relaxed))
    }

    /// The circuit breaker's state now.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }
}
