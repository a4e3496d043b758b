//! The replication protocol as a pure state machine: events in, commands out.
//!
//! One [`ReplicatorCore`] runs in each region and pulls from every peer. It never awaits,
//! never reads a clock (time comes with every call) and never touches a store or a socket:
//! it asks its driver to, through [`Command`]s, and learns the outcome through [`Event`]s. The
//! async driver ([`crate::driver`]) and the simulator both run this same logic.
//!
//! ## Feed shipping: pipelined long polls in a session
//! For each peer the core keeps up to [`CoreConfig::polls_per_peer`] long polls
//! ([`Request::Heads`]) out at once. The peer holds a poll while it has nothing new (up to
//! `pull_wait_ms`) and answers it as soon as a local write arrives. With a single poll, a
//! write made while the answer travels back and the next poll travels out waits for that
//! poll: lag spreads over one to three one-way latencies. With several, one is (nearly)
//! always waiting at the peer, so a write leaves at once and lag is about one one-way latency.
//!
//! Polls sent before an answer arrived cannot tell the peer what that answer carried, so the
//! peer keeps a *poll session* per puller ([`crate::serve::Server`]): the first poll opens it
//! with the cursors (answered at once, with the session's id), later polls carry only the id,
//! and the peer sends each entry once per session, whichever poll is waiting. New polls go out
//! as soon as an answer arrives (not after its merges), spread over one round trip (at most
//! one per measured round trip / `polls_per_peer`) so that they keep arriving at the peer
//! evenly rather than in bursts.
//!
//! Per (peer, partition) the core tracks three positions: `received` (every entry up to it
//! has arrived and is applied or queued for applying), the `cursor` (applied, and stored in
//! this region's own store by the same [`LocalOp::ApplyFeed`] that merged the entries, only
//! after the merges) and the `head` (the newest entry the peer is known to hold). A page is
//! taken if it starts at or before `received + 1` (entries already received are dropped);
//! one page per partition is being applied at a time, later ones wait in a queue, so the
//! stored cursor never passes an entry whose merge is not done. A crash at any point loses
//! nothing: the next incarnation opens a session at the stored cursors, and re-applying
//! entries changes nothing.
//!
//! The session is given up, and a new one opened at the `received` cursors, whenever what the
//! peer sent may not have arrived: a poll of the session fails or times out (its answer may
//! be lost after the peer counted its entries as sent), a page starts past `received + 1`
//! while the peer still holds the entries in between (an answer was lost or overtaken), the
//! peer no longer knows the session (it restarted), or an apply fails (`received` falls back
//! to the cursor first). The new session resends everything after what this region holds.
//! Answers to polls of a session given up are ignored; a poll delivered twice by the network
//! is answered once ([`Response::Duplicate`] for the copy, which the core ignores).
//!
//! Why a session: the alternative of polls carrying cursors, with the peer raising the
//! cursors of the other polls it holds when it answers one, cannot help a poll still on its
//! way (under load, most are): it would ship again what answers still in flight carry. And
//! a poll carrying every partition's cursor costs bytes on every answer, which a session id
//! does not. Limits: after a quiet spell a burst's first writes each take a waiting poll, and
//! the next ones wait up to a round trip for polls to come back; no new poll goes out while
//! `feed_batch_max` received entries wait to be applied (a slow store slows the peer down
//! rather than filling memory).
//!
//! ## Anti-entropy
//! When a peer's feed was trimmed past what was received, the cursor jumps to the oldest
//! entry still held and the partition is queued for anti-entropy; every partition is also swept
//! periodically (all of a peer's partitions once per `anti_entropy_interval_ms`). A round
//! reconciles a range of consecutive partitions as two sets of *items*, one 64-bit id per key
//! (a hash of the key and its value hash, [`iblt::item_id`]), by rateless set reconciliation
//! ([`crate::iblt`]):
//!
//! 1. our *summary* of the range (the XOR of its digest buckets, which is the XOR of its
//!    item ids) goes to the peer with [`Request::Reconcile`]; equal summaries end the round
//!    there ([`Response::Reconciled`]): a dozen bytes out and one back, no listing on either
//!    side;
//! 2. otherwise the peer snapshots its items of the range and answers with its first coded
//!    symbols; we list ours ([`LocalOp::Items`]), subtract our symbols from the peer's and
//!    peel; while that does not decode we ask for more symbols of the same snapshot
//!    ([`Request::Symbols`]);
//! 3. decoded, the ids only the peer holds are fetched ([`Request::Fetch`]: the peer maps
//!    them to keys and answers with their states) and merged, then we push ours of the keys
//!    whose state still differs from the peer's after the merge ([`Request::Push`]): a key
//!    whose merged state has one of the peer's ids is settled.
//!
//! The first request asks for `ae_symbols_first` symbols, or about 1.5 per difference that
//! recent rounds with that peer found per partition, whichever is more; a later one for half
//! as many again as received while few ids have peeled yet, a quarter or an eighth as more
//! have (peeling frees ids slowly until about one symbol per difference has arrived, then all
//! at once near 1.4). Sweep rounds take as many partitions as hold about
//! `ae_items_per_round` keys (by the size of the last listing), up to a sixteenth of them:
//! the symbols' overhead falls as more differences are reconciled together (about 2 symbols
//! per difference for a handful, 1.4 for hundreds), and one request covers many partitions
//! that agree; but a sweep's exchanges still spread over its interval.
//!
//! Anti-entropy does not race the feed. While the poll session with a peer is not open, or
//! the peer's feed of a round's partitions has more entries known and not applied than one
//! page (after a cut heals, say), the differences are mostly what the feed is about to
//! deliver, and a round would ship them twice: the round waits. It waits only while the feed
//! moves on, and never more than a request timeout without it (a stuck feed, an unreachable
//! peer), so a gap's repair is late at worst. The other direction (the peer catching up on
//! our feed) cannot be seen from here; spreading the sweep keeps the rounds that meet it
//! small.
//!
//! A range that does not decode within `ae_symbols_per_round_max` symbols is reconciled
//! again one partition per round; a single partition that does not either is compared bucket
//! by bucket, as the protocol did before symbols: bucket fingerprints ([`Request::Digest`]),
//! the `(key, hash)` lists of the differing buckets ([`Request::Buckets`]), the states of the
//! differing keys ([`Request::States`]) and the push. That handles any divergence (a region
//! starting empty, a long cut) with bounded work per round, at a cost in bytes that symbols
//! only beat while the differences are fewer than the keys. A sketch that cannot be the
//! difference of two sets (the peer is corrupt or hostile: wrong batch sizes, ids that
//! contradict our own listing, symbols that do not peel consistently) fails the round like
//! any failed request: backoff, then the same range again. Because a state carries
//! everything its region has merged, repairs also carry region A's writes to region C through
//! B while the A–C link is cut.

