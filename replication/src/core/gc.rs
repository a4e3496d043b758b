//! Tombstone garbage collection by causal stability.
//!
//! A delete leaves a tombstone: a value with no live dot that keeps the causal context of what
//! it removed, so a delayed delta cannot resurrect it. It may be purged once no region can ever
//! again receive a live dot it removed. A round on one partition establishes that:
//!
//! Each partition is collected by one region (partition `p` by the region ranked
//! `p % regions` among all region names), which tells the others what to purge: every region
//! probing every partition would cost a probe per region pair per partition.
//!
//! 1. list the local tombstones of the partition ([`LocalOp::Tombstones`]) and read our own
//!    feed head `h_self`;
//! 2. ask every peer ([`Request::Stability`]) for its value hash of each key, its feed head `h_R`
//!    (read after the hashes) and its cursors on every other region's feed;
//! 3. a tombstone is stable when every peer holds the identical tombstone (same hash) and
//!    every region has pulled every feed past that feed's reported head: each peer's cursor on
//!    region `O` is at least `h_O`, and so is ours.
//!
//! Why that suffices: a dot only ever enters a feed at the region that minted it, before that
//! region held the tombstone, hence at or below the head it reported; so once every cursor
//! passed every reported head, no feed will deliver a removed dot again, and anti-entropy only
//! moves states, none of which holds one live. Any region may then purge; we purge ours
//! ([`LocalOp::Purge`], conditional on the version we listed) and tell every peer
//! ([`Request::Purge`], conditional on the hash). A lost purge message is harmless: the
//! peer's own rounds find the tombstone again, and if anti-entropy copies a tombstone back to
//! a region that purged it, a later round purges it again. Stores never reuse a dot of a
//! purged value (their per-partition dot floor), so a key written again after its purge is
//! safe everywhere.

use super::{Command, LocalOp, PeerId, Purpose, ReplicatorCore};
use crate::wire::{Request, Response};

/// One garbage-collection round's progress.
#[derive(Clone, Debug, Default)]
pub(super) enum GcRound {
    #[default]
    Idle,
    /// Waiting for the local listing.
    Listing { round: u64, partition: u16 },
    /// Waiting for every peer's answer.
    Probing {
        round: u64,
        partition: u16,
        /// `(key, version, hash)` of our tombstones.
        tombstones: Vec<(String, u64, u64)>,
        own_head: u64,
        answers: Vec<Option<Probe>>,
    },
    /// Waiting for the local purge.
    Purging { round: u64 },
}

/// One peer's answer to a stability probe.
#[derive(Clone, Debug)]
pub(super) struct Probe {
    hashes: Vec<Option<u64>>,
    head: u64,
    /// The peer's cursors on the origins we listed for it: ours first, then the other peers in
    /// index order.
    cursors: Vec<u64>,
}

/// Garbage-collection state of a core.
#[derive(Clone, Debug, Default)]
pub(super) struct Gc {
    pub(super) round: GcRound,
    round_seq: u64,
    /// The partitions this region collects: every region takes its share (by its rank among
    /// all region names), so each partition is probed by one region, not by all of them.
    owned: Vec<u16>,
    /// Index into `owned` of the next partition to collect.
    next_partition: usize,
    next_ms: u64,
    /// Tombstones found by the last listing of each partition.
    pending: Vec<u64>,
    /// Where the next listing of each partition resumes (partitions with more tombstones
    /// than a round examines are listed a page at a time).
    resume: Vec<Option<String>>,
}

impl Gc {
    pub(super) fn new(partitions: u16, region: &str, peers: &[String]) -> Self {
        let mut names: Vec<&str> = peers.iter().map(String::as_str).collect();
        names.push(region);
        names.sort_unstable();
        names.dedup();
        let rank = names.iter().position(|n| *n == region).unwrap_or(0);
        let regions = names.len().max(1);
        Self {
            owned: (0..partitions)
                .filter(|p| usize::from(*p) % regions == rank)
                .collect(),
            pending: vec![0; usize::from(partitions)],
            resume: vec![None; usize::from(partitions)],
            ..Self::default()
        }
    }

