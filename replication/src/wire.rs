//! The messages replicators exchange. A puller sends a [`Request`] to a peer, which answers
//! from its own store with a [`Response`] (see [`crate::serve`]). These types are a wire
//! format: their encoding is [`geostate_crdt::record`].

use geostate_crdt::{ActorId, Hlc};
use serde::{Deserialize, Serialize};

use crate::iblt::{Symbol, SYMBOL_WIRE_BYTES};

/// Fixed-width (8 bytes, little endian) encoding of one `u64` hash: the payload codec writes
/// integers as variable-length, where a random 64-bit hash takes 9 bytes.
mod fixed_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(&value.to_le_bytes(), serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        <[u8; 8]>::deserialize(deserializer).map(u64::from_le_bytes)
    }
}

/// [`fixed_u64`] for a list of hashes (item ids).
mod fixed_u64s {
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        values: &[u64],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(values.len()))?;
        for value in values {
            seq.serialize_element(&value.to_le_bytes())?;
        }
        seq.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u64>, D::Error> {
        let raw = Vec::<[u8; 8]>::deserialize(deserializer)?;
        Ok(raw.into_iter().map(u64::from_le_bytes).collect())
    }
}

/// What a puller asks a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// A long poll in a *poll session* (see [`crate::serve::Server`]): the peer remembers, per
    /// session, how far it has sent each partition's feed, and answers with the entries after
    /// that. With nothing new it may hold the poll for up to `wait_ms` and answer as soon as a
    /// local write arrives. A puller keeps several polls of one session out at once, so one is
    /// always waiting at the peer; the session keeps their answers from repeating each other.
    Heads {
        /// The session to continue; 0 opens a new one that starts at `after`.
        session: u64,
        /// Opening: the puller's cursor per partition (`u64::MAX`: nothing wanted from that
        /// partition). Continuing: empty (ignored).
        after: Vec<u64>,
        /// The poll's number in its session (1, 2, ...; 0 when opening). A number seen
        /// before is answered with [`Response::Duplicate`].
        poll: u64,
        /// Most entries in all pages together.
        limit: u32,
        /// How long the peer may hold the poll when there is nothing new. An opening poll
        /// carries 0: it is answered at once.
        wait_ms: u32,
    },
    /// Feed entries of `partition` after `after`, at most `limit`: a one-off read outside any
    /// session (for tools and tests; the core pulls with [`Request::Heads`]).
    Feed {
        /// The partition.
        partition: u16,
        /// Entries after this sequence number are wanted.
        after: u64,
        /// Most entries wanted.
        limit: u32,
    },
    /// The bucket fingerprints of `partition`.
    Digest {
        /// The partition.
        partition: u16,
    },
    /// The keys, with value hashes, of some buckets of `partition`.
    Buckets {
        /// The partition.
        partition: u16,
        /// The buckets.
        buckets: Vec<u16>,
    },
    /// The full states of `keys`, as envelopes.
    States {
        /// The keys.
        keys: Vec<String>,
    },
    /// Full states for the peer to merge (anti-entropy's push half).
    Push {
        /// `(key, envelope)` pairs.
        states: Vec<(String, Vec<u8>)>,
    },
    /// Garbage collection asks whether the puller's tombstones of `partition` are stable: the
    /// peer's value hash of each key, its feed head, and its cursors on `origins`' feeds.
    Stability {
        /// The partition.
        partition: u16,
        /// The tombstones' keys.
        keys: Vec<String>,
        /// Regions whose feeds the peer pulls (every region but the peer).
        origins: Vec<String>,
    },
    /// Tombstones found causally stable: the peer purges each key that still holds a
    /// tombstone with this value hash.
    Purge {
        /// `(key, value hash)` pairs.
        keys: Vec<(String, u64)>,
    },
    /// Opens a set reconciliation of the partitions `[first, first + partitions)` (see
    /// [`crate::iblt`]): if the peer's summary of them (the XOR of their digest buckets)
    /// equals `summary`, it answers [`Response::Reconciled`]; otherwise it takes a snapshot of
    /// their items and answers with its first `symbols` coded symbols
    /// ([`Response::Symbols`]). Symbol 0's id sum is the snapshot's summary, which names it in
    /// the requests that follow.
    Reconcile {
        /// The first partition.
        first: u16,
        /// How many partitions.
        partitions: u16,
        /// The puller's summary of them.
        #[serde(with = "fixed_u64")]
        summary: u64,
        /// Symbols wanted if the summaries differ.
        symbols: u32,
    },
    /// More coded symbols, `[from, from + count)`, of the snapshot `snapshot` of the partitions
    /// `[first, first + partitions)`. Answer: [`Response::Symbols`], or
    /// [`Response::Changed`] if the peer no longer holds the snapshot and the partitions
    /// changed since.
    Symbols {
        /// The first partition.
        first: u16,
        /// How many partitions.
        partitions: u16,
        /// The snapshot: its summary, symbol 0's id sum.
        #[serde(with = "fixed_u64")]
        snapshot: u64,
        /// The first symbol wanted.
        from: u32,
        /// How many symbols.
        count: u32,
    },
    /// The full states of the keys whose item ids (in the snapshot `snapshot` of the
    /// partitions `[first, first + partitions)`, or in their current listing if the peer no
    /// longer holds it) are `ids`. Answer: [`Response::States`], leaving out ids it does not
    /// know.
    Fetch {
        /// The first partition.
        first: u16,
        /// How many partitions.
        partitions: u16,
        /// The snapshot the ids were decoded from.
        #[serde(with = "fixed_u64")]
        snapshot: u64,
        /// The item ids.
        #[serde(with = "fixed_u64s")]
        ids: Vec<u64>,
    },
}

