//! The store-facing half of replication, shared by the async driver and the simulator:
//! [`Server`] answers a peer's [`Request`] from the local store, and [`execute`] carries out a
//! core's [`LocalOp`] on it.
//!
//! ## Poll sessions
//! A puller keeps several long polls ([`Request::Heads`]) out to a peer at once, so that one
//! is always waiting there when a write arrives. Polls sent before an answer came back carry
//! no news about it, so the peer must remember what it already sent, or every waiting poll
//! would ship the same entries again. It does so per *poll session*: the puller opens one
//! with its cursors (the peer mints the session id and answers at once), then polls within it
//! carrying only the id. The session records, per partition, how far the peer has sent the
//! feed; each answer takes the entries after that and raises it. A session is soft state:
//! lost (a restart) or forgotten (the table is bounded, least recently used first), it only
//! makes the puller open a new one. Polls are numbered so that a poll delivered twice is
//! answered once ([`Response::Duplicate`] for the copy).
//!
//! An answer can be lost after the session recorded it as sent. The puller notices (the
//! poll times out, or a later page starts past what it received) and opens a new session at
//! the cursors it holds, so nothing is skipped; see [`crate::core`].
//!
//! ## Reconciliation snapshots
//! Anti-entropy reconciles a range of partitions by coded symbols ([`crate::iblt`]) asked
//! for in batches ([`Request::Reconcile`], then [`Request::Symbols`]), then fetches states by
//! item id ([`Request::Fetch`]). Every batch must describe the same set, or the puller's
//! decoding fails, while writes keep changing the store. So the first batch takes a
//! *snapshot* of the range's items (id and key, sorted by id) and the later requests name it
//! by its summary (the XOR of its ids, which is also symbol 0's id sum). Snapshots are soft
//! state like sessions: a bounded table ([`ServeLimits::snapshots_max`] snapshots of at most
//! [`ServeLimits::snapshot_items_max`] items in all), least recently used forgotten first,
//! shared by every puller. A request for a snapshot that is gone is served from a fresh
//! listing if the range has not changed since (same summary), and answered
//! [`Response::Changed`] otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use geostate_backends::digest::value_hash;
use geostate_backends::{BackendError, Key, StateBackend};
use geostate_crdt::envelope::{self, Limits, Options};
use geostate_crdt::Crdt;

use crate::core::{LocalOp, LocalResult};
use crate::iblt::{self, item_id};
use crate::wire::{Page, Request, Response, WireEntry};

/// Bounds on what one request may ask of the serving store, and on what it remembers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    /// Most feed entries per answer.
    pub feed_entries_max: u32,
    /// Most buckets per bucket request.
    pub buckets_max: usize,
    /// Most keys per states request or push.
    pub keys_max: usize,
    /// Most poll sessions remembered (the least recently used is forgotten first).
    pub sessions_max: usize,
    /// Most coded symbols per reconciliation request (a puller asks for at most its
    /// `CoreConfig::ae_symbols_per_round_max` in all).
    pub symbols_max: u32,
    /// Most partitions per reconciliation request: each differing one is listed, one
    /// `bucket_entries` call per bucket. Pullers size their ranges by keys
    /// (`CoreConfig::ae_items_per_round`), up to every partition; a lower limit here makes
    /// their wider rounds fail.
    pub reconcile_partitions_max: u16,
    /// Most reconciliation snapshots remembered (the least recently used is forgotten first).
    pub snapshots_max: usize,
    /// Most items in all remembered snapshots together; a larger listing is used for its
    /// request and not remembered.
    pub snapshot_items_max: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            feed_entries_max: 4_096,
            buckets_max: 4_096,
            keys_max: 4_096,
            sessions_max: 256,
            symbols_max: 16_384,
            reconcile_partitions_max: geostate_backends::Layout::PARTITIONS_MAX,
            snapshots_max: 64,
            snapshot_items_max: 1 << 21,
        }
    }
}