mod gc;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use hdrhistogram::Histogram;

use crate::iblt::{self, Decoder, Symbol};
use crate::wire::{Page, Request, Response, WireEntry};

/// Symbols the first request of a round asks for per difference expected, in eighths: 1.5,
/// a little over what decoding takes (about 1.5 for tens of differences, 1.4 for thousands).
const FIRST_BATCH_PER_DIFFERENCE_X8: u64 = 12;

/// Most requests for symbols in one round, the opening one included. Batches grow by at
/// least an eighth of what was received, so an honest decoding of `ae_symbols_per_round_max`
/// (4,096 by default) symbols takes about 16; a sketch that keeps peeling a little without
/// ever finishing (a peer whose batches disagree) is cut short here.
const SYMBOL_REQUESTS_MAX: u32 = 24;

/// A sweep round covers at most this fraction of the partitions, so that a sweep's exchanges
/// spread over its interval.
const SWEEP_RANGES_MIN: u16 = 16;

/// Protocol settings. Every queue and batch is bounded by one of these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreConfig {
    /// Partitions of the keyspace (must match every region's layout).
    pub partitions: u16,
    /// Heads polls kept out to each peer at once (at least 1, and one fewer than
    /// `requests_in_flight_max` when that is above 1). With `n`, a new poll goes out at most
    /// every round trip / `n`, so a write waits at most about that long for a poll to answer
    /// it, plus one one-way latency.
    pub polls_per_peer: usize,
    /// How long a peer may hold a heads poll that has nothing new (a long poll): a write at
    /// the peer answers it at once.
    pub pull_wait_ms: u64,
    /// Most entries per poll answer; also, no new poll goes out while this many received
    /// entries of a peer wait to be applied.
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
    /// How many items (keys) a periodic anti-entropy round may list, about: the sweep
    /// reconciles as many consecutive partitions at once as hold that many keys by the size
    /// of the last listing, up to a sixteenth of the partitions (one partition until a round
    /// has listed one; a feed gap's round takes its partition alone). More partitions per
    /// round: fewer rounds, and fewer coded symbols per difference (their overhead falls as
    /// the differences reconciled together grow); fewer: smaller listings held in memory
    /// (`0`: one partition per round).
    pub ae_items_per_round: usize,
    /// Coded symbols asked for first when a round's summaries differ. Each later batch asks
    /// for half as many as were received, or this many if more, so a round overshoots what
    /// its decoding needs by at most about a third.
    pub ae_symbols_first: u32,
    /// Most coded symbols one round asks for. A range of partitions that does not decode
    /// within that many is reconciled again one partition per round; a single partition that
    /// does not is compared bucket by bucket (digest, bucket listings) instead.
    pub ae_symbols_per_round_max: u32,
    /// Most differing buckets examined per bucket-by-bucket round.
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
            polls_per_peer: 4,
            pull_wait_ms: 1_000,
            feed_batch_max: 512,
            requests_in_flight_max: 16,
            request_timeout_ms: 2_000,
            retry_backoff_ms: 100,
            retry_backoff_max_ms: 5_000,
            anti_entropy_interval_ms: 30_000,
            ae_items_per_round: 65_536,
            ae_symbols_first: 16,
            ae_symbols_per_round_max: 4_096,
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
    /// Read the local summary of the partitions `[first, first + partitions)`: the XOR of
    /// their digest buckets. Answer: [`LocalResult::Summary`].
    Summary {
        /// The first partition.
        first: u16,
        /// How many partitions.
        partitions: u16,
    },
    /// List the local items of the partitions `[first, first + partitions)`: each key's item
    /// id ([`iblt::item_id`] of the key and its value hash). Answer: [`LocalResult::Items`].
    Items {
        /// The first partition.
        first: u16,
        /// How many partitions.
        partitions: u16,
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
    /// The local summary of some partitions.
    Summary(u64),
    /// The local `(item id, key)` of some partitions, sorted by id.
    Items(Vec<(u64, String)>),
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
    /// Bytes of feed traffic (heads polls and their answers).
    pub feed_bytes: u64,
    /// Bytes of anti-entropy traffic, requests and answers (summaries, coded symbols, item
    /// ids, digests, bucket lists, states both ways), and of garbage collection's probes.
    pub ae_bytes: u64,
    /// Anti-entropy rounds completed.
    pub ae_rounds: u64,
    /// Keys whose states anti-entropy pulled or pushed.
    pub ae_keys: u64,
    /// Feed gaps found (a peer trimmed entries this region had not applied).
    pub gaps: u64,
    /// Feed entries a peer holds but could not read (damaged bytes in its store): skipped,
    /// and their partition repaired by anti-entropy at once, as after a gap.
    pub damaged_entries: u64,
    /// Poll sessions opened (one per peer at start, and one after each loss or restart).
    pub sessions: u64,
    /// Tombstones waiting for causal stability, as last counted (a gauge).
    pub tombstones_pending: u64,
    /// Tombstones purged once causally stable.
    pub tombstones_purged: u64,
}

/// The per-(peer, partition) feed state.
#[derive(Clone, Debug, Default)]
struct Link {
    /// Everything up to here is applied, and the cursor stored.
    cursor: u64,
    /// Everything up to here has arrived: applied, being applied, or queued (`>= cursor`).
    received: u64,
    /// The newest entry the peer is known to hold.
    head: u64,
    /// Entries that arrived while an earlier page of the partition was being applied.
    queued: Vec<WireEntry>,
    /// A page of this partition is being applied.
    applying: bool,
}

impl Link {
    fn at(cursor: u64) -> Self {
        Self {
            cursor,
            received: cursor,
            head: cursor,
            queued: Vec::new(),
            applying: false,
        }
    }
}

/// The poll session with a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stream {
    /// None: the next poll opens one.
    Closed,
    /// The opening poll is out.
    Opening,
    /// Polls carry the session's id and the next poll number.
    Open { session: u64, next_poll: u64 },
}

/// What an anti-entropy round works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Work {
    /// Set reconciliation of the partitions `[first, first + partitions)`.
    Reconcile { first: u16, partitions: u16 },
    /// Bucket-by-bucket comparison of one partition (too different to reconcile by symbols
    /// within `ae_symbols_per_round_max`).
    Compare(u16),
}

