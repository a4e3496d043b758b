//! The discrete-event loop: regions on their stores, replicators running the pure core, a
//! simulated network, a fault schedule and a client workload, all driven by one seed.
//!
//! Time is simulated: events are taken from a queue in `(time, sequence)` order, so a run is a
//! pure function of the scenario and the seed. Each region sees its own clock (the simulated
//! time plus its skew and jumps).
//!
//! The loop is generic over the store ([`StateBackend`]) and runs on one thread, one store
//! operation at a time: each operation completes before the next event is taken. The embedded
//! store never waits, so its operations are polled to completion in place. Real stores
//! ([`crate::stores`]: Redis, PostgreSQL, or both) are awaited on a single-threaded tokio
//! runtime, blocking the loop meanwhile; since nothing else runs while an operation is in
//! flight, every operation sees exactly the state the previous ones left, and the run stays a
//! function of the seed (wall-clock time spent in the stores never enters simulated time).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::future::Future;
use std::sync::Arc;

use geostate_backends::{
    BackendError, Expect, Key, Layout, LocalWrite, MemoryBackend, StateBackend,
};
use geostate_conflict::ResolvedValue;
use geostate_crdt::{envelope, CounterOp, Crdt, FieldOp, Hlc, MapOp, Op, RegisterOp, SetOp};
use geostate_regions::{ManualClock, Region, RegionConfig, RegionError, RegionId};
use geostate_replication::core::{
    Command, CommandId, CoreConfig, Event, LocalOp, LocalResult, ReplicatorCore, Stats,
};
use geostate_replication::serve::{execute, ServeLimits, Server};
use geostate_replication::wire::{Request, Response};
use hdrhistogram::Histogram;

use crate::rng::Rng;
use crate::scenario::{Fault, LinkModel, Scenario};
use crate::stores::{Deployment, StoreInfo, StoreOptions};
use crate::SimError;

/// Names given to regions, in order (then `region-N`).
const REGION_NAMES: [&str; 16] = [
    "us-east",
    "eu-west",
    "ap-south",
    "us-west",
    "eu-north",
    "sa-east",
    "ap-east",
    "af-south",
    "me-central",
    "ca-central",
    "ap-north",
    "eu-south",
    "us-central",
    "ap-southeast",
    "eu-central",
    "mx-central",
];

/// What every region's wall clock reads at simulated time 0 (November 2023). Clocks start
/// here rather than at 0 so that a clock set back (a `jump` with a negative offset, or a
/// negative skew) keeps running: counted from 0 it would be clamped at 0 and frozen until
/// simulated time caught up, which no real clock does.
pub const WALL_CLOCK_EPOCH_MS: u64 = 1_700_000_000_000;

/// The name of region `i`.
pub fn region_name(i: usize) -> String {
    REGION_NAMES
        .get(i)
        .map_or_else(|| format!("region-{i}"), |n| (*n).to_string())
}

/// The kind of value a key holds; keys are named `<kind letter>:<n>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyKind {
    /// PN-counter (`c:`).
    Counter,
    /// OR-set (`s:`).
    Set,
    /// LWW register (`l:`).
    Lww,
    /// Opaque multi-value register (`o:`).
    Opaque,
    /// Map of CRDTs (`m:`).
    Map,
}

impl KeyKind {
    /// The kind of a key by its prefix.
    pub fn of(key: &str) -> Option<KeyKind> {
        match key.split_once(':')?.0 {
            "c" => Some(KeyKind::Counter),
            "s" => Some(KeyKind::Set),
            "l" => Some(KeyKind::Lww),
            "o" => Some(KeyKind::Opaque),
            "m" => Some(KeyKind::Map),
            _ => None,
        }
    }

    fn letter(self) -> char {
        match self {
            KeyKind::Counter => 'c',
            KeyKind::Set => 's',
            KeyKind::Lww => 'l',
            KeyKind::Opaque => 'o',
            KeyKind::Map => 'm',
        }
    }
}

/// One acknowledged client write.
#[derive(Clone, Debug, PartialEq)]
pub struct AckedWrite {
    /// Simulated time of the acknowledgement.
    pub at_ms: u64,
    /// The region written to.
    pub region: usize,
    /// The key.
    pub key: String,
    /// The operation.
    pub op: Op,
    /// The delta the store merged (what the operation did).
    pub delta: Crdt,
}

/// Metrics sampled during the run.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Simulated time.
    pub at_ms: u64,
    /// Differing digest buckets summed over all region pairs and partitions.
    pub divergence: u64,
    /// Replication lag p99 of entries applied since the previous sample (0 if none).
    pub lag_p99_ms: u64,
    /// Entries applied since the previous sample.
    pub applied: u64,
}

