//! Causal contexts: the set of events a replica has seen, including non-contiguous ones.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::{ActorId, Dot, VersionVector};

/// The set of dots a state has seen: a version vector for the contiguous prefix of each actor's
/// events plus a "dot cloud" of events seen out of order.
///
/// Canonical: a cloud dot is never covered by the vector and never directly follows it (such a
/// dot is folded into the vector at once), so equal sets of dots have exactly one representation
/// and encode to equal bytes.
///
/// ```
/// use geostate_crdt::{ActorId, CausalContext, Dot};
/// let a = ActorId::new(1);
/// let mut cc = CausalContext::new();
/// cc.insert(Dot::new(a, 2)); // out of order: kept in the cloud
/// assert!(!cc.contains(Dot::new(a, 1)));
/// cc.insert(Dot::new(a, 1)); // the gap closes: both fold into the vector
/// assert_eq!(cc.version_vector().get(a), 2);
/// assert_eq!(cc.cloud_len(), 0);
/// assert_eq!(cc.next_dot(a), Dot::new(a, 3));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CausalContext {
    vv: VersionVector,
    cloud: BTreeSet<Dot>,
}

impl CausalContext {
    /// The empty context: nothing seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// A context holding exactly the given dots.
    pub fn from_dots(dots: impl IntoIterator<Item = Dot>) -> Self {
        let mut cc = Self::new();
        for dot in dots {
            cc.insert(dot);
        }
        cc
    }

    /// Whether `dot` has been seen.
    pub fn contains(&self, dot: Dot) -> bool {
        self.vv.contains(dot) || self.cloud.contains(&dot)
    }

    /// The contiguous prefix of every actor's events.
    pub fn version_vector(&self) -> &VersionVector {
        &self.vv
    }

    /// Number of dots seen out of order (not yet folded into the vector).
    pub fn cloud_len(&self) -> usize {
        self.cloud.len()
    }

