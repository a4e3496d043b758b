//! The pure replicator core, driven by hand: events in, commands out. No async, no store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;

use geostate_crdt::{ActorId, Hlc};
use geostate_replication::core::{
    Command, CommandId, CoreConfig, Event, LocalOp, LocalResult, PeerId, ReplicatorCore,
};
use geostate_replication::wire::{Page, Request, Response, WireEntry};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence, RngSeed};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// Four partitions, small limits, and no periodic sweep (tests that want one ask for it). A
/// peer may hold a poll for 500 ms, so a poll times out after 1.5 s and any other request
/// after 1 s.
fn config() -> CoreConfig {
    CoreConfig {
        partitions: 4,
        poll_interval_ms: 100,
        pull_wait_ms: 500,
        feed_batch_max: 10,
        requests_in_flight_max: 4,
        request_timeout_ms: 1_000,
        retry_backoff_ms: 100,
        retry_backoff_max_ms: 800,
        anti_entropy_interval_ms: 4_000_000_000,
        ae_buckets_per_round_max: 64,
        ae_keys_per_round_max: 1_024,
        // Garbage collection has its own tests (gc.rs).
        gc_interval_ms: 0,
        gc_keys_per_round_max: 16,
    }
}

/// A heads poll the core has out.
#[derive(Clone, Debug)]
struct PollOut {
    id: CommandId,
    sent_ms: u64,
    wait_ms: u64,
}

