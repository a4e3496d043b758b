//! The Redis region store: standalone, Redis Cluster or Sentinel-watched (feature `redis`).
//!
//! Needs Redis 7.0 or newer (scripts declare their flags with a `#!lua` shebang, so the server
//! refuses a write script before it runs when it is out of memory, rather than halfway).
//!
//! # Key layout
//!
//! Every key of partition `p` starts with the hash tag `{<prefix>p<p>}` (the prefix is
//! [`RedisConfig::key_prefix`], `gs:` by default), so on Redis Cluster a partition lives in
//! one slot and one Lua script can change a value, its feed entry and its digest atomically:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{gs:p17}:v:<key>` | string | the value's envelope (`geostate_crdt::envelope`), nothing else |
//! | `{gs:p17}:m:<bucket>` | hash | key -> `"<version> <commit token> <seq> <value hash><entry hash>"` for the keys of one digest bucket |
//! | `{gs:p17}:i` | sorted set | the partition's keys, all scored 0, so `ZRANGEBYLEX` lists them in byte order |
//! | `{gs:p17}:d` | hash | digest bucket -> fingerprint (16 hex digits; a missing bucket is 0) |
//! | `{gs:p17}:n` | hash | `v`: the partition's version clock; `s`: its last feed sequence number |
//! | `{gs:p17}:f` | stream | the change feed: entry `<seq>-0` with fields `k` key, `d` delta envelope, `a` origin actor, `p`/`l` HLC |
//! | `{gs:p17}:c` | hash | origin region -> replication cursor |
//! | `{gs:p17}:t` | sorted set | the partition's tombstones (keys whose value holds no live dot), scored 0 like the key index |
//! | `{gs:p17}:fl` | hash | the dot floor: actor id -> highest counter of that actor in any value removed from the partition (decimal) |
//! | `{gs:x}:cn`, `{gs:x}:cf` | string, stream | the conflict feed's counter and records (newest 100,000 kept) |
//! | `{gs:x}:layout` | string | `"<partitions> <buckets>"`: a store with another layout refuses to connect |
//!
//! Versions come from the partition's clock, so they never repeat within a partition, even
//! after a delete. Values are stored as envelopes, exactly the bytes `redis-cli GET` shows.
//!
//! # Write path
//!
//! Redis cannot run the CRDT code, so [`apply`](StateBackend::apply) is optimistic:
//!
//! 1. the client takes a snapshot of the key: from the **write cache** when this process
//!    committed the key recently (its decoded value, meta and envelope checksum, exactly as
//!    the commit left them; see [`WriteCacheConfig`]), otherwise from one read-only script that
//!    returns the value's bytes and meta (version, hashes) atomically, and the writer's entry
//!    of the partition's dot floor (`{..}:fl`);
//! 2. the client decodes them (undecodable bytes: [`BackendError::Corrupt`], nothing written),
//!    checks the [`Expect`](crate::Expect) condition, computes the operation's delta from that
//!    state with [`local_delta`] and the floor read, the new value, its size (limit:
//!    [`Layout::value_bytes_max`]) and its hashes;
//! 3. one write script checks that the key still holds exactly what the snapshot says (the
//!    same meta, hence version, and the same envelope checksum, the last four bytes of the
//!    value; for an absent key, no value and the same floor entry of the writer), then bumps
//!    the partition's version clock, writes the envelope and meta, moves the key's entry in
//!    the digest bucket (the client passes old XOR new entry hash), indexes a new key (and adds
//!    it to or drops it from the tombstone index, as the client says), appends the feed entry
//!    with the partition's next sequence number, trims the feed to about
//!    [`Layout::feed_entries_max`] (`XADD .. MAXLEN ~`: whole stream nodes at a time; reads
//!    hide the few older entries left, so readers see exactly the bound) and returns version
//!    and seq;
//!    The commit carries a random token that the meta records, so a commit that a driver
//!    resends after losing its reply (the cluster client does) is recognised and answered
//!    with its first outcome instead of being taken for a lost race and computed again;
//! 4. if the key changed in between (another writer won the race), nothing was written and the
//!    key's cache entry is dropped: after a stale cache entry the client reads at once; after
//!    a race on a fresh read it waits a jittered, exponentially growing delay; either way it
//!    starts again from 1, at most [`ContentionConfig::attempts_max`] times (a stale cache
//!    entry does not count: it is not contention), then fails with
//!    [`BackendError::Contention`] (nothing was written).
//!
//! So a write to a key this process wrote before is one round trip; a first write is two. The
//! cache never serves reads ([`get`](StateBackend::get) always asks Redis), and every removal
//! by this process drops its keys' entries. The value check by checksum alone misses a value
//! replaced behind our back by bytes that end in the same four bytes: one chance in 2^32 for
//! an arbitrary change (the meta check catches every change made through geostate).
//!
//! Writes to one key from tasks of one process are also serialised by a local lock per key
//! ([`ContentionConfig::local_key_locks`]) so that they do not race each other; writers in
//! other processes are kept correct by step 3 alone. [`merge`](StateBackend::merge) takes the
//! same path without a feed entry. The batch forms pipeline: reads of a batch travel together,
//! then its commits, several per write script call (up to 64; the call still checks and
//! commits each item on its own, and a command failing for one item fails that item only),
//! grouped by partition on a cluster (one slot per call). Items on one key run in batch order;
//! items of different keys that lose a race to another writer are committed after the batch's
//! later items.
//!
//! **Group commit.** A single [`apply`](StateBackend::apply) or [`merge`](StateBackend::merge)
//! that finds the store idle runs at once in its caller's task. One that arrives while other
//! writes are in flight queues, and up to four spawned tasks drain the queue, each running
//! what queued as one batch (above). Under concurrency this shares the fixed cost of a request
//! (the client's request machinery, the server's script call: measured, the client CPU per
//! merge with 50 tasks fell from 49 to 23 microseconds) among the writes that queued while the
//! previous one was on the wire. The spawned tasks own the queued writes, so a caller that
//! gives up (a dropped future, a timeout) never fails the others' writes; its own write may
//! still commit, as any write already sent may. [`RedisStats::grouped_writes`] and
//! [`RedisStats::write_calls`] count what happened.
//!
//! # Tombstones, purges and the dot floor
//!
//! The client knows whether a value it commits holds no live dot, so the write script keeps
//! the tombstone index `{..}:t` up to date in the same step (a write that neither reads nor
//! writes a tombstone does not touch it). [`tombstones`](StateBackend::tombstones) walks that
//! index by `ZRANGEBYLEX` and reads each key back (one pipelined read per page), listing it
//! only if it holds a tombstone at that moment, with the version and value hash of its meta.
//!
//! [`purge`](StateBackend::purge) and [`delete`](StateBackend::delete) must raise the floor by
//! the removed value's context, which only the client can decode. Both read the key (step 1
//! above), decode it, compute the context's maxima, and run one remove script that checks the
//! key still holds exactly what was read, then removes value, meta, index entries and digest
//! contribution and raises the floor entries (compared as decimal strings). A purge whose key
//! changed in between returns `false` (its version changed); a delete starts again, like a
//! write. A value that does not decode is deleted without raising the floor (its dots are
//! unknown) and is never purged.
//!
//! Why a write to an absent key cannot mint a purged dot: its commit checks that the key is
//! still absent **and** that the writer's floor entry is the one its delta was computed from.
//! Every removal that could hold dots of the writer raises that entry in the same script that
//! removes the value, so if the key was created and purged (or deleted) between the write's
//! read and its commit, by any process, the entry differs and the write starts again from a
//! fresh read. (A purge of another key of the partition may also fail the check: a harmless
//! extra attempt.) A write to a key that holds a value is checked by its meta alone: a purge of
//! that key changes it, and a purge of another key changes nothing the write depends on. The
//! hot path gains one `HGET` inside the read script, no round trip.
//!
//! Tombstones written before the index existed are not listed until they are written again
//! (they are merely kept, which is safe).
//!
//! # Failures and retries
//!
//! Reads, merges, deletes, cursor advances and feed trims are safe to repeat and are retried
//! after transport errors with exponential backoff and full jitter ([`RetryConfig`]). A local
//! write ([`apply`](StateBackend::apply), [`append_conflict`](StateBackend::append_conflict)) is
//! retried only when the server certainly did not run it (refused connection, `READONLY`,
//! `CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`, `LOADING`, unknown script). When the reply is lost
//! (timeout, dropped connection) the caller gets [`BackendError::Unavailable`] whose message
//! says the write **may or may not have taken effect**: it must read the key (or the feed) to
//! find out before writing again, since a counter increment repeated blindly counts twice.
//!
//! A circuit breaker ([`BreakerConfig`]) opens after consecutive transport failures; while it
//! is open every operation fails at once with `Unavailable` ("nothing was written"); after the
//! open period one operation probes the store and closes the breaker if it succeeds.
//!
//! # Durability
//!
//! - [`Durability::Primary`] (default): a write is acknowledged once the primary applied it.
//!   Redis replicates asynchronously, so a failover (Sentinel or Cluster) can lose writes
//!   acknowledged shortly before it; persistence is whatever the server's RDB/AOF settings
//!   give (`appendfsync always` for fsync per write).
//! - [`Durability::Wait`]: each write is followed by `WAIT n timeout`; it is acknowledged only
//!   when `n` replicas have it, otherwise the caller gets `Unavailable` (the primary has it;
//!   a failover may or may not keep it). This narrows the loss window to writes whose `WAIT`
//!   failed, but it is not consensus: Sentinel or Cluster may still promote a replica that
//!   missed a write, and `WAIT` says nothing about fsync.
//!
//! In every mode a store failover keeps what the new primary holds: geostate never rewrites a
//! value it did not read, so no write the store kept is lost by this client.
//!
//! # Modes
//!
//! - standalone: one multiplexed connection with automatic reconnection;
//! - Cluster: the cluster client follows `MOVED`/`ASK` and topology changes; requests of
//!   different partitions go to their slots' primaries concurrently;
//! - Sentinel: the master is found through the sentinels; after a connection error or a
//!   `READONLY` reply (the old master came back as a replica) the client asks again and
//!   reconnects (redis-rs does not follow failovers by itself).
//!
//! ```no_run
//! use geostate_backends::redis::{RedisBackend, RedisConfig};
//! use geostate_backends::{Expect, Key, LocalWrite, StateBackend};
//! use geostate_crdt::{ActorId, CounterOp, Hlc, Op};
//!
//! # async fn demo() -> Result<(), geostate_backends::BackendError> {
//! let store = RedisBackend::connect(RedisConfig::standalone("redis://127.0.0.1:6379/")).await?;
//! let key = Key::new("visits")?;
//! let receipt = store
//!     .apply(LocalWrite {
//!         key: key.clone(),
//!         op: Op::from(CounterOp::inc(1)),
//!         actor: ActorId::new(7),
//!         hlc: Hlc::new(1_700_000_000_000, 0),
//!         expect: Expect::Any,
//!     })
//!     .await?;
//! let feed = store.read_feed(receipt.partition, 0, 100).await?;
//! assert_eq!(feed.last_seq, receipt.seq.unwrap_or_default());
//! # Ok(()) }
//! ```