    /// Dots seen out of order, in order.
    pub fn cloud(&self) -> impl Iterator<Item = Dot> + '_ {
        self.cloud.iter().copied()
    }

    /// Whether nothing has been seen.
    pub fn is_empty(&self) -> bool {
        self.vv.is_empty() && self.cloud.is_empty()
    }

    /// The highest counter of `actor` seen, contiguous or not.
    pub fn max(&self, actor: ActorId) -> u64 {
        let upper = Dot::new(actor, u64::MAX);
        let lower = Dot::new(actor, 0);
        let cloud_max = self
            .cloud
            .range(lower..=upper)
            .next_back()
            .map_or(0, |d| d.counter);
        cloud_max.max(self.vv.get(actor))
    }

    /// The highest counter seen of every actor (contiguous or not): the smallest version
    /// vector at or above this context.
    ///
    /// ```
    /// use geostate_crdt::{ActorId, CausalContext, Dot};
    /// let a = ActorId::new(1);
    /// let cc = CausalContext::from_dots([Dot::new(a, 1), Dot::new(a, 5)]);
    /// assert_eq!(cc.maxima().get(a), 5);
    /// ```
    pub fn maxima(&self) -> VersionVector {
        let mut vv = self.vv.clone();
        for dot in &self.cloud {
            vv.observe(dot.actor, dot.counter);
        }
        vv
    }

    /// Marks every event of `actor` above the highest one seen, up to `through`, as seen.
    /// Constant time when `actor`'s events seen so far are contiguous (the usual case);
    /// otherwise each added event is inserted on its own.
    ///
    /// ```
    /// use geostate_crdt::{ActorId, CausalContext, Dot};
    /// let a = ActorId::new(1);
    /// let mut cc = CausalContext::from_dots([Dot::new(a, 1)]);
    /// cc.claim_through(a, 3);
    /// assert_eq!(cc.next_dot(a), Dot::new(a, 4));
    /// assert_eq!(cc.cloud_len(), 0);
    /// ```
    pub fn claim_through(&mut self, actor: ActorId, through: u64) {
        let max = self.max(actor);
        if max >= through {
            return;
        }
        if self.vv.get(actor) == max {
            self.vv.observe(actor, through);
        } else {
            for counter in max + 1..=through {
                self.insert(Dot::new(actor, counter));
            }
        }
    }

    /// The dot `actor` should use for its next event.
    pub fn next_dot(&self, actor: ActorId) -> Dot {
        Dot::new(actor, self.max(actor).saturating_add(1))
    }

    /// Adds one dot, folding it (and any cloud dots it makes contiguous) into the vector.
    pub fn insert(&mut self, dot: Dot) {
        if dot.counter == 0 || self.contains(dot) {
            return;
        }
        if dot.counter == self.vv.get(dot.actor) + 1 {
            self.vv.observe(dot.actor, dot.counter);
            self.fold_actor(dot.actor);
        } else {
            self.cloud.insert(dot);
        }
    }

    /// Adds every dot of `other`.
    ///
    /// Costs O(|other| log |self|): only actors whose contiguous prefix advanced are folded, so
    /// a long run of deltas merged out of order stays linear overall.
    pub fn union(&mut self, other: &CausalContext) {
        let had_cloud = !self.cloud.is_empty();
        let mut advanced: Vec<ActorId> = Vec::new();
        for (actor, counter) in other.vv.iter() {
            if counter > self.vv.get(actor) {
                self.vv.observe(actor, counter);
                advanced.push(actor);
            }
        }
        // `other.cloud` is ordered, so a run of dots that extends the vector folds in as it
        // comes, and a dot kept in the cloud here can never be made contiguous by a later one.
        for &dot in &other.cloud {
            let seen = self.vv.get(dot.actor);
            if dot.counter <= seen {
                continue;
            }
            if dot.counter == seen + 1 {
                self.vv.observe(dot.actor, dot.counter);
                if advanced.last() != Some(&dot.actor) {
                    advanced.push(dot.actor);
                }
            } else {
                self.cloud.insert(dot);
            }
        }
        // Dots already in our cloud may now be covered by, or contiguous with, an advanced
        // actor's prefix.
        if had_cloud {
            for actor in advanced {
                self.settle_actor(actor);
            }
        }
    }

    /// Drops `actor`'s cloud dots covered by the vector and folds in those that follow it.
    fn settle_actor(&mut self, actor: ActorId) {
        let seen = self.vv.get(actor);
        let covered: Vec<Dot> = self
            .cloud
            .range(Dot::new(actor, 0)..=Dot::new(actor, seen))
            .copied()
            .collect();
        for dot in covered {
            self.cloud.remove(&dot);
        }
        self.fold_actor(actor);
    }

    /// Number of dots covered (saturating): the vector's events plus the cloud.
    pub fn dot_count(&self) -> u64 {
        self.vv
            .event_count()
            .saturating_add(self.cloud.len() as u64)
    }

    /// Every dot covered, in order. Only sensible for small contexts (deltas).
    pub fn dots(&self) -> impl Iterator<Item = Dot> + '_ {
        self.vv
            .iter()
            .flat_map(|(actor, n)| (1..=n).map(move |c| Dot::new(actor, c)))
            .chain(self.cloud.iter().copied())
    }

    /// Folds `actor`'s cloud dots that directly follow the vector into it.
    fn fold_actor(&mut self, actor: ActorId) {
        loop {
            let next = Dot::new(actor, self.vv.get(actor).saturating_add(1));
            if !self.cloud.remove(&next) {
                break;
            }
            self.vv.observe(actor, next.counter);
        }
    }

    /// Checks the canonical form; used after decoding untrusted bytes.
    pub(crate) fn is_canonical(&self) -> bool {
        self.vv.is_canonical()
            && self
                .cloud
                .iter()
                .all(|d| d.counter > self.vv.get(d.actor).saturating_add(1))
    }
}
