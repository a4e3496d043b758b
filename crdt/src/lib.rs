//! # geostate-crdt
//!
//! The pure core of geostate: delta-state CRDTs, version vectors, hybrid logical clocks and the
//! storage envelope. No I/O, no async, no clock reads, no randomness: every input, physical
//! time included, is passed in.
//!
//! ## Tutorial
//!
//! Every CRDT is a state that can be merged with any other state of its type. A mutator never
//! changes the state it is called on; it returns a *delta*, a small state holding just the
//! change. Applying the delta locally and shipping it to another region are the same call:
//! [`merge`](PnCounter::merge).
//!
//! ```
//! use geostate_crdt::{ActorId, OrSet, PnCounter};
//!
//! let us_east = ActorId::new(1);
//! let eu_west = ActorId::new(2);
//!
//! // Two regions count visits concurrently...
//! let mut east = PnCounter::new();
//! let mut west = PnCounter::new();
//! let d_east = east.inc(us_east, 3).unwrap();
//! east.merge(&d_east);
//! let d_west = west.dec(eu_west, 1).unwrap();
//! west.merge(&d_west);
//! // ...and exchange deltas, in any order, any number of times.
//! east.merge(&d_west);
//! west.merge(&d_east);
//! west.merge(&d_east);
//! assert_eq!(east.value(), 2);
//! assert_eq!(east, west);
//!
//! // Sets are add-wins: a remove takes away only the adds it has seen.
//! let mut cart = OrSet::new();
//! cart.merge(&cart.add(us_east, "sku-1"));
//! let snapshot = cart.clone();
//! cart.merge(&cart.remove(&"sku-1"));
//! let concurrent_add = snapshot.add(eu_west, "sku-1");
//! cart.merge(&concurrent_add);
//! assert!(cart.contains(&"sku-1"));
//! ```
//!
//! Stored values are self-describing: the [`Crdt`] enum holds any type, [`Op`] describes any
//! update, and the [`envelope`] module turns a value into checksummed, versioned bytes and back,
//! with a typed [`Error`] for every way bytes can be wrong.
//!
//! ```
//! use geostate_crdt::{envelope, ActorId, Crdt, Hlc, Op, SetOp};
//!
//! let op = Op::Set(SetOp::add("sku-1"));
//! let mut cart = Crdt::empty(op.type_tag().unwrap());
//! let delta = cart.apply(ActorId::new(1), Hlc::new(1_700_000_000_000, 0), &op).unwrap();
//! cart.merge(&delta).unwrap();
//!
//! let bytes = envelope::encode(&cart, &envelope::Options::default()).unwrap();
//! assert_eq!(envelope::decode(&bytes, &envelope::Limits::default()).unwrap(), cart);
//! let mut corrupt = bytes.clone();
//! corrupt[10] ^= 0x01;
//! assert!(envelope::decode(&corrupt, &envelope::Limits::default()).is_err());
//! ```
//!
//! ## The kernel
//!
//! All types share one dot-store kernel ([`store`]): a CRDT is a [`Causal`] pair of a dot
//! store and the [`CausalContext`] of events seen. See the module docs of [`counter`],
//! [`orset`], [`register`] and [`map`] for each type's semantics, removal included.

pub mod causal;
pub mod context;
pub mod counter;
pub mod dot;
pub mod envelope;
pub mod error;
pub mod hlc;
pub mod map;
pub mod op;
pub mod orset;
pub mod record;
pub mod register;
pub mod store;
pub mod value;
pub mod vv;

mod codec;

pub use causal::Causal;
pub use context::CausalContext;
pub use counter::{CounterEntry, GCounter, PnCounter};
pub use dot::{ActorId, Dot};
pub use error::Error;
pub use hlc::{Hlc, HlcClock};
pub use map::{MapFields, OrMap};
pub use op::{CounterOp, FieldOp, MapOp, Op, RegisterOp, SetOp};
pub use orset::OrSet;
pub use register::{LwwRegister, MvRegister, Stamped};
pub use store::{DotFun, DotMap, DotSet, DotStore, Scan};
pub use value::{Crdt, TypeTag};
pub use vv::{CausalOrder, VersionVector};
