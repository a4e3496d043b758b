//! The store-facing half of replication, shared by the async driver and the simulator:
//! [`serve`] answers a peer's [`Request`] from the local store, and [`execute`] carries out a
//! core's [`LocalOp`] on it.

use geostate_backends::digest::value_hash;
use geostate_backends::{BackendError, Key, StateBackend};
use geostate_crdt::envelope::{self, Limits, Options};
use geostate_crdt::Crdt;

use crate::core::{LocalOp, LocalResult};
use crate::wire::{Page, Request, Response, WireEntry};

/// Bounds on what one request may ask of the serving store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    /// Most feed entries per answer.
    pub feed_entries_max: u32,
    /// Most buckets per bucket request.
    pub buckets_max: usize,
    /// Most keys per states request or push.
    pub keys_max: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            feed_entries_max: 4_096,
            buckets_max: 4_096,
            keys_max: 4_096,
        }
    }
}

fn failed(e: impl std::fmt::Display) -> Response {
    Response::Failed {
        reason: e.to_string(),
    }
}

fn encode(value: &Crdt) -> Result<Vec<u8>, BackendError> {
    envelope::encode(value, &Options::default()).map_err(BackendError::Crdt)
}

fn wire_entries(
    entries: Vec<geostate_backends::FeedEntry>,
) -> Result<Vec<WireEntry>, BackendError> {
    entries
        .into_iter()
        .map(|e| {
            Ok(WireEntry {
                seq: e.seq,
                delta: encode(&e.delta)?,
                key: e.key.as_str().to_string(),
                origin: e.origin,
                hlc: e.hlc,
            })
        })
        .collect()
}

/// Answers a peer's request from `backend`. Store failures become [`Response::Failed`]; the
/// peer retries later.
pub async fn serve<B: StateBackend>(
    backend: &B,
    request: Request,
    limits: &ServeLimits,
) -> Response {
    match serve_inner(backend, request, limits).await {
        Ok(r) => r,
        Err(e) => failed(e),
    }
}

async fn serve_inner<B: StateBackend>(
    backend: &B,
    request: Request,
    limits: &ServeLimits,
) -> Result<Response, BackendError> {
    Ok(match request {
        Request::Heads { after, limit, .. } => {
            let partitions = backend.layout().partitions();
            let mut last_seqs = Vec::with_capacity(usize::from(partitions));
            for partition in 0..partitions {
                last_seqs.push(backend.read_feed(partition, u64::MAX, 1).await?.last_seq);
            }
            let mut pages = Vec::new();
            if !after.is_empty() {
                let mut budget = limit.clamp(1, limits.feed_entries_max) as usize;
                // Start at a partition derived from the cursors so a heavy partition cannot
                // keep the others out of every page.
                let start = (after.iter().fold(0u64, |a, c| a.wrapping_add(*c))
                    % u64::from(partitions.max(1))) as u16;
                for i in 0..partitions {
                    if budget == 0 {
                        break;
                    }
                    let partition = (start + i) % partitions;
                    let cursor = after
                        .get(usize::from(partition))
                        .copied()
                        .unwrap_or(u64::MAX);
                    if cursor >= last_seqs[usize::from(partition)] {
                        continue;
                    }
                    let page = backend.read_feed(partition, cursor, budget).await?;
                    budget = budget.saturating_sub(page.entries.len());
                    pages.push(Page {
                        partition,
                        entries: wire_entries(page.entries)?,
                        first_seq: page.first_seq,
                        last_seq: page.last_seq,
                    });
                }
            }
            // With cursors, each page carries its partition's head: the full list would cost
            // 8 bytes a partition on every poll.
            let last_seqs = if after.is_empty() {
                last_seqs
            } else {
                Vec::new()
            };
            Response::Heads { last_seqs, pages }
        }
        Request::Feed {
            partition,
            after,
            limit,
        } => {
            let limit = limit.clamp(1, limits.feed_entries_max);
            let page = backend.read_feed(partition, after, limit as usize).await?;
            let entries = wire_entries(page.entries)?;
            Response::Feed {
                entries,
                first_seq: page.first_seq,
                last_seq: page.last_seq,
            }
        }
        Request::Digest { partition } => Response::Digest {
            buckets: backend.digest(partition).await?.buckets().to_vec(),
        },
        Request::Buckets { partition, buckets } => {
            if buckets.len() > limits.buckets_max {
                return Ok(failed("too many buckets in one request"));
            }
            Response::Buckets {
                entries: bucket_entries(backend, partition, buckets).await?,
            }
        }
        Request::States { keys } => {
            if keys.len() > limits.keys_max {
                return Ok(failed("too many keys in one request"));
            }
            Response::States {
                states: states(backend, keys).await?,
            }
        }
        Request::Push { states } => {
            if states.len() > limits.keys_max {
                return Ok(failed("too many states in one push"));
            }
            merge_states(backend, states).await?;
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
            let head = backend.read_feed(partition, u64::MAX, 1).await?.last_seq;
            let mut cursors = Vec::with_capacity(origins.len());
            for origin in &origins {
                cursors.push(backend.cursor(origin, partition).await?);
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
                let key = Key::new(key)?;
                let Some(stored) = backend.get(&key).await.ok().flatten() else {
                    continue;
                };
                if stored.value.is_bottom()
                    && value_hash(&stored.value)? == hash
                    && backend.purge(&key, stored.version).await?
                {
                    count += 1;
                }
            }
            Response::Purged { count }
        }
    })
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