/// Everything a run produced, for the checks and the report.
#[derive(Debug)]
pub struct Outcome {
    /// The scenario's name.
    pub scenario: String,
    /// The seed.
    pub seed: u64,
    /// Region names, by index.
    pub regions: Vec<String>,
    /// The store each region ran on, by index.
    pub stores: Vec<StoreInfo>,
    /// When the network healed (end of the fault phase).
    pub heal_ms: u64,
    /// When all regions' digests first agreed after the heal.
    pub converged_ms: Option<u64>,
    /// Longest wait for convergence after the heal.
    pub converge_timeout_ms: u64,
    /// Settings the convergence bound derives from.
    pub anti_entropy_interval_ms: u64,
    /// The scenario's poll interval (the first retry backoff).
    pub poll_interval_ms: u64,
    /// Largest one-way latency of the healed network.
    pub link_latency_max_ms: u64,
    /// Message loss probability of the healed network (no convergence bound holds above 0).
    pub link_loss_healed: f64,
    /// The replicators' protocol settings (timeouts, backoff, batch and round limits).
    pub core: CoreConfig,
    /// Digest buckets per partition.
    pub buckets: u16,
    /// How often each replicator is ticked (timeouts and backoffs are noticed on ticks).
    pub tick_ms: u64,
    /// Metrics sampling period; convergence is noticed at a sample.
    pub sample_ms: u64,
    /// Hash of every event processed, in order: equal for equal runs.
    pub trace_hash: u64,
    /// Events processed.
    pub events: u64,
    /// Every acknowledged write, in order.
    pub acked: Vec<AckedWrite>,
    /// Writes that the store refused without writing anything (none are expected). A write
    /// whose outcome is unknown (the store was unavailable) stops the run instead, with
    /// [`SimError::Store`]: the checks need the outcome of every write.
    pub failed_writes: u64,
    /// Final state per region: key -> value.
    pub states: Vec<BTreeMap<String, Crdt>>,
    /// Final canonical payload per region: key -> bytes.
    pub payloads: Vec<BTreeMap<String, Vec<u8>>>,
    /// Opaque keys as each region's `get` resolves them.
    pub resolved: Vec<BTreeMap<String, ResolvedValue>>,
    /// Conflict records appended per region.
    pub conflicts: Vec<u64>,
    /// Keys holding no live value (deleted or emptied) per region: removal contexts kept.
    pub tombstones: Vec<u64>,
    /// Lag histograms per (origin, receiver).
    pub lag: BTreeMap<(usize, usize), Histogram<u64>>,
    /// Replicator counters summed per region (crashed incarnations included).
    pub stats: Vec<Stats>,
    /// Messages lost to faults or loss.
    pub messages_dropped: u64,
    /// Messages delivered twice.
    pub messages_duplicated: u64,
    /// Remote timestamps refused by a region's clock as too far ahead.
    pub clock_refusals: u64,
    /// Metrics over time.
    pub samples: Vec<Sample>,
}

/// How to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// The seed; every random choice derives from it.
    pub seed: u64,
    /// Metrics sampling period (also how often convergence is checked), simulated ms.
    pub sample_ms: u64,
    /// Where real stores come from when the scenario's [`store`](Scenario::store) is not
    /// the embedded one.
    pub stores: StoreOptions,
}

impl RunOptions {
    /// Options with `seed`, a 100 ms sampling period and the default [`StoreOptions`].
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            sample_ms: 100,
            stores: StoreOptions::default(),
        }
    }
}

/// A long poll a replicator holds because it had nothing new to answer.
#[derive(Debug)]
struct Parked {
    id: u64,
    from: usize,
    incarnation: u64,
    request_id: CommandId,
    request: Request,
}

#[derive(Debug)]
enum Ev {
    /// A held long poll's wait ran out: answer it as it stands.
    PollDeadline {
        node: usize,
        parked: u64,
    },
    Tick(usize),
    Write,
    Request {
        from: usize,
        to: usize,
        incarnation: u64,
        id: CommandId,
        request: Request,
    },
    Response {
        to: usize,
        incarnation: u64,
        id: CommandId,
        response: Response,
    },
    Crash(usize),
    Restart(usize),
    Sample,
    Heal,
}

#[derive(Debug)]
struct Node<B: StateBackend> {
    store: Arc<B>,
    region: Region<B>,
    clock: ManualClock,
    offset_ms: i64,
    core: Option<ReplicatorCore>,
    incarnation: u64,
    /// Peer index (as the core numbers them) -> node index.
    peers: Vec<usize>,
    peer_names: Vec<String>,
    /// Stats of crashed incarnations.
    past_stats: Stats,
    /// The serving half of this region's replicator (it keeps the peers' poll sessions).
    server: Server<B>,
    /// Long polls held by this region's replicator.
    parked: Vec<Parked>,
}

/// A server for `store` whose session ids cannot repeat those of an earlier incarnation.
fn new_server<S: StateBackend>(store: &Arc<S>, incarnation: u64) -> Server<S> {
    Server::new(
        Arc::clone(store),
        ServeLimits::default(),
        (incarnation + 1) << 32,
    )
}

/// How the loop completes a store operation.
#[derive(Clone, Copy, Debug)]
enum Waiter<'r> {
    /// The embedded store: every operation completes at once; poll it once, in place.
    Ready,
    /// Real stores: block on the run's runtime until the operation completes.
    Block(&'r tokio::runtime::Runtime),
}

impl Waiter<'_> {
    /// Whether the run heeds [`crate::stores::request_stop`] (real stores only: an embedded
    /// run leaves nothing behind to remove).
    fn stoppable(self) -> bool {
        matches!(self, Waiter::Block(_))
    }

    /// Completes `future`, one store operation (or a short sequence of them).
    fn wait<F: Future>(self, future: F) -> Result<F::Output, SimError> {
        match self {
            Waiter::Ready => ready(future),
            Waiter::Block(runtime) => Ok(runtime.block_on(future)),
        }
    }
}

/// A store error met outside the protocol's own error handling (sampling, the final reads):
/// [`SimError::Store`] when the store was unavailable, [`SimError::Internal`] otherwise.
fn store_failed(region: usize, what: &str, e: BackendError) -> SimError {
    match e {
        BackendError::Unavailable(m) => {
            SimError::Store(format!("region {}: {what}: {m}", region_name(region)))
        }
        e => SimError::Internal(e.to_string()),
    }
}

/// [`store_failed`] for an error the region handle reports.
fn region_failed(region: usize, what: &str, e: RegionError) -> SimError {
    match e {
        RegionError::Backend(e) => store_failed(region, what, e),
        e => SimError::Internal(e.to_string()),
    }
}