mod breaker;
mod config;
mod conn;
mod group;
mod names;
mod stats;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use geostate_crdt::{envelope, ActorId, Crdt, Hlc, TypeTag, VersionVector};
use redis::Value;

pub use breaker::BreakerState;
pub use config::{
    BreakerConfig, ContentionConfig, Durability, RedisConfig, RedisMode, RedisTls, RetryConfig,
    WriteCacheConfig, KEY_PREFIX_BYTES_MAX,
};
pub use stats::{RedisStats, StatsHandle};

use conn::{Conn, Failure, Group, Lua, Req, Safety, ScriptCall};
use names::{decimal, hex16, Names};

use crate::backend::{check_origin, local_delta, outcomes, page_limit, waves};
use crate::cache::SnapshotCache;
use crate::digest::{entry_hash, value_hash};
use crate::keylocks::{KeyGuard, KeyLocks};
use crate::{
    fnv1a64, BackendError, FeedEntry, FeedPage, Key, Layout, LocalWrite, PartitionDigest, Receipt,
    ScanItem, ScanPage, StateBackend, Stored, Tombstone, TombstonePage,
};

/// Conflict records kept; older ones are dropped first.
pub const CONFLICTS_MAX: usize = 100_000;

/// Most items of a batch whose reads and commits travel together.
const WAVE_ITEMS_MAX: usize = 512;
/// Most commits one write script call carries: enough to spread the call's fixed cost, few
/// enough that a call holds the server for a couple of milliseconds at most.
const SCRIPT_ITEMS_MAX: usize = 64;

/// Keys deleted per script call by [`RedisBackend::purge`].
const PURGE_BATCH: usize = 500;

/// The group id of the conflict feed's slot (partitions are below 4096).
const GLOBAL_GROUP: u32 = u32::MAX;

struct Scripts {
    read: Arc<Lua>,
    write: Arc<Lua>,
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    raw_put: Arc<Lua>,
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    raw_append_feed: Arc<Lua>,
    remove: Arc<Lua>,
    read_feed: Arc<Lua>,
    advance_cursor: Arc<Lua>,
    append_conflict: Arc<Lua>,
    purge: Arc<Lua>,
    version: Arc<Lua>,
}

macro_rules! write_script {
    ($file:literal) => {
        concat!(
            "#!lua\n",
            include_str!("lua/common.lua"),
            include_str!($file)
        )
    };
}

macro_rules! read_script {
    ($file:literal) => {
        concat!("#!lua flags=no-writes\n", include_str!($file))
    };
}

impl Scripts {
    fn new() -> Self {
        let lua = |name, body| Arc::new(Lua::new(name, body));
        Self {
            read: lua("read", read_script!("lua/read.lua")),
            write: lua("write", write_script!("lua/write.lua")),
            raw_put: lua("raw_put", write_script!("lua/raw_put.lua")),
            raw_append_feed: lua(
                "raw_append_feed",
                "#!lua\n\
                 local seq = redis.call('HINCRBY', KEYS[1], 's', 1)\n\
                 redis.call('XADD', KEYS[2], string.format('%d-0', seq), 'k', ARGV[1], \
                 'd', ARGV[2], 'a', '0', 'p', '0', 'l', '0')\n\
                 return seq",
            ),
            remove: lua("remove", write_script!("lua/remove.lua")),
            read_feed: lua("read_feed", read_script!("lua/read_feed.lua")),
            advance_cursor: lua("advance_cursor", write_script!("lua/advance_cursor.lua")),
            append_conflict: lua("append_conflict", write_script!("lua/append_conflict.lua")),
            purge: lua("purge", write_script!("lua/purge.lua")),
            version: lua(
                "version",
                "#!lua flags=no-writes\nreturn redis.REDIS_VERSION",
            ),
        }
    }
}

/// A region store kept in Redis. See the [module docs](self) for the layout, the write path
/// and what each durability mode promises. Cheap to share behind an `Arc`; all methods take
/// `&self`.
pub struct RedisBackend {
    store: Arc<Store>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.store.fmt(f)
    }
}

/// What a [`RedisBackend`] holds, shared with the tasks that commit grouped writes.
struct Store {
    layout: Layout,
    names: Names,
    conn: Conn,
    scripts: Scripts,
    contention: ContentionConfig,
    locks: Option<KeyLocks>,
    cache: SnapshotCache<CachedKey>,
    /// Single writes waiting to ride a grouped commit.
    queue: group::Queue,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("layout", &self.layout)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// The meta of a key: its version and hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Meta {
    version: u64,
    value_hash: u64,
    /// The key's contribution to its bucket's fingerprint.
    entry_hash: u64,
}

/// A key as read in one atomic step.
#[derive(Debug)]
struct Snapshot {
    content: Content,
    /// The meta string exactly as stored (the commit checks it is unchanged).
    meta_raw: Option<Vec<u8>>,
    meta: Option<Meta>,
    /// For a local write's read of a key that holds no value: the writer's entry of the
    /// partition's dot floor (the commit checks it is unchanged).
    floor: Option<FloorSeen>,
}

/// A writer's entry of a partition's dot floor, as read.
#[derive(Clone, Debug, Default)]
struct FloorSeen {
    /// The entry exactly as stored (empty: none).
    raw: Vec<u8>,
    /// Its value (0: none).
    counter: u64,
}

#[derive(Debug)]
enum Content {
    Absent,
    Bytes(Vec<u8>),
    /// A Redis value of another type than string: not ours, treated as corrupt.
    Foreign,
    /// What this process committed last, from the write cache: the value decoded, and its
    /// envelope's length and last four bytes.
    Cached(Arc<CachedKey>),
}

/// A write cache entry: a key as this process's last commit to it left it.
#[derive(Debug)]
struct CachedKey {
    value: Crdt,
    /// The envelope's length and last four bytes (its checksum).
    len: usize,
    tail: Vec<u8>,
    /// The meta string exactly as the commit recorded it.
    meta_raw: Vec<u8>,
    meta: Meta,
    /// The writer and its dot floor entry that the committed write was computed with (`None`
    /// after a merge, which reads no floor).
    floor: Option<(ActorId, FloorSeen)>,
}

impl Snapshot {
    /// A snapshot from a write cache entry, usable for `item` only if the entry has what the
    /// item needs: a local write needs its writer's floor entry.
    fn cached(entry: Arc<CachedKey>, item: &Item) -> Option<Snapshot> {
        let floor = match item {
            Item::Apply(w) => match &entry.floor {
                Some((actor, seen)) if *actor == w.actor => Some(seen.clone()),
                _ => return None,
            },
            Item::Merge(..) => None,
        };
        Some(Snapshot {
            meta_raw: Some(entry.meta_raw.clone()),
            meta: Some(entry.meta),
            floor,
            content: Content::Cached(entry),
        })
    }

    /// Whether this snapshot came from the write cache.
    fn is_cached(&self) -> bool {
        matches!(self.content, Content::Cached(_))
    }

    /// Whether the key held no value.
    fn is_absent(&self) -> bool {
        matches!(self.content, Content::Absent)
    }

    /// The last four bytes of the value (its envelope's checksum; empty when none).
    fn tail(&self) -> &[u8] {
        match &self.content {
            Content::Bytes(bytes) => &bytes[bytes.len().saturating_sub(4)..],
            Content::Cached(entry) => &entry.tail,
            Content::Absent | Content::Foreign => &[],
        }
    }
}

impl Snapshot {
    /// The decoded value and its version, or why it cannot be used.
    fn value(&self, key: &Key) -> Result<Option<(Crdt, u64)>, BackendError> {
        let version = self.meta.map_or(0, |m| m.version);
        match &self.content {
            Content::Absent => Ok(None),
            Content::Foreign => Err(BackendError::Corrupt {
                key: key.to_string(),
                source: geostate_crdt::Error::Payload(
                    "the Redis key holds another data type than a string".into(),
                ),
            }),
            Content::Bytes(bytes) => match envelope::decode(bytes, &envelope::Limits::default()) {
                Ok(value) => Ok(Some((value, version))),
                Err(source) => Err(BackendError::Corrupt {
                    key: key.to_string(),
                    source,
                }),
            },
            Content::Cached(entry) => Ok(Some((entry.value.clone(), version))),
        }
    }

    /// The arguments by which the write and remove scripts recognise this snapshot: the meta,
    /// the value's length (-1: none, -2: a value of another Redis type) and its last four
    /// bytes (the envelope's checksum). The write script never sees -2: a foreign value is
    /// reported corrupt before anything is committed.
    fn guard(&self) -> [Vec<u8>; 3] {
        let meta = self.meta_raw.clone().unwrap_or_default();
        match &self.content {
            Content::Bytes(bytes) => {
                let tail = bytes[bytes.len().saturating_sub(4)..].to_vec();
                [meta, bytes.len().to_string().into_bytes(), tail]
            }
            Content::Absent => [meta, b"-1".to_vec(), Vec::new()],
            Content::Foreign => [meta, b"-2".to_vec(), Vec::new()],
            Content::Cached(entry) => {
                [meta, entry.len.to_string().into_bytes(), entry.tail.clone()]
            }
        }
    }
}

/// One item of a batch of writes.
enum Item {
    Apply(LocalWrite),
    Merge(Key, Crdt),
}

impl Item {
    fn key(&self) -> &Key {
        match self {
            Item::Apply(w) => &w.key,
            Item::Merge(k, _) => k,
        }
    }
}

