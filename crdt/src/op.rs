//! Operations: what a caller asks to do to a value. Applying an operation to a state yields a
//! delta; the delta, not the operation, is what gets merged and shipped.

/// An update of a counter.
///
/// ```
/// use geostate_crdt::CounterOp;
/// assert_eq!(CounterOp::inc(2), CounterOp::Inc(2));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CounterOp {
    /// Add `n`.
    Inc(u64),
    /// Subtract `n`.
    Dec(u64),
}

impl CounterOp {
    /// Add `n`.
    pub fn inc(n: u64) -> Self {
        Self::Inc(n)
    }

    /// Subtract `n`.
    pub fn dec(n: u64) -> Self {
        Self::Dec(n)
    }

    pub(crate) fn amounts(&self) -> (u64, u64) {
        match *self {
            Self::Inc(n) => (n, 0),
            Self::Dec(n) => (0, n),
        }
    }
}

/// An update of an observed-remove set of byte strings.
///
/// ```
/// use geostate_crdt::SetOp;
/// assert_eq!(SetOp::add("sku-1"), SetOp::Add(vec![b"sku-1".to_vec()]));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SetOp {
    /// Add every element.
    Add(Vec<Vec<u8>>),
    /// Remove every element (the adds of it seen so far).
    Remove(Vec<Vec<u8>>),
    /// Remove every element present.
    Clear,
}

impl SetOp {
    /// Add one element.
    pub fn add(element: impl Into<Vec<u8>>) -> Self {
        Self::Add(vec![element.into()])
    }

    /// Remove one element.
    pub fn remove(element: impl Into<Vec<u8>>) -> Self {
        Self::Remove(vec![element.into()])
    }
}

/// An update of a register (last-writer-wins or multi-value).
///
/// ```
/// use geostate_crdt::RegisterOp;
/// assert_eq!(RegisterOp::write("v"), RegisterOp::Write(b"v".to_vec()));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegisterOp {
    /// Write a value.
    Write(Vec<u8>),
    /// Remove every value seen.
    Clear,
}

impl RegisterOp {
    /// Write `value`.
    pub fn write(value: impl Into<Vec<u8>>) -> Self {
        Self::Write(value.into())
    }
}

/// An update of one field of a map entry. A map key holds one field of each type, so a
/// counter and a set under the same key never conflict.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FieldOp {
    /// The entry's counter.
    Counter(CounterOp),
    /// The entry's set.
    Set(SetOp),
    /// The entry's last-writer-wins register.
    Lww(RegisterOp),
    /// The entry's multi-value register.
    Mv(RegisterOp),
    /// The entry's nested map.
    Map(Box<MapOp>),
}

/// An update of an observed-remove map.
///
/// ```
/// use geostate_crdt::{CounterOp, FieldOp, MapOp};
/// let op = MapOp::update("visits", FieldOp::Counter(CounterOp::inc(1)));
/// assert!(matches!(op, MapOp::Update { .. }));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapOp {
    /// Update a field of the entry under `key`, creating the entry if needed.
    Update {
        /// The entry's key.
        key: String,
        /// What to do to it.
        op: FieldOp,
    },
    /// Remove the entry under `key`: every field's updates seen so far.
    Remove(String),
    /// Remove every entry present.
    Clear,
}

impl MapOp {
    /// Update a field of the entry under `key`.
    pub fn update(key: impl Into<String>, op: FieldOp) -> Self {
        Self::Update {
            key: key.into(),
            op,
        }
    }

    /// Remove the entry under `key`.
    pub fn remove(key: impl Into<String>) -> Self {
        Self::Remove(key.into())
    }
}

/// Any operation on a stored value; see [`crate::Crdt::apply`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// Increment a grow-only counter.
    GCounterInc(u64),
    /// Update a positive-negative counter.
    Counter(CounterOp),
    /// Update an observed-remove set.
    Set(SetOp),
    /// Update a last-writer-wins register.
    Lww(RegisterOp),
    /// Update a multi-value register.
    Mv(RegisterOp),
    /// Update an observed-remove map.
    Map(MapOp),
    /// Remove everything the value holds that has been seen, whatever its type: the key's
    /// deletion. The causal context stays, so a delayed delta of a removed write cannot bring
    /// it back, while a write concurrent with the deletion survives it.
    Delete,
}

impl From<CounterOp> for Op {
    fn from(op: CounterOp) -> Self {
        Op::Counter(op)
    }
}

impl From<SetOp> for Op {
    fn from(op: SetOp) -> Self {
        Op::Set(op)
    }
}

impl From<MapOp> for Op {
    fn from(op: MapOp) -> Self {
        Op::Map(op)
    }
}
