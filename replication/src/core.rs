//! The replication protocol as a pure state machine: events in, commands out.
//!
//! One [`ReplicatorCore`] runs in each region and pulls from every peer. It never awaits,
//! never reads a clock (time comes with every call) and never touches a store or a socket:
//! it asks its driver to, through [`Command`]s, and learns the outcome through [`Event`]s. The
//! async driver ([`crate::driver`]) and the simulator both run this same logic.
//!
//! ## Feed shipping
//! For each peer the core keeps one long poll out ([`Request::Heads`]) carrying its cursor for
//! every partition. The peer answers with pages of the entries after those cursors, holding the
//! poll (up to `pull_wait_ms`) while it has nothing new, so a write reaches the puller about
//! one one-way latency after the poll is back at the peer. The core applies each page by
//! idempotent merge and advances the cursor in its own store only after the merges
//! ([`LocalOp::ApplyFeed`]), so a crash at any point loses nothing and re-applying a page
//! changes nothing; the next poll goes out once the page's merges are done, with the new
//! cursors. Partitions a page limit left behind are fetched with [`Request::Feed`].
//!
//! ## Anti-entropy
//! When a peer's feed was trimmed past the cursor, the cursor jumps to the oldest entry still
//! held and the partition is queued for anti-entropy; every partition is also swept
//! periodically (all of a peer's partitions once per `anti_entropy_interval_ms`). A round on
//! one partition compares bucket fingerprints ([`Request::Digest`]), then the `(key, hash)`
//! lists of the differing buckets ([`Request::Buckets`]), then pulls the peer's states of the
//! keys that differ ([`Request::States`]) and pushes ours ([`Request::Push`]). Because a state
//! carries everything its region has merged, this also carries region A's writes to region C
//! through B while the A–C link is cut.

mod gc;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use hdrhistogram::Histogram;

use crate::wire::{Request, Response, WireEntry};

/// Protocol settings. Every queue and batch is bounded by one of these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreConfig {
    /// Partitions of the keyspace (must match every region's layout).
    pub partitions: u16,
    /// Least time between sending two polls to a peer when the first one got no answer (a
    /// failure also backs off); after an answer the next poll goes out as soon as the answer's
    /// pages are applied.
    pub poll_interval_ms: u64,
    /// How long a peer may hold a heads poll that has nothing new (a long poll): a write at
    /// the peer answers it at once, so replication lag is about one one-way latency.
    pub pull_wait_ms: u64,
    /// Most entries per feed request.
    pub feed_batch_max: u32,
    /// Most requests in flight to one peer.
    pub requests_in_flight_max: usize,
    /// A request unanswered for this long is abandoned and retried.
    pub request_timeout_ms: u64,
    /// First retry delay after a failure; doubles per consecutive failure.
    pub retry_backoff_ms: u64,
    /// Longest retry delay.
    pub retry_backoff_max_ms: u64,
    /// Time to sweep all partitions of a peer once with anti-entropy.
    pub anti_entropy_interval_ms: u64,
    /// Most differing buckets examined per anti-entropy round.
    pub ae_buckets_per_round_max: usize,
    /// Most differing keys exchanged per anti-entropy round.
    pub ae_keys_per_round_max: usize,
    /// Time to sweep all partitions once for causally stable tombstones to purge (one
    /// partition per `gc_interval_ms / partitions`); `0` keeps every tombstone.
    pub gc_interval_ms: u64,
    /// Most tombstones examined per garbage-collection round.
    pub gc_keys_per_round_max: usize,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            partitions: 256,
            poll_interval_ms: 100,
            pull_wait_ms: 1_000,
            feed_batch_max: 512,
            requests_in_flight_max: 16,
            request_timeout_ms: 2_000,
            retry_backoff_ms: 100,
            retry_backoff_max_ms: 5_000,
            anti_entropy_interval_ms: 30_000,
            ae_buckets_per_round_max: 64,
            ae_keys_per_round_max: 1_024,
            gc_interval_ms: 60_000,
            gc_keys_per_round_max: 256,
        }
    }
}

/// A peer, by its index in the peer list given to [`ReplicatorCore::new`].
pub type PeerId = usize;

/// Identifies a command so its outcome can be matched to it.
pub type CommandId = u64;

/// Something that happened.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The replicator starts (or restarts after a crash).
    Start,
    /// Time passed; timers may fire.
    Tick,
    /// A peer answered a [`Command::Send`] (or the transport gave up on it).
    Remote {
        /// The command's id.
        id: CommandId,
        /// The answer, or why there is none.
        result: Result<Response, String>,
    },
    /// The driver carried out a [`Command::Local`].
    Local {
        /// The command's id.
        id: CommandId,
        /// The outcome.
        result: Result<LocalResult, String>,
    },
}

/// Something the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// Send `request` to `peer`; answer with [`Event::Remote`] carrying `id`.
    Send {
        /// Matches the answer.
        id: CommandId,
        /// The peer.
        peer: PeerId,
        /// What to ask.
        request: Request,
    },
    /// Do `op` on the local store; answer with [`Event::Local`] carrying `id`.
    Local {
        /// Matches the outcome.
        id: CommandId,
        /// What to do.
        op: LocalOp,
    },
}

