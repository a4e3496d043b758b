//! Self-describing stored values: the [`Crdt`] enum and its [`TypeTag`].

use std::fmt;

use crate::op::{MapOp, Op, RegisterOp, SetOp};
use crate::store::DotStore;
use crate::{
    ActorId, Causal, CausalContext, Error, GCounter, Hlc, LwwRegister, MvRegister, OrMap, OrSet,
    PnCounter,
};

/// The type of a stored value, carried in every envelope. The numbers are part of the storage
/// format and never change.
///
/// ```
/// use geostate_crdt::TypeTag;
/// assert_eq!(TypeTag::from_u8(3).unwrap(), TypeTag::OrSet);
/// assert!(TypeTag::from_u8(0).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum TypeTag {
    /// [`GCounter`].
    GCounter = 1,
    /// [`PnCounter`].
    PnCounter = 2,
    /// [`OrSet`] of byte strings.
    OrSet = 3,
    /// [`LwwRegister`] of byte strings.
    LwwRegister = 4,
    /// [`MvRegister`] of byte strings.
    MvRegister = 5,
    /// [`OrMap`].
    Map = 6,
}

impl TypeTag {
    /// Every tag, in numeric order.
    pub const ALL: [TypeTag; 6] = [
        TypeTag::GCounter,
        TypeTag::PnCounter,
        TypeTag::OrSet,
        TypeTag::LwwRegister,
        TypeTag::MvRegister,
        TypeTag::Map,
    ];

    /// The tag's byte in the storage format.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The tag for a byte of the storage format.
    pub fn from_u8(byte: u8) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_u8() == byte)
            .ok_or(Error::UnknownTypeTag(byte))
    }

    /// A short human-readable name.
    pub const fn name(self) -> &'static str {
        match self {
            TypeTag::GCounter => "g-counter",
            TypeTag::PnCounter => "pn-counter",
            TypeTag::OrSet => "or-set",
            TypeTag::LwwRegister => "lww-register",
            TypeTag::MvRegister => "mv-register",
            TypeTag::Map => "map",
        }
    }
}

impl fmt::Display for TypeTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Op {
    /// The type of value this operation applies to (and creates on a missing key); `None` for
    /// [`Op::Delete`], which applies to every type and creates nothing.
    pub fn type_tag(&self) -> Option<TypeTag> {
        match self {
            Op::GCounterInc(_) => Some(TypeTag::GCounter),
            Op::Counter(_) => Some(TypeTag::PnCounter),
            Op::Set(_) => Some(TypeTag::OrSet),
            Op::Lww(_) => Some(TypeTag::LwwRegister),
            Op::Mv(_) => Some(TypeTag::MvRegister),
            Op::Map(_) => Some(TypeTag::Map),
            Op::Delete => None,
        }
    }
}

/// Any stored value: one variant per CRDT type, elements and register values as bytes.
///
/// This is what stores hold and replicators ship; the typed API converts at the edge.
///
/// ```
/// use geostate_crdt::{ActorId, Crdt, CounterOp, Hlc, Op, TypeTag};
/// let a = ActorId::new(1);
/// let op = Op::from(CounterOp::inc(5));
/// let mut value = Crdt::empty(op.type_tag().unwrap());
/// let delta = value.apply(a, Hlc::new(1, 0), &op).unwrap();
/// value.merge(&delta).unwrap();
/// assert_eq!(value.type_tag(), TypeTag::PnCounter);
/// // Merging a value of another type is a typed error, not a silent overwrite.
/// assert!(value.merge(&Crdt::empty(TypeTag::OrSet)).is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Crdt {
    /// A grow-only counter.
    GCounter(GCounter),
    /// A positive-negative counter.
    PnCounter(PnCounter),
    /// An add-wins set of byte strings.
    OrSet(OrSet<Vec<u8>>),
    /// A last-writer-wins register of bytes.
    LwwRegister(LwwRegister<Vec<u8>>),
    /// A multi-value register of bytes.
    MvRegister(MvRegister<Vec<u8>>),
    /// A map of CRDTs.
    Map(OrMap),
}

impl Crdt {
    /// The empty value of type `tag`.
    pub fn empty(tag: TypeTag) -> Self {
        match tag {
            TypeTag::GCounter => Crdt::GCounter(GCounter::new()),
            TypeTag::PnCounter => Crdt::PnCounter(PnCounter::new()),
            TypeTag::OrSet => Crdt::OrSet(OrSet::new()),
            TypeTag::LwwRegister => Crdt::LwwRegister(LwwRegister::new()),
            TypeTag::MvRegister => Crdt::MvRegister(MvRegister::new()),
            TypeTag::Map => Crdt::Map(OrMap::new()),
        }
    }