/// One change-feed entry on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    /// Sequence number in the origin's partition feed.
    pub seq: u64,
    /// The key written.
    pub key: String,
    /// The delta, as an envelope.
    pub delta: Vec<u8>,
    /// The writer.
    pub origin: ActorId,
    /// The write's timestamp.
    pub hlc: Hlc,
}

impl WireEntry {
    /// The entry at `seq` that the origin holds but cannot read (damaged bytes in its store):
    /// it travels with an empty key and delta (no envelope is empty), so the page stays
    /// contiguous; the puller skips it and repairs the partition by anti-entropy.
    pub fn damaged(seq: u64) -> Self {
        Self {
            seq,
            key: String::new(),
            delta: Vec::new(),
            origin: ActorId::new(0),
            hlc: Hlc::ZERO,
        }
    }

    /// Whether this is the marker of a damaged entry (see [`WireEntry::damaged`]).
    pub fn is_damaged(&self) -> bool {
        self.delta.is_empty()
    }
}

/// Feed entries of one partition, as part of a [`Response::Heads`] or [`Response::Opened`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// The partition.
    pub partition: u16,
    /// Entries after the requested cursor, in order.
    pub entries: Vec<WireEntry>,
    /// Oldest sequence number the peer still holds.
    pub first_seq: u64,
    /// Newest sequence number the peer has written.
    pub last_seq: u64,
}

/// A peer's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// The answer to a poll within a session: pages of the entries the session had not sent
    /// yet (none: nothing new).
    Heads {
        /// Pages for partitions with entries the session had not sent (or a gap).
        pages: Vec<Page>,
    },
    /// The answer to a poll opening a session: the session's id, and pages of the entries
    /// after the poll's cursors.
    Opened {
        /// The session's id, for the polls that follow.
        session: u64,
        /// Pages for partitions with entries after the cursors (or a gap).
        pages: Vec<Page>,
    },
    /// The peer does not know the session polled (it restarted, or forgot an idle session):
    /// the puller must open a new one.
    UnknownSession,
    /// The poll's number was seen before in its session (the network delivered it twice):
    /// the first copy is, or was, answered; this answer carries nothing.
    Duplicate,
    /// A page of a partition's feed.
    Feed {
        /// Entries after the requested cursor, in order.
        entries: Vec<WireEntry>,
        /// Oldest sequence number the peer still holds.
        first_seq: u64,
        /// Newest sequence number the peer has written.
        last_seq: u64,
    },
    /// Bucket fingerprints.
    Digest {
        /// One per bucket.
        buckets: Vec<u64>,
    },
    /// `(key, value hash)` of the asked buckets, in key order.
    Buckets {
        /// The entries.
        entries: Vec<(String, u64)>,
    },
    /// Full states; `None` for a key the peer does not hold (or cannot read).
    States {
        /// `(key, envelope)` pairs.
        states: Vec<(String, Option<Vec<u8>>)>,
    },
    /// The pushed states were merged.
    Pushed,
    /// What the peer knows of some tombstones (see [`Request::Stability`]).
    Stability {
        /// The peer's value hash of each asked key, in order; `None` if it holds no readable
        /// value.
        hashes: Vec<Option<u64>>,
        /// The newest sequence number of the peer's feed of the partition.
        head: u64,
        /// The peer's cursor on each asked origin's feed of the partition, in order.
        cursors: Vec<u64>,
    },
    /// How many of the tombstones the peer purged.
    Purged {
        /// The count.
        count: u32,
    },
    /// The peer could not answer (its store failed); the request may be retried.
    Failed {
        /// Why.
        reason: String,
    },
    /// The summaries of a [`Request::Reconcile`] match: nothing differs.
    Reconciled,
    /// Coded symbols, in order from the first asked.
    Symbols {
        /// The symbols.
        symbols: Vec<Symbol>,
    },
    /// The snapshot a [`Request::Symbols`] named is gone and the partitions have changed
    /// since: the puller starts its reconciliation again.
    Changed,
}

