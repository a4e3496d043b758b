#![doc = include_str!("../../README.md")]

pub use geostate_backends as backends;
pub use geostate_conflict as conflict;
pub use geostate_crdt as crdt;
pub use geostate_regions as regions;

pub mod open;

pub use open::{open_region, open_store};

pub use geostate_backends::{
    AnyStore, BackendError, Expect, Key, Layout, MemoryBackend, StateBackend, Stored,
};
pub use geostate_conflict::{ConflictRecord, ResolvedValue, Resolver, ResolverRegistry, Sibling};
pub use geostate_crdt::{
    envelope, ActorId, CausalContext, CausalOrder, CounterOp, Crdt, Dot, FieldOp, GCounter, Hlc,
    HlcClock, LwwRegister, MapFields, MapOp, MvRegister, Op, OrMap, OrSet, PnCounter, RegisterOp,
    SetOp, Stamped, TypeTag, VersionVector,
};
pub use geostate_regions::{
    CasOutcome, Clock, FromCrdt, ManualClock, PostgresStoreConfig, RedisStoreConfig, Region,
    RegionBuilder, RegionConfig, RegionError, RegionId, StoreConfig, SystemClock, WriteReceipt,
};
