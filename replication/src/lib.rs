//! # geostate-replication
//!
//! Carries each region's writes to every other region and repairs what was missed.
//!
//! - [`core`]: the protocol as a pure state machine (`handle(now, Event) -> Vec<Command>`):
//!   feed shipping with per-(peer, partition) cursors, anti-entropy by set reconciliation
//!   (falling back to digests for large divergences), lag accounting. No I/O, no clock reads,
//!   no awaiting.
//! - [`iblt`]: rateless set reconciliation, the coded symbols anti-entropy exchanges.
//! - [`wire`]: the requests and responses replicators exchange.
//! - [`serve`]: the store-facing half: answering a peer, carrying out a core's local operation.
//! - [`driver`]: the async runtime for production and tests ([`driver::Replicator`] over a
//!   [`driver::Transport`]); the simulator drives the same core with simulated time and network.
//!
//! ```
//! use std::sync::Arc;
//! use geostate_backends::{Layout, MemoryBackend, StateBackend};
//! use geostate_crdt::{CounterOp, PnCounter};
//! use geostate_regions::{Region, RegionConfig, SystemClock};
//! use geostate_replication::driver::{DriverConfig, InProcessTransport, Replicator, Status};
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let layout = Layout::new(4, 4, 1 << 20, 1_000).unwrap();
//! let mut config = DriverConfig::default();
//! config.core.partitions = 4;
//! let stores: Vec<Arc<MemoryBackend>> =
//!     (0..2).map(|_| Arc::new(MemoryBackend::new(layout.clone()))).collect();
//! let names = ["us-east", "eu-west"];
//! let transport = Arc::new(InProcessTransport::new(
//!     names.iter().map(|n| n.to_string()).zip(stores.iter().cloned()),
//! ));
//! let (stop, shutdown) = tokio::sync::watch::channel(false);
//! for (i, store) in stores.iter().enumerate() {
//!     let peers = vec![names[1 - i].to_string()];
//!     let replicator = Replicator::new(config.clone(), names[i], store.clone(), transport.clone(), peers, Arc::new(SystemClock));
//!     let (status, _) = tokio::sync::watch::channel(Status::default());
//!     tokio::spawn(replicator.run(shutdown.clone(), status));
//! }
//! let mut region_config = RegionConfig::new("us-east".parse().unwrap());
//! region_config.layout.partitions = 4;
//! region_config.layout.buckets = 4;
//! region_config.layout.value_bytes_max = 1 << 20;
//! region_config.layout.feed_entries_max = 1_000;
//! let east = Region::builder(region_config, stores[0].clone()).build().unwrap();
//! east.merge_crdt("visits", CounterOp::inc(3)).await.unwrap();
//! // The write reaches eu-west's store through the replicators.
//! let key = geostate_backends::Key::new("visits").unwrap();
//! loop {
//!     if let Some(stored) = stores[1].get(&key).await.unwrap() {
//!         let counter = PnCounter::try_from(stored.value).unwrap();
//!         assert_eq!(counter.value(), 3);
//!         break;
//!     }
//!     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
//! }
//! stop.send(true).unwrap();
//! # });
//! ```

pub mod core;
pub mod driver;
pub mod iblt;
pub mod serve;
pub mod wire;