    /// This value, having also seen every event of `actor` up to `through`, if it had not:
    /// `actor`'s next write then mints dot `through + 1`. `None` when the value already saw
    /// an event of `actor` at or past `through`.
    ///
    /// Only events above the highest one of `actor` already seen are added, so no live dot is
    /// removed. A store uses this with its dot floor (the highest dot of `actor` in any value
    /// it garbage-collected from the key's partition) so that a dot is never minted twice for
    /// one key, even after the key's tombstone was purged and the key written again.
    ///
    /// ```
    /// use geostate_crdt::{ActorId, CounterOp, Crdt, Dot, Hlc, Op, TypeTag};
    /// let a = ActorId::new(1);
    /// let lifted = Crdt::empty(TypeTag::PnCounter).lifted(a, 7).unwrap();
    /// assert!(lifted.is_bottom());
    /// let delta = lifted.apply(a, Hlc::new(1, 0), &Op::from(CounterOp::inc(1))).unwrap();
    /// assert!(delta.context().contains(Dot::new(a, 8)));
    /// assert!(lifted.lifted(a, 7).is_none());
    /// ```
    pub fn lifted(&self, actor: ActorId, through: u64) -> Option<Self> {
        fn lift<S: Clone>(c: &Causal<S>, actor: ActorId, through: u64) -> Causal<S> {
            let mut ctx = c.ctx.clone();
            ctx.claim_through(actor, through);
            Causal::delta(c.store.clone(), ctx)
        }
        if self.context().max(actor) >= through {
            return None;
        }
        Some(match self {
            Crdt::GCounter(v) => {
                Crdt::GCounter(GCounter::from_causal(lift(v.as_causal(), actor, through)))
            }
            Crdt::PnCounter(v) => {
                Crdt::PnCounter(PnCounter::from_causal(lift(v.as_causal(), actor, through)))
            }
            Crdt::OrSet(v) => Crdt::OrSet(OrSet::from_causal(lift(v.as_causal(), actor, through))),
            Crdt::LwwRegister(v) => Crdt::LwwRegister(LwwRegister::from_causal(lift(
                v.as_causal(),
                actor,
                through,
            ))),
            Crdt::MvRegister(v) => {
                Crdt::MvRegister(MvRegister::from_causal(lift(v.as_causal(), actor, through)))
            }
            Crdt::Map(v) => Crdt::Map(OrMap::from_causal(lift(v.as_causal(), actor, through))),
        })
    }

    /// This value's type.
    pub fn type_tag(&self) -> TypeTag {
        match self {
            Crdt::GCounter(_) => TypeTag::GCounter,
            Crdt::PnCounter(_) => TypeTag::PnCounter,
            Crdt::OrSet(_) => TypeTag::OrSet,
            Crdt::LwwRegister(_) => TypeTag::LwwRegister,
            Crdt::MvRegister(_) => TypeTag::MvRegister,
            Crdt::Map(_) => TypeTag::Map,
        }
    }

    /// Every event this value has seen.
    pub fn context(&self) -> &CausalContext {
        match self {
            Crdt::GCounter(v) => v.as_causal().context(),
            Crdt::PnCounter(v) => v.as_causal().context(),
            Crdt::OrSet(v) => v.as_causal().context(),
            Crdt::LwwRegister(v) => v.as_causal().context(),
            Crdt::MvRegister(v) => v.as_causal().context(),
            Crdt::Map(v) => v.as_causal().context(),
        }
    }

    /// Joins `other` (a delta or a full state) into `self`. Values of different types are
    /// never merged: that is [`Error::TypeMismatch`] and `self` is unchanged.
    pub fn merge(&mut self, other: &Crdt) -> Result<(), Error> {
        match (self, other) {
            (Crdt::GCounter(a), Crdt::GCounter(b)) => a.merge(b),
            (Crdt::PnCounter(a), Crdt::PnCounter(b)) => a.merge(b),
            (Crdt::OrSet(a), Crdt::OrSet(b)) => a.merge(b),
            (Crdt::LwwRegister(a), Crdt::LwwRegister(b)) => a.merge(b),
            (Crdt::MvRegister(a), Crdt::MvRegister(b)) => a.merge(b),
            (Crdt::Map(a), Crdt::Map(b)) => a.merge(b),
            (this, other) => {
                return Err(Error::TypeMismatch {
                    expected: this.type_tag(),
                    found: other.type_tag(),
                })
            }
        }
        Ok(())
    }