/// An operation on the local store.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalOp {
    /// Read the cursors of every (peer, partition). Answer: [`LocalResult::Cursors`].
    LoadCursors,
    /// Merge each entry's delta into its key, then raise the cursor of (peer, partition) to
    /// `advance_to`. Answer: [`LocalResult::Applied`].
    ApplyFeed {
        /// The origin.
        peer: PeerId,
        /// The partition.
        partition: u16,
        /// The entries, in order.
        entries: Vec<WireEntry>,
        /// The cursor after them.
        advance_to: u64,
    },
    /// Read the local bucket fingerprints. Answer: [`LocalResult::Digest`].
    Digest {
        /// The partition.
        partition: u16,
    },
    /// Read `(key, hash)` of local buckets. Answer: [`LocalResult::Buckets`].
    Buckets {
        /// The partition.
        partition: u16,
        /// The buckets.
        buckets: Vec<u16>,
    },
    /// Read local full states. Answer: [`LocalResult::States`].
    States {
        /// The keys.
        keys: Vec<String>,
    },
    /// Merge full states received from a peer. Answer: [`LocalResult::Merged`].
    MergeStates {
        /// `(key, envelope)` pairs.
        states: Vec<(String, Vec<u8>)>,
    },
    /// List the partition's tombstones and read its feed head (after the listing). Answer:
    /// [`LocalResult::Tombstones`].
    Tombstones {
        /// The partition.
        partition: u16,
        /// Resume after this key (the previous listing's `next`).
        after: Option<String>,
        /// Most tombstones.
        limit: usize,
    },
    /// Purge causally stable tombstones, each only if still at the version listed. Answer:
    /// [`LocalResult::Purged`].
    Purge {
        /// `(key, version)` pairs.
        keys: Vec<(String, u64)>,
    },
}

/// The outcome of a [`LocalOp`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalResult {
    /// Cursors indexed `[peer][partition]`.
    Cursors(Vec<Vec<u64>>),
    /// The feed page was merged and the cursor raised.
    Applied,
    /// Local bucket fingerprints.
    Digest(Vec<u64>),
    /// Local `(key, hash)` entries of the asked buckets.
    Buckets(Vec<(String, u64)>),
    /// Local states; `None` for absent keys.
    States(Vec<(String, Option<Vec<u8>>)>),
    /// Pulled states merged; `merged` of them changed or created a key.
    Merged {
        /// How many were merged.
        merged: usize,
        /// The value hash of each merged key after the merge (see
        /// `geostate_backends::digest::value_hash`).
        hashes: Vec<(String, u64)>,
    },
    /// The partition's tombstones and feed head.
    Tombstones {
        /// `(key, version, value hash)` in key order.
        items: Vec<(String, u64, u64)>,
        /// Where the next listing of the partition resumes; `None` at the end.
        next: Option<String>,
        /// The newest sequence number of the local feed of the partition.
        head: u64,
    },
    /// How many tombstones were purged.
    Purged(usize),
}

/// Counters of what the replicator did, for reports and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests sent.
    pub requests: u64,
    /// Requests that failed or timed out.
    pub failures: u64,
    /// Feed entries applied.
    pub entries_applied: u64,
    /// Bytes of feed traffic (requests and responses of heads and feed pages).
    pub feed_bytes: u64,
    /// Bytes of anti-entropy traffic (digests, bucket lists, states both ways).
    pub ae_bytes: u64,
    /// Anti-entropy rounds completed.
    pub ae_rounds: u64,
    /// Keys whose states anti-entropy pulled or pushed.
    pub ae_keys: u64,
    /// Feed gaps found (a peer trimmed entries this region had not applied).
    pub gaps: u64,
    /// Tombstones waiting for causal stability, as last counted (a gauge).
    pub tombstones_pending: u64,
    /// Tombstones purged once causally stable.
    pub tombstones_purged: u64,
}

/// The per-(peer, partition) feed state.
#[derive(Clone, Debug, Default)]
struct Link {
    cursor: u64,
    head: u64,
    fetching: bool,
}

/// One anti-entropy round's progress on one partition.
#[derive(Clone, Debug)]
enum Round {
    Idle,
    Digest {
        partition: u16,
        remote: Option<Vec<u64>>,
        local: Option<Vec<u64>>,
    },
    Buckets {
        partition: u16,
        remote: Option<Vec<(String, u64)>>,
        local: Option<Vec<(String, u64)>>,
    },
    /// Pull the peer's differing states first, then push only the keys that still differ
    /// from the peer's after the merge (a key the peer simply had newer needs no push).
    Exchange {
        partition: u16,
        /// The peer's hashes of the differing keys.
        remote: BTreeMap<String, u64>,
        /// Our keys that differed before the pull.
        push: Vec<String>,
        pulled: Option<()>,
        pushed: Option<()>,
    },
}

impl Round {
    fn partition(&self) -> Option<u16> {
        match self {
            Round::Idle => None,
            Round::Digest { partition, .. }
            | Round::Buckets { partition, .. }
            | Round::Exchange { partition, .. } => Some(*partition),
        }
    }
}

#[derive(Debug)]
struct Peer {
    links: Vec<Link>,
    heads_in_flight: bool,
    next_heads_ms: u64,
    in_flight: usize,
    failures_in_a_row: u32,
    retry_at_ms: u64,
    round: Round,
    /// Partitions waiting for anti-entropy because their feed had a gap.
    urgent: BTreeSet<u16>,
    next_sweep_partition: u16,
    next_sweep_ms: u64,
    /// Feed pages being merged; the next poll waits for them so it carries fresh cursors.
    applying: usize,
    /// Requests of the current round waiting for an in-flight slot.
    deferred: VecDeque<(Request, Purpose)>,
    lag_ms: Histogram<u64>,
}

