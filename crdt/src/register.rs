//! Registers: last-writer-wins and multi-value.
//!
//! Both keep `(dot -> stamped value)` entries and overwrite every entry a write has seen, so
//! only writes made concurrently survive side by side. They differ in what a read shows: a
//! multi-value register shows every survivor (siblings); a last-writer-wins register shows the
//! one with the greatest `(HLC, actor, dot counter)`, the same winner everywhere. A
//! last-writer-wins write is stamped past every value it overwrites (see `lww_write_delta`), so
//! a causally later write wins even when its writer's clock lags.

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::DotFun;
use crate::{ActorId, Causal, CausalContext, Dot, Hlc};

/// A value with the hybrid logical clock timestamp of its write.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamped<V> {
    /// When the value was written.
    pub hlc: Hlc,
    /// The value.
    pub value: V,
}

/// The dot store behind both registers.
pub type RegisterStore<V> = DotFun<Stamped<V>>;

/// The total order of last-writer-wins: timestamp, then actor, then the actor's counter.
fn rank<V>(dot: Dot, entry: &Stamped<V>) -> (Hlc, ActorId, u64) {
    (entry.hlc, dot.actor, dot.counter)
}

/// The winning entry of a last-writer-wins store.
pub(crate) fn lww_winner<V: Ord>(store: &RegisterStore<V>) -> Option<(Dot, &Stamped<V>)> {
    store.iter().max_by_key(|(d, e)| rank(*d, e))
}

/// The delta writing `value` at `hlc` on behalf of `actor`, last-writer-wins.
///
/// A write outranks every entry it has seen: when the writer's clock lags behind a value it
/// overwrites, the write's timestamp is raised just past that value's (what a hybrid logical
/// clock does on observing it), so a causally later write always wins. Only writes made
/// concurrently, without seeing each other, are ordered by `(HLC, actor, counter)`.
pub(crate) fn lww_write_delta<V: Ord + Clone>(
    store: &RegisterStore<V>,
    ctx: &CausalContext,
    actor: ActorId,
    hlc: Hlc,
    value: V,
) -> Causal<RegisterStore<V>> {
    let dot = ctx.next_dot(actor);
    let hlc = match store.iter().map(|(_, e)| e.hlc).max() {
        Some(seen) if seen >= hlc => seen.successor(),
        _ => hlc,
    };
    let mut delta_ctx = CausalContext::from_dots([dot]);
    for (d, _) in store.iter() {
        delta_ctx.insert(d);
    }
    Causal::delta(
        DotFun::from_entries([(dot, Stamped { hlc, value })]),
        delta_ctx,
    )
}

/// The delta writing `value` at `hlc` on behalf of `actor`, overwriting every entry seen.
pub(crate) fn mv_write_delta<V: Ord + Clone>(
    store: &RegisterStore<V>,
    ctx: &CausalContext,
    actor: ActorId,
    hlc: Hlc,
    value: V,
) -> Causal<RegisterStore<V>> {
    let dot = ctx.next_dot(actor);
    let mut delta_ctx = CausalContext::from_dots([dot]);
    for (d, _) in store.iter() {
        delta_ctx.insert(d);
    }
    Causal::delta(
        DotFun::from_entries([(dot, Stamped { hlc, value })]),
        delta_ctx,
    )
}

/// The delta clearing a register: every entry seen is overwritten, nothing written.
pub(crate) fn register_clear_delta<V: Ord + Clone>(
    store: &RegisterStore<V>,
) -> Causal<RegisterStore<V>> {
    let delta_ctx = CausalContext::from_dots(store.iter().map(|(d, _)| d));
    Causal::delta(DotFun::new(), delta_ctx)
}

/// A last-writer-wins register ordered by `(HLC, actor)`.
///
/// ```
/// use geostate_crdt::{ActorId, Hlc, LwwRegister};
/// let (a, b) = (ActorId::new(1), ActorId::new(2));
/// let mut r = LwwRegister::new();
/// let w1 = r.write(a, Hlc::new(100, 0), "old");
/// let w2 = r.write(b, Hlc::new(200, 0), "new"); // concurrent with w1, later timestamp
/// r.merge(&w2);
/// r.merge(&w1);
/// assert_eq!(r.value(), Some(&"new"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(bound(serialize = "V: Serialize", deserialize = "V: DeserializeOwned"))]
#[serde(transparent)]
pub struct LwwRegister<V: Ord> {
    inner: Causal<RegisterStore<V>>,
}

impl<V: Ord> Default for LwwRegister<V> {
    fn default() -> Self {
        Self {
            inner: Causal {
                store: DotFun::new(),
                ctx: CausalContext::new(),
            },
        }
    }
}

impl<V: Ord + Clone + Debug> LwwRegister<V> {
    /// An unset register.
    pub fn new() -> Self {
        Self::default()
    }

    /// The winning value, if any write is live.
    pub fn value(&self) -> Option<&V> {
        lww_winner(&self.inner.store).map(|(_, e)| &e.value)
    }

    /// The winning entry with its dot and timestamp.
    pub fn winner(&self) -> Option<(Dot, &Stamped<V>)> {
        lww_winner(&self.inner.store)
    }

