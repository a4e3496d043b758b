//! Invariant: **a set holds exactly the elements with a live acknowledged add.**
//!
//! For every OR-set key `k` (`KeyKind::Set`), the [oracle](super::oracle) built from the
//! acknowledged deltas alone gives the live `(dot, element)` pairs; the expected set is the
//! elements with a live dot. In every region `r`, the `(dot, element)` pairs of
//! `states[r][k]` must equal the live ones, which makes the element sets equal. A mismatch is
//! reported as one or more of:
//!
//! - **appeared**: the region holds a dot no acknowledged add created ("nothing appears that
//!   was never added");
//! - **lost**: an acknowledged add's dot is live in the oracle (no acknowledged remove or
//!   re-add saw it) but missing in the region ("no acknowledged add lost unless causally
//!   removed");
//! - **resurrected**: the region holds a dot that an acknowledged remove or re-add had seen.

use std::collections::{BTreeMap, BTreeSet};

use geostate_crdt::{Crdt, Dot};

use crate::checks::oracle::{self, Payload};
use crate::checks::{CheckResult, Findings};
use crate::{KeyKind, Outcome};

fn show(element: &[u8]) -> String {
    String::from_utf8_lossy(element).into_owned()
}

fn show_set(elements: &BTreeSet<Vec<u8>>) -> String {
    let shown: Vec<String> = elements.iter().map(|e| show(e)).collect();
    format!("{{{}}}", shown.join(", "))
}