/// What an in-flight command was for.
#[derive(Clone, Debug)]
enum Purpose {
    Cursors,
    Heads {
        peer: PeerId,
        /// The cursors the poll was sent with (`u64::MAX` for partitions being fetched).
        after: Vec<u64>,
    },
    Feed {
        peer: PeerId,
        partition: u16,
    },
    Apply {
        peer: PeerId,
        partition: u16,
        advance_to: u64,
        hlc_ms: Vec<u64>,
    },
    RemoteDigest {
        peer: PeerId,
    },
    LocalDigest {
        peer: PeerId,
    },
    RemoteBuckets {
        peer: PeerId,
    },
    LocalBuckets {
        peer: PeerId,
    },
    RemoteStates {
        peer: PeerId,
    },
    LocalStates {
        peer: PeerId,
    },
    MergePulled {
        peer: PeerId,
    },
    Push {
        peer: PeerId,
    },
    /// A request of an abandoned anti-entropy round: still out, so still counted in flight
    /// until it is answered or times out, but its answer is ignored.
    Stale {
        peer: PeerId,
    },
    GcList {
        round: u64,
    },
    GcProbe {
        peer: PeerId,
        round: u64,
    },
    GcPurge {
        peer: PeerId,
    },
    GcPurgeLocal {
        round: u64,
        partition: u16,
    },
}

#[derive(Clone, Debug)]
struct Pending {
    purpose: Purpose,
    /// Remote requests time out; local operations do not (the store reports failures).
    deadline_ms: Option<u64>,
}

/// The replicator of one region; see the [module docs](self).
///
/// ```
/// use geostate_replication::core::{Command, CoreConfig, Event, LocalOp, LocalResult, ReplicatorCore};
/// use geostate_replication::wire::{Request, Response};
///
/// let config = CoreConfig { partitions: 2, ..CoreConfig::default() };
/// let mut core = ReplicatorCore::new(config, "us-east", &["eu-west".to_string()]);
/// // Starting asks for the stored cursors...
/// let commands = core.handle(0, Event::Start);
/// let Command::Local { id, op: LocalOp::LoadCursors } = commands[0].clone() else { panic!() };
/// // ...and once they are loaded, the first poll asks the peer for its feed heads.
/// let commands = core.handle(0, Event::Local { id, result: Ok(LocalResult::Cursors(vec![vec![0, 0]])) });
/// assert!(commands.iter().any(|c| matches!(c, Command::Send { request: Request::Heads { .. }, .. })));
/// ```
#[derive(Debug)]
pub struct ReplicatorCore {
    config: CoreConfig,
    peers: Vec<Peer>,
    started: bool,
    next_id: CommandId,
    pending: BTreeMap<CommandId, Pending>,
    stats: Stats,
    /// Local physical time of the event being handled.
    now_ms: u64,
    /// This region's name (peers key their cursors on our feed by it).
    region: String,
    /// The peers' names, by index.
    peer_names: Vec<String>,
    gc: gc::Gc,
}

fn histogram() -> Histogram<u64> {
    // Lags from 1 ms to about 2.8 hours at 3 significant digits; larger values saturate.
    match Histogram::new_with_bounds(1, 10_000_000, 3) {
        Ok(h) => h,
        Err(_) => Histogram::new(3).unwrap_or_else(|_| unreachable_histogram()),
    }
}

#[allow(clippy::panic)]
fn unreachable_histogram() -> Histogram<u64> {
    panic!("hdrhistogram rejected constant bounds")
}

