//! Invariant: **every region holds byte-identical state.**
//!
//! For every region `r`, the set of keys in `Outcome::payloads[r]` equals region 0's, and for
//! every key the canonical payload bytes (`envelope::canonical_payload`: the encoded CRDT,
//! without envelope flags that may legitimately differ) are equal. Maps are covered here in
//! full: two regions agree on a map only if they agree on every nested field.
//!
//! Failures name the first differing keys and the regions that disagree.

use crate::checks::{CheckResult, Findings};
use crate::Outcome;

/// Runs the check.
pub fn check(outcome: &Outcome) -> CheckResult {
    let mut f = Findings::new("identical");
    let name = |r: usize| {
        outcome
            .regions
            .get(r)
            .cloned()
            .unwrap_or_else(|| format!("region {r}"))
    };
    if outcome.payloads.len() != outcome.regions.len() {
        f.fail(format!(
            "{} payload maps for {} regions",
            outcome.payloads.len(),
            outcome.regions.len()
        ));
    }
    let Some((first, rest)) = outcome.payloads.split_first() else {
        return f.finish();
    };
    f.add_checked(first.len() * outcome.payloads.len());
    for (i, other) in rest.iter().enumerate() {
        let r = i + 1;
        for (key, bytes) in first {
            match other.get(key) {
                None => f.fail(format!(
                    "key {key}: in {} but missing in {}",
                    name(0),
                    name(r)
                )),
                Some(theirs) if theirs != bytes => f.fail(format!(
                    "key {key}: payloads differ between {} ({} bytes) and {} ({} bytes)",
                    name(0),
                    bytes.len(),
                    name(r),
                    theirs.len()
                )),
                Some(_) => {}
            }
        }
        for key in other.keys().filter(|k| !first.contains_key(*k)) {
            f.fail(format!(
                "key {key}: in {} but missing in {}",
                name(r),
                name(0)
            ));
        }
    }
    f.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use geostate_crdt::{CounterOp, Op, SetOp};

    use super::*;
    use crate::checks::testkit::{small_run, Builder};

    fn synced() -> Builder {
        let mut b = Builder::new(3);
        b.write(0, "c:1", Op::Counter(CounterOp::inc(2)), 1);
        b.write(1, "s:1", Op::Set(SetOp::add("x")), 2);
        b.sync();
        b
    }

    #[test]
    fn synced_regions_pass() {
        let r = check(&synced().outcome());
        assert!(r.passed, "{r}");
        assert_eq!(r.checked, 6); // two keys in three regions
    }

    #[test]
    fn a_differing_value_is_named() {
        let mut b = synced();
        b.write(2, "c:1", Op::Counter(CounterOp::inc(1)), 3);
        let r = check(&b.outcome());
        assert!(!r.passed);
        assert_eq!(r.details.len(), 1);
        assert!(r.details[0].contains("key c:1: payloads differ"), "{r}");
        assert!(r.details[0].contains("ap-south"), "{r}");
    }

    #[test]
    fn a_missing_key_fails_either_way() {
        let mut b = synced();
        b.write(1, "s:2", Op::Set(SetOp::add("y")), 4);
        let r = check(&b.outcome());
        assert!(!r.passed);
        assert!(
            r.details[0].contains("key s:2: in eu-west but missing in us-east"),
            "{r}"
        );
        let mut b = synced();
        b.regions[2].remove("s:1");
        let r = check(&b.outcome());
        assert!(
            r.details[0].contains("key s:1: in us-east but missing in ap-south"),
            "{r}"
        );
    }

    #[test]
    fn an_engine_run_passes_and_a_flipped_byte_fails() {
        let mut outcome = small_run(5);
        assert!(check(&outcome).passed);
        let bytes = outcome.payloads[1].values_mut().next().unwrap();
        bytes[0] ^= 1;
        assert!(!check(&outcome).passed);
    }
}