/// A write computed from a snapshot, ready to commit.
struct Commit {
    value: Vec<u8>,
    hashes: String,
    /// The new value's entry hash (the last 16 hex digits of `hashes`).
    entry_hash: u64,
    delta: Crdt,
    feed: Option<Vec<u8>>,
    actor: ActorId,
    hlc: Hlc,
    /// Whether the value read was a tombstone, and whether the new value is one.
    tombstone: (bool, bool),
    /// For a local write to an absent key: the writer and its dot floor entry as read (the
    /// commit checks it is unchanged, so no purge raised it in between).
    floor: Option<(ActorId, Vec<u8>)>,
    /// The new value, decoded (for the write cache).
    state: Crdt,
    /// For a local write: the writer and the floor entry its delta was computed with.
    computed_with: Option<(ActorId, FloorSeen)>,
    /// The commit's token (random per attempt; the meta records it).
    token: u64,
}

enum Plan {
    /// Nothing to write (a no-op): the receipt is final.
    Done(Receipt),
    Commit(Box<Commit>),
}

fn unexpected(what: &str, value: &Value) -> BackendError {
    let mut shown = format!("{value:?}");
    shown.truncate(200);
    BackendError::Unavailable(format!("redis {what}: unexpected reply {shown}"))
}

fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn int_of(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// The pairs of a `HGETALL` reply (RESP2 flat array or RESP3 map).
fn pairs(value: &Value) -> Option<Vec<(&[u8], &[u8])>> {
    match value {
        Value::Array(items) => items
            .chunks(2)
            .map(|c| match c {
                [k, v] => Some((bytes_of(k)?, bytes_of(v)?)),
                _ => None,
            })
            .collect(),
        Value::Map(items) => items
            .iter()
            .map(|(k, v)| Some((bytes_of(k)?, bytes_of(v)?)))
            .collect(),
        Value::Nil => Some(Vec::new()),
        _ => None,
    }
}

/// A server error in a reply, as the caller sees it.
fn server_error(value: &Value, what: &str, writes: bool) -> Option<BackendError> {
    let Value::ServerError(e) = value else {
        return None;
    };
    let refused = matches!(
        e.kind(),
        Some(
            redis::ServerErrorKind::ReadOnly
                | redis::ServerErrorKind::ClusterDown
                | redis::ServerErrorKind::TryAgain
                | redis::ServerErrorKind::MasterDown
                | redis::ServerErrorKind::BusyLoading
        )
    );
    let detail = format!("{} {}", e.code(), e.details().unwrap_or_default());
    Some(BackendError::Unavailable(if refused {
        format!("redis refused {what}: {detail}; nothing was written")
    } else if writes {
        format!("redis {what} failed: {detail}; the operation may or may not have taken effect")
    } else {
        format!("redis {what} failed: {detail}")
    }))
}

fn parse_meta(raw: &[u8]) -> Option<Meta> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut fields = text.split(' ');
    let (version, _token, _seq, hashes) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    if hashes.len() != 32 || !hashes.is_ascii() || fields.next().is_some() {
        return None;
    }
    Some(Meta {
        version: version.parse().ok()?,
        value_hash: u64::from_str_radix(&hashes[..16], 16).ok()?,
        entry_hash: u64::from_str_radix(&hashes[16..], 16).ok()?,
    })
}

/// A counter stored as a decimal string.
fn parse_decimal(raw: &[u8]) -> Option<u64> {
    std::str::from_utf8(raw).ok()?.parse().ok()
}

fn hashes_hex(key: &Key, value_hash: u64) -> String {
    format!("{value_hash:016x}{:016x}", entry_hash(key, value_hash))
}

/// Parses a stream id `<seq>-0`.
fn stream_seq(id: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(id).ok()?;
    text.split_once('-')?.0.parse().ok()
}

/// Encodes `value` and computes its canonical payload length and value hash (from the
/// envelope itself when it is not compressed).
fn encode_value(key: &Key, value: &Crdt, limit: usize) -> Result<(Vec<u8>, u64), BackendError> {
    let too_large = |size| BackendError::ValueTooLarge {
        key: key.to_string(),
        size,
        limit,
    };
    let bytes = match envelope::encode(value, &envelope::Options::default()) {
        Ok(bytes) => bytes,
        Err(geostate_crdt::Error::TooLarge { size, .. }) => return Err(too_large(size)),
        Err(e) => return Err(e.into()),
    };
    let compressed = bytes
        .get(6)
        .is_some_and(|flags| flags & envelope::FLAG_COMPRESSED != 0);
    let (len, hash) = if compressed {
        let payload = envelope::canonical_payload(value)?;
        (payload.len(), fnv1a64(&payload))
    } else {
        let payload = &bytes[envelope::HEADER_LEN..bytes.len() - envelope::TRAILER_LEN];
        (payload.len(), fnv1a64(payload))
    };
    if len > limit {
        return Err(too_large(len));
    }
    Ok((bytes, hash))
}

/// Computes what an item writes, from a snapshot of its key; the commit will carry `token`.
fn plan(
    layout: &Layout,
    item: &Item,
    snapshot: &Snapshot,
    token: u64,
) -> Result<Plan, BackendError> {
    let limit = layout.value_bytes_max();
    if snapshot.meta_raw.is_some() && snapshot.meta.is_none() {
        // The commit moves the key's entry in its digest bucket, which the meta records.
        return Err(BackendError::Corrupt {
            key: item.key().to_string(),
            source: geostate_crdt::Error::Payload("the key's meta cannot be read".into()),
        });
    }
    match item {
        Item::Apply(write) => {
            let key = &write.key;
            let partition = layout.partition_of(key);
            let current = snapshot.value(key)?;
            write.expect.check(key, current.as_ref().map(|(_, v)| *v))?;
            let absent = current.is_none();
            // The writer's floor entry as read. For an absent key the commit checks it is
            // unchanged (a purge between read and commit raises it); a present key's commit
            // checks the key's version, which a purge changes. (A snapshot read without it
            // commits against '', which fails if the floor has an entry.)
            let seen = snapshot.floor.clone().unwrap_or_default();
            let (state, version) = match (current, write.op.type_tag()) {
                (Some((value, version)), _) => (value, version),
                (None, Some(tag)) => (Crdt::empty(tag), 0),
                // A deletion of a key that holds nothing changes nothing.
                (None, None) => {
                    return Ok(Plan::Done(Receipt {
                        partition,
                        version: 0,
                        seq: None,
                        delta: Crdt::empty(TypeTag::GCounter),
                    }))
                }
            };
            let delta = local_delta(&state, write, seen.counter)?;
            if delta.context().is_empty() {
                return Ok(Plan::Done(Receipt {
                    partition,
                    version,
                    seq: None,
                    delta,
                }));
            }
            let was_tombstone = !absent && state.is_bottom();
            let delta_len = envelope::payload_len(&delta)?;
            if delta_len > limit {
                return Err(BackendError::ValueTooLarge {
                    key: key.to_string(),
                    size: delta_len,
                    limit,
                });
            }
            let mut value = state;
            value.merge(&delta)?;
            let (bytes, hash) = encode_value(key, &value, limit)?;
            let fed = envelope::encode(&delta, &envelope::Options::default())?;
            Ok(Plan::Commit(Box::new(Commit {
                value: bytes,
                hashes: hashes_hex(key, hash),
                entry_hash: entry_hash(key, hash),
                delta,
                feed: Some(fed),
                actor: write.actor,
                hlc: write.hlc,
                tombstone: (was_tombstone, value.is_bottom()),
                floor: absent.then(|| (write.actor, seen.raw.clone())),
                state: value,
                computed_with: Some((write.actor, seen)),
                token,
            })))
        }
        Item::Merge(key, delta) => {
            let current = snapshot.value(key)?;
            let delta_len = envelope::payload_len(delta)?;
            if delta_len > limit {
                return Err(BackendError::ValueTooLarge {
                    key: key.to_string(),
                    size: delta_len,
                    limit,
                });
            }
            // Into an absent key, join with the empty value rather than storing the delta as
            // is: a removal delta's empty entries are not elements.
            let (mut value, was_tombstone) = match current {
                Some((value, _)) => {
                    let bottom = value.is_bottom();
                    (value, bottom)
                }
                None => (Crdt::empty(delta.type_tag()), false),
            };
            value.merge(delta)?;
            let (bytes, hash) = encode_value(key, &value, limit)?;
            Ok(Plan::Commit(Box::new(Commit {
                value: bytes,
                hashes: hashes_hex(key, hash),
                entry_hash: entry_hash(key, hash),
                delta: delta.clone(),
                feed: None,
                actor: ActorId::new(0),
                hlc: Hlc::ZERO,
                tombstone: (was_tombstone, value.is_bottom()),
                // A merge mints no dot: the floor does not matter to it.
                floor: None,
                state: value,
                computed_with: None,
                token,
            })))
        }
    }
}

/// The outcome of one commit script.
enum Committed {
    Written { version: u64, seq: u64 },
    Race,
}

/// What a physical removal asks of the key it removes.
#[derive(Clone, Copy, Debug)]
enum Removal {
    /// [`StateBackend::delete`]: whatever the key holds.
    Delete,
    /// [`StateBackend::purge`]: only a tombstone at exactly this version.
    Purge(u64),
}

/// A removal decided from a snapshot.
enum RemovalPlan {
    /// Nothing to remove: the outcome is final.
    Done(bool),
    /// Run the remove script, raising the dot floor by this.
    Run(VersionVector),
}

/// Decides a removal from a snapshot of the key.
fn plan_removal(key: &Key, snapshot: &Snapshot, how: Removal) -> RemovalPlan {
    let value = snapshot.value(key);
    match how {
        // A value that does not decode (or is not ours) is removed all the same: its dots are
        // unknown, so it raises no floor (as in every store).
        Removal::Delete => RemovalPlan::Run(match value {
            Ok(Some((value, _))) => value.context().maxima(),
            _ => VersionVector::new(),
        }),
        Removal::Purge(version) => match value {
            Ok(Some((value, at))) if at == version && value.is_bottom() => {
                RemovalPlan::Run(value.context().maxima())
            }
            _ => RemovalPlan::Done(false),
        },
    }
}