/// Poll numbers remembered per session to recognise duplicates; anything older counts as seen.
const POLLS_SEEN_MAX: usize = 64;

/// How many times an answer is recomputed when concurrent answers of the same session keep
/// moving it; after that the poll is answered with nothing (it is held, or asked again).
const ANSWER_ATTEMPTS_MAX: usize = 8;

/// What the peer remembers of one poll session.
#[derive(Debug)]
struct Session {
    /// Per partition: the feed up to here was sent, or the puller held it when opening.
    sent: Vec<u64>,
    /// Bumped whenever `sent` moves, so that an answer computed from an older `sent` (by a
    /// concurrent poll of the same session) is computed again instead of repeating entries.
    version: u64,
    /// Poll numbers seen, above `polls_floor`.
    polls_seen: BTreeSet<u64>,
    polls_floor: u64,
    /// For least-recently-used eviction.
    touched: u64,
}

impl Session {
    /// Records poll number `poll`; false if it was seen before (or is too old to tell).
    fn first_sight(&mut self, poll: u64) -> bool {
        if poll <= self.polls_floor || !self.polls_seen.insert(poll) {
            return false;
        }
        while self.polls_seen.len() > POLLS_SEEN_MAX {
            if let Some(oldest) = self.polls_seen.pop_first() {
                self.polls_floor = oldest;
            }
        }
        true
    }
}

/// The items of a range of partitions at one moment: `(id, key)` sorted by id.
#[derive(Debug)]
struct Snapshot {
    first: u16,
    partitions: u16,
    /// XOR of the ids.
    summary: u64,
    items: Arc<Vec<(u64, String)>>,
    touched: u64,
}

#[derive(Debug, Default)]
struct Snapshots {
    touches: u64,
    items: usize,
    table: Vec<Snapshot>,
}

impl Snapshots {
    fn get(
        &mut self,
        first: u16,
        partitions: u16,
        summary: u64,
    ) -> Option<Arc<Vec<(u64, String)>>> {
        self.touches += 1;
        let touched = self.touches;
        let s = self
            .table
            .iter_mut()
            .find(|s| s.first == first && s.partitions == partitions && s.summary == summary)?;
        s.touched = touched;
        Some(Arc::clone(&s.items))
    }

    fn put(&mut self, snapshot: Snapshot, limits: &ServeLimits) {
        if snapshot.items.len() > limits.snapshot_items_max || limits.snapshots_max == 0 {
            return;
        }
        if self
            .get(snapshot.first, snapshot.partitions, snapshot.summary)
            .is_some()
        {
            return;
        }
        self.items += snapshot.items.len();
        self.table.push(Snapshot {
            touched: self.touches,
            ..snapshot
        });
        while self.table.len() > limits.snapshots_max || self.items > limits.snapshot_items_max {
            let Some(oldest) = self
                .table
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.touched)
                .map(|(i, _)| i)
            else {
                break;
            };
            let gone = self.table.swap_remove(oldest);
            self.items -= gone.items.len();
        }
    }
}

#[derive(Debug)]
struct Sessions {
    next_id: u64,
    touches: u64,
    table: BTreeMap<u64, Session>,
}

