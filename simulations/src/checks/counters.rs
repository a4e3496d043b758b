//! Invariant: **a counter's final value is the sum of its acknowledged deltas.**
//!
//! For every counter key `k` (`KeyKind::Counter`) and every region `r`:
//!
//! ```text
//! value(states[r][k]) = Σ acked ops on k (inc n: +n, dec n: -n)  +  Σ S
//! ```
//!
//! for some subset `S` of the amounts of the *indeterminate* writes on `k` (writes whose
//! outcome the client never learned: a real store may or may not have committed them). The
//! embedded store has none, so [`check`] passes an empty set and the equation is exact; a
//! real-store mode calls [`check_with`]. A key that some acknowledged write touched must exist
//! in every region. Keys deleted (`Op::Delete`) by an acknowledged write are skipped: a deletion
//! removes only the contributions it saw, so the sum is no longer determined by the writes.

use std::collections::{BTreeMap, BTreeSet};

use geostate_crdt::{CounterOp, Crdt, Op};

use crate::checks::{CheckResult, Findings};
use crate::{KeyKind, Outcome};

/// Largest number of distinct subset sums tracked exactly; beyond it only the interval between
/// the smallest and largest subset sums is checked.
const SUBSET_SUMS_MAX: usize = 1 << 16;

/// What an operation adds to a counter; `None` for a non-counter operation.
pub fn amount(op: &Op) -> Option<i128> {
    match op {
        Op::Counter(CounterOp::Inc(n)) | Op::GCounterInc(n) => Some(i128::from(*n)),
        Op::Counter(CounterOp::Dec(n)) => Some(-i128::from(*n)),
        _ => None,
    }
}

/// Whether `value = acked_sum + Σ S` for some subset `S` of `indeterminate`.
pub fn reachable(value: i128, acked_sum: i128, indeterminate: &[i128]) -> bool {
    let target = value - acked_sum;
    let mut sums: BTreeSet<i128> = BTreeSet::from([0]);
    for &x in indeterminate {
        let shifted: Vec<i128> = sums.iter().map(|s| s + x).collect();
        sums.extend(shifted);
        if sums.len() > SUBSET_SUMS_MAX {
            let low: i128 = indeterminate.iter().filter(|x| **x < 0).sum();
            let high: i128 = indeterminate.iter().filter(|x| **x > 0).sum();
            return (low..=high).contains(&target);
        }
    }
    sums.contains(&target)
}

/// The value a stored counter shows, or why it shows none.
fn value_of(value: &Crdt) -> Result<i128, String> {
    match value {
        Crdt::PnCounter(c) => Ok(c.value()),
        Crdt::GCounter(c) => {
            i128::try_from(c.value()).map_err(|_| "g-counter beyond i128".to_string())
        }
        other => Err(format!("holds a {}, not a counter", other.type_tag())),
    }
}

/// Runs the check on the embedded store's outcome (no indeterminate writes).
pub fn check(outcome: &Outcome) -> CheckResult {
    check_with(outcome, &[])
}

