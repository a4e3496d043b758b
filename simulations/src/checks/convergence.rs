//! Invariant: **after the heal, every region converges within a bound derived from the
//! replication settings.**
//!
//! `converged_ms` (the first sample after the heal at which every replicator runs and every
//! digest bucket of every partition agrees across all regions) must be `Some`, and
//!
//! ```text
//! converged_ms - heal_ms <= bound_ms
//! ```
//!
//! # The bound
//!
//! Writes stop at the heal, and the healed network is lossless (with `link_loss_healed > 0`
//! no bound holds deterministically: only convergence itself is checked). One-way delays are
//! then at most `L = link_latency_max_ms`, so a request and its answer take at most
//! `RTT = 2L`. With the replicators' settings (`T` request timeout, `B` longest retry backoff,
//! `t` tick, `p` first retry delay (the scenario's `poll_interval_ms`), `P` partitions, `F`
//! feed entries per page, `Q` requests in flight per peer, `K` digest buckets, `Kr` buckets and
//! `Kk` keys per anti-entropy round), `N` acknowledged writes, `D` distinct keys written and
//! `S` the sampling period:
//!
//! 1. **settle = `T + B + 2t`.** A request sent before the heal is answered or expires by
//!    `heal + T`, noticed at the next tick (`+ t`). The last failure backs its peer off for at
//!    most `B`, again noticed at a tick (`+ t`). After that no request fails: the network is
//!    healed and lossless. A replicator still down at the heal restarts there, with no
//!    backoff.
//! 2. **discover = `p + RTT`.** Each replicator then has a poll session open with each peer
//!    (polls waiting there), or opens one at once: the opening poll is answered at once with
//!    the entries after its cursors. `p` (the first retry delay) is slack.
//! 3. **feed = `RTT * (ceil(P / (Q - 3)) + ceil(N / F))`.** A backlog is shipped `F` entries
//!    per poll answer, several polls per round trip; counting one page per round trip per `F`
//!    entries (at most `N` entries in all), plus `ceil(P / (Q - 3))` round trips as in the
//!    earlier design that fetched lagging partitions one request each, over-counts. Feeds
//!    carry every write that was not trimmed, so without trimming this is the last step.
//! 4. **repair = `P * (3 * (ceil(K / Kr) + ceil(D / Kk)) + 1) * RTT`, only if a feed gap was
//!    found** (`stats.gaps > 0`: a peer trimmed entries before they were applied). A gap
//!    queues its partition for anti-entropy, ahead of the periodic sweep. A peer runs one round
//!    at a time. A round reconciles the partition by coded symbols: one round trip opens it
//!    and brings the first symbols, which decode the few keys a gap leaves different in the
//!    shipped scenarios, then one fetches the peer's states of its differing keys and one
//!    pushes ours: three round trips for at most `Kk` keys, re-queued until all are covered.
//!    A partition whose differences need more symbols takes more round trips for them, one
//!    per batch; one that does not decode within a round's symbols goes to the bucket
//!    comparison (a digest exchange, a bucket-list exchange and a state exchange per `Kr`
//!    buckets and `Kk` keys). The budget kept here (that of the bucket comparison alone, plus
//!    a final digest round trip) covers what the scenarios' gaps need; a run whose repair
//!    takes longer fails the check rather than passing silently. At most all `P` partitions
//!    need it, one after another.
//! 5. **observe = `S`.** Convergence is noticed at the next sample.
//!
//! `bound = settle + discover + feed + repair + observe`. The periodic anti-entropy sweep is
//! deliberately *not* part of it: every difference after a heal is carried by a feed or
//! flagged by a gap, so a run that needs the sweep to converge (for example because a
//! replicator's timers stalled) exceeds the bound and fails.

use crate::checks::{CheckResult, Findings};
use crate::Outcome;

/// The bound and its terms, for messages and reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    /// The whole bound, milliseconds after the heal.
    pub total_ms: u64,
    /// `(term, milliseconds)` in the order of the module docs.
    pub terms: Vec<(&'static str, u64)>,
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let terms: Vec<String> = self.terms.iter().map(|(n, v)| format!("{n} {v}")).collect();
        write!(f, "{} ms = {}", self.total_ms, terms.join(" + "))
    }
}

fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b.max(1))
}