/// Polls a future that cannot wait (every embedded-store operation completes at once).
fn ready<F: Future>(future: F) -> Result<F::Output, SimError> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Ok(v),
        std::task::Poll::Pending => Err(SimError::Internal(
            "a store operation waited; the simulation needs stores that complete at once".into(),
        )),
    }
}

fn add_stats(total: &mut Stats, s: &Stats) {
    total.requests += s.requests;
    total.failures += s.failures;
    total.entries_applied += s.entries_applied;
    total.feed_bytes += s.feed_bytes;
    total.ae_bytes += s.ae_bytes;
    total.ae_rounds += s.ae_rounds;
    total.ae_keys += s.ae_keys;
    total.gaps += s.gaps;
    total.tombstones_purged += s.tombstones_purged;
    total.tombstones_pending = s.tombstones_pending;
}

fn lag_histogram() -> Result<Histogram<u64>, SimError> {
    Histogram::new_with_bounds(1, 100_000_000, 3)
        .map_err(|e| SimError::Internal(format!("histogram: {e}")))
}

fn fnv(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

struct Sim<'a, B: StateBackend> {
    scenario: &'a Scenario,
    waiter: Waiter<'a>,
    now_ms: u64,
    heal_ms: u64,
    healed: bool,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Ev>,
    rng: Rng,
    net_rng: Rng,
    nodes: Vec<Node<B>>,
    trace: u64,
    processed: u64,
    acked: Vec<AckedWrite>,
    failed_writes: u64,
    keys_per_kind: Vec<(KeyKind, usize)>,
    kind_weights: Vec<(KeyKind, u32)>,
    lag: BTreeMap<(usize, usize), Histogram<u64>>,
    interval_lag: Histogram<u64>,
    interval_applied: u64,
    samples: Vec<Sample>,
    dropped: u64,
    duplicated: u64,
    clock_refusals: u64,
    converged_ms: Option<u64>,
    finished: bool,
    parked_seq: u64,
}

/// Runs `scenario` with `options`; deterministic for a given scenario and seed.
///
/// On the embedded store (the default [`Scenario::store`]) a run touches nothing outside the
/// process. On real stores it starts one store per region ([`Deployment`]), runs on them, and
/// removes them before returning, also when the run fails. A real-store run blocks on every
/// store operation, so it must not be called from inside an async runtime
/// ([`SimError::Scenario`] says so).
///
/// Errors: [`SimError::Scenario`] for an invalid scenario; [`SimError::Store`] when a real
/// store cannot be started, reached or removed, or fails during the run;
/// [`SimError::Interrupted`] when [`crate::stores::request_stop`] stopped a real-store run;
/// [`SimError::Internal`] for a bug.
pub fn run(scenario: &Scenario, options: &RunOptions) -> Result<Outcome, SimError> {
    scenario.validate()?;
    let r = &scenario.replication;
    let layout = Layout::new(
        r.partitions,
        r.buckets,
        64 * 1024 * 1024,
        r.feed_entries_max,
    )
    .map_err(|e| SimError::Scenario(e.to_string()))?;
    if !scenario.store.is_real() {
        let stores = (0..scenario.regions)
            .map(|_| Arc::new(MemoryBackend::new(layout.clone())))
            .collect();
        let infos = vec![StoreInfo::memory(); scenario.regions];
        return simulate(scenario, options, &layout, stores, infos, Waiter::Ready);
    }
    let deployment = Deployment::start(
        scenario.store,
        scenario.regions,
        &layout,
        &options.stores,
        options.seed,
    )?;
    let outcome = simulate(
        scenario,
        options,
        &layout,
        deployment.stores(),
        deployment.infos(),
        Waiter::Block(deployment.runtime()),
    );
    let stopped = deployment.stop();
    match (outcome, stopped) {
        (Ok(outcome), Ok(())) => Ok(outcome),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(cleanup)) => Err(match (e, cleanup) {
            (SimError::Store(m), SimError::Store(c)) => SimError::Store(format!("{m}; and {c}")),
            // `Interrupted` says the stores were removed: not all were.
            (SimError::Interrupted, cleanup) => cleanup,
            (e, _) => e,
        }),
    }
}