impl ReplicatorCore {
    /// The replicator of region `region`, pulling from `peers` (by name; a peer's index in
    /// this list is its [`PeerId`]). Tombstones are only purged once every one of them has
    /// applied them, so `peers` must name every other region.
    pub fn new(config: CoreConfig, region: &str, peers: &[String]) -> Self {
        let peer_count = peers.len();
        let peers_state = (0..peer_count)
            .map(|i| Peer {
                links: vec![Link::default(); usize::from(config.partitions)],
                heads_in_flight: false,
                next_heads_ms: 0,
                in_flight: 0,
                failures_in_a_row: 0,
                retry_at_ms: 0,
                round: Round::Idle,
                urgent: BTreeSet::new(),
                // Stagger the peers' sweeps so they do not all start at once.
                next_sweep_partition: (i as u16).wrapping_mul(7) % config.partitions.max(1),
                next_sweep_ms: 0,
                deferred: VecDeque::new(),
                applying: 0,
                lag_ms: histogram(),
            })
            .collect();
        Self {
            gc: gc::Gc::new(config.partitions),
            config,
            peers: peers_state,
            started: false,
            next_id: 1,
            pending: BTreeMap::new(),
            stats: Stats::default(),
            now_ms: 0,
            region: region.to_string(),
            peer_names: peers.to_vec(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// What the replicator has done so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Replication lag from `peer` (apply time minus the write's HLC, milliseconds).
    pub fn lag_ms(&self, peer: PeerId) -> Option<&Histogram<u64>> {
        self.peers.get(peer).map(|p| &p.lag_ms)
    }

    /// The cursor of (peer, partition): everything up to it has been applied.
    pub fn cursor(&self, peer: PeerId, partition: u16) -> Option<u64> {
        self.peers
            .get(peer)
            .and_then(|p| p.links.get(usize::from(partition)))
            .map(|l| l.cursor)
    }

    /// Requests to `peer` sent and neither answered nor timed out (at most
    /// [`CoreConfig::requests_in_flight_max`]).
    pub fn in_flight(&self, peer: PeerId) -> usize {
        self.peers.get(peer).map_or(0, |p| p.in_flight)
    }

    /// How many feed entries of `peer` are known but not yet applied.
    pub fn backlog(&self, peer: PeerId) -> u64 {
        self.peers.get(peer).map_or(0, |p| {
            p.links
                .iter()
                .map(|l| l.head.saturating_sub(l.cursor))
                .sum()
        })
    }

    /// Whether every known feed entry of every peer is applied and no anti-entropy is queued.
    pub fn is_idle(&self) -> bool {
        self.started
            && self.peers.iter().all(|p| {
                p.urgent.is_empty()
                    && matches!(p.round, Round::Idle)
                    && p.links.iter().all(|l| l.cursor >= l.head && !l.fetching)
            })
    }

    /// Feeds one event at local physical time `now_ms`; returns what the driver must do.
    pub fn handle(&mut self, now_ms: u64, event: Event) -> Vec<Command> {
        if now_ms < self.now_ms {
            self.clock_stepped_back(self.now_ms - now_ms);
        }
        self.now_ms = now_ms;
        let mut out = Vec::new();
        match event {
            Event::Start => {
                self.pending.clear();
                self.started = false;
                let id = self.issue(Purpose::Cursors, None);
                out.push(Command::Local {
                    id,
                    op: LocalOp::LoadCursors,
                });
                return out;
            }
            Event::Tick => self.expire(now_ms),
            Event::Remote { id, result } => {
                if let Some(p) = self.pending.remove(&id) {
                    self.on_remote(now_ms, p.purpose, result, &mut out);
                }
            }
            Event::Local { id, result } => {
                if let Some(p) = self.pending.remove(&id) {
                    self.on_local(now_ms, p.purpose, result, &mut out);
                }
            }
        }
        if self.started {
            self.schedule(now_ms, &mut out);
        }
        out
    }

    /// The clock was set back by `by_ms` (an NTP step, a VM restore). Every timer is moved
    /// back by as much, so it still fires after the delay it was set for: otherwise heads
    /// polls, retries, sweeps and request timeouts would all wait until the clock caught up
    /// again, and the region would stop pulling for as long as the step.
    fn clock_stepped_back(&mut self, by_ms: u64) {
        for p in &mut self.peers {
            p.next_heads_ms = p.next_heads_ms.saturating_sub(by_ms);
            p.retry_at_ms = p.retry_at_ms.saturating_sub(by_ms);
            p.next_sweep_ms = p.next_sweep_ms.saturating_sub(by_ms);
        }
        for pending in self.pending.values_mut() {
            if let Some(deadline) = pending.deadline_ms.as_mut() {
                *deadline = deadline.saturating_sub(by_ms);
            }
        }
        self.gc.clock_stepped_back(by_ms);
    }

    fn issue(&mut self, purpose: Purpose, deadline_ms: Option<u64>) -> CommandId {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(
            id,
            Pending {
                purpose,
                deadline_ms,
            },
        );
        id
    }

    fn send(&mut self, peer: PeerId, request: Request, purpose: Purpose) -> Command {
        // A long poll may be held by the peer for up to its wait before it is answered.
        let held_ms = match &request {
            Request::Heads { wait_ms, .. } => u64::from(*wait_ms),
            _ => 0,
        };
        let deadline = self.now_ms + held_ms + self.config.request_timeout_ms;
        let id = self.issue(purpose, Some(deadline));
        self.peers[peer].in_flight += 1;
        self.stats.requests += 1;
        let bytes = request.wire_bytes() as u64;
        match request {
            Request::Heads { .. } | Request::Feed { .. } => self.stats.feed_bytes += bytes,
            _ => self.stats.ae_bytes += bytes,
        }
        Command::Send { id, peer, request }
    }

    /// Sends a later step of an anti-entropy round, or keeps it for [`Self::schedule`] if the
    /// peer has no free in-flight slot.
    fn send_or_defer(
        &mut self,
        peer: PeerId,
        request: Request,
        purpose: Purpose,
        out: &mut Vec<Command>,
    ) {
        if self.peers[peer].in_flight < self.config.requests_in_flight_max {
            out.push(self.send(peer, request, purpose));
        } else {
            self.peers[peer].deferred.push_back((request, purpose));
        }
    }

    fn local(&mut self, op: LocalOp, purpose: Purpose) -> Command {
        let id = self.issue(purpose, None);
        Command::Local { id, op }
    }

    /// Abandons requests past their deadline, as failures.
    fn expire(&mut self, now_ms: u64) {
        let expired: Vec<CommandId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline_ms.is_some_and(|d| d <= now_ms))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                let mut ignored = Vec::new();
                self.on_remote(now_ms, p.purpose, Err("timed out".into()), &mut ignored);
            }
        }
    }

    fn peer_of(purpose: &Purpose) -> Option<PeerId> {
        match *purpose {
            Purpose::Cursors | Purpose::GcList { .. } | Purpose::GcPurgeLocal { .. } => None,
            Purpose::Heads { peer, .. }
            | Purpose::Feed { peer, .. }
            | Purpose::Apply { peer, .. }
            | Purpose::RemoteDigest { peer }
            | Purpose::LocalDigest { peer }
            | Purpose::RemoteBuckets { peer }
            | Purpose::LocalBuckets { peer }
            | Purpose::RemoteStates { peer }
            | Purpose::LocalStates { peer }
            | Purpose::MergePulled { peer }
            | Purpose::Push { peer }
            | Purpose::Stale { peer }
            | Purpose::GcProbe { peer, .. }
            | Purpose::GcPurge { peer } => Some(peer),
        }
    }