    /// Tombstones waiting for stability, as last counted.
    pub(super) fn pending(&self) -> u64 {
        self.pending.iter().sum()
    }

    /// Moves timers back after a clock step.
    pub(super) fn clock_stepped_back(&mut self, by_ms: u64) {
        self.next_ms = self.next_ms.saturating_sub(by_ms);
    }

    /// Restarts the sweep after a (re)start.
    pub(super) fn restart(&mut self, now_ms: u64, step_ms: u64) {
        self.round = GcRound::Idle;
        self.next_ms = now_ms + step_ms;
    }
}

impl ReplicatorCore {
    /// Time between two garbage-collection rounds (one partition each).
    pub(super) fn gc_step_ms(&self) -> u64 {
        (self.config.gc_interval_ms / (self.gc.owned.len().max(1) as u64)).max(1)
    }

    /// The origins a peer reports cursors for: every region but the peer, ourselves first.
    fn gc_origins(&self, peer: PeerId) -> Vec<String> {
        std::iter::once(self.region.clone())
            .chain(
                self.peer_names
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != peer)
                    .map(|(_, n)| n.clone()),
            )
            .collect()
    }

    /// Starts a round when one is due and every peer is reachable with a free slot.
    pub(super) fn gc_schedule(&mut self, now_ms: u64, out: &mut Vec<Command>) {
        if self.config.gc_interval_ms == 0
            || self.gc.owned.is_empty()
            || !matches!(self.gc.round, GcRound::Idle)
            || self.gc.next_ms > now_ms
        {
            return;
        }
        self.gc.next_ms = now_ms + self.gc_step_ms();
        let healthy = self
            .peers
            .iter()
            .all(|p| p.retry_at_ms <= now_ms && p.in_flight < self.config.requests_in_flight_max);
        if !healthy {
            // Stability needs every region's answer: wait for the next step.
            return;
        }
        let partition = self.gc.owned[self.gc.next_partition % self.gc.owned.len()];
        self.gc.next_partition = (self.gc.next_partition + 1) % self.gc.owned.len();
        self.gc.round_seq += 1;
        let round = self.gc.round_seq;
        self.gc.round = GcRound::Listing { round, partition };
        let after = self.gc.resume[usize::from(partition)].clone();
        out.push(self.local(
            LocalOp::Tombstones {
                partition,
                after,
                limit: self.config.gc_keys_per_round_max,
            },
            Purpose::GcList { round },
        ));
    }

    /// The local listing is in: probe every peer.
    pub(super) fn gc_listed(
        &mut self,
        round: u64,
        items: Vec<(String, u64, u64)>,
        next: Option<String>,
        head: u64,
        out: &mut Vec<Command>,
    ) {
        let GcRound::Listing {
            round: current,
            partition,
        } = self.gc.round
        else {
            return;
        };
        if current != round {
            return;
        }
        // A partition listed a page at a time adds up its pages until the listing starts over.
        let index = usize::from(partition);
        self.gc.pending[index] = if self.gc.resume[index].is_some() {
            self.gc.pending[index] + items.len() as u64
        } else {
            items.len() as u64
        };
        self.gc.resume[index] = next;
        if items.is_empty() || self.peers.is_empty() {
            // With no peer, nothing would ever confirm stability: keep every tombstone.
            self.gc.round = GcRound::Idle;
            return;
        }
        let keys: Vec<String> = items.iter().map(|(k, _, _)| k.clone()).collect();
        for peer in 0..self.peers.len() {
            let request = Request::Stability {
                partition,
                keys: keys.clone(),
                origins: self.gc_origins(peer),
            };
            out.push(self.send(peer, request, Purpose::GcProbe { peer, round }));
        }
        self.gc.round = GcRound::Probing {
            round,
            partition,
            tombstones: items,
            own_head: head,
            answers: vec![None; self.peers.len()],
        };
    }

    /// A peer answered a probe; once all have, purge what is stable.
    pub(super) fn gc_probed(
        &mut self,
        peer: PeerId,
        round: u64,
        response: Response,
        out: &mut Vec<Command>,
    ) -> bool {
        let Response::Stability {
            hashes,
            head,
            cursors,
        } = response
        else {
            return false;
        };
        let GcRound::Probing {
            round: current,
            tombstones,
            answers,
            ..
        } = &mut self.gc.round
        else {
            return true;
        };
        if *current != round {
            return true;
        }
        if hashes.len() != tombstones.len() || cursors.len() != self.peers.len() {
            return false;
        }
        answers[peer] = Some(Probe {
            hashes,
            head,
            cursors,
        });
        if answers.iter().all(Option::is_some) {
            self.gc_decide(out);
        }
        true
    }

    /// Every peer answered: purge the stable tombstones here and everywhere.
    fn gc_decide(&mut self, out: &mut Vec<Command>) {
        let GcRound::Probing {
            round,
            partition,
            tombstones,
            own_head,
            answers,
        } = std::mem::take(&mut self.gc.round)
        else {
            return;
        };
        let probes: Vec<Probe> = answers.into_iter().flatten().collect();
        // Every region has pulled every feed past the head its owner reported.
        let heads: Vec<u64> = probes.iter().map(|p| p.head).collect();
        let ours_caught_up = heads
            .iter()
            .enumerate()
            .all(|(peer, head)| self.peers[peer].links[usize::from(partition)].cursor >= *head);
        let theirs_caught_up = probes.iter().enumerate().all(|(peer, probe)| {
            // Origins listed for `peer`: ourselves, then the other peers in index order.
            let expected = std::iter::once(own_head).chain(
                heads
                    .iter()
                    .enumerate()
                    .filter(|(q, _)| *q != peer)
                    .map(|(_, h)| *h),
            );
            probe.cursors.iter().zip(expected).all(|(c, h)| *c >= h)
        });
        if !(ours_caught_up && theirs_caught_up) {
            return;
        }
        let stable: Vec<(String, u64, u64)> = tombstones
            .into_iter()
            .enumerate()
            .filter(|(i, (_, _, hash))| probes.iter().all(|p| p.hashes[*i] == Some(*hash)))
            .map(|(_, t)| t)
            .collect();
        if stable.is_empty() {
            return;
        }
        let keys: Vec<(String, u64)> = stable.iter().map(|(k, _, h)| (k.clone(), *h)).collect();
        for peer in 0..self.peers.len() {
            if self.peers[peer].in_flight < self.config.requests_in_flight_max {
                let request = Request::Purge { keys: keys.clone() };
                out.push(self.send(peer, request, Purpose::GcPurge { peer }));
            }
        }
        self.gc.round = GcRound::Purging { round };
        out.push(self.local(
            LocalOp::Purge {
                keys: stable.into_iter().map(|(k, v, _)| (k, v)).collect(),
            },
            Purpose::GcPurgeLocal { round, partition },
        ));
    }

    /// The local purge is done.
    pub(super) fn gc_purged(&mut self, round: u64, partition: u16, purged: usize) {
        self.stats.tombstones_purged += purged as u64;
        let pending = &mut self.gc.pending[usize::from(partition)];
        *pending = pending.saturating_sub(purged as u64);
        if matches!(self.gc.round, GcRound::Purging { round: r } if r == round) {
            self.gc.round = GcRound::Idle;
        }
    }

    /// A round's step failed: drop the round (the partition comes round again).
    pub(super) fn gc_abandon(&mut self, round: u64) {
        let current = match self.gc.round {
            GcRound::Idle => return,
            GcRound::Listing { round, .. }
            | GcRound::Probing { round, .. }
            | GcRound::Purging { round } => round,
        };
        if current == round {
            self.gc.round = GcRound::Idle;
        }
    }
}
