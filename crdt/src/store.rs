//! The dot-store kernel (Almeida, Shoker, Baquero, "Delta state replicated data types", 2018).
//!
//! Every CRDT in this crate is a pair `(store, context)`: a dot store says which events are
//! live and what they carry, the [`CausalContext`] says which events have been seen. An event
//! seen by one side and absent from its store has been removed (overwritten, deleted); the join
//! therefore keeps a dot when both sides hold it, or when one side holds it and the other has
//! never seen it. Three stores compose everything:
//!
//! - [`DotSet`]: a set of live dots (the presence of an OR-set element),
//! - [`DotFun`]: a map from dot to an immutable value (counters, registers),
//! - [`DotMap`]: a map from key to a nested dot store (OR-sets, maps of CRDTs).
//!
//! Joins run in place and report how many of the receiving side's dots the other side removed;
//! [`crate::Causal::merge`] uses that count to visit only the keys a small delta touches.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use serde::{Deserialize, Serialize};

use crate::{CausalContext, Dot};

/// Which keys of a [`DotMap`] a join must visit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// Only keys present in the other side's store (a delta names every key it touches).
    Touched,
    /// Every key of both sides (a full-state merge).
    All,
}

/// A store of dots under a causal context; see the [module docs](self).
///
/// To ensure correctness, implementations must:
/// - make `join` the least upper bound of `(self, ctx)` and `(other, other_ctx)` as far as the
///   store goes, whatever the order of calls (commutative, associative, idempotent);
/// - drop entries that become empty, so equal states have one representation;
/// - with [`Scan::Touched`], leave every key absent from `other` untouched.
pub trait DotStore: Clone + Default + PartialEq + Debug {
    /// Whether no dot is live (the bottom element).
    fn is_bottom(&self) -> bool;

    /// Calls `f` with every live dot.
    fn for_each_dot(&self, f: &mut dyn FnMut(Dot));

    /// Joins `(other, other_ctx)` into `(self, ctx)`, store part only: the caller unites the
    /// contexts afterwards. Returns how many of `self`'s dots were removed because `other_ctx`
    /// had seen them and `other` no longer holds them.
    fn join(
        &mut self,
        ctx: &CausalContext,
        other: &Self,
        other_ctx: &CausalContext,
        scan: Scan,
    ) -> usize;

    /// Checks that every live dot is covered by `ctx`; used after decoding untrusted bytes.
    fn dots_covered_by(&self, ctx: &CausalContext) -> bool {
        let mut ok = true;
        self.for_each_dot(&mut |d| ok &= ctx.contains(d));
        ok
    }

    /// Number of live dots.
    fn dot_count(&self) -> usize {
        let mut n = 0;
        self.for_each_dot(&mut |_| n += 1);
        n
    }
}

/// A set of live dots.
///
/// ```
/// use geostate_crdt::{ActorId, CausalContext, Dot, DotSet, DotStore, Scan};
/// let d1 = Dot::new(ActorId::new(1), 1);
/// let mut left = DotSet::from_dots([d1]);
/// let left_ctx = CausalContext::from_dots([d1]);
/// // The right side saw d1 and no longer holds it: it was removed there.
/// let removed = left.join(&left_ctx, &DotSet::new(), &CausalContext::from_dots([d1]), Scan::All);
/// assert_eq!(removed, 1);
/// assert!(left.is_bottom());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DotSet {
    dots: BTreeSet<Dot>,
}

impl DotSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set holding exactly `dots`.
    pub fn from_dots(dots: impl IntoIterator<Item = Dot>) -> Self {
        Self {
            dots: dots.into_iter().collect(),
        }
    }

    /// Whether `dot` is live.
    pub fn contains(&self, dot: Dot) -> bool {
        self.dots.contains(&dot)
    }

    /// Live dots in order.
    pub fn iter(&self) -> impl Iterator<Item = Dot> + '_ {
        self.dots.iter().copied()
    }

    /// Number of live dots.
    pub fn len(&self) -> usize {
        self.dots.len()
    }

    /// Whether no dot is live.
    pub fn is_empty(&self) -> bool {
        self.dots.is_empty()
    }
}

impl DotStore for DotSet {
    fn is_bottom(&self) -> bool {
        self.dots.is_empty()
    }

    fn for_each_dot(&self, f: &mut dyn FnMut(Dot)) {
        self.dots.iter().for_each(|&d| f(d));
    }

    fn join(
        &mut self,
        ctx: &CausalContext,
        other: &Self,
        other_ctx: &CausalContext,
        _scan: Scan,
    ) -> usize {
        let before = self.dots.len();
        self.dots
            .retain(|d| other.dots.contains(d) || !other_ctx.contains(*d));
        let removed = before - self.dots.len();
        for &d in &other.dots {
            if !ctx.contains(d) {
                self.dots.insert(d);
            }
        }
        removed
    }
}

/// A map from live dot to the immutable value written with it.
///
/// A dot's value never changes after it is made, so two replicas holding the same dot hold the
/// same value; should decoded input disagree, the join keeps the greater value so every merge
/// order still ends in the same state.
///
/// ```
/// use geostate_crdt::{ActorId, CausalContext, Dot, DotFun, DotStore, Scan};
/// let d = Dot::new(ActorId::new(1), 1);
/// let mut mine = DotFun::<u64>::new();
/// let theirs = DotFun::from_entries([(d, 10)]);
/// mine.join(&CausalContext::new(), &theirs, &CausalContext::from_dots([d]), Scan::All);
/// assert_eq!(mine.get(d), Some(&10));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DotFun<V: Ord> {
    entries: BTreeMap<Dot, V>,
}

