//! Version vectors: for each actor, how many of its events have been seen.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ActorId, Dot};

/// How two version vectors (or the histories they summarise) relate.
///
/// ```
/// use geostate_crdt::{ActorId, CausalOrder, VersionVector};
/// let (a, b) = (ActorId::new(1), ActorId::new(2));
/// let mut x = VersionVector::new();
/// x.observe(a, 2);
/// let mut y = x.clone();
/// y.observe(b, 1);
/// assert_eq!(x.causal_order(&y), CausalOrder::Before);
/// x.observe(a, 3);
/// assert_eq!(x.causal_order(&y), CausalOrder::Concurrent);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CausalOrder {
    /// Both have seen exactly the same events.
    Equal,
    /// The left side has seen a strict subset of the right side's events.
    Before,
    /// The left side has seen a strict superset of the right side's events.
    After,
    /// Each has seen an event the other has not.
    Concurrent,
}

/// A map from actor to the number of that actor's events seen (contiguously, from 1).
///
/// Canonical: actors with count zero are never stored, entries are ordered by actor, so equal
/// vectors encode to equal bytes.
///
/// ```
/// use geostate_crdt::{ActorId, Dot, VersionVector};
/// let a = ActorId::new(1);
/// let mut vv = VersionVector::new();
/// assert_eq!(vv.increment(a), Dot::new(a, 1));
/// assert!(vv.contains(Dot::new(a, 1)));
/// assert!(!vv.contains(Dot::new(a, 2)));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VersionVector {
    entries: BTreeMap<ActorId, u64>,
}

impl VersionVector {
    /// The empty vector: nothing seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many of `actor`'s events have been seen.
    pub fn get(&self, actor: ActorId) -> u64 {
        self.entries.get(&actor).copied().unwrap_or(0)
    }

    /// Whether `dot` is among the events seen.
    pub fn contains(&self, dot: Dot) -> bool {
        dot.counter != 0 && dot.counter <= self.get(dot.actor)
    }

    /// Records `actor`'s next event and returns its dot.
    ///
    /// Saturates at `u64::MAX` (2^64 events of one actor cannot happen in practice).
    pub fn increment(&mut self, actor: ActorId) -> Dot {
        let counter = self.entries.entry(actor).or_insert(0);
        *counter = counter.saturating_add(1);
        Dot::new(actor, *counter)
    }

    /// Raises `actor`'s entry to at least `counter`.
    pub fn observe(&mut self, actor: ActorId, counter: u64) {
        if counter == 0 {
            return;
        }
        let entry = self.entries.entry(actor).or_insert(0);
        if *entry < counter {
            *entry = counter;
        }
    }

    /// Pointwise maximum with `other`.
    pub fn merge(&mut self, other: &VersionVector) {
        for (&actor, &counter) in &other.entries {
            self.observe(actor, counter);
        }
    }

    /// Whether nothing has been seen.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of actors with a non-zero entry.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `(actor, count)` pairs in actor order.
    pub fn iter(&self) -> impl Iterator<Item = (ActorId, u64)> + '_ {
        self.entries.iter().map(|(&a, &c)| (a, c))
    }

    /// Total number of events covered (saturating).
    pub fn event_count(&self) -> u64 {
        self.entries
            .values()
            .fold(0u64, |acc, c| acc.saturating_add(*c))
    }

    /// Compares the sets of events the two vectors cover.
    pub fn causal_order(&self, other: &VersionVector) -> CausalOrder {
        let mut less = false;
        let mut greater = false;
        let mut left = self.entries.iter().peekable();
        let mut right = other.entries.iter().peekable();
        loop {
            let step = match (left.peek(), right.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((la, _)), Some((ra, _))) => la.cmp(ra),
            };
            match step {
                Ordering::Less => {
                    greater = true;
                    left.next();
                }
                Ordering::Greater => {
                    less = true;
                    right.next();
                }
                Ordering::Equal => {
                    if let (Some((_, lc)), Some((_, rc))) = (left.next(), right.next()) {
                        match lc.cmp(rc) {
                            Ordering::Less => less = true,
                            Ordering::Greater => greater = true,
                            Ordering::Equal => {}
                        }
                    }
                }
            }
        }
        match (less, greater) {
            (false, false) => CausalOrder::Equal,
            (true, false) => CausalOrder::Before,
            (false, true) => CausalOrder::After,
            (true, true) => CausalOrder::Concurrent,
        }
    }

    /// Whether every event of `other` is covered by `self`.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        matches!(
            self.causal_order(other),
            CausalOrder::Equal | CausalOrder::After
        )
    }

    /// Checks the canonical form (no zero entries); used after decoding untrusted bytes.
    pub(crate) fn is_canonical(&self) -> bool {
        self.entries.values().all(|&c| c != 0)
    }
}

impl FromIterator<(ActorId, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (ActorId, u64)>>(iter: I) -> Self {
        let mut vv = VersionVector::new();
        for (actor, counter) in iter {
            vv.observe(actor, counter);
        }
        vv
    }
}
