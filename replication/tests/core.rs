//! The pure replicator core, driven by hand: events in, commands out. No async; the store and
//! the peers are played by the tests (and, in one section, by a real [`Server`] over the
//! memory store).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::ops::RangeInclusive;
use std::sync::Arc;

use geostate_backends::{Expect, Key, Layout, LocalWrite, MemoryBackend, StateBackend};
use geostate_crdt::{ActorId, CounterOp, Hlc, Op};
use geostate_replication::core::{
    Command, CommandId, CoreConfig, Event, LocalOp, LocalResult, PeerId, ReplicatorCore,
};
use geostate_replication::iblt::{self, Symbol};
use geostate_replication::serve::{execute, ServeLimits, Server};
use geostate_replication::wire::{Page, Request, Response, WireEntry};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence, RngSeed};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// Four partitions, small limits, one poll out per peer, and no periodic sweep (tests that
/// want more polls or a sweep ask for them). A peer may hold a poll for 500 ms, so a poll
/// times out after 1.5 s and any other request (an opening poll too) after 1 s. Anti-entropy
/// reconciles one partition per round and asks for one symbol at most, so that a round whose
/// first symbol does not decode goes to the bucket-by-bucket comparison at once (the tests of
/// that comparison get there with [`fall_back_to_compare`]; the reconciliation's own tests use
/// [`reconcile_config`]).
fn config() -> CoreConfig {
    CoreConfig {
        partitions: 4,
        polls_per_peer: 1,
        pull_wait_ms: 500,
        feed_batch_max: 10,
        requests_in_flight_max: 4,
        request_timeout_ms: 1_000,
        retry_backoff_ms: 100,
        retry_backoff_max_ms: 800,
        anti_entropy_interval_ms: 4_000_000_000,
        ae_items_per_round: 0,
        ae_symbols_first: 1,
        ae_symbols_per_round_max: 1,
        ae_buckets_per_round_max: 64,
        ae_keys_per_round_max: 1_024,
        // Garbage collection has its own tests (gc.rs).
        gc_interval_ms: 0,
        gc_keys_per_round_max: 16,
    }
}

/// [`config`] with `polls` polls out per peer.
fn pipelined(polls: usize) -> CoreConfig {
    CoreConfig {
        polls_per_peer: polls,
        ..config()
    }
}

/// A heads poll the core has out (an opening poll has session 0).
#[derive(Clone, Debug)]
struct PollOut {
    id: CommandId,
    peer: PeerId,
    session: u64,
    sent_ms: u64,
    wait_ms: u64,
}

/// A core, the local time the test has reached, the polls it has out, and the sessions the
/// test (playing the peers) opened.
struct Harness {
    core: ReplicatorCore,
    config: CoreConfig,
    now_ms: u64,
    /// Polls out, oldest first: recorded from the core's commands, forgotten when answered,
    /// timed out (as the core does) or lost in a restart.
    polls_out: Vec<PollOut>,
    /// Peers that never answer a poll in [`Harness::run`].
    silent: BTreeSet<PeerId>,
    /// The newest session opened with each peer.
    sessions: BTreeMap<PeerId, u64>,
    next_session: u64,
}

fn peer_names(peers: usize) -> Vec<String> {
    (0..peers).map(|i| format!("peer-{i}")).collect()
}

impl Harness {
    fn new(config: CoreConfig, peers: usize) -> Self {
        Self {
            core: ReplicatorCore::new(config.clone(), "self", &peer_names(peers)),
            config,
            now_ms: 0,
            polls_out: Vec::new(),
            silent: BTreeSet::new(),
            sessions: BTreeMap::new(),
            next_session: 100,
        }
    }

    /// Starts the core and answers its cursor load with `cursors`; returns what followed
    /// (the opening polls).
    fn started(config: CoreConfig, cursors: Vec<Vec<u64>>) -> (Self, Vec<Command>) {
        let mut h = Self::new(config, cursors.len());
        let commands = h.load(cursors);
        (h, commands)
    }

    /// [`Harness::started`], with every opening poll answered at once (a new session, no
    /// pages); returns what followed (the first polls of each session).
    fn opened(config: CoreConfig, cursors: Vec<Vec<u64>>) -> (Self, Vec<Command>) {
        let (mut h, _) = Self::started(config, cursors);
        let out = h.open_all();
        (h, out)
    }

    /// Sends `Start` and answers the cursor load with `cursors`.
    fn load(&mut self, cursors: Vec<Vec<u64>>) -> Vec<Command> {
        let start = self.handle(Event::Start);
        assert_eq!(start.len(), 1, "Start asks only for the cursors: {start:?}");
        let [(id, LocalOp::LoadCursors)] = locals(&start)[..] else {
            panic!("expected LoadCursors, got {start:?}");
        };
        self.local(id, LocalResult::Cursors(cursors))
    }

    /// How many polls of one session may be out to a peer.
    fn polls_max(&self) -> usize {
        let max = self.config.requests_in_flight_max;
        self.config
            .polls_per_peer
            .min(if max > 1 { max - 1 } else { max })
            .max(1)
    }

    /// Feeds one event to the core, keeping track of its polls: never more than
    /// [`Harness::polls_max`] of the newest session out to a peer.
    fn handle(&mut self, event: Event) -> Vec<Command> {
        let now = self.now_ms;
        let timeout = self.config.request_timeout_ms;
        match &event {
            Event::Start => self.polls_out.clear(),
            Event::Tick => self
                .polls_out
                .retain(|p| p.sent_ms + p.wait_ms + timeout > now),
            // A duplicate's answer leaves a poll out; anything else answers it.
            Event::Remote { id, result } => self.polls_out.retain(|p| {
                p.id != *id || (p.session != 0 && matches!(result, Ok(Response::Duplicate)))
            }),
            _ => {}
        }
        let commands = self.core.handle(now, event);
        for p in polls(&commands) {
            self.polls_out.push(PollOut {
                id: p.id,
                peer: p.peer,
                session: p.session,
                sent_ms: now,
                wait_ms: u64::from(p.wait_ms),
            });
        }
        for (peer, session) in &self.sessions {
            let n = self
                .polls_out
                .iter()
                .filter(|p| p.peer == *peer && p.session == *session)
                .count();
            assert!(
                n <= self.polls_max(),
                "{n} polls of session {session} out to peer {peer}: {commands:?}"
            );
        }
        commands
    }

    /// Moves time on by `ms` and ticks.
    fn tick(&mut self, ms: u64) -> Vec<Command> {
        self.now_ms += ms;
        self.handle(Event::Tick)
    }

    /// Lets `ms` pass with quiet peers: each answers an opening poll at once (a new session)
    /// and holds a poll for its wait, then answers it with nothing new (peers in `silent`
    /// never answer). Returns every command that came out.
    fn run(&mut self, ms: u64) -> Vec<Command> {
        let end = self.now_ms + ms;
        let mut out = Vec::new();
        loop {
            let due: Vec<PollOut> = self
                .polls_out
                .iter()
                .filter(|p| !self.silent.contains(&p.peer) && p.sent_ms + p.wait_ms <= self.now_ms)
                .cloned()
                .collect();
            for p in due {
                if p.session == 0 {
                    let session = self.mint(p.peer);
                    out.extend(self.answer(p.id, opened(session, Vec::new())));
                } else {
                    out.extend(self.answer(p.id, heads(Vec::new())));
                }
            }
            if self.now_ms >= end {
                return out;
            }
            let next = self
                .polls_out
                .iter()
                .filter(|p| !self.silent.contains(&p.peer))
                .map(|p| p.sent_ms + p.wait_ms)
                .filter(|t| *t > self.now_ms)
                .min()
                .unwrap_or(end)
                .min(end);
            out.extend(self.tick(next - self.now_ms));
        }
    }

    /// A new session id for `peer`.
    fn mint(&mut self, peer: PeerId) -> u64 {
        self.next_session += 1;
        self.sessions.insert(peer, self.next_session);
        self.next_session
    }

    /// The newest session opened with `peer`.
    fn session(&self, peer: PeerId) -> u64 {
        self.sessions[&peer]
    }

    fn answer(&mut self, id: CommandId, response: Response) -> Vec<Command> {
        self.handle(Event::Remote {
            id,
            result: Ok(response),
        })
    }

    fn unreachable(&mut self, id: CommandId) -> Vec<Command> {
        self.handle(Event::Remote {
            id,
            result: Err("connection refused".into()),
        })
    }

    fn local(&mut self, id: CommandId, result: LocalResult) -> Vec<Command> {
        self.handle(Event::Local {
            id,
            result: Ok(result),
        })
    }

    fn local_failed(&mut self, id: CommandId) -> Vec<Command> {
        self.handle(Event::Local {
            id,
            result: Err("disk full".into()),
        })
    }

    /// The opening poll out to `peer`.
    fn open_out(&self, peer: PeerId) -> PollOut {
        self.polls_out
            .iter()
            .find(|p| p.peer == peer && p.session == 0)
            .cloned()
            .unwrap_or_else(|| panic!("no opening poll out to peer {peer}"))
    }

    /// The polls (not opening) out to `peer`, oldest first.
    fn polls_to(&self, peer: PeerId) -> Vec<PollOut> {
        self.polls_out
            .iter()
            .filter(|p| p.peer == peer && p.session != 0)
            .cloned()
            .collect()
    }

    /// Answers the opening poll out to `peer`: a new session, with `pages`.
    fn answer_open(&mut self, peer: PeerId, pages: Vec<Page>) -> Vec<Command> {
        let open = self.open_out(peer);
        let session = self.mint(peer);
        self.answer(open.id, opened(session, pages))
    }

    /// Answers every opening poll out: a new session each, no pages.
    fn open_all(&mut self) -> Vec<Command> {
        let peers: Vec<PeerId> = self
            .polls_out
            .iter()
            .filter(|p| p.session == 0)
            .map(|p| p.peer)
            .collect();
        let mut out = Vec::new();
        for peer in peers {
            out.extend(self.answer_open(peer, Vec::new()));
        }
        out
    }

    /// Answers the oldest poll out to `peer` with `pages`, in its session.
    fn answer_poll(&mut self, peer: PeerId, pages: Vec<Page>) -> Vec<Command> {
        let Some(poll) = self.polls_to(peer).first().cloned() else {
            panic!("no poll out to peer {peer}")
        };
        self.answer(poll.id, heads(pages))
    }
}

fn sends(commands: &[Command]) -> Vec<(CommandId, PeerId, Request)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Send { id, peer, request } => Some((*id, *peer, request.clone())),
            _ => None,
        })
        .collect()
}

fn locals(commands: &[Command]) -> Vec<(CommandId, LocalOp)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Local { id, op } => Some((*id, op.clone())),
            _ => None,
        })
        .collect()
}

/// A heads poll, unpacked.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Poll {
    id: CommandId,
    peer: PeerId,
    session: u64,
    after: Vec<u64>,
    poll: u64,
    limit: u32,
    wait_ms: u32,
}

/// Every heads poll in `commands` (opening ones included).
fn polls(commands: &[Command]) -> Vec<Poll> {
    sends(commands)
        .into_iter()
        .filter_map(|(id, peer, r)| match r {
            Request::Heads {
                session,
                after,
                poll,
                limit,
                wait_ms,
            } => Some(Poll {
                id,
                peer,
                session,
                after,
                poll,
                limit,
                wait_ms,
            }),
            _ => None,
        })
        .collect()
}

/// The opening polls in `commands`.
fn opens(commands: &[Command]) -> Vec<Poll> {
    polls(commands)
        .into_iter()
        .filter(|p| p.session == 0)
        .collect()
}

/// The one element of `v`.
fn only<T: std::fmt::Debug>(mut v: Vec<T>) -> T {
    assert_eq!(v.len(), 1, "expected exactly one: {v:?}");
    v.remove(0)
}

/// An applied feed page, unpacked.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Apply {
    id: CommandId,
    peer: PeerId,
    partition: u16,
    seqs: Vec<u64>,
    advance_to: u64,
}

fn applies(commands: &[Command]) -> Vec<Apply> {
    locals(commands)
        .into_iter()
        .filter_map(|(id, op)| match op {
            LocalOp::ApplyFeed {
                peer,
                partition,
                entries,
                advance_to,
            } => Some(Apply {
                id,
                peer,
                partition,
                seqs: entries.iter().map(|e| e.seq).collect(),
                advance_to,
            }),
            _ => None,
        })
        .collect()
}

/// `(peer, partition, seqs, advance_to)` of each apply, sorted.
fn applied(commands: &[Command]) -> Vec<(PeerId, u16, Vec<u64>, u64)> {
    let mut got: Vec<_> = applies(commands)
        .into_iter()
        .map(|a| (a.peer, a.partition, a.seqs, a.advance_to))
        .collect();
    got.sort();
    got
}

/// Whether `commands` hold any anti-entropy work (remote or local).
fn has_ae(commands: &[Command]) -> bool {
    sends(commands).iter().any(|(_, _, r)| {
        matches!(
            r,
            Request::Reconcile { .. }
                | Request::Symbols { .. }
                | Request::Fetch { .. }
                | Request::Digest { .. }
                | Request::Buckets { .. }
                | Request::States { .. }
                | Request::Push { .. }
        )
    }) || locals(commands).iter().any(|(_, op)| {
        matches!(
            op,
            LocalOp::Summary { .. }
                | LocalOp::Items { .. }
                | LocalOp::Digest { .. }
                | LocalOp::Buckets { .. }
                | LocalOp::States { .. }
                | LocalOp::MergeStates { .. }
        )
    })
}

fn entry(seq: u64, hlc_ms: u64) -> WireEntry {
    WireEntry {
        seq,
        key: format!("k{seq}"),
        delta: vec![seq as u8],
        origin: ActorId::new(7),
        hlc: Hlc::new(hlc_ms, 0),
    }
}

/// A page of a poll's answer.
fn poll_page(partition: u16, seqs: RangeInclusive<u64>, first_seq: u64, last_seq: u64) -> Page {
    Page {
        partition,
        entries: seqs.map(|s| entry(s, 0)).collect(),
        first_seq,
        last_seq,
    }
}

/// A poll's answer.
fn heads(pages: Vec<Page>) -> Response {
    Response::Heads { pages }
}

/// The answer to an opening poll.
fn opened(session: u64, pages: Vec<Page>) -> Response {
    Response::Opened { session, pages }
}

// ---------------------------------------------------------------------------------------------
// Start and sessions
// ---------------------------------------------------------------------------------------------

#[test]
fn start_asks_for_the_cursors_and_does_nothing_before_they_arrive() {
    let mut h = Harness::new(config(), 2);
    let commands = h.handle(Event::Start);
    assert_eq!(locals(&commands).len(), 1);
    assert!(matches!(locals(&commands)[0].1, LocalOp::LoadCursors));
    assert!(sends(&commands).is_empty());
    assert!(!h.core.is_idle(), "not idle before the cursors are known");
    // Time passing before the cursors are known starts nothing.
    assert!(h.tick(10_000).is_empty());
    assert!(h.tick(10_000).is_empty());
}

