//! The circuit breaker: fail fast while the store is down, probe, close when it is back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::config::BreakerConfig;

/// What the breaker lets an operation do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// The breaker is closed: go ahead.
    Normal,
    /// The breaker is half-open and this operation is its probe.
    Probe,
    /// The breaker is open: fail at once.
    Reject,
}

/// The breaker's state, for health reporting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerState {
    /// Operations go to the store.
    Closed,
    /// Operations fail at once until the open period ends.
    Open,
    /// The open period ended; the next operation probes the store.
    HalfOpen,
}

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probe_started: Option<Instant>,
}

/// A consecutive-failure circuit breaker with a half-open probe.
#[derive(Debug)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    state: Mutex<State>,
    pub(crate) trips: AtomicU64,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: Mutex::new(State::default()),
            trips: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn admit(&self) -> Admission {
        if self.config.failures_to_open == 0 {
            return Admission::Normal;
        }
        let mut state = self.lock();
        let Some(until) = state.open_until else {
            return Admission::Normal;
        };
        let now = Instant::now();
        if now < until {
            return Admission::Reject;
        }
        // One probe at a time; a probe that never reported (its caller gave up on it) is
        // replaced after another open period.
        if let Some(started) = state.probe_started {
            if now.duration_since(started) < self.config.open_for {
                return Admission::Reject;
            }
        }
        state.probe_started = Some(now);
        Admission::Probe
    }

    pub(crate) fn record(&self, admission: Admission, success: bool) {
        if self.config.failures_to_open == 0 {
            return;
        }
        let mut state = self.lock();
        match (admission, success) {
            (Admission::Reject, _) => {}
            (Admission::Probe, true) => *state = State::default(),
            (Admission::Probe, false) => {
                state.probe_started = None;
                state.open_until = Some(Instant::now() + self.config.open_for);
                self.trips.fetch_add(1, Ordering::Relaxed);
            }
            (Admission::Normal, true) => state.consecutive_failures = 0,
            (Admission::Normal, false) => {
                state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                if state.consecutive_failures >= self.config.failures_to_open
                    && state.open_until.is_none()
                {
                    state.open_until = Some(Instant::now() + self.config.open_for);
                    self.trips.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        let state = self.lock();
        match state.open_until {
            None => BreakerState::Closed,
            Some(until) if Instant::now() < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }
}
