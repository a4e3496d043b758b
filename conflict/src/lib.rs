//! # geostate-conflict
//!
//! What a read shows when regions wrote the same opaque value concurrently, and what the
//! conflict feed records about it. Pure: no I/O, no async, no clock reads, no randomness.
//!
//! CRDT types (counters, sets, maps) merge by their own rules and never conflict. Opaque
//! values are held in a multi-value register ([`MvRegister`]`<Vec<u8>>`): writes that did not
//! see each other survive side by side as *siblings*. This crate decides, per key prefix, what
//! reads show for them, and describes each conflict in a [`ConflictRecord`].
//!
//! ## Tutorial
//!
//! ### 1. Concurrent writes
//!
//! Two writes conflict when neither has seen the other: their version vectors are
//! [`CausalOrder::Concurrent`]. [`VersionVector::causal_order`] (from `geostate-crdt`,
//! re-exported here) is the test; this crate adds no second implementation of it.
//!
//! ```
//! use geostate_conflict::{ActorId, CausalOrder, VersionVector};
//!
//! let (us_east, eu_west) = (ActorId::new(1), ActorId::new(2));
//! let mut seen_by_east = VersionVector::new();
//! seen_by_east.observe(us_east, 3);
//! let mut seen_by_west = VersionVector::new();
//! seen_by_west.observe(us_east, 2);
//! seen_by_west.observe(eu_west, 1);
//! assert_eq!(seen_by_east.causal_order(&seen_by_west), CausalOrder::Concurrent);
//! ```
//!
//! A multi-value register applies this rule to every write: a write replaces exactly the
//! values it has seen. So a key is in conflict exactly when its register holds two or more
//! siblings.
//!
//! ```
//! use geostate_conflict::{ActorId, Hlc, MvRegister};
//!
//! let base = MvRegister::new();
//! let east = base.write(ActorId::new(1), Hlc::new(1_000, 0), b"east".to_vec());
//! let west = base.write(ActorId::new(2), Hlc::new(1_005, 0), b"west".to_vec());
//! let mut register = base.clone();
//! register.merge(&west);
//! register.merge(&east);
//! assert_eq!(register.len(), 2); // neither write saw the other
//! ```
//!
//! ### 2. Resolving: last writer wins by default
//!
//! [`resolve`](fn@resolve) asks the [`ResolverRegistry`] for the key's [`Resolver`]. The
//! default, [`LwwResolver`], shows the sibling with the greatest `(HLC, actor, dot counter)`:
//! the order of geostate's LWW register, so every region shows the same value. A conflict also
//! yields a record for the conflict feed; a single write does not.
//!
//! ```
//! use geostate_conflict::{resolve, ActorId, Hlc, MvRegister, ResolvedValue, ResolverRegistry};
//! # let base = MvRegister::new();
//! # let mut register = base.write(ActorId::new(1), Hlc::new(1_000, 0), b"east".to_vec());
//! # register.merge(&base.write(ActorId::new(2), Hlc::new(1_005, 0), b"west".to_vec()));
//! let registry = ResolverRegistry::new();
//! let resolved = resolve(&registry, "profile:7", &register);
//! assert_eq!(resolved.value, ResolvedValue::One(b"west".to_vec()));
//! assert!(resolved.record.is_some());
//! ```
//!
//! ### 3. A resolver per key prefix
//!
//! Register [`KeepSiblings`] where the application resolves on read, or a [`FnResolver`]
//! around a function of your own. The longest registered prefix of a key chooses.
//!
//! A custom function must be deterministic: a pure function of the key and the siblings, which
//! it always receives sorted by dot (never in arrival order), so every region computes the
//! same value. It may merge the siblings rather than pick one.
//!
//! ```
//! use std::sync::Arc;
//! use geostate_conflict::{
//!     resolve, ActorId, FnResolver, Hlc, KeepSiblings, MvRegister, ResolvedValue,
//!     ResolverRegistry, Sibling,
//! };
//! # let base = MvRegister::new();
//! # let mut register = base.write(ActorId::new(1), Hlc::new(1_000, 0), b"east".to_vec());
//! # register.merge(&base.write(ActorId::new(2), Hlc::new(1_005, 0), b"west".to_vec()));
//!
//! let mut registry = ResolverRegistry::new();
//! registry.register("doc:", Arc::new(KeepSiblings))?;
//! registry.register(
//!     "log:",
//!     Arc::new(FnResolver::new("join-lines", |_key: &str, siblings: &[Sibling<'_>]| {
//!         siblings.iter().map(|s| s.value).collect::<Vec<_>>().join(&b'\n')
//!     })),
//! )?;
//!
//! assert_eq!(
//!     resolve(&registry, "doc:1", &register).value,
//!     ResolvedValue::Siblings(vec![b"east".to_vec(), b"west".to_vec()])
//! );
//! assert_eq!(
//!     resolve(&registry, "log:1", &register).value,
//!     ResolvedValue::One(b"east\nwest".to_vec())
//! );
//! # Ok::<(), geostate_conflict::Error>(())
//! ```
//!
//! ### 4. Recording conflicts
//!
//! Each conflict comes with a [`ConflictRecord`]: the key, every sibling's dot, timestamp,
//! length and [`value_digest`], the resolver's name and its decision. It is serializable
//! (serde), to be appended to the conflict feed that operators read and counted in metrics.
//!
//! ```
//! use geostate_conflict::{resolve, value_digest, ActorId, Hlc, MvRegister, RecordedResolution,
//!     ResolverRegistry};
//! # let base = MvRegister::new();
//! # let mut register = base.write(ActorId::new(1), Hlc::new(1_000, 0), b"east".to_vec());
//! # register.merge(&base.write(ActorId::new(2), Hlc::new(1_005, 0), b"west".to_vec()));
//! let record = resolve(&ResolverRegistry::new(), "profile:7", &register).record.unwrap();
//! assert_eq!(record.resolver, "lww");
//! assert_eq!(record.siblings[0].dot.actor, ActorId::new(1));
//! assert_eq!(record.siblings[1].hlc, Hlc::new(1_005, 0));
//! assert_eq!(
//!     record.resolution,
//!     RecordedResolution::Chosen { value_len: 4, value_digest: value_digest(b"west") }
//! );
//! ```
//!
//! ## Guarantees
//!
//! - Deterministic: the result depends only on the registry, the key and the set of siblings,
//!   never on the order in which writes arrived ([`resolve_siblings`] sorts and deduplicates
//!   first). Every region holding the same registry and state shows the same value.
//! - Infallible: resolving never fails. Only configuring a registry can ([`Error`]).
//! - A record exactly when there are two or more siblings.

pub mod error;
pub mod record;
pub mod registry;
pub mod resolve;
pub mod resolver;

pub use error::Error;
pub use geostate_crdt::{ActorId, CausalOrder, Dot, Hlc, MvRegister, Stamped, VersionVector};
pub use record::{value_digest, ConflictRecord, RecordedResolution, SiblingRecord};
pub use registry::ResolverRegistry;
pub use resolve::{resolve, resolve_siblings, Resolved, ResolvedValue};
pub use resolver::{
    FnResolver, KeepSiblings, LwwResolver, Resolution, Resolver, SharedResolver, Sibling,
};