/// The serving half of one region: answers its peers' requests from its store and keeps
/// their poll sessions (see the [module docs](self)). Cheap to share: `&self` methods, one
/// short lock around the session table (never held across a store call).
///
/// ```
/// use std::sync::Arc;
/// use geostate_backends::{Layout, MemoryBackend};
/// use geostate_replication::serve::{Server, ServeLimits};
/// use geostate_replication::wire::{Request, Response};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = Arc::new(MemoryBackend::new(Layout::new(2, 2, 1 << 20, 100).unwrap()));
/// let server = Server::new(store, ServeLimits::default(), 1);
/// // Opening a session at cursors (0, 0): answered at once, with the new session's id.
/// let open = Request::Heads { session: 0, after: vec![0, 0], poll: 0, limit: 10, wait_ms: 0 };
/// let Response::Opened { session, pages } = server.serve(&open).await else { panic!() };
/// assert!(pages.is_empty());
/// // A poll in the session, with nothing new: a runtime may hold it and ask again later.
/// let poll = Request::Heads { session, after: vec![], poll: 1, limit: 10, wait_ms: 500 };
/// assert!(server.serve(&poll).await.is_empty_poll());
/// assert!(server.serve_held(&poll).await.is_empty_poll());
/// // The same poll delivered twice.
/// assert_eq!(server.serve(&poll).await, Response::Duplicate);
/// # });
/// ```
#[derive(Debug)]
pub struct Server<B> {
    backend: Arc<B>,
    limits: ServeLimits,
    sessions: Mutex<Sessions>,
    snapshots: Mutex<Snapshots>,
}

fn failed(e: impl std::fmt::Display) -> Response {
    Response::Failed {
        reason: e.to_string(),
    }
}

fn encode(value: &Crdt) -> Result<Vec<u8>, BackendError> {
    envelope::encode(value, &Options::default()).map_err(BackendError::Crdt)
}

/// A store's feed page as wire entries in sequence order, damaged entries as their markers
/// ([`WireEntry::damaged`]), so the page stays contiguous and the puller is never stuck.
fn wire_entries(page: geostate_backends::FeedPage) -> Result<Vec<WireEntry>, BackendError> {
    let mut out = Vec::with_capacity(page.entries.len() + page.damaged.len());
    let mut damaged = page.damaged.into_iter().peekable();
    for e in page.entries {
        while let Some(seq) = damaged.next_if(|&seq| seq < e.seq) {
            out.push(WireEntry::damaged(seq));
        }
        out.push(WireEntry {
            seq: e.seq,
            delta: encode(&e.delta)?,
            key: e.key.as_str().to_string(),
            origin: e.origin,
            hlc: e.hlc,
        });
    }
    out.extend(damaged.map(WireEntry::damaged));
    Ok(out)
}

impl<B: StateBackend> Server<B> {
    /// A server answering from `backend`. Session ids are minted from `first_session` on
    /// (0 is skipped); a runtime that restarts its server should start elsewhere (from the
    /// time, say), so that a puller still polling a session of the previous incarnation is
    /// told it is unknown rather than served another puller's session. (Even then nothing is
    /// lost: the puller notices pages that do not follow what it holds and opens a session.)
    pub fn new(backend: Arc<B>, limits: ServeLimits, first_session: u64) -> Self {
        Self {
            backend,
            limits,
            sessions: Mutex::new(Sessions {
                next_id: first_session,
                touches: 0,
                table: BTreeMap::new(),
            }),
            snapshots: Mutex::new(Snapshots::default()),
        }
    }

    /// The store answered from.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// How many poll sessions are remembered.
    pub fn sessions(&self) -> usize {
        self.lock().table.len()
    }

    /// How many reconciliation snapshots are remembered.
    pub fn snapshots(&self) -> usize {
        self.lock_snapshots().table.len()
    }

    fn lock_snapshots(&self) -> MutexGuard<'_, Snapshots> {
        // Every step leaves the table consistent, as for sessions.
        self.snapshots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Checks a partition range of a reconciliation request; `Some(answer)` if it is refused.
    fn check_scope(&self, first: u16, partitions: u16) -> Option<Response> {
        let total = self.backend.layout().partitions();
        if partitions == 0
            || partitions > self.limits.reconcile_partitions_max
            || u32::from(first) + u32::from(partitions) > u32::from(total)
        {
            return Some(failed(format!(
                "partitions {first}..+{partitions} out of range (0..{total}, at most {} at once)",
                self.limits.reconcile_partitions_max
            )));
        }
        None
    }