    /// The delta writing `value` at `hlc` on behalf of `actor`.
    pub fn write(&self, actor: ActorId, hlc: Hlc, value: V) -> Self {
        Self {
            inner: lww_write_delta(&self.inner.store, &self.inner.ctx, actor, hlc, value),
        }
    }

    /// The delta clearing the register (observed-remove: a concurrent write survives).
    pub fn clear(&self) -> Self {
        Self {
            inner: register_clear_delta(&self.inner.store),
        }
    }

    /// Joins a delta or a full state into this one.
    pub fn merge(&mut self, other: &Self) {
        self.inner.merge(&other.inner);
    }

    /// The same register with every value converted by `f`; fails on the first value `f`
    /// rejects.
    pub fn try_map<F, T, Err>(&self, mut f: F) -> Result<LwwRegister<T>, Err>
    where
        F: FnMut(&V) -> Result<T, Err>,
        T: Ord + Clone + Debug,
    {
        let mut entries = Vec::with_capacity(self.inner.store.len());
        for (dot, e) in self.inner.store.iter() {
            entries.push((
                dot,
                Stamped {
                    hlc: e.hlc,
                    value: f(&e.value)?,
                },
            ));
        }
        Ok(LwwRegister {
            inner: Causal::delta(DotFun::from_entries(entries), self.inner.ctx.clone()),
        })
    }

    /// The underlying state.
    pub fn as_causal(&self) -> &Causal<RegisterStore<V>> {
        &self.inner
    }

    pub(crate) fn from_causal(inner: Causal<RegisterStore<V>>) -> Self {
        Self { inner }
    }
}

/// A multi-value register: concurrent writes are all kept, as siblings, until a write that
/// has seen them all replaces them.
///
/// ```
/// use geostate_crdt::{ActorId, Hlc, MvRegister};
/// let (a, b) = (ActorId::new(1), ActorId::new(2));
/// let base = MvRegister::new();
/// let w1 = base.write(a, Hlc::new(1, 0), b"left".to_vec());
/// let w2 = base.write(b, Hlc::new(2, 0), b"right".to_vec());
/// let mut r = base.clone();
/// r.merge(&w1);
/// r.merge(&w2);
/// assert_eq!(r.values().count(), 2); // siblings
/// let w3 = r.write(a, Hlc::new(3, 0), b"resolved".to_vec());
/// r.merge(&w3);
/// assert_eq!(r.values().collect::<Vec<_>>(), vec![&b"resolved".to_vec()]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(bound(serialize = "V: Serialize", deserialize = "V: DeserializeOwned"))]
#[serde(transparent)]
pub struct MvRegister<V: Ord> {
    inner: Causal<RegisterStore<V>>,
}

impl<V: Ord> Default for MvRegister<V> {
    fn default() -> Self {
        Self {
            inner: Causal {
                store: DotFun::new(),
                ctx: CausalContext::new(),
            },
        }
    }
}

impl<V: Ord + Clone + Debug> MvRegister<V> {
    /// An unset register.
    pub fn new() -> Self {
        Self::default()
    }

    /// The live values (siblings), in dot order.
    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.inner.store.iter().map(|(_, e)| &e.value)
    }

    /// The live entries with their dots and timestamps, in dot order.
    pub fn siblings(&self) -> impl Iterator<Item = (Dot, &Stamped<V>)> + '_ {
        self.inner.store.iter()
    }

    /// Number of live values.
    pub fn len(&self) -> usize {
        self.inner.store.len()
    }

    /// Whether no value is live.
    pub fn is_empty(&self) -> bool {
        self.inner.store.is_empty()
    }

    /// The delta writing `value` at `hlc` on behalf of `actor`, replacing every value seen.
    pub fn write(&self, actor: ActorId, hlc: Hlc, value: V) -> Self {
        Self {
            inner: mv_write_delta(&self.inner.store, &self.inner.ctx, actor, hlc, value),
        }
    }

    /// The delta clearing the register (observed-remove: a concurrent write survives).
    pub fn clear(&self) -> Self {
        Self {
            inner: register_clear_delta(&self.inner.store),
        }
    }

    /// Joins a delta or a full state into this one.
    pub fn merge(&mut self, other: &Self) {
        self.inner.merge(&other.inner);
    }

    /// The same register with every value converted by `f`; fails on the first value `f`
    /// rejects.
    pub fn try_map<F, T, Err>(&self, mut f: F) -> Result<MvRegister<T>, Err>
    where
        F: FnMut(&V) -> Result<T, Err>,
        T: Ord + Clone + Debug,
    {
        let mut entries = Vec::with_capacity(self.inner.store.len());
        for (dot, e) in self.inner.store.iter() {
            entries.push((
                dot,
                Stamped {
                    hlc: e.hlc,
                    value: f(&e.value)?,
                },
            ));
        }
        Ok(MvRegister {
            inner: Causal::delta(DotFun::from_entries(entries), self.inner.ctx.clone()),
        })
    }

    /// The underlying state.
    pub fn as_causal(&self) -> &Causal<RegisterStore<V>> {
        &self.inner
    }

    pub(crate) fn from_causal(inner: Causal<RegisterStore<V>>) -> Self {
        Self { inner }
    }
}
