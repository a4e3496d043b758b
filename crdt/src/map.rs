//! The observed-remove map of CRDTs.
//!
//! A key holds one field of each CRDT type (counter, set, last-writer-wins register,
//! multi-value register, nested map), Riak-style, so writers that disagree on a key's type
//! never conflict: each type lives in its own field.
//!
//! Removal semantics. Removing a key overwrites every dot the remover has seen under it, in
//! every field, at every depth. Anything written concurrently with the removal (a new set
//! element, a register write, a counter update, a nested entry) survives, and nothing the
//! remover saw ever comes back, under any merge order, whether the removal arrives as a delta
//! or inside a full state: both are the same join. Counters follow the per-actor rule of
//! [`crate::counter`]: a concurrent update keeps its actor's whole running total.

use serde::{Deserialize, Serialize};

use crate::counter::{counter_delta, counter_value, CounterStore};
use crate::op::{FieldOp, MapOp, RegisterOp, SetOp};
use crate::orset::{set_add_delta, set_remove_delta, OrSetStore};
use crate::register::{
    lww_winner, lww_write_delta, mv_write_delta, register_clear_delta, RegisterStore,
};
use crate::store::{DotMap, DotStore, Scan};
use crate::{ActorId, Causal, CausalContext, Dot, Error, Hlc};

/// The dot store behind [`OrMap`] and nested maps.
pub type MapStore = DotMap<String, MapFields>;

/// The fields of one map entry: one of each CRDT type, each empty until written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MapFields {
    counter: CounterStore,
    set: OrSetStore<Vec<u8>>,
    lww: RegisterStore<Vec<u8>>,
    mv: RegisterStore<Vec<u8>>,
    map: MapStore,
}

impl MapFields {
    /// The counter field's value (zero if never written).
    pub fn counter(&self) -> i128 {
        counter_value(&self.counter)
    }

    /// The set field's elements, in order.
    pub fn set(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.set.keys().map(Vec::as_slice)
    }

    /// Whether the set field contains `element`.
    pub fn set_contains(&self, element: &[u8]) -> bool {
        self.set.get(element).is_some()
    }

    /// The last-writer-wins field's winning value.
    pub fn lww(&self) -> Option<&[u8]> {
        lww_winner(&self.lww).map(|(_, e)| e.value.as_slice())
    }

    /// The multi-value field's live values (siblings), in dot order.
    pub fn mv(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.mv.iter().map(|(_, e)| e.value.as_slice())
    }

    /// The nested map field.
    pub fn map(&self) -> &MapStore {
        &self.map
    }
}

impl DotStore for MapFields {
    fn is_bottom(&self) -> bool {
        self.counter.is_bottom()
            && self.set.is_bottom()
            && self.lww.is_bottom()
            && self.mv.is_bottom()
            && self.map.is_bottom()
    }

    fn for_each_dot(&self, f: &mut dyn FnMut(Dot)) {
        self.counter.for_each_dot(f);
        self.set.for_each_dot(f);
        self.lww.for_each_dot(f);
        self.mv.for_each_dot(f);
        self.map.for_each_dot(f);
    }

    fn join(
        &mut self,
        ctx: &CausalContext,
        other: &Self,
        other_ctx: &CausalContext,
        scan: Scan,
    ) -> usize {
        self.counter.join(ctx, &other.counter, other_ctx, scan)
            + self.set.join(ctx, &other.set, other_ctx, scan)
            + self.lww.join(ctx, &other.lww, other_ctx, scan)
            + self.mv.join(ctx, &other.mv, other_ctx, scan)
            + self.map.join(ctx, &other.map, other_ctx, scan)
    }
}

/// The delta of one field operation on `fields`.
fn field_delta(
    fields: &MapFields,
    ctx: &CausalContext,
    actor: ActorId,
    hlc: Hlc,
    op: &FieldOp,
) -> Result<Causal<MapFields>, Error> {
    let mut delta = MapFields::default();
    let delta_ctx = match op {
        FieldOp::Counter(c) => {
            let (inc, dec) = c.amounts();
            let d = counter_delta(&fields.counter, ctx, actor, inc, dec)?;
            delta.counter = d.store;
            d.ctx
        }
        FieldOp::Set(s) => {
            let d = match s {
                SetOp::Add(elements) => {
                    set_add_delta(&fields.set, ctx, actor, elements.iter().cloned())
                }
                SetOp::Remove(elements) => set_remove_delta(&fields.set, elements.iter()),
                SetOp::Clear => set_remove_delta(&fields.set, fields.set.keys()),
            };
            delta.set = d.store;
            d.ctx
        }
        FieldOp::Lww(r) => {
            let d = match r {
                RegisterOp::Write(v) => lww_write_delta(&fields.lww, ctx, actor, hlc, v.clone()),
                RegisterOp::Clear => register_clear_delta(&fields.lww),
            };
            delta.lww = d.store;
            d.ctx
        }
        FieldOp::Mv(r) => {
            let d = match r {
                RegisterOp::Write(v) => mv_write_delta(&fields.mv, ctx, actor, hlc, v.clone()),
                RegisterOp::Clear => register_clear_delta(&fields.mv),
            };
            delta.mv = d.store;
            d.ctx
        }
        FieldOp::Map(m) => {
            let d = map_delta(&fields.map, ctx, actor, hlc, m)?;
            delta.map = d.store;
            d.ctx
        }
    };
    Ok(Causal::delta(delta, delta_ctx))
}