    /// The snapshot of `[first, first + partitions)` whose summary is `summary`: remembered,
    /// or listed now if the partitions still hold it. `None` if they changed since.
    async fn snapshot(
        &self,
        first: u16,
        partitions: u16,
        summary: u64,
    ) -> Result<Option<Arc<Vec<(u64, String)>>>, BackendError> {
        let remembered = self.lock_snapshots().get(first, partitions, summary);
        if let Some(items) = remembered {
            return Ok(Some(items));
        }
        let (items, listed) = self.take_snapshot(first, partitions).await?;
        Ok((listed == summary).then_some(items))
    }

    /// Lists `[first, first + partitions)` now and remembers the listing; returns it and its
    /// summary.
    async fn take_snapshot(
        &self,
        first: u16,
        partitions: u16,
    ) -> Result<(Arc<Vec<(u64, String)>>, u64), BackendError> {
        let mut items = list_items(self.backend.as_ref(), first, partitions).await?;
        items.sort_unstable();
        let summary = items.iter().fold(0, |acc, (id, _)| acc ^ id);
        let items = Arc::new(items);
        self.lock_snapshots().put(
            Snapshot {
                first,
                partitions,
                summary,
                items: Arc::clone(&items),
                touched: 0,
            },
            &self.limits,
        );
        Ok((items, summary))
    }

    fn lock(&self) -> MutexGuard<'_, Sessions> {
        // The table stays consistent at every step, so a panic elsewhere leaves it usable.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Answers a request as it arrives. Store failures become [`Response::Failed`]; the peer
    /// retries later. A poll answered with nothing new ([`Response::is_empty_poll`]) may be
    /// held and asked again with [`Server::serve_held`].
    pub async fn serve(&self, request: &Request) -> Response {
        match self.serve_inner(request, true).await {
            Ok(r) => r,
            Err(e) => failed(e),
        }
    }

    /// Answers again a poll that [`Server::serve`] answered with nothing new and the runtime
    /// held (on a local write, or when its wait is over). The same as `serve` except that the
    /// poll is not taken for a duplicate of itself.
    pub async fn serve_held(&self, request: &Request) -> Response {
        match self.serve_inner(request, false).await {
            Ok(r) => r,
            Err(e) => failed(e),
        }
    }

