//! # geostate-sim
//!
//! Deterministic region-partition simulation. A [`Scenario`] names the regions, the workload,
//! the network and a fault schedule; [`run`] plays it out with every region on its own
//! embedded store and replicator (the same protocol core production runs), heals the network,
//! waits for convergence, and returns an [`Outcome`] that the invariant checks and reports
//! read. One seed fixes every choice: the same seed gives the same trace hash and report.
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

pub use checks::{all_passed, run_all, CheckResult};
pub use engine::{run, AckedWrite, KeyKind, Outcome, RunOptions, Sample};
pub use scenario::{Fault, LinkModel, Scenario};

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
}