/// Runs the check.
pub fn check(outcome: &Outcome) -> CheckResult {
    let mut f = Findings::new("sets");
    let is_set = |k: &str| KeyKind::of(k) == Some(KeyKind::Set);
    let acked: Vec<_> = outcome
        .acked
        .iter()
        .filter(|w| is_set(&w.key))
        .cloned()
        .collect();
    let oracles = oracle::build(&acked);
    let mut keys: BTreeSet<&str> = oracles.keys().map(String::as_str).collect();
    for state in &outcome.states {
        keys.extend(state.keys().map(String::as_str).filter(|k| is_set(k)));
    }
    let empty = oracle::KeyOracle::default();
    for key in keys {
        let oracle = oracles.get(key).unwrap_or(&empty);
        for anomaly in &oracle.anomalies {
            f.fail(format!("key {key}: {anomaly}"));
        }
        let expected: BTreeMap<Dot, &[u8]> = oracle
            .live()
            .filter_map(|(d, p)| match p {
                Payload::Element(e) => Some((d, e.as_slice())),
                _ => None,
            })
            .collect();
        let expected_elements: BTreeSet<Vec<u8>> = expected.values().map(|e| e.to_vec()).collect();
        for (r, state) in outcome.states.iter().enumerate() {
            f.checked();
            let region = outcome.regions.get(r).map_or("?", String::as_str);
            let held: BTreeMap<Dot, Vec<u8>> = match state.get(key) {
                None => BTreeMap::new(),
                Some(Crdt::OrSet(s)) => s
                    .entries()
                    .flat_map(|(e, dots)| dots.iter().map(move |d| (d, e.clone())))
                    .collect(),
                Some(other) => {
                    f.fail(format!(
                        "key {key} in {region}: holds a {}, not a set",
                        other.type_tag()
                    ));
                    continue;
                }
            };
            let held_elements: BTreeSet<Vec<u8>> = held.values().cloned().collect();
            if held_elements != expected_elements {
                f.fail(format!(
                    "key {key} in {region}: set is {} but the acknowledged writes give {}",
                    show_set(&held_elements),
                    show_set(&expected_elements)
                ));
            }
            for (dot, element) in &held {
                match oracle.created.get(dot) {
                    Some((Payload::Element(e), _)) if e == element => {
                        if !oracle.is_live(*dot) {
                            f.fail(format!(
                                "key {key} in {region}: resurrected: element {:?} holds dot \
                                 {dot}, which an acknowledged remove or re-add had seen",
                                show(element)
                            ));
                        }
                    }
                    _ => f.fail(format!(
                        "key {key} in {region}: appeared: element {:?} with dot {dot}, which \
                         no acknowledged add created",
                        show(element)
                    )),
                }
            }
            for (dot, element) in &expected {
                if held.get(dot).map(Vec::as_slice) != Some(*element) {
                    let write = oracle.created.get(dot).map_or(0, |(_, i)| *i);
                    f.fail(format!(
                        "key {key} in {region}: lost: the acknowledged add of {:?} (dot {dot}, \
                         write #{write}) is missing, and no acknowledged write removed it",
                        show(element)
                    ));
                }
            }
        }
    }
    f.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use geostate_crdt::{ActorId, Hlc, Op, SetOp, TypeTag};

    use super::*;
    use crate::checks::testkit::{refresh_payloads, small_run, Builder};

    /// x added then removed everywhere; y removed in one region while re-added in another.
    fn scenario() -> Builder {
        let mut b = Builder::new(3);
        b.write(0, "s:1", Op::Set(SetOp::add("x")), 1);
        b.write(1, "s:1", Op::Set(SetOp::add("y")), 2);
        b.sync();
        b.write(2, "s:1", Op::Set(SetOp::remove("x")), 3);
        b.write(0, "s:1", Op::Set(SetOp::remove("y")), 4);
        b.write(1, "s:1", Op::Set(SetOp::add("y")), 5);
        b.sync();
        b
    }

    #[test]
    fn causally_removed_adds_go_and_concurrent_adds_stay() {
        let outcome = scenario().outcome();
        let r = check(&outcome);
        assert!(r.passed, "{r}");
        let Crdt::OrSet(s) = &outcome.states[0]["s:1"] else {
            panic!("not a set")
        };
        assert_eq!(s.iter().cloned().collect::<Vec<_>>(), vec![b"y".to_vec()]);
    }

    #[test]
    fn a_dropped_acknowledged_add_shows_as_appeared() {
        let mut outcome = scenario().outcome();
        outcome.acked.remove(4); // the concurrent re-add of y
        let r = check(&outcome);
        assert!(!r.passed);
        assert!(
            r.details
                .iter()
                .any(|d| d.contains("appeared: element \"y\"")),
            "{r}"
        );
    }

    #[test]
    fn a_lost_add_is_reported_as_lost() {
        let mut b = scenario();
        // Region 2 never receives the re-add of y.
        let mut state = Crdt::empty(TypeTag::OrSet);
        for (i, w) in b.acked.iter().enumerate() {
            if i != 4 {
                state.merge(&w.delta).unwrap();
            }
        }
        b.regions[2].insert("s:1".into(), state);
        let r = check(&b.outcome());
        assert!(!r.passed);
        assert!(
            r.details
                .iter()
                .any(|d| d.contains("in ap-south: set is {}")),
            "{r}"
        );
        assert!(
            r.details
                .iter()
                .any(|d| d.contains("lost: the acknowledged add of \"y\"")),
            "{r}"
        );
    }

    #[test]
    fn a_resurrected_element_is_reported() {
        let mut b = scenario();
        // Region 0 keeps x although region 2's acknowledged remove saw it.
        let mut resurrected = Crdt::empty(TypeTag::OrSet);
        for (i, w) in b.acked.iter().enumerate() {
            if i != 2 {
                resurrected.merge(&w.delta).unwrap();
            }
        }
        b.regions[0].insert("s:1".into(), resurrected);
        let r = check(&b.outcome());
        assert!(!r.passed);
        assert!(
            r.details
                .iter()
                .any(|d| d.contains("resurrected: element \"x\"")),
            "{r}"
        );
    }

    #[test]
    fn an_element_never_added_is_reported() {
        let mut b = scenario();
        let state = b.regions[1].get_mut("s:1").unwrap();
        let forged = state
            .apply(ActorId::new(7), Hlc::new(9, 0), &Op::Set(SetOp::add("z")))
            .unwrap();
        state.merge(&forged).unwrap();
        let r = check(&b.outcome());
        assert!(!r.passed);
        assert!(
            r.details
                .iter()
                .any(|d| d.contains("appeared: element \"z\"")),
            "{r}"
        );
    }

    #[test]
    fn an_engine_run_passes_and_a_tampered_state_fails() {
        let mut outcome = small_run(31);
        let r = check(&outcome);
        assert!(r.passed, "{r}");
        assert!(r.checked > 0);
        let key = outcome.states[0]
            .iter()
            .find(|(k, v)| KeyKind::of(k) == Some(KeyKind::Set) && !v.is_bottom())
            .map(|(k, _)| k.clone())
            .unwrap();
        let state = outcome.states[0].get_mut(&key).unwrap();
        let Crdt::OrSet(s) = state.clone() else {
            panic!()
        };
        let element = s.iter().next().unwrap().clone();
        let removal = state
            .apply(
                ActorId::new(1),
                Hlc::new(1, 0),
                &Op::Set(SetOp::Remove(vec![element])),
            )
            .unwrap();
        state.merge(&removal).unwrap();
        refresh_payloads(&mut outcome);
        let r = check(&outcome);
        assert!(!r.passed);
        assert!(r.details.iter().any(|d| d.contains("lost")), "{r}");
    }
}