    /// The delta of `op` on this value, on behalf of `actor` at `hlc`. The value itself is not
    /// changed: merge the delta to apply it. An operation for another type is
    /// [`Error::TypeMismatch`].
    pub fn apply(&self, actor: ActorId, hlc: Hlc, op: &Op) -> Result<Crdt, Error> {
        let delta = match (self, op) {
            (this, Op::Delete) => this.removal_delta(),
            (Crdt::GCounter(v), Op::GCounterInc(n)) => Crdt::GCounter(v.inc(actor, *n)?),
            (Crdt::PnCounter(v), Op::Counter(c)) => {
                let (inc, dec) = c.amounts();
                Crdt::PnCounter(v.update(actor, inc, dec)?)
            }
            (Crdt::OrSet(v), Op::Set(s)) => Crdt::OrSet(match s {
                SetOp::Add(elements) => v.add_all(actor, elements.iter().cloned()),
                SetOp::Remove(elements) => v.remove_all(elements.iter()),
                SetOp::Clear => v.clear(),
            }),
            (Crdt::LwwRegister(v), Op::Lww(r)) => Crdt::LwwRegister(match r {
                RegisterOp::Write(bytes) => v.write(actor, hlc, bytes.clone()),
                RegisterOp::Clear => v.clear(),
            }),
            (Crdt::MvRegister(v), Op::Mv(r)) => Crdt::MvRegister(match r {
                RegisterOp::Write(bytes) => v.write(actor, hlc, bytes.clone()),
                RegisterOp::Clear => v.clear(),
            }),
            (Crdt::Map(v), Op::Map(m)) => Crdt::Map(v.apply(actor, hlc, m)?),
            (this, op) => {
                return Err(Error::TypeMismatch {
                    expected: op.type_tag().unwrap_or(this.type_tag()),
                    found: this.type_tag(),
                })
            }
        };
        Ok(delta)
    }

    /// The delta removing every live dot of this value (its deletion): an empty store under a
    /// context of exactly those dots.
    pub fn removal_delta(&self) -> Crdt {
        match self {
            Crdt::GCounter(v) => {
                Crdt::GCounter(GCounter::from_causal(v.as_causal().removal_delta()))
            }
            Crdt::PnCounter(v) => {
                Crdt::PnCounter(PnCounter::from_causal(v.as_causal().removal_delta()))
            }
            Crdt::OrSet(v) => Crdt::OrSet(OrSet::from_causal(v.as_causal().removal_delta())),
            Crdt::LwwRegister(v) => {
                Crdt::LwwRegister(LwwRegister::from_causal(v.as_causal().removal_delta()))
            }
            Crdt::MvRegister(v) => {
                Crdt::MvRegister(MvRegister::from_causal(v.as_causal().removal_delta()))
            }
            Crdt::Map(v) => Crdt::Map(OrMap::from_causal(v.as_causal().removal_delta())),
        }
    }

    /// Whether the value holds no live dot (never written, or deleted).
    pub fn is_bottom(&self) -> bool {
        match self {
            Crdt::GCounter(v) => v.as_causal().store().is_bottom(),
            Crdt::PnCounter(v) => v.as_causal().store().is_bottom(),
            Crdt::OrSet(v) => v.as_causal().store().is_bottom(),
            Crdt::LwwRegister(v) => v.as_causal().store().is_bottom(),
            Crdt::MvRegister(v) => v.as_causal().store().is_bottom(),
            Crdt::Map(v) => v.as_causal().store().is_bottom(),
        }
    }

    /// Convenience for a map operation.
    pub fn apply_map(&self, actor: ActorId, hlc: Hlc, op: &MapOp) -> Result<Crdt, Error> {
        self.apply(actor, hlc, &Op::Map(op.clone()))
    }

    /// Whether the value respects every structural invariant (canonical context covering every
    /// live dot; grow-only counters without decrements). Checked on every decode.
    pub fn is_well_formed(&self) -> bool {
        match self {
            Crdt::GCounter(v) => v.as_causal().is_well_formed() && v.is_grow_only(),
            Crdt::PnCounter(v) => v.as_causal().is_well_formed(),
            Crdt::OrSet(v) => v.as_causal().is_well_formed(),
            Crdt::LwwRegister(v) => v.as_causal().is_well_formed(),
            Crdt::MvRegister(v) => v.as_causal().is_well_formed(),
            Crdt::Map(v) => v.as_causal().is_well_formed(),
        }
    }
}

macro_rules! conversions {
    ($($variant:ident => $ty:ty),* $(,)?) => {$(
        impl From<$ty> for Crdt {
            fn from(value: $ty) -> Self {
                Crdt::$variant(value)
            }
        }

        impl TryFrom<Crdt> for $ty {
            type Error = Error;

            fn try_from(value: Crdt) -> Result<Self, Error> {
                match value {
                    Crdt::$variant(v) => Ok(v),
                    other => Err(Error::TypeMismatch {
                        expected: TypeTag::$variant,
                        found: other.type_tag(),
                    }),
                }
            }
        }
    )*};
}

conversions! {
    GCounter => GCounter,
    PnCounter => PnCounter,
    OrSet => OrSet<Vec<u8>>,
    LwwRegister => LwwRegister<Vec<u8>>,
    MvRegister => MvRegister<Vec<u8>>,
    Map => OrMap,
}