/// Runs `scenario` on `stores` (one per region, each laid out as `layout`), completing store
/// operations with `waiter`.
fn simulate<B: StateBackend>(
    scenario: &Scenario,
    options: &RunOptions,
    layout: &Layout,
    stores: Vec<Arc<B>>,
    infos: Vec<StoreInfo>,
    waiter: Waiter<'_>,
) -> Result<Outcome, SimError> {
    if stores.len() != scenario.regions || infos.len() != scenario.regions {
        return Err(SimError::Internal(format!(
            "{} stores for {} regions",
            stores.len(),
            scenario.regions
        )));
    }
    let mut rng = Rng::new(options.seed);
    let net_rng = rng.fork();
    let r = &scenario.replication;
    let mut nodes = Vec::with_capacity(scenario.regions);
    for (i, store) in stores.into_iter().enumerate() {
        let name = region_name(i);
        let id = RegionId::new(name.clone()).map_err(|e| SimError::Internal(e.to_string()))?;
        let mut config = RegionConfig::new(id);
        config.layout.partitions = r.partitions;
        config.layout.buckets = r.buckets;
        config.layout.value_bytes_max = layout.value_bytes_max();
        config.layout.feed_entries_max = r.feed_entries_max;
        let clock = ManualClock::new(WALL_CLOCK_EPOCH_MS);
        let region = Region::builder(config, Arc::clone(&store))
            .clock(clock.clone())
            .build()
            .map_err(|e| SimError::Internal(e.to_string()))?;
        let peers: Vec<usize> = (0..scenario.regions).filter(|&j| j != i).collect();
        let peer_names = peers.iter().map(|&j| region_name(j)).collect();
        let server = new_server(&store, 0);
        nodes.push(Node {
            server,
            store,
            region,
            clock,
            offset_ms: 0,
            core: None,
            incarnation: 0,
            peers,
            peer_names,
            past_stats: Stats::default(),
            parked: Vec::new(),
        });
    }
    let m = &scenario.workload.mix;
    let kind_weights = vec![
        (KeyKind::Counter, m.counter),
        (KeyKind::Set, m.set),
        (KeyKind::Lww, m.lww),
        (KeyKind::Opaque, m.opaque),
        (KeyKind::Map, m.map),
    ];
    let total: u64 = kind_weights.iter().map(|(_, w)| u64::from(*w)).sum();
    let keys_per_kind = kind_weights
        .iter()
        .filter(|(_, w)| *w > 0)
        .map(|(k, w)| {
            let share = (scenario.keys as u64 * u64::from(*w) / total.max(1)).max(1);
            (*k, share as usize)
        })
        .collect();
    let heal_ms = (scenario.duration_s * 1000.0) as u64;
    let mut sim = Sim {
        scenario,
        waiter,
        now_ms: 0,
        heal_ms,
        healed: false,
        seq: 0,
        queue: BinaryHeap::new(),
        events: BTreeMap::new(),
        rng,
        net_rng,
        nodes,
        trace: 0xcbf2_9ce4_8422_2325,
        processed: 0,
        acked: Vec::new(),
        failed_writes: 0,
        keys_per_kind,
        kind_weights,
        lag: BTreeMap::new(),
        interval_lag: lag_histogram()?,
        interval_applied: 0,
        samples: Vec::new(),
        dropped: 0,
        duplicated: 0,
        clock_refusals: 0,
        converged_ms: None,
        finished: false,
        parked_seq: 0,
    };
    sim.start(options)?;
    while !sim.finished {
        if sim.waiter.stoppable() && crate::stores::stop_requested() {
            return Err(SimError::Interrupted);
        }
        let Some(Reverse((at, seq))) = sim.queue.pop() else {
            break;
        };
        let Some(ev) = sim.events.remove(&seq) else {
            continue;
        };
        sim.now_ms = at;
        sim.processed += 1;
        sim.step(ev, options)?;
    }
    let mut outcome = sim.finish()?;
    outcome.stores = infos;
    outcome.seed = options.seed;
    outcome.sample_ms = options.sample_ms;
    Ok(outcome)
}

