//! Invariant checks: what must hold at the end of every simulation run.
//!
//! One file per invariant, each a pure function of the [`Outcome`]:
//!
//! | check | invariant |
//! |---|---|
//! | [`identical`] | all regions hold the same keys with byte-identical canonical payloads |
//! | [`counters`] | counter = sum of acknowledged deltas (+ any subset of indeterminate ones) |
//! | [`sets`] | set = elements with a live add: none lost unless removed, none never added |
//! | [`lww`] | LWW winner = the live write with the greatest `(HLC, actor, counter)` |
//! | [`opaque`] | opaque keys resolve alike everywhere; siblings = the live writes |
//! | [`maps`] | nested counter = sum of its acknowledged increments, where nothing removed it |
//! | [`convergence`] | converged after the heal, within a bound derived from the settings |
//!
//! The set, register and opaque checks share an oracle ([`oracle`]) computed from the
//! acknowledged deltas alone, with no merge code: a dot is *live* iff some acknowledged delta's
//! store holds it and no acknowledged delta's causal context covers it without holding it.
//!
//! ```
//! use geostate_sim::{checks, run, RunOptions, Scenario};
//! let mut scenario = Scenario::default_scenario();
//! scenario.keys = 60;
//! scenario.duration_s = 2.0;
//! scenario.faults.clear();
//! let outcome = run(&scenario, &RunOptions::new(3)).unwrap();
//! let results = checks::run_all(&outcome);
//! assert!(checks::all_passed(&results), "{}", checks::failure_report(&results));
//! ```

pub mod convergence;
pub mod counters;
pub mod identical;
pub mod lww;
pub mod maps;
pub mod opaque;
pub mod oracle;
pub mod sets;

use std::fmt;

use crate::Outcome;

/// Most detail lines a check keeps; further problems are counted in one last line.
pub const DETAILS_MAX: usize = 20;

/// The verdict of one invariant check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckResult {
    /// The check's name (its file name).
    pub name: &'static str,
    /// Whether the invariant held.
    pub passed: bool,
    /// What was wrong, one problem per line (at most [`DETAILS_MAX`] lines, then a count of
    /// the rest); empty when the check passed.
    pub details: Vec<String>,
    /// How many items (keys, key-region pairs, ...) the check examined, so a report can tell
    /// a vacuous pass from a real one.
    pub checked: usize,
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.passed { "ok" } else { "FAILED" };
        write!(f, "{}: {verdict} ({} checked)", self.name, self.checked)?;
        for line in &self.details {
            write!(f, "\n  {line}")?;
        }
        Ok(())
    }
}

/// Collects a check's problems, keeping the first [`DETAILS_MAX`].
#[derive(Debug)]
pub(crate) struct Findings {
    name: &'static str,
    details: Vec<String>,
    problems: usize,
    checked: usize,
}

impl Findings {
    pub(crate) fn new(name: &'static str) -> Self {
        Self {
            name,
            details: Vec::new(),
            problems: 0,
            checked: 0,
        }
    }

    /// Records one problem.
    pub(crate) fn fail(&mut self, line: impl Into<String>) {
        self.problems += 1;
        if self.details.len() < DETAILS_MAX {
            self.details.push(line.into());
        }
    }

    /// Counts one examined item.
    pub(crate) fn checked(&mut self) {
        self.checked += 1;
    }

    /// Counts `n` examined items.
    pub(crate) fn add_checked(&mut self, n: usize) {
        self.checked += n;
    }

    pub(crate) fn finish(mut self) -> CheckResult {
        if self.problems > self.details.len() {
            self.details.push(format!(
                "... and {} more",
                self.problems - self.details.len()
            ));
        }
        CheckResult {
            name: self.name,
            passed: self.problems == 0,
            details: self.details,
            checked: self.checked,
        }
    }
}

/// Runs every check on `outcome`, in a fixed order.
pub fn run_all(outcome: &Outcome) -> Vec<CheckResult> {
    vec![
        identical::check(outcome),
        counters::check(outcome),
        sets::check(outcome),
        lww::check(outcome),
        opaque::check(outcome),
        maps::check(outcome),
        convergence::check(outcome),
    ]
}

/// Whether every check passed.
pub fn all_passed(results: &[CheckResult]) -> bool {
    results.iter().all(|r| r.passed)
}