    async fn serve_inner(&self, request: &Request, first: bool) -> Result<Response, BackendError> {
        let backend = self.backend.as_ref();
        let limits = &self.limits;
        Ok(match request {
            Request::Heads {
                session,
                after,
                poll,
                limit,
                ..
            } => self.heads(*session, after, *poll, *limit, first).await?,
            Request::Feed {
                partition,
                after,
                limit,
            } => {
                let limit = (*limit).clamp(1, limits.feed_entries_max);
                let page = backend
                    .read_feed(*partition, *after, limit as usize)
                    .await?;
                let (first_seq, last_seq) = (page.first_seq, page.last_seq);
                Response::Feed {
                    entries: wire_entries(page)?,
                    first_seq,
                    last_seq,
                }
            }
            Request::Reconcile {
                first,
                partitions,
                summary,
                symbols,
            } => {
                if let Some(refused) = self.check_scope(*first, *partitions) {
                    return Ok(refused);
                }
                if *symbols == 0 || *symbols > limits.symbols_max {
                    return Ok(failed("symbols asked out of range"));
                }
                let ours = summary_of(backend, *first, *partitions).await?;
                if ours == *summary {
                    return Ok(Response::Reconciled);
                }
                let remembered = self.lock_snapshots().get(*first, *partitions, ours);
                let items = match remembered {
                    Some(items) => items,
                    None => self.take_snapshot(*first, *partitions).await?.0,
                };
                Response::Symbols {
                    symbols: iblt::encode(items.iter().map(|(id, _)| *id), 0, *symbols as usize),
                }
            }
            Request::Symbols {
                first,
                partitions,
                snapshot,
                from,
                count,
            } => {
                if let Some(refused) = self.check_scope(*first, *partitions) {
                    return Ok(refused);
                }
                if *count == 0 || *count > limits.symbols_max {
                    return Ok(failed("symbols asked out of range"));
                }
                match self.snapshot(*first, *partitions, *snapshot).await? {
                    Some(items) => Response::Symbols {
                        symbols: iblt::encode(
                            items.iter().map(|(id, _)| *id),
                            u64::from(*from),
                            *count as usize,
                        ),
                    },
                    None => Response::Changed,
                }
            }
            Request::Fetch {
                first,
                partitions,
                snapshot,
                ids,
            } => {
                if let Some(refused) = self.check_scope(*first, *partitions) {
                    return Ok(refused);
                }
                if ids.len() > limits.keys_max {
                    return Ok(failed("too many ids in one request"));
                }
                let remembered = self.lock_snapshots().get(*first, *partitions, *snapshot);
                let items = match remembered {
                    Some(items) => items,
                    // Gone: the ids of keys not written since are still in a new listing.
                    None => self.take_snapshot(*first, *partitions).await?.0,
                };
                let mut keys: Vec<String> = ids
                    .iter()
                    .filter_map(|id| {
                        let at = items.partition_point(|(i, _)| i < id);
                        items
                            .get(at)
                            .filter(|(i, _)| i == id)
                            .map(|(_, key)| key.clone())
                    })
                    .collect();
                keys.sort_unstable();
                keys.dedup();
                Response::States {
                    states: states(backend, keys).await?,
                }
            }
            Request::Digest { partition } => Response::Digest {
                buckets: backend.digest(*partition).await?.buckets().to_vec(),
            },
            Request::Buckets { partition, buckets } => {
                if buckets.len() > limits.buckets_max {
                    return Ok(failed("too many buckets in one request"));
                }
                Response::Buckets {
                    entries: bucket_entries(backend, *partition, buckets.clone()).await?,
                }
            }
            Request::States { keys } => {
                if keys.len() > limits.keys_max {
                    return Ok(failed("too many keys in one request"));
                }
                Response::States {
                    states: states(backend, keys.clone()).await?,
                }
            }
            Request::Push { states } => {
                if states.len() > limits.keys_max {
                    return Ok(failed("too many states in one push"));
                }
                merge_states(backend, states.clone()).await?;
                Response::Pushed
            }
            Request::Stability {
                partition,
                keys,
                origins,
            } => {
                if keys.len() > limits.keys_max || origins.len() > limits.keys_max {
                    return Ok(failed("too many keys or origins in one request"));
                }
                let parsed: Vec<Key> = keys.iter().map(Key::new).collect::<Result<_, _>>()?;
                let mut hashes = Vec::with_capacity(parsed.len());
                for value in backend.get_many(&parsed).await? {
                    hashes.push(match value {
                        Ok(Some(stored)) => Some(value_hash(&stored.value)?),
                        Ok(None) | Err(_) => None,
                    });
                }
                // Read after the hashes: a peer that held the tombstone had minted every dot
                // of its own in it before this head.
                let head = backend.read_feed(*partition, u64::MAX, 1).await?.last_seq;
                let mut cursors = Vec::with_capacity(origins.len());
                for origin in origins {
                    cursors.push(backend.cursor(origin, *partition).await?);
                }
                Response::Stability {
                    hashes,
                    head,
                    cursors,
                }
            }
            Request::Purge { keys } => {
                if keys.len() > limits.keys_max {
                    return Ok(failed("too many keys in one purge"));
                }
                let mut count = 0u32;
                for (key, hash) in keys {
                    let key = Key::new(key.as_str())?;
                    let Some(stored) = backend.get(&key).await.ok().flatten() else {
                        continue;
                    };
                    if stored.value.is_bottom()
                        && value_hash(&stored.value)? == *hash
                        && backend.purge(&key, stored.version).await?
                    {
                        count += 1;
                    }
                }
                Response::Purged { count }
            }
        })
    }

