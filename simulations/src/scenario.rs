//! Scenarios: what to simulate, as a TOML file under `simulations/scenarios/`.

use std::path::Path;

use serde::Deserialize;

use crate::stores::StoreChoice;
use crate::SimError;

/// The relative weights of the write kinds in the workload.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mix {
    /// Counter increments and decrements.
    pub counter: u32,
    /// OR-set adds and removes.
    pub set: u32,
    /// Last-writer-wins register writes.
    pub lww: u32,
    /// Opaque values (`put`): concurrent writes become siblings.
    pub opaque: u32,
    /// Nested map updates and removals.
    pub map: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            counter: 3,
            set: 3,
            lww: 2,
            opaque: 1,
            map: 1,
        }
    }
}

/// The client workload of the fault phase.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Workload {
    /// Writes per second of simulated time, over all regions (Poisson arrivals).
    pub writes_per_s: f64,
    /// Write kinds.
    pub mix: Mix,
    /// Share of set operations that are removes.
    pub set_remove_share: f64,
    /// Share of counter operations that are decrements.
    pub counter_dec_share: f64,
    /// Share of all writes that delete their key (a replicated removal of whatever the key
    /// holds; concurrent writes elsewhere survive it), and of set writes that clear the set.
    pub delete_share: f64,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            writes_per_s: 500.0,
            mix: Mix::default(),
            set_remove_share: 0.3,
            counter_dec_share: 0.3,
            delete_share: 0.02,
        }
    }
}

/// One link's behaviour (a scenario's default for every link, or a fault's override).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkModel {
    /// One-way latency floor, milliseconds.
    pub latency_ms: u64,
    /// Extra latency drawn uniformly from `0..=jitter_ms`.
    pub jitter_ms: u64,
    /// Probability that a message is lost.
    pub loss: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Extra delay drawn uniformly from `0..=reorder_ms` for a quarter of the messages, so
    /// they overtake each other.
    pub reorder_ms: u64,
}

impl Default for LinkModel {
    fn default() -> Self {
        Self {
            latency_ms: 50,
            jitter_ms: 10,
            loss: 0.0,
            duplicate: 0.0,
            reorder_ms: 0,
        }
    }
}

/// Replication settings for the run.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Replication {
    /// Partitions of the keyspace.
    pub partitions: u16,
    /// Digest buckets per partition.
    pub buckets: u16,
    /// Feed entries kept per partition (smaller forces anti-entropy after long partitions).
    pub feed_entries_max: usize,
    /// First retry delay after a failure (doubling per failure in a row, up to 16 times this
    /// or the request timeout). Named after the heads poll interval it once was; polls are
    /// now paced by the measured round trip.
    pub poll_interval_ms: u64,
    /// Time to sweep all partitions with anti-entropy.
    pub anti_entropy_interval_ms: u64,
    /// Request timeout.
    pub request_timeout_ms: u64,
    /// How often each replicator is ticked.
    pub tick_ms: u64,
    /// Feed entries per request.
    pub feed_batch_max: u32,
    /// Time to sweep all partitions once for causally stable tombstones (`0`: keep them all).
    pub gc_interval_ms: u64,
}

impl Default for Replication {
    fn default() -> Self {
        Self {
            partitions: 16,
            buckets: 64,
            feed_entries_max: 10_000,
            poll_interval_ms: 50,
            anti_entropy_interval_ms: 2_000,
            request_timeout_ms: 1_000,
            tick_ms: 10,
            feed_batch_max: 512,
            gc_interval_ms: 4_000,
        }
    }
}