#[test]
fn a_failed_cursor_load_is_retried() {
    let mut h = Harness::new(config(), 1);
    let commands = h.handle(Event::Start);
    let (id, _) = locals(&commands)[0].clone();
    let retry = h.local_failed(id);
    assert_eq!(locals(&retry).len(), 1);
    assert!(matches!(locals(&retry)[0].1, LocalOp::LoadCursors));
    assert!(sends(&retry).is_empty());
    let (id, _) = locals(&retry)[0].clone();
    let after = h.local(id, LocalResult::Cursors(vec![vec![0, 4, 0, 9]]));
    let p = only(opens(&after));
    assert_eq!((p.peer, p.after), (0, vec![0, 4, 0, 9]));
}

/// The first poll to each peer opens a session at the stored cursors. It is not held by the
/// peer (wait 0), so it times out after the plain request timeout.
#[test]
fn loaded_cursors_open_one_session_per_peer() {
    let (mut h, commands) =
        Harness::started(config(), vec![vec![0, 1, 2, 3], vec![0; 4], vec![0; 4]]);
    let asked: Vec<(PeerId, u64, Vec<u64>, u64, u32, u32)> = polls(&commands)
        .into_iter()
        .map(|p| (p.peer, p.session, p.after, p.poll, p.limit, p.wait_ms))
        .collect();
    assert_eq!(
        asked,
        vec![
            (0, 0, vec![0, 1, 2, 3], 0, 10, 0),
            (1, 0, vec![0; 4], 0, 10, 0),
            (2, 0, vec![0; 4], 0, 10, 0)
        ],
        "each opening poll carries the cursors and the page limit, and may not be held"
    );
    assert_eq!(
        sends(&commands).len(),
        3,
        "only opening polls: {commands:?}"
    );
    assert!(locals(&commands).is_empty());
    assert!(h.core.is_idle(), "nothing is known to be behind yet");
    // Nothing more while they are out...
    for _ in 0..9 {
        let early = h.tick(100);
        assert!(early.is_empty(), "{early:?}");
    }
    assert_eq!(h.core.stats().failures, 0);
    // ...until they time out (1 s); then again after the backoff.
    assert!(h.tick(100).is_empty());
    assert_eq!(h.core.stats().failures, 3);
    assert!(h.tick(99).is_empty());
    assert_eq!(opens(&h.tick(1)).len(), 3);
    assert_eq!(h.core.stats().sessions, 0);
}

/// Once a session is open, `polls_per_peer` polls of it are kept out, spread over the round
/// trip the opening poll took; each carries only the session and its number. An answer lets
/// the next one go out at once.
#[test]
fn an_open_session_keeps_its_polls_out_spread_over_the_round_trip() {
    let (mut h, _) = Harness::started(pipelined(3), vec![vec![0; 4]]);
    h.now_ms = 90;
    let out = h.answer_open(0, Vec::new());
    let session = h.session(0);
    assert_eq!(h.core.stats().sessions, 1);
    let p1 = only(polls(&out));
    assert_eq!(
        (p1.session, p1.after.clone(), p1.poll, p1.limit, p1.wait_ms),
        (session, vec![], 1, 10, 500)
    );
    // Round trip 90 ms, three polls: one every 30 ms.
    assert!(polls(&h.tick(29)).is_empty());
    let p2 = only(polls(&h.tick(1)));
    assert_eq!((p2.session, p2.poll), (session, 2));
    assert!(polls(&h.tick(29)).is_empty());
    let p3 = only(polls(&h.tick(1)));
    assert_eq!(p3.poll, 3);
    // Three out: no fourth while they are held.
    assert!(h.tick(100).is_empty());
    assert!(h.tick(200).is_empty());
    assert_eq!(h.core.in_flight(0), 3);
    // An answer with nothing new: its successor goes out at once.
    let out = h.answer(p1.id, heads(Vec::new()));
    let p4 = only(polls(&out));
    assert_eq!((p4.session, p4.poll), (session, 4));
    assert_eq!(h.core.in_flight(0), 3);
    assert_eq!(h.core.stats().failures, 0);
}

/// Polls are bounded by `polls_per_peer`, and leave one request slot for other work.
#[test]
fn polls_leave_a_request_slot_free() {
    let config = CoreConfig {
        requests_in_flight_max: 3,
        ..pipelined(8)
    };
    let (mut h, out) = Harness::opened(config, vec![vec![0; 4]]);
    assert_eq!(polls(&out).len(), 2, "{out:?}");
    assert!(polls(&h.tick(100)).is_empty());
    assert_eq!(h.core.in_flight(0), 2);
}

// ---------------------------------------------------------------------------------------------
// Pages
// ---------------------------------------------------------------------------------------------

/// An answer's pages are applied (entries already received are dropped) and its successor
/// goes out in the same step: not after the merges. The cursor moves only once a page is
/// applied.
#[test]
fn the_next_poll_goes_out_with_the_answer_and_the_cursor_after_the_merge() {
    let (mut h, out) = Harness::opened(pipelined(2), vec![vec![0, 2, 0, 0]]);
    let session = h.session(0);
    let [a, _b] = &polls(&out)[..] else {
        panic!("two polls out at once (round trip 0): {out:?}")
    };
    h.now_ms = 1_000;
    let out = h.answer(
        a.id,
        heads(vec![
            poll_page(0, 1..=3, 1, 3),
            // A peer that sends entry 2 again.
            poll_page(1, 2..=4, 1, 4),
        ]),
    );
    assert_eq!(
        applied(&out),
        vec![(0, 0, vec![1, 2, 3], 3), (0, 1, vec![3, 4], 4)]
    );
    let next = only(polls(&out));
    assert_eq!((next.session, next.poll), (session, 3));
    assert_eq!(h.core.cursor(0, 0), Some(0), "not before the apply");
    assert_eq!(h.core.backlog(0), 3 + 2);
    assert!(!h.core.is_idle());
    h.now_ms += 200;
    let mut pending = applies(&out);
    pending.sort_by_key(|a| a.partition);
    assert!(h.local(pending[0].id, LocalResult::Applied).is_empty());
    assert_eq!(h.core.cursor(0, 0), Some(3));
    h.local(pending[1].id, LocalResult::Applied);
    assert_eq!(h.core.cursor(0, 1), Some(4));
    assert_eq!(h.core.stats().entries_applied, 5);
    assert_eq!(h.core.stats().gaps, 0);
    assert!(h.core.stats().feed_bytes > 0);
    assert!(h.core.is_idle());
    // Lag is recorded when applied: written at 0, applied at 1.2 s.
    let lag = h.core.lag_ms(0).unwrap();
    assert_eq!(lag.len(), 5);
    assert!(lag.equivalent(lag.max(), 1_200), "max {}", lag.max());
}

/// One page per partition is applied at a time: what arrives meanwhile waits, and goes to the
/// store once the page before it is merged, so the stored cursor never passes an entry whose
/// merge is not done.
#[test]
fn pages_of_one_partition_are_applied_one_at_a_time_in_order() {
    let (mut h, out) = Harness::opened(pipelined(3), vec![vec![0; 4]]);
    let ids: Vec<CommandId> = polls(&out).iter().map(|p| p.id).collect();
    assert_eq!(ids.len(), 3);
    let first = only(applies(
        &h.answer(ids[0], heads(vec![poll_page(0, 1..=3, 1, 3)])),
    ));
    // Two more answers while it is applied: the second repeats entries 2 and 3.
    let out = h.answer(ids[1], heads(vec![poll_page(0, 2..=5, 1, 5)]));
    assert!(applies(&out).is_empty(), "{out:?}");
    let out = h.answer(
        ids[2],
        heads(vec![poll_page(0, 6..=6, 1, 6), poll_page(2, 1..=1, 1, 1)]),
    );
    assert_eq!(applied(&out), vec![(0, 2, vec![1], 1)], "another partition");
    assert_eq!(h.core.backlog(0), 6 + 1);
    let out = h.local(first.id, LocalResult::Applied);
    assert_eq!(h.core.cursor(0, 0), Some(3));
    let second = only(applies(&out));
    assert_eq!(
        (second.partition, second.seqs.clone(), second.advance_to),
        (0, vec![4, 5, 6], 6)
    );
    h.local(second.id, LocalResult::Applied);
    assert_eq!(h.core.cursor(0, 0), Some(6));
    assert_eq!(h.core.stats().entries_applied, 6);
}

/// No new poll while a page limit's worth of received entries waits to be applied: a slow
/// store holds the peer back instead of piling entries up in memory.
#[test]
fn no_poll_goes_out_while_a_page_limit_of_entries_waits_to_be_applied() {
    let config = CoreConfig {
        feed_batch_max: 4,
        ..pipelined(2)
    };
    let (mut h, out) = Harness::opened(config, vec![vec![0; 4]]);
    let session = h.session(0);
    let a = polls(&out)[0].clone();
    let out = h.answer(a.id, heads(vec![poll_page(0, 1..=4, 1, 9)]));
    let apply = only(applies(&out));
    assert!(polls(&out).is_empty(), "{out:?}");
    assert!(polls(&h.tick(100)).is_empty());
    let out = h.local(apply.id, LocalResult::Applied);
    assert_eq!(only(polls(&out)).session, session);
}

/// A page cut short by the page limit leaves the rest of its partition to the session's next
/// answers: nothing else is asked for it.
#[test]
fn a_page_limit_leaves_the_rest_to_the_next_answer() {
    let (mut h, out) = Harness::opened(config(), vec![vec![0; 4]]);
    let a = only(polls(&out));
    let out = h.answer(a.id, heads(vec![poll_page(1, 1..=10, 1, 25)]));
    let apply = only(applies(&out));
    assert!(
        sends(&out).is_empty(),
        "a page limit waits to be applied: {out:?}"
    );
    let out = h.local(apply.id, LocalResult::Applied);
    let next = only(polls(&out));
    assert_eq!(sends(&out).len(), 1, "only the next poll: {out:?}");
    assert_eq!(h.core.backlog(0), 15);
    assert!(!h.core.is_idle());
    let out = h.answer(next.id, heads(vec![poll_page(1, 11..=20, 1, 25)]));
    assert_eq!(applied(&out), vec![(0, 1, (11..=20).collect(), 20)]);
}

// ---------------------------------------------------------------------------------------------
// Losses, reordering, duplicates
// ---------------------------------------------------------------------------------------------

/// A page that starts past what was received, while the peer still holds the entries in
/// between, means an answer that did not arrive (or not yet): nothing of it is taken, the
/// session is given up, and a new one opens at what was received, so no entry is skipped.
/// Answers to the old session's polls are ignored.
#[test]
fn a_page_past_what_was_received_opens_a_new_session_there() {
    let (mut h, out) = Harness::opened(pipelined(2), vec![vec![0; 4]]);
    let [a, b] = &polls(&out)[..] else {
        panic!("{out:?}")
    };
    // b's answer overtakes a's.
    let out = h.answer(
        b.id,
        heads(vec![poll_page(2, 1..=2, 1, 2), poll_page(0, 4..=5, 1, 5)]),
    );
    assert_eq!(
        applied(&out),
        vec![(0, 2, vec![1, 2], 2)],
        "the page that follows on is taken"
    );
    let open = only(polls(&out));
    assert_eq!((open.session, open.after), (0, vec![0, 0, 2, 0]));
    assert_eq!(h.core.stats().gaps, 0);
    // a's answer arrives: ignored, it belongs to the old session.
    assert!(h
        .answer(a.id, heads(vec![poll_page(0, 1..=3, 1, 3)]))
        .is_empty());
    assert_eq!(h.core.in_flight(0), 1, "only the opening poll");
    let out = h.answer_open(0, vec![poll_page(0, 1..=5, 1, 5)]);
    assert_eq!(applied(&out), vec![(0, 0, vec![1, 2, 3, 4, 5], 5)]);
    assert_eq!(h.core.stats().sessions, 2);
    assert_eq!(h.core.stats().failures, 0);
}

/// An answer lost after the peer counted its entries as sent: the poll times out, the session
/// is given up, and the new one resends from what was received. Nothing is skipped.
#[test]
fn a_lost_answer_times_out_and_a_new_session_resends_what_it_carried() {
    let (mut h, out) = Harness::opened(pipelined(2), vec![vec![0; 4]]);
    let [a, _lost] = &polls(&out)[..] else {
        panic!("{out:?}")
    };
    let out = h.answer(a.id, heads(vec![poll_page(0, 1..=3, 1, 3)]));
    h.local(only(applies(&out)).id, LocalResult::Applied);
    assert_eq!(h.core.cursor(0, 0), Some(3));
    // The other poll was answered with entries 4..=6, and that answer was lost; the poll sent
    // in its place is held (for the peer, nothing is new).
    assert!(h.tick(1_499).is_empty());
    assert_eq!(h.core.stats().failures, 0);
    assert!(h.tick(1).is_empty(), "backing off");
    assert!(h.core.stats().failures >= 1);
    let open = only(polls(&h.tick(100)));
    assert_eq!((open.session, open.after), (0, vec![3, 0, 0, 0]));
    let out = h.answer_open(0, vec![poll_page(0, 4..=6, 1, 6)]);
    assert_eq!(applied(&out), vec![(0, 0, vec![4, 5, 6], 6)]);
}

/// A peer that no longer knows the session (it restarted) says so; a new one opens at once,
/// with no backoff.
#[test]
fn an_unknown_session_is_opened_again_at_once() {
    let (mut h, out) = Harness::opened(config(), vec![vec![2, 0, 0, 0]]);
    let a = only(polls(&out));
    let out = h.answer(a.id, Response::UnknownSession);
    let open = only(polls(&out));
    assert_eq!((open.session, open.after), (0, vec![2, 0, 0, 0]));
    assert_eq!(h.core.stats().failures, 0);
}

/// A poll the network delivered twice: the copy's answer says so and the poll keeps waiting
/// for its own.
#[test]
fn a_duplicate_answer_leaves_the_poll_waiting_for_its_own() {
    let (mut h, out) = Harness::opened(config(), vec![vec![0; 4]]);
    let a = only(polls(&out));
    assert!(h.answer(a.id, Response::Duplicate).is_empty());
    assert_eq!(h.core.in_flight(0), 1);
    assert_eq!(h.core.stats().failures, 0);
    let out = h.answer(a.id, heads(vec![poll_page(0, 1..=2, 1, 2)]));
    assert_eq!(applied(&out), vec![(0, 0, vec![1, 2], 2)]);
    // A duplicate's answer after the poll's own: ignored.
    assert!(h.answer(a.id, Response::Duplicate).is_empty());
}

/// A failed apply drops what was received of the partition; the peer counts it as sent, so a
/// new session opens at the stored cursor after the backoff, and it is fetched again.
#[test]
fn a_failed_apply_opens_a_new_session_at_the_stored_cursor() {
    let (mut h, out) = Harness::opened(config(), vec![vec![4, 0, 0, 0]]);
    let a = only(polls(&out));
    let out = h.answer(a.id, heads(vec![poll_page(0, 5..=8, 1, 8)]));
    let apply = only(applies(&out));
    let out = h.local_failed(apply.id);
    assert!(sends(&out).is_empty(), "{out:?}");
    assert_eq!(h.core.stats().failures, 1);
    assert_eq!(h.core.cursor(0, 0), Some(4));
    assert!(h.tick(99).is_empty(), "retried too early");
    let open = only(polls(&h.tick(1)));
    assert_eq!((open.session, open.after), (0, vec![4, 0, 0, 0]));
    let out = h.answer_open(0, vec![poll_page(0, 5..=8, 1, 8)]);
    assert_eq!(applied(&out), vec![(0, 0, vec![5, 6, 7, 8], 8)]);
}