/// The failed checks with their details, one block per check (empty if all passed).
pub fn failure_report(results: &[CheckResult]) -> String {
    results
        .iter()
        .filter(|r| !r.passed)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Shared helpers for the checks' unit tests: tiny hand-made outcomes.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod testkit {
    use std::collections::BTreeMap;

    use geostate_conflict::ResolvedValue;
    use geostate_crdt::{envelope, ActorId, Crdt, Hlc, Op};
    use geostate_replication::core::CoreConfig;

    use crate::engine::{region_name, AckedWrite, KeyKind};
    use crate::{run, Outcome, RunOptions, Scenario};

    /// A write made by hand: `region`'s actor applies `op` to its copy of `key`.
    pub(crate) struct Builder {
        pub(crate) regions: Vec<BTreeMap<String, Crdt>>,
        pub(crate) acked: Vec<AckedWrite>,
    }

    impl Builder {
        pub(crate) fn new(regions: usize) -> Self {
            Self {
                regions: vec![BTreeMap::new(); regions],
                acked: Vec::new(),
            }
        }

        pub(crate) fn actor(region: usize) -> ActorId {
            ActorId::new(100 + region as u64)
        }

        /// Applies `op` at `region` with timestamp `hlc_ms`, acknowledging it.
        pub(crate) fn write(&mut self, region: usize, key: &str, op: Op, hlc_ms: u64) -> Crdt {
            let state = self.regions[region]
                .entry(key.to_string())
                .or_insert_with(|| Crdt::empty(op.type_tag().unwrap()));
            let delta = state
                .apply(Self::actor(region), Hlc::new(hlc_ms, 0), &op)
                .unwrap();
            state.merge(&delta).unwrap();
            self.acked.push(AckedWrite {
                at_ms: hlc_ms,
                region,
                key: key.to_string(),
                op,
                delta: delta.clone(),
            });
            delta
        }

        /// Makes every region hold the join of all regions' states (perfect replication).
        pub(crate) fn sync(&mut self) {
            let mut all: BTreeMap<String, Crdt> = BTreeMap::new();
            for region in &self.regions {
                for (k, v) in region {
                    match all.get_mut(k) {
                        Some(mine) => mine.merge(v).unwrap(),
                        None => {
                            all.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            for region in &mut self.regions {
                *region = all.clone();
            }
        }

        pub(crate) fn outcome(&self) -> Outcome {
            outcome_from(self.regions.clone(), self.acked.clone())
        }
    }

    /// An outcome around the given states and writes, converged 500 ms after a heal at 1 s.
    pub(crate) fn outcome_from(
        states: Vec<BTreeMap<String, Crdt>>,
        acked: Vec<AckedWrite>,
    ) -> Outcome {
        let payloads = states
            .iter()
            .map(|s| {
                s.iter()
                    .map(|(k, v)| (k.clone(), envelope::canonical_payload(v).unwrap()))
                    .collect()
            })
            .collect();
        let resolved = states.iter().map(resolve_opaque).collect();
        let n = states.len();
        Outcome {
            scenario: "unit".into(),
            seed: 0,
            regions: (0..n).map(region_name).collect(),
            stores: vec![crate::StoreInfo::memory(); n],
            heal_ms: 1_000,
            converged_ms: Some(1_500),
            converge_timeout_ms: 60_000,
            anti_entropy_interval_ms: 2_000,
            poll_interval_ms: 50,
            link_latency_max_ms: 60,
            link_loss_healed: 0.0,
            core: CoreConfig {
                partitions: 16,
                anti_entropy_interval_ms: 2_000,
                request_timeout_ms: 1_000,
                retry_backoff_ms: 50,
                retry_backoff_max_ms: 1_000,
                ..CoreConfig::default()
            },
            buckets: 64,
            tick_ms: 10,
            sample_ms: 100,
            trace_hash: 0,
            events: 0,
            acked,
            failed_writes: 0,
            states,
            payloads,
            resolved,
            conflicts: vec![0; n],
            tombstones: vec![0; n],
            lag: BTreeMap::new(),
            stats: vec![Default::default(); n],
            messages_dropped: 0,
            messages_duplicated: 0,
            clock_refusals: 0,
            samples: Vec::new(),
        }
    }

    /// What the default (LWW) resolver shows for each opaque key, computed independently.
    pub(crate) fn resolve_opaque(
        states: &BTreeMap<String, Crdt>,
    ) -> BTreeMap<String, ResolvedValue> {
        states
            .iter()
            .filter(|(k, _)| KeyKind::of(k) == Some(KeyKind::Opaque))
            .map(|(k, v)| {
                let Crdt::MvRegister(r) = v else {
                    return (k.clone(), ResolvedValue::Absent);
                };
                let value =
                    geostate_conflict::resolve(&geostate_conflict::ResolverRegistry::new(), k, r)
                        .value;
                (k.clone(), value)
            })
            .collect()
    }

    /// A small real run without faults, shared by tests that need engine-made outcomes.
    pub(crate) fn small_run(seed: u64) -> Outcome {
        let mut scenario = Scenario::default_scenario();
        scenario.keys = 60;
        scenario.duration_s = 2.0;
        scenario.workload.writes_per_s = 300.0;
        scenario.faults.clear();
        run(&scenario, &RunOptions::new(seed)).unwrap()
    }

    /// Re-derives the payloads after a test tampered with `states`.
    pub(crate) fn refresh_payloads(outcome: &mut Outcome) {
        outcome.payloads = outcome
            .states
            .iter()
            .map(|s| {
                s.iter()
                    .map(|(k, v)| (k.clone(), envelope::canonical_payload(v).unwrap()))
                    .collect()
            })
            .collect();
        outcome.resolved = outcome.states.iter().map(resolve_opaque).collect();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn findings_cap_details_and_count_the_rest() {
        let mut f = Findings::new("x");
        for i in 0..DETAILS_MAX + 5 {
            f.fail(format!("problem {i}"));
        }
        let r = f.finish();
        assert!(!r.passed);
        assert_eq!(r.details.len(), DETAILS_MAX + 1);
        assert_eq!(r.details.last().unwrap(), "... and 5 more");
    }

    #[test]
    fn a_small_run_passes_every_check_and_each_examines_something() {
        let outcome = testkit::small_run(11);
        let results = run_all(&outcome);
        assert!(all_passed(&results), "{}", failure_report(&results));
        for r in &results {
            assert!(r.checked > 0, "{} examined nothing", r.name);
        }
        assert_eq!(failure_report(&results), "");
    }

    #[test]
    fn all_passed_is_false_when_one_check_fails() {
        let mut outcome = testkit::small_run(12);
        outcome.converged_ms = None;
        let results = run_all(&outcome);
        assert!(!all_passed(&results));
        assert!(failure_report(&results).contains("convergence: FAILED"));
    }
}