/// A fault on the schedule. Times are seconds of simulated time from the start; every fault
/// ends at the heal (the end of the fault phase) at the latest.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Fault {
    /// Cut every link of one region.
    Isolate {
        /// The region (index).
        region: usize,
        /// Start.
        from_s: f64,
        /// End.
        until_s: f64,
    },
    /// Split the regions into groups; links between groups are cut.
    Split {
        /// Region indexes per group; regions not listed form one more group.
        groups: Vec<Vec<usize>>,
        /// Start.
        from_s: f64,
        /// End.
        until_s: f64,
    },
    /// Only neighbours on a ring (i, i+1 mod n) can talk.
    Ring {
        /// Start.
        from_s: f64,
        /// End.
        until_s: f64,
    },
    /// Messages from `from` to `to` are lost; the other direction works.
    OneWay {
        /// Sender whose messages are lost.
        from: usize,
        /// Receiver.
        to: usize,
        /// Start.
        from_s: f64,
        /// End.
        until_s: f64,
    },
    /// A link goes down and up every `period_ms` (half the period each).
    Flap {
        /// One end.
        a: usize,
        /// The other end.
        b: usize,
        /// Full down-up period.
        period_ms: u64,
        /// Start.
        from_s: f64,
        /// End.
        until_s: f64,
    },
    /// Every link behaves as `link` for a while (loss, duplication, reordering, latency).
    Degrade {
        /// The behaviour.
        link: LinkModel,
        /// Start.
        from_s: f64,
        /// End.
        until_s: f64,
    },
    /// A region's clock runs `offset_ms` off (positive: ahead) from `from_s` on.
    Skew {
        /// The region.
        region: usize,
        /// The offset.
        offset_ms: i64,
        /// Start.
        from_s: f64,
    },
    /// A region's clock jumps by `by_ms` at `at_s` and stays jumped.
    Jump {
        /// The region.
        region: usize,
        /// The jump (negative: backwards).
        by_ms: i64,
        /// When.
        at_s: f64,
    },
    /// A region's replicator crashes (losing its memory) and restarts later.
    Crash {
        /// The region.
        region: usize,
        /// When it crashes.
        at_s: f64,
        /// How long it stays down.
        down_s: f64,
    },
}

/// A whole scenario.
///
/// ```
/// use geostate_sim::Scenario;
/// let s = Scenario::from_toml_str(r#"
///     name = "tiny"
///     regions = 3
///     keys = 50
///     duration_s = 2.0
///     [[faults]]
///     kind = "isolate"
///     region = 0
///     from_s = 0.5
///     until_s = 1.5
/// "#).unwrap();
/// assert_eq!(s.regions, 3);
/// assert_eq!(s.faults.len(), 1);
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name shown in reports.
    pub name: String,
    /// Free text describing what the scenario exercises.
    #[serde(default)]
    pub description: String,
    /// Number of regions.
    pub regions: usize,
    /// Keys written (spread over the write kinds).
    pub keys: usize,
    /// Length of the fault phase (writes and faults), seconds of simulated time.
    pub duration_s: f64,
    /// Longest time allowed to converge after the heal before the run fails.
    #[serde(default = "default_converge_timeout_s")]
    pub converge_timeout_s: f64,
    /// Seed used when none is given on the command line.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Client workload.
    #[serde(default)]
    pub workload: Workload,
    /// Default behaviour of every link.
    #[serde(default)]
    pub network: LinkModel,
    /// Replication settings.
    #[serde(default)]
    pub replication: Replication,
    /// The fault schedule.
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// The store every region runs on: `memory` (the default, embedded), `redis` (a
    /// `redis-server` per region), `postgres` (a schema per region) or `mixed` (even regions
    /// on Redis, odd ones on PostgreSQL). `geostate simulate --store` overrides it.
    #[serde(default)]
    pub store: StoreChoice,
}

fn default_converge_timeout_s() -> f64 {
    60.0
}

fn default_seed() -> u64 {
    1
}

/// Most regions a scenario may have.
pub const REGIONS_MAX: usize = 64;