/// A peer may hold a poll for its wait before answering: a poll times out only after the wait
/// and the request timeout, an opening poll after the request timeout.
#[test]
fn a_poll_times_out_only_after_its_wait_and_the_request_timeout() {
    let (mut h, _) = Harness::started(config(), vec![vec![0; 4]]);
    h.tick(999);
    assert_eq!(h.core.stats().failures, 0);
    h.tick(1);
    assert_eq!(h.core.stats().failures, 1, "the opening poll, after 1 s");
    let open = only(opens(&h.tick(100)));
    h.now_ms = 10_000;
    let session = h.mint(0);
    let p = only(polls(&h.answer(open.id, opened(session, Vec::new()))));
    assert_eq!(p.wait_ms, 500);
    h.tick(1_499);
    assert_eq!(
        h.core.stats().failures,
        1,
        "the poll timed out before its wait was over"
    );
    h.tick(1);
    assert_eq!(h.core.stats().failures, 2);
    // Its answer is ignored after that.
    assert!(h
        .answer(p.id, heads(vec![poll_page(1, 1..=2, 1, 2)]))
        .is_empty());
    assert_eq!(h.core.cursor(0, 1), Some(0));
    assert_eq!(h.core.backlog(0), 0);

    // The deadline follows the configured wait.
    let config = CoreConfig {
        pull_wait_ms: 3_000,
        ..config()
    };
    let (mut h, out) = Harness::opened(config, vec![vec![0; 4]]);
    assert_eq!(only(polls(&out)).wait_ms, 3_000);
    h.tick(3_999);
    assert_eq!(h.core.stats().failures, 0);
    h.tick(1);
    assert_eq!(h.core.stats().failures, 1);
}

// ---------------------------------------------------------------------------------------------
// Feed gaps
// ---------------------------------------------------------------------------------------------

/// Entries trimmed before we read them: the cursor jumps to where the feed resumes and
/// anti-entropy for the partition starts at once.
#[test]
fn a_feed_gap_jumps_the_cursor_and_starts_anti_entropy_at_once() {
    let (mut h, out) = Harness::opened(config(), vec![vec![0, 2, 0, 0]]);
    let p = only(polls(&out));
    // Entries 3..=9 were trimmed before we read them.
    let out = h.answer(p.id, heads(vec![poll_page(1, 10..=12, 10, 12)]));
    let a = only(applies(&out));
    assert_eq!(
        (a.partition, a.seqs.clone(), a.advance_to),
        (1, vec![10, 11, 12], 12)
    );
    assert_eq!(h.core.stats().gaps, 1);
    // Anti-entropy for that partition alone starts in the same step, with our summary of it.
    assert_eq!(summaries(&out), vec![(1, 1)]);
    h.local(a.id, LocalResult::Applied);
    assert_eq!(h.core.cursor(0, 1), Some(12));
    assert!(!h.core.is_idle(), "the repair is still to do");
}

/// An entry the peer holds but cannot read arrives as a damaged marker: it is skipped (never
/// merged), the rest of the page is applied, the cursor moves past it, and anti-entropy for the
/// partition starts at once, since its write may be missing here.
#[test]
fn a_damaged_entry_is_skipped_and_its_partition_repaired_by_anti_entropy() {
    let (mut h, out) = Harness::opened(config(), vec![vec![0, 2, 0, 0]]);
    let p = only(polls(&out));
    let mut page = poll_page(1, 3..=5, 1, 5);
    page.entries[1] = WireEntry::damaged(4);
    let out = h.answer(p.id, heads(vec![page]));
    let next = only(polls(&out));
    let a = only(applies(&out));
    assert_eq!(
        (a.partition, a.seqs.clone(), a.advance_to),
        (1, vec![3, 5], 5)
    );
    assert_eq!(
        (h.core.stats().damaged_entries, h.core.stats().gaps),
        (1, 0)
    );
    // Anti-entropy for that partition alone starts in the same step, with our summary of it.
    assert_eq!(summaries(&out), vec![(1, 1)]);
    h.local(a.id, LocalResult::Applied);
    assert_eq!(h.core.cursor(0, 1), Some(5));
    // A page of damaged entries alone still moves the cursor (nothing to merge).
    let out = h.answer(
        next.id,
        heads(vec![Page {
            partition: 1,
            entries: vec![WireEntry::damaged(6)],
            first_seq: 1,
            last_seq: 6,
        }]),
    );
    let a = only(applies(&out));
    assert_eq!((a.seqs.clone(), a.advance_to), (vec![], 6));
    assert_eq!(h.core.stats().damaged_entries, 2);
}

/// The same in the answer to an opening poll.
#[test]
fn a_gap_in_an_opening_answer_jumps_the_cursor_too() {
    let (mut h, _) = Harness::started(config(), vec![vec![0, 2, 0, 0]]);
    let out = h.answer_open(0, vec![poll_page(1, 10..=12, 10, 12)]);
    assert_eq!(applied(&out), vec![(0, 1, vec![10, 11, 12], 12)]);
    assert_eq!(h.core.stats().gaps, 1);
    assert!(has_ae(&out));
}

#[test]
fn a_fully_trimmed_feed_advances_the_cursor_to_its_end() {
    let (mut h, out) = Harness::opened(config(), vec![vec![0, 0, 4, 0]]);
    let p = only(polls(&out));
    // The peer keeps nothing: first_seq = last_seq + 1.
    let out = h.answer(
        p.id,
        heads(vec![Page {
            partition: 2,
            entries: vec![],
            first_seq: 21,
            last_seq: 20,
        }]),
    );
    let a = only(applies(&out));
    assert!(a.seqs.is_empty());
    assert_eq!(a.advance_to, 20);
    assert_eq!(h.core.stats().gaps, 1);
    // Sixteen entries past the cursor until the jump is stored: more than a page, so the
    // repair waits for the feed to catch up (here, for the jump), then starts at once.
    assert!(!has_ae(&out), "{out:?}");
    let out = h.local(a.id, LocalResult::Applied);
    assert_eq!(h.core.cursor(0, 2), Some(20));
    assert_eq!(summaries(&out), vec![(2, 1)]);
}

#[test]
fn no_gap_when_the_page_starts_right_after_what_was_received() {
    let (mut h, out) = Harness::opened(config(), vec![vec![9, 0, 0, 0]]);
    let p = only(polls(&out));
    // Trimmed up to the cursor, but nothing we need is missing.
    let out = h.answer(p.id, heads(vec![poll_page(0, 10..=12, 10, 12)]));
    assert_eq!(h.core.stats().gaps, 0);
    assert!(!has_ae(&out), "{out:?}");
    assert_eq!(applied(&out), vec![(0, 0, vec![10, 11, 12], 12)]);
}

// ---------------------------------------------------------------------------------------------
// Anti-entropy
// ---------------------------------------------------------------------------------------------

/// `(first, partitions)` of each summary read in `commands`.
fn summaries(commands: &[Command]) -> Vec<(u16, u16)> {
    locals(commands)
        .iter()
        .filter_map(|(_, op)| match op {
            LocalOp::Summary { first, partitions } => Some((*first, *partitions)),
            _ => None,
        })
        .collect()
}

/// A symbol that never decodes (its count is 2).
fn undecodable() -> Symbol {
    Symbol {
        count: 2,
        sum: 5,
        check: 7,
    }
}

/// Plays a reconciliation round that starts in `commands` (our summary is asked) with
/// [`config`]'s single symbol per round: the summaries differ and the first symbol does not
/// decode, so the partition goes to the bucket-by-bucket comparison, which starts at once if
/// a request slot is free. Returns that output.
fn fall_back_to_compare(h: &mut Harness, commands: &[Command]) -> Vec<Command> {
    let [(summary, LocalOp::Summary { first, partitions })] = &locals(commands)[..] else {
        panic!("{commands:?}")
    };
    let (first, partitions) = (*first, *partitions);
    let out = h.local(*summary, LocalResult::Summary(1));
    let [(reconcile, _, Request::Reconcile { symbols: 1, .. })] = &sends(&out)[..] else {
        panic!("{out:?}")
    };
    let out = h.answer(
        *reconcile,
        Response::Symbols {
            symbols: vec![undecodable()],
        },
    );
    let [(items, LocalOp::Items { .. })] = &locals(&out)[..] else {
        panic!("{out:?}")
    };
    let out = h.local(*items, LocalResult::Items(Vec::new()));
    assert_eq!(partitions, 1);
    assert!(
        h.core.in_flight(0) >= h.config.requests_in_flight_max
            || sends(&out)
                .iter()
                .any(|(_, _, r)| matches!(r, Request::Digest { partition } if *partition == first)),
        "{out:?}"
    );
    out
}

/// A core with a periodic sweep of one partition per second (4 partitions, 4 s interval)
/// whose first round (peer 0, partition 0) has just started and gone to the bucket-by-bucket
/// comparison; returns it with the comparison's remote and local digest command ids.
fn ae_round_started() -> (Harness, CommandId, CommandId) {
    let config = CoreConfig {
        anti_entropy_interval_ms: 4_000,
        ..config()
    };
    let (mut h, commands) = Harness::started(config, vec![vec![0; 4]]);
    assert!(!has_ae(&commands));
    // The peer has no news (it holds each poll, then answers it empty): only the sweep makes
    // news.
    for _ in 0..9 {
        let out = h.run(100);
        assert!(!has_ae(&out), "no sweep before 1 s: {out:?}");
    }
    let out = h.run(100);
    assert_eq!(h.now_ms, 1_000);
    assert_eq!(summaries(&out), vec![(0, 1)]);
    let out = fall_back_to_compare(&mut h, &out);
    let remote: Vec<(CommandId, u16)> = sends(&out)
        .iter()
        .filter_map(|(id, _, r)| match r {
            Request::Digest { partition } => Some((*id, *partition)),
            _ => None,
        })
        .collect();
    let local: Vec<(CommandId, u16)> = locals(&out)
        .iter()
        .filter_map(|(id, op)| match op {
            LocalOp::Digest { partition } => Some((*id, *partition)),
            _ => None,
        })
        .collect();
    assert_eq!(remote.len(), 1, "{out:?}");
    assert_eq!(local.len(), 1, "{out:?}");
    assert_eq!((remote[0].1, local[0].1), (0, 0));
    (h, remote[0].0, local[0].0)
}

/// Answers both digests of a started round so that they differ; returns the remote and local
/// bucket command ids.
fn differing_digests(
    h: &mut Harness,
    remote: CommandId,
    local: CommandId,
) -> (CommandId, CommandId) {
    h.answer(
        remote,
        Response::Digest {
            buckets: vec![1, 2],
        },
    );
    let out = h.local(local, LocalResult::Digest(vec![1, 3]));
    let remote_buckets = only(sends(&out)).0;
    let local_buckets = only(locals(&out)).0;
    (remote_buckets, local_buckets)
}

#[test]
fn equal_digests_end_the_round() {
    for local_first in [false, true] {
        let (mut h, remote, local) = ae_round_started();
        assert!(!h.core.is_idle());
        let digest = vec![11, 22, 33, 44];
        let (first, second) = if local_first {
            (
                h.local(local, LocalResult::Digest(digest.clone())),
                h.answer(remote, Response::Digest { buckets: digest }),
            )
        } else {
            (
                h.answer(
                    remote,
                    Response::Digest {
                        buckets: digest.clone(),
                    },
                ),
                h.local(local, LocalResult::Digest(digest)),
            )
        };
        assert!(!has_ae(&first) && !has_ae(&second), "{first:?} {second:?}");
        assert_eq!(h.core.stats().ae_rounds, 1);
        assert_eq!(h.core.stats().ae_keys, 0);
        assert!(h.core.is_idle());
    }
}