    /// Opens a session (`session == 0`) or continues one, and answers with the entries it has
    /// not sent yet.
    async fn heads(
        &self,
        session: u64,
        after: &[u64],
        poll: u64,
        limit: u32,
        first: bool,
    ) -> Result<Response, BackendError> {
        let partitions = usize::from(self.backend.layout().partitions());
        let id = if session == 0 {
            let mut sessions = self.lock();
            let mut id = sessions.next_id;
            if id == 0 {
                id = 1;
            }
            sessions.next_id = id.wrapping_add(1);
            sessions.touches += 1;
            let touched = sessions.touches;
            let sent = (0..partitions)
                .map(|p| after.get(p).copied().unwrap_or(u64::MAX))
                .collect();
            sessions.table.insert(
                id,
                Session {
                    sent,
                    version: 0,
                    polls_seen: BTreeSet::new(),
                    polls_floor: 0,
                    touched,
                },
            );
            while sessions.table.len() > self.limits.sessions_max.max(1) {
                let oldest = sessions
                    .table
                    .iter()
                    .min_by_key(|(_, s)| s.touched)
                    .map(|(id, _)| *id);
                if let Some(oldest) = oldest {
                    sessions.table.remove(&oldest);
                }
            }
            id
        } else {
            let mut sessions = self.lock();
            sessions.touches += 1;
            let touched = sessions.touches;
            let Some(s) = sessions.table.get_mut(&session) else {
                return Ok(Response::UnknownSession);
            };
            s.touched = touched;
            if first && !s.first_sight(poll) {
                return Ok(Response::Duplicate);
            }
            session
        };
        let budget = limit.clamp(1, self.limits.feed_entries_max) as usize;
        for _ in 0..ANSWER_ATTEMPTS_MAX {
            let Some((mut sent, version)) = self
                .lock()
                .table
                .get(&id)
                .map(|s| (s.sent.clone(), s.version))
            else {
                return Ok(Response::UnknownSession);
            };
            let pages = self.pages(&mut sent, budget).await?;
            let mut sessions = self.lock();
            let Some(s) = sessions.table.get_mut(&id) else {
                return Ok(Response::UnknownSession);
            };
            if s.version != version {
                // Another answer of this session moved it meanwhile: start again from there.
                continue;
            }
            if !pages.is_empty() {
                s.sent = sent;
                s.version += 1;
            }
            return Ok(if session == 0 {
                Response::Opened { session: id, pages }
            } else {
                Response::Heads { pages }
            });
        }
        Ok(if session == 0 {
            Response::Opened {
                session: id,
                pages: Vec::new(),
            }
        } else {
            Response::Heads { pages: Vec::new() }
        })
    }

    /// Pages of the entries after `sent`, at most `budget` in all; raises `sent` past them.
    async fn pages(&self, sent: &mut [u64], budget: usize) -> Result<Vec<Page>, BackendError> {
        let partitions = sent.len();
        let mut budget = budget;
        let mut pages = Vec::new();
        // Start at a partition derived from the session's progress, so that a heavy partition
        // cannot keep the others out of every page.
        let start =
            (sent.iter().fold(0u64, |a, c| a.wrapping_add(*c)) % partitions.max(1) as u64) as usize;
        for i in 0..partitions {
            if budget == 0 {
                break;
            }
            let index = (start + i) % partitions;
            let cursor = sent[index];
            if cursor == u64::MAX {
                continue;
            }
            let partition = u16::try_from(index)
                .map_err(|_| BackendError::InvalidArgument("too many partitions".into()))?;
            let page = self.backend.read_feed(partition, cursor, budget).await?;
            if page.last_seq <= cursor {
                continue;
            }
            // Entries after the cursor, or none if the feed was trimmed past it (the page
            // then tells the puller where the feed resumes).
            let (first_seq, last_seq) = (page.first_seq, page.last_seq);
            let entries = wire_entries(page)?;
            sent[index] = entries
                .last()
                .map_or(first_seq.saturating_sub(1), |e| e.seq)
                .max(cursor);
            budget = budget.saturating_sub(entries.len());
            pages.push(Page {
                partition,
                entries,
                first_seq,
                last_seq,
            });
        }
        Ok(pages)
    }
}