impl Work {
    fn single(partition: u16) -> Self {
        Work::Reconcile {
            first: partition,
            partitions: 1,
        }
    }
}

/// A reconciliation whose first symbols arrived and whose local items are listed.
#[derive(Clone, Debug)]
struct Decoding {
    first: u16,
    partitions: u16,
    /// The peer's snapshot: its summary, symbol 0's id sum.
    snapshot: u64,
    /// Our `(item id, key)`, sorted by id.
    items: Vec<(u64, String)>,
    decoder: Decoder,
    /// The symbols asked for and not received yet: `(from, count)`.
    asked: (u32, u32),
    /// Requests for symbols sent, the opening one included.
    requests: u32,
}

/// One anti-entropy round's progress.
#[derive(Clone, Debug)]
enum Round {
    Idle,
    /// Reading our summary of the partitions.
    Summary {
        first: u16,
        partitions: u16,
    },
    /// The opening request ([`Request::Reconcile`]) is out, asking for `asked` symbols.
    Opening {
        first: u16,
        partitions: u16,
        asked: u32,
    },
    /// The peer's first symbols arrived; listing our items.
    Listing {
        first: u16,
        partitions: u16,
        symbols: Vec<Symbol>,
    },
    /// Decoding; more symbols asked for.
    Decoding(Box<Decoding>),
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
        work: Work,
        /// The peer's item ids of the differing keys: a key whose merged state has one of
        /// them is settled.
        remote: BTreeSet<u64>,
        /// Our keys that differed before the pull.
        push: Vec<String>,
        pulled: Option<()>,
        pushed: Option<()>,
    },
}

impl Round {
    /// What the round works on, to be tried again if it is abandoned.
    fn work(&self) -> Option<Work> {
        match self {
            Round::Idle => None,
            Round::Summary { first, partitions }
            | Round::Opening {
                first, partitions, ..
            }
            | Round::Listing {
                first, partitions, ..
            } => Some(Work::Reconcile {
                first: *first,
                partitions: *partitions,
            }),
            Round::Decoding(d) => Some(Work::Reconcile {
                first: d.first,
                partitions: d.partitions,
            }),
            Round::Digest { partition, .. } | Round::Buckets { partition, .. } => {
                Some(Work::Compare(*partition))
            }
            Round::Exchange { work, .. } => Some(*work),
        }
    }
}

/// The item ids of `(key, value hash)` pairs (keys that are not valid keys have none).
fn ids_of<'a>(pairs: impl IntoIterator<Item = (&'a str, u64)>) -> BTreeSet<u64> {
    pairs
        .into_iter()
        .filter_map(|(k, h)| {
            geostate_backends::Key::new(k)
                .ok()
                .map(|key| iblt::item_id(&key, h))
        })
        .collect()
}

#[derive(Debug)]
struct Peer {
    links: Vec<Link>,
    stream: Stream,
    /// Bumped whenever the session is given up: answers to older polls are ignored.
    epoch: u64,
    /// Polls of the current epoch out (the opening poll included).
    polls_out: usize,
    /// When the last poll went out (polls are spread over a round trip).
    last_poll_ms: u64,
    /// Shortest poll round trip (send to answer) seen since the session opened.
    rtt_ms: Option<u64>,
    /// Entries received and not applied yet (queued or being applied).
    unapplied: usize,
    in_flight: usize,
    failures_in_a_row: u32,
    retry_at_ms: u64,
    round: Round,
    /// Anti-entropy waiting to run before the sweep: a partition whose feed had a gap, a
    /// round abandoned or cut short, a range split or a partition handed to comparison.
    urgent: BTreeSet<Work>,
    /// The first partition of the sweep's next range.
    next_sweep_partition: u16,
    next_sweep_ms: u64,
    /// Requests of the current round waiting for an in-flight slot.
    deferred: VecDeque<(Request, Purpose)>,
    lag_ms: Histogram<u64>,
    /// When the peer's feed last moved on (a session opened, a page applied), and since when
    /// anti-entropy has been waiting for it: anti-entropy waits for a feed that is catching
    /// up, not for one that is stuck (see [`ReplicatorCore::waits_for_feed`]).
    fed_ms: u64,
    waiting_since_ms: Option<u64>,
    /// Differences found by recent reconciliations with the peer, and the partitions they
    /// covered, both in 256ths (both halved whenever the partitions pass the partition
    /// count, so they weigh about the last sweep): their ratio sizes the first batch of
    /// symbols, so that a repair of many similar ranges asks for about what it needs in one
    /// request instead of growing from `ae_symbols_first` each time. Rounds that found
    /// nothing count as much as any.
    differences_seen: (u64, u64),
}