#[test]
fn a_full_round_narrows_to_buckets_then_keys_then_pulls_and_pushes_states() {
    let (mut h, remote, local) = ae_round_started();
    h.answer(
        remote,
        Response::Digest {
            buckets: vec![1, 2, 3, 4],
        },
    );
    let out = h.local(local, LocalResult::Digest(vec![1, 9, 3, 8]));
    // Only the differing buckets, asked of both sides.
    let [(
        remote_buckets,
        0,
        Request::Buckets {
            partition: 0,
            buckets,
        },
    )] = &sends(&out)[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(buckets, &vec![1, 3]);
    let [(
        local_buckets,
        LocalOp::Buckets {
            partition: 0,
            buckets,
        },
    )] = &locals(&out)[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(buckets, &vec![1, 3]);

    // The peer has a (we lack it), b (same), c (differs); we have b, c (differs), d (peer lacks).
    let out = h.answer(
        *remote_buckets,
        Response::Buckets {
            entries: vec![("a".into(), 1), ("b".into(), 2), ("c".into(), 3)],
        },
    );
    assert!(!has_ae(&out), "waits for the local half: {out:?}");
    let out = h.local(
        *local_buckets,
        LocalResult::Buckets(vec![("b".into(), 2), ("c".into(), 4), ("d".into(), 5)]),
    );
    // The peer's differing states are pulled first; nothing is pushed yet.
    let [(pull, 0, Request::States { keys })] = &sends(&out)[..] else {
        panic!("{out:?}")
    };
    assert_eq!(keys, &vec!["a".to_string(), "c".to_string()]);
    assert!(
        locals(&out).is_empty(),
        "the push waits for the pull: {out:?}"
    );

    // Pulled states are merged locally.
    let out = h.answer(
        *pull,
        Response::States {
            states: vec![("a".into(), Some(vec![0xa])), ("c".into(), Some(vec![0xc]))],
        },
    );
    let [(merge, LocalOp::MergeStates { states })] = &locals(&out)[..] else {
        panic!("{out:?}")
    };
    assert_eq!(
        states,
        &vec![("a".to_string(), vec![0xa]), ("c".to_string(), vec![0xc])]
    );
    assert!(sends(&out).is_empty(), "{out:?}");
    assert_eq!(h.core.stats().ae_rounds, 0);
    // After the merge our c still differs from the peer's (we had writes it lacks): it is pushed
    // with d.
    let out = h.local(
        *merge,
        LocalResult::Merged {
            merged: 2,
            hashes: vec![("a".into(), 1), ("c".into(), 7)],
        },
    );
    let [(ours, LocalOp::States { keys })] = &locals(&out)[..] else {
        panic!("{out:?}")
    };
    assert_eq!(keys, &vec!["c".to_string(), "d".to_string()]);
    assert!(sends(&out).is_empty(), "{out:?}");
    // Ours are pushed.
    let out = h.local(
        *ours,
        LocalResult::States(vec![
            ("c".into(), Some(vec![0xc, 1])),
            ("d".into(), Some(vec![0xd])),
        ]),
    );
    let [(push, 0, Request::Push { states })] = &sends(&out)[..] else {
        panic!("{out:?}")
    };
    assert_eq!(
        states,
        &vec![
            ("c".to_string(), vec![0xc, 1]),
            ("d".to_string(), vec![0xd])
        ]
    );
    assert_eq!(h.core.stats().ae_rounds, 0, "the push is still out");
    assert!(!h.core.is_idle());
    let out = h.answer(*push, Response::Pushed);
    assert!(!has_ae(&out), "{out:?}");
    assert_eq!(h.core.stats().ae_rounds, 1);
    assert_eq!(h.core.stats().ae_keys, 4);
    assert!(h.core.is_idle());
}

/// The push half only carries keys whose state still differs from the peer's after the pull:
/// a key the peer simply had newer is settled by merging it, and is not sent back.
#[test]
fn the_push_skips_keys_the_pull_settled_and_pushes_the_others() {
    let (mut h, remote, local) = ae_round_started();
    let (remote_buckets, local_buckets) = differing_digests(&mut h, remote, local);
    // a: the peer's is newer than ours; b: both sides have writes the other lacks; c: only the
    // peer has it; d: only we have it; e: the peer loses it before we pull it.
    h.answer(
        remote_buckets,
        Response::Buckets {
            entries: vec![
                ("a".into(), 1),
                ("b".into(), 2),
                ("c".into(), 3),
                ("e".into(), 4),
            ],
        },
    );
    let out = h.local(
        local_buckets,
        LocalResult::Buckets(vec![
            ("a".into(), 9),
            ("b".into(), 8),
            ("d".into(), 5),
            ("e".into(), 6),
        ]),
    );
    let (pull, _, request) = only(sends(&out));
    assert_eq!(
        request,
        Request::States {
            keys: vec!["a".into(), "b".into(), "c".into(), "e".into()]
        }
    );
    assert!(
        locals(&out).is_empty(),
        "nothing pushed before the pull: {out:?}"
    );
    let out = h.answer(
        pull,
        Response::States {
            states: vec![
                ("a".into(), Some(vec![0xa])),
                ("b".into(), Some(vec![0xb])),
                ("c".into(), Some(vec![0xc])),
                ("e".into(), None),
            ],
        },
    );
    let (merge, _) = only(locals(&out));
    // After the merge a and c hash as the peer's; b does not (it has our writes too).
    let out = h.local(
        merge,
        LocalResult::Merged {
            merged: 3,
            hashes: vec![("a".into(), 1), ("b".into(), 10), ("c".into(), 3)],
        },
    );
    let (ours, op) = only(locals(&out));
    assert_eq!(
        op,
        LocalOp::States {
            keys: vec!["b".into(), "d".into(), "e".into()]
        },
        "a is settled by the pull; b, d and e still differ"
    );
    let out = h.local(
        ours,
        LocalResult::States(vec![
            ("b".into(), Some(vec![0xb, 1])),
            ("d".into(), Some(vec![0xd])),
            ("e".into(), Some(vec![0xe])),
        ]),
    );
    let (push, _, request) = only(sends(&out));
    let Request::Push { states } = request else {
        panic!("{out:?}")
    };
    let pushed: Vec<&str> = states.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(pushed, vec!["b", "d", "e"]);
    h.answer(push, Response::Pushed);
    assert_eq!(h.core.stats().ae_rounds, 1);
    assert_eq!(h.core.stats().ae_keys, 3 + 3);
    assert!(h.core.is_idle());
}

/// When the pull settles every key we would have pushed, the round ends after the merge.
#[test]
fn a_round_whose_pull_settles_every_key_pushes_nothing() {
    let (mut h, remote, local) = ae_round_started();
    let (remote_buckets, local_buckets) = differing_digests(&mut h, remote, local);
    h.answer(
        remote_buckets,
        Response::Buckets {
            entries: vec![("a".into(), 1), ("b".into(), 2)],
        },
    );
    let out = h.local(
        local_buckets,
        LocalResult::Buckets(vec![("a".into(), 5), ("b".into(), 6)]),
    );
    let (pull, _, _) = only(sends(&out));
    let out = h.answer(
        pull,
        Response::States {
            states: vec![("a".into(), Some(vec![1])), ("b".into(), Some(vec![2]))],
        },
    );
    let (merge, _) = only(locals(&out));
    let out = h.local(
        merge,
        LocalResult::Merged {
            merged: 2,
            hashes: vec![("a".into(), 1), ("b".into(), 2)],
        },
    );
    assert!(!has_ae(&out), "nothing left to push: {out:?}");
    assert_eq!(h.core.stats().ae_rounds, 1);
    assert_eq!(h.core.stats().ae_keys, 2);
    assert!(h.core.is_idle());
}

/// With nothing to pull, the push half starts at once.
#[test]
fn a_round_with_nothing_to_pull_pushes_at_once() {
    let (mut h, remote, local) = ae_round_started();
    let (remote_buckets, local_buckets) = differing_digests(&mut h, remote, local);
    h.answer(
        remote_buckets,
        Response::Buckets {
            entries: vec![("a".into(), 1)],
        },
    );
    let out = h.local(
        local_buckets,
        LocalResult::Buckets(vec![("a".into(), 1), ("d".into(), 5)]),
    );
    assert!(sends(&out).is_empty(), "nothing to pull: {out:?}");
    let (ours, op) = only(locals(&out));
    assert_eq!(
        op,
        LocalOp::States {
            keys: vec!["d".into()]
        }
    );
    let out = h.local(
        ours,
        LocalResult::States(vec![("d".into(), Some(vec![0xd]))]),
    );
    let (push, _, _) = only(sends(&out));
    h.answer(push, Response::Pushed);
    assert_eq!(h.core.stats().ae_rounds, 1);
    assert_eq!(h.core.stats().ae_keys, 1);
    assert!(h.core.is_idle());
}

#[test]
fn a_round_with_nothing_to_push_ends_after_the_merge() {
    let (mut h, remote, local) = ae_round_started();
    let (remote_buckets, local_buckets) = differing_digests(&mut h, remote, local);
    h.local(local_buckets, LocalResult::Buckets(vec![("b".into(), 2)]));
    let out = h.answer(
        remote_buckets,
        Response::Buckets {
            entries: vec![("a".into(), 1), ("b".into(), 2)],
        },
    );
    assert!(locals(&out).is_empty(), "nothing of ours differs: {out:?}");
    let (pull, _, _) = sends(&out)[0].clone();
    let out = h.answer(
        pull,
        Response::States {
            states: vec![("a".into(), Some(vec![1]))],
        },
    );
    let (merge, _) = locals(&out)[0].clone();
    assert_eq!(h.core.stats().ae_rounds, 0);
    let out = h.local(
        merge,
        LocalResult::Merged {
            merged: 1,
            hashes: vec![("a".into(), 1)],
        },
    );
    assert!(!has_ae(&out), "{out:?}");
    assert_eq!(h.core.stats().ae_rounds, 1);
    assert!(h.core.is_idle());
}

#[test]
fn a_round_whose_pulled_keys_vanished_ends_without_merging() {
    let (mut h, remote, local) = ae_round_started();
    let (remote_buckets, local_buckets) = differing_digests(&mut h, remote, local);
    h.local(local_buckets, LocalResult::Buckets(vec![]));
    let out = h.answer(
        remote_buckets,
        Response::Buckets {
            entries: vec![("a".into(), 1)],
        },
    );
    let (pull, _, _) = sends(&out)[0].clone();
    // The peer no longer holds it (or could not read it).
    let out = h.answer(
        pull,
        Response::States {
            states: vec![("a".into(), None)],
        },
    );
    assert!(!has_ae(&out), "{out:?}");
    assert_eq!(h.core.stats().ae_rounds, 1);
    assert!(h.core.is_idle());
}

/// A sweep round waits while the peer's feed of its partitions is more than a page behind
/// and catching up (the differences are what the feed is about to deliver: after a cut heals,
/// a round would ship them twice), and starts once the feed has caught up.
#[test]
fn anti_entropy_waits_for_a_feed_that_is_catching_up() {
    let config = CoreConfig {
        anti_entropy_interval_ms: 4_000,
        ..config()
    };
    let (mut h, out) = Harness::opened(config, vec![vec![0; 4]]);
    let p = only(polls(&out));
    // Ten entries of a hundred: ninety behind on partition 0, the sweep's first.
    h.now_ms = 900;
    let out = h.answer(p.id, heads(vec![poll_page(0, 1..=10, 1, 100)]));
    let a = only(applies(&out));
    let out = h.local(a.id, LocalResult::Applied);
    let p = only(polls(&out));
    let out = h.tick(200);
    assert!(
        summaries(&out).is_empty(),
        "the sweep was due at 1 s: {out:?}"
    );
    // The rest arrives and is applied: the round starts with the apply.
    let out = h.answer(p.id, heads(vec![poll_page(0, 11..=100, 1, 100)]));
    let a = only(applies(&out));
    let out = h.local(a.id, LocalResult::Applied);
    assert_eq!(summaries(&out), vec![(0, 1)]);
}

/// ...but not for a feed that does not move on (stuck, or its peer unreachable): after a
/// request timeout without progress, the round starts.
#[test]
fn anti_entropy_does_not_wait_for_a_stuck_feed() {
    let config = CoreConfig {
        anti_entropy_interval_ms: 4_000,
        ..config()
    };
    let (mut h, out) = Harness::opened(config, vec![vec![0; 4]]);
    let p = only(polls(&out));
    h.now_ms = 900;
    let out = h.answer(p.id, heads(vec![poll_page(0, 1..=10, 1, 100)]));
    // The apply never completes. The sweep is due at 1 s and waits from then on...
    let _ = only(applies(&out));
    let out = h.tick(100);
    assert!(summaries(&out).is_empty(), "{out:?}");
    let out = h.tick(1_000);
    assert!(summaries(&out).is_empty(), "{out:?}");
    // ...for a request timeout.
    let out = h.tick(1);
    assert_eq!(summaries(&out), vec![(0, 1)]);
}

#[test]
fn a_gap_found_during_a_round_is_repaired_right_after_it() {
    let (mut h, remote, local) = ae_round_started();
    // A feed gap on partition 3 while partition 0's round is running.
    h.tick(100);
    let out = h.answer_poll(0, vec![poll_page(3, 5..=9, 5, 9)]);
    assert_eq!(h.core.stats().gaps, 1);
    assert!(!has_ae(&out), "one round at a time per peer: {out:?}");
    h.answer(remote, Response::Digest { buckets: vec![1] });
    let out = h.local(local, LocalResult::Digest(vec![1]));
    assert_eq!(summaries(&out), vec![(3, 1)], "{out:?}");
}

#[test]
fn the_sweep_visits_every_partition_of_every_peer_within_the_interval() {
    let interval_ms = 8_000;
    let config = CoreConfig {
        partitions: 8,
        anti_entropy_interval_ms: interval_ms,
        ..pipelined(2)
    };
    let tick_ms = 50;
    let (mut h, commands) = Harness::started(config, vec![vec![0; 8], vec![0; 8], vec![0; 8]]);
    let mut visits: BTreeMap<(PeerId, u16), Vec<u64>> = BTreeMap::new();
    let mut pending = commands;
    while h.now_ms <= 2 * interval_ms + 500 {
        // Answer everything at once (equal summaries); polls are answered by quiet peers in
        // `run`.
        while !pending.is_empty() {
            let mut next = Vec::new();
            for command in pending {
                next.extend(match command {
                    Command::Send { id, peer, request } => match request {
                        Request::Heads { .. } => Vec::new(),
                        Request::Reconcile {
                            first,
                            partitions: 1,
                            summary: 5,
                            ..
                        } => {
                            visits.entry((peer, first)).or_default().push(h.now_ms);
                            h.answer(id, Response::Reconciled)
                        }
                        other => panic!("unexpected {other:?}"),
                    },
                    Command::Local { id, op } => match op {
                        LocalOp::Summary { .. } => h.local(id, LocalResult::Summary(5)),
                        other => panic!("unexpected {other:?}"),
                    },
                    _ => panic!("unknown command"),
                });
            }
            pending = next;
        }
        pending = h.run(tick_ms);
    }
    for peer in 0..3 {
        for partition in 0..8 {
            let times = visits.get(&(peer, partition)).cloned().unwrap_or_default();
            assert!(
                times.first().is_some_and(|t| *t <= interval_ms + tick_ms),
                "peer {peer} partition {partition} first swept at {times:?}"
            );
            // And again within the next interval.
            assert!(
                times.len() >= 2 && times[1] - times[0] <= interval_ms + tick_ms,
                "peer {peer} partition {partition} swept at {times:?}"
            );
        }
    }
    assert_eq!(
        h.core.stats().ae_rounds,
        visits.values().map(|v| v.len() as u64).sum::<u64>()
    );
    assert_eq!(h.core.stats().failures, 0);
}

// ---------------------------------------------------------------------------------------------
// Failures, timeouts, backoff
// ---------------------------------------------------------------------------------------------

#[test]
fn timeouts_back_off_exponentially_for_that_peer_only() {
    let (mut h, commands) = Harness::started(config(), vec![vec![0; 4], vec![0; 4]]);
    // Peer 0 never answers; peer 1 opens a session, holds each poll for its wait and answers
    // it with nothing new.
    h.silent.insert(0);
    let first = opens(&commands).into_iter().find(|p| p.peer == 0).unwrap();
    let peer1_polls = std::cell::Cell::new(0u64);
    // Lets `ms` pass; returns what was sent to peer 0.
    let step = |h: &mut Harness, ms: u64| -> Vec<Command> {
        let out = h.run(ms);
        peer1_polls
            .set(peer1_polls.get() + polls(&out).iter().filter(|p| p.peer == 1).count() as u64);
        out.into_iter()
            .filter(|c| !matches!(c, Command::Send { peer: 1, .. }))
            .collect()
    };
    // Just before the deadline (an opening poll is not held: the request timeout): still
    // waiting.
    assert!(step(&mut h, 999).is_empty());
    assert_eq!(h.core.stats().failures, 0);
    // The deadline: a failure, and no retry before the backoff has passed.
    assert!(step(&mut h, 1).is_empty());
    assert_eq!(h.core.stats().failures, 1);
    let mut expected_backoff = 100;
    let mut last_id = first.id;
    for round in 0..6 {
        assert!(
            step(&mut h, expected_backoff - 1).is_empty(),
            "round {round}: retried before {expected_backoff} ms"
        );
        let retry = step(&mut h, 1);
        assert_eq!(sends(&retry).len(), 1, "round {round}: {retry:?}");
        let p = only(opens(&retry));
        assert_eq!(p.peer, 0);
        last_id = p.id;
        // Let it time out too.
        assert!(step(&mut h, 999).is_empty());
        assert!(step(&mut h, 1).is_empty());
        assert_eq!(h.core.stats().failures, 2 + round);
        expected_backoff = (expected_backoff * 2).min(800);
    }
    assert_eq!(expected_backoff, 800, "capped at retry_backoff_max_ms");
    assert!(
        peer1_polls.get() >= h.now_ms / 500,
        "peer 1 kept being polled: {} polls in {} ms",
        peer1_polls.get(),
        h.now_ms
    );
    // A late answer to a timed-out request is ignored, even if it has news.
    let requests = h.core.stats().requests;
    let late = h.answer(last_id, opened(77, vec![poll_page(0, 1..=9, 1, 9)]));
    assert!(late.is_empty(), "{late:?}");
    assert_eq!(h.core.backlog(0), 0);
    assert_eq!(h.core.cursor(0, 0), Some(0));
    assert_eq!(h.core.stats().requests, requests);
    // A success resets the backoff.
    let retry = step(&mut h, 800);
    only(opens(&retry));
    let next = h.answer_open(0, Vec::new());
    let p = only(polls(&next));
    assert_eq!((p.peer, p.session), (0, h.session(0)), "polled at once");
    h.unreachable(p.id);
    assert!(step(&mut h, 99).is_empty());
    assert_eq!(
        opens(&step(&mut h, 1)).len(),
        1,
        "back to the first backoff step"
    );
    assert_eq!(h.core.stats().failures, 8);
}

#[test]
fn requests_to_other_peers_continue_during_a_backoff() {
    let (mut h, _) = Harness::started(config(), vec![vec![0; 4], vec![0; 4]]);
    let open = h.open_out(0);
    let out = h.answer(
        open.id,
        Response::Failed {
            reason: "store down".into(),
        },
    );
    assert!(out.is_empty());
    assert_eq!(h.core.stats().failures, 1);
    // Peer 1 has news: it is applied and polled while peer 0 backs off.
    let out = h.answer_open(1, vec![poll_page(0, 1..=2, 1, 2)]);
    assert_eq!(applied(&out), vec![(1, 0, vec![1, 2], 2)]);
    assert_eq!(only(polls(&out)).peer, 1);
    assert!(sends(&out).iter().all(|(_, p, _)| *p == 1), "{out:?}");
    let out = h.tick(50);
    assert!(sends(&out).iter().all(|(_, p, _)| *p == 1), "{out:?}");
    let out = h.tick(50);
    assert_eq!(opens(&out).iter().filter(|p| p.peer == 0).count(), 1);
}

/// A failed poll (the peer's store failed, or the transport) may have lost entries the peer
/// counted as sent: after the backoff, a new session opens at what was received.
#[test]
fn failed_polls_back_off_and_open_a_new_session_at_what_was_received() {
    for how in ["failed", "unreachable"] {
        let (mut h, out) = Harness::opened(config(), vec![vec![4, 0, 0, 0]]);
        let p = only(polls(&out));
        let out = h.answer(p.id, heads(vec![poll_page(0, 5..=6, 1, 6)]));
        let p = only(polls(&out));
        let out = match how {
            "failed" => h.answer(
                p.id,
                Response::Failed {
                    reason: "busy".into(),
                },
            ),
            _ => h.unreachable(p.id),
        };
        assert!(sends(&out).is_empty(), "{how}: {out:?}");
        assert_eq!(h.core.stats().failures, 1, "{how}");
        assert!(h.tick(99).is_empty(), "{how}: retried too early");
        let open = only(polls(&h.tick(1)));
        assert_eq!((open.session, open.after), (0, vec![6, 0, 0, 0]), "{how}");
    }
}

#[test]
fn wrong_kind_answers_are_failures() {
    let (mut h, out) = Harness::opened(config(), vec![vec![0; 4]]);
    let p = only(polls(&out));
    let out = h.answer(p.id, Response::Pushed);
    assert!(out.is_empty());
    assert_eq!(h.core.stats().failures, 1);
    assert!(h.tick(99).is_empty());
    let retry = h.tick(1);
    let open = only(opens(&retry));
    // An opening poll answered with something else: another request's answer, a poll's, or
    // one naming no session.
    let out = h.answer(open.id, Response::Digest { buckets: vec![1] });
    assert!(out.is_empty());
    assert_eq!(h.core.stats().failures, 2);
    let mut backoff = 200;
    for (n, answer) in [
        heads(Vec::new()),
        Response::UnknownSession,
        Response::Duplicate,
    ]
    .into_iter()
    .enumerate()
    {
        let open = only(opens(&h.tick(backoff)));
        assert!(h.answer(open.id, answer).is_empty());
        assert_eq!(h.core.stats().failures, 3 + n as u64);
        backoff = (backoff * 2).min(800);
    }
    assert_eq!(h.core.cursor(0, 0), Some(0));
    assert_eq!(h.core.stats().sessions, 1);
}

#[test]
fn repeated_wrong_kind_answers_back_off_exponentially() {
    let (mut h, commands) = Harness::started(config(), vec![vec![0; 4]]);
    let mut id = only(opens(&commands)).id;
    let mut expected = 100;
    for round in 0..4 {
        assert!(h.answer(id, Response::Pushed).is_empty());
        assert!(
            polls(&h.tick(expected - 1)).is_empty(),
            "round {round}: retried before {expected} ms"
        );
        let retry = h.tick(1);
        assert_eq!(polls(&retry).len(), 1, "round {round}: {retry:?}");
        id = polls(&retry)[0].id;
        expected = (expected * 2).min(800);
    }
}

#[test]
fn duplicate_late_and_unknown_answers_are_ignored() {
    let (mut h, out) = Harness::opened(config(), vec![vec![0; 4]]);
    let first = only(polls(&out));
    let out = h.answer(first.id, heads(vec![poll_page(0, 1..=3, 1, 3)]));
    let a = only(applies(&out));
    // The poll's answer again, with news.
    assert!(h
        .answer(first.id, heads(vec![poll_page(1, 1..=2, 1, 2)]))
        .is_empty());
    assert_eq!(h.core.backlog(0), 3);
    h.local(a.id, LocalResult::Applied);
    assert_eq!(h.core.cursor(0, 0), Some(3));
    let stats = h.core.stats().clone();
    // The same outcome again, and answers to ids never issued.
    assert!(h.local(a.id, LocalResult::Applied).is_empty());
    assert!(h
        .answer(999_999, heads(vec![poll_page(0, 4..=9, 1, 9)]))
        .is_empty());
    assert!(h.answer(999_996, Response::Duplicate).is_empty());
    assert!(h
        .handle(Event::Local {
            id: 999_998,
            result: Ok(LocalResult::Applied)
        })
        .is_empty());
    assert!(h.unreachable(999_997).is_empty());
    assert_eq!(h.core.stats(), &stats);
    assert_eq!(h.core.cursor(0, 0), Some(3));
    assert_eq!(h.core.backlog(0), 0);
    assert!(h.core.is_idle());
}

// ---------------------------------------------------------------------------------------------
// Restart, lag
// ---------------------------------------------------------------------------------------------

#[test]
fn a_restart_reloads_the_cursors_and_forgets_work_in_flight() {
    let config = CoreConfig {
        anti_entropy_interval_ms: 4_000,
        ..pipelined(2)
    };
    let (mut h, out) = Harness::opened(config, vec![vec![0; 4]]);
    let [p, old_poll] = &polls(&out)[..] else {
        panic!("{out:?}")
    };
    let out = h.answer(p.id, heads(vec![poll_page(0, 1..=2, 1, 5)]));
    let a = only(applies(&out));
    // Crash: the page was applied and the cursor stored (at 2), but the outcome was lost.
    let start = h.handle(Event::Start);
    let [(load, LocalOp::LoadCursors)] = locals(&start)[..] else {
        panic!("{start:?}")
    };
    assert!(sends(&start).is_empty());
    assert!(!h.core.is_idle());
    // Answers to the old incarnation's work are ignored.
    assert!(h.local(a.id, LocalResult::Applied).is_empty());
    assert!(h
        .answer(old_poll.id, heads(vec![poll_page(1, 1..=3, 1, 3)]))
        .is_empty());
    assert!(
        h.tick(1_000).is_empty(),
        "nothing before the cursors are back"
    );
    let out = h.local(load, LocalResult::Cursors(vec![vec![2, 0, 0, 0]]));
    assert_eq!(h.core.cursor(0, 0), Some(2));
    assert_eq!(only(opens(&out)).after, vec![2, 0, 0, 0]);
    let out = h.answer_open(0, vec![poll_page(0, 3..=5, 1, 5)]);
    h.local(only(applies(&out)).id, LocalResult::Applied);
    assert_eq!(h.core.cursor(0, 0), Some(5));
    assert_eq!(h.core.cursor(0, 1), Some(0));
}

#[test]
fn a_restart_abandons_an_anti_entropy_round() {
    let (mut h, remote, local) = ae_round_started();
    let start = h.handle(Event::Start);
    let (load, _) = locals(&start)[0].clone();
    h.local(load, LocalResult::Cursors(vec![vec![0; 4]]));
    h.answer(remote, Response::Digest { buckets: vec![1] });
    let out = h.local(local, LocalResult::Digest(vec![2]));
    assert!(!has_ae(&out), "the old round is gone: {out:?}");
    assert_eq!(h.core.stats().ae_rounds, 0);
}

#[test]
fn lag_is_apply_time_minus_the_writes_physical_time() {
    let (mut h, _) = Harness::started(config(), vec![vec![0; 4], vec![0; 4]]);
    h.now_ms = 10_000;
    let out = h.answer_open(
        0,
        vec![Page {
            partition: 0,
            // The third was written by a region whose clock runs ahead of ours.
            entries: vec![entry(1, 9_000), entry(2, 9_500), entry(3, 20_000)],
            first_seq: 1,
            last_seq: 3,
        }],
    );
    h.answer_open(1, Vec::new());
    let a = only(applies(&out));
    assert_eq!(h.core.lag_ms(0).unwrap().len(), 0, "recorded when applied");
    // Applied 200 ms after the page arrived.
    h.now_ms = 10_200;
    h.local(a.id, LocalResult::Applied);
    let lag = h.core.lag_ms(0).unwrap();
    assert_eq!(lag.len(), 3);
    assert_eq!(lag.min(), 1, "a write from the future counts as 1 ms");
    assert!(lag.equivalent(lag.max(), 1_200), "max {}", lag.max());
    assert_eq!(lag.count_at(700), 1);
    assert_eq!(h.core.lag_ms(1).unwrap().len(), 0);
    assert!(h.core.lag_ms(2).is_none());
}

// ---------------------------------------------------------------------------------------------
// Regressions
// ---------------------------------------------------------------------------------------------

/// A round abandoned while one of its remote requests was still out must not keep counting that
/// request against the peer's in-flight bound forever.
#[test]
fn an_abandoned_round_does_not_leak_in_flight_slots() {
    let config = CoreConfig {
        requests_in_flight_max: 2,
        anti_entropy_interval_ms: 4_000,
        ..config()
    };
    let (mut h, commands) = Harness::started(config, vec![vec![0; 4]]);
    let mut out = commands;
    // Each round: our local digest read fails while the remote digest is out; the remote
    // answer then arrives.
    for _ in 0..2 {
        let (remote, local) = next_round(&mut h, out);
        h.handle(Event::Local {
            id: local,
            result: Err("store down".into()),
        });
        h.answer(remote, Response::Digest { buckets: vec![1] });
        assert_eq!(h.core.in_flight(0), 1, "only the held poll");
        out = Vec::new();
    }
    assert!(
        polls_in_2s(&mut h) > 0,
        "the peer is never asked again: in-flight slots leaked"
    );
}

/// Lets time pass (quiet peers) until a bucket-by-bucket comparison starts (a reconciliation
/// that starts meanwhile goes there, see [`fall_back_to_compare`]); returns its remote and
/// local digest command ids.
fn next_round(h: &mut Harness, mut out: Vec<Command>) -> (CommandId, CommandId) {
    let deadline = h.now_ms + 60_000;
    loop {
        if !summaries(&out).is_empty() {
            out = fall_back_to_compare(h, &out);
        }
        let remote = sends(&out)
            .iter()
            .find_map(|(id, _, r)| matches!(r, Request::Digest { .. }).then_some(*id));
        let local = locals(&out)
            .iter()
            .find_map(|(id, op)| matches!(op, LocalOp::Digest { .. }).then_some(*id));
        if let (Some(r), Some(l)) = (remote, local) {
            return (r, l);
        }
        assert!(h.now_ms < deadline, "no anti-entropy round starts");
        out = h.run(50);
    }
}

/// Lets 2 s pass with quiet peers; returns how many polls were sent.
fn polls_in_2s(h: &mut Harness) -> usize {
    polls(&h.run(2_000)).len()
}

/// A round that fails is retried on the same partition after the backoff, and answers to the
/// failed round's requests do not count for the new one.
#[test]
fn a_failed_round_is_retried_and_its_late_answers_are_ignored() {
    let config = CoreConfig {
        anti_entropy_interval_ms: 4_000,
        ..config()
    };
    let (mut h, commands) = Harness::started(config, vec![vec![0; 4]]);
    let (old_remote, old_local) = next_round(&mut h, commands);
    let out = h.handle(Event::Local {
        id: old_local,
        result: Err("store down".into()),
    });
    assert!(!has_ae(&out));
    assert_eq!(h.core.stats().failures, 1);
    assert_eq!(
        h.core.in_flight(0),
        2,
        "the held poll and the remote digest are out"
    );
    assert!(h.tick(99).is_empty(), "retried before the backoff");
    // After the backoff, partition 0 again.
    let retry = h.tick(1);
    let digests: Vec<(CommandId, u16)> = sends(&retry)
        .into_iter()
        .filter_map(|(id, _, r)| match r {
            Request::Digest { partition } => Some((id, partition)),
            _ => None,
        })
        .collect();
    let [(new_remote, 0)] = digests[..] else {
        panic!("{retry:?}")
    };
    let [(new_local, LocalOp::Digest { partition: 0 })] = locals(&retry)[..] else {
        panic!("{retry:?}")
    };
    assert!(polls(&retry).is_empty(), "the poll is still out: {retry:?}");
    // The old round's answer arrives: it frees its slot and nothing else.
    let out = h.answer(old_remote, Response::Digest { buckets: vec![7] });
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(h.core.in_flight(0), 2, "the poll and the new remote digest");
    let out = h.local(new_local, LocalResult::Digest(vec![7]));
    assert!(
        out.is_empty(),
        "still waiting for the new remote digest: {out:?}"
    );
    assert_eq!(h.core.stats().ae_rounds, 0);
    let out = h.answer(new_remote, Response::Digest { buckets: vec![7] });
    assert!(!has_ae(&out));
    assert_eq!(h.core.stats().ae_rounds, 1);
    assert_eq!(h.core.in_flight(0), 1, "only the poll");
}

/// An exchange that fails half-way (its pull, or its push after the pull) ends its round and
/// leaks no in-flight slot; a failed pull sends no push.
#[test]
fn a_failed_pull_does_not_leak_the_push_slot() {
    let config = CoreConfig {
        requests_in_flight_max: 2,
        anti_entropy_interval_ms: 4_000,
        ..config()
    };
    let (mut h, commands) = Harness::started(config, vec![vec![0; 4]]);
    let mut out = commands;
    for fail_the_push in [false, true, false] {
        let (remote, local) = next_round(&mut h, out);
        let (remote_buckets, local_buckets) = differing_digests(&mut h, remote, local);
        h.answer(
            remote_buckets,
            Response::Buckets {
                entries: vec![("a".into(), 1)],
            },
        );
        let step = h.local(local_buckets, LocalResult::Buckets(vec![("b".into(), 2)]));
        let (pull, _, request) = only(sends(&step));
        assert!(matches!(request, Request::States { .. }), "{step:?}");
        assert!(
            locals(&step).is_empty(),
            "the push waits for the pull: {step:?}"
        );
        if fail_the_push {
            let step = h.answer(
                pull,
                Response::States {
                    states: vec![("a".into(), Some(vec![1]))],
                },
            );
            let (merge, _) = only(locals(&step));
            let step = h.local(
                merge,
                LocalResult::Merged {
                    merged: 1,
                    hashes: vec![("a".into(), 1)],
                },
            );
            let (ours, _) = only(locals(&step));
            let step = h.local(ours, LocalResult::States(vec![("b".into(), Some(vec![2]))]));
            let (push, _, request) = only(sends(&step));
            assert!(matches!(request, Request::Push { .. }), "{step:?}");
            h.unreachable(push);
        } else {
            // The pull fails: no push follows.
            let step = h.unreachable(pull);
            assert!(!has_ae(&step), "{step:?}");
        }
        assert_eq!(h.core.in_flight(0), 1, "only the held poll");
        out = Vec::new();
    }
    assert_eq!(h.core.stats().ae_rounds, 0);
    assert_eq!(h.core.stats().failures, 3);
    assert!(
        polls_in_2s(&mut h) > 0,
        "the peer is never asked again: in-flight slots leaked"
    );
}

/// Later steps of a round must respect the in-flight bound too: here the remote digest answer
/// frees the only slot, a heads poll takes it, and the local digest arrives afterwards.
#[test]
fn later_round_steps_respect_the_in_flight_bound() {
    let config = CoreConfig {
        requests_in_flight_max: 1,
        anti_entropy_interval_ms: 4_000,
        ..config()
    };
    let (mut h, commands) = Harness::started(config, vec![vec![0; 4]]);
    let (remote, local) = next_round(&mut h, commands);
    let out = h.answer(remote, Response::Digest { buckets: vec![1] });
    let poll = only(polls(&out));
    let out = h.local(local, LocalResult::Digest(vec![2]));
    assert!(
        sends(&out).is_empty(),
        "a second request while one is in flight with requests_in_flight_max = 1: {out:?}"
    );
    // Once the poll is answered, the round goes on (and the next poll waits for the slot).
    let out = h.answer(poll.id, heads(Vec::new()));
    let (_, _, request) = only(sends(&out));
    assert!(matches!(request, Request::Buckets { .. }), "{out:?}");
}

/// With one request in flight per peer, the poll (held by the peer, and sent again as soon as
/// it is answered) must not keep anti-entropy from ever running.
#[test]
fn a_single_in_flight_slot_is_shared_by_polls_and_anti_entropy() {
    let config = CoreConfig {
        requests_in_flight_max: 1,
        anti_entropy_interval_ms: 4_000,
        ..config()
    };
    let (mut h, _) = Harness::started(config, vec![vec![0; 4]]);
    // The first sweep is due at 1 s; the poll out then is answered at 1 s (after its wait),
    // and the round reads our summary before any poll takes the slot again.
    let mut out = Vec::new();
    while summaries(&out).is_empty() {
        assert!(h.now_ms < 2_000, "no round starts");
        out = h.run(50);
    }
    assert_eq!(h.now_ms, 1_000, "the sweep due at 1 s started late");
    assert_eq!(h.core.in_flight(0), 0, "no poll took the slot: {out:?}");
    let [(summary, _)] = locals(&out)[..] else {
        panic!("{out:?}")
    };
    let out = h.local(summary, LocalResult::Summary(5));
    let (reconcile, _, request) = only(sends(&out));
    assert!(matches!(request, Request::Reconcile { .. }), "{out:?}");
    assert_eq!(h.core.in_flight(0), 1);
    // And polls resume as soon as the round frees the slot.
    let out = h.answer(reconcile, Response::Reconciled);
    assert_eq!(only(polls(&out)).session, h.session(0));
    assert_eq!(h.core.stats().ae_rounds, 1);
    assert_eq!(h.core.stats().failures, 0);
}

// ---------------------------------------------------------------------------------------------
// The serving side: poll sessions
// ---------------------------------------------------------------------------------------------

/// Polls a future that cannot wait (every memory store operation completes at once).
fn ready<F: Future>(future: F) -> F::Output {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("memory store operations complete at once"),
    }
}

/// A memory store with `partitions` partitions keeping `feed_entries_max` entries each.
fn store(partitions: u16, feed_entries_max: usize) -> Arc<MemoryBackend> {
    Arc::new(MemoryBackend::new(
        Layout::new(partitions, 4, 1 << 20, feed_entries_max).unwrap(),
    ))
}

/// A key of `partition`.
fn key_in(store: &MemoryBackend, partition: u16) -> Key {
    (0..)
        .map(|i| Key::new(format!("c:{i}")).unwrap())
        .find(|k| store.layout().partition_of(k) == partition)
        .unwrap()
}

/// Increments a counter in `partition` at `hlc_ms`; returns the feed sequence number.
fn write_in(store: &MemoryBackend, partition: u16, hlc_ms: u64) -> u64 {
    let receipt = ready(store.apply(LocalWrite {
        key: key_in(store, partition),
        op: Op::Counter(CounterOp::inc(1)),
        actor: ActorId::new(1),
        hlc: Hlc::new(hlc_ms, 0),
        expect: Expect::Any,
    }))
    .unwrap();
    receipt.seq.unwrap()
}

fn open_request(after: Vec<u64>, limit: u32) -> Request {
    Request::Heads {
        session: 0,
        after,
        poll: 0,
        limit,
        wait_ms: 0,
    }
}

fn poll_request(session: u64, poll: u64, limit: u32) -> Request {
    Request::Heads {
        session,
        after: Vec::new(),
        poll,
        limit,
        wait_ms: 500,
    }
}

/// `(partition, seqs)` of each page of a poll's answer.
fn shipped(response: &Response) -> Vec<(u16, Vec<u64>)> {
    let (Response::Heads { pages } | Response::Opened { pages, .. }) = response else {
        panic!("not a poll's answer: {response:?}")
    };
    pages
        .iter()
        .map(|p| (p.partition, p.entries.iter().map(|e| e.seq).collect()))
        .collect()
}

/// Opens a session at `after`; returns its id.
fn open(server: &Server<MemoryBackend>, after: Vec<u64>) -> u64 {
    let Response::Opened { session, .. } = ready(server.serve(&open_request(after, 100))) else {
        panic!()
    };
    session
}

/// Several polls of one session waiting at the peer: a write is sent in one answer, whichever
/// poll is asked first; the others have nothing new.
#[test]
fn a_session_sends_each_entry_once_whichever_of_its_polls_asks() {
    let store = store(2, 100);
    let server = Server::new(Arc::clone(&store), ServeLimits::default(), 1);
    let session = open(&server, vec![0, 0]);
    let polls: Vec<Request> = (1..=3).map(|n| poll_request(session, n, 100)).collect();
    for poll in &polls {
        assert!(ready(server.serve(poll)).is_empty_poll(), "held");
    }
    for _ in 0..3 {
        write_in(&store, 0, 1);
    }
    write_in(&store, 1, 1);
    let answers: Vec<Response> = polls.iter().map(|p| ready(server.serve_held(p))).collect();
    assert_eq!(shipped(&answers[0]).len(), 2, "{:?}", answers[0]);
    let mut all: Vec<(u16, Vec<u64>)> = shipped(&answers[0]);
    all.sort();
    assert_eq!(all, vec![(0, vec![1, 2, 3]), (1, vec![1])]);
    assert!(answers[1].is_empty_poll() && answers[2].is_empty_poll());
    // The next write goes to the next poll asked, alone.
    write_in(&store, 0, 2);
    assert_eq!(
        shipped(&ready(server.serve_held(&polls[2]))),
        vec![(0, vec![4])]
    );
    assert!(ready(server.serve_held(&polls[1])).is_empty_poll());
    // Another session (another puller) gets everything after its own cursors, at once.
    let answer = ready(server.serve(&open_request(vec![2, 0], 100)));
    let mut got = shipped(&answer);
    got.sort();
    assert_eq!(got, vec![(0, vec![3, 4]), (1, vec![1])]);
}

/// An opening poll is answered at once with what follows its cursors; `u64::MAX` asks
/// nothing of a partition.
#[test]
fn an_opening_poll_is_answered_with_what_follows_its_cursors() {
    let store = store(2, 100);
    for _ in 0..3 {
        write_in(&store, 0, 1);
    }
    write_in(&store, 1, 1);
    let server = Server::new(Arc::clone(&store), ServeLimits::default(), 1);
    let response = ready(server.serve(&open_request(vec![1, u64::MAX], 100)));
    let Response::Opened { session, pages } = &response else {
        panic!("{response:?}")
    };
    assert_eq!(shipped(&response), vec![(0, vec![2, 3])]);
    assert_eq!((pages[0].first_seq, pages[0].last_seq), (1, 3));
    write_in(&store, 1, 1);
    assert!(ready(server.serve(&poll_request(*session, 1, 100))).is_empty_poll());
}

/// The page limit spreads a backlog over several answers; none repeats another.
#[test]
fn a_backlog_is_spread_over_answers_without_repeats() {
    let store = store(2, 100);
    for _ in 0..5 {
        write_in(&store, 0, 1);
        write_in(&store, 1, 1);
    }
    let server = Server::new(Arc::clone(&store), ServeLimits::default(), 1);
    let opened = ready(server.serve(&open_request(vec![0, 0], 4)));
    let Response::Opened { session, .. } = opened else {
        panic!("{opened:?}")
    };
    let mut seen: Vec<(u16, u64)> = Vec::new();
    for n in 0..=3 {
        let answer = if n == 0 {
            opened.clone()
        } else {
            ready(server.serve(&poll_request(session, n, 4)))
        };
        let pages = shipped(&answer);
        let count: usize = pages.iter().map(|(_, s)| s.len()).sum();
        assert_eq!(count, [4, 4, 2, 0][n as usize], "{answer:?}");
        for (partition, seqs) in pages {
            seen.extend(seqs.into_iter().map(|s| (partition, s)));
        }
    }
    seen.sort();
    let expected: Vec<(u16, u64)> = (0..2).flat_map(|p| (1..=5).map(move |s| (p, s))).collect();
    assert_eq!(seen, expected);
}

#[test]
fn a_poll_number_seen_before_is_answered_as_a_duplicate() {
    let store = store(2, 100);
    let server = Server::new(Arc::clone(&store), ServeLimits::default(), 1);
    let session = open(&server, vec![0, 0]);
    let poll = poll_request(session, 1, 100);
    assert!(ready(server.serve(&poll)).is_empty_poll());
    write_in(&store, 0, 1);
    assert_eq!(ready(server.serve(&poll)), Response::Duplicate);
    // Asking again for a held poll is not a duplicate.
    assert_eq!(
        shipped(&ready(server.serve_held(&poll))),
        vec![(0, vec![1])]
    );
    assert_eq!(
        ready(server.serve(&poll_request(session, 0, 100))),
        Response::Duplicate
    );
    // Numbers far older than the newest ones count as seen.
    for n in 2..=100 {
        ready(server.serve(&poll_request(session, n, 100)));
    }
    assert_eq!(
        ready(server.serve(&poll_request(session, 20, 100))),
        Response::Duplicate
    );
    assert!(ready(server.serve(&poll_request(session, 101, 100))).is_empty_poll());
}

/// A session the server does not know (it restarted, or forgot it) is answered at once as
/// such (not an empty poll: a runtime must not hold it).
#[test]
fn an_unknown_session_is_answered_at_once() {
    let store = store(2, 100);
    let server = Server::new(Arc::clone(&store), ServeLimits::default(), 1);
    let session = open(&server, vec![0, 0]);
    let restarted = Server::new(Arc::clone(&store), ServeLimits::default(), 1 << 32);
    let answer = ready(restarted.serve(&poll_request(session, 1, 100)));
    assert_eq!(answer, Response::UnknownSession);
    assert!(!answer.is_empty_poll());
    assert_ne!(open(&restarted, vec![0, 0]), session, "ids do not repeat");
}

#[test]
fn the_least_recently_used_session_is_forgotten_beyond_sessions_max() {
    let store = store(2, 100);
    let limits = ServeLimits {
        sessions_max: 2,
        ..ServeLimits::default()
    };
    let server = Server::new(Arc::clone(&store), limits, 1);
    let first = open(&server, vec![0, 0]);
    let second = open(&server, vec![0, 0]);
    assert!(ready(server.serve(&poll_request(first, 1, 100))).is_empty_poll());
    let third = open(&server, vec![0, 0]);
    assert_eq!(server.sessions(), 2);
    assert_eq!(
        ready(server.serve(&poll_request(second, 1, 100))),
        Response::UnknownSession
    );
    assert!(ready(server.serve(&poll_request(first, 2, 100))).is_empty_poll());
    assert!(ready(server.serve(&poll_request(third, 1, 100))).is_empty_poll());
}

/// A feed trimmed past the session's position: the page tells where it resumes (with no
/// entries when nothing is left), and the session moves past the gap.
#[test]
fn a_trimmed_feed_gives_a_page_that_tells_where_it_resumes() {
    let store = store(1, 100);
    for _ in 0..5 {
        write_in(&store, 0, 1);
    }
    ready(store.trim_feed(0, 5)).unwrap();
    let server = Server::new(Arc::clone(&store), ServeLimits::default(), 1);
    let response = ready(server.serve(&open_request(vec![2], 100)));
    let Response::Opened { session, pages } = &response else {
        panic!("{response:?}")
    };
    assert_eq!(
        pages,
        &vec![Page {
            partition: 0,
            entries: vec![],
            first_seq: 6,
            last_seq: 5
        }]
    );
    assert!(ready(server.serve(&poll_request(*session, 1, 100))).is_empty_poll());
    write_in(&store, 0, 1);
    assert_eq!(
        shipped(&ready(server.serve(&poll_request(*session, 2, 100)))),
        vec![(0, vec![6])]
    );
}

// ---------------------------------------------------------------------------------------------
// The whole pull loop: a core pulling from a server over 50 ms links
// ---------------------------------------------------------------------------------------------

/// What travels or fires in [`pull_loop`].
enum Ev {
    Request { id: CommandId, request: Request },
    Response { id: CommandId, response: Response },
    Write,
    Tick,
    Deadline { parked: u64 },
}

/// What [`pull_loop`] measured.
#[derive(Debug)]
struct Pulled {
    written: u64,
    /// Entries carried by answers that reached the puller.
    shipped: u64,
    applied: u64,
    /// Of the entries written from `measured_from_ms` on.
    lag_ms_p99: u64,
    lag_ms_max: u64,
    caught_up: bool,
}

/// One region's core pulling from one peer's [`Server`] over links of `one_way_ms` each way
/// (no loss, no reordering), while the peer writes once every `gap_ms` from 0.5 s to 3.5 s
/// (keys spread over 4 partitions); the puller applies to its own memory store and is ticked
/// every 5 ms. Lag is measured from 1 s on: when writes start after a quiet spell, the first
/// few take every waiting poll at once, and the writes right after them wait up to a round
/// trip for polls to come back (as every write could with a single poll); from then on the
/// polls keep arriving spread out.
fn pull_loop(polls_per_peer: usize, one_way_ms: u64, gap_ms: u64) -> Pulled {
    let peer_store = store(4, 100_000);
    let our_store = store(4, 100_000);
    let server = Server::new(Arc::clone(&peer_store), ServeLimits::default(), 1);
    let config = CoreConfig {
        partitions: 4,
        polls_per_peer,
        ..CoreConfig::default()
    };
    let names = vec!["peer".to_string()];
    let mut core = ReplicatorCore::new(config, "self", &names);
    let mut queue: BTreeMap<(u64, u64), Ev> = BTreeMap::new();
    let mut seq = 0u64;
    let mut at = |queue: &mut BTreeMap<(u64, u64), Ev>, t: u64, ev: Ev| {
        seq += 1;
        queue.insert((t, seq), ev);
    };
    let end_writes_ms = 3_500;
    let end_ms = end_writes_ms + 2_000;
    let measured_from_ms = 1_000;
    at(&mut queue, 0, Ev::Tick);
    at(&mut queue, 500, Ev::Write);
    let mut parked: Vec<(u64, CommandId, Request)> = Vec::new();
    let mut parked_seq = 0u64;
    let (mut written, mut shipped, mut writes) = (0u64, 0u64, 0u64);
    let mut lags_ms: Vec<u64> = Vec::new();
    let mut events = vec![Event::Start];
    let mut now = 0u64;
    loop {
        // The puller handles its events; local operations complete at once.
        while let Some(event) = events.pop() {
            for command in core.handle(now, event) {
                match command {
                    Command::Local { id, op } => events.push(Event::Local {
                        id,
                        result: ready(execute(our_store.as_ref(), &names, op)),
                    }),
                    Command::Send { id, request, .. } => {
                        at(&mut queue, now + one_way_ms, Ev::Request { id, request })
                    }
                    _ => panic!("unknown command"),
                }
            }
        }
        let Some(((t, _), ev)) = queue.pop_first() else {
            break;
        };
        now = t;
        if now > end_ms {
            break;
        }
        match ev {
            Ev::Tick => {
                events.push(Event::Tick);
                at(&mut queue, now + 5, Ev::Tick);
            }
            Ev::Write => {
                write_in(&peer_store, (writes % 4) as u16, now);
                writes += 1;
                written += 1;
                let held = std::mem::take(&mut parked);
                for (p, id, request) in held {
                    let response = ready(server.serve_held(&request));
                    if response.is_empty_poll() {
                        parked.push((p, id, request));
                    } else {
                        at(&mut queue, now + one_way_ms, Ev::Response { id, response });
                    }
                }
                if now + gap_ms < end_writes_ms {
                    at(&mut queue, now + gap_ms, Ev::Write);
                }
            }
            Ev::Request { id, request } => {
                let response = ready(server.serve(&request));
                let wait_ms = match &request {
                    Request::Heads { wait_ms, .. } => u64::from(*wait_ms),
                    _ => 0,
                };
                if wait_ms > 0 && response.is_empty_poll() {
                    parked_seq += 1;
                    parked.push((parked_seq, id, request));
                    at(
                        &mut queue,
                        now + wait_ms,
                        Ev::Deadline { parked: parked_seq },
                    );
                } else {
                    at(&mut queue, now + one_way_ms, Ev::Response { id, response });
                }
            }
            Ev::Deadline { parked: p } => {
                if let Some(i) = parked.iter().position(|(q, _, _)| *q == p) {
                    let (_, id, request) = parked.remove(i);
                    let response = ready(server.serve_held(&request));
                    at(&mut queue, now + one_way_ms, Ev::Response { id, response });
                }
            }
            Ev::Response { id, response } => {
                if let Response::Heads { pages } | Response::Opened { pages, .. } = &response {
                    for e in pages.iter().flat_map(|p| &p.entries) {
                        shipped += 1;
                        // Applied on arrival: local operations complete at once.
                        if e.hlc.physical_ms() >= measured_from_ms {
                            lags_ms.push(now - e.hlc.physical_ms());
                        }
                    }
                }
                events.push(Event::Remote {
                    id,
                    result: Ok(response),
                });
            }
        }
    }
    lags_ms.sort_unstable();
    let caught_up = (0..4).all(|p| {
        core.cursor(0, p)
            == Some(
                ready(peer_store.read_feed(p, u64::MAX, 1))
                    .unwrap()
                    .last_seq,
            )
    });
    Pulled {
        written,
        shipped,
        applied: core.stats().entries_applied,
        lag_ms_p99: lags_ms[lags_ms.len() * 99 / 100],
        lag_ms_max: lags_ms[lags_ms.len() - 1],
        caught_up,
    }
}

/// With one poll out, a write made while the answer travels back and the next poll travels
/// out waits for that poll: lag reaches two to three one-way latencies. With several polls out, one
/// is always waiting at the peer: lag stays within one one-way latency plus the spacing of
/// the polls (round trip / polls). Either way each entry is shipped once.
#[test]
fn pipelined_polls_keep_lag_near_one_one_way_latency_and_ship_each_entry_once() {
    for gap_ms in [7, 37] {
        let single = pull_loop(1, 50, gap_ms);
        assert!(single.caught_up, "{single:?}");
        assert_eq!(single.shipped, single.written, "{single:?}");
        assert_eq!(single.applied, single.written, "{single:?}");
        assert!(single.lag_ms_max > 100, "gap {gap_ms}: {single:?}");
        let pipelined = pull_loop(4, 50, gap_ms);
        assert!(pipelined.caught_up, "{pipelined:?}");
        assert_eq!(pipelined.shipped, pipelined.written, "{pipelined:?}");
        assert_eq!(pipelined.applied, pipelined.written, "{pipelined:?}");
        assert!(pipelined.lag_ms_p99 <= 85, "gap {gap_ms}: {pipelined:?}");
        assert!(pipelined.lag_ms_max <= 90, "gap {gap_ms}: {pipelined:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// How a test answers a request.
#[derive(Clone, Copy, Debug)]
enum How {
    Right,
    Failed,
    Unreachable,
    WrongKind,
}

#[derive(Clone, Debug)]
enum Action {
    Tick(u64),
    /// A poll with nothing new is held by the peer until its wait is over (some salts answer
    /// it early, as a peer that does not hold polls would).
    Answer {
        pick: usize,
        how: How,
        salt: u8,
    },
    /// The request is lost before the peer sees it.
    Lose {
        pick: usize,
    },
    /// The peer answers the request and the answer is lost (a poll's entries count as sent).
    LoseAnswer {
        pick: usize,
    },
    /// The network delivers the request a second time; the copy is answered now, the
    /// original stays out.
    Duplicate {
        pick: usize,
    },
    Local {
        pick: usize,
        ok: bool,
        salt: u8,
    },
    /// An event delivered before is delivered again.
    Replay {
        pick: usize,
    },
    Write {
        peer: usize,
        partition: u16,
        n: u64,
    },
    Trim {
        peer: usize,
        partition: u16,
        n: u64,
    },
    Restart,
    /// The peer restarts: it forgets its poll sessions.
    PeerRestart {
        peer: usize,
    },
}

const PEERS: usize = 2;
const PARTITIONS: u16 = 4;

/// The item ids a peer of the property world reconciles with (as it answers with `salt`).
fn model_set(salt: u8) -> Vec<u64> {
    vec![11, 22, 30 + u64::from(salt % 2)]
}

/// Three polls asked for, two allowed (three requests in flight, one kept free).
fn prop_config() -> CoreConfig {
    CoreConfig {
        partitions: PARTITIONS,
        polls_per_peer: 3,
        pull_wait_ms: 300,
        feed_batch_max: 3,
        requests_in_flight_max: 3,
        request_timeout_ms: 1_000,
        retry_backoff_ms: 50,
        retry_backoff_max_ms: 400,
        anti_entropy_interval_ms: 2_000,
        ae_items_per_round: 8,
        ae_symbols_first: 2,
        ae_symbols_per_round_max: 8,
        ae_buckets_per_round_max: 2,
        ae_keys_per_round_max: 2,
        gc_interval_ms: 0,
        gc_keys_per_round_max: 2,
    }
}

fn how() -> impl Strategy<Value = How> {
    prop_oneof![
        6 => Just(How::Right),
        1 => Just(How::Failed),
        1 => Just(How::Unreachable),
        1 => Just(How::WrongKind),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0u64..1_500).prop_map(Action::Tick),
        8 => (any::<usize>(), how(), any::<u8>())
            .prop_map(|(pick, how, salt)| Action::Answer { pick, how, salt }),
        1 => any::<usize>().prop_map(|pick| Action::Lose { pick }),
        1 => any::<usize>().prop_map(|pick| Action::LoseAnswer { pick }),
        1 => any::<usize>().prop_map(|pick| Action::Duplicate { pick }),
        6 => (any::<usize>(), prop::bool::weighted(0.9), any::<u8>())
            .prop_map(|(pick, ok, salt)| Action::Local { pick, ok, salt }),
        1 => any::<usize>().prop_map(|pick| Action::Replay { pick }),
        3 => (0..PEERS, 0..PARTITIONS, 1u64..8)
            .prop_map(|(peer, partition, n)| Action::Write { peer, partition, n }),
        1 => (0..PEERS, 0..PARTITIONS, 1u64..8)
            .prop_map(|(peer, partition, n)| Action::Trim { peer, partition, n }),
        1 => Just(Action::Restart),
        1 => (0..PEERS).prop_map(|peer| Action::PeerRestart { peer }),
    ]
}

/// A request the core sent that may still be answered.
#[derive(Clone, Debug)]
struct Sent {
    id: CommandId,
    peer: PeerId,
    request: Request,
    sent_ms: u64,
}

/// A request the core may still count as in flight.
#[derive(Clone, Debug)]
struct Out {
    id: CommandId,
    peer: PeerId,
    deadline_ms: u64,
    /// A poll within a session (a duplicate's answer leaves it out).
    poll: bool,
}

/// A peer's poll session, as the peer keeps it.
#[derive(Clone, Debug)]
struct ModelSession {
    sent: Vec<u64>,
    polls_seen: BTreeSet<u64>,
}

/// The peers' feeds and poll sessions, this region's store, and what is out: the world the
/// core runs in.
struct World {
    h: Harness,
    /// `(first_seq, last_seq)` of each peer's partition feeds.
    feeds: Vec<Vec<(u64, u64)>>,
    /// Each peer's poll sessions.
    sessions: Vec<BTreeMap<u64, ModelSession>>,
    next_session: u64,
    /// The cursors in this region's store.
    stored: Vec<Vec<u64>>,
    /// Requests that may still be answered.
    sends: Vec<Sent>,
    /// Requests the core may still count as in flight.
    out: Vec<Out>,
    locals: Vec<(CommandId, LocalOp)>,
    delivered: Vec<Event>,
    /// The cursors the core was last seen with.
    seen: Vec<Vec<u64>>,
    /// Whether the cursors were loaded since the last start.
    loaded: bool,
    /// The cursor load the core waits for.
    load: Option<CommandId>,
    /// How many times each `(peer, partition, seq)` reached the core in a poll's answer.
    shipped: BTreeMap<(PeerId, u16, u64), u32>,
    /// Applies that did not start right after the cursor (a gap was jumped).
    skipping_applies: u64,
}

impl World {
    fn new() -> Self {
        let mut w = Self {
            h: Harness::new(prop_config(), PEERS),
            feeds: vec![vec![(1, 0); usize::from(PARTITIONS)]; PEERS],
            sessions: vec![BTreeMap::new(); PEERS],
            next_session: 1,
            stored: vec![vec![0; usize::from(PARTITIONS)]; PEERS],
            sends: Vec::new(),
            out: Vec::new(),
            locals: Vec::new(),
            delivered: Vec::new(),
            seen: vec![vec![0; usize::from(PARTITIONS)]; PEERS],
            loaded: false,
            load: None,
            shipped: BTreeMap::new(),
            skipping_applies: 0,
        };
        w.step(Event::Start);
        w
    }

    /// Feeds an event to the core and checks every invariant on what comes out.
    fn step(&mut self, event: Event) {
        let config = prop_config();
        if matches!(event, Event::Start) {
            // A crash: whatever was out is gone with the process.
            self.sends.clear();
            self.out.clear();
            self.locals.clear();
            self.loaded = false;
        }
        if let Event::Local {
            id,
            result: Ok(LocalResult::Cursors(_)),
        } = &event
        {
            if self.load == Some(*id) {
                self.loaded = true;
            }
        }
        if matches!(event, Event::Tick) {
            let now = self.h.now_ms;
            self.out.retain(|o| o.deadline_ms > now);
        }
        if let Event::Remote { id, result } = &event {
            let copy = matches!(result, Ok(Response::Duplicate));
            self.out.retain(|o| o.id != *id || (o.poll && copy));
        }
        let commands = self.h.handle(event.clone());
        self.delivered.push(event);
        if self.delivered.len() > 32 {
            self.delivered.remove(0);
        }
        let cursors = self.cursors();
        for command in commands {
            match command {
                Command::Send { id, peer, request } => {
                    assert!(peer < PEERS);
                    let mut deadline_ms = self.h.now_ms + config.request_timeout_ms;
                    let Request::Heads {
                        session,
                        after,
                        poll,
                        limit,
                        wait_ms,
                    } = &request
                    else {
                        assert!(
                            !matches!(request, Request::Feed { .. }),
                            "the core pulls with polls only"
                        );
                        self.push_sent(id, peer, request, deadline_ms, false);
                        continue;
                    };
                    assert_eq!(*limit, config.feed_batch_max);
                    if *session == 0 {
                        assert_eq!((*poll, *wait_ms), (0, 0), "an opening poll is not held");
                        assert_eq!(after.len(), usize::from(PARTITIONS));
                        for (partition, sent) in after.iter().enumerate() {
                            let cursor = cursors[peer][partition];
                            let (_, last) = self.feeds[peer][partition];
                            assert!(
                                *sent >= cursor && *sent <= last,
                                "opening at {sent} with cursor {cursor}, feed up to {last}"
                            );
                        }
                    } else {
                        assert!(after.is_empty() && *poll >= 1);
                        assert_eq!(u64::from(*wait_ms), config.pull_wait_ms);
                        deadline_ms += u64::from(*wait_ms);
                    }
                    let poll = *session != 0;
                    self.push_sent(id, peer, request, deadline_ms, poll);
                }
                Command::Local { id, op } => {
                    if let LocalOp::ApplyFeed {
                        peer,
                        partition,
                        entries,
                        advance_to,
                    } = &op
                    {
                        assert!(
                            !self.locals.iter().any(|(_, op)| matches!(
                                op,
                                LocalOp::ApplyFeed { peer: p, partition: q, .. }
                                    if p == peer && q == partition
                            )),
                            "two applies of one partition at once: the cursor could pass an \
                             entry not merged yet"
                        );
                        let cursor = cursors[*peer][usize::from(*partition)];
                        assert!(*advance_to > cursor, "an apply that changes nothing");
                        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
                        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
                        assert!(seqs.last().is_none_or(|s| s == advance_to));
                        if seqs.first() != Some(&(cursor + 1)) {
                            self.skipping_applies += 1;
                            let (first, _) = self.feeds[*peer][usize::from(*partition)];
                            assert!(first > cursor + 1, "a gap where there was none");
                        }
                    }
                    if matches!(op, LocalOp::LoadCursors) {
                        self.load = Some(id);
                    }
                    self.locals.push((id, op));
                }
                _ => panic!("unknown command"),
            }
        }
        // A gap is counted when its page arrives; the apply jumping it may come later (once
        // the page before it is merged).
        assert!(
            self.h.core.stats().gaps >= self.skipping_applies,
            "entries skipped without a gap"
        );
        // The in-flight bound, per peer.
        for peer in 0..PEERS {
            let n = self.out.iter().filter(|o| o.peer == peer).count();
            assert!(
                n <= config.requests_in_flight_max,
                "{n} requests in flight to peer {peer}"
            );
            if self.loaded {
                assert_eq!(
                    self.h.core.in_flight(peer),
                    n,
                    "in-flight count of peer {peer}"
                );
            }
        }
        // Cursors never move back, and never past what the store holds.
        for (peer, cursors) in cursors.iter().enumerate() {
            for (partition, cursor) in cursors.iter().enumerate() {
                assert!(*cursor >= self.seen[peer][partition], "cursor moved back");
                assert!(*cursor <= self.stored[peer][partition]);
                let (_, last) = self.feeds[peer][partition];
                assert!(*cursor <= last, "cursor past the peer's feed");
            }
        }
        self.seen = cursors;
    }

    fn push_sent(
        &mut self,
        id: CommandId,
        peer: PeerId,
        request: Request,
        deadline_ms: u64,
        poll: bool,
    ) {
        self.sends.push(Sent {
            id,
            peer,
            request,
            sent_ms: self.h.now_ms,
        });
        self.out.push(Out {
            id,
            peer,
            deadline_ms,
            poll,
        });
    }

    fn cursors(&self) -> Vec<Vec<u64>> {
        (0..PEERS)
            .map(|p| {
                (0..PARTITIONS)
                    .map(|q| self.h.core.cursor(p, q).unwrap())
                    .collect()
            })
            .collect()
    }

    /// Pages of `peer`'s feeds after `sent`, `limit` entries in all, as a server cuts them;
    /// raises `sent` past them.
    fn pages(&self, peer: PeerId, sent: &mut [u64], limit: u32) -> Vec<Page> {
        let partitions = sent.len() as u64;
        let mut pages = Vec::new();
        let mut budget = u64::from(limit.max(1));
        let start = sent.iter().fold(0u64, |a, c| a.wrapping_add(*c)) % partitions.max(1);
        for i in 0..partitions {
            if budget == 0 {
                break;
            }
            let partition = ((start + i) % partitions) as usize;
            let cursor = sent[partition];
            let (first, last) = self.feeds[peer][partition];
            if cursor == u64::MAX || cursor >= last {
                continue;
            }
            let from = (cursor + 1).max(first);
            let to = last.min(from + budget - 1);
            let entries: Vec<WireEntry> = (from..=to).map(|s| entry(s, s)).collect();
            budget -= entries.len() as u64;
            sent[partition] = to.max(first - 1);
            pages.push(Page {
                partition: partition as u16,
                entries,
                first_seq: first,
                last_seq: last,
            });
        }
        pages
    }

    /// Whether `peer`'s session has anything new to send.
    fn has_news(&self, peer: PeerId, session: u64) -> bool {
        self.sessions[peer].get(&session).is_some_and(|s| {
            s.sent
                .iter()
                .zip(&self.feeds[peer])
                .any(|(c, (_, last))| *c != u64::MAX && c < last)
        })
    }

    /// The peer's answer to `request` as it arrives now.
    fn right_answer(&mut self, peer: PeerId, request: &Request, salt: u8) -> Response {
        match request {
            Request::Heads {
                session: 0,
                after,
                limit,
                ..
            } => {
                let session = self.next_session;
                self.next_session += 1;
                self.h.sessions.insert(peer, session);
                let mut sent = after.clone();
                let pages = self.pages(peer, &mut sent, *limit);
                self.sessions[peer].insert(
                    session,
                    ModelSession {
                        sent,
                        polls_seen: BTreeSet::new(),
                    },
                );
                Response::Opened { session, pages }
            }
            Request::Heads {
                session,
                poll,
                limit,
                ..
            } => {
                let Some(mut s) = self.sessions[peer].get(session).cloned() else {
                    return Response::UnknownSession;
                };
                if !s.polls_seen.insert(*poll) {
                    return Response::Duplicate;
                }
                let pages = self.pages(peer, &mut s.sent, *limit);
                self.sessions[peer].insert(*session, s);
                Response::Heads { pages }
            }
            Request::Digest { .. } => Response::Digest {
                buckets: vec![1, 2, 3, u64::from(salt % 2)],
            },
            Request::Buckets { .. } => Response::Buckets {
                entries: vec![("a".into(), 1), ("b".into(), u64::from(salt % 3))],
            },
            Request::States { keys } => Response::States {
                states: keys
                    .iter()
                    .map(|k| (k.clone(), (salt % 4 != 0).then(|| vec![salt])))
                    .collect(),
            },
            Request::Push { .. } => Response::Pushed,
            // Equal summaries sometimes (always while healing); otherwise symbols of a set
            // that depends on the salt, so that batches of one round may not agree (a
            // changed or lying peer), and a forgotten snapshot now and then.
            Request::Reconcile { symbols, .. } if salt % 3 != 0 => Response::Symbols {
                symbols: iblt::encode(model_set(salt), 0, *symbols as usize),
            },
            Request::Reconcile { .. } => Response::Reconciled,
            Request::Symbols { .. } if salt % 5 == 4 => Response::Changed,
            Request::Symbols { from, count, .. } => Response::Symbols {
                symbols: iblt::encode(model_set(salt), u64::from(*from), *count as usize),
            },
            Request::Fetch { ids, .. } => Response::States {
                states: ids
                    .iter()
                    .map(|id| (format!("k{id}"), (salt % 4 != 0).then(|| vec![salt])))
                    .collect(),
            },
            _ => panic!("unknown request"),
        }
    }

    /// Whether the peer still holds this request: a poll with nothing new, within its wait.
    fn held(&self, sent: &Sent) -> bool {
        let Request::Heads {
            session, wait_ms, ..
        } = &sent.request
        else {
            return false;
        };
        *session != 0
            && self.sessions[sent.peer].contains_key(session)
            && !self.has_news(sent.peer, *session)
            && self.h.now_ms < sent.sent_ms + u64::from(*wait_ms)
    }

    /// Delivers a peer's answer, counting the entries it carries.
    fn deliver(&mut self, id: CommandId, peer: PeerId, response: Response) {
        if let Response::Heads { pages } | Response::Opened { pages, .. } = &response {
            for page in pages {
                for e in &page.entries {
                    *self
                        .shipped
                        .entry((peer, page.partition, e.seq))
                        .or_default() += 1;
                }
            }
        }
        self.step(Event::Remote {
            id,
            result: Ok(response),
        });
    }

    fn local_result(&mut self, op: &LocalOp, salt: u8) -> LocalResult {
        match op {
            LocalOp::LoadCursors => LocalResult::Cursors(self.stored.clone()),
            LocalOp::ApplyFeed {
                peer,
                partition,
                advance_to,
                ..
            } => {
                let c = &mut self.stored[*peer][usize::from(*partition)];
                *c = (*c).max(*advance_to);
                LocalResult::Applied
            }
            LocalOp::Digest { .. } => LocalResult::Digest(vec![1, 2, 3, 0]),
            LocalOp::Summary { .. } => LocalResult::Summary(u64::from(salt)),
            LocalOp::Items { .. } => {
                let mut items: Vec<(u64, String)> =
                    vec![(11, "k11".into()), (40 + u64::from(salt % 3), "k4x".into())];
                if salt % 2 == 0 {
                    items.push((22, "k22".into()));
                }
                items.sort();
                LocalResult::Items(items)
            }
            LocalOp::Buckets { .. } => {
                LocalResult::Buckets(vec![("b".into(), 1), ("c".into(), u64::from(salt))])
            }
            LocalOp::States { keys } => LocalResult::States(
                keys.iter()
                    .map(|k| (k.clone(), (salt % 3 != 0).then(|| vec![salt])))
                    .collect(),
            ),
            // Some merges settle a key (its hash becomes the peer's), some do not.
            LocalOp::MergeStates { states } => LocalResult::Merged {
                merged: states.len(),
                hashes: states
                    .iter()
                    .map(|(k, _)| (k.clone(), u64::from(salt % 3)))
                    .collect(),
            },
            _ => panic!("unknown op"),
        }
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Tick(ms) => {
                self.h.now_ms += ms;
                self.step(Event::Tick);
            }
            Action::Answer { pick, how, salt } => {
                if self.sends.is_empty() {
                    return;
                }
                let i = pick % self.sends.len();
                if matches!(how, How::Right) && salt % 8 != 0 && self.held(&self.sends[i]) {
                    return;
                }
                let Sent {
                    id, peer, request, ..
                } = self.sends.remove(i);
                match how {
                    How::Right => {
                        let response = self.right_answer(peer, &request, salt);
                        self.deliver(id, peer, response);
                    }
                    How::Failed => self.step(Event::Remote {
                        id,
                        result: Ok(Response::Failed {
                            reason: "busy".into(),
                        }),
                    }),
                    How::Unreachable => self.step(Event::Remote {
                        id,
                        result: Err("unreachable".into()),
                    }),
                    How::WrongKind => self.step(Event::Remote {
                        id,
                        result: Ok(match request {
                            Request::Push { .. } => Response::Digest { buckets: vec![] },
                            _ => Response::Pushed,
                        }),
                    }),
                }
            }
            Action::Lose { pick } => {
                if !self.sends.is_empty() {
                    let n = self.sends.len();
                    self.sends.remove(pick % n);
                }
            }
            Action::LoseAnswer { pick } => {
                if !self.sends.is_empty() {
                    let n = self.sends.len();
                    let Sent { peer, request, .. } = self.sends.remove(pick % n);
                    self.right_answer(peer, &request, 0);
                }
            }
            Action::Duplicate { pick } => {
                if !self.sends.is_empty() {
                    let Sent {
                        id, peer, request, ..
                    } = self.sends[pick % self.sends.len()].clone();
                    let response = self.right_answer(peer, &request, 0);
                    self.deliver(id, peer, response);
                }
            }
            Action::Local { pick, ok, salt } => {
                if self.locals.is_empty() {
                    return;
                }
                let (id, op) = self.locals.remove(pick % self.locals.len());
                let result = if ok {
                    Ok(self.local_result(&op, salt))
                } else {
                    Err("store down".into())
                };
                self.step(Event::Local { id, result });
            }
            Action::Replay { pick } => {
                let old: Vec<Event> = self
                    .delivered
                    .iter()
                    .filter(|e| matches!(e, Event::Remote { .. } | Event::Local { .. }))
                    .cloned()
                    .collect();
                if !old.is_empty() {
                    let event = old[pick % old.len()].clone();
                    self.step(event);
                }
            }
            Action::Write { peer, partition, n } => {
                self.feeds[peer][usize::from(partition)].1 += n;
            }
            Action::Trim { peer, partition, n } => {
                let (first, last) = &mut self.feeds[peer][usize::from(partition)];
                *first = (*first + n).min(*last + 1);
            }
            Action::Restart => self.step(Event::Start),
            Action::PeerRestart { peer } => self.sessions[peer].clear(),
        }
    }

    /// Answers everything rightly, with equal digests, until the core has caught up; polls
    /// with nothing new are held by the peers for their wait.
    fn heal(&mut self) {
        for _ in 0..20_000 {
            if !self.locals.is_empty() {
                let (id, op) = self.locals.remove(0);
                let result = self.local_result(&op, 1);
                self.step(Event::Local {
                    id,
                    result: Ok(result),
                });
            } else if let Some(i) = self.sends.iter().position(|s| !self.held(s)) {
                let Sent {
                    id, peer, request, ..
                } = self.sends.remove(i);
                let response = self.right_answer(peer, &request, 0);
                self.deliver(id, peer, response);
            } else {
                let caught_up = (0..PEERS).all(|p| {
                    (0..PARTITIONS)
                        .all(|q| self.h.core.cursor(p, q) == Some(self.feeds[p][usize::from(q)].1))
                });
                if caught_up && self.h.core.is_idle() {
                    assert_eq!(self.stored, self.seen);
                    return;
                }
                self.h.now_ms += 50;
                self.step(Event::Tick);
            }
        }
        panic!(
            "no convergence after healing: cursors {:?}, feeds {:?}, stats {:?}",
            self.cursors(),
            self.feeds,
            self.h.core.stats()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1000,
        rng_seed: RngSeed::Fixed(0x6765_6f73_7461_7465),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/core.txt",
        ))),
        ..ProptestConfig::default()
    })]

    /// Any interleaving of answers, losses (of requests and of answers), failures, duplicated
    /// requests and answers, held polls, writes, trims and restarts of either side: no panic,
    /// never more than `requests_in_flight_max` requests out to one peer nor more polls of a
    /// session than allowed, one apply per partition at a time, cursors only move forward and
    /// never skip an entry silently, and once the network heals the core catches up with every
    /// feed and goes idle.
    #[test]
    fn arbitrary_interleavings_keep_the_invariants(actions in prop::collection::vec(action(), 1..300)) {
        let mut world = World::new();
        for action in actions {
            world.act(action);
        }
        world.heal();
    }
}