impl Scenario {
    /// Parses and checks a scenario.
    pub fn from_toml_str(text: &str) -> Result<Self, SimError> {
        let scenario: Scenario =
            toml::from_str(text).map_err(|e| SimError::Scenario(e.to_string()))?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Reads, parses and checks a scenario file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SimError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| SimError::Scenario(format!("reading {}: {e}", path.display())))?;
        Self::from_toml_str(&text)
    }

    /// The built-in default: three regions, one isolated for a while, then healed.
    pub fn default_scenario() -> Self {
        Scenario {
            name: "partition-heal (built-in)".into(),
            description: "Three regions; us-east is cut off for the middle of the run, then the \
                          network heals and every region must converge."
                .into(),
            regions: 3,
            keys: 1_000,
            duration_s: 20.0,
            converge_timeout_s: default_converge_timeout_s(),
            seed: default_seed(),
            workload: Workload::default(),
            network: LinkModel::default(),
            replication: Replication::default(),
            faults: vec![Fault::Isolate {
                region: 0,
                from_s: 5.0,
                until_s: 15.0,
            }],
            store: StoreChoice::Memory,
        }
    }

    /// Checks ranges and that faults name existing regions.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |m: String| Err(SimError::Scenario(m));
        if !(2..=REGIONS_MAX).contains(&self.regions) {
            return bad(format!(
                "regions must be 2..={REGIONS_MAX}, got {}",
                self.regions
            ));
        }
        if self.keys == 0 || self.keys > 10_000_000 {
            return bad(format!("keys must be 1..=10000000, got {}", self.keys));
        }
        if !(self.duration_s > 0.0 && self.duration_s <= 86_400.0) {
            return bad(format!(
                "duration_s must be in (0, 86400], got {}",
                self.duration_s
            ));
        }
        if !(self.converge_timeout_s > 0.0 && self.converge_timeout_s <= 86_400.0) {
            return bad("converge_timeout_s must be in (0, 86400]".into());
        }
        let w = &self.workload;
        if !(w.writes_per_s >= 0.0 && w.writes_per_s <= 1_000_000.0) {
            return bad("workload.writes_per_s must be in [0, 1000000]".into());
        }
        let m = &w.mix;
        if m.counter + m.set + m.lww + m.opaque + m.map == 0 {
            return bad("workload.mix must have a positive weight".into());
        }
        for share in [w.set_remove_share, w.counter_dec_share, w.delete_share] {
            if !(0.0..=1.0).contains(&share) {
                return bad("workload shares must be in [0, 1]".into());
            }
        }
        check_link(&self.network)?;
        let r = &self.replication;
        if r.partitions == 0 || r.buckets == 0 || r.feed_entries_max == 0 {
            return bad(
                "replication.partitions, buckets and feed_entries_max must be positive".into(),
            );
        }
        if r.tick_ms == 0 || r.poll_interval_ms == 0 || r.request_timeout_ms == 0 {
            return bad("replication intervals must be positive".into());
        }
        let region = |i: usize| -> Result<(), SimError> {
            if i < self.regions {
                Ok(())
            } else {
                Err(SimError::Scenario(format!(
                    "fault names region {i}, but there are {} regions",
                    self.regions
                )))
            }
        };
        for fault in &self.faults {
            match fault {
                Fault::Isolate { region: r, .. }
                | Fault::Skew { region: r, .. }
                | Fault::Jump { region: r, .. }
                | Fault::Crash { region: r, .. } => region(*r)?,
                Fault::OneWay { from, to, .. } => {
                    region(*from)?;
                    region(*to)?;
                }
                Fault::Flap {
                    a, b, period_ms, ..
                } => {
                    region(*a)?;
                    region(*b)?;
                    if *period_ms < 2 {
                        return bad("flap period_ms must be at least 2".into());
                    }
                }
                Fault::Split { groups, .. } => {
                    for g in groups {
                        for r in g {
                            region(*r)?;
                        }
                    }
                }
                Fault::Degrade { link, .. } => check_link(link)?,
                Fault::Ring { .. } => {}
            }
        }
        Ok(())
    }
}

fn check_link(link: &LinkModel) -> Result<(), SimError> {
    for p in [link.loss, link.duplicate] {
        if !(0.0..1.0).contains(&p) {
            return Err(SimError::Scenario(
                "loss and duplicate must be in [0, 1)".into(),
            ));
        }
    }
    Ok(())
}