/// The delta of one map operation on `store`.
pub(crate) fn map_delta(
    store: &MapStore,
    ctx: &CausalContext,
    actor: ActorId,
    hlc: Hlc,
    op: &MapOp,
) -> Result<Causal<MapStore>, Error> {
    match op {
        MapOp::Update { key, op } => {
            let empty = MapFields::default();
            let fields = store.get(key.as_str()).unwrap_or(&empty);
            let d = field_delta(fields, ctx, actor, hlc, op)?;
            // The entry stays even when empty: it names the key the delta touches.
            Ok(Causal::delta(
                DotMap::from_entries([(key.clone(), d.store)]),
                d.ctx,
            ))
        }
        MapOp::Remove(key) => Ok(map_remove_delta(store, [key])),
        MapOp::Clear => Ok(map_remove_delta(store, store.keys())),
    }
}

fn map_remove_delta<'a>(
    store: &MapStore,
    keys: impl IntoIterator<Item = &'a String>,
) -> Causal<MapStore> {
    let mut delta_store = MapStore::new();
    let mut delta_ctx = CausalContext::new();
    for key in keys {
        if let Some(fields) = store.get(key.as_str()) {
            fields.for_each_dot(&mut |d| delta_ctx.insert(d));
            delta_store.insert(key.clone(), MapFields::default());
        }
    }
    Causal::delta(delta_store, delta_ctx)
}

/// An observed-remove map from string keys to entries holding one field of each CRDT type.
///
/// ```
/// use geostate_crdt::{ActorId, CounterOp, FieldOp, Hlc, MapOp, OrMap, SetOp};
/// let a = ActorId::new(1);
/// let mut m = OrMap::new();
/// let d = m.apply(a, Hlc::new(1, 0), &MapOp::update("cart", FieldOp::Set(SetOp::add("sku-1")))).unwrap();
/// m.merge(&d);
/// let d = m.apply(a, Hlc::new(2, 0), &MapOp::update("visits", FieldOp::Counter(CounterOp::inc(2)))).unwrap();
/// m.merge(&d);
/// assert!(m.get("cart").unwrap().set_contains(b"sku-1"));
/// assert_eq!(m.get("visits").unwrap().counter(), 2);
/// m.merge(&m.apply(a, Hlc::new(3, 0), &MapOp::remove("cart")).unwrap());
/// assert!(m.get("cart").is_none());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrMap {
    inner: Causal<MapStore>,
}

impl OrMap {
    /// The empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The entry under `key`, if any of its fields is live.
    pub fn get(&self, key: &str) -> Option<&MapFields> {
        self.inner.store.get(key)
    }

    /// Keys with a live entry, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.inner.store.keys().map(String::as_str)
    }

    /// Number of keys with a live entry.
    pub fn len(&self) -> usize {
        self.inner.store.len()
    }

    /// Whether no key has a live entry.
    pub fn is_empty(&self) -> bool {
        self.inner.store.is_empty()
    }

    /// The delta of `op` on behalf of `actor` at `hlc` (the timestamp orders register writes).
    pub fn apply(&self, actor: ActorId, hlc: Hlc, op: &MapOp) -> Result<Self, Error> {
        let inner = map_delta(&self.inner.store, &self.inner.ctx, actor, hlc, op)?;
        Ok(Self { inner })
    }

    /// Joins a delta or a full state into this one.
    pub fn merge(&mut self, other: &Self) {
        self.inner.merge(&other.inner);
    }

    /// The underlying state.
    pub fn as_causal(&self) -> &Causal<MapStore> {
        &self.inner
    }

    pub(crate) fn from_causal(inner: Causal<MapStore>) -> Self {
        Self { inner }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::CounterOp;

    /// Regression: removal deltas carry empty entries naming the removed keys; readers must not
    /// see them, at any depth.
    #[test]
    fn a_removal_delta_does_not_show_the_removed_keys() {
        let a = ActorId::new(1);
        let hlc = Hlc::new(1, 0);
        let nested = MapOp::update(
            "outer",
            FieldOp::Map(Box::new(MapOp::update(
                "inner",
                FieldOp::Counter(CounterOp::inc(1)),
            ))),
        );
        let mut m = OrMap::new();
        m.merge(&m.apply(a, hlc, &nested).unwrap_or_default());
        let inner_removal = MapOp::update("outer", FieldOp::Map(Box::new(MapOp::remove("inner"))));
        let delta = m.apply(a, hlc, &inner_removal).unwrap_or_default();
        assert!(delta.get("outer").is_none());
        assert_eq!(delta.len(), 0);
        assert!(delta.is_empty());
        let whole = m.apply(a, hlc, &MapOp::remove("outer")).unwrap_or_default();
        assert_eq!(whole.keys().count(), 0);
        m.merge(&delta);
        assert!(m.is_empty());
    }
}