/// Runs the check, allowing any subset of `indeterminate` `(key, op)` writes to have landed.
pub fn check_with(outcome: &Outcome, indeterminate: &[(String, Op)]) -> CheckResult {
    let mut f = Findings::new("counters");
    let is_counter = |k: &str| KeyKind::of(k) == Some(KeyKind::Counter);
    // key -> (acknowledged sum, acknowledged writes, deleted)
    let mut acked: BTreeMap<&str, (i128, usize, bool)> = BTreeMap::new();
    for (i, w) in outcome.acked.iter().enumerate() {
        if !is_counter(&w.key) {
            continue;
        }
        let slot = acked.entry(w.key.as_str()).or_default();
        slot.1 += 1;
        match (&w.op, amount(&w.op)) {
            (_, Some(n)) => slot.0 += n,
            (Op::Delete, None) => slot.2 = true,
            (op, None) => f.fail(format!(
                "key {}: acked write #{i} is not a counter operation: {op:?}",
                w.key
            )),
        }
    }
    let mut pending: BTreeMap<&str, Vec<i128>> = BTreeMap::new();
    for (key, op) in indeterminate.iter().filter(|(k, _)| is_counter(k)) {
        match amount(op) {
            Some(n) => pending.entry(key.as_str()).or_default().push(n),
            None if matches!(op, Op::Delete) => {
                acked.entry(key.as_str()).or_default().2 = true;
            }
            None => f.fail(format!(
                "key {key}: indeterminate write is not a counter operation"
            )),
        }
    }
    let mut keys: BTreeSet<&str> = acked.keys().copied().collect();
    keys.extend(pending.keys().copied());
    for state in &outcome.states {
        keys.extend(state.keys().map(String::as_str).filter(|k| is_counter(k)));
    }
    for key in keys {
        let (sum, writes, deleted) = acked.get(key).copied().unwrap_or_default();
        if deleted {
            continue;
        }
        let maybe = pending.get(key).map_or(&[][..], Vec::as_slice);
        for (r, state) in outcome.states.iter().enumerate() {
            f.checked();
            let region = outcome.regions.get(r).map_or("?", String::as_str);
            let value = match state.get(key) {
                Some(v) => value_of(v),
                None if writes == 0 => Ok(0),
                None => Err(format!("missing after {writes} acknowledged writes")),
            };
            match value {
                Ok(v) if reachable(v, sum, maybe) => {}
                Ok(v) if maybe.is_empty() => f.fail(format!(
                    "key {key} in {region}: value {v}, but acknowledged writes sum to {sum} \
                     ({writes} writes; off by {})",
                    v - sum
                )),
                Ok(v) => f.fail(format!(
                    "key {key} in {region}: value {v} is not {sum} (acknowledged) plus any \
                     subset of {} indeterminate writes",
                    maybe.len()
                )),
                Err(e) => f.fail(format!("key {key} in {region}: {e}")),
            }
        }
    }
    f.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use geostate_crdt::{ActorId, Hlc, SetOp};

    use super::*;
    use crate::checks::testkit::{refresh_payloads, small_run, Builder};

    fn two_regions() -> Builder {
        let mut b = Builder::new(2);
        b.write(0, "c:1", Op::Counter(CounterOp::inc(5)), 1);
        b.write(1, "c:1", Op::Counter(CounterOp::dec(2)), 2);
        b.write(1, "c:2", Op::Counter(CounterOp::inc(1)), 3);
        b.sync();
        b
    }

    #[test]
    fn synced_counters_pass() {
        let r = check(&two_regions().outcome());
        assert!(r.passed, "{r}");
        assert_eq!(r.checked, 4);
    }

    #[test]
    fn a_dropped_acknowledged_write_fails() {
        let mut outcome = two_regions().outcome();
        outcome.acked.remove(1);
        let r = check(&outcome);
        assert!(!r.passed);
        assert!(
            r.details[0].contains("value 3, but acknowledged writes sum to 5"),
            "{r}"
        );
    }

    #[test]
    fn a_lost_update_in_one_region_fails() {
        let mut b = two_regions();
        // Region 1 loses region 0's increment: its state is rebuilt without it.
        let mut lost = Crdt::empty(geostate_crdt::TypeTag::PnCounter);
        for w in b.acked.iter().filter(|w| w.key == "c:1" && w.region == 1) {
            lost.merge(&w.delta).unwrap();
        }
        b.regions[1].insert("c:1".into(), lost);
        let r = check(&b.outcome());
        assert!(!r.passed);
        assert_eq!(r.details.len(), 1);
        assert!(r.details[0].contains("key c:1 in eu-west: value -2"), "{r}");
    }

    #[test]
    fn a_missing_key_or_a_wrong_type_fails() {
        let mut b = two_regions();
        b.regions[0].remove("c:2");
        let r = check(&b.outcome());
        assert!(
            r.details[0].contains("missing after 1 acknowledged writes"),
            "{r}"
        );
        let mut b = two_regions();
        let set = Crdt::empty(geostate_crdt::TypeTag::OrSet);
        let delta = set
            .apply(ActorId::new(1), Hlc::new(1, 0), &Op::Set(SetOp::add("x")))
            .unwrap();
        b.regions[0].insert("c:2".into(), delta);
        let r = check(&b.outcome());
        assert!(r.details[0].contains("not a counter"), "{r}");
    }

    #[test]
    fn indeterminate_writes_may_or_may_not_count() {
        let mut b = two_regions();
        // One write whose acknowledgement was lost: it landed in region 0 and replicated.
        b.write(0, "c:1", Op::Counter(CounterOp::inc(7)), 4);
        b.sync();
        let mut outcome = b.outcome();
        outcome.acked.pop();
        assert!(!check(&outcome).passed);
        let maybe = vec![
            ("c:1".to_string(), Op::Counter(CounterOp::inc(7))),
            ("c:1".to_string(), Op::Counter(CounterOp::dec(100))),
        ];
        let r = check_with(&outcome, &maybe);
        assert!(r.passed, "{r}");
        // But the value must be reachable: a subset of {+7, -100} cannot explain +8.
        let wrong = vec![("c:1".to_string(), Op::Counter(CounterOp::inc(8)))];
        assert!(!check_with(&outcome, &wrong).passed);
    }

    #[test]
    fn subset_sums() {
        assert!(reachable(10, 10, &[]));
        assert!(!reachable(11, 10, &[]));
        assert!(reachable(13, 10, &[1, 2, 5, -4]));
        assert!(reachable(4, 10, &[1, 2, 5, -4, -4]));
        assert!(!reachable(30, 10, &[1, 2, 5]));
    }

    #[test]
    fn an_engine_run_passes_and_a_tampered_state_fails() {
        let mut outcome = small_run(21);
        let r = check(&outcome);
        assert!(r.passed, "{r}");
        assert!(r.checked > 0);
        let key = outcome
            .acked
            .iter()
            .find(|w| KeyKind::of(&w.key) == Some(KeyKind::Counter))
            .unwrap()
            .key
            .clone();
        let state = outcome.states[2].get_mut(&key).unwrap();
        let bump = state
            .apply(
                ActorId::new(999),
                Hlc::new(1, 0),
                &Op::Counter(CounterOp::inc(1)),
            )
            .unwrap();
        state.merge(&bump).unwrap();
        refresh_payloads(&mut outcome);
        let r = check(&outcome);
        assert!(!r.passed);
        assert!(r.details[0].contains(&key), "{r}");
    }
}