    fn fail(&mut self, now_ms: u64, peer: PeerId) {
        self.stats.failures += 1;
        let p = &mut self.peers[peer];
        p.failures_in_a_row = p.failures_in_a_row.saturating_add(1);
        let shift = p.failures_in_a_row.min(16) - 1;
        let delay = self
            .config
            .retry_backoff_ms
            .saturating_mul(1 << shift)
            .min(self.config.retry_backoff_max_ms);
        p.retry_at_ms = now_ms + delay;
    }

    fn on_remote(
        &mut self,
        now_ms: u64,
        purpose: Purpose,
        result: Result<Response, String>,
        out: &mut Vec<Command>,
    ) {
        let Some(peer) = Self::peer_of(&purpose) else {
            return;
        };
        self.peers[peer].in_flight = self.peers[peer].in_flight.saturating_sub(1);
        if matches!(purpose, Purpose::Stale { .. }) {
            return;
        }
        let response = match result {
            Ok(Response::Failed { .. }) | Err(_) => {
                self.abandon(purpose);
                self.fail(now_ms, peer);
                return;
            }
            Ok(r) => r,
        };
        // Restored if the answer turns out to be of the wrong kind (a failure).
        let failures_in_a_row = std::mem::take(&mut self.peers[peer].failures_in_a_row);
        let bytes = response.wire_bytes() as u64;
        match (&purpose, response) {
            (Purpose::Heads { after, .. }, Response::Heads { last_seqs, pages }) => {
                self.stats.feed_bytes += bytes;
                let p = &mut self.peers[peer];
                p.heads_in_flight = false;
                // A long poll came back: poll again at once (the peer holds it until there
                // is something new, so this does not spin).
                p.next_heads_ms = now_ms;
                for (link, head) in p.links.iter_mut().zip(last_seqs) {
                    link.head = link.head.max(head);
                }
                for page in pages {
                    let index = usize::from(page.partition);
                    if let Some(link) = self.peers[peer].links.get_mut(index) {
                        link.head = link.head.max(page.last_seq);
                    }
                    let Some(link) = self.peers[peer].links.get(index) else {
                        continue;
                    };
                    // Only a page cut at the cursor we still stand at, for a partition no one
                    // else is fetching, is taken; anything else is fetched again.
                    let sent = after.get(index).copied().unwrap_or(u64::MAX);
                    if link.fetching || sent != link.cursor {
                        continue;
                    }
                    self.peers[peer].links[index].fetching = true;
                    self.accept_page(
                        peer,
                        page.partition,
                        page.entries,
                        page.first_seq,
                        page.last_seq,
                        out,
                    );
                }
            }
            (
                Purpose::Feed { partition, .. },
                Response::Feed {
                    entries,
                    first_seq,
                    last_seq,
                },
            ) => {
                self.stats.feed_bytes += bytes;
                let partition = *partition;
                self.accept_page(peer, partition, entries, first_seq, last_seq, out);
            }
            (Purpose::RemoteDigest { .. }, Response::Digest { buckets }) => {
                self.stats.ae_bytes += bytes;
                if let Round::Digest { remote, .. } = &mut self.peers[peer].round {
                    *remote = Some(buckets);
                }
                self.advance_round(peer, out);
            }
            (Purpose::RemoteBuckets { .. }, Response::Buckets { entries }) => {
                self.stats.ae_bytes += bytes;
                if let Round::Buckets { remote, .. } = &mut self.peers[peer].round {
                    *remote = Some(entries);
                }
                self.advance_round(peer, out);
            }
            (Purpose::RemoteStates { .. }, Response::States { states }) => {
                self.stats.ae_bytes += bytes;
                let states: Vec<(String, Vec<u8>)> = states
                    .into_iter()
                    .filter_map(|(k, v)| v.map(|v| (k, v)))
                    .collect();
                self.stats.ae_keys += states.len() as u64;
                if states.is_empty() {
                    self.pulled(peer, &[], out);
                } else {
                    out.push(self.local(
                        LocalOp::MergeStates { states },
                        Purpose::MergePulled { peer },
                    ));
                }
            }
            (Purpose::Push { .. }, Response::Pushed) => {
                self.stats.ae_bytes += bytes;
                if let Round::Exchange { pushed, .. } = &mut self.peers[peer].round {
                    *pushed = Some(());
                }
                self.advance_round(peer, out);
            }
            (Purpose::GcPurge { .. }, Response::Purged { .. }) => {
                self.stats.ae_bytes += bytes;
            }
            (Purpose::GcProbe { round, .. }, response @ Response::Stability { .. }) => {
                self.stats.ae_bytes += bytes;
                let round = *round;
                if !self.gc_probed(peer, round, response, out) {
                    self.peers[peer].failures_in_a_row = failures_in_a_row;
                    self.gc_abandon(round);
                    self.fail(now_ms, peer);
                }
            }
            (purpose, _) => {
                // An answer of the wrong kind: treat as a failure of that request.
                let purpose = purpose.clone();
                self.peers[peer].failures_in_a_row = failures_in_a_row;
                self.abandon(purpose);
                self.fail(now_ms, peer);
            }
        }
    }