/// A core, the local time the test has reached, and the poll the core has out to each peer.
struct Harness {
    core: ReplicatorCore,
    config: CoreConfig,
    now_ms: u64,
    /// The poll out to each peer: recorded from the core's commands, forgotten when answered,
    /// timed out (as the core does) or lost in a restart.
    polls_out: BTreeMap<PeerId, PollOut>,
    /// Peers that never answer a poll in [`Harness::run`].
    silent: BTreeSet<PeerId>,
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
            polls_out: BTreeMap::new(),
            silent: BTreeSet::new(),
        }
    }

    /// Starts the core and answers its cursor load with `cursors`; returns what followed.
    fn started(config: CoreConfig, cursors: Vec<Vec<u64>>) -> (Self, Vec<Command>) {
        let mut h = Self::new(config, cursors.len());
        let commands = h.load(cursors);
        (h, commands)
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

    /// Feeds one event to the core, keeping track of its polls: never a second one to a peer
    /// while one is out.
    fn handle(&mut self, event: Event) -> Vec<Command> {
        let now = self.now_ms;
        let timeout = self.config.request_timeout_ms;
        match &event {
            Event::Start => self.polls_out.clear(),
            Event::Tick => self
                .polls_out
                .retain(|_, p| p.sent_ms + p.wait_ms + timeout > now),
            Event::Remote { id, .. } => self.polls_out.retain(|_, p| p.id != *id),
            _ => {}
        }
        let commands = self.core.handle(now, event);
        for p in polls(&commands) {
            assert!(
                !self.polls_out.contains_key(&p.peer),
                "a second poll to peer {} while one is out: {commands:?}",
                p.peer
            );
            self.polls_out.insert(
                p.peer,
                PollOut {
                    id: p.id,
                    sent_ms: now,
                    wait_ms: u64::from(p.wait_ms),
                },
            );
        }
        commands
    }

    /// Moves time on by `ms` and ticks.
    fn tick(&mut self, ms: u64) -> Vec<Command> {
        self.now_ms += ms;
        self.handle(Event::Tick)
    }

    /// Lets `ms` pass with quiet peers: each holds a poll for its wait and then answers it
    /// with nothing new (peers in `silent` never answer). Returns every command that came out.
    fn run(&mut self, ms: u64) -> Vec<Command> {
        let end = self.now_ms + ms;
        let mut out = Vec::new();
        loop {
            let due: Vec<CommandId> = self
                .polls_out
                .iter()
                .filter(|(peer, p)| {
                    !self.silent.contains(peer) && p.sent_ms + p.wait_ms <= self.now_ms
                })
                .map(|(_, p)| p.id)
                .collect();
            for id in due {
                out.extend(self.answer(id, nothing_new()));
            }
            if self.now_ms >= end {
                return out;
            }
            let next = self
                .polls_out
                .iter()
                .filter(|(peer, _)| !self.silent.contains(peer))
                .map(|(_, p)| p.sent_ms + p.wait_ms)
                .filter(|t| *t > self.now_ms)
                .min()
                .unwrap_or(end)
                .min(end);
            out.extend(self.tick(next - self.now_ms));
        }
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

    /// Answers the poll out to `peer` with `response`; returns what followed.
    fn answer_poll(&mut self, peer: PeerId, response: Response) -> Vec<Command> {
        let Some(poll) = self.polls_out.get(&peer) else {
            panic!("no poll out to peer {peer}")
        };
        self.answer(poll.id, response)
    }

    /// Answers every poll out with [`heads_only`]`(last_seqs)`; returns what followed.
    fn answer_polls(&mut self, last_seqs: &[u64]) -> Vec<Command> {
        let peers: Vec<PeerId> = self.polls_out.keys().copied().collect();
        let mut out = Vec::new();
        for peer in peers {
            out.extend(self.answer_poll(peer, heads_only(last_seqs)));
        }
        out
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
    after: Vec<u64>,
    limit: u32,
    wait_ms: u32,
}

fn polls(commands: &[Command]) -> Vec<Poll> {
    sends(commands)
        .into_iter()
        .filter_map(|(id, peer, r)| match r {
            Request::Heads {
                after,
                limit,
                wait_ms,
            } => Some(Poll {
                id,
                peer,
                after,
                limit,
                wait_ms,
            }),
            _ => None,
        })
        .collect()
}

/// The one element of `v`.
fn only<T: std::fmt::Debug>(mut v: Vec<T>) -> T {
    assert_eq!(v.len(), 1, "expected exactly one: {v:?}");
    v.remove(0)
}

/// A feed request, unpacked.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FeedReq {
    id: CommandId,
    peer: PeerId,
    partition: u16,
    after: u64,
    limit: u32,
}

fn feeds(commands: &[Command]) -> Vec<FeedReq> {
    sends(commands)
        .into_iter()
        .filter_map(|(id, peer, r)| match r {
            Request::Feed {
                partition,
                after,
                limit,
            } => Some(FeedReq {
                id,
                peer,
                partition,
                after,
                limit,
            }),
            _ => None,
        })
        .collect()
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

/// Whether `commands` hold any anti-entropy work (remote or local).
fn has_ae(commands: &[Command]) -> bool {
    sends(commands).iter().any(|(_, _, r)| {
        matches!(
            r,
            Request::Digest { .. }
                | Request::Buckets { .. }
                | Request::States { .. }
                | Request::Push { .. }
        )
    }) || locals(commands).iter().any(|(_, op)| {
        matches!(
            op,
            LocalOp::Digest { .. }
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

/// An answer to a feed request.
fn page(seqs: RangeInclusive<u64>, first_seq: u64, last_seq: u64) -> Response {
    Response::Feed {
        entries: seqs.map(|s| entry(s, 0)).collect(),
        first_seq,
        last_seq,
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

/// A poll's answer as a peer gives it (`serve`): pages only, no list of heads.
fn pages(pages: Vec<Page>) -> Response {
    Response::Heads {
        last_seqs: Vec::new(),
        pages,
    }
}

/// A poll's answer with nothing new (the peer's wait ran out).
fn nothing_new() -> Response {
    pages(Vec::new())
}

/// The heads-only answer (what a peer answers to a poll without cursors): it reveals which
/// partitions are behind without handing over any entry, so the core fetches them with feed
/// requests.
fn heads_only(last_seqs: &[u64]) -> Response {
    Response::Heads {
        last_seqs: last_seqs.to_vec(),
        pages: Vec::new(),
    }
}

/// Answers a poll from feeds holding `(first_seq, last_seq)` per partition, as `serve` does:
/// one page per partition with entries after its cursor, `limit` entries in all, starting at a
/// partition derived from the cursors; no list of heads when cursors were sent.
fn serve_poll(feeds: &[(u64, u64)], after: &[u64], limit: u32) -> Response {
    let partitions = feeds.len() as u64;
    let mut pages = Vec::new();
    let mut budget = u64::from(limit.max(1));
    let start = after.iter().fold(0u64, |a, c| a.wrapping_add(*c)) % partitions.max(1);
    for i in 0..partitions {
        if budget == 0 {
            break;
        }
        let partition = ((start + i) % partitions) as usize;
        let cursor = after.get(partition).copied().unwrap_or(u64::MAX);
        let (first, last) = feeds[partition];
        if cursor >= last {
            continue;
        }
        let from = (cursor + 1).max(first);
        let to = last.min(from + budget - 1);
        let entries: Vec<WireEntry> = (from..=to).map(|s| entry(s, s)).collect();
        budget -= entries.len() as u64;
        pages.push(Page {
            partition: partition as u16,
            entries,
            first_seq: first,
            last_seq: last,
        });
    }
    let last_seqs = if after.is_empty() {
        feeds.iter().map(|(_, last)| *last).collect()
    } else {
        Vec::new()
    };
    Response::Heads { last_seqs, pages }
}

// ---------------------------------------------------------------------------------------------
// Start and feed shipping
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
    let retry = h.handle(Event::Local {
        id,
        result: Err("store down".into()),
    });
    assert_eq!(locals(&retry).len(), 1);
    assert!(matches!(locals(&retry)[0].1, LocalOp::LoadCursors));
    assert!(sends(&retry).is_empty());
    let (id, _) = locals(&retry)[0].clone();
    let after = h.local(id, LocalResult::Cursors(vec![vec![0, 4, 0, 9]]));
    let p = only(polls(&after));
    assert_eq!((p.peer, p.after), (0, vec![0, 4, 0, 9]));
}

#[test]
fn loaded_cursors_start_one_long_poll_per_peer_and_each_answer_starts_the_next() {
    let (mut h, commands) =
        Harness::started(config(), vec![vec![0, 1, 2, 3], vec![0; 4], vec![0; 4]]);
    let asked: Vec<(PeerId, Vec<u64>, u32, u32)> = polls(&commands)
        .into_iter()
        .map(|p| (p.peer, p.after, p.limit, p.wait_ms))
        .collect();
    assert_eq!(
        asked,
        vec![
            (0, vec![0, 1, 2, 3], 10, 500),
            (1, vec![0; 4], 10, 500),
            (2, vec![0; 4], 10, 500)
        ],
        "each poll carries the cursors, the page limit and the wait"
    );
    assert_eq!(sends(&commands).len(), 3, "only polls: {commands:?}");
    assert!(locals(&commands).is_empty());
    assert!(h.core.is_idle(), "nothing is known to be behind yet");
    // No second poll to a peer while one is out, even past the poll interval and the wait
    // (the peer may hold it that long).
    for _ in 0..14 {
        let early = h.tick(100);
        assert!(early.is_empty(), "{early:?}");
    }
    assert_eq!(h.core.stats().failures, 0);
    // An answer with nothing new: the next poll goes out at once (the peer holds it until it
    // has news, so this does not spin), with the same cursors.
    let after = h.answer_poll(1, nothing_new());
    let p = only(polls(&after));
    assert_eq!((p.peer, p.after), (1, vec![0; 4]));
    assert_eq!(sends(&after).len(), 1, "{after:?}");
    // And so on, for each answer.
    for _ in 0..3 {
        let next = h.answer_poll(1, nothing_new());
        assert_eq!(only(polls(&next)).peer, 1);
    }
    assert_eq!(h.core.stats().failures, 0);
}

#[test]
fn heads_ahead_of_cursors_fetch_one_page_per_lagging_partition_only() {
    let (mut h, _) = Harness::started(config(), vec![vec![0, 5, 7, 2]]);
    let after = h.answer_polls(&[3, 5, 9, 2]);
    let mut fetched = feeds(&after);
    fetched.sort_by_key(|f| f.partition);
    let got: Vec<(u16, u64, u32)> = fetched
        .iter()
        .map(|f| (f.partition, f.after, f.limit))
        .collect();
    assert_eq!(got, vec![(0, 0, 10), (2, 7, 10)]);
    assert_eq!(
        sends(&after).len(),
        3,
        "two feed requests, the next poll: {after:?}"
    );
    assert_eq!(polls(&after).len(), 1);
    assert_eq!(h.core.backlog(0), 3 + 2);
    assert!(!h.core.is_idle());
    // Further answers and ticks (within the timeout) do not ask again for a partition already
    // being fetched.
    for _ in 0..5 {
        let more = h.tick(100);
        assert!(feeds(&more).is_empty(), "{more:?}");
        let more = h.answer_polls(&[3, 5, 9, 2]);
        assert!(feeds(&more).is_empty(), "{more:?}");
    }
}

#[test]
fn feed_requests_to_one_peer_are_bounded_by_requests_in_flight_max() {
    let config = CoreConfig {
        partitions: 8,
        requests_in_flight_max: 3,
        ..config()
    };
    let (mut h, _) = Harness::started(config, vec![vec![0; 8]]);
    let out = h.answer_polls(&[5; 8]);
    let mut outstanding: Vec<FeedReq> = feeds(&out);
    assert_eq!(
        outstanding.len(),
        2,
        "the next poll takes the third slot: {out:?}"
    );
    assert_eq!(polls(&out).len(), 1);
    assert_eq!(h.core.in_flight(0), 3);
    let mut requested = BTreeMap::<u16, usize>::new();
    for f in &outstanding {
        *requested.entry(f.partition).or_default() += 1;
    }
    while let Some(f) = (!outstanding.is_empty()).then(|| outstanding.remove(0)) {
        let out = h.answer(f.id, page(1..=5, 1, 5));
        let apply = applies(&out);
        assert_eq!(apply.len(), 1);
        for next in feeds(&out) {
            *requested.entry(next.partition).or_default() += 1;
            outstanding.push(next);
        }
        assert!(outstanding.len() < 3, "{outstanding:?}");
        assert!(h.core.in_flight(0) <= 3);
        for next in feeds(&h.local(apply[0].id, LocalResult::Applied)) {
            *requested.entry(next.partition).or_default() += 1;
            outstanding.push(next);
        }
        assert!(outstanding.len() < 3, "{outstanding:?}");
        assert!(h.core.in_flight(0) <= 3);
    }
    assert_eq!(requested, (0..8).map(|p| (p, 1)).collect());
    assert!(h.core.is_idle());
    assert_eq!(h.core.stats().entries_applied, 40);
    assert_eq!(h.core.in_flight(0), 1, "only the poll, held by the peer");
}

#[test]
fn a_feed_page_is_applied_before_the_cursor_moves() {
    let (mut h, _) = Harness::started(config(), vec![vec![0; 4], vec![0; 4]]);
    let mut out = h.answer_poll(0, heads_only(&[0; 4]));
    out.extend(h.answer_poll(1, heads_only(&[0, 3, 0, 0])));
    let f = only(feeds(&out));
    assert_eq!((f.peer, f.partition, f.after), (1, 1, 0));
    let out = h.answer(f.id, page(1..=3, 1, 3));
    assert_eq!(out.len(), 1, "{out:?}");
    let a = only(applies(&out));
    assert_eq!(
        (a.peer, a.partition, a.seqs.clone(), a.advance_to),
        (1, 1, vec![1, 2, 3], 3)
    );
    // Not applied yet: the cursor waits.
    assert_eq!(h.core.cursor(1, 1), Some(0));
    assert!(!h.core.is_idle());
    let out = h.local(a.id, LocalResult::Applied);
    assert!(feeds(&out).is_empty());
    assert_eq!(h.core.cursor(1, 1), Some(3));
    assert_eq!(h.core.stats().entries_applied, 3);
    assert_eq!(h.core.backlog(1), 0);
    assert!(h.core.is_idle());
}

#[test]
fn a_full_page_is_followed_at_once_by_the_next() {
    let config = CoreConfig {
        feed_batch_max: 2,
        ..config()
    };
    let (mut h, _) = Harness::started(config, vec![vec![0; 4]]);
    let out = h.answer_polls(&[5, 0, 0, 0]);
    let mut f = feeds(&out)[0].clone();
    let mut pages = Vec::new();
    loop {
        assert_eq!((f.partition, f.limit), (0, 2));
        let from = f.after + 1;
        let to = (f.after + 2).min(5);
        pages.push((f.after, to));
        let out = h.answer(f.id, page(from..=to, 1, 5));
        let apply = applies(&out)[0].clone();
        assert_eq!(apply.advance_to, to);
        // Same instant, no tick: the next page is asked for as soon as this one is applied.
        let out = h.local(apply.id, LocalResult::Applied);
        match &feeds(&out)[..] {
            [] => break,
            [next] => f = next.clone(),
            more => panic!("{more:?}"),
        }
    }
    assert_eq!(pages, vec![(0, 2), (2, 4), (4, 5)]);
    assert_eq!(h.core.cursor(0, 0), Some(5));
    assert!(h.core.is_idle());
}

#[test]
fn entries_at_or_below_the_cursor_are_not_applied_again() {
    let (mut h, _) = Harness::started(config(), vec![vec![3, 0, 0, 0]]);
    let f = feeds(&h.answer_polls(&[6, 0, 0, 0]))[0].clone();
    assert_eq!(f.after, 3);
    // A peer that ignores `after` and sends older entries too.
    let out = h.answer(f.id, page(2..=6, 1, 6));
    let a = applies(&out)[0].clone();
    assert_eq!((a.seqs, a.advance_to), (vec![4, 5, 6], 6));
    assert_eq!(h.core.stats().gaps, 0);
}

#[test]
fn a_page_with_nothing_new_applies_nothing_and_releases_the_partition() {
    let (mut h, _) = Harness::started(config(), vec![vec![3, 0, 0, 0]]);
    let f = feeds(&h.answer_polls(&[6, 0, 0, 0]))[0].clone();
    // Nothing after the cursor (the peer answered from a lagging replica): no apply, no gap...
    let mut out = h.answer(f.id, page(1..=3, 1, 3));
    assert!(applies(&out).is_empty(), "{out:?}");
    assert_eq!(h.core.stats().gaps, 0);
    assert_eq!(h.core.cursor(0, 0), Some(3));
    // ...and the partition is not left stuck as "being fetched": once the entries are there,
    // they are pulled.
    let mut pulled = None;
    for _ in 0..10 {
        if let Some(f) = feeds(&out).first() {
            let answer = h.answer(f.id, page(4..=6, 1, 6));
            pulled = applies(&answer)
                .first()
                .map(|a| (a.seqs.clone(), a.advance_to));
            break;
        }
        out = h.tick(100);
        out.extend(h.answer_polls(&[6, 0, 0, 0]));
    }
    assert_eq!(pulled, Some((vec![4, 5, 6], 6)));
}

// ---------------------------------------------------------------------------------------------
// Long polls: pages in the answer
// ---------------------------------------------------------------------------------------------

/// A poll answered with pages: they are applied like feed pages (entries the cursor covers are
/// skipped), and the next poll waits for the applies so that it carries the new cursors.
#[test]
fn a_poll_answered_with_pages_applies_them_and_the_next_poll_carries_the_new_cursors() {
    let (mut h, commands) = Harness::started(config(), vec![vec![0, 2, 0, 0]]);
    let p = only(polls(&commands));
    assert_eq!(p.after, vec![0, 2, 0, 0]);
    h.now_ms = 1_000;
    let out = h.answer(
        p.id,
        pages(vec![
            poll_page(0, 1..=3, 1, 3),
            // A peer that ignores the cursor and sends entry 2 again.
            poll_page(1, 2..=4, 1, 4),
        ]),
    );
    let mut applied = applies(&out);
    applied.sort_by_key(|a| a.partition);
    let got: Vec<(PeerId, u16, Vec<u64>, u64)> = applied
        .iter()
        .map(|a| (a.peer, a.partition, a.seqs.clone(), a.advance_to))
        .collect();
    assert_eq!(got, vec![(0, 0, vec![1, 2, 3], 3), (0, 1, vec![3, 4], 4)]);
    assert!(
        sends(&out).is_empty(),
        "no poll while pages are being applied, and nothing to fetch: {out:?}"
    );
    assert_eq!(h.core.cursor(0, 0), Some(0), "not before the apply");
    assert_eq!(h.core.backlog(0), 3 + 2);
    assert!(!h.core.is_idle());
    // Time passing does not start the next poll either.
    assert!(h.tick(2_000).is_empty());
    h.now_ms += 200;
    let out = h.local(applied[0].id, LocalResult::Applied);
    assert!(out.is_empty(), "one page is still being applied: {out:?}");
    assert_eq!(h.core.cursor(0, 0), Some(3));
    let out = h.local(applied[1].id, LocalResult::Applied);
    let next = only(polls(&out));
    assert_eq!(
        next.after,
        vec![3, 4, 0, 0],
        "the next poll carries the new cursors"
    );
    assert_eq!(sends(&out).len(), 1, "{out:?}");
    assert_eq!(h.core.stats().entries_applied, 5);
    assert_eq!(h.core.stats().gaps, 0);
    assert!(h.core.stats().feed_bytes > 0);
    assert!(h.core.is_idle());
    // Lag is recorded on this path too: written at 0, applied at 3.2 s.
    let lag = h.core.lag_ms(0).unwrap();
    assert_eq!(lag.len(), 5);
    assert!(lag.equivalent(lag.max(), 3_200), "max {}", lag.max());
}

/// A page is cut at the cursor the poll was sent with. If the cursor moved since (another
/// request fetched the partition), or the partition was left out of the poll, the page is
/// ignored; the head it reveals is still taken, so what lies past the cursor is fetched.
#[test]
fn a_page_cut_at_a_cursor_that_has_moved_since_is_ignored() {
    let config = CoreConfig {
        requests_in_flight_max: 2,
        ..config()
    };
    let (mut h, _) = Harness::started(config, vec![vec![0; 4]]);
    // Partitions 0 and 1 are behind: one slot goes to fetching partition 0, the other to the
    // next poll, which leaves partition 0 out and carries partition 1's cursor (no slot left to
    // fetch it).
    let out = h.answer_polls(&[5, 5, 0, 0]);
    let f0 = only(feeds(&out));
    assert_eq!((f0.partition, f0.after), (0, 0));
    let p = only(polls(&out));
    assert_eq!(p.after, vec![u64::MAX, 0, 0, 0]);
    // Partition 0's answer frees a slot: partition 1 is fetched and applied meanwhile.
    let out = h.answer(f0.id, page(1..=5, 1, 5));
    let a0 = only(applies(&out));
    let f1 = only(feeds(&out));
    assert_eq!((f1.partition, f1.after), (1, 0));
    h.local(a0.id, LocalResult::Applied);
    let out = h.answer(f1.id, page(1..=5, 1, 5));
    h.local(only(applies(&out)).id, LocalResult::Applied);
    assert_eq!(h.core.cursor(0, 1), Some(5));
    let applied = h.core.stats().entries_applied;
    // The poll comes back with pages cut where it was sent: partition 0 (left out of it) and
    // partition 1 (at 0, now 5) are stale; partition 2's is taken.
    let out = h.answer(
        p.id,
        pages(vec![
            poll_page(0, 1..=6, 1, 6),
            poll_page(1, 1..=7, 1, 7),
            poll_page(2, 1..=2, 1, 2),
        ]),
    );
    let a2 = only(applies(&out));
    assert_eq!(
        (a2.partition, a2.seqs.clone(), a2.advance_to),
        (2, vec![1, 2], 2)
    );
    // Their news is not lost: what lies past the cursors is fetched.
    let mut fetched: Vec<(u16, u64)> = feeds(&out).iter().map(|f| (f.partition, f.after)).collect();
    fetched.sort();
    assert_eq!(fetched, vec![(0, 5), (1, 5)], "{out:?}");
    assert_eq!(h.core.backlog(0), 1 + 2 + 2);
    h.local(a2.id, LocalResult::Applied);
    assert_eq!(h.core.stats().entries_applied, applied + 2);
    assert_eq!(h.core.stats().gaps, 0);
}

/// A partition being fetched (a feed request out, or its page being applied) is sent as
/// `u64::MAX`, so the peer does not send its entries a second time in the poll's answer.
#[test]
fn partitions_being_fetched_are_left_out_of_the_poll() {
    let config = CoreConfig {
        feed_batch_max: 4,
        ..config()
    };
    let (mut h, _) = Harness::started(config, vec![vec![0; 4]]);
    // Partition 2 is revealed as behind: its feed request and the next poll go out together,
    // and the poll leaves it out.
    let out = h.answer_polls(&[0, 0, 3, 0]);
    let f = only(feeds(&out));
    assert_eq!((f.partition, f.after), (2, 0));
    assert_eq!(only(polls(&out)).after, vec![0, 0, u64::MAX, 0]);
    // So does every poll while the request is out...
    let out = h.answer_poll(0, nothing_new());
    assert_eq!(only(polls(&out)).after, vec![0, 0, u64::MAX, 0]);
    // ...and while its page is applied (no poll goes out meanwhile).
    let a = only(applies(&h.answer(f.id, page(1..=3, 1, 3))));
    let out = h.answer_poll(0, nothing_new());
    assert!(
        polls(&out).is_empty(),
        "a poll while a page is applied: {out:?}"
    );
    let out = h.local(a.id, LocalResult::Applied);
    let p = only(polls(&out));
    assert_eq!(p.after, vec![0, 0, 3, 0]);
    // A page cut at the limit: the rest of its partition is fetched with a feed request, and
    // the poll that goes out with it leaves the partition out.
    let a = only(applies(
        &h.answer(p.id, pages(vec![poll_page(1, 1..=4, 1, 9)])),
    ));
    assert_eq!((a.partition, a.advance_to), (1, 4));
    let out = h.local(a.id, LocalResult::Applied);
    let f = only(feeds(&out));
    assert_eq!((f.partition, f.after, f.limit), (1, 4, 4));
    assert_eq!(
        only(polls(&out)).after,
        vec![0, u64::MAX, 3, 0],
        "the poll would fetch partition 1's next entries a second time"
    );
}

/// A peer may hold a poll for its wait before answering: the poll times out only after the
/// wait and the request timeout, while other requests keep the plain timeout.
#[test]
fn a_poll_times_out_only_after_its_wait_and_the_request_timeout() {
    let (mut h, _) = Harness::started(config(), vec![vec![0; 4]]);
    // A feed request and a poll go out at once (at 0).
    let out = h.answer_polls(&[3, 0, 0, 0]);
    assert_eq!(feeds(&out).len(), 1);
    let p = only(polls(&out));
    assert_eq!(p.wait_ms, 500);
    // The feed request times out after the request timeout (1 s)...
    h.tick(999);
    assert_eq!(h.core.stats().failures, 0);
    h.tick(1);
    assert_eq!(h.core.stats().failures, 1);
    // ...the poll only after wait + timeout (1.5 s).
    h.tick(499);
    assert_eq!(
        h.core.stats().failures,
        1,
        "the poll timed out before its wait was over"
    );
    h.tick(1);
    assert_eq!(h.core.stats().failures, 2);
    // Its answer is ignored after that.
    assert!(h
        .answer(p.id, pages(vec![poll_page(1, 1..=2, 1, 2)]))
        .is_empty());
    assert_eq!(h.core.cursor(0, 1), Some(0));
    assert_eq!(h.core.backlog(0), 3);

    // The deadline follows the configured wait.
    let config = CoreConfig {
        pull_wait_ms: 3_000,
        ..config()
    };
    let (mut h, commands) = Harness::started(config, vec![vec![0; 4]]);
    assert_eq!(only(polls(&commands)).wait_ms, 3_000);
    h.tick(3_999);
    assert_eq!(h.core.stats().failures, 0);
    h.tick(1);
    assert_eq!(h.core.stats().failures, 1);
}

// ---------------------------------------------------------------------------------------------
// Feed gaps
// ---------------------------------------------------------------------------------------------

#[test]
fn a_feed_gap_jumps_the_cursor_and_starts_anti_entropy_at_once() {
    let (mut h, _) = Harness::started(config(), vec![vec![0, 2, 0, 0]]);
    let f = feeds(&h.answer_polls(&[0, 12, 0, 0]))[0].clone();
    assert_eq!((f.partition, f.after), (1, 2));
    // Entries 3..=9 were trimmed before we read them.
    let out = h.answer(f.id, page(10..=12, 10, 12));
    let a = only(applies(&out));
    assert_eq!(
        (a.partition, a.seqs.clone(), a.advance_to),
        (1, vec![10, 11, 12], 12)
    );
    assert_eq!(h.core.stats().gaps, 1);
    // Anti-entropy for that partition starts in the same step: remote and local digests.
    let remote: Vec<u16> = sends(&out)
        .iter()
        .filter_map(|(_, _, r)| match r {
            Request::Digest { partition } => Some(*partition),
            _ => None,
        })
        .collect();
    let local: Vec<u16> = locals(&out)
        .iter()
        .filter_map(|(_, op)| match op {
            LocalOp::Digest { partition } => Some(*partition),
            _ => None,
        })
        .collect();
    assert_eq!((remote, local), (vec![1], vec![1]));
    h.local(a.id, LocalResult::Applied);
    assert_eq!(h.core.cursor(0, 1), Some(12));
    assert!(!h.core.is_idle(), "the repair is still to do");
}

/// The same through a poll's page.
#[test]
fn a_gap_in_a_polled_page_jumps_the_cursor_and_starts_anti_entropy_at_once() {
    let (mut h, commands) = Harness::started(config(), vec![vec![0, 2, 0, 0]]);
    let p = only(polls(&commands));
    let out = h.answer(p.id, pages(vec![poll_page(1, 10..=12, 10, 12)]));
    let a = only(applies(&out));
    assert_eq!(
        (a.partition, a.seqs.clone(), a.advance_to),
        (1, vec![10, 11, 12], 12)
    );
    assert_eq!(h.core.stats().gaps, 1);
    let digests: Vec<u16> = sends(&out)
        .iter()
        .filter_map(|(_, _, r)| match r {
            Request::Digest { partition } => Some(*partition),
            _ => None,
        })
        .collect();
    assert_eq!(digests, vec![1], "{out:?}");
    assert!(locals(&out)
        .iter()
        .any(|(_, op)| matches!(op, LocalOp::Digest { partition: 1 })));
    h.local(a.id, LocalResult::Applied);
    assert_eq!(h.core.cursor(0, 1), Some(12));
    assert!(!h.core.is_idle(), "the repair is still to do");
}

#[test]
fn a_fully_trimmed_feed_advances_the_cursor_to_its_end() {
    let (mut h, _) = Harness::started(config(), vec![vec![0, 0, 4, 0]]);
    let f = feeds(&h.answer_polls(&[0, 0, 20, 0]))[0].clone();
    // The peer keeps nothing: first_seq = last_seq + 1.
    let out = h.answer(
        f.id,
        Response::Feed {
            entries: vec![],
            first_seq: 21,
            last_seq: 20,
        },
    );
    let a = applies(&out)[0].clone();
    assert!(a.seqs.is_empty());
    assert!(a.advance_to >= 20);
    assert_eq!(h.core.stats().gaps, 1);
    assert!(has_ae(&out));
    h.local(a.id, LocalResult::Applied);
    assert_eq!(h.core.cursor(0, 2), Some(20));
}

#[test]
fn no_gap_when_the_page_starts_right_after_the_cursor() {
    let (mut h, _) = Harness::started(config(), vec![vec![9, 0, 0, 0]]);
    let f = feeds(&h.answer_polls(&[12, 0, 0, 0]))[0].clone();
    // Trimmed up to the cursor, but nothing we need is missing.
    let out = h.answer(f.id, page(10..=12, 10, 12));
    assert_eq!(h.core.stats().gaps, 0);
    assert!(!has_ae(&out), "{out:?}");
}

// ---------------------------------------------------------------------------------------------
// Anti-entropy
// ---------------------------------------------------------------------------------------------

/// A core with a periodic sweep of one partition per second (4 partitions, 4 s interval)
/// whose first round (peer 0, partition 0) has just started; returns it with the round's
/// remote and local digest command ids.
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

#[test]
fn a_gap_found_during_a_round_is_repaired_right_after_it() {
    let (mut h, remote, local) = ae_round_started();
    // A feed gap on partition 3 while partition 0's round is running.
    h.tick(100);
    let f = feeds(&h.answer_polls(&[0, 0, 0, 9]))[0].clone();
    let out = h.answer(f.id, page(5..=9, 5, 9));
    assert_eq!(h.core.stats().gaps, 1);
    assert!(!has_ae(&out), "one round at a time per peer: {out:?}");
    h.answer(remote, Response::Digest { buckets: vec![1] });
    let out = h.local(local, LocalResult::Digest(vec![1]));
    let digests: Vec<u16> = sends(&out)
        .iter()
        .filter_map(|(_, _, r)| match r {
            Request::Digest { partition } => Some(*partition),
            _ => None,
        })
        .collect();
    assert_eq!(digests, vec![3], "{out:?}");
}

#[test]
fn the_sweep_visits_every_partition_of_every_peer_within_the_interval() {
    let interval_ms = 8_000;
    let config = CoreConfig {
        partitions: 8,
        anti_entropy_interval_ms: interval_ms,
        ..config()
    };
    let tick_ms = 50;
    let (mut h, commands) = Harness::started(config, vec![vec![0; 8], vec![0; 8], vec![0; 8]]);
    let mut visits: BTreeMap<(PeerId, u16), Vec<u64>> = BTreeMap::new();
    let mut pending = commands;
    while h.now_ms <= 2 * interval_ms + 500 {
        // Answer everything at once (equal digests); polls are held by quiet peers in `run`.
        while !pending.is_empty() {
            let mut next = Vec::new();
            for command in pending {
                next.extend(match command {
                    Command::Send { id, peer, request } => match request {
                        Request::Heads { .. } => Vec::new(),
                        Request::Digest { partition } => {
                            visits.entry((peer, partition)).or_default().push(h.now_ms);
                            h.answer(
                                id,
                                Response::Digest {
                                    buckets: vec![5; 4],
                                },
                            )
                        }
                        other => panic!("unexpected {other:?}"),
                    },
                    Command::Local { id, op } => match op {
                        LocalOp::Digest { .. } => h.local(id, LocalResult::Digest(vec![5; 4])),
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
    // Peer 0 never answers; peer 1 holds each poll for its wait and answers it with nothing new.
    h.silent.insert(0);
    let first = polls(&commands).into_iter().find(|p| p.peer == 0).unwrap();
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
    // Just before the deadline (the wait, then the timeout): still waiting.
    assert!(step(&mut h, 1_499).is_empty());
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
        let p = only(polls(&retry));
        assert_eq!(p.peer, 0);
        last_id = p.id;
        // Let it time out too.
        assert!(step(&mut h, 1_499).is_empty());
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
    let late = h.answer(
        last_id,
        Response::Heads {
            last_seqs: vec![9; 4],
            pages: vec![poll_page(0, 1..=9, 1, 9)],
        },
    );
    assert!(late.is_empty(), "{late:?}");
    assert_eq!(h.core.backlog(0), 0);
    assert_eq!(h.core.cursor(0, 0), Some(0));
    assert_eq!(h.core.stats().requests, requests);
    // A success resets the backoff.
    let retry = step(&mut h, 800);
    let p = only(polls(&retry));
    let next = h.answer(p.id, nothing_new());
    let p = only(polls(&next));
    assert_eq!(p.peer, 0, "polled again at once");
    h.unreachable(p.id);
    assert!(step(&mut h, 99).is_empty());
    assert_eq!(
        polls(&step(&mut h, 1)).len(),
        1,
        "back to the first backoff step"
    );
    assert_eq!(h.core.stats().failures, 8);
}

#[test]
fn requests_to_other_peers_continue_during_a_backoff() {
    let (mut h, _) = Harness::started(config(), vec![vec![0; 4], vec![0; 4]]);
    let out = h.answer_poll(
        0,
        Response::Failed {
            reason: "store down".into(),
        },
    );
    assert!(out.is_empty());
    assert_eq!(h.core.stats().failures, 1);
    // Peer 1 is ahead: its feed is fetched while peer 0 backs off.
    let out = h.answer_poll(1, heads_only(&[2, 0, 0, 0]));
    let f = feeds(&out);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].peer, 1);
    assert!(sends(&out).iter().all(|(_, p, _)| *p == 1), "{out:?}");
    let out = h.tick(50);
    assert!(sends(&out).iter().all(|(_, p, _)| *p == 1), "{out:?}");
    let out = h.tick(50);
    assert_eq!(polls(&out).iter().filter(|p| p.peer == 0).count(), 1);
}

#[test]
fn failed_answers_and_transport_errors_back_off_and_retry_the_same_page() {
    for how in ["failed", "unreachable", "store"] {
        let (mut h, _) = Harness::started(config(), vec![vec![4, 0, 0, 0]]);
        let f = feeds(&h.answer_polls(&[8, 0, 0, 0]))[0].clone();
        let out = match how {
            "failed" => h.answer(
                f.id,
                Response::Failed {
                    reason: "busy".into(),
                },
            ),
            "unreachable" => h.unreachable(f.id),
            _ => {
                // The page arrived but our store could not apply it.
                let out = h.answer(f.id, page(5..=8, 1, 8));
                let a = applies(&out)[0].clone();
                h.handle(Event::Local {
                    id: a.id,
                    result: Err("disk full".into()),
                })
            }
        };
        assert!(feeds(&out).is_empty(), "{how}: {out:?}");
        assert_eq!(h.core.stats().failures, 1, "{how}");
        assert_eq!(h.core.cursor(0, 0), Some(4), "{how}");
        assert!(feeds(&h.tick(99)).is_empty(), "{how}: retried too early");
        let retry = feeds(&h.tick(1));
        assert_eq!(retry.len(), 1, "{how}");
        assert_eq!((retry[0].partition, retry[0].after), (0, 4), "{how}");
    }
}

/// A failed apply of a poll's page releases the partition and lets polls go on.
#[test]
fn a_failed_apply_of_a_polled_page_is_retried() {
    let (mut h, commands) = Harness::started(config(), vec![vec![4, 0, 0, 0]]);
    let p = only(polls(&commands));
    let a = only(applies(
        &h.answer(p.id, pages(vec![poll_page(0, 5..=8, 1, 8)])),
    ));
    let out = h.handle(Event::Local {
        id: a.id,
        result: Err("disk full".into()),
    });
    assert!(sends(&out).is_empty(), "{out:?}");
    assert_eq!(h.core.stats().failures, 1);
    assert_eq!(h.core.cursor(0, 0), Some(4));
    assert!(h.tick(99).is_empty(), "retried too early");
    // After the backoff, the partition (its head is known) is fetched again, and the poll
    // resumes, leaving the partition out.
    let out = h.tick(1);
    let f = only(feeds(&out));
    assert_eq!((f.partition, f.after), (0, 4));
    assert_eq!(only(polls(&out)).after, vec![u64::MAX, 0, 0, 0]);
}

#[test]
fn wrong_kind_answers_are_failures() {
    let (mut h, commands) = Harness::started(config(), vec![vec![0; 4]]);
    let p = only(polls(&commands));
    let out = h.answer(p.id, Response::Pushed);
    assert!(out.is_empty());
    assert_eq!(h.core.stats().failures, 1);
    assert!(h.tick(99).is_empty());
    let retry = h.tick(1);
    assert_eq!(polls(&retry).len(), 1, "{retry:?}");
    let out = h.answer_polls(&[3, 0, 0, 0]);
    let f = feeds(&out)[0].clone();
    let out = h.answer(f.id, Response::Digest { buckets: vec![1] });
    assert!(applies(&out).is_empty());
    assert_eq!(h.core.stats().failures, 2);
    assert_eq!(h.core.cursor(0, 0), Some(0));
    // The partition is not left stuck as "being fetched": it is asked for again.
    let mut refetched = Vec::new();
    for _ in 0..10 {
        refetched.extend(feeds(&h.tick(100)));
        refetched.extend(feeds(&h.answer_polls(&[3, 0, 0, 0])));
    }
    assert_eq!(refetched.len(), 1, "{refetched:?}");
    assert_eq!(refetched[0].after, 0);
}

#[test]
fn repeated_wrong_kind_answers_back_off_exponentially() {
    let (mut h, commands) = Harness::started(config(), vec![vec![0; 4]]);
    let mut id = only(polls(&commands)).id;
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
    let (mut h, commands) = Harness::started(config(), vec![vec![0; 4]]);
    let first_poll = only(polls(&commands)).id;
    let f = feeds(&h.answer_polls(&[3, 0, 0, 0]))[0].clone();
    // The poll's answer again, with news.
    assert!(h
        .answer(
            first_poll,
            Response::Heads {
                last_seqs: vec![9; 4],
                pages: vec![poll_page(1, 1..=2, 1, 2)],
            }
        )
        .is_empty());
    assert_eq!(h.core.backlog(0), 3);
    let out = h.answer(f.id, page(1..=3, 1, 3));
    let a = applies(&out)[0].clone();
    // The same page again: nothing to do.
    assert!(h.answer(f.id, page(1..=3, 1, 3)).is_empty());
    h.local(a.id, LocalResult::Applied);
    assert_eq!(h.core.cursor(0, 0), Some(3));
    let stats = h.core.stats().clone();
    // The same outcome again, and answers to ids never issued.
    assert!(h.local(a.id, LocalResult::Applied).is_empty());
    assert!(h.answer(999_999, page(4..=9, 1, 9)).is_empty());
    assert!(h
        .answer(999_996, pages(vec![poll_page(2, 1..=2, 1, 2)]))
        .is_empty());
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
        ..config()
    };
    let (mut h, _) = Harness::started(config, vec![vec![0; 4]]);
    let f = feeds(&h.answer_polls(&[5, 0, 0, 0]))[0].clone();
    let old_poll = h.polls_out[&0].id;
    let out = h.answer(f.id, page(1..=2, 1, 5));
    let a = applies(&out)[0].clone();
    // Crash: the page was applied and the cursor stored (at 2), but the outcome was lost.
    let start = h.handle(Event::Start);
    let [(load, LocalOp::LoadCursors)] = locals(&start)[..] else {
        panic!("{start:?}")
    };
    assert!(sends(&start).is_empty());
    assert!(!h.core.is_idle());
    // Answers to the old incarnation's work are ignored.
    assert!(h.local(a.id, LocalResult::Applied).is_empty());
    assert!(h.answer(f.id, page(1..=5, 1, 5)).is_empty());
    assert!(h
        .answer(old_poll, pages(vec![poll_page(1, 1..=3, 1, 3)]))
        .is_empty());
    assert!(
        h.tick(1_000).is_empty(),
        "nothing before the cursors are back"
    );
    let out = h.local(load, LocalResult::Cursors(vec![vec![2, 0, 0, 0]]));
    assert_eq!(h.core.cursor(0, 0), Some(2));
    assert_eq!(only(polls(&out)).after, vec![2, 0, 0, 0]);
    let out = h.answer_polls(&[5, 0, 0, 0]);
    let f = feeds(&out);
    assert_eq!(f.len(), 1, "{out:?}");
    assert_eq!((f[0].partition, f[0].after), (0, 2));
    let out = h.answer(f[0].id, page(3..=5, 1, 5));
    h.local(applies(&out)[0].id, LocalResult::Applied);
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
    let mut out = h.answer_poll(0, heads_only(&[3, 0, 0, 0]));
    out.extend(h.answer_poll(1, heads_only(&[0; 4])));
    let f = feeds(&out)[0].clone();
    let out = h.answer(
        f.id,
        Response::Feed {
            // The third was written by a region whose clock runs ahead of ours.
            entries: vec![entry(1, 9_000), entry(2, 9_500), entry(3, 20_000)],
            first_seq: 1,
            last_seq: 3,
        },
    );
    let a = applies(&out)[0].clone();
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

/// Lets time pass (quiet peers) until an anti-entropy round starts; returns its remote and
/// local digest command ids.
fn next_round(h: &mut Harness, mut out: Vec<Command>) -> (CommandId, CommandId) {
    let deadline = h.now_ms + 60_000;
    loop {
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
    let out = h.answer(poll.id, nothing_new());
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
    // The first sweep is due at 1 s; the poll out then is answered at 1 s (after its wait).
    let (remote, local) = next_round(&mut h, Vec::new());
    assert_eq!(h.now_ms, 1_000, "the sweep due at 1 s started late");
    assert_eq!(h.core.in_flight(0), 1);
    // And polls resume as soon as the round frees the slot.
    let out = h.answer(remote, Response::Digest { buckets: vec![5] });
    assert_eq!(only(polls(&out)).after, vec![0; 4]);
    h.local(local, LocalResult::Digest(vec![5]));
    assert_eq!(h.core.stats().ae_rounds, 1);
    assert_eq!(h.core.stats().failures, 0);
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
    /// The request's answer never comes.
    Lose {
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
}

const PEERS: usize = 2;
const PARTITIONS: u16 = 4;

fn prop_config() -> CoreConfig {
    CoreConfig {
        partitions: PARTITIONS,
        poll_interval_ms: 100,
        pull_wait_ms: 300,
        feed_batch_max: 3,
        requests_in_flight_max: 3,
        request_timeout_ms: 1_000,
        retry_backoff_ms: 50,
        retry_backoff_max_ms: 400,
        anti_entropy_interval_ms: 2_000,
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
        6 => (any::<usize>(), prop::bool::weighted(0.9), any::<u8>())
            .prop_map(|(pick, ok, salt)| Action::Local { pick, ok, salt }),
        1 => any::<usize>().prop_map(|pick| Action::Replay { pick }),
        3 => (0..PEERS, 0..PARTITIONS, 1u64..8)
            .prop_map(|(peer, partition, n)| Action::Write { peer, partition, n }),
        1 => (0..PEERS, 0..PARTITIONS, 1u64..8)
            .prop_map(|(peer, partition, n)| Action::Trim { peer, partition, n }),
        1 => Just(Action::Restart),
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
    /// The partition of a feed request.
    fetching: Option<u16>,
}

/// The peers' feeds, this region's store, and what is out: the world the core runs in.
struct World {
    h: Harness,
    /// `(first_seq, last_seq)` of each peer's partition feeds.
    feeds: Vec<Vec<(u64, u64)>>,
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
    /// Feed requests sent.
    feed_requests: usize,
}

impl World {
    fn new() -> Self {
        let mut w = Self {
            h: Harness::new(prop_config(), PEERS),
            feeds: vec![vec![(1, 0); usize::from(PARTITIONS)]; PEERS],
            stored: vec![vec![0; usize::from(PARTITIONS)]; PEERS],
            sends: Vec::new(),
            out: Vec::new(),
            locals: Vec::new(),
            delivered: Vec::new(),
            seen: vec![vec![0; usize::from(PARTITIONS)]; PEERS],
            loaded: false,
            load: None,
            feed_requests: 0,
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
        if let Event::Remote { id, .. } = &event {
            self.out.retain(|o| o.id != *id);
        }
        let gaps_before = self.h.core.stats().gaps;
        let cursors_before = self.cursors();
        let commands = self.h.handle(event.clone());
        self.delivered.push(event);
        if self.delivered.len() > 32 {
            self.delivered.remove(0);
        }
        let mut skipping_applies = 0;
        // Cursors each poll of this step was sent with, to check the feed requests after it.
        let mut polled: BTreeMap<PeerId, Vec<u64>> = BTreeMap::new();
        for command in commands {
            match command {
                Command::Send { id, peer, request } => {
                    assert!(peer < PEERS);
                    let mut deadline_ms = self.h.now_ms + config.request_timeout_ms;
                    if let Request::Feed {
                        partition,
                        after,
                        limit,
                    } = &request
                    {
                        self.feed_requests += 1;
                        assert_eq!(*limit, config.feed_batch_max);
                        assert_eq!(Some(*after), self.h.core.cursor(peer, *partition));
                        assert!(
                            !self
                                .out
                                .iter()
                                .any(|o| o.peer == peer && o.fetching == Some(*partition)),
                            "two fetches of one partition at once"
                        );
                        assert!(
                            polled
                                .get(&peer)
                                .is_none_or(|after| after[usize::from(*partition)] == u64::MAX),
                            "a partition fetched with a feed request and a poll at once"
                        );
                    }
                    if let Request::Heads {
                        after,
                        limit,
                        wait_ms,
                    } = &request
                    {
                        assert_eq!(*limit, config.feed_batch_max);
                        assert_eq!(u64::from(*wait_ms), config.pull_wait_ms);
                        assert!(
                            !self.locals.iter().any(|(_, op)| matches!(
                                op,
                                LocalOp::ApplyFeed { peer: p, .. } if *p == peer
                            )),
                            "a poll while a page of that peer is being applied"
                        );
                        assert_eq!(after.len(), usize::from(PARTITIONS));
                        for (partition, sent) in after.iter().enumerate() {
                            let fetching = self
                                .out
                                .iter()
                                .any(|o| o.peer == peer && o.fetching == Some(partition as u16));
                            if fetching {
                                assert_eq!(*sent, u64::MAX, "a partition being fetched polled");
                            } else {
                                assert_eq!(
                                    Some(*sent),
                                    self.h.core.cursor(peer, partition as u16),
                                    "a poll without the cursor of partition {partition}"
                                );
                            }
                        }
                        polled.insert(peer, after.clone());
                        deadline_ms += u64::from(*wait_ms);
                    }
                    let fetching = match &request {
                        Request::Feed { partition, .. } => Some(*partition),
                        _ => None,
                    };
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
                        fetching,
                    });
                }
                Command::Local { id, op } => {
                    if let LocalOp::ApplyFeed {
                        peer,
                        partition,
                        entries,
                        advance_to,
                    } = &op
                    {
                        let cursor = cursors_before[*peer][usize::from(*partition)];
                        assert!(*advance_to > cursor, "an apply that changes nothing");
                        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
                        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
                        assert!(seqs.last().is_none_or(|s| s == advance_to));
                        if seqs.first() != Some(&(cursor + 1)) {
                            skipping_applies += 1;
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
        assert!(
            self.h.core.stats().gaps - gaps_before >= skipping_applies,
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
        let now = self.cursors();
        for (peer, cursors) in now.iter().enumerate() {
            for (partition, cursor) in cursors.iter().enumerate() {
                assert!(*cursor >= self.seen[peer][partition], "cursor moved back");
                assert!(*cursor <= self.stored[peer][partition]);
                let (_, last) = self.feeds[peer][partition];
                assert!(*cursor <= last, "cursor past the peer's feed");
            }
        }
        self.seen = now;
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

    fn right_answer(&self, peer: PeerId, request: &Request, salt: u8) -> Response {
        match request {
            Request::Heads { after, limit, .. } => serve_poll(&self.feeds[peer], after, *limit),
            Request::Feed {
                partition,
                after,
                limit,
            } => {
                let (first, last) = self.feeds[peer][usize::from(*partition)];
                let from = (after + 1).max(first);
                let to = last.min(from + u64::from(*limit) - 1);
                Response::Feed {
                    entries: (from..=to).map(|s| entry(s, s)).collect(),
                    first_seq: first,
                    last_seq: last,
                }
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
            _ => panic!("unknown request"),
        }
    }

    /// Whether the peer still holds this request: a poll with nothing new, within its wait.
    fn held(&self, sent: &Sent) -> bool {
        let Request::Heads { wait_ms, .. } = &sent.request else {
            return false;
        };
        self.h.now_ms < sent.sent_ms + u64::from(*wait_ms)
            && self
                .right_answer(sent.peer, &sent.request, 0)
                .is_empty_poll()
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
                let result = match how {
                    How::Right => Ok(self.right_answer(peer, &request, salt)),
                    How::Failed => Ok(Response::Failed {
                        reason: "busy".into(),
                    }),
                    How::Unreachable => Err("unreachable".into()),
                    How::WrongKind => Ok(match request {
                        Request::Push { .. } => Response::Digest { buckets: vec![] },
                        _ => Response::Pushed,
                    }),
                };
                self.step(Event::Remote { id, result });
            }
            Action::Lose { pick } => {
                if !self.sends.is_empty() {
                    let n = self.sends.len();
                    self.sends.remove(pick % n);
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
                self.step(Event::Remote {
                    id,
                    result: Ok(response),
                });
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

    /// Any interleaving of answers, losses, failures, duplicates, held polls, writes, trims and
    /// restarts: no panic, never more than `requests_in_flight_max` requests out to one peer,
    /// polls carry the cursors (`u64::MAX` for partitions being fetched) and wait for pending
    /// applies, cursors only move forward and never skip an entry silently, and once the
    /// network heals the core catches up with every feed and goes idle.
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
}

/// The same with writes arriving while polls are held: a held poll is answered as soon as its
/// peer has news, and the entries arrive in the poll's pages.
#[test]
fn the_property_world_delivers_writes_through_held_polls() {
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
    // Two entries fit in one page: each write comes in one poll's answer, no feed request.
    assert_eq!(world.feed_requests, 0);
    assert!(world.h.core.stats().requests > requests);
}
