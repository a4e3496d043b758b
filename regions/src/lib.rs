//! # geostate-regions
//!
//! The application's view of geostate: a [`Region`] handle over the region's own store.
//!
//! ```
//! use geostate_crdt::{CounterOp, OrSet, PnCounter, SetOp};
//! use geostate_regions::{Region, RegionConfig};
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let config = RegionConfig::from_toml_str(r#"
//!     region = "us-east"
//!     [[resolvers]]
//!     prefix = "profile:"
//!     policy = "keep-siblings"
//! "#).unwrap();
//! let gs = Region::connect(config).await.unwrap();
//!
//! // Typed CRDTs: local writes at local latency, merged everywhere.
//! gs.merge_crdt("cart:42", SetOp::add("sku-1")).await.unwrap();
//! gs.merge_crdt("cart:42", SetOp::add("sku-2")).await.unwrap();
//! gs.merge_crdt("cart:42", SetOp::remove("sku-1")).await.unwrap();
//! let cart: OrSet<String> = gs.read("cart:42").await.unwrap();
//! assert_eq!(cart.iter().collect::<Vec<_>>(), vec!["sku-2"]);
//!
//! gs.merge_crdt("visits", CounterOp::inc(1)).await.unwrap();
//! assert_eq!(gs.read::<PnCounter>("visits").await.unwrap().value(), 1);
//!
//! // Opaque values: concurrent writes become siblings, resolved by the key prefix's resolver.
//! gs.put("profile:7", b"{\"name\":\"Ada\"}".to_vec()).await.unwrap();
//! let profile = gs.get("profile:7").await.unwrap();
//! assert!(matches!(profile, geostate_conflict::ResolvedValue::One(_)));
//!
//! // Deletion is a replicated removal: a key deleted here reads as empty.
//! gs.delete("cart:42").await.unwrap();
//! assert!(gs.read::<OrSet<String>>("cart:42").await.unwrap().is_empty());
//! # });
//! ```
//!
//! Strong operations ([`Region::compare_and_set`]) are strong *within this region* only: a
//! cross-region guarantee would cost a wide-area round trip per operation. Writes made in other
//! regions still merge with the result when they arrive.

pub mod clock;
pub mod config;
pub mod error;
pub mod region;
pub mod region_id;
pub mod typed;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{
    LayoutConfig, PostgresReadPolicy, PostgresSslMode, PostgresStoreConfig, PostgresTlsConfig,
    RedisStoreConfig, RedisStoreMode, RedisTlsConfig, RedisWaitConfig, RegionConfig, RegionLimits,
    ResolverConfig, ResolverPolicy, StoreConfig, NODE_MAX,
};
pub use error::RegionError;
pub use region::{CasOutcome, Region, RegionBuilder, WriteReceipt};
pub use region_id::RegionId;
pub use typed::FromCrdt;
