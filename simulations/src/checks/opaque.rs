//! Invariant: **opaque values resolve identically everywhere, to the live writes.**
//!
//! For every opaque key `k` (`KeyKind::Opaque`, a multi-value register written by `put`):
//!
//! 1. every region resolves `k` to the same value (`Outcome::resolved`; a key a region does
//!    not hold resolves to `Absent`);
//! 2. in every region the register's siblings (dot, stamp, value) are exactly the live writes
//!    of the [oracle](super::oracle): the acknowledged writes no acknowledged write has seen;
//! 3. with the default resolver (last writer wins) the resolved value is: `Absent` with no
//!    live write, the value itself with one, and otherwise the value of the live sibling with
//!    the greatest `(HLC, actor, dot counter)`.

use std::collections::{BTreeMap, BTreeSet};

use geostate_conflict::ResolvedValue;
use geostate_crdt::{Crdt, Dot, Stamped};

use crate::checks::lww::{live_writes, rank, show};
use crate::checks::oracle;
use crate::checks::{CheckResult, Findings};
use crate::{KeyKind, Outcome};

/// What the default resolver must show for these live writes.
pub fn expected_resolution(live: &BTreeMap<Dot, &Stamped<Vec<u8>>>) -> ResolvedValue {
    live.iter()
        .max_by_key(|(d, s)| (rank(**d, s), &s.value))
        .map_or(ResolvedValue::Absent, |(_, s)| {
            ResolvedValue::One(s.value.clone())
        })
}

fn show_resolved(v: &ResolvedValue) -> String {
    match v {
        ResolvedValue::Absent => "absent".into(),
        ResolvedValue::One(b) => format!("{:?}", String::from_utf8_lossy(b)),
        ResolvedValue::Siblings(s) => format!("{} siblings", s.len()),
        other => format!("{other:?}"),
    }
}