/// `(key, value hash)` of the keys in `buckets` of `partition`, in key order.
async fn bucket_entries<B: StateBackend>(
    backend: &B,
    partition: u16,
    buckets: Vec<u16>,
) -> Result<Vec<(String, u64)>, BackendError> {
    let mut entries = Vec::new();
    for bucket in buckets {
        for (key, hash) in backend.bucket_entries(partition, bucket).await? {
            entries.push((key.as_str().to_string(), hash));
        }
    }
    entries.sort();
    Ok(entries)
}

/// The XOR of the digest buckets of `[first, first + partitions)`: the XOR of their items'
/// ids ([`item_id`]).
async fn summary_of<B: StateBackend>(
    backend: &B,
    first: u16,
    partitions: u16,
) -> Result<u64, BackendError> {
    let mut summary = 0;
    for partition in scope(backend, first, partitions)? {
        summary ^= backend.digest(partition).await?.summary();
    }
    Ok(summary)
}

/// The partitions `[first, first + partitions)`, checked against the layout.
fn scope<B: StateBackend>(
    backend: &B,
    first: u16,
    partitions: u16,
) -> Result<std::ops::Range<u16>, BackendError> {
    let end = u32::from(first) + u32::from(partitions);
    if end > u32::from(backend.layout().partitions()) {
        return Err(BackendError::InvalidArgument(format!(
            "partitions {first}..{end} out of range"
        )));
    }
    Ok(first..first + partitions)
}

/// `(item id, key)` of every key of `[first, first + partitions)`, bucket by bucket.
async fn list_items<B: StateBackend>(
    backend: &B,
    first: u16,
    partitions: u16,
) -> Result<Vec<(u64, String)>, BackendError> {
    let mut items = Vec::new();
    for partition in scope(backend, first, partitions)? {
        for bucket in 0..backend.layout().buckets() {
            for (key, hash) in backend.bucket_entries(partition, bucket).await? {
                items.push((item_id(&key, hash), key.as_str().to_string()));
            }
        }
    }
    Ok(items)
}

/// The envelopes of `keys`; `None` for a key that is absent or that this store cannot read
/// (a corrupt value is never offered; the other side keeps its own).
async fn states<B: StateBackend>(
    backend: &B,
    keys: Vec<String>,
) -> Result<Vec<(String, Option<Vec<u8>>)>, BackendError> {
    let parsed: Vec<Key> = keys.iter().map(Key::new).collect::<Result<_, _>>()?;
    let values = backend.get_many(&parsed).await?;
    let mut states = Vec::with_capacity(keys.len());
    for (key, value) in keys.into_iter().zip(values) {
        let bytes = match value {
            Ok(Some(stored)) => Some(encode(&stored.value)?),
            Ok(None) | Err(_) => None,
        };
        states.push((key, bytes));
    }
    Ok(states)
}

/// What merging remote states or deltas did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct MergeCount {
    merged: usize,
}