impl Request {
    /// Approximate size on the wire, in bytes (for accounting; no encoding is done). Exact
    /// for the set-reconciliation requests ([`Request::Reconcile`], [`Request::Symbols`],
    /// [`Request::Fetch`]): their encoding with [`geostate_crdt::record`] is one format-version
    /// byte longer.
    pub fn wire_bytes(&self) -> usize {
        1 + match self {
            Request::Heads { after, poll, .. } => {
                8 + varint_len(*poll)
                    + 8
                    + if after.is_empty() {
                        0
                    } else {
                        2 + after.iter().map(|c| varint_len(*c)).sum::<usize>()
                    }
            }
            Request::Feed { .. } => 2 + 8 + 4,
            Request::Reconcile {
                first,
                partitions,
                symbols,
                ..
            } => scope_len(*first, *partitions) + 8 + varint_len(u64::from(*symbols)),
            Request::Symbols {
                first,
                partitions,
                from,
                count,
                ..
            } => {
                scope_len(*first, *partitions)
                    + 8
                    + varint_len(u64::from(*from))
                    + varint_len(u64::from(*count))
            }
            Request::Fetch {
                first,
                partitions,
                ids,
                ..
            } => scope_len(*first, *partitions) + 8 + varint_len(ids.len() as u64) + 8 * ids.len(),
            Request::Digest { .. } => 2,
            Request::Buckets { buckets, .. } => 2 + 2 + 2 * buckets.len(),
            Request::States { keys } => 2 + keys.iter().map(|k| 2 + k.len()).sum::<usize>(),
            Request::Push { states } => {
                2 + states
                    .iter()
                    .map(|(k, v)| 4 + k.len() + v.len())
                    .sum::<usize>()
            }
            Request::Stability { keys, origins, .. } => {
                2 + 4
                    + keys.iter().map(|k| 2 + k.len()).sum::<usize>()
                    + origins.iter().map(|o| 1 + o.len()).sum::<usize>()
            }
            Request::Purge { keys } => 2 + keys.iter().map(|(k, _)| 2 + k.len() + 8).sum::<usize>(),
        }
    }
}

/// Bytes of a partition range as the payload codec writes it.
fn scope_len(first: u16, partitions: u16) -> usize {
    varint_len(u64::from(first)) + varint_len(u64::from(partitions))
}

/// Bytes of `n` as the payload codec writes it (bincode's variable-length integers).
fn varint_len(n: u64) -> usize {
    match n {
        0..=250 => 1,
        251..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

fn entries_bytes(entries: &[WireEntry]) -> usize {
    entries
        .iter()
        .map(|e| 8 + 2 + e.key.len() + 4 + e.delta.len() + 8 + 12)
        .sum()
}

fn pages_bytes(pages: &[Page]) -> usize {
    2 + pages
        .iter()
        .map(|p| 2 + 16 + entries_bytes(&p.entries))
        .sum::<usize>()
}

impl Response {
    /// Whether this is a long-poll answer with nothing new in it: a runtime may hold the
    /// request (up to its `wait_ms`) and answer again once local writes arrive (with
    /// [`crate::serve::Server::serve_held`]).
    pub fn is_empty_poll(&self) -> bool {
        matches!(self, Response::Heads { pages } if pages.is_empty())
    }

    /// Approximate size on the wire, in bytes (for accounting; no encoding is done). Exact
    /// for [`Response::Reconciled`], [`Response::Symbols`] and [`Response::Changed`]: their
    /// encoding with [`geostate_crdt::record`] is one format-version byte longer.
    pub fn wire_bytes(&self) -> usize {
        1 + match self {
            Response::Heads { pages } => pages_bytes(pages),
            Response::Opened { pages, .. } => 8 + pages_bytes(pages),
            Response::Feed { entries, .. } => 16 + entries_bytes(entries),
            Response::Reconciled | Response::Changed => 0,
            Response::Symbols { symbols } => {
                varint_len(symbols.len() as u64) + SYMBOL_WIRE_BYTES * symbols.len()
            }
            Response::Digest { buckets } => 2 + 8 * buckets.len(),
            Response::Buckets { entries } => {
                4 + entries.iter().map(|(k, _)| 2 + k.len() + 8).sum::<usize>()
            }
            Response::States { states } => {
                4 + states
                    .iter()
                    .map(|(k, v)| 2 + k.len() + 4 + v.as_ref().map_or(0, Vec::len))
                    .sum::<usize>()
            }
            Response::Pushed | Response::UnknownSession | Response::Duplicate => 0,
            Response::Stability {
                hashes, cursors, ..
            } => 4 + 9 * hashes.len() + 8 + 8 * cursors.len(),
            Response::Purged { .. } => 4,
            Response::Failed { reason } => 2 + reason.len(),
        }
    }
}