/// Runs the check.
pub fn check(outcome: &Outcome) -> CheckResult {
    let mut f = Findings::new("opaque");
    let is_opaque = |k: &str| KeyKind::of(k) == Some(KeyKind::Opaque);
    let acked: Vec<_> = outcome
        .acked
        .iter()
        .filter(|w| is_opaque(&w.key))
        .cloned()
        .collect();
    let oracles = oracle::build(&acked);
    let mut keys: BTreeSet<&str> = oracles.keys().map(String::as_str).collect();
    for state in &outcome.states {
        keys.extend(state.keys().map(String::as_str).filter(|k| is_opaque(k)));
    }
    if outcome.resolved.len() != outcome.states.len() {
        f.fail(format!(
            "{} resolved maps for {} regions",
            outcome.resolved.len(),
            outcome.states.len()
        ));
    }
    let empty = oracle::KeyOracle::default();
    let absent = ResolvedValue::Absent;
    for key in keys {
        let oracle = oracles.get(key).unwrap_or(&empty);
        for anomaly in &oracle.anomalies {
            f.fail(format!("key {key}: {anomaly}"));
        }
        let live = live_writes(oracle);
        let expected = expected_resolution(&live);
        let mut first: Option<(&str, &ResolvedValue)> = None;
        for (r, state) in outcome.states.iter().enumerate() {
            f.checked();
            let region = outcome.regions.get(r).map_or("?", String::as_str);
            let resolved = outcome
                .resolved
                .get(r)
                .and_then(|m| m.get(key))
                .unwrap_or(&absent);
            match first {
                None => first = Some((region, resolved)),
                Some((other, theirs)) if theirs != resolved => f.fail(format!(
                    "key {key}: resolves to {} in {other} but to {} in {region}",
                    show_resolved(theirs),
                    show_resolved(resolved)
                )),
                Some(_) => {}
            }
            let siblings: BTreeMap<Dot, &Stamped<Vec<u8>>> = match state.get(key) {
                None => BTreeMap::new(),
                Some(Crdt::MvRegister(reg)) => reg.siblings().collect(),
                Some(other) => {
                    f.fail(format!(
                        "key {key} in {region}: holds a {}, not an opaque value",
                        other.type_tag()
                    ));
                    continue;
                }
            };
            if siblings != live {
                let extra: Vec<String> = siblings
                    .iter()
                    .filter(|(d, s)| live.get(d) != Some(s))
                    .map(|(d, s)| show(*d, s))
                    .collect();
                let missing: Vec<String> = live
                    .iter()
                    .filter(|(d, s)| siblings.get(d) != Some(s))
                    .map(|(d, s)| show(*d, s))
                    .collect();
                f.fail(format!(
                    "key {key} in {region}: siblings differ from the live writes: extra [{}], \
                     missing [{}]",
                    extra.join(", "),
                    missing.join(", ")
                ));
            }
            if *resolved != expected {
                f.fail(format!(
                    "key {key} in {region}: resolves to {}, but last-writer-wins over the live \
                     writes gives {}",
                    show_resolved(resolved),
                    show_resolved(&expected)
                ));
            }
        }
    }
    f.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use geostate_crdt::{Op, RegisterOp, TypeTag};

    use super::*;
    use crate::checks::testkit::{refresh_payloads, small_run, Builder};

    fn concurrent() -> Builder {
        let mut b = Builder::new(3);
        b.write(0, "o:1", Op::Mv(RegisterOp::write("a")), 300);
        b.write(1, "o:1", Op::Mv(RegisterOp::write("b")), 200);
        b.write(2, "o:2", Op::Mv(RegisterOp::write("old")), 100);
        b.sync();
        b.write(1, "o:2", Op::Mv(RegisterOp::write("new")), 50);
        b.sync();
        b
    }

    #[test]
    fn siblings_resolve_to_the_greatest_stamp_everywhere() {
        let outcome = concurrent().outcome();
        let r = check(&outcome);
        assert!(r.passed, "{r}");
        assert_eq!(r.checked, 6);
        assert_eq!(
            outcome.resolved[2]["o:1"],
            ResolvedValue::One(b"a".to_vec())
        );
        // A write that saw the old value replaces it, whatever its stamp.
        assert_eq!(
            outcome.resolved[0]["o:2"],
            ResolvedValue::One(b"new".to_vec())
        );
    }

    #[test]
    fn a_region_resolving_differently_fails() {
        let mut outcome = concurrent().outcome();
        outcome.resolved[1].insert("o:1".into(), ResolvedValue::One(b"b".to_vec()));
        let r = check(&outcome);
        assert!(!r.passed);
        assert!(
            r.details[0].contains("resolves to \"a\" in us-east but to \"b\" in eu-west"),
            "{r}"
        );
        assert!(
            r.details[1].contains("last-writer-wins over the live writes gives \"a\""),
            "{r}"
        );
    }

    #[test]
    fn a_missing_sibling_fails() {
        let mut b = concurrent();
        let mut state = Crdt::empty(TypeTag::MvRegister);
        state.merge(&b.acked[1].delta).unwrap();
        for region in &mut b.regions {
            region.insert("o:1".into(), state.clone());
        }
        let r = check(&b.outcome());
        assert!(!r.passed);
        assert!(r.details[0].contains("missing [\"a\""), "{r}");
        assert!(r.details[1].contains("resolves to \"b\""), "{r}");
    }

    #[test]
    fn an_engine_run_passes_and_a_dropped_write_fails() {
        let mut outcome = small_run(51);
        let r = check(&outcome);
        assert!(r.passed, "{r}");
        assert!(r.checked > 0);
        // Forget the last acknowledged opaque write: its value shows up from nowhere.
        let last = outcome
            .acked
            .iter()
            .rposition(|w| KeyKind::of(&w.key) == Some(KeyKind::Opaque))
            .unwrap();
        outcome.acked.remove(last);
        refresh_payloads(&mut outcome);
        let r = check(&outcome);
        assert!(!r.passed, "{r}");
        assert!(r.details.iter().any(|d| d.contains("extra [")), "{r}");
    }
}