impl RedisBackend {
    /// Connects to the store `config` names, checks the server (Redis 7.0 or newer) and the
    /// namespace's layout (the first store to use a key prefix fixes its partition and bucket
    /// counts; a store with other counts is refused with [`BackendError::InvalidArgument`]).
    /// An unreachable store is [`BackendError::Unavailable`].
    pub async fn connect(config: RedisConfig) -> Result<Self, BackendError> {
        Ok(Self {
            store: Arc::new(Store::connect(config).await?),
        })
    }

    /// Round-trip time of a `PING` (to every node of a cluster), bypassing the circuit
    /// breaker: for health checks.
    pub async fn ping(&self) -> Result<Duration, BackendError> {
        self.store.conn.ping().await
    }

    /// The circuit breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        self.store.conn.breaker.state()
    }

    /// What the store did since it connected (commits, lost races, retries, breaker trips).
    pub fn stats(&self) -> RedisStats {
        self.stats_handle().snapshot()
    }

    /// A handle on this store's counters and breaker state that may outlive the store.
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle {
            counters: Arc::clone(&self.store.conn.counters),
            breaker: Arc::clone(&self.store.conn.breaker),
        }
    }

    /// Deletes every Redis key of this store's namespace that the store knows of (the values
    /// in its key indexes, the metas, digests, counters, feeds, cursors, tombstone indexes, dot
    /// floors, the conflict feed and the layout record); returns how many. Keys written under
    /// the prefix by other clients and never indexed are left alone. Not atomic: concurrent
    /// writers may leave keys behind.
    /// (Not [`StateBackend::purge`], the garbage collection of one tombstone.)
    pub async fn purge_namespace(&self) -> Result<u64, BackendError> {
        self.store.purge_namespace().await
    }
}

impl Store {
    /// See [`RedisBackend::connect`].
    async fn connect(config: RedisConfig) -> Result<Self, BackendError> {
        config.validate()?;
        let conn = Conn::connect(&config).await?;
        let locks = config.contention.local_key_locks.then(KeyLocks::default);
        let backend = Self {
            layout: config.layout.clone(),
            names: Names::new(&config.key_prefix, config.layout.partitions()),
            conn,
            scripts: Scripts::new(),
            contention: config.contention.clone(),
            locks,
            cache: SnapshotCache::new(config.write_cache.entries_max, config.write_cache.bytes_max),
            queue: group::Queue::default(),
        };
        backend.check_server().await?;
        Ok(backend)
    }

