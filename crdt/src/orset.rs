//! The add-wins observed-remove set.
//!
//! An element is present while it holds a live dot. An add makes a new dot for the element and
//! overwrites the element's older dots; a remove overwrites the dots it has seen. An add
//! concurrent with a remove therefore survives it (add wins), and a remove only ever takes away
//! adds that happened before it.

use std::collections::BTreeMap;
use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::{DotMap, DotSet, DotStore};
use crate::{ActorId, Causal, CausalContext};

/// The dot store behind [`OrSet`] and the set field of a map entry.
pub type OrSetStore<E> = DotMap<E, DotSet>;

/// The delta adding every element of `elements` on behalf of `actor`.
pub(crate) fn set_add_delta<E: Ord + Clone + Debug>(
    store: &OrSetStore<E>,
    ctx: &CausalContext,
    actor: ActorId,
    elements: impl IntoIterator<Item = E>,
) -> Causal<OrSetStore<E>> {
    let mut delta_store = OrSetStore::new();
    let mut delta_ctx = CausalContext::new();
    let mut next = ctx.next_dot(actor);
    for element in elements {
        if delta_store.get(&element).is_some() {
            continue;
        }
        if let Some(old) = store.get(&element) {
            old.for_each_dot(&mut |d| delta_ctx.insert(d));
        }
        delta_ctx.insert(next);
        delta_store.insert(element, DotSet::from_dots([next]));
        next.counter = next.counter.saturating_add(1);
    }
    Causal::delta(delta_store, delta_ctx)
}

/// The delta removing every element of `elements` that is present.
pub(crate) fn set_remove_delta<'a, E: Ord + Clone + Debug + 'a>(
    store: &OrSetStore<E>,
    elements: impl IntoIterator<Item = &'a E>,
) -> Causal<OrSetStore<E>> {
    let mut delta_store = OrSetStore::new();
    let mut delta_ctx = CausalContext::new();
    for element in elements {
        if let Some(old) = store.get(element) {
            old.for_each_dot(&mut |d| delta_ctx.insert(d));
            // An empty entry names the key the removal touches (see `DotMap`).
            delta_store.insert(element.clone(), DotSet::new());
        }
    }
    Causal::delta(delta_store, delta_ctx)
}

/// An add-wins observed-remove set.
///
/// ```
/// use geostate_crdt::{ActorId, OrSet};
/// let (a, b) = (ActorId::new(1), ActorId::new(2));
/// let mut here = OrSet::new();
/// here.merge(&here.add(a, "sku-1".to_string()));
/// let mut there = here.clone();
/// // Concurrently: one side removes sku-1, the other adds it again.
/// let rm = here.remove(&"sku-1".to_string());
/// here.merge(&rm);
/// let re_add = there.add(b, "sku-1".to_string());
/// there.merge(&re_add);
/// here.merge(&re_add);
/// there.merge(&rm);
/// assert!(here.contains(&"sku-1".to_string())); // add wins
/// assert_eq!(here, there);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(bound(serialize = "E: Serialize", deserialize = "E: DeserializeOwned"))]
#[serde(transparent)]
pub struct OrSet<E: Ord> {
    inner: Causal<OrSetStore<E>>,
}

impl<E: Ord> Default for OrSet<E> {
    fn default() -> Self {
        Self {
            inner: Causal {
                store: DotMap::new(),
                ctx: CausalContext::new(),
            },
        }
    }
}

impl<E: Ord + Clone + Debug> OrSet<E> {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `element` is present.
    pub fn contains(&self, element: &E) -> bool {
        self.inner.store.get(element).is_some()
    }

    /// Present elements in order.
    pub fn iter(&self) -> impl Iterator<Item = &E> + '_ {
        self.inner.store.keys()
    }

    /// Number of present elements.
    pub fn len(&self) -> usize {
        self.inner.store.len()
    }

    /// Whether no element is present.
    pub fn is_empty(&self) -> bool {
        self.inner.store.is_empty()
    }

    /// The delta adding `element` on behalf of `actor`.
    pub fn add(&self, actor: ActorId, element: E) -> Self {
        self.add_all(actor, [element])
    }

    /// The delta adding every element of `elements` on behalf of `actor`.
    pub fn add_all(&self, actor: ActorId, elements: impl IntoIterator<Item = E>) -> Self {
        Self {
            inner: set_add_delta(&self.inner.store, &self.inner.ctx, actor, elements),
        }
    }

    /// The delta removing `element`: every add of it seen so far. Empty if it is absent.
    pub fn remove(&self, element: &E) -> Self {
        self.remove_all([element])
    }

    /// The delta removing every element of `elements` that is present.
    pub fn remove_all<'a>(&self, elements: impl IntoIterator<Item = &'a E>) -> Self
    where
        E: 'a,
    {
        Self {
            inner: set_remove_delta(&self.inner.store, elements),
        }
    }

    /// The delta removing every present element.
    pub fn clear(&self) -> Self {
        self.remove_all(self.inner.store.keys())
    }

    /// Joins a delta or a full state into this one.
    pub fn merge(&mut self, other: &Self) {
        self.inner.merge(&other.inner);
    }

    /// Present elements with the dots that keep them alive.
    pub fn entries(&self) -> impl Iterator<Item = (&E, &DotSet)> + '_ {
        self.inner.store.iter()
    }

    /// The underlying state.
    pub fn as_causal(&self) -> &Causal<OrSetStore<E>> {
        &self.inner
    }

    pub(crate) fn from_causal(inner: Causal<OrSetStore<E>>) -> Self {
        Self { inner }
    }

    /// The same set with every element converted by `f`; fails on the first element `f`
    /// rejects. Two elements converting to one would merge their dots.
    pub fn try_map<F, T, Err>(&self, mut f: F) -> Result<OrSet<T>, Err>
    where
        F: FnMut(&E) -> Result<T, Err>,
        T: Ord + Clone + Debug,
    {
        let mut entries: BTreeMap<T, DotSet> = BTreeMap::new();
        for (element, dots) in self.inner.store.iter() {
            let converted = f(element)?;
            let slot = entries.entry(converted).or_default();
            *slot = DotSet::from_dots(slot.iter().chain(dots.iter()));
        }
        Ok(OrSet {
            inner: Causal {
                store: DotMap::from_entries(entries),
                ctx: self.inner.ctx.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a removal delta names the removed element with an empty entry (a key hint
    /// for `Causal::merge`); readers must not see that entry as a present element.
    #[test]
    fn a_removal_delta_does_not_show_the_removed_element() {
        let a = ActorId::new(1);
        let mut set = OrSet::new();
        set.merge(&set.add(a, "x"));
        let removal = set.remove(&"x");
        assert!(!removal.contains(&"x"));
        assert_eq!(removal.len(), 0);
        assert!(removal.is_empty());
        assert_eq!(removal.iter().count(), 0);
        assert_eq!(removal.entries().count(), 0);
        set.merge(&removal);
        assert!(set.is_empty());
    }
}