/// What an in-flight command was for.
#[derive(Clone, Debug)]
enum Purpose {
    Cursors,
    /// A poll opening a session.
    Open {
        peer: PeerId,
        epoch: u64,
        sent_ms: u64,
    },
    /// A poll within the session of `epoch`.
    Poll {
        peer: PeerId,
        epoch: u64,
        sent_ms: u64,
    },
    Apply {
        peer: PeerId,
        partition: u16,
        advance_to: u64,
        hlc_ms: Vec<u64>,
    },
    LocalSummary {
        peer: PeerId,
    },
    RemoteReconcile {
        peer: PeerId,
    },
    LocalItems {
        peer: PeerId,
    },
    RemoteSymbols {
        peer: PeerId,
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
/// // ...and once they are loaded, the first poll opens a session at them.
/// let commands = core.handle(0, Event::Local { id, result: Ok(LocalResult::Cursors(vec![vec![0, 0]])) });
/// let [Command::Send { id, request: Request::Heads { session: 0, after, .. }, .. }] = &commands[..] else { panic!() };
/// assert_eq!(after, &vec![0, 0]);
/// // The peer answers at once with the session's id; polls within it follow.
/// let commands = core.handle(80, Event::Remote { id: *id, result: Ok(Response::Opened { session: 7, pages: vec![] }) });
/// assert!(commands.iter().any(|c| matches!(c, Command::Send { request: Request::Heads { session: 7, .. }, .. })));
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
    /// Keys per partition in the last listing of local items (sizes sweep rounds).
    items_per_partition: Option<u64>,
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
                stream: Stream::Closed,
                epoch: 0,
                polls_out: 0,
                last_poll_ms: 0,
                rtt_ms: None,
                unapplied: 0,
                in_flight: 0,
                failures_in_a_row: 0,
                retry_at_ms: 0,
                round: Round::Idle,
                urgent: BTreeSet::new(),
                // Stagger the peers' sweeps so they do not all start at once.
                next_sweep_partition: (i as u16).wrapping_mul(7) % config.partitions.max(1),
                next_sweep_ms: 0,
                deferred: VecDeque::new(),
                lag_ms: histogram(),
                fed_ms: 0,
                waiting_since_ms: None,
                differences_seen: (0, 0),
            })
            .collect();
        Self {
            gc: gc::Gc::new(config.partitions, region, peers),
            config,
            peers: peers_state,
            started: false,
            next_id: 1,
            pending: BTreeMap::new(),
            stats: Stats::default(),
            now_ms: 0,
            region: region.to_string(),
            peer_names: peers.to_vec(),
            items_per_partition: None,
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
                    && p.unapplied == 0
                    && p.links.iter().all(|l| l.cursor >= l.head && !l.applying)
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
                let copy = matches!(result, Ok(Response::Duplicate))
                    && matches!(
                        self.pending.get(&id),
                        Some(Pending {
                            purpose: Purpose::Poll { .. },
                            ..
                        })
                    );
                // A poll the network delivered twice: the copy's answer says so, and the
                // poll's own answer is still to come.
                if copy {
                    self.stats.feed_bytes += Response::Duplicate.wire_bytes() as u64;
                } else if let Some(p) = self.pending.remove(&id) {
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
            p.last_poll_ms = p.last_poll_ms.saturating_sub(by_ms);
            p.retry_at_ms = p.retry_at_ms.saturating_sub(by_ms);
            p.next_sweep_ms = p.next_sweep_ms.saturating_sub(by_ms);
        }
        for pending in self.pending.values_mut() {
            if let Some(deadline) = pending.deadline_ms.as_mut() {
                *deadline = deadline.saturating_sub(by_ms);
            }
            if let Purpose::Open { sent_ms, .. } | Purpose::Poll { sent_ms, .. } =
                &mut pending.purpose
            {
                *sent_ms = sent_ms.saturating_sub(by_ms);
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
            Request::Heads { .. } => self.stats.feed_bytes += bytes,
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
            Purpose::Open { peer, .. }
            | Purpose::Poll { peer, .. }
            | Purpose::Apply { peer, .. }
            | Purpose::LocalSummary { peer }
            | Purpose::RemoteReconcile { peer }
            | Purpose::LocalItems { peer }
            | Purpose::RemoteSymbols { peer }
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
        // Every answer but a poll's is anti-entropy's (or garbage collection's) traffic,
        // whatever becomes of it: late answers of an abandoned round and failures too.
        if !matches!(purpose, Purpose::Open { .. } | Purpose::Poll { .. }) {
            if let Ok(response) = &result {
                self.stats.ae_bytes += response.wire_bytes() as u64;
            }
        }
        // Polls of a session given up only free their slot.
        let current = match purpose {
            Purpose::Stale { .. } => return,
            Purpose::Open { epoch, .. } | Purpose::Poll { epoch, .. } => {
                let p = &mut self.peers[peer];
                if epoch != p.epoch {
                    match &result {
                        Ok(
                            response @ (Response::Heads { .. }
                            | Response::Opened { .. }
                            | Response::UnknownSession),
                        ) => {
                            self.stats.feed_bytes += response.wire_bytes() as u64;
                        }
                        _ => self.stats.failures += 1,
                    }
                    return;
                }
                p.polls_out = p.polls_out.saturating_sub(1);
                true
            }
            _ => false,
        };
        let response = match result {
            Ok(Response::Failed { .. }) | Err(_) => {
                if current {
                    // Its answer may be lost after the peer counted its entries as sent.
                    self.reopen(peer);
                }
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
            (Purpose::Open { sent_ms, .. }, Response::Opened { session, pages }) => {
                self.stats.feed_bytes += bytes;
                self.stats.sessions += 1;
                let p = &mut self.peers[peer];
                p.fed_ms = now_ms;
                p.stream = Stream::Open {
                    session,
                    next_poll: 1,
                };
                p.rtt_ms = Some(now_ms.saturating_sub(*sent_ms));
                self.take_pages(peer, pages, out);
            }
            (Purpose::Poll { .. }, Response::UnknownSession) => {
                // The peer restarted, or forgot the session: open another at once.
                self.stats.feed_bytes += bytes;
                self.reopen(peer);
            }
            (Purpose::Poll { sent_ms, .. }, Response::Heads { pages }) => {
                self.stats.feed_bytes += bytes;
                let p = &mut self.peers[peer];
                let rtt = now_ms.saturating_sub(*sent_ms);
                p.rtt_ms = Some(p.rtt_ms.map_or(rtt, |r| r.min(rtt)));
                self.take_pages(peer, pages, out);
            }
            (Purpose::RemoteReconcile { .. }, Response::Reconciled) => {
                if let Round::Opening { partitions, .. } = self.peers[peer].round {
                    // The summaries match: nothing differs.
                    self.stats.ae_rounds += 1;
                    self.peers[peer].round = Round::Idle;
                    self.record_differences(peer, 0, partitions);
                }
            }
            (Purpose::RemoteReconcile { .. }, Response::Symbols { symbols }) => {
                if !self.first_symbols(peer, symbols, out) {
                    self.peers[peer].failures_in_a_row = failures_in_a_row;
                    self.abandon(purpose.clone());
                    self.fail(now_ms, peer);
                }
            }
            (Purpose::RemoteSymbols { .. }, Response::Symbols { symbols }) => {
                if !self.more_symbols(now_ms, peer, symbols, out) {
                    self.peers[peer].failures_in_a_row = failures_in_a_row;
                    self.abandon(purpose.clone());
                    self.fail(now_ms, peer);
                }
            }
            (Purpose::RemoteSymbols { .. }, Response::Changed) => {
                // The peer's snapshot is gone and the partitions changed: start again (the
                // work goes back to the urgent queue), which is no failure of the peer.
                self.abandon(purpose.clone());
            }
            (Purpose::RemoteDigest { .. }, Response::Digest { buckets }) => {
                if let Round::Digest { remote, .. } = &mut self.peers[peer].round {
                    *remote = Some(buckets);
                }
                self.advance_round(peer, out);
            }
            (Purpose::RemoteBuckets { .. }, Response::Buckets { entries }) => {
                if let Round::Buckets { remote, .. } = &mut self.peers[peer].round {
                    *remote = Some(entries);
                }
                self.advance_round(peer, out);
            }
            (Purpose::RemoteStates { .. }, Response::States { states }) => {
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
                if let Round::Exchange { pushed, .. } = &mut self.peers[peer].round {
                    *pushed = Some(());
                }
                self.advance_round(peer, out);
            }
            (Purpose::GcPurge { .. }, Response::Purged { .. }) => {}
            (Purpose::GcProbe { round, .. }, response @ Response::Stability { .. }) => {
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
                if current {
                    self.reopen(peer);
                }
                self.abandon(purpose);
                self.fail(now_ms, peer);
            }
        }
    }

    /// Gives up the poll session with `peer`: the next poll opens a new one at the
    /// `received` cursors, and answers to the old session's polls are ignored.
    fn reopen(&mut self, peer: PeerId) {
        let p = &mut self.peers[peer];
        p.epoch += 1;
        p.stream = Stream::Closed;
        p.polls_out = 0;
    }

    /// Takes the pages of a poll's answer; gives up the session if one does not follow what
    /// was received.
    fn take_pages(&mut self, peer: PeerId, pages: Vec<Page>, out: &mut Vec<Command>) {
        let mut consistent = true;
        for page in pages {
            if usize::from(page.partition) < self.peers[peer].links.len() {
                consistent &= self.accept_page(peer, page, out);
            }
        }
        if !consistent {
            self.reopen(peer);
        }
    }

    /// Takes a page of `peer`'s feed: drops what was received already, detects a gap
    /// (entries trimmed before we read them: repair by anti-entropy, carry on from what the
    /// peer still holds) and queues the rest to be applied. False if the page starts past
    /// what was received while the peer still holds the entries in between (they were sent in
    /// an answer that did not arrive, or not yet): nothing of it is taken.
    fn accept_page(&mut self, peer: PeerId, page: Page, out: &mut Vec<Command>) -> bool {
        let index = usize::from(page.partition);
        let link = &mut self.peers[peer].links[index];
        link.head = link.head.max(page.last_seq);
        let received = link.received;
        let gap = received < page.last_seq && received.saturating_add(1) < page.first_seq;
        let base = if gap {
            page.first_seq.saturating_sub(1)
        } else {
            received
        };
        let entries: Vec<WireEntry> = page.entries.into_iter().filter(|e| e.seq > base).collect();
        let contiguous = entries
            .iter()
            .enumerate()
            .all(|(i, e)| Some(e.seq) == base.checked_add(i as u64 + 1));
        if !contiguous {
            return false;
        }
        let to = entries.last().map_or(base, |e| e.seq);
        if to <= received {
            return true;
        }
        if gap {
            self.stats.gaps += 1;
            self.peers[peer].urgent.insert(Work::single(page.partition));
        }
        // A damaged entry's write may be missing here: skip it, repair by anti-entropy.
        let damaged = entries.iter().filter(|e| e.is_damaged()).count();
        let entries: Vec<WireEntry> = if damaged == 0 {
            entries
        } else {
            self.stats.damaged_entries += damaged as u64;
            self.peers[peer].urgent.insert(Work::single(page.partition));
            entries.into_iter().filter(|e| !e.is_damaged()).collect()
        };
        let p = &mut self.peers[peer];
        p.unapplied += entries.len();
        let link = &mut p.links[index];
        link.received = to;
        link.queued.extend(entries);
        self.apply_next(peer, page.partition, out);
        true
    }

    /// Applies what was received of (peer, partition) and not applied yet, unless a page of
    /// it is being applied (then it waits for that one: the cursor never passes an entry
    /// whose merge is not done).
    fn apply_next(&mut self, peer: PeerId, partition: u16, out: &mut Vec<Command>) {
        let link = &mut self.peers[peer].links[usize::from(partition)];
        if link.applying || link.received <= link.cursor {
            return;
        }
        link.applying = true;
        let entries = std::mem::take(&mut link.queued);
        let advance_to = link.received;
        let hlc_ms = entries.iter().map(|e| e.hlc.physical_ms()).collect();
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
            // A failed poll gave up its session already.
            Purpose::Cursors
            | Purpose::Stale { .. }
            | Purpose::GcPurge { .. }
            | Purpose::Open { .. }
            | Purpose::Poll { .. } => {}
            Purpose::GcList { round }
            | Purpose::GcProbe { round, .. }
            | Purpose::GcPurgeLocal { round, .. } => self.gc_abandon(round),
            Purpose::Apply {
                peer,
                partition,
                hlc_ms,
                ..
            } => {
                // What was received of the partition is dropped; the peer's session counts it
                // as sent, so a new session resends it from the cursor.
                let p = &mut self.peers[peer];
                let link = &mut p.links[usize::from(partition)];
                let dropped = hlc_ms.len() + link.queued.len();
                link.queued.clear();
                link.applying = false;
                link.received = link.cursor;
                p.unapplied = p.unapplied.saturating_sub(dropped);
                self.reopen(peer);
            }
            Purpose::LocalSummary { peer }
            | Purpose::RemoteReconcile { peer }
            | Purpose::LocalItems { peer }
            | Purpose::RemoteSymbols { peer }
            | Purpose::RemoteDigest { peer }
            | Purpose::LocalDigest { peer }
            | Purpose::RemoteBuckets { peer }
            | Purpose::LocalBuckets { peer }
            | Purpose::RemoteStates { peer }
            | Purpose::LocalStates { peer }
            | Purpose::MergePulled { peer }
            | Purpose::Push { peer } => {
                let p = &mut self.peers[peer];
                // The work is tried again in a later round.
                if let Some(work) = p.round.work() {
                    p.urgent.insert(work);
                }
                p.round = Round::Idle;
                p.deferred.clear();
                // Answers still on their way belong to the abandoned round. Local outcomes
                // are forgotten; remote requests stay counted in flight until they are
                // answered or time out.
                self.pending.retain(|_, pending| match pending.purpose {
                    Purpose::RemoteReconcile { peer: q }
                    | Purpose::RemoteSymbols { peer: q }
                    | Purpose::RemoteDigest { peer: q }
                    | Purpose::RemoteBuckets { peer: q }
                    | Purpose::RemoteStates { peer: q }
                    | Purpose::Push { peer: q }
                        if q == peer =>
                    {
                        pending.purpose = Purpose::Stale { peer };
                        true
                    }
                    Purpose::LocalSummary { peer: q }
                    | Purpose::LocalItems { peer: q }
                    | Purpose::LocalDigest { peer: q }
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
                        *link = Link::at(cursor);
                    }
                    peer.stream = Stream::Closed;
                    peer.epoch += 1;
                    peer.polls_out = 0;
                    peer.last_poll_ms = now_ms;
                    peer.rtt_ms = None;
                    peer.fed_ms = now_ms;
                    peer.unapplied = 0;
                    peer.in_flight = 0;
                    peer.round = Round::Idle;
                    peer.deferred.clear();
                }
                let sweep_step_ms = self.sweep_step_ms();
                for peer in &mut self.peers {
                    peer.next_sweep_ms = now_ms + sweep_step_ms;
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
                p.unapplied = p.unapplied.saturating_sub(hlc_ms.len());
                p.fed_ms = now_ms;
                let link = &mut p.links[usize::from(partition)];
                link.cursor = link.cursor.max(advance_to);
                link.applying = false;
                // What arrived meanwhile.
                self.apply_next(peer, partition, out);
            }
            (Purpose::LocalSummary { peer }, LocalResult::Summary(summary)) => {
                if let Round::Summary { first, partitions } = self.peers[peer].round {
                    let asked = self.first_batch(peer, partitions);
                    self.peers[peer].round = Round::Opening {
                        first,
                        partitions,
                        asked,
                    };
                    self.send_or_defer(
                        peer,
                        Request::Reconcile {
                            first,
                            partitions,
                            summary,
                            symbols: asked,
                        },
                        Purpose::RemoteReconcile { peer },
                        out,
                    );
                }
            }
            (Purpose::LocalItems { peer }, LocalResult::Items(mut items)) => {
                let round = std::mem::replace(&mut self.peers[peer].round, Round::Idle);
                if let Round::Listing {
                    first,
                    partitions,
                    symbols,
                } = round
                {
                    items.sort_unstable();
                    self.items_per_partition =
                        Some((items.len() as u64).div_ceil(u64::from(partitions.max(1))));
                    let ours = iblt::encode(items.iter().map(|(id, _)| *id), 0, symbols.len());
                    let mut decoding = Box::new(Decoding {
                        first,
                        partitions,
                        // Every id is mapped to symbol 0: its sum is the XOR of the snapshot.
                        snapshot: symbols.first().map_or(0, |s| s.sum),
                        items,
                        decoder: Decoder::new(),
                        asked: (0, 0),
                        requests: 1,
                    });
                    let added = decoding.decoder.add(&symbols, &ours).is_ok();
                    self.decoding(now_ms, peer, decoding, added, out);
                } else {
                    self.peers[peer].round = round;
                }
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

    /// How many symbols the first request of a reconciliation of `partitions` partitions asks
    /// for: `ae_symbols_first`, or more if recent rounds with the peer found many
    /// differences per partition (1.5 symbols per difference expected, a little over what
    /// decoding takes on average).
    fn first_batch(&self, peer: PeerId, partitions: u16) -> u32 {
        let (differences, covered) = self.peers[peer].differences_seen;
        let expected = differences.saturating_mul(u64::from(partitions)) / covered.max(1);
        let symbols =
            u32::try_from(expected * FIRST_BATCH_PER_DIFFERENCE_X8 / 8).unwrap_or(u32::MAX);
        symbols
            .max(self.config.ae_symbols_first)
            .clamp(1, self.config.ae_symbols_per_round_max.max(1))
    }

    /// The exchange step of a round: `fetch` pulls the peer's states (`None`: nothing to
    /// pull), then our states of `push` go out; a round with neither is over.
    fn start_exchange(
        &mut self,
        peer: PeerId,
        work: Work,
        remote: BTreeSet<u64>,
        push: Vec<String>,
        fetch: Option<Request>,
        out: &mut Vec<Command>,
    ) -> Round {
        match fetch {
            None if push.is_empty() => {
                self.stats.ae_rounds += 1;
                Round::Idle
            }
            None => {
                out.push(self.local(
                    LocalOp::States { keys: push.clone() },
                    Purpose::LocalStates { peer },
                ));
                Round::Exchange {
                    work,
                    remote,
                    push,
                    pulled: Some(()),
                    pushed: None,
                }
            }
            Some(request) => {
                self.send_or_defer(peer, request, Purpose::RemoteStates { peer }, out);
                Round::Exchange {
                    work,
                    remote,
                    push,
                    pulled: None,
                    pushed: None,
                }
            }
        }
    }

    /// Takes a round's differences (of `partitions` partitions) into the peer's running
    /// count. Rounds that found nothing count too: otherwise the ratio would only see ranges
    /// that differ.
    fn record_differences(&mut self, peer: PeerId, differences: u64, partitions: u16) {
        let window = u64::from(self.config.partitions.max(1)) * 256;
        let seen = &mut self.peers[peer].differences_seen;
        seen.0 = seen.0.saturating_add(differences.saturating_mul(256));
        seen.1 = seen.1.saturating_add(u64::from(partitions) * 256);
        while seen.1 > window {
            seen.0 /= 2;
            seen.1 /= 2;
        }
    }

    /// The peer's first symbols of a reconciliation arrived: list ours. False if the answer
    /// is not what was asked.
    fn first_symbols(
        &mut self,
        peer: PeerId,
        symbols: Vec<Symbol>,
        out: &mut Vec<Command>,
    ) -> bool {
        let Round::Opening {
            first,
            partitions,
            asked,
        } = self.peers[peer].round
        else {
            return true;
        };
        if symbols.len() != asked as usize {
            return false;
        }
        self.peers[peer].round = Round::Listing {
            first,
            partitions,
            symbols,
        };
        out.push(self.local(
            LocalOp::Items { first, partitions },
            Purpose::LocalItems { peer },
        ));
        true
    }

    /// More symbols of a reconciliation arrived: subtract ours and peel. False if the answer
    /// is not what was asked.
    fn more_symbols(
        &mut self,
        now_ms: u64,
        peer: PeerId,
        symbols: Vec<Symbol>,
        out: &mut Vec<Command>,
    ) -> bool {
        let round = std::mem::replace(&mut self.peers[peer].round, Round::Idle);
        let Round::Decoding(mut decoding) = round else {
            self.peers[peer].round = round;
            return true;
        };
        let (from, count) = decoding.asked;
        if symbols.len() != count as usize || decoding.decoder.len() != from as usize {
            self.peers[peer].round = Round::Decoding(decoding);
            return false;
        }
        let ours = iblt::encode(
            decoding.items.iter().map(|(id, _)| *id),
            u64::from(from),
            symbols.len(),
        );
        let added = decoding.decoder.add(&symbols, &ours).is_ok();
        self.decoding(now_ms, peer, decoding, added, out);
        true
    }

    /// Moves a reconciliation on after symbols were added (`added`: without a decoding
    /// error): exchange the states of what decoded, or ask for more symbols, or give the work
    /// to smaller rounds when the round's symbols are spent. A sketch that is not that of a
    /// difference (a corrupt or hostile answer) fails the round.
    fn decoding(
        &mut self,
        now_ms: u64,
        peer: PeerId,
        mut decoding: Box<Decoding>,
        added: bool,
        out: &mut Vec<Command>,
    ) {
        let (first, partitions, snapshot) =
            (decoding.first, decoding.partitions, decoding.snapshot);
        if !added || (decoding.decoder.is_decoded() && !self.exchange(peer, &decoding, out)) {
            self.peers[peer].round = Round::Decoding(decoding);
            self.abandon(Purpose::LocalItems { peer });
            self.fail(now_ms, peer);
            return;
        }
        if decoding.decoder.is_decoded() {
            return;
        }
        let max = self.config.ae_symbols_per_round_max.max(1);
        let received = u32::try_from(decoding.decoder.len()).unwrap_or(u32::MAX);
        if received >= max || decoding.requests >= SYMBOL_REQUESTS_MAX {
            // Too many differences for one round: smaller ranges, then bucket by bucket.
            let p = &mut self.peers[peer];
            if partitions > 1 {
                for partition in first..first.saturating_add(partitions) {
                    p.urgent.insert(Work::single(partition));
                }
            } else {
                p.urgent.insert(Work::Compare(first));
            }
            p.round = Round::Idle;
            return;
        }
        // How far decoding got tells how far it is from done: peeling frees ids slowly at
        // first (an eighth of the symbols received by about one symbol per difference) and
        // then all at once (about 1.4 symbols per difference). So ask for half as many again
        // while few ids are out, then a quarter, then an eighth.
        let peeled = decoding.decoder.remote_only().len() + decoding.decoder.local_only().len();
        let peeled = u32::try_from(peeled).unwrap_or(u32::MAX);
        let divisor = if peeled.saturating_mul(8) < received {
            2
        } else if peeled.saturating_mul(4) < received {
            4
        } else {
            8
        };
        let count = self
            .config
            .ae_symbols_first
            .max(received / divisor)
            .clamp(1, max - received);
        decoding.asked = (received, count);
        decoding.requests += 1;
        self.peers[peer].round = Round::Decoding(decoding);
        self.send_or_defer(
            peer,
            Request::Symbols {
                first,
                partitions,
                snapshot,
                from: received,
                count,
            },
            Purpose::RemoteSymbols { peer },
            out,
        );
    }

    /// The difference decoded: pull the peer's states of the ids only it holds (by id), then
    /// push ours of the ids only we hold. False if the difference contradicts our own items
    /// (an id "only ours" we do not hold, or one "only theirs" we do).
    fn exchange(&mut self, peer: PeerId, decoding: &Decoding, out: &mut Vec<Command>) -> bool {
        let items = &decoding.items;
        let key_of = |id: u64| {
            items
                .binary_search_by_key(&id, |(i, _)| *i)
                .ok()
                .map(|at| items[at].1.clone())
        };
        if decoding
            .decoder
            .remote_only()
            .iter()
            .any(|id| key_of(*id).is_some())
        {
            return false;
        }
        let mut push = Vec::with_capacity(decoding.decoder.local_only().len());
        for id in decoding.decoder.local_only() {
            match key_of(*id) {
                Some(key) => push.push(key),
                None => return false,
            }
        }
        push.sort_unstable();
        push.dedup();
        let mut pull = decoding.decoder.remote_only().to_vec();
        pull.sort_unstable();
        let work = Work::Reconcile {
            first: decoding.first,
            partitions: decoding.partitions,
        };
        let max = self.config.ae_keys_per_round_max;
        if pull.len() > max || push.len() > max {
            // More next time.
            self.peers[peer].urgent.insert(work);
            pull.truncate(max);
            push.truncate(max);
        }
        let remote: BTreeSet<u64> = decoding.decoder.remote_only().iter().copied().collect();
        let differences =
            (decoding.decoder.remote_only().len() + decoding.decoder.local_only().len()) as u64;
        self.record_differences(peer, differences, decoding.partitions);
        let fetch = (!pull.is_empty()).then_some(Request::Fetch {
            first: decoding.first,
            partitions: decoding.partitions,
            snapshot: decoding.snapshot,
            ids: pull,
        });
        self.peers[peer].round = self.start_exchange(peer, work, remote, push, fetch, out);
        true
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
                    .filter(|(k, h)| {
                        ids_of([(k.as_str(), *h)])
                            .first()
                            .is_some_and(|id| remote.contains(id))
                    })
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
                        self.peers[peer].urgent.insert(Work::Compare(partition));
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
                    self.peers[peer].urgent.insert(Work::Compare(partition));
                    pull.truncate(max);
                    push.truncate(max);
                }
                let remote = ids_of(
                    pull.iter()
                        .filter_map(|k| theirs.get(k.as_str()).map(|h| (k.as_str(), *h))),
                );
                let fetch = (!pull.is_empty()).then_some(Request::States { keys: pull });
                self.start_exchange(peer, Work::Compare(partition), remote, push, fetch, out)
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

    /// How many polls may be out to one peer: `polls_per_peer`, leaving one request slot for
    /// other work when there is more than one.
    fn polls_max(&self) -> usize {
        let max = self.config.requests_in_flight_max;
        self.config
            .polls_per_peer
            .min(if max > 1 { max - 1 } else { max })
            .max(1)
    }

    /// Opens a session with `peer` if it has none, or tops up its polls: at most
    /// [`Self::polls_max`] out, one per round trip / that many (so that they reach the peer
    /// spread out, not in bursts), none while a page limit's worth of entries waits to be
    /// applied.
    fn send_polls(&mut self, peer: PeerId, now_ms: u64, out: &mut Vec<Command>) {
        let polls_max = self.polls_max();
        let limit = self.config.feed_batch_max;
        let wait_ms = u32::try_from(self.config.pull_wait_ms).unwrap_or(u32::MAX);
        loop {
            let p = &self.peers[peer];
            if p.in_flight >= self.config.requests_in_flight_max {
                return;
            }
            // With a single slot, a round reading its summary is about to send its opening
            // request: the poll (held by the peer) would keep it waiting.
            if self.config.requests_in_flight_max <= 1 && matches!(p.round, Round::Summary { .. }) {
                return;
            }
            let (request, purpose) = match p.stream {
                Stream::Opening => return,
                Stream::Closed => {
                    let after = p.links.iter().map(|l| l.received).collect();
                    let purpose = Purpose::Open {
                        peer,
                        epoch: p.epoch,
                        sent_ms: now_ms,
                    };
                    let p = &mut self.peers[peer];
                    p.stream = Stream::Opening;
                    p.rtt_ms = None;
                    let request = Request::Heads {
                        session: 0,
                        after,
                        poll: 0,
                        limit,
                        wait_ms: 0,
                    };
                    (request, purpose)
                }
                Stream::Open { session, next_poll } => {
                    let spacing_ms = p.rtt_ms.unwrap_or(0) / polls_max as u64;
                    if p.polls_out >= polls_max
                        || now_ms < p.last_poll_ms.saturating_add(spacing_ms)
                        || p.unapplied >= limit as usize
                    {
                        return;
                    }
                    let purpose = Purpose::Poll {
                        peer,
                        epoch: p.epoch,
                        sent_ms: now_ms,
                    };
                    self.peers[peer].stream = Stream::Open {
                        session,
                        next_poll: next_poll + 1,
                    };
                    let request = Request::Heads {
                        session,
                        after: Vec::new(),
                        poll: next_poll,
                        limit,
                        wait_ms,
                    };
                    (request, purpose)
                }
            };
            let p = &mut self.peers[peer];
            p.polls_out += 1;
            p.last_poll_ms = now_ms;
            out.push(self.send(peer, request, purpose));
        }
    }

    /// How many partitions a sweep round reconciles: as many as hold about
    /// `ae_items_per_round` keys, by the last listing, up to a sixteenth of them; one before
    /// any listing.
    fn sweep_width(&self) -> u16 {
        let partitions = self.config.partitions.max(1);
        match self.items_per_partition {
            None => 1,
            Some(per_partition) => {
                let width = self.config.ae_items_per_round / per_partition.max(1) as usize;
                u16::try_from(width)
                    .unwrap_or(u16::MAX)
                    .clamp(1, (partitions / SWEEP_RANGES_MIN).max(1))
            }
        }
    }

    /// The sweep's ranges of partitions at the current width.
    fn sweep_ranges(&self) -> u16 {
        self.config.partitions.max(1).div_ceil(self.sweep_width())
    }

    /// Time between two sweep rounds with one peer: all ranges once per
    /// `anti_entropy_interval_ms`.
    fn sweep_step_ms(&self) -> u64 {
        (self.config.anti_entropy_interval_ms / u64::from(self.sweep_ranges())).max(1)
    }

    /// Whether anti-entropy on `work` with `peer` should wait for the feed: while the poll
    /// session is not open, or the peer's feed of those partitions has more entries known and
    /// not applied than one page, the differences are mostly what the feed is about to
    /// deliver (after a cut heals, say), and a round would ship them twice. It waits only
    /// while the feed moves on, though: once neither the wait's start nor the feed's last
    /// step (a session opened, a page applied) is within a request timeout (the feed is
    /// stuck, or the peer unreachable), anti-entropy goes ahead.
    fn waits_for_feed(&self, peer: PeerId, work: Work, now_ms: u64) -> bool {
        let p = &self.peers[peer];
        let since = p.waiting_since_ms.unwrap_or(now_ms).max(p.fed_ms);
        if now_ms.saturating_sub(since) > self.config.request_timeout_ms {
            return false;
        }
        if !matches!(p.stream, Stream::Open { .. }) {
            return true;
        }
        let partitions = match work {
            Work::Reconcile { first, partitions } => first..first.saturating_add(partitions),
            Work::Compare(partition) => partition..partition.saturating_add(1),
        };
        let behind: u64 = p
            .links
            .get(usize::from(partitions.start)..usize::from(partitions.end))
            .unwrap_or_default()
            .iter()
            .map(|l| l.head.saturating_sub(l.cursor))
            .sum();
        behind > u64::from(self.config.feed_batch_max)
    }

    /// Starts whatever is due: heads polls, anti-entropy rounds.
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
            // Anti-entropy: urgent work first, then the periodic sweep. A round starts
            // before the polls take a slot: with a single slot, the poll (sent again as soon as
            // it is answered, then held by the peer) would otherwise keep it from ever starting.
            let p = &self.peers[peer];
            if matches!(p.round, Round::Idle) && p.in_flight < self.config.requests_in_flight_max {
                let urgent = p.urgent.iter().next().copied();
                let work = if let Some(urgent) = urgent {
                    Some(urgent)
                } else if p.next_sweep_ms <= now_ms {
                    let partitions = self.config.partitions.max(1);
                    let first = p.next_sweep_partition.min(partitions - 1);
                    let width = self.sweep_width().min(partitions - first);
                    Some(Work::Reconcile {
                        first,
                        partitions: width,
                    })
                } else {
                    None
                };
                let waits = work.is_some_and(|w| self.waits_for_feed(peer, w, now_ms));
                let p = &mut self.peers[peer];
                p.waiting_since_ms = if waits {
                    Some(p.waiting_since_ms.unwrap_or(now_ms))
                } else {
                    None
                };
                let work = work.filter(|_| !waits);
                match (work, urgent) {
                    (Some(work), Some(urgent)) if work == urgent => {
                        self.peers[peer].urgent.remove(&urgent);
                    }
                    (Some(Work::Reconcile { first, partitions }), _) => {
                        let step = self.sweep_step_ms();
                        let total = self.config.partitions.max(1);
                        let p = &mut self.peers[peer];
                        p.next_sweep_partition = if first + partitions >= total {
                            0
                        } else {
                            first + partitions
                        };
                        p.next_sweep_ms = now_ms + step;
                    }
                    _ => {}
                }
                match work {
                    Some(Work::Reconcile { first, partitions }) => {
                        self.peers[peer].round = Round::Summary { first, partitions };
                        out.push(self.local(
                            LocalOp::Summary { first, partitions },
                            Purpose::LocalSummary { peer },
                        ));
                    }
                    Some(Work::Compare(partition)) => {
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
                            self.local(
                                LocalOp::Digest { partition },
                                Purpose::LocalDigest { peer },
                            ),
                        );
                    }
                    None => {}
                }
            }
            self.send_polls(peer, now_ms, out);
        }
    }
}