    /// Applies a page of `peer`'s feed for `partition` (whose `fetching` flag is set): skips
    /// what the cursor already covers, detects a gap (entries trimmed before we read them:
    /// repair by anti-entropy, carry on from what the peer still holds) and asks for the merge.
    fn accept_page(
        &mut self,
        peer: PeerId,
        partition: u16,
        entries: Vec<WireEntry>,
        first_seq: u64,
        last_seq: u64,
        out: &mut Vec<Command>,
    ) {
        let index = usize::from(partition);
        let cursor = self.peers[peer].links[index].cursor;
        let link = &mut self.peers[peer].links[index];
        link.head = link.head.max(last_seq);
        let gap = cursor < last_seq && cursor.saturating_add(1) < first_seq;
        let mut base = cursor;
        if gap {
            self.stats.gaps += 1;
            self.peers[peer].urgent.insert(partition);
            base = first_seq.saturating_sub(1);
        }
        let entries: Vec<WireEntry> = entries.into_iter().filter(|e| e.seq > base).collect();
        let advance_to = entries.last().map_or(base, |e| e.seq);
        if advance_to == cursor {
            self.peers[peer].links[index].fetching = false;
            return;
        }
        let hlc_ms = entries.iter().map(|e| e.hlc.physical_ms()).collect();
        self.peers[peer].applying += 1;
        out.push(self.local(
            LocalOp::ApplyFeed {
                peer,
                partition,
                entries,
                advance_to,
            },
            Purpose::Apply {
                peer,
                partition,
                advance_to,
                hlc_ms,
            },
        ));
    }

    /// Forgets the work a failed request was part of, so it is retried later.
    fn abandon(&mut self, purpose: Purpose) {
        match purpose {
            Purpose::Cursors | Purpose::Stale { .. } | Purpose::GcPurge { .. } => {}
            Purpose::GcList { round }
            | Purpose::GcProbe { round, .. }
            | Purpose::GcPurgeLocal { round, .. } => self.gc_abandon(round),
            Purpose::Heads { peer, .. } => self.peers[peer].heads_in_flight = false,
            Purpose::Feed { peer, partition } => {
                self.peers[peer].links[usize::from(partition)].fetching = false;
            }
            Purpose::Apply {
                peer, partition, ..
            } => {
                let p = &mut self.peers[peer];
                p.links[usize::from(partition)].fetching = false;
                p.applying = p.applying.saturating_sub(1);
            }
            Purpose::RemoteDigest { peer }
            | Purpose::LocalDigest { peer }
            | Purpose::RemoteBuckets { peer }
            | Purpose::LocalBuckets { peer }
            | Purpose::RemoteStates { peer }
            | Purpose::LocalStates { peer }
            | Purpose::MergePulled { peer }
            | Purpose::Push { peer } => {
                let p = &mut self.peers[peer];
                // The partition is tried again in a later round.
                if let Some(partition) = p.round.partition() {
                    p.urgent.insert(partition);
                }
                p.round = Round::Idle;
                p.deferred.clear();
                // Answers still on their way belong to the abandoned round. Local outcomes
                // are forgotten; remote requests stay counted in flight until they are
                // answered or time out.
                self.pending.retain(|_, pending| match pending.purpose {
                    Purpose::RemoteDigest { peer: q }
                    | Purpose::RemoteBuckets { peer: q }
                    | Purpose::RemoteStates { peer: q }
                    | Purpose::Push { peer: q }
                        if q == peer =>
                    {
                        pending.purpose = Purpose::Stale { peer };
                        true
                    }
                    Purpose::LocalDigest { peer: q }
                    | Purpose::LocalBuckets { peer: q }
                    | Purpose::LocalStates { peer: q }
                    | Purpose::MergePulled { peer: q } => q != peer,
                    _ => true,
                });
            }
        }
    }