impl<B: StateBackend> Sim<'_, B> {
    fn schedule(&mut self, at_ms: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at_ms, self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn start(&mut self, options: &RunOptions) -> Result<(), SimError> {
        let r = &self.scenario.replication;
        for i in 0..self.nodes.len() {
            self.nodes[i].core = Some(self.new_core(i));
            // Stagger the ticks so replicators do not move in lockstep.
            let first = self.rng.below(r.tick_ms.max(1));
            self.schedule(first, Ev::Tick(i));
            self.drive(i, Event::Start)?;
        }
        for fault in &self.scenario.faults {
            match *fault {
                Fault::Skew {
                    region, offset_ms, ..
                } => {
                    // Applied when the event fires (at from_s); a skew from 0 applies at once.
                    let _ = (region, offset_ms);
                }
                Fault::Crash {
                    region,
                    at_s,
                    down_s,
                    ..
                } => {
                    let at = (at_s * 1000.0) as u64;
                    let back = ((at_s + down_s) * 1000.0) as u64;
                    if at < self.heal_ms {
                        self.schedule(at, Ev::Crash(region));
                        self.schedule(back.min(self.heal_ms), Ev::Restart(region));
                    }
                }
                _ => {}
            }
        }
        if self.scenario.workload.writes_per_s > 0.0 {
            let first = self.next_write_gap();
            self.schedule(first, Ev::Write);
        }
        self.schedule(options.sample_ms, Ev::Sample);
        self.schedule(self.heal_ms, Ev::Heal);
        Ok(())
    }

    fn core_config(&self) -> CoreConfig {
        let r = &self.scenario.replication;
        CoreConfig {
            partitions: r.partitions,
            feed_batch_max: r.feed_batch_max,
            request_timeout_ms: r.request_timeout_ms,
            anti_entropy_interval_ms: r.anti_entropy_interval_ms,
            retry_backoff_ms: r.poll_interval_ms,
            retry_backoff_max_ms: (r.poll_interval_ms * 16).max(r.request_timeout_ms),
            gc_interval_ms: r.gc_interval_ms,
            ..CoreConfig::default()
        }
    }

    fn new_core(&self, i: usize) -> ReplicatorCore {
        ReplicatorCore::new(
            self.core_config(),
            &region_name(i),
            &self.nodes[i].peer_names,
        )
    }

    fn next_write_gap(&mut self) -> u64 {
        let mean_ms = 1000.0 / self.scenario.workload.writes_per_s;
        self.rng.exponential(mean_ms).round() as u64
    }

    /// Region `i`'s clock reading now: simulated time, skew and jumps applied, counted from
    /// [`WALL_CLOCK_EPOCH_MS`] so that a clock set back stays a running clock.
    fn local_ms(&self, i: usize) -> u64 {
        let t = WALL_CLOCK_EPOCH_MS as i64 + self.now_ms as i64 + self.nodes[i].offset_ms;
        t.max(0) as u64
    }

    fn trace(&mut self, tag: u8, a: u64, b: u64) {
        let mut h = self.trace;
        fnv(&mut h, &self.now_ms.to_le_bytes());
        fnv(&mut h, &[tag]);
        fnv(&mut h, &a.to_le_bytes());
        fnv(&mut h, &b.to_le_bytes());
        self.trace = h;
    }

    fn step(&mut self, ev: Ev, options: &RunOptions) -> Result<(), SimError> {
        match ev {
            Ev::Tick(i) => {
                self.trace(1, i as u64, 0);
                if self.nodes[i].core.is_some() {
                    self.drive(i, Event::Tick)?;
                }
                let next = self.now_ms + self.scenario.replication.tick_ms;
                self.schedule(next, Ev::Tick(i));
            }
            Ev::Write => {
                self.trace(2, 0, 0);
                if !self.healed {
                    self.write()?;
                    let next = self.now_ms + self.next_write_gap();
                    self.schedule(next, Ev::Write);
                }
            }
            Ev::Request {
                from,
                to,
                incarnation,
                id,
                request,
            } => {
                self.trace(3, (from * 64 + to) as u64, id);
                // The replicator serves its peers; a crashed one answers nothing.
                if self.nodes[to].core.is_none() {
                    return Ok(());
                }
                let wait_ms = match &request {
                    Request::Heads { wait_ms, .. } => u64::from(*wait_ms),
                    _ => 0,
                };
                let response = self.waiter.wait(self.nodes[to].server.serve(&request))?;
                if wait_ms > 0 && response.is_empty_poll() {
                    // Nothing new: hold the poll until a local write or the wait runs out.
                    self.parked_seq += 1;
                    let parked = self.parked_seq;
                    self.nodes[to].parked.push(Parked {
                        id: parked,
                        from,
                        incarnation,
                        request_id: id,
                        request,
                    });
                    self.schedule(self.now_ms + wait_ms, Ev::PollDeadline { node: to, parked });
                    return Ok(());
                }
                self.transmit(
                    to,
                    from,
                    Ev::Response {
                        to: from,
                        incarnation,
                        id,
                        response,
                    },
                );
            }
            Ev::Response {
                to,
                incarnation,
                id,
                response,
            } => {
                self.trace(4, to as u64, id);
                // Answers to a previous incarnation died with it.
                if self.nodes[to].core.is_some() && self.nodes[to].incarnation == incarnation {
                    self.drive(
                        to,
                        Event::Remote {
                            id,
                            result: Ok(response),
                        },
                    )?;
                }
            }
            Ev::PollDeadline { node, parked } => {
                self.trace(9, node as u64, parked);
                if let Some(pos) = self.nodes[node].parked.iter().position(|p| p.id == parked) {
                    let held = self.nodes[node].parked.remove(pos);
                    self.answer_parked(node, held)?;
                }
            }
            Ev::Crash(i) => {
                self.trace(5, i as u64, 0);
                // Polls it was holding die with it (their senders time out), and so do the
                // poll sessions it kept.
                self.nodes[i].parked.clear();
                if let Some(core) = self.nodes[i].core.take() {
                    let stats = core.stats().clone();
                    add_stats(&mut self.nodes[i].past_stats, &stats);
                }
                self.nodes[i].incarnation += 1;
                self.nodes[i].server = new_server(&self.nodes[i].store, self.nodes[i].incarnation);
            }
            Ev::Restart(i) => {
                self.trace(6, i as u64, 0);
                if self.nodes[i].core.is_none() {
                    self.nodes[i].core = Some(self.new_core(i));
                    self.drive(i, Event::Start)?;
                }
            }
            Ev::Sample => {
                self.trace(7, 0, 0);
                self.sample()?;
                if !self.finished {
                    let next = self.now_ms + options.sample_ms;
                    self.schedule(next, Ev::Sample);
                }
            }
            Ev::Heal => {
                self.trace(8, 0, 0);
                self.healed = true;
                for i in 0..self.nodes.len() {
                    if self.nodes[i].core.is_none() {
                        self.nodes[i].core = Some(self.new_core(i));
                        self.drive(i, Event::Start)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies the clock faults in force now to every region.
    fn apply_clocks(&mut self) {
        for i in 0..self.nodes.len() {
            let mut offset = 0i64;
            for fault in &self.scenario.faults {
                match *fault {
                    Fault::Skew {
                        region,
                        offset_ms,
                        from_s,
                    } if region == i && self.now_ms >= (from_s * 1000.0) as u64 => {
                        offset = offset.saturating_add(offset_ms);
                    }
                    Fault::Jump {
                        region,
                        by_ms,
                        at_s,
                    } if region == i && self.now_ms >= (at_s * 1000.0) as u64 => {
                        offset = offset.saturating_add(by_ms);
                    }
                    _ => {}
                }
            }
            self.nodes[i].offset_ms = offset;
            let local = self.local_ms(i);
            self.nodes[i].clock.set(local);
        }
    }

    /// Feeds `first` to region `i`'s core and carries out everything it asks, transitively.
    fn drive(&mut self, i: usize, first: Event) -> Result<(), SimError> {
        self.apply_clocks();
        let mut queue = std::collections::VecDeque::from([first]);
        while let Some(event) = queue.pop_front() {
            let now = self.local_ms(i);
            let Some(core) = self.nodes[i].core.as_mut() else {
                return Ok(());
            };
            let commands = core.handle(now, event);
            for command in commands {
                match command {
                    Command::Local { id, op } => {
                        let result = self.local(i, op)?;
                        queue.push_back(Event::Local { id, result });
                    }
                    Command::Send { id, peer, request } => {
                        let to = self.nodes[i].peers[peer];
                        let incarnation = self.nodes[i].incarnation;
                        self.transmit(
                            i,
                            to,
                            Ev::Request {
                                from: i,
                                to,
                                incarnation,
                                id,
                                request,
                            },
                        );
                    }
                    _ => {
                        return Err(SimError::Internal("unknown replicator command".into()));
                    }
                }
            }
        }
        Ok(())
    }

    fn local(&mut self, i: usize, op: LocalOp) -> Result<Result<LocalResult, String>, SimError> {
        if let LocalOp::ApplyFeed { peer, entries, .. } = &op {
            let origin = self.nodes[i].peers[*peer];
            let now = self.local_ms(i);
            let mut newest = Hlc::ZERO;
            for e in entries {
                let lag = now.saturating_sub(e.hlc.physical_ms()).max(1);
                let histogram = match self.lag.entry((origin, i)) {
                    std::collections::btree_map::Entry::Occupied(h) => h.into_mut(),
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        slot.insert(lag_histogram()?)
                    }
                };
                histogram.saturating_record(lag);
                self.interval_lag.saturating_record(lag);
                self.interval_applied += 1;
                newest = newest.max(e.hlc);
            }
            if newest > Hlc::ZERO && self.nodes[i].region.observe(newest).is_err() {
                self.clock_refusals += 1;
            }
        }
        let node = &self.nodes[i];
        self.waiter
            .wait(execute(node.store.as_ref(), &node.peer_names, op))
    }

    fn link_model(&self) -> LinkModel {
        let t = self.now_ms;
        if !self.healed {
            for fault in &self.scenario.faults {
                if let Fault::Degrade {
                    link,
                    from_s,
                    until_s,
                } = fault
                {
                    if t >= (from_s * 1000.0) as u64 && t < (until_s * 1000.0) as u64 {
                        return link.clone();
                    }
                }
            }
        }
        self.scenario.network.clone()
    }

    /// Whether the fault schedule cuts messages from `a` to `b` now.
    fn cut(&self, a: usize, b: usize) -> bool {
        if self.healed {
            return false;
        }
        let t = self.now_ms;
        let active = |from_s: f64, until_s: f64| {
            t >= (from_s * 1000.0) as u64 && t < ((until_s * 1000.0) as u64).min(self.heal_ms)
        };
        let n = self.nodes.len();
        self.scenario.faults.iter().any(|fault| match fault {
            Fault::Isolate {
                region,
                from_s,
                until_s,
            } => active(*from_s, *until_s) && (a == *region || b == *region),
            Fault::Split {
                groups,
                from_s,
                until_s,
            } => {
                let group_of = |r: usize| groups.iter().position(|g| g.contains(&r));
                active(*from_s, *until_s) && group_of(a) != group_of(b)
            }
            Fault::Ring { from_s, until_s } => {
                let neighbours = (a + 1) % n == b || (b + 1) % n == a;
                active(*from_s, *until_s) && !neighbours
            }
            Fault::OneWay {
                from,
                to,
                from_s,
                until_s,
            } => active(*from_s, *until_s) && a == *from && b == *to,
            Fault::Flap {
                a: x,
                b: y,
                period_ms,
                from_s,
                until_s,
            } => {
                let on_link = (a == *x && b == *y) || (a == *y && b == *x);
                let start = (from_s * 1000.0) as u64;
                let down = (t.saturating_sub(start) % period_ms) < period_ms / 2;
                on_link && active(*from_s, *until_s) && down
            }
            _ => false,
        })
    }

    /// Sends a message over the simulated network: it may be cut, lost, delayed, reordered or
    /// duplicated.
    fn transmit(&mut self, from: usize, to: usize, ev: Ev) {
        if self.cut(from, to) {
            self.dropped += 1;
            return;
        }
        let link = self.link_model();
        if self.net_rng.chance(link.loss) {
            self.dropped += 1;
            return;
        }
        let delay = |rng: &mut Rng| {
            let mut d = link.latency_ms + rng.below(link.jitter_ms + 1);
            if link.reorder_ms > 0 && rng.chance(0.25) {
                d += rng.below(link.reorder_ms + 1);
            }
            d.max(1)
        };
        let first = delay(&mut self.net_rng);
        if self.net_rng.chance(link.duplicate) {
            let second = delay(&mut self.net_rng);
            let copy = match &ev {
                Ev::Request {
                    from,
                    to,
                    incarnation,
                    id,
                    request,
                } => Some(Ev::Request {
                    from: *from,
                    to: *to,
                    incarnation: *incarnation,
                    id: *id,
                    request: request.clone(),
                }),
                Ev::Response {
                    to,
                    incarnation,
                    id,
                    response,
                } => Some(Ev::Response {
                    to: *to,
                    incarnation: *incarnation,
                    id: *id,
                    response: response.clone(),
                }),
                _ => None,
            };
            if let Some(copy) = copy {
                self.duplicated += 1;
                self.schedule(self.now_ms + second, copy);
            }
        }
        self.schedule(self.now_ms + first, ev);
    }

    fn pick_kind(&mut self) -> (KeyKind, usize) {
        let total: u64 = self.kind_weights.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut roll = self.rng.below(total);
        let mut kind = KeyKind::Counter;
        for (k, w) in &self.kind_weights {
            if roll < u64::from(*w) {
                kind = *k;
                break;
            }
            roll -= u64::from(*w);
        }
        let keys = self
            .keys_per_kind
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(1, |(_, n)| *n);
        (kind, keys)
    }

    fn field_op(&mut self, depth: usize) -> FieldOp {
        match self.rng.below(if depth > 0 { 4 } else { 5 }) {
            0 => FieldOp::Counter(CounterOp::inc(1 + self.rng.below(5))),
            1 => {
                let element = format!("x{}", self.rng.below(8));
                if self.rng.chance(0.3) {
                    FieldOp::Set(SetOp::remove(element))
                } else {
                    FieldOp::Set(SetOp::add(element))
                }
            }
            2 => FieldOp::Lww(RegisterOp::write(format!("w{}", self.rng.below(1000)))),
            3 => FieldOp::Mv(RegisterOp::write(format!("v{}", self.rng.below(1000)))),
            _ => {
                let key = format!("n{}", self.rng.below(3));
                FieldOp::Map(Box::new(MapOp::update(key, self.field_op(depth + 1))))
            }
        }
    }

    fn write(&mut self) -> Result<(), SimError> {
        let region = self.rng.below(self.nodes.len() as u64) as usize;
        let (kind, keys) = self.pick_kind();
        let key = format!("{}:{}", kind.letter(), self.rng.below(keys as u64));
        let w = &self.scenario.workload;
        let (dec_share, remove_share, delete_share) =
            (w.counter_dec_share, w.set_remove_share, w.delete_share);
        let op = if self.rng.chance(delete_share) {
            Op::Delete
        } else {
            self.op_for(kind, dec_share, remove_share, delete_share)
        };
        self.commit(region, key, op)
    }

    fn op_for(&mut self, kind: KeyKind, dec_share: f64, remove_share: f64, clear_share: f64) -> Op {
        match kind {
            KeyKind::Counter => {
                let n = 1 + self.rng.below(10);
                if self.rng.chance(dec_share) {
                    Op::Counter(CounterOp::dec(n))
                } else {
                    Op::Counter(CounterOp::inc(n))
                }
            }
            KeyKind::Set => {
                let element = format!("e{}", self.rng.below(16));
                if self.rng.chance(clear_share) {
                    Op::Set(SetOp::Clear)
                } else if self.rng.chance(remove_share) {
                    Op::Set(SetOp::remove(element))
                } else {
                    Op::Set(SetOp::add(element))
                }
            }
            KeyKind::Lww => Op::Lww(RegisterOp::write(format!("l{}", self.rng.below(1_000_000)))),
            KeyKind::Opaque => Op::Mv(RegisterOp::write(format!("o{}", self.rng.below(1_000_000)))),
            KeyKind::Map => {
                let field = format!("f{}", self.rng.below(6));
                if self.rng.chance(0.1) {
                    Op::Map(MapOp::remove(field))
                } else {
                    let fop = self.field_op(0);
                    Op::Map(MapOp::update(field, fop))
                }
            }
        }
    }

    fn commit(&mut self, region: usize, key: String, op: Op) -> Result<(), SimError> {
        self.apply_clocks();
        let node = &self.nodes[region];
        let write = LocalWrite {
            key: Key::new(key.clone()).map_err(|e| SimError::Internal(e.to_string()))?,
            op: op.clone(),
            actor: node.region.actor(),
            hlc: node.region.now(),
            expect: Expect::Any,
        };
        match self.waiter.wait(node.store.apply(write))? {
            Ok(receipt) => {
                let fed = receipt.seq.is_some();
                self.acked.push(AckedWrite {
                    at_ms: self.now_ms,
                    region,
                    key,
                    op,
                    delta: receipt.delta,
                });
                if fed {
                    self.wake_parked(region)?;
                }
            }
            Err(BackendError::Unavailable(m)) => {
                return Err(SimError::Store(format!(
                    "region {}: a client write's outcome is unknown ({m}); the checks need \
                     the outcome of every write, so the run stops",
                    region_name(region)
                )))
            }
            Err(_) => self.failed_writes += 1,
        }
        Ok(())
    }

    /// Answers the long polls `node` holds, one of them just got news: a local write. Polls
    /// are asked oldest first; once one poll of a session is answered with less than its
    /// limit, the session's other polls have nothing new and are not asked.
    fn wake_parked(&mut self, node: usize) -> Result<(), SimError> {
        let held = std::mem::take(&mut self.nodes[node].parked);
        let mut drained = Vec::new();
        for parked in held {
            let Request::Heads { session, limit, .. } = &parked.request else {
                self.nodes[node].parked.push(parked);
                continue;
            };
            if drained.contains(session) {
                self.nodes[node].parked.push(parked);
                continue;
            }
            let response = self
                .waiter
                .wait(self.nodes[node].server.serve_held(&parked.request))?;
            if let Response::Heads { pages, .. } = &response {
                let sent: usize = pages.iter().map(|p| p.entries.len()).sum();
                if sent < *limit as usize {
                    drained.push(*session);
                }
            }
            if response.is_empty_poll() {
                self.nodes[node].parked.push(parked);
            } else {
                self.transmit(
                    node,
                    parked.from,
                    Ev::Response {
                        to: parked.from,
                        incarnation: parked.incarnation,
                        id: parked.request_id,
                        response,
                    },
                );
            }
        }
        Ok(())
    }

    fn answer_parked(&mut self, node: usize, parked: Parked) -> Result<(), SimError> {
        let response = self
            .waiter
            .wait(self.nodes[node].server.serve_held(&parked.request))?;
        self.transmit(
            node,
            parked.from,
            Ev::Response {
                to: parked.from,
                incarnation: parked.incarnation,
                id: parked.request_id,
                response,
            },
        );
        Ok(())
    }

    fn digests(&self) -> Result<Vec<Vec<Vec<u64>>>, SimError> {
        let partitions = self.scenario.replication.partitions;
        let mut all = Vec::with_capacity(self.nodes.len());
        for (i, node) in self.nodes.iter().enumerate() {
            let mut per = Vec::with_capacity(usize::from(partitions));
            for p in 0..partitions {
                let d = self
                    .waiter
                    .wait(node.store.digest(p))?
                    .map_err(|e| store_failed(i, "reading a digest", e))?;
                per.push(d.buckets().to_vec());
            }
            all.push(per);
        }
        Ok(all)
    }

    /// Tombstones held by all regions together.
    fn tombstones(&self) -> Result<u64, SimError> {
        let mut total = 0;
        for (i, node) in self.nodes.iter().enumerate() {
            for partition in 0..self.scenario.replication.partitions {
                let mut after: Option<Key> = None;
                loop {
                    let page = self
                        .waiter
                        .wait(node.store.tombstones(
                            partition,
                            after.as_ref(),
                            geostate_backends::PAGE_LIMIT_MAX,
                        ))?
                        .map_err(|e| store_failed(i, "listing tombstones", e))?;
                    total += page.items.len() as u64;
                    match page.next {
                        Some(next) => after = Some(next),
                        None => break,
                    }
                }
            }
        }
        Ok(total)
    }

    fn sample(&mut self) -> Result<(), SimError> {
        let digests = self.digests()?;
        let mut divergence = 0u64;
        for a in 0..digests.len() {
            for b in a + 1..digests.len() {
                for (pa, pb) in digests[a].iter().zip(&digests[b]) {
                    divergence += pa.iter().zip(pb).filter(|(x, y)| x != y).count() as u64;
                }
            }
        }
        let lag_p99_ms = if self.interval_lag.is_empty() {
            0
        } else {
            self.interval_lag.value_at_quantile(0.99)
        };
        self.samples.push(Sample {
            at_ms: self.now_ms,
            divergence,
            lag_p99_ms,
            applied: self.interval_applied,
        });
        self.interval_lag.reset();
        self.interval_applied = 0;
        if self.healed {
            let alive = self.nodes.iter().all(|n| n.core.is_some());
            if alive && divergence == 0 {
                if self.converged_ms.is_none() {
                    self.converged_ms = Some(self.now_ms);
                }
                // Then give garbage collection its time: the run ends once every tombstone
                // is purged everywhere (or at the timeout, which reports those pending).
                if self.scenario.replication.gc_interval_ms == 0 || self.tombstones()? == 0 {
                    self.finished = true;
                }
            } else if self.now_ms
                >= self.heal_ms + (self.scenario.converge_timeout_s * 1000.0) as u64
            {
                self.finished = true;
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Outcome, SimError> {
        let mut states = Vec::new();
        let mut payloads = Vec::new();
        let mut resolved = Vec::new();
        let mut conflicts = Vec::new();
        let mut tombstones = Vec::new();
        let mut stats = Vec::new();
        for i in 0..self.nodes.len() {
            self.apply_clocks();
            let node = &self.nodes[i];
            let mut values = BTreeMap::new();
            let mut bytes = BTreeMap::new();
            let mut after: Option<Key> = None;
            loop {
                let page = self
                    .waiter
                    .wait(node.store.scan("", after.as_ref(), 10_000))?
                    .map_err(|e| store_failed(i, "scanning the final state", e))?;
                for item in page.items {
                    let stored = item.value.map_err(|e| SimError::Internal(e.to_string()))?;
                    let payload = envelope::canonical_payload(&stored.value)
                        .map_err(|e| SimError::Internal(e.to_string()))?;
                    bytes.insert(item.key.as_str().to_string(), payload);
                    values.insert(item.key.as_str().to_string(), stored.value);
                }
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            let mut opaque = BTreeMap::new();
            for key in values
                .keys()
                .filter(|k| KeyKind::of(k) == Some(KeyKind::Opaque))
            {
                let value = self
                    .waiter
                    .wait(node.region.get(key))?
                    .map_err(|e| region_failed(i, "resolving an opaque value", e))?;
                opaque.insert(key.clone(), value);
            }
            let records = self
                .waiter
                .wait(
                    node.store
                        .read_conflicts(0, geostate_backends::PAGE_LIMIT_MAX),
                )?
                .map_err(|e| store_failed(i, "reading the conflict feed", e))?;
            conflicts.push(records.len() as u64);
            tombstones.push(values.values().filter(|v| v.is_bottom()).count() as u64);
            let mut total = node.past_stats.clone();
            if let Some(core) = &node.core {
                add_stats(&mut total, core.stats());
            }
            stats.push(total);
            states.push(values);
            payloads.push(bytes);
            resolved.push(opaque);
        }
        let network = &self.scenario.network;
        Ok(Outcome {
            scenario: self.scenario.name.clone(),
            seed: 0,
            regions: (0..self.nodes.len()).map(region_name).collect(),
            stores: Vec::new(),
            heal_ms: self.heal_ms,
            converged_ms: self.converged_ms,
            converge_timeout_ms: (self.scenario.converge_timeout_s * 1000.0) as u64,
            anti_entropy_interval_ms: self.scenario.replication.anti_entropy_interval_ms,
            poll_interval_ms: self.scenario.replication.poll_interval_ms,
            link_latency_max_ms: network.latency_ms + network.jitter_ms + network.reorder_ms,
            link_loss_healed: network.loss,
            core: self.core_config(),
            buckets: self.scenario.replication.buckets,
            tick_ms: self.scenario.replication.tick_ms,
            sample_ms: 0,
            trace_hash: self.trace,
            events: self.processed,
            acked: self.acked,
            failed_writes: self.failed_writes,
            states,
            payloads,
            resolved,
            conflicts,
            tombstones,
            lag: self.lag,
            stats,
            messages_dropped: self.dropped,
            messages_duplicated: self.duplicated,
            clock_refusals: self.clock_refusals,
            samples: self.samples,
        })
    }
}
