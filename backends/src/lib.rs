//! # geostate-backends
//!
//! The store contract of a geostate region and the stores that keep it.
//!
//! A region's store holds, per key, a CRDT value (see `geostate-crdt`) and a region-local
//! version; per partition, a change feed of local writes and a bucketed digest; and the
//! replication cursors and conflict feed. [`StateBackend`] is the contract (its docs list what
//! every implementation must guarantee); [`MemoryBackend`] is the embedded default.
//!
//! The keyspace is split into a fixed number of partitions by [`fnv1a64`] of the key (see
//! [`Layout`]): a partition is the unit of the change feed, of digests and of replication
//! cursors.
//!
//! ```
//! use geostate_backends::{Expect, Key, Layout, LocalWrite, MemoryBackend, StateBackend};
//! use geostate_crdt::{ActorId, Crdt, Hlc, Op, SetOp};
//!
//! # fn block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     let waker = std::task::Waker::noop();
//! #     let mut cx = std::task::Context::from_waker(&waker);
//! #     let mut f = std::pin::pin!(f);
//! #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
//! # }
//! # block_on(async {
//! let store = MemoryBackend::new(Layout::default());
//! let cart = Key::new("cart:42").unwrap();
//! let add = |sku: &str, expect| LocalWrite {
//!     key: cart.clone(),
//!     op: Op::Set(SetOp::add(sku)),
//!     actor: ActorId::new(1),
//!     hlc: Hlc::new(1, 0),
//!     expect,
//! };
//! let first = store.apply(add("sku-1", Expect::Absent)).await.unwrap();
//! // Compare-and-set on the region-local version:
//! assert!(store.apply(add("sku-2", Expect::Absent)).await.is_err());
//! store.apply(add("sku-2", Expect::Version(first.version))).await.unwrap();
//! let Some(stored) = store.get(&cart).await.unwrap() else { unreachable!() };
//! let Crdt::OrSet(set) = stored.value else { unreachable!() };
//! assert_eq!(set.len(), 2);
//! # });
//! ```

#[cfg(all(feature = "redis", feature = "postgres"))]
pub mod any;
pub mod backend;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub mod cache;
pub mod digest;
pub mod error;
pub mod key;
#[cfg(feature = "redis")]
mod keylocks;
pub mod layout;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
mod redact;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod secure;
#[cfg(feature = "testing")]
pub mod suite;
pub mod types;

#[cfg(all(feature = "redis", feature = "postgres"))]
pub use any::AnyStore;
#[cfg(feature = "testing")]
pub use backend::RawAccess;
pub use backend::{StateBackend, PAGE_LIMIT_MAX};
pub use digest::PartitionDigest;
pub use error::BackendError;
pub use key::{Key, KEY_BYTES_MAX};
pub use layout::{fnv1a64, Layout};
pub use memory::MemoryBackend;
pub use redact::redact_url;
pub use types::{
    Expect, FeedEntry, FeedPage, LocalWrite, Receipt, ScanItem, ScanPage, Stored, Tombstone,
    TombstonePage,
};