    /// Checks the server version and fixes or verifies the namespace's layout.
    async fn check_server(&self) -> Result<(), BackendError> {
        let version = self
            .run_one(
                GLOBAL_GROUP,
                Req::script(&self.scripts.version, vec![self.names.layout()], vec![]),
                false,
                Safety::Idempotent,
            )
            .await
            .map_err(|e| {
                BackendError::Unavailable(format!(
                    "the Redis store needs Redis 7.0 or newer with Lua scripting: {e}"
                ))
            })?;
        let major = bytes_of(&version)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse::<u32>().ok())
            .unwrap_or(0);
        if major < 7 {
            return Err(BackendError::Unavailable(format!(
                "the Redis store needs Redis 7.0 or newer, the server runs {version:?}"
            )));
        }
        let wanted = format!("{} {}", self.layout.partitions(), self.layout.buckets());
        let mut set = redis::cmd("SET");
        set.arg(self.names.layout())
            .arg(&wanted)
            .arg("NX")
            .arg("GET");
        let previous = self
            // Not `writes`: the record needs no WAIT (a store that finds it lost writes it again).
            .run_one(GLOBAL_GROUP, Req::Cmd(set), false, Safety::Idempotent)
            .await?;
        match bytes_of(&previous) {
            None => Ok(()),
            Some(found) if found == wanted.as_bytes() => Ok(()),
            Some(found) => Err(BackendError::InvalidArgument(format!(
                "key prefix {:?} is laid out with \"{}\" (partitions buckets), this store with \
                 \"{wanted}\"",
                self.names.tag(0),
                String::from_utf8_lossy(found)
            ))),
        }
    }

    /// See [`RedisBackend::purge_namespace`].
    async fn purge_namespace(&self) -> Result<u64, BackendError> {
        self.cache.clear();
        let mut deleted = 0u64;
        let mut dirty: Vec<u16> = (0..self.layout.partitions()).collect();
        while !dirty.is_empty() {
            let reqs = dirty
                .iter()
                .map(|&p| {
                    let mut keys = vec![self.names.index(p)];
                    keys.extend((0..self.layout.buckets()).map(|b| self.names.meta(p, b)));
                    keys.extend([
                        self.names.digest(p),
                        self.names.counters(p),
                        self.names.feed(p),
                        self.names.cursors(p),
                        self.names.tombstones(p),
                        self.names.floor(p),
                    ]);
                    let args = vec![
                        PURGE_BATCH.to_string().into_bytes(),
                        self.names.value_prefix(p),
                    ];
                    (u32::from(p), Req::script(&self.scripts.purge, keys, args))
                })
                .collect();
            let replies = self.run_each(reqs, true, Safety::Idempotent).await;
            let mut still = Vec::new();
            for (&p, reply) in dirty.iter().zip(replies) {
                let reply = reply?;
                let n = int_of(&reply).ok_or_else(|| unexpected("purge", &reply))?;
                if n > 0 {
                    deleted += n;
                    still.push(p);
                }
            }
            dirty = still;
        }
        let mut del = redis::cmd("DEL");
        del.arg(self.names.conflict_counter())
            .arg(self.names.conflict_feed())
            .arg(self.names.layout());
        let reply = self
            .run_one(GLOBAL_GROUP, Req::Cmd(del), true, Safety::Idempotent)
            .await?;
        Ok(deleted + int_of(&reply).unwrap_or(0))
    }

    /// Runs requests (each tagged with its slot group), pipelined per group on Redis Cluster
    /// and all in one pipeline elsewhere (one server: a pipeline per partition would only
    /// cost more system calls and replies to wait for), and returns each request's reply in
    /// order.
    async fn run_each(
        &self,
        reqs: Vec<(u32, Req)>,
        writes: bool,
        safety: Safety,
    ) -> Vec<Result<Value, BackendError>> {
        let n = reqs.len();
        let cluster = self.conn.is_cluster();
        let mut groups: BTreeMap<u32, (Group, Vec<usize>)> = BTreeMap::new();
        for (i, (id, req)) in reqs.into_iter().enumerate() {
            let id = if cluster { id } else { 0 };
            let (group, members) = groups.entry(id).or_insert_with(|| {
                (
                    Group {
                        reqs: Vec::new(),
                        writes,
                    },
                    Vec::new(),
                )
            });
            group.reqs.push(req);
            members.push(i);
        }
        let (groups, members): (Vec<Group>, Vec<Vec<usize>>) = groups.into_values().unzip();
        let replies = self.conn.run(groups, safety).await;
        let mut out: Vec<Result<Value, BackendError>> = (0..n)
            .map(|_| {
                Err(BackendError::Unavailable(
                    "redis returned too few replies".into(),
                ))
            })
            .collect();
        for (members, replies) in members.into_iter().zip(replies) {
            match replies {
                Ok(values) => {
                    for (i, value) in members.into_iter().zip(values) {
                        out[i] = Ok(value);
                    }
                }
                Err(failure) => {
                    let error = Failure::into_error(failure);
                    for i in members {
                        out[i] = Err(error.clone());
                    }
                }
            }
        }
        out
    }

    async fn run_one(
        &self,
        group: u32,
        req: Req,
        writes: bool,
        safety: Safety,
    ) -> Result<Value, BackendError> {
        let name = match &req {
            Req::Script { lua, .. } => lua.name,
            Req::Cmd(_) => "command",
        };
        let reply = self
            .run_each(vec![(group, req)], writes, safety)
            .await
            .pop()
            .unwrap_or_else(|| Err(BackendError::Unavailable("redis returned no reply".into())))?;
        match server_error(&reply, name, writes) {
            Some(e) => Err(e),
            None => Ok(reply),
        }
    }

    /// Reads the snapshots of `keys`, pipelined.
    async fn snapshots(&self, keys: &[&Key]) -> Vec<Result<Snapshot, BackendError>> {
        let reads: Vec<(&Key, Option<ActorId>)> = keys.iter().map(|k| (*k, None)).collect();
        self.snapshots_for(&reads).await
    }

    /// `HGETALL` of one of `partition`'s hashes (the digest, the dot floor).
    async fn hash_of_partition(
        &self,
        partition: u16,
        name: Vec<u8>,
    ) -> Result<Value, BackendError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(name);
        self.run_one(
            u32::from(partition),
            Req::Cmd(cmd),
            false,
            Safety::Idempotent,
        )
        .await
    }

    /// Reads the snapshots of keys, pipelined; with a writer's actor, a snapshot also carries
    /// the writer's entry of the partition's dot floor, read in the same atomic step.
    async fn snapshots_for(
        &self,
        reads: &[(&Key, Option<ActorId>)],
    ) -> Vec<Result<Snapshot, BackendError>> {
        let reqs = reads
            .iter()
            .map(|(key, writer)| {
                let p = self.layout.partition_of(key);
                let b = self.layout.bucket_of(key);
                let mut keys = vec![self.names.value(p, key), self.names.meta(p, b)];
                let mut args = vec![key.as_str().as_bytes().to_vec()];
                if let Some(actor) = writer {
                    keys.push(self.names.floor(p));
                    args.push(actor.get().to_string().into_bytes());
                }
                (u32::from(p), Req::script(&self.scripts.read, keys, args))
            })
            .collect();
        self.run_each(reqs, false, Safety::Idempotent)
            .await
            .into_iter()
            .map(|reply| {
                let reply = reply?;
                if let Some(e) = server_error(&reply, "read", false) {
                    return Err(e);
                }
                let Value::Array(parts) = &reply else {
                    return Err(unexpected("read", &reply));
                };
                let (kind, bytes, meta, floor) = match parts.as_slice() {
                    [kind, bytes, meta] => (kind, bytes, meta, None),
                    [kind, bytes, meta, floor] => (kind, bytes, meta, Some(floor)),
                    _ => return Err(unexpected("read", &reply)),
                };
                let content = match (int_of(kind), bytes) {
                    (Some(0), _) => Content::Absent,
                    (Some(1), Value::BulkString(b)) => Content::Bytes(b.clone()),
                    (Some(2), _) => Content::Foreign,
                    _ => return Err(unexpected("read", &reply)),
                };
                let meta_raw = bytes_of(meta).map(<[u8]>::to_vec);
                let meta = meta_raw.as_deref().and_then(parse_meta);
                let floor = match floor.map(bytes_of) {
                    None => None,
                    Some(None) => Some(FloorSeen::default()),
                    Some(Some(raw)) => Some(FloorSeen {
                        raw: raw.to_vec(),
                        counter: parse_decimal(raw).ok_or_else(|| unexpected("read", &reply))?,
                    }),
                };
                Ok(Snapshot {
                    content,
                    meta_raw,
                    meta,
                    floor,
                })
            })
            .collect()
    }

    async fn get_values(&self, keys: &[&Key]) -> Vec<Result<Option<Stored>, BackendError>> {
        self.snapshots(keys)
            .await
            .into_iter()
            .zip(keys)
            .map(|(snapshot, key)| {
                Ok(snapshot?
                    .value(key)?
                    .map(|(value, version)| Stored { value, version }))
            })
            .collect()
    }

    /// Locks `keys` against this process's other writers (see [`KeyLocks`]).
    async fn lock_keys(&self, keys: &[&Key]) -> Vec<KeyGuard<'_>> {
        match &self.locks {
            Some(locks) => locks.lock(keys).await,
            None => Vec::new(),
        }
    }

    /// Runs a batch of writes: contiguous waves of distinct keys, each wave read together and
    /// committed together.
    async fn execute(&self, items: Vec<Item>) -> Vec<Result<Receipt, BackendError>> {
        let n = items.len();
        let mut out: Vec<Option<Result<Receipt, BackendError>>> = (0..n).map(|_| None).collect();
        for (i, item) in items.iter().enumerate() {
            if let Item::Merge(_, delta) = item {
                if !delta.is_well_formed() {
                    out[i] = Some(Err(BackendError::Crdt(geostate_crdt::Error::Payload(
                        "delta violates its invariants".into(),
                    ))));
                }
            }
        }
        for (start, end) in waves(n, WAVE_ITEMS_MAX, |i| items[i].key().as_str()) {
            self.run_wave(&items[start..end], &mut out[start..end])
                .await;
        }
        outcomes(out)
    }

    async fn run_wave(&self, items: &[Item], out: &mut [Option<Result<Receipt, BackendError>>]) {
        let keys: Vec<&Key> = items.iter().map(Item::key).collect();
        let _guards = self.lock_keys(&keys).await;
        let mut pending: Vec<usize> = (0..items.len()).filter(|&i| out[i].is_none()).collect();
        let mut attempt: u32 = 0;
        let mut first_round = true;
        while !pending.is_empty() {
            attempt += 1;
            // Items whose key is in the write cache commit without a read in the first round;
            // every later round reads (so a stale entry costs at most one round).
            let mut snapshots: Vec<Option<Result<Snapshot, BackendError>>> = pending
                .iter()
                .map(|&i| {
                    let item = &items[i];
                    first_round
                        .then(|| self.cache.get(item.key().as_str()))
                        .flatten()
                        .and_then(|(_, entry)| Snapshot::cached(entry, item))
                        .map(Ok)
                })
                .collect();
            first_round = false;
            let reads: Vec<(&Key, Option<ActorId>)> = pending
                .iter()
                .zip(&snapshots)
                .filter(|(_, s)| s.is_none())
                .map(|(&i, _)| match &items[i] {
                    Item::Apply(w) => (&w.key, Some(w.actor)),
                    Item::Merge(k, _) => (k, None),
                })
                .collect();
            if !reads.is_empty() {
                let mut read = self.snapshots_for(&reads).await.into_iter();
                for slot in snapshots.iter_mut().filter(|s| s.is_none()) {
                    *slot = read.next();
                }
            }
            let mut planned: Vec<(usize, Commit, Snapshot)> = Vec::new();
            // Items whose cached snapshot gave an answer without a commit (a no-op, a failed
            // condition, an error): only a fresh read may answer those, since the entry may
            // be stale and nothing would check it.
            let mut recheck = Vec::new();
            for (&i, snapshot) in pending.iter().zip(snapshots) {
                let snapshot = snapshot.unwrap_or_else(|| {
                    Err(BackendError::Unavailable(
                        "redis returned too few replies".into(),
                    ))
                });
                let from_cache = matches!(&snapshot, Ok(s) if s.is_cached());
                let token = self.conn.token();
                let planned_item =
                    snapshot.and_then(|s| Ok((plan(&self.layout, &items[i], &s, token)?, s)));
                match planned_item {
                    Err(_) | Ok((Plan::Done(_), _)) if from_cache => {
                        self.cache.remove(items[i].key().as_str());
                        recheck.push(i);
                    }
                    Err(e) => {
                        self.cache.remove(items[i].key().as_str());
                        out[i] = Some(Err(e));
                    }
                    Ok((Plan::Done(receipt), _)) => out[i] = Some(Ok(receipt)),
                    Ok((Plan::Commit(commit), s)) => {
                        planned.push((i, *commit, s));
                    }
                }
            }
            let once = planned
                .iter()
                .any(|(i, ..)| matches!(items[*i], Item::Apply(_)));
            let safety = if once {
                Safety::Once
            } else {
                Safety::Idempotent
            };
            let calls = self.commit_calls(items, &planned);
            let (reqs, members): (Vec<(u32, Req)>, Vec<Vec<usize>>) = calls
                .into_iter()
                .map(|(group, req, members)| ((group, req), members))
                .unzip();
            let mut outcomes: Vec<Option<Result<Committed, BackendError>>> =
                (0..planned.len()).map(|_| None).collect();
            for (reply, members) in self
                .run_each(reqs, true, safety)
                .await
                .into_iter()
                .zip(members)
            {
                let replies = reply.and_then(|v| parse_commits(&v, members.len()));
                match replies {
                    Ok(parsed) => {
                        for (at, outcome) in members.into_iter().zip(parsed) {
                            outcomes[at] = Some(outcome);
                        }
                    }
                    Err(e) => {
                        for at in members {
                            outcomes[at] = Some(Err(e.clone()));
                        }
                    }
                }
            }
            let mut raced = Vec::new();
            let mut contended = false;
            for ((i, commit, snapshot), outcome) in planned.into_iter().zip(outcomes) {
                let key = items[i].key();
                let cached = snapshot.is_cached();
                let outcome = outcome.unwrap_or_else(|| {
                    Err(BackendError::Unavailable(
                        "redis returned too few replies".into(),
                    ))
                });
                match outcome {
                    Ok(Committed::Written { version, seq }) => {
                        let counters = &self.conn.counters;
                        counters.commits.fetch_add(1, Ordering::Relaxed);
                        if cached {
                            counters.cached_commits.fetch_add(1, Ordering::Relaxed);
                        }
                        let fed = commit.feed.is_some();
                        let delta = self.remember(key, commit, version, seq);
                        out[i] = Some(Ok(Receipt {
                            partition: self.layout.partition_of(key),
                            version,
                            seq: fed.then_some(seq),
                            delta,
                        }));
                    }
                    Ok(Committed::Race) => {
                        self.cache.remove(key.as_str());
                        contended |= !cached;
                        raced.push(i);
                    }
                    Err(e) => {
                        self.cache.remove(key.as_str());
                        out[i] = Some(Err(e));
                    }
                }
            }
            if raced.is_empty() && recheck.is_empty() {
                break;
            }
            let counters = &self.conn.counters;
            counters
                .races
                .fetch_add(raced.len() as u64, Ordering::Relaxed);
            if !contended {
                // Only stale or unconfirmed cache entries: not contention; the next round
                // reads.
                attempt -= 1;
            } else if attempt >= self.contention.attempts_max {
                for i in raced {
                    counters.gave_up.fetch_add(1, Ordering::Relaxed);
                    out[i] = Some(Err(BackendError::Contention {
                        key: items[i].key().to_string(),
                        attempts: attempt,
                    }));
                }
                if recheck.is_empty() {
                    break;
                }
                pending = recheck;
                continue;
            }
            // A race lost on a stale cache entry only says another process wrote the key
            // since this one did: read it at once. A race on a fresh read is contention.
            if contended {
                tokio::time::sleep(self.conn.backoff(
                    attempt,
                    self.contention.backoff_min,
                    self.contention.backoff_max,
                ))
                .await;
            }
            raced.extend(recheck);
            raced.sort_unstable();
            pending = raced;
        }
    }

    /// Records a written commit in the write cache (the meta exactly as the write script
    /// formats it) and returns its delta.
    fn remember(&self, key: &Key, commit: Commit, version: u64, seq: u64) -> Crdt {
        let Commit {
            value,
            hashes,
            entry_hash: commit_entry,
            delta,
            state,
            computed_with,
            token,
            ..
        } = commit;
        let Some(value_hash) = hashes
            .get(..16)
            .and_then(|h| u64::from_str_radix(h, 16).ok())
        else {
            self.cache.remove(key.as_str());
            return delta;
        };
        let entry = CachedKey {
            len: value.len(),
            tail: value[value.len().saturating_sub(4)..].to_vec(),
            meta_raw: format!("{version} {token:016x} {seq} {hashes}").into_bytes(),
            meta: Meta {
                version,
                value_hash,
                entry_hash: commit_entry,
            },
            floor: computed_with,
            value: state,
        };
        self.cache
            .insert(key.as_str(), version, Arc::new(entry), value.len());
        delta
    }

    /// Physically removes `keys` as `how` says, each atomically with its dot floor raise; in
    /// waves of distinct keys (a key listed twice is removed by its first mention).
    async fn remove_keys(&self, keys: &[Key], how: Removal) -> Result<Vec<bool>, BackendError> {
        let mut out = vec![false; keys.len()];
        let mut start = 0;
        while start < keys.len() {
            let mut seen: HashSet<&Key> = HashSet::new();
            let mut end = start;
            while end < keys.len() && end - start < WAVE_ITEMS_MAX && seen.insert(&keys[end]) {
                end += 1;
            }
            self.remove_wave(&keys[start..end], how, &mut out[start..end])
                .await?;
            start = end;
        }
        Ok(out)
    }

    /// One wave of [`remove_keys`](Self::remove_keys): read the keys, decode their values for
    /// the floor raise, and remove each only if it still holds what was read. A delete that
    /// loses a race to a writer starts again (bounded like writes); a purge that does has
    /// nothing left to do (the key changed, so its version did).
    async fn remove_wave(
        &self,
        keys: &[Key],
        how: Removal,
        out: &mut [bool],
    ) -> Result<(), BackendError> {
        let refs: Vec<&Key> = keys.iter().collect();
        let _guards = self.lock_keys(&refs).await;
        for key in keys {
            self.cache.remove(key.as_str());
        }
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        let mut attempt: u32 = 0;
        while !pending.is_empty() {
            attempt += 1;
            let reading: Vec<&Key> = pending.iter().map(|&i| &keys[i]).collect();
            let snapshots = self.snapshots(&reading).await;
            let mut runs = Vec::new();
            let mut reqs = Vec::new();
            for (&i, snapshot) in pending.iter().zip(snapshots) {
                let snapshot = snapshot?;
                match plan_removal(&keys[i], &snapshot, how) {
                    RemovalPlan::Done(outcome) => out[i] = outcome,
                    RemovalPlan::Run(raise) => {
                        reqs.push(self.remove_req(&keys[i], &snapshot, &raise));
                        runs.push(i);
                    }
                }
            }
            let replies = self.run_each(reqs, true, Safety::Idempotent).await;
            let mut raced = Vec::new();
            for (i, reply) in runs.into_iter().zip(replies) {
                let reply = reply?;
                if let Some(e) = server_error(&reply, "remove", true) {
                    return Err(e);
                }
                match (&reply, how) {
                    (Value::Int(1), _) => out[i] = true,
                    (Value::Int(0), _) | (Value::Int(-1), Removal::Purge(_)) => out[i] = false,
                    (Value::Int(-1), Removal::Delete) => raced.push(i),
                    _ => return Err(unexpected("remove", &reply)),
                }
            }
            if raced.is_empty() {
                break;
            }
            let counters = &self.conn.counters;
            counters
                .races
                .fetch_add(raced.len() as u64, Ordering::Relaxed);
            if attempt >= self.contention.attempts_max {
                counters.gave_up.fetch_add(1, Ordering::Relaxed);
                return Err(BackendError::Contention {
                    key: keys[raced[0]].to_string(),
                    attempts: attempt,
                });
            }
            tokio::time::sleep(self.conn.backoff(
                attempt,
                self.contention.backoff_min,
                self.contention.backoff_max,
            ))
            .await;
            pending = raced;
        }
        Ok(())
    }

    fn remove_req(&self, key: &Key, snapshot: &Snapshot, raise: &VersionVector) -> (u32, Req) {
        let p = self.layout.partition_of(key);
        let b = self.layout.bucket_of(key);
        let [meta, len, tail] = snapshot.guard();
        let keys = vec![
            self.names.value(p, key),
            self.names.meta(p, b),
            self.names.index(p),
            self.names.digest(p),
            self.names.tombstones(p),
            self.names.floor(p),
        ];
        let mut args = vec![
            key.as_str().as_bytes().to_vec(),
            b.to_string().into_bytes(),
            meta,
            len,
            tail,
        ];
        for (actor, counter) in raise.iter() {
            args.push(actor.get().to_string().into_bytes());
            args.push(counter.to_string().into_bytes());
        }
        (u32::from(p), Req::script(&self.scripts.remove, keys, args))
    }

    /// Builds the write script calls committing `planned` (contiguous runs of one slot group,
    /// at most [`SCRIPT_ITEMS_MAX`] items per call) and returns each call with the positions
    /// in `planned` of the items it carries.
    fn commit_calls(
        &self,
        items: &[Item],
        planned: &[(usize, Commit, Snapshot)],
    ) -> Vec<(u32, Req, Vec<usize>)> {
        let cluster = self.conn.is_cluster();
        let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (at, (i, ..)) in planned.iter().enumerate() {
            let group = if cluster {
                u32::from(self.layout.partition_of(items[*i].key()))
            } else {
                0
            };
            groups.entry(group).or_default().push(at);
        }
        let mut calls = Vec::new();
        for (group, members) in groups {
            for chunk in members.chunks(SCRIPT_ITEMS_MAX) {
                let mut call = ScriptCall::new(&self.scripts.write, chunk.len() * 8);
                for &at in chunk {
                    self.push_commit_keys(&mut call, items[planned[at].0].key());
                }
                for &at in chunk {
                    let (i, commit, snapshot) = &planned[at];
                    self.push_commit_args(&mut call, items[*i].key(), commit, snapshot);
                }
                calls.push((group, call.into_req(), chunk.to_vec()));
                self.conn
                    .counters
                    .write_calls
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        calls
    }

    /// Appends the eight keys the write script names for a commit of `key`.
    fn push_commit_keys(&self, call: &mut ScriptCall, key: &Key) {
        let p = self.layout.partition_of(key);
        let names = self.names.part(p);
        call.arg_parts(&[&names.value_prefix, key.as_str().as_bytes()]);
        call.arg_parts(&[
            &names.meta_prefix,
            &decimal(u64::from(self.layout.bucket_of(key))),
        ]);
        call.arg(names.index.as_slice())
            .arg(names.digest.as_slice())
            .arg(names.counters.as_slice())
            .arg(names.feed.as_slice())
            .arg(names.tombstones.as_slice())
            .arg(names.floor.as_slice());
    }

    /// Appends the eighteen arguments of a commit of `key` computed from `snapshot`.
    fn push_commit_args(
        &self,
        call: &mut ScriptCall,
        key: &Key,
        commit: &Commit,
        snapshot: &Snapshot,
    ) {
        let b = self.layout.bucket_of(key);
        // The bucket fingerprint moves by the old entry (the meta seen, which the script
        // checks is still there; `plan` refused a meta it cannot read) XOR the new one.
        let toggle = snapshot.meta.map_or(0, |m| m.entry_hash) ^ commit.entry_hash;
        let flag = |b: bool| if b { b'1' } else { b'0' };
        let key_bytes = key.as_str().as_bytes();
        call.arg(key_bytes)
            .arg(snapshot.meta_raw.as_deref().unwrap_or_default())
            .arg(if snapshot.is_absent() {
                &b"-1"[..]
            } else {
                &b""[..]
            })
            .arg(snapshot.tail())
            .arg(commit.value.as_slice())
            .arg(commit.hashes.as_bytes())
            .arg(&decimal(u64::from(b))[..])
            .arg(if commit.feed.is_some() {
                &b"1"[..]
            } else {
                &b"0"[..]
            })
            .arg(self.layout.feed_entries_max())
            .arg(commit.feed.as_deref().unwrap_or_default())
            .arg(commit.actor.get())
            .arg(commit.hlc.physical_ms())
            .arg(commit.hlc.logical())
            .arg(&hex16(commit.token)[..])
            .arg(&[flag(commit.tombstone.0), flag(commit.tombstone.1)][..]);
        match &commit.floor {
            Some((actor, seen)) => call.arg(actor.get()).arg(seen.as_slice()),
            None => call.arg(&b""[..]).arg(&b""[..]),
        };
        call.arg(&hex16(toggle)[..]);
    }

    /// The keys of each partition's index in `(min, max)` (ZRANGEBYLEX bounds), merged in key
    /// order, at most `want`. Returns the keys and whether more remain.
    async fn scan_keys(
        &self,
        min: &[u8],
        max: &[u8],
        want: usize,
    ) -> Result<(Vec<String>, bool), BackendError> {
        struct Cursor {
            partition: u16,
            buffered: VecDeque<String>,
            next_min: Vec<u8>,
            done: bool,
        }
        let partitions = usize::from(self.layout.partitions());
        let mut chunk = (want / partitions)
            .saturating_mul(2)
            .saturating_add(8)
            .min(want + 1);
        let mut cursors: Vec<Cursor> = (0..self.layout.partitions())
            .map(|partition| Cursor {
                partition,
                buffered: VecDeque::new(),
                next_min: min.to_vec(),
                done: false,
            })
            .collect();
        let mut keys: Vec<String> = Vec::new();
        loop {
            // Refill every cursor that is empty but not exhausted.
            let refill: Vec<usize> = cursors
                .iter()
                .enumerate()
                .filter(|(_, c)| c.buffered.is_empty() && !c.done)
                .map(|(i, _)| i)
                .collect();
            if !refill.is_empty() {
                let reqs = refill
                    .iter()
                    .map(|&i| {
                        let c = &cursors[i];
                        let mut cmd = redis::cmd("ZRANGEBYLEX");
                        cmd.arg(self.names.index(c.partition))
                            .arg(c.next_min.as_slice())
                            .arg(max)
                            .arg("LIMIT")
                            .arg(0)
                            .arg(chunk);
                        (u32::from(c.partition), Req::Cmd(cmd))
                    })
                    .collect();
                let replies = self.run_each(reqs, false, Safety::Idempotent).await;
                for (&i, reply) in refill.iter().zip(replies) {
                    let reply = reply?;
                    if let Some(e) = server_error(&reply, "scan", false) {
                        return Err(e);
                    }
                    let Value::Array(members) = &reply else {
                        return Err(unexpected("scan", &reply));
                    };
                    let c = &mut cursors[i];
                    c.done = members.len() < chunk;
                    for m in members {
                        let text = bytes_of(m)
                            .and_then(|b| std::str::from_utf8(b).ok())
                            .ok_or_else(|| unexpected("scan", m))?;
                        c.buffered.push_back(text.to_string());
                    }
                    if let Some(last) = c.buffered.back() {
                        c.next_min = [b"(", last.as_bytes()].concat();
                    }
                }
                chunk = chunk.saturating_mul(2).min(want + 1);
            }
            // Merge while every cursor that may hold more has a buffered key.
            loop {
                if keys.len() > want {
                    keys.truncate(want);
                    return Ok((keys, true));
                }
                if cursors.iter().any(|c| c.buffered.is_empty() && !c.done) {
                    break;
                }
                let smallest = cursors
                    .iter_mut()
                    .filter(|c| !c.buffered.is_empty())
                    .min_by(|a, b| a.buffered.front().cmp(&b.buffered.front()));
                match smallest.and_then(|c| c.buffered.pop_front()) {
                    Some(key) => keys.push(key),
                    None => return Ok((keys, false)),
                }
            }
        }
    }
}

/// Parses a write script's reply: one outcome per item, `n` items.
fn parse_commits(
    value: &Value,
    n: usize,
) -> Result<Vec<Result<Committed, BackendError>>, BackendError> {
    if let Some(e) = server_error(value, "write", true) {
        return Err(e);
    }
    match value {
        Value::Array(items) if items.len() == n => Ok(items.iter().map(parse_commit).collect()),
        _ => Err(unexpected("write", value)),
    }
}

fn parse_commit(value: &Value) -> Result<Committed, BackendError> {
    let Value::Array(parts) = value else {
        return Err(unexpected("write", value));
    };
    match parts.as_slice() {
        [status, message] if bytes_of(status) == Some(b"err") => {
            Err(BackendError::Unavailable(format!(
                "redis write failed: {}; the operation may or may not have taken effect",
                String::from_utf8_lossy(bytes_of(message).unwrap_or_default())
            )))
        }
        [status, version, seq] if bytes_of(status) == Some(b"ok") => {
            match (int_of(version), int_of(seq)) {
                (Some(version), Some(seq)) => Ok(Committed::Written { version, seq }),
                _ => Err(unexpected("write", value)),
            }
        }
        [status] if bytes_of(status) == Some(b"race") => Ok(Committed::Race),
        _ => Err(unexpected("write", value)),
    }
}

/// The smallest byte string greater than every string starting with `prefix` (`None`: no such
/// bound, every string from `prefix` on qualifies).
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut bound = prefix.to_vec();
    while let Some(last) = bound.pop() {
        if last < u8::MAX {
            bound.push(last + 1);
            return Some(bound);
        }
    }
    None
}