#[test]
fn the_property_world_converges_without_faults() {
    // A sanity check of the harness itself: with only writes and right answers, it catches up.
    let mut world = World::new();
    let before = world.h.core.stats().requests;
    for (i, partition) in (0..PARTITIONS).cycle().take(12).enumerate() {
        world.act(Action::Write {
            peer: i % PEERS,
            partition,
            n: 5,
        });
    }
    world.heal();
    assert!(world.h.core.stats().requests > before);
    assert_eq!(world.h.core.stats().entries_applied, 60);
    assert_eq!(world.h.core.stats().failures, 0);
    assert_eq!(
        BTreeSet::from_iter(world.seen.iter().flatten().copied()),
        BTreeSet::from([0, 15])
    );
    assert!(
        world.shipped.values().all(|n| *n == 1),
        "an entry shipped twice"
    );
}

/// Writes arriving while polls are held: a held poll is answered as soon as its peer has
/// news, each entry reaches the core once, and only one session per peer is ever opened.
#[test]
fn the_property_world_delivers_writes_through_held_polls_once_each() {
    let mut world = World::new();
    world.heal();
    let requests = world.h.core.stats().requests;
    for round in 0..6u64 {
        world.act(Action::Write {
            peer: (round % 2) as usize,
            partition: (round % 4) as u16,
            n: 2,
        });
        world.heal();
    }
    assert_eq!(world.h.core.stats().entries_applied, 12);
    assert_eq!(world.h.core.stats().failures, 0);
    assert_eq!(world.h.core.stats().sessions, PEERS as u64);
    assert_eq!(world.shipped.len(), 12);
    assert!(
        world.shipped.values().all(|n| *n == 1),
        "an entry shipped twice: {:?}",
        world.shipped
    );
    assert!(world.h.core.stats().requests > requests);
}

/// An answer lost after the peer counted its entries as sent is noticed (the poll times out)
/// and what it carried arrives with the next session.
#[test]
fn the_property_world_recovers_a_lost_answer() {
    let mut world = World::new();
    world.heal();
    world.act(Action::Write {
        peer: 0,
        partition: 1,
        n: 2,
    });
    // The peer answers one of its held polls with the news, and the answer is lost.
    let lost = world
        .sends
        .iter()
        .position(|s| {
            s.peer == 0 && matches!(s.request, Request::Heads { session, .. } if session != 0)
        })
        .unwrap();
    world.act(Action::LoseAnswer { pick: lost });
    world.heal();
    assert_eq!(world.h.core.cursor(0, 1), Some(2));
    assert_eq!(world.h.core.stats().sessions, PEERS as u64 + 1);
}
