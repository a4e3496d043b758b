//! `Causal<S>`: a dot store under its causal context, the shape of every CRDT and every delta.

use serde::{Deserialize, Serialize};

use crate::store::{DotStore, Scan};
use crate::{CausalContext, Dot};

/// Above this many dots in the other side's context a merge visits every key (a full-state
/// merge); at or below it, only the keys the other side names (a delta) unless that misses a
/// removed dot.
const DELTA_CONTEXT_DOTS_MAX: u64 = 1024;

/// A dot store together with the causal context of everything it has seen.
///
/// Every CRDT of this crate wraps one, and so does every delta: a mutator returns a small
/// `Causal` holding only the new dots and the dots it overwrote, and applying that delta is the
/// same [`merge`](Causal::merge) that joins two full states.
///
/// ```
/// use geostate_crdt::{ActorId, Causal, CausalContext, Dot, DotSet};
/// let d = Dot::new(ActorId::new(1), 1);
/// let mut a = Causal::<DotSet>::default();
/// let b = Causal::from_parts(DotSet::from_dots([d]), CausalContext::from_dots([d])).unwrap();
/// a.merge(&b);
/// assert_eq!(a, b);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Causal<S> {
    pub(crate) store: S,
    pub(crate) ctx: CausalContext,
}

impl<S: DotStore> Causal<S> {
    /// Builds a state from its parts, checking that the context is canonical and covers every
    /// live dot. Returns `None` otherwise.
    pub fn from_parts(store: S, ctx: CausalContext) -> Option<Self> {
        let state = Self { store, ctx };
        state.is_well_formed().then_some(state)
    }

    /// The dot store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The causal context: every event this state has seen.
    pub fn context(&self) -> &CausalContext {
        &self.ctx
    }

    /// Whether this state holds no live dot and has seen nothing.
    pub fn is_empty(&self) -> bool {
        self.store.is_bottom() && self.ctx.is_empty()
    }

    /// Joins `other` (a full state or a delta) into `self`: the least upper bound of the two.
    ///
    /// Commutative, associative and idempotent, so deltas may arrive in any order, any number of
    /// times.
    pub fn merge(&mut self, other: &Self) {
        match self.removal_candidates(other) {
            Some(expected) => {
                let removed = self
                    .store
                    .join(&self.ctx, &other.store, &other.ctx, Scan::Touched);
                if removed < expected {
                    self.store
                        .join(&self.ctx, &other.store, &other.ctx, Scan::All);
                }
            }
            None => {
                self.store
                    .join(&self.ctx, &other.store, &other.ctx, Scan::All);
            }
        }
        self.ctx.union(&other.ctx);
    }

    /// For a small `other`, the number of dots it may remove from `self`: dots `other` has seen
    /// but no longer holds, and that `self` has seen. `None` when `other` is too large to count
    /// (a full state): then every key is visited.
    fn removal_candidates(&self, other: &Self) -> Option<usize> {
        if other.ctx.dot_count() > DELTA_CONTEXT_DOTS_MAX {
            return None;
        }
        let mut live: Vec<Dot> = Vec::new();
        other.store.for_each_dot(&mut |d| live.push(d));
        live.sort_unstable();
        Some(
            other
                .ctx
                .dots()
                .filter(|d| live.binary_search(d).is_err() && self.ctx.contains(*d))
                .count(),
        )
    }

    /// The delta removing every live dot: an empty store under a context of exactly those dots.
    pub fn removal_delta(&self) -> Self {
        let mut ctx = CausalContext::new();
        self.store.for_each_dot(&mut |d| ctx.insert(d));
        Self {
            store: S::default(),
            ctx,
        }
    }

    /// The structural invariants every state keeps; checked after decoding untrusted bytes.
    pub(crate) fn is_well_formed(&self) -> bool {
        self.ctx.is_canonical() && self.store.dots_covered_by(&self.ctx)
    }
}

impl<S> Causal<S> {
    /// A delta from its parts; mutators build exactly what they need, so no check is made.
    pub(crate) fn delta(store: S, ctx: CausalContext) -> Self {
        Self { store, ctx }
    }
}