/// Parses one stream entry of a feed: the entry, or its sequence number when the entry is
/// damaged (its fields do not make an entry of `partition`). An entry whose id cannot be read
/// is an error: without its sequence number the page cannot say what was skipped.
fn parse_feed_entry(
    layout: &Layout,
    partition: u16,
    entry: &Value,
) -> Result<Result<FeedEntry, u64>, BackendError> {
    let bad = || unexpected("read_feed", entry);
    let Value::Array(parts) = entry else {
        return Err(bad());
    };
    let [id, fields] = parts.as_slice() else {
        return Err(bad());
    };
    let seq = bytes_of(id).and_then(stream_seq).ok_or_else(bad)?;
    Ok(parse_feed_fields(layout, partition, seq, fields, entry).map_err(|_| seq))
}

fn parse_feed_fields(
    layout: &Layout,
    partition: u16,
    seq: u64,
    fields: &Value,
    entry: &Value,
) -> Result<FeedEntry, BackendError> {
    let bad = || unexpected("read_feed", entry);
    let fields = pairs(fields).ok_or_else(bad)?;
    let field = |name: &[u8]| {
        fields
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .ok_or_else(bad)
    };
    let number = |name: &[u8]| -> Result<u64, BackendError> {
        std::str::from_utf8(field(name)?)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)
    };
    let key_text = std::str::from_utf8(field(b"k")?).map_err(|_| bad())?;
    let key = Key::new(key_text)?;
    if layout.partition_of(&key) != partition {
        return Err(bad());
    }
    let delta = envelope::decode(field(b"d")?, &envelope::Limits::default()).map_err(|source| {
        BackendError::Corrupt {
            key: key.to_string(),
            source,
        }
    })?;
    let logical = u32::try_from(number(b"l")?).map_err(|_| bad())?;
    Ok(FeedEntry {
        seq,
        key,
        delta,
        origin: ActorId::new(number(b"a")?),
        hlc: Hlc::new(number(b"p")?, logical),
    })
}

