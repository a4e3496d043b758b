//! Invariant: **an LWW register's winner is the live write with the greatest
//! `(HLC, actor, dot counter)`.**
//!
//! For every last-writer-wins key `k` (`KeyKind::Lww`), the [oracle](super::oracle) built
//! from the acknowledged deltas gives the live writes, each with the stamp its delta carries
//! (not the writer's clock: a write that overwrites a value stamped later than the writer's
//! clock is raised past it, see `geostate_crdt::register`). In every region `r`:
//!
//! 1. the winner of `states[r][k]` is the live write with the greatest `(HLC, actor,
//!    counter)`: same dot, same stamp, same value (no live write: no winner);
//! 2. the register's entries are exactly the live writes (concurrent losers are kept, so a
//!    later merge still picks the same winner);
//! 3. if no acknowledged write on `k` cleared or deleted it, the winner is also the greatest
//!    acknowledged write of all: a write that saw another is always stamped above it, so an
//!    overwritten write can never outrank the one that overwrote it.

use std::collections::{BTreeMap, BTreeSet};

use geostate_crdt::{ActorId, Crdt, Dot, Hlc, Op, RegisterOp, Stamped};

use crate::checks::oracle::{self, Payload};
use crate::checks::{CheckResult, Findings};
use crate::{KeyKind, Outcome};

/// The last-writer-wins rank of a write.
pub fn rank(dot: Dot, stamp: &Stamped<Vec<u8>>) -> (Hlc, ActorId, u64) {
    (stamp.hlc, dot.actor, dot.counter)
}

/// A write for messages.
pub(crate) fn show(dot: Dot, stamp: &Stamped<Vec<u8>>) -> String {
    format!(
        "{:?} (dot {dot}, hlc {}.{})",
        String::from_utf8_lossy(&stamp.value),
        stamp.hlc.physical_ms(),
        stamp.hlc.logical()
    )
}

fn show_opt(w: Option<(Dot, &Stamped<Vec<u8>>)>) -> String {
    w.map_or_else(|| "nothing".to_string(), |(d, s)| show(d, s))
}

/// The live writes of a key, by dot.
pub(crate) fn live_writes(o: &oracle::KeyOracle) -> BTreeMap<Dot, &Stamped<Vec<u8>>> {
    o.live()
        .filter_map(|(d, p)| match p {
            Payload::Write(s) => Some((d, s)),
            _ => None,
        })
        .collect()
}