    fn on_local(
        &mut self,
        now_ms: u64,
        purpose: Purpose,
        result: Result<LocalResult, String>,
        out: &mut Vec<Command>,
    ) {
        let result = match result {
            Ok(r) => r,
            Err(_) => {
                match (Self::peer_of(&purpose), &purpose) {
                    (_, Purpose::Cursors) => {
                        // Cursors could not be loaded: try again.
                        let id = self.issue(Purpose::Cursors, None);
                        out.push(Command::Local {
                            id,
                            op: LocalOp::LoadCursors,
                        });
                    }
                    (Some(peer), _) => {
                        self.abandon(purpose);
                        self.fail(now_ms, peer);
                    }
                    (None, _) => self.abandon(purpose),
                }
                return;
            }
        };
        match (purpose, result) {
            (Purpose::Cursors, LocalResult::Cursors(cursors)) => {
                for (peer, per_partition) in self.peers.iter_mut().zip(cursors) {
                    for (link, cursor) in peer.links.iter_mut().zip(per_partition) {
                        *link = Link {
                            cursor,
                            head: cursor,
                            fetching: false,
                        };
                    }
                    peer.heads_in_flight = false;
                    peer.in_flight = 0;
                    peer.round = Round::Idle;
                    peer.deferred.clear();
                    peer.applying = 0;
                    peer.next_heads_ms = now_ms;
                    peer.next_sweep_ms = now_ms
                        + self.config.anti_entropy_interval_ms
                            / u64::from(self.config.partitions.max(1));
                }
                let step = self.gc_step_ms();
                self.gc.restart(now_ms, step);
                self.started = true;
            }
            (Purpose::GcList { round }, LocalResult::Tombstones { items, next, head }) => {
                self.gc_listed(round, items, next, head, out);
                self.stats.tombstones_pending = self.gc.pending();
            }
            (Purpose::GcPurgeLocal { round, partition }, LocalResult::Purged(purged)) => {
                self.gc_purged(round, partition, purged);
                self.stats.tombstones_pending = self.gc.pending();
            }
            (
                Purpose::Apply {
                    peer,
                    partition,
                    advance_to,
                    hlc_ms,
                },
                LocalResult::Applied,
            ) => {
                let p = &mut self.peers[peer];
                for ms in &hlc_ms {
                    let lag = now_ms.saturating_sub(*ms).max(1);
                    p.lag_ms.saturating_record(lag);
                }
                self.stats.entries_applied += hlc_ms.len() as u64;
                p.applying = p.applying.saturating_sub(1);
                let link = &mut p.links[usize::from(partition)];
                link.cursor = link.cursor.max(advance_to);
                link.fetching = false;
            }
            (Purpose::LocalDigest { peer }, LocalResult::Digest(buckets)) => {
                if let Round::Digest { local, .. } = &mut self.peers[peer].round {
                    *local = Some(buckets);
                }
                self.advance_round(peer, out);
            }
            (Purpose::LocalBuckets { peer }, LocalResult::Buckets(entries)) => {
                if let Round::Buckets { local, .. } = &mut self.peers[peer].round {
                    *local = Some(entries);
                }
                self.advance_round(peer, out);
            }
            (Purpose::LocalStates { peer }, LocalResult::States(states)) => {
                let states: Vec<(String, Vec<u8>)> = states
                    .into_iter()
                    .filter_map(|(k, v)| v.map(|v| (k, v)))
                    .collect();
                if states.is_empty() {
                    if let Round::Exchange { pushed, .. } = &mut self.peers[peer].round {
                        *pushed = Some(());
                    }
                    self.advance_round(peer, out);
                } else {
                    self.stats.ae_keys += states.len() as u64;
                    self.send_or_defer(peer, Request::Push { states }, Purpose::Push { peer }, out);
                }
            }
            (Purpose::MergePulled { peer }, LocalResult::Merged { hashes, .. }) => {
                self.pulled(peer, &hashes, out);
            }
            (purpose, _) => match Self::peer_of(&purpose) {
                Some(peer) => {
                    self.abandon(purpose);
                    self.fail(now_ms, peer);
                }
                None => self.abandon(purpose),
            },
        }
    }

    /// The pull half of an exchange is merged: push only our keys whose state still differs
    /// from the peer's (`hashes` are ours after the merge).
    fn pulled(&mut self, peer: PeerId, hashes: &[(String, u64)], out: &mut Vec<Command>) {
        let mut push_now = None;
        if let Round::Exchange {
            remote,
            push,
            pulled,
            pushed,
            ..
        } = &mut self.peers[peer].round
        {
            if pulled.is_none() {
                *pulled = Some(());
                let settled: BTreeSet<&str> = hashes
                    .iter()
                    .filter(|(k, h)| remote.get(k) == Some(h))
                    .map(|(k, _)| k.as_str())
                    .collect();
                push.retain(|k| !settled.contains(k.as_str()));
                if push.is_empty() {
                    *pushed = Some(());
                } else {
                    push_now = Some(push.clone());
                }
            }
        }
        if let Some(keys) = push_now {
            out.push(self.local(LocalOp::States { keys }, Purpose::LocalStates { peer }));
        }
        self.advance_round(peer, out);
    }

    /// Moves a peer's anti-entropy round on once both halves of its current step are in.
    fn advance_round(&mut self, peer: PeerId, out: &mut Vec<Command>) {
        let round = std::mem::replace(&mut self.peers[peer].round, Round::Idle);
        let next = match round {
            Round::Digest {
                partition,
                remote: Some(remote),
                local: Some(local),
            } => {
                let digest_theirs = geostate_backends::PartitionDigest::new(remote);
                let digest_ours = geostate_backends::PartitionDigest::new(local);
                let mut buckets = digest_ours.differing_buckets(&digest_theirs);
                if buckets.is_empty() {
                    self.stats.ae_rounds += 1;
                    Round::Idle
                } else {
                    buckets.truncate(self.config.ae_buckets_per_round_max);
                    if buckets.len() == self.config.ae_buckets_per_round_max {
                        // More may differ: come back to this partition.
                        self.peers[peer].urgent.insert(partition);
                    }
                    self.send_or_defer(
                        peer,
                        Request::Buckets {
                            partition,
                            buckets: buckets.clone(),
                        },
                        Purpose::RemoteBuckets { peer },
                        out,
                    );
                    out.push(self.local(
                        LocalOp::Buckets { partition, buckets },
                        Purpose::LocalBuckets { peer },
                    ));
                    Round::Buckets {
                        partition,
                        remote: None,
                        local: None,
                    }
                }
            }
            Round::Buckets {
                partition,
                remote: Some(remote),
                local: Some(local),
            } => {
                let theirs: BTreeMap<&str, u64> =
                    remote.iter().map(|(k, h)| (k.as_str(), *h)).collect();
                let ours: BTreeMap<&str, u64> =
                    local.iter().map(|(k, h)| (k.as_str(), *h)).collect();
                let mut pull: Vec<String> = theirs
                    .iter()
                    .filter(|(k, h)| ours.get(*k) != Some(*h))
                    .map(|(k, _)| (*k).to_string())
                    .collect();
                let mut push: Vec<String> = ours
                    .iter()
                    .filter(|(k, h)| theirs.get(*k) != Some(*h))
                    .map(|(k, _)| (*k).to_string())
                    .collect();
                let max = self.config.ae_keys_per_round_max;
                if pull.len() > max || push.len() > max {
                    self.peers[peer].urgent.insert(partition);
                    pull.truncate(max);
                    push.truncate(max);
                }
                if pull.is_empty() && push.is_empty() {
                    self.stats.ae_rounds += 1;
                    Round::Idle
                } else {
                    let remote: BTreeMap<String, u64> = pull
                        .iter()
                        .filter_map(|k| theirs.get(k.as_str()).map(|h| (k.clone(), *h)))
                        .collect();
                    if pull.is_empty() {
                        out.push(self.local(
                            LocalOp::States { keys: push.clone() },
                            Purpose::LocalStates { peer },
                        ));
                        Round::Exchange {
                            partition,
                            remote,
                            push,
                            pulled: Some(()),
                            pushed: None,
                        }
                    } else {
                        self.send_or_defer(
                            peer,
                            Request::States { keys: pull },
                            Purpose::RemoteStates { peer },
                            out,
                        );
                        Round::Exchange {
                            partition,
                            remote,
                            push,
                            pulled: None,
                            pushed: None,
                        }
                    }
                }
            }
            Round::Exchange {
                pulled: Some(()),
                pushed: Some(()),
                ..
            } => {
                self.stats.ae_rounds += 1;
                Round::Idle
            }
            waiting => waiting,
        };
        self.peers[peer].round = next;
    }