impl StateBackend for RedisBackend {
    fn layout(&self) -> &Layout {
        &self.store.layout
    }

    async fn get(&self, key: &Key) -> Result<Option<Stored>, BackendError> {
        self.store
            .get_values(&[key])
            .await
            .pop()
            .unwrap_or(Ok(None))
    }

    async fn get_many(
        &self,
        keys: &[Key],
    ) -> Result<Vec<Result<Option<Stored>, BackendError>>, BackendError> {
        let keys: Vec<&Key> = keys.iter().collect();
        Ok(self.store.get_values(&keys).await)
    }

    async fn apply(&self, write: LocalWrite) -> Result<Receipt, BackendError> {
        group::write(&self.store, Item::Apply(write)).await
    }

    async fn apply_many(
        &self,
        writes: Vec<LocalWrite>,
    ) -> Result<Vec<Result<Receipt, BackendError>>, BackendError> {
        Ok(self
            .store
            .execute(writes.into_iter().map(Item::Apply).collect())
            .await)
    }

    async fn merge(&self, key: &Key, delta: &Crdt) -> Result<Receipt, BackendError> {
        group::write(&self.store, Item::Merge(key.clone(), delta.clone())).await
    }

    async fn merge_many(
        &self,
        items: &[(Key, Crdt)],
    ) -> Result<Vec<Result<Receipt, BackendError>>, BackendError> {
        Ok(self
            .store
            .execute(
                items
                    .iter()
                    .map(|(k, d)| Item::Merge(k.clone(), d.clone()))
                    .collect(),
            )
            .await)
    }

    async fn delete(&self, key: &Key) -> Result<bool, BackendError> {
        self.delete_many(std::slice::from_ref(key))
            .await?
            .pop()
            .ok_or_else(|| BackendError::Unavailable("internal: no outcome".into()))
    }

    async fn delete_many(&self, keys: &[Key]) -> Result<Vec<bool>, BackendError> {
        self.store.remove_keys(keys, Removal::Delete).await
    }