impl<V: Ord> Default for DotFun<V> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }
}

impl<V: Ord> DotFun<V> {
    /// The empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// A map holding exactly `entries`.
    pub fn from_entries(entries: impl IntoIterator<Item = (Dot, V)>) -> Self {
        Self {
            entries: entries.into_iter().collect(),
        }
    }

    /// The value written with `dot`, if it is live.
    pub fn get(&self, dot: Dot) -> Option<&V> {
        self.entries.get(&dot)
    }

    /// Live `(dot, value)` pairs in dot order.
    pub fn iter(&self) -> impl Iterator<Item = (Dot, &V)> + '_ {
        self.entries.iter().map(|(&d, v)| (d, v))
    }

    /// Number of live dots.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no dot is live.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<V: Clone + Ord + Debug> DotStore for DotFun<V> {
    fn is_bottom(&self) -> bool {
        self.entries.is_empty()
    }

    fn for_each_dot(&self, f: &mut dyn FnMut(Dot)) {
        self.entries.keys().for_each(|&d| f(d));
    }

    fn join(
        &mut self,
        ctx: &CausalContext,
        other: &Self,
        other_ctx: &CausalContext,
        _scan: Scan,
    ) -> usize {
        let before = self.entries.len();
        self.entries
            .retain(|d, _| other.entries.contains_key(d) || !other_ctx.contains(*d));
        let removed = before - self.entries.len();
        for (&d, v) in &other.entries {
            match self.entries.get_mut(&d) {
                Some(mine) => {
                    if *v > *mine {
                        *mine = v.clone();
                    }
                }
                None => {
                    if !ctx.contains(d) {
                        self.entries.insert(d, v.clone());
                    }
                }
            }
        }
        removed
    }
}

/// A map from key to a nested dot store; a key is present while its store holds a live dot.
///
/// A delta may carry a key with an empty store: that names the key it removed dots from, so
/// that applying the delta visits only that key. Joined states never keep empty entries.
///
/// ```
/// use geostate_crdt::{ActorId, CausalContext, Dot, DotMap, DotSet, DotStore, Scan};
/// let d = Dot::new(ActorId::new(1), 1);
/// let mut set = DotMap::<String, DotSet>::new();
/// let add = DotMap::from_entries([("x".to_string(), DotSet::from_dots([d]))]);
/// set.join(&CausalContext::new(), &add, &CausalContext::from_dots([d]), Scan::Touched);
/// assert!(set.get("x").is_some());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DotMap<K: Ord, S> {
    entries: BTreeMap<K, S>,
}

impl<K: Ord, S> Default for DotMap<K, S> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }
}

impl<K: Ord, S> DotMap<K, S> {
    /// The empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// A map holding exactly `entries`.
    pub fn from_entries(entries: impl IntoIterator<Item = (K, S)>) -> Self {
        Self {
            entries: entries.into_iter().collect(),
        }
    }

    pub(crate) fn insert(&mut self, key: K, store: S) {
        self.entries.insert(key, store);
    }

    /// Every entry, empty ones (removal hints) included: the structure as encoded.
    pub(crate) fn raw_entries(&self) -> impl Iterator<Item = (&K, &S)> + '_ {
        self.entries.iter()
    }
}

/// Reads see live entries only: an entry whose store holds no dot (a removal delta's key hint)
/// is not there as far as any reader is concerned.
impl<K: Ord, S: DotStore> DotMap<K, S> {
    /// The nested store under `key`, if it holds a live dot.
    pub fn get<Q>(&self, key: &Q) -> Option<&S>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.entries.get(key).filter(|s| !s.is_bottom())
    }

    /// `(key, store)` pairs with a live dot, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &S)> + '_ {
        self.entries.iter().filter(|(_, s)| !s.is_bottom())
    }

    /// Keys with a live dot, in order.
    pub fn keys(&self) -> impl Iterator<Item = &K> + '_ {
        self.iter().map(|(k, _)| k)
    }

    /// Number of keys with a live dot.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether no key holds a live dot.
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }
}

impl<K: Ord + Clone + Debug, S: DotStore> DotStore for DotMap<K, S> {
    fn is_bottom(&self) -> bool {
        self.entries.values().all(DotStore::is_bottom)
    }

    fn for_each_dot(&self, f: &mut dyn FnMut(Dot)) {
        for store in self.entries.values() {
            store.for_each_dot(f);
        }
    }

    fn join(
        &mut self,
        ctx: &CausalContext,
        other: &Self,
        other_ctx: &CausalContext,
        scan: Scan,
    ) -> usize {
        let mut removed = 0;
        for (key, theirs) in &other.entries {
            // An empty entry is a removal hint for the whole key: what it removes lies anywhere
            // below, so that subtree is joined in full.
            let sub_scan = if theirs.is_bottom() { Scan::All } else { scan };
            match self.entries.get_mut(key) {
                Some(mine) => {
                    removed += mine.join(ctx, theirs, other_ctx, sub_scan);
                    if mine.is_bottom() {
                        self.entries.remove(key);
                    }
                }
                None => {
                    let mut mine = S::default();
                    mine.join(ctx, theirs, other_ctx, sub_scan);
                    if !mine.is_bottom() {
                        self.entries.insert(key.clone(), mine);
                    }
                }
            }
        }
        if scan == Scan::All {
            let bottom = S::default();
            self.entries.retain(|key, mine| {
                if other.entries.contains_key(key) {
                    return true;
                }
                removed += mine.join(ctx, &bottom, other_ctx, scan);
                !mine.is_bottom()
            });
        }
        removed
    }
}