/// The bound on convergence after the heal for `outcome`'s settings (see the module docs).
pub fn bound(outcome: &Outcome) -> Bound {
    let c = &outcome.core;
    let rtt = 2 * outcome.link_latency_max_ms;
    let partitions = u64::from(c.partitions);
    let writes = outcome.acked.len() as u64;
    let keys = {
        let mut keys: Vec<&str> = outcome.acked.iter().map(|w| w.key.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        keys.len() as u64
    };
    let settle = c.request_timeout_ms + c.retry_backoff_max_ms + 2 * outcome.tick_ms;
    let discover = outcome.poll_interval_ms + rtt;
    let waves = ceil_div(
        partitions,
        (c.requests_in_flight_max as u64).saturating_sub(3),
    );
    let feed = rtt * (waves + ceil_div(writes, u64::from(c.feed_batch_max)));
    let rounds = ceil_div(
        u64::from(outcome.buckets),
        c.ae_buckets_per_round_max as u64,
    ) + ceil_div(keys, c.ae_keys_per_round_max as u64);
    let gaps: u64 = outcome.stats.iter().map(|s| s.gaps).sum();
    let repair = if gaps > 0 {
        partitions * (3 * rounds + 1) * rtt
    } else {
        0
    };
    let observe = outcome.sample_ms;
    let terms = vec![
        ("settle", settle),
        ("discover", discover),
        ("feed", feed),
        ("repair", repair),
        ("observe", observe),
    ];
    Bound {
        total_ms: terms.iter().map(|(_, v)| v).sum(),
        terms,
    }
}

/// Runs the check.
pub fn check(outcome: &Outcome) -> CheckResult {
    let mut f = Findings::new("convergence");
    f.checked();
    let Some(converged) = outcome.converged_ms else {
        f.fail(format!(
            "did not converge within {} ms after the heal at {} ms",
            outcome.converge_timeout_ms, outcome.heal_ms
        ));
        return f.finish();
    };
    if converged < outcome.heal_ms {
        f.fail(format!(
            "converged at {converged} ms, before the heal at {} ms",
            outcome.heal_ms
        ));
        return f.finish();
    }
    let took = converged - outcome.heal_ms;
    if outcome.link_loss_healed > 0.0 {
        // A lossy healed network: no deterministic bound, convergence itself is the check.
        return f.finish();
    }
    let b = bound(outcome);
    if took > b.total_ms {
        f.fail(format!(
            "converged {took} ms after the heal, beyond the bound of {b}"
        ));
    }
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testkit::{small_run, Builder};

    #[test]
    fn the_bound_adds_up_its_terms() {
        let mut outcome = Builder::new(2).outcome();
        let b = bound(&outcome);
        // T 1000 + B 1000 + 2t 20; p 50 + RTT 120; 16 partitions over 13 free request slots
        // (two waves), no writes; no gap, so no repair; S 100.
        assert_eq!(
            b.terms,
            vec![
                ("settle", 2_020),
                ("discover", 170),
                ("feed", 240),
                ("repair", 0),
                ("observe", 100),
            ]
        );
        assert_eq!(b.total_ms, 2_530);
        assert_eq!(
            b.to_string(),
            "2530 ms = settle 2020 + discover 170 + feed 240 + repair 0 + observe 100"
        );
        // A feed gap adds anti-entropy repair of every partition: one round per partition (64
        // buckets, no keys written), so 3 + 1 round trips each.
        outcome.stats[1].gaps = 1;
        assert_eq!(bound(&outcome).terms[3], ("repair", 16 * 4 * 120));
        // Writes add feed pages: 1025 writes are three pages of 512.
        let mut b = Builder::new(2);
        for i in 0..1025 {
            b.write(
                0,
                &format!("c:{}", i % 7),
                geostate_crdt::Op::Counter(geostate_crdt::CounterOp::inc(1)),
                i,
            );
        }
        assert_eq!(bound(&b.outcome()).terms[2], ("feed", 120 * (2 + 3)));
    }

    #[test]
    fn converging_within_the_bound_passes() {
        let mut outcome = Builder::new(2).outcome();
        assert!(check(&outcome).passed);
        outcome.converged_ms = Some(outcome.heal_ms + bound(&outcome).total_ms);
        assert!(check(&outcome).passed);
    }

    #[test]
    fn converging_late_or_never_fails() {
        let mut outcome = Builder::new(2).outcome();
        outcome.converged_ms = Some(outcome.heal_ms + bound(&outcome).total_ms + 1);
        let r = check(&outcome);
        assert!(!r.passed);
        assert!(r.details[0].contains("beyond the bound of 2530 ms"), "{r}");
        outcome.converged_ms = None;
        assert!(check(&outcome).details[0].contains("did not converge"));
        outcome.converged_ms = Some(outcome.heal_ms - 1);
        assert!(!check(&outcome).passed);
    }

    #[test]
    fn a_lossy_healed_network_only_needs_to_converge() {
        let mut outcome = Builder::new(2).outcome();
        outcome.link_loss_healed = 0.01;
        outcome.converged_ms = Some(outcome.heal_ms + 10 * bound(&outcome).total_ms);
        assert!(check(&outcome).passed);
        outcome.converged_ms = None;
        assert!(!check(&outcome).passed);
    }

    #[test]
    fn an_engine_run_converges_well_within_the_bound() {
        let outcome = small_run(71);
        let r = check(&outcome);
        assert!(r.passed, "{r}");
        let took = outcome.converged_ms.unwrap_or(u64::MAX) - outcome.heal_ms;
        assert!(took <= bound(&outcome).total_ms, "took {took} ms");
    }
}