    /// Starts whatever is due: heads polls, feed fetches, anti-entropy rounds.
    fn schedule(&mut self, now_ms: u64, out: &mut Vec<Command>) {
        self.gc_schedule(now_ms, out);
        for peer in 0..self.peers.len() {
            if self.peers[peer].retry_at_ms > now_ms {
                continue;
            }
            // The current round's deferred requests first.
            while self.peers[peer].in_flight < self.config.requests_in_flight_max {
                let Some((request, purpose)) = self.peers[peer].deferred.pop_front() else {
                    break;
                };
                out.push(self.send(peer, request, purpose));
            }
            // Anti-entropy: urgent partitions first, then the periodic sweep. A round starts
            // before the poll takes a slot: with a single slot, the poll (sent again as soon as
            // it is answered, then held by the peer) would otherwise keep it from ever starting.
            let p = &self.peers[peer];
            if matches!(p.round, Round::Idle) && p.in_flight < self.config.requests_in_flight_max {
                let partition = if let Some(&urgent) = p.urgent.iter().next() {
                    self.peers[peer].urgent.remove(&urgent);
                    Some(urgent)
                } else if p.next_sweep_ms <= now_ms {
                    let partition = p.next_sweep_partition;
                    let p = &mut self.peers[peer];
                    p.next_sweep_partition = (partition + 1) % self.config.partitions.max(1);
                    p.next_sweep_ms = now_ms
                        + (self.config.anti_entropy_interval_ms
                            / u64::from(self.config.partitions.max(1)))
                        .max(1);
                    Some(partition)
                } else {
                    None
                };
                if let Some(partition) = partition {
                    self.peers[peer].round = Round::Digest {
                        partition,
                        remote: None,
                        local: None,
                    };
                    out.push(self.send(
                        peer,
                        Request::Digest { partition },
                        Purpose::RemoteDigest { peer },
                    ));
                    out.push(
                        self.local(LocalOp::Digest { partition }, Purpose::LocalDigest { peer }),
                    );
                }
            }
            // Heads: a due poll keeps its slot, but goes out after the feed requests, so that
            // the partitions they fetch are left out of it (`u64::MAX`) rather than sent twice.
            let p = &self.peers[peer];
            let heads_due = !p.heads_in_flight
                && p.applying == 0
                && p.next_heads_ms <= now_ms
                && p.in_flight < self.config.requests_in_flight_max;
            let feed_slots = self.config.requests_in_flight_max - usize::from(heads_due);
            // Feed pages for partitions behind their head.
            for partition in 0..self.config.partitions {
                let p = &self.peers[peer];
                if p.in_flight >= feed_slots {
                    break;
                }
                let link = &p.links[usize::from(partition)];
                if link.fetching || link.cursor >= link.head {
                    continue;
                }
                let after = link.cursor;
                self.peers[peer].links[usize::from(partition)].fetching = true;
                out.push(self.send(
                    peer,
                    Request::Feed {
                        partition,
                        after,
                        limit: self.config.feed_batch_max,
                    },
                    Purpose::Feed { peer, partition },
                ));
            }
            if heads_due {
                self.peers[peer].heads_in_flight = true;
                self.peers[peer].next_heads_ms = now_ms + self.config.poll_interval_ms;
                let after: Vec<u64> = self.peers[peer]
                    .links
                    .iter()
                    .map(|l| if l.fetching { u64::MAX } else { l.cursor })
                    .collect();
                let request = Request::Heads {
                    after: after.clone(),
                    limit: self.config.feed_batch_max,
                    wait_ms: u32::try_from(self.config.pull_wait_ms).unwrap_or(u32::MAX),
                };
                out.push(self.send(peer, request, Purpose::Heads { peer, after }));
            }
        }
    }
}