/// Runs the check.
pub fn check(outcome: &Outcome) -> CheckResult {
    let mut f = Findings::new("lww");
    let is_lww = |k: &str| KeyKind::of(k) == Some(KeyKind::Lww);
    let acked: Vec<_> = outcome
        .acked
        .iter()
        .filter(|w| is_lww(&w.key))
        .cloned()
        .collect();
    let cleared: BTreeSet<&str> = acked
        .iter()
        .filter(|w| matches!(w.op, Op::Delete | Op::Lww(RegisterOp::Clear)))
        .map(|w| w.key.as_str())
        .collect();
    let oracles = oracle::build(&acked);
    let mut keys: BTreeSet<&str> = oracles.keys().map(String::as_str).collect();
    for state in &outcome.states {
        keys.extend(state.keys().map(String::as_str).filter(|k| is_lww(k)));
    }
    let empty = oracle::KeyOracle::default();
    for key in keys {
        let oracle = oracles.get(key).unwrap_or(&empty);
        for anomaly in &oracle.anomalies {
            f.fail(format!("key {key}: {anomaly}"));
        }
        let live = live_writes(oracle);
        let expected = live
            .iter()
            .map(|(d, s)| (*d, *s))
            .max_by_key(|(d, s)| rank(*d, s));
        let greatest_acked = oracle
            .created
            .iter()
            .filter_map(|(d, (p, _))| match p {
                Payload::Write(s) => Some((*d, s)),
                _ => None,
            })
            .max_by_key(|(d, s)| rank(*d, s));
        if !cleared.contains(key) && greatest_acked.map(|(d, _)| d) != expected.map(|(d, _)| d) {
            f.fail(format!(
                "key {key}: the greatest acknowledged write {} is not live: a write that saw it \
                 was stamped below it",
                show_opt(greatest_acked)
            ));
        }
        for (r, state) in outcome.states.iter().enumerate() {
            f.checked();
            let region = outcome.regions.get(r).map_or("?", String::as_str);
            let (winner, entries): (_, BTreeMap<Dot, &Stamped<Vec<u8>>>) = match state.get(key) {
                None => (None, BTreeMap::new()),
                Some(Crdt::LwwRegister(reg)) => {
                    (reg.winner(), reg.as_causal().store().iter().collect())
                }
                Some(other) => {
                    f.fail(format!(
                        "key {key} in {region}: holds a {}, not an lww register",
                        other.type_tag()
                    ));
                    continue;
                }
            };
            if winner != expected {
                f.fail(format!(
                    "key {key} in {region}: winner is {}, but the greatest live acknowledged \
                     write is {}",
                    show_opt(winner),
                    show_opt(expected)
                ));
            }
            if entries != live {
                let extra: Vec<String> = entries
                    .iter()
                    .filter(|(d, s)| live.get(d) != Some(s))
                    .map(|(d, s)| show(*d, s))
                    .collect();
                let missing: Vec<String> = live
                    .iter()
                    .filter(|(d, s)| entries.get(d) != Some(s))
                    .map(|(d, s)| show(*d, s))
                    .collect();
                f.fail(format!(
                    "key {key} in {region}: entries differ from the live writes: extra [{}], \
                     missing [{}]",
                    extra.join(", "),
                    missing.join(", ")
                ));
            }
        }
    }
    f.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use geostate_crdt::{ActorId, Hlc, RegisterOp, TypeTag};

    use super::*;
    use crate::checks::testkit::{refresh_payloads, small_run, Builder};

    #[test]
    fn concurrent_writes_pick_the_greatest_stamp_and_keep_the_loser() {
        let mut b = Builder::new(2);
        b.write(0, "l:1", Op::Lww(RegisterOp::write("early")), 100);
        b.write(1, "l:1", Op::Lww(RegisterOp::write("late")), 200);
        b.sync();
        let outcome = b.outcome();
        let r = check(&outcome);
        assert!(r.passed, "{r}");
        let Crdt::LwwRegister(reg) = &outcome.states[0]["l:1"] else {
            panic!()
        };
        assert_eq!(reg.value(), Some(&b"late".to_vec()));
    }

    #[test]
    fn a_lagging_writer_that_saw_the_value_still_wins() {
        let mut b = Builder::new(2);
        b.write(0, "l:1", Op::Lww(RegisterOp::write("ahead")), 5_000);
        b.sync();
        // Region 1's clock lags far behind, but its write saw "ahead": it is raised past it.
        let delta = b.write(1, "l:1", Op::Lww(RegisterOp::write("after")), 10);
        let Crdt::LwwRegister(d) = &delta else {
            panic!()
        };
        assert!(d.winner().unwrap().1.hlc > Hlc::new(5_000, 0));
        b.sync();
        let r = check(&b.outcome());
        assert!(r.passed, "{r}");
    }

    #[test]
    fn a_wrong_winner_fails() {
        let mut b = Builder::new(2);
        b.write(0, "l:1", Op::Lww(RegisterOp::write("early")), 100);
        b.write(1, "l:1", Op::Lww(RegisterOp::write("late")), 200);
        b.sync();
        // Region 1 never got the early write: same winner, but the loser is missing.
        let mut state = Crdt::empty(TypeTag::LwwRegister);
        state.merge(&b.acked[1].delta).unwrap();
        b.regions[1].insert("l:1".into(), state);
        let r = check(&b.outcome());
        assert!(!r.passed);
        assert!(r.details[0].contains("missing [\"early\""), "{r}");
        // Region 0 never got the late write: wrong winner.
        let mut state = Crdt::empty(TypeTag::LwwRegister);
        state.merge(&b.acked[0].delta).unwrap();
        b.regions[0].insert("l:1".into(), state);
        let r = check(&b.outcome());
        assert!(
            r.details[0].contains("in us-east: winner is \"early\""),
            "{r}"
        );
    }

    #[test]
    fn an_overwritten_write_stamped_above_its_overwriter_fails() {
        let mut b = Builder::new(1);
        b.write(0, "l:1", Op::Lww(RegisterOp::write("first")), 500);
        // Forge the bug the raise prevents: a second write that saw the first (same dot,
        // here with a low stamp) and kept its writer's lagging clock.
        let mut fake = geostate_crdt::LwwRegister::new();
        fake.merge(&fake.write(Builder::actor(0), Hlc::new(1, 0), b"first".to_vec()));
        let forged = fake.write(Builder::actor(0), Hlc::new(10, 0), b"second".to_vec());
        assert_eq!(forged.winner().unwrap().1.hlc, Hlc::new(10, 0));
        let forged = Crdt::LwwRegister(forged);
        b.regions[0].get_mut("l:1").unwrap().merge(&forged).unwrap();
        b.acked.push(crate::AckedWrite {
            at_ms: 10,
            region: 0,
            key: "l:1".into(),
            op: Op::Lww(RegisterOp::write("second")),
            delta: forged,
        });
        let r = check(&b.outcome());
        assert!(!r.passed);
        assert!(
            r.details[0].contains("greatest acknowledged write \"first\""),
            "{r}"
        );
    }

    #[test]
    fn an_engine_run_passes_and_a_tampered_winner_fails() {
        let mut outcome = small_run(41);
        let r = check(&outcome);
        assert!(r.passed, "{r}");
        assert!(r.checked > 0);
        let key = outcome.states[1]
            .iter()
            .find(|(k, v)| KeyKind::of(k) == Some(KeyKind::Lww) && !v.is_bottom())
            .map(|(k, _)| k.clone())
            .unwrap();
        let state = outcome.states[1].get_mut(&key).unwrap();
        let w = state
            .apply(
                ActorId::new(1),
                Hlc::new(1, 0),
                &Op::Lww(RegisterOp::write("forged")),
            )
            .unwrap();
        state.merge(&w).unwrap();
        refresh_payloads(&mut outcome);
        let r = check(&outcome);
        assert!(!r.passed);
        assert!(
            r.details.iter().any(|d| d.contains("winner is \"forged\"")),
            "{r}"
        );
    }
}
