//! # geostate-sim
//!
//! Deterministic region-partition simulation. A [`Scenario`] names the regions, the workload,
//! the network and a fault schedule; [`run`] plays it out with every region on its own store
//! and replicator (the same protocol core production runs), heals the network, waits for
//! convergence, and returns an [`Outcome`] that the invariant checks and reports read. One
//! seed fixes every choice: the same seed gives the same trace hash and report.
//!
//! Regions run on the embedded in-memory store by default. [`Scenario::store`] (or
//! `geostate simulate --store`) puts each region on a real store of its own instead: a
//! `redis-server` per region, a PostgreSQL schema per region, or a mix (see [`stores`]).
//! Faults stay where they are, in the simulated network between the replicators, and the
//! same checks read the real stores' contents.
//!
//! ```
//! use geostate_sim::{run, RunOptions, Scenario};
//! let mut scenario = Scenario::default_scenario();
//! scenario.keys = 100;
//! scenario.duration_s = 3.0;
//! scenario.faults.clear();
//! let a = run(&scenario, &RunOptions::new(7)).unwrap();
//! let b = run(&scenario, &RunOptions::new(7)).unwrap();
//! assert_eq!(a.trace_hash, b.trace_hash);
//! assert!(a.converged_ms.is_some());
//! assert!(a.payloads.windows(2).all(|w| w[0] == w[1]));
//! ```

pub mod checks;
pub mod engine;
pub mod report;
pub mod rng;
pub mod scenario;
pub mod stores;

pub use checks::{all_passed, run_all, CheckResult};
pub use engine::{run, AckedWrite, KeyKind, Outcome, RunOptions, Sample};
pub use scenario::{Fault, LinkModel, Scenario};
pub use stores::{StoreChoice, StoreInfo, StoreKind, StoreOptions};

/// Why a simulation could not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The scenario is invalid.
    #[error("scenario: {0}")]
    Scenario(String),
    /// The simulation itself failed (a bug: please report it with the seed).
    #[error("internal: {0}")]
    Internal(String),
    /// A real store could not be started, reached or removed, or failed during the run.
    #[error("store: {0}")]
    Store(String),
    /// A real-store run stopped early because [`stores::request_stop`] was called (Ctrl-C);
    /// its stores were removed.
    #[error("interrupted: the run was asked to stop; its stores were removed")]
    Interrupted,
}