    async fn tombstones(
        &self,
        partition: u16,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<TombstonePage, BackendError> {
        let limit = page_limit(limit)?;
        self.store.layout.check_partition(partition)?;
        let mut min = match after {
            Some(a) => [b"(", a.as_str().as_bytes()].concat(),
            None => b"-".to_vec(),
        };
        // One more than the page, to know whether another page follows.
        let chunk = limit + 1;
        let mut items: Vec<Tombstone> = Vec::new();
        loop {
            let mut cmd = redis::cmd("ZRANGEBYLEX");
            cmd.arg(self.store.names.tombstones(partition))
                .arg(min.as_slice())
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(chunk);
            let reply = self
                .store
                .run_one(
                    u32::from(partition),
                    Req::Cmd(cmd),
                    false,
                    Safety::Idempotent,
                )
                .await?;
            let Value::Array(members) = &reply else {
                return Err(unexpected("tombstones", &reply));
            };
            let keys = members
                .iter()
                .map(|m| {
                    bytes_of(m)
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .and_then(|text| Key::new(text).ok())
                        .ok_or_else(|| unexpected("tombstones", m))
                })
                .collect::<Result<Vec<Key>, BackendError>>()?;
            let refs: Vec<&Key> = keys.iter().collect();
            // The index is only a hint: each key is read back, and listed only if it holds a
            // tombstone now (a write may have revived it since the index was read).
            let snapshots = self.store.snapshots(&refs).await;
            for (key, snapshot) in keys.iter().zip(snapshots) {
                let snapshot = snapshot?;
                let Ok(Some((value, version))) = snapshot.value(key) else {
                    continue;
                };
                if !value.is_bottom() {
                    continue;
                }
                let hash = match snapshot.meta {
                    Some(meta) => meta.value_hash,
                    None => value_hash(&value)?,
                };
                items.push(Tombstone {
                    key: key.clone(),
                    version,
                    hash,
                });
            }
            if items.len() > limit {
                items.truncate(limit);
                let next = items.last().map(|t| t.key.clone());
                return Ok(TombstonePage { items, next });
            }
            match keys.last() {
                Some(last) if keys.len() == chunk => {
                    min = [b"(", last.as_str().as_bytes()].concat();
                }
                _ => return Ok(TombstonePage { items, next: None }),
            }
        }
    }

    async fn purge(&self, key: &Key, version: u64) -> Result<bool, BackendError> {
        let removed = self
            .store
            .remove_keys(std::slice::from_ref(key), Removal::Purge(version))
            .await?;
        Ok(removed.first().copied().unwrap_or(false))
    }

    async fn dot_floor(&self, partition: u16) -> Result<VersionVector, BackendError> {
        self.store.layout.check_partition(partition)?;
        let reply = self
            .store
            .hash_of_partition(partition, self.store.names.floor(partition))
            .await?;
        let mut floor = VersionVector::new();
        for (actor, counter) in pairs(&reply).ok_or_else(|| unexpected("dot_floor", &reply))? {
            match (parse_decimal(actor), parse_decimal(counter)) {
                (Some(actor), Some(counter)) => floor.observe(ActorId::new(actor), counter),
                _ => return Err(unexpected("dot_floor", &reply)),
            }
        }
        Ok(floor)
    }

    async fn scan(
        &self,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<ScanPage, BackendError> {
        let limit = page_limit(limit)?;
        let max = match prefix_successor(prefix.as_bytes()) {
            Some(bound) => [b"(".as_slice(), &bound].concat(),
            None => b"+".to_vec(),
        };
        let mut min = match after {
            Some(a) if a.as_str() >= prefix => [b"(", a.as_str().as_bytes()].concat(),
            _ => [b"[", prefix.as_bytes()].concat(),
        };
        loop {
            let (names, more) = self.store.scan_keys(&min, &max, limit).await?;
            let keys = names
                .iter()
                .map(|n| Key::new(n.as_str()))
                .collect::<Result<Vec<Key>, BackendError>>()?;
            let refs: Vec<&Key> = keys.iter().collect();
            let values = self.store.get_values(&refs).await;
            let next = if more { keys.last().cloned() } else { None };
            let items: Vec<ScanItem> = keys
                .into_iter()
                .zip(values)
                .filter_map(|(key, value)| match value {
                    // Deleted since the index was read: no longer part of the scan.
                    Ok(None) => None,
                    Ok(Some(stored)) => Some(ScanItem {
                        key,
                        value: Ok(stored),
                    }),
                    Err(e) => Some(ScanItem { key, value: Err(e) }),
                })
                .collect();
            // A page whose keys all vanished must not end the scan early, nor be empty with a
            // `next`: go on from where it stopped.
            match (&next, items.is_empty()) {
                (Some(n), true) => min = [b"(", n.as_str().as_bytes()].concat(),
                _ => return Ok(ScanPage { items, next }),
            }
        }
    }

    async fn read_feed(
        &self,
        partition: u16,
        after: u64,
        limit: usize,
    ) -> Result<FeedPage, BackendError> {
        let limit = page_limit(limit)?;
        self.store.layout.check_partition(partition)?;
        let start = after
            .checked_add(1)
            .map(|s| format!("{s}-0").into_bytes())
            .unwrap_or_default();
        let req = Req::script(
            &self.store.scripts.read_feed,
            vec![
                self.store.names.counters(partition),
                self.store.names.feed(partition),
            ],
            vec![
                start,
                limit.to_string().into_bytes(),
                self.store
                    .layout
                    .feed_entries_max()
                    .to_string()
                    .into_bytes(),
            ],
        );
        let reply = self
            .store
            .run_one(u32::from(partition), req, false, Safety::Idempotent)
            .await?;
        let Value::Array(parts) = &reply else {
            return Err(unexpected("read_feed", &reply));
        };
        let [last, first, entries] = parts.as_slice() else {
            return Err(unexpected("read_feed", &reply));
        };
        let last_seq = int_of(last).ok_or_else(|| unexpected("read_feed", &reply))?;
        let first_seq = match first {
            Value::Nil => last_seq.saturating_add(1),
            id => bytes_of(id)
                .and_then(stream_seq)
                .ok_or_else(|| unexpected("read_feed", &reply))?,
        };
        let mut damaged = Vec::new();
        let entries = match entries {
            Value::Array(items) => {
                let mut entries = Vec::with_capacity(items.len());
                for item in items {
                    match parse_feed_entry(&self.store.layout, partition, item)? {
                        Ok(entry) => entries.push(entry),
                        Err(seq) => damaged.push(seq),
                    }
                }
                entries
            }
            Value::Nil => Vec::new(),
            other => return Err(unexpected("read_feed", other)),
        };
        Ok(FeedPage {
            entries,
            first_seq,
            last_seq,
            damaged,
        })
    }

    async fn trim_feed(&self, partition: u16, through: u64) -> Result<usize, BackendError> {
        self.store.layout.check_partition(partition)?;
        let mut cmd = redis::cmd("XTRIM");
        cmd.arg(self.store.names.feed(partition));
        match through.checked_add(1) {
            Some(threshold) => cmd.arg("MINID").arg(format!("{threshold}-0")),
            None => cmd.arg("MAXLEN").arg(0),
        };
        let reply = self
            .store
            .run_one(
                u32::from(partition),
                Req::Cmd(cmd),
                true,
                Safety::Idempotent,
            )
            .await?;
        int_of(&reply)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| unexpected("trim_feed", &reply))
    }

    async fn digest(&self, partition: u16) -> Result<PartitionDigest, BackendError> {
        self.store.layout.check_partition(partition)?;
        let reply = self
            .store
            .hash_of_partition(partition, self.store.names.digest(partition))
            .await?;
        let mut buckets = vec![0u64; usize::from(self.store.layout.buckets())];
        for (bucket, fingerprint) in pairs(&reply).ok_or_else(|| unexpected("digest", &reply))? {
            let parsed = std::str::from_utf8(bucket)
                .ok()
                .and_then(|b| b.parse::<usize>().ok())
                .zip(
                    std::str::from_utf8(fingerprint)
                        .ok()
                        .and_then(|f| u64::from_str_radix(f, 16).ok()),
                );
            match parsed {
                Some((b, fp)) if b < buckets.len() => buckets[b] = fp,
                _ => return Err(unexpected("digest", &reply)),
            }
        }
        Ok(PartitionDigest::new(buckets))
    }

    async fn bucket_entries(
        &self,
        partition: u16,
        bucket: u16,
    ) -> Result<Vec<(Key, u64)>, BackendError> {
        if bucket >= self.store.layout.buckets() {
            return Err(BackendError::InvalidArgument(format!(
                "bucket {bucket} out of range 0..{}",
                self.store.layout.buckets()
            )));
        }
        self.store.layout.check_partition(partition)?;
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.store.names.meta(partition, bucket));
        let reply = self
            .store
            .run_one(
                u32::from(partition),
                Req::Cmd(cmd),
                false,
                Safety::Idempotent,
            )
            .await?;
        let mut entries = pairs(&reply)
            .ok_or_else(|| unexpected("bucket_entries", &reply))?
            .into_iter()
            .map(|(key, meta)| {
                let key =
                    std::str::from_utf8(key).map_err(|_| unexpected("bucket_entries", &reply))?;
                let meta = parse_meta(meta).ok_or_else(|| unexpected("bucket_entries", &reply))?;
                Ok((Key::new(key)?, meta.value_hash))
            })
            .collect::<Result<Vec<(Key, u64)>, BackendError>>()?;
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(entries)
    }

    async fn cursor(&self, origin: &str, partition: u16) -> Result<u64, BackendError> {
        check_origin(origin)?;
        self.store.layout.check_partition(partition)?;
        let mut cmd = redis::cmd("HGET");
        cmd.arg(self.store.names.cursors(partition)).arg(origin);
        let reply = self
            .store
            .run_one(
                u32::from(partition),
                Req::Cmd(cmd),
                false,
                Safety::Idempotent,
            )
            .await?;
        match reply {
            Value::Nil => Ok(0),
            other => int_of(&other).ok_or_else(|| unexpected("cursor", &other)),
        }
    }

    async fn advance_cursor(
        &self,
        origin: &str,
        partition: u16,
        seq: u64,
    ) -> Result<u64, BackendError> {
        check_origin(origin)?;
        self.store.layout.check_partition(partition)?;
        let req = Req::script(
            &self.store.scripts.advance_cursor,
            vec![self.store.names.cursors(partition)],
            vec![origin.as_bytes().to_vec(), seq.to_string().into_bytes()],
        );
        let reply = self
            .store
            .run_one(u32::from(partition), req, true, Safety::Idempotent)
            .await?;
        int_of(&reply).ok_or_else(|| unexpected("advance_cursor", &reply))
    }

    async fn append_conflict(&self, record: Vec<u8>) -> Result<u64, BackendError> {
        let req = Req::script(
            &self.store.scripts.append_conflict,
            vec![
                self.store.names.conflict_counter(),
                self.store.names.conflict_feed(),
            ],
            vec![record, CONFLICTS_MAX.to_string().into_bytes()],
        );
        let reply = self
            .store
            .run_one(GLOBAL_GROUP, req, true, Safety::Once)
            .await?;
        int_of(&reply).ok_or_else(|| unexpected("append_conflict", &reply))
    }

    async fn read_conflicts(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, BackendError> {
        let limit = page_limit(limit)?;
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.store.names.conflict_feed())
            .arg(format!("{start}-0"))
            .arg("+")
            .arg("COUNT")
            .arg(limit);
        let reply = self
            .store
            .run_one(GLOBAL_GROUP, Req::Cmd(cmd), false, Safety::Idempotent)
            .await?;
        let Value::Array(entries) = &reply else {
            return Err(unexpected("read_conflicts", &reply));
        };
        entries
            .iter()
            .map(|entry| {
                let bad = || unexpected("read_conflicts", entry);
                let Value::Array(parts) = entry else {
                    return Err(bad());
                };
                let [id, fields] = parts.as_slice() else {
                    return Err(bad());
                };
                let seq = bytes_of(id).and_then(stream_seq).ok_or_else(bad)?;
                let fields = pairs(fields).ok_or_else(bad)?;
                let record = fields
                    .iter()
                    .find(|(k, _)| *k == b"r")
                    .map(|(_, v)| v.to_vec())
                    .ok_or_else(bad)?;
                Ok((seq, record))
            })
            .collect()
    }
}

#[cfg(feature = "testing")]
impl crate::RawAccess for RedisBackend {
    async fn raw_put(&self, key: &Key, bytes: Vec<u8>) -> Result<(), BackendError> {
        self.store.cache.remove(key.as_str());
        let p = self.store.layout.partition_of(key);
        let b = self.store.layout.bucket_of(key);
        let (hash, tombstone) = match envelope::decode(&bytes, &envelope::Limits::default()) {
            Ok(value) => (value_hash(&value)?, value.is_bottom()),
            Err(_) => (crate::digest::raw_hash(&bytes), false),
        };
        let req = Req::script(
            &self.store.scripts.raw_put,
            vec![
                self.store.names.value(p, key),
                self.store.names.meta(p, b),
                self.store.names.index(p),
                self.store.names.digest(p),
                self.store.names.counters(p),
                self.store.names.tombstones(p),
            ],
            vec![
                key.as_str().as_bytes().to_vec(),
                bytes,
                hashes_hex(key, hash).into_bytes(),
                b.to_string().into_bytes(),
                if tombstone { b"1" } else { b"0" }.to_vec(),
            ],
        );
        self.store
            .run_one(u32::from(p), req, true, Safety::Idempotent)
            .await
            .map(|_| ())
    }

    async fn raw_append_feed(&self, key: &Key, delta: Vec<u8>) -> Result<u64, BackendError> {
        let p = self.store.layout.partition_of(key);
        let req = Req::script(
            &self.store.scripts.raw_append_feed,
            vec![self.store.names.counters(p), self.store.names.feed(p)],
            vec![key.as_str().as_bytes().to_vec(), delta],
        );
        let reply = self
            .store
            .run_one(u32::from(p), req, true, Safety::Once)
            .await?;
        int_of(&reply).ok_or_else(|| unexpected("raw_append_feed", &reply))
    }

    async fn raw_get(&self, key: &Key) -> Result<Option<Vec<u8>>, BackendError> {
        let snapshot = self
            .store
            .snapshots(&[key])
            .await
            .pop()
            .unwrap_or(Ok(Snapshot {
                content: Content::Absent,
                meta_raw: None,
                meta: None,
                floor: None,
            }))?;
        Ok(match snapshot.content {
            Content::Bytes(bytes) => Some(bytes),
            // A read never comes from the write cache.
            Content::Absent | Content::Foreign | Content::Cached(_) => None,
        })
    }
}