/// Merges `(key, envelope)` pairs. An envelope that does not decode aborts the batch (the
/// sender retries; nothing corrupt is ever merged). A value whose type differs from the local
/// one is skipped and logged: regions that wrote different types under one key keep their own
/// (a known limitation: such keys do not converge).
async fn merge_states<B: StateBackend>(
    backend: &B,
    states: Vec<(String, Vec<u8>)>,
) -> Result<MergeCount, BackendError> {
    let mut items = Vec::with_capacity(states.len());
    for (key, bytes) in states {
        let value = envelope::decode(&bytes, &Limits::default())?;
        items.push((Key::new(key)?, value));
    }
    let mut count = MergeCount::default();
    for ((key, _), outcome) in items.iter().zip(backend.merge_many(&items).await?) {
        match outcome {
            Ok(_) => count.merged += 1,
            Err(BackendError::Crdt(geostate_crdt::Error::TypeMismatch { expected, found })) => {
                tracing::warn!(key = key.as_str(), %expected, %found, "type conflict between regions: remote value skipped");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(count)
}

/// Carries out a core's local operation on `backend`. `peers` names the peers by index (their
/// names key the cursors).
pub async fn execute<B: StateBackend>(
    backend: &B,
    peers: &[String],
    op: LocalOp,
) -> Result<LocalResult, String> {
    execute_inner(backend, peers, op)
        .await
        .map_err(|e| e.to_string())
}

async fn execute_inner<B: StateBackend>(
    backend: &B,
    peers: &[String],
    op: LocalOp,
) -> Result<LocalResult, BackendError> {
    let partitions = backend.layout().partitions();
    Ok(match op {
        LocalOp::LoadCursors => {
            let mut all = Vec::with_capacity(peers.len());
            for peer in peers {
                let mut per_partition = Vec::with_capacity(usize::from(partitions));
                for partition in 0..partitions {
                    per_partition.push(backend.cursor(peer, partition).await?);
                }
                all.push(per_partition);
            }
            LocalResult::Cursors(all)
        }
        LocalOp::ApplyFeed {
            peer,
            partition,
            entries,
            advance_to,
        } => {
            let name = peers.get(peer).ok_or_else(|| {
                BackendError::InvalidArgument(format!("no peer with index {peer}"))
            })?;
            let states = entries.into_iter().map(|e| (e.key, e.delta)).collect();
            merge_states(backend, states).await?;
            // Only after every delta is merged: a crash before this line re-applies the page,
            // which changes nothing.
            backend.advance_cursor(name, partition, advance_to).await?;
            LocalResult::Applied
        }
        LocalOp::Digest { partition } => {
            LocalResult::Digest(backend.digest(partition).await?.buckets().to_vec())
        }
        LocalOp::Buckets { partition, buckets } => {
            LocalResult::Buckets(bucket_entries(backend, partition, buckets).await?)
        }
        LocalOp::States { keys } => LocalResult::States(states(backend, keys).await?),
        LocalOp::Summary { first, partitions } => {
            LocalResult::Summary(summary_of(backend, first, partitions).await?)
        }
        LocalOp::Items { first, partitions } => {
            let mut items = list_items(backend, first, partitions).await?;
            items.sort_unstable();
            LocalResult::Items(items)
        }
        LocalOp::Tombstones {
            partition,
            after,
            limit,
        } => {
            let after = after.map(Key::new).transpose()?;
            let page = backend.tombstones(partition, after.as_ref(), limit).await?;
            let head = backend.read_feed(partition, u64::MAX, 1).await?.last_seq;
            LocalResult::Tombstones {
                items: page
                    .items
                    .into_iter()
                    .map(|t| (t.key.as_str().to_string(), t.version, t.hash))
                    .collect(),
                next: page.next.map(|k| k.as_str().to_string()),
                head,
            }
        }
        LocalOp::Purge { keys } => {
            let mut purged = 0;
            for (key, version) in keys {
                if backend.purge(&Key::new(key)?, version).await? {
                    purged += 1;
                }
            }
            LocalResult::Purged(purged)
        }
        LocalOp::MergeStates { states } => {
            let keys: Vec<Key> = states
                .iter()
                .map(|(k, _)| Key::new(k.as_str()))
                .collect::<Result<_, _>>()?;
            let count = merge_states(backend, states).await?;
            let mut hashes = Vec::with_capacity(keys.len());
            for (key, value) in keys.iter().zip(backend.get_many(&keys).await?) {
                if let Ok(Some(stored)) = value {
                    hashes.push((key.as_str().to_string(), value_hash(&stored.value)?));
                }
            }
            LocalResult::Merged {
                merged: count.merged,
                hashes,
            }
        }
    })
}
