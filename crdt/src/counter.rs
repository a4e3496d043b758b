//! Counters: grow-only and positive-negative, one live dot per actor.
//!
//! Each actor keeps a single live dot whose value is its running total; an update makes a new
//! dot with the new total and overwrites the old one, so the state holds one entry per actor
//! and the value is the sum over live entries.
//!
//! Removal (a map field removed, a key deleted) is observed-remove per actor: an actor's
//! contribution goes when the remover has seen that actor's latest dot. An update concurrent
//! with the removal keeps its actor's whole running total (the embedded-counter semantics of
//! Riak's maps); contributions of actors whose latest dot the remover saw are gone for good.

use serde::{Deserialize, Serialize};

use crate::store::DotFun;
use crate::{ActorId, Causal, CausalContext, Dot, Error};

/// One actor's running totals of increments and decrements.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct CounterEntry {
    /// Sum of the actor's increments.
    pub inc: u64,
    /// Sum of the actor's decrements.
    pub dec: u64,
}

/// The dot store behind [`PnCounter`] and the counter field of a map entry.
pub type CounterStore = DotFun<CounterEntry>;

/// The delta adding `inc` and `dec` to `actor`'s running totals.
pub(crate) fn counter_delta(
    store: &CounterStore,
    ctx: &CausalContext,
    actor: ActorId,
    inc: u64,
    dec: u64,
) -> Result<Causal<CounterStore>, Error> {
    let mut total = CounterEntry::default();
    let mut delta_ctx = CausalContext::new();
    for (dot, entry) in store.iter().filter(|(d, _)| d.actor == actor) {
        total.inc = total
            .inc
            .checked_add(entry.inc)
            .ok_or(Error::CounterOverflow)?;
        total.dec = total
            .dec
            .checked_add(entry.dec)
            .ok_or(Error::CounterOverflow)?;
        delta_ctx.insert(dot);
    }
    total.inc = total.inc.checked_add(inc).ok_or(Error::CounterOverflow)?;
    total.dec = total.dec.checked_add(dec).ok_or(Error::CounterOverflow)?;
    let dot = ctx.next_dot(actor);
    delta_ctx.insert(dot);
    Ok(Causal::delta(
        DotFun::from_entries([(dot, total)]),
        delta_ctx,
    ))
}

/// The value of a counter store: increments minus decrements over all live entries.
pub(crate) fn counter_value(store: &CounterStore) -> i128 {
    store
        .iter()
        .map(|(_, e)| i128::from(e.inc) - i128::from(e.dec))
        .sum()
}

/// A positive-negative counter.
///
/// ```
/// use geostate_crdt::{ActorId, PnCounter};
/// let (a, b) = (ActorId::new(1), ActorId::new(2));
/// let mut left = PnCounter::new();
/// let mut right = PnCounter::new();
/// let d1 = left.inc(a, 5).unwrap();   // a mutator returns a delta...
/// left.merge(&d1);                    // ...applied locally by merge
/// let d2 = right.dec(b, 2).unwrap();
/// right.merge(&d2);
/// left.merge(&d2);                    // and shipped to other replicas as is
/// right.merge(&d1);
/// assert_eq!(left.value(), 3);
/// assert_eq!(left, right);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PnCounter {
    inner: Causal<CounterStore>,
}

impl PnCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current value.
    pub fn value(&self) -> i128 {
        counter_value(&self.inner.store)
    }

    /// The delta adding `n` on behalf of `actor`.
    pub fn inc(&self, actor: ActorId, n: u64) -> Result<Self, Error> {
        self.update(actor, n, 0)
    }

    /// The delta subtracting `n` on behalf of `actor`.
    pub fn dec(&self, actor: ActorId, n: u64) -> Result<Self, Error> {
        self.update(actor, 0, n)
    }

    /// The delta adding `inc` and subtracting `dec` in one step.
    pub fn update(&self, actor: ActorId, inc: u64, dec: u64) -> Result<Self, Error> {
        let inner = counter_delta(&self.inner.store, &self.inner.ctx, actor, inc, dec)?;
        Ok(Self { inner })
    }

    /// Joins a delta or a full state into this one.
    pub fn merge(&mut self, other: &Self) {
        self.inner.merge(&other.inner);
    }

    /// Live `(dot, running totals)` entries, one per contributing actor.
    pub fn entries(&self) -> impl Iterator<Item = (Dot, &CounterEntry)> + '_ {
        self.inner.store.iter()
    }

    /// The underlying state.
    pub fn as_causal(&self) -> &Causal<CounterStore> {
        &self.inner
    }

    pub(crate) fn from_causal(inner: Causal<CounterStore>) -> Self {
        Self { inner }
    }
}

/// A grow-only counter.
///
/// ```
/// use geostate_crdt::{ActorId, GCounter};
/// let mut c = GCounter::new();
/// let d = c.inc(ActorId::new(1), 3).unwrap();
/// c.merge(&d);
/// c.merge(&d); // idempotent
/// assert_eq!(c.value(), 3);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GCounter {
    inner: Causal<CounterStore>,
}

impl GCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current value.
    pub fn value(&self) -> u128 {
        self.inner
            .store
            .iter()
            .map(|(_, e)| u128::from(e.inc))
            .sum()
    }

    /// The delta adding `n` on behalf of `actor`.
    pub fn inc(&self, actor: ActorId, n: u64) -> Result<Self, Error> {
        let inner = counter_delta(&self.inner.store, &self.inner.ctx, actor, n, 0)?;
        Ok(Self { inner })
    }

    /// Joins a delta or a full state into this one.
    pub fn merge(&mut self, other: &Self) {
        self.inner.merge(&other.inner);
    }

    /// The underlying state.
    pub fn as_causal(&self) -> &Causal<CounterStore> {
        &self.inner
    }

    pub(crate) fn from_causal(inner: Causal<CounterStore>) -> Self {
        Self { inner }
    }

    /// Whether no entry carries a decrement (a grow-only counter's invariant).
    pub(crate) fn is_grow_only(&self) -> bool {
        self.inner.store.iter().all(|(_, e)| e.dec == 0)
    }
}
