//! Invariant: **a map's nested counter is the sum of its acknowledged increments, wherever
//! no removal touched it.**
//!
//! A map key's whole state is compared across regions by [`identical`](super::identical).
//! This check adds a semantic oracle for nested counters. A *field path* is the sequence of
//! entry keys from the map down to a counter field (`["f3"]`, or `["f3", "n1"]` through a
//! nested map). For every map key `k` (`KeyKind::Map`) and every path `p` that acknowledged
//! `FieldOp::Counter` updates reached, unless an acknowledged write removed `p` or a prefix of
//! it (`MapOp::Remove` of an entry on the path, `MapOp::Clear` of a map on the path, or
//! `Op::Delete` of `k`), in every region `r`:
//!
//! ```text
//! counter at p in states[r][k] = Σ acknowledged increments - decrements at p
//! ```
//!
//! Paths with a removal are skipped, not approximated: a removal takes away only the
//! contributions it saw (per actor), so the writes alone no longer determine the value.

use std::collections::{BTreeMap, BTreeSet};

use geostate_crdt::{Crdt, FieldOp, MapFields, MapOp, Op};

use crate::checks::counters::amount;
use crate::checks::{CheckResult, Findings};
use crate::{KeyKind, Outcome};

type Path = Vec<String>;

/// What acknowledged writes did to one map key.
#[derive(Debug, Default)]
struct MapWrites {
    /// Counter sums per path.
    counters: BTreeMap<Path, i128>,
    /// Paths (entries or whole maps) an acknowledged write removed.
    removed: BTreeSet<Path>,
}

impl MapWrites {
    fn walk(&mut self, op: &MapOp, prefix: &mut Path) {
        match op {
            MapOp::Update { key, op } => {
                prefix.push(key.clone());
                match op {
                    FieldOp::Counter(c) => {
                        let n = amount(&Op::Counter(c.clone())).unwrap_or(0);
                        *self.counters.entry(prefix.clone()).or_default() += n;
                    }
                    FieldOp::Map(inner) => self.walk(inner, prefix),
                    _ => {}
                }
                prefix.pop();
            }
            MapOp::Remove(key) => {
                let mut p = prefix.clone();
                p.push(key.clone());
                self.removed.insert(p);
            }
            // Clear, and any operation this check does not know: treat as removing the map.
            _ => {
                self.removed.insert(prefix.clone());
            }
        }
    }

    fn touched_by_removal(&self, path: &[String]) -> bool {
        self.removed.iter().any(|r| path.starts_with(r))
    }
}

/// The counter at `path` of a stored map (zero where an entry is absent).
fn counter_at(value: &Crdt, path: &[String]) -> Result<i128, String> {
    let Crdt::Map(map) = value else {
        return Err(format!("holds a {}, not a map", value.type_tag()));
    };
    let Some((first, rest)) = path.split_first() else {
        return Err("empty field path".into());
    };
    let mut fields: Option<&MapFields> = map.get(first);
    for key in rest {
        fields = fields.and_then(|f| f.map().get(key.as_str()));
    }
    Ok(fields.map_or(0, MapFields::counter))
}

/// Runs the check.
pub fn check(outcome: &Outcome) -> CheckResult {
    let mut f = Findings::new("maps");
    let mut writes: BTreeMap<&str, MapWrites> = BTreeMap::new();
    for w in outcome
        .acked
        .iter()
        .filter(|w| KeyKind::of(&w.key) == Some(KeyKind::Map))
    {
        let slot = writes.entry(w.key.as_str()).or_default();
        match &w.op {
            Op::Map(op) => slot.walk(op, &mut Vec::new()),
            Op::Delete => {
                slot.removed.insert(Vec::new());
            }
            other => f.fail(format!(
                "key {}: acked write is not a map operation: {other:?}",
                w.key
            )),
        }
    }
    for (key, w) in &writes {
        for (path, sum) in &w.counters {
            if w.touched_by_removal(path) {
                continue;
            }
            for (r, state) in outcome.states.iter().enumerate() {
                f.checked();
                let region = outcome.regions.get(r).map_or("?", String::as_str);
                let shown = path.join("/");
                match state.get(*key).map(|v| counter_at(v, path)) {
                    Some(Ok(v)) if v == *sum => {}
                    Some(Ok(v)) => f.fail(format!(
                        "key {key} in {region}: counter at {shown} is {v}, but acknowledged \
                         increments sum to {sum} (off by {})",
                        v - sum
                    )),
                    Some(Err(e)) => f.fail(format!("key {key} in {region}: {e}")),
                    None => f.fail(format!(
                        "key {key} in {region}: missing, but acknowledged increments at {shown} \
                         sum to {sum}"
                    )),
                }
            }
        }
    }
    f.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use geostate_crdt::{CounterOp, SetOp, TypeTag};

    use super::*;
    use crate::checks::testkit::{small_run, Builder};

    fn inc(path: &[&str], n: u64) -> Op {
        let (last, outer) = path.split_last().unwrap();
        let mut op = MapOp::update(*last, FieldOp::Counter(CounterOp::inc(n)));
        for key in outer.iter().rev() {
            op = MapOp::update(*key, FieldOp::Map(Box::new(op)));
        }
        Op::Map(op)
    }

    fn maps() -> Builder {
        let mut b = Builder::new(2);
        b.write(0, "m:1", inc(&["a"], 2), 1);
        b.write(1, "m:1", inc(&["a"], 3), 2);
        b.write(1, "m:1", inc(&["b", "n0"], 4), 3);
        b.write(
            0,
            "m:1",
            Op::Map(MapOp::update("c", FieldOp::Set(SetOp::add("x")))),
            4,
        );
        b.sync();
        b
    }

    #[test]
    fn nested_counters_sum_their_increments() {
        let r = check(&maps().outcome());
        assert!(r.passed, "{r}");
        assert_eq!(r.checked, 4); // two paths in two regions
    }

    #[test]
    fn a_path_under_a_removal_is_skipped() {
        let mut b = maps();
        b.write(0, "m:1", Op::Map(MapOp::remove("b")), 5);
        b.write(1, "m:1", inc(&["b", "n0"], 1), 6); // concurrent: survives with its total
        b.sync();
        let r = check(&b.outcome());
        assert!(r.passed, "{r}");
        assert_eq!(r.checked, 2); // only "a" is exact now
    }

    #[test]
    fn a_lost_increment_fails() {
        let mut b = maps();
        let mut state = Crdt::empty(TypeTag::Map);
        for (i, w) in b.acked.iter().enumerate() {
            if i != 2 {
                state.merge(&w.delta).unwrap();
            }
        }
        b.regions[0].insert("m:1".into(), state);
        let r = check(&b.outcome());
        assert!(!r.passed);
        assert!(
            r.details[0].contains("counter at b/n0 is 0, but acknowledged increments sum to 4"),
            "{r}"
        );
        let mut outcome = maps().outcome();
        outcome.states[1].remove("m:1");
        assert!(check(&outcome).details[0].contains("in eu-west: missing"));
    }

    #[test]
    fn an_engine_run_passes_and_a_dropped_increment_fails() {
        let mut outcome = small_run(61);
        let r = check(&outcome);
        assert!(r.passed, "{r}");
        assert!(r.checked > 0);
        let before = r.checked;
        // Drop an acknowledged increment on a path the check examines.
        let writes: Vec<usize> = outcome
            .acked
            .iter()
            .enumerate()
            .filter(|(_, w)| {
                matches!(
                    &w.op,
                    Op::Map(MapOp::Update {
                        op: FieldOp::Counter(_),
                        ..
                    })
                )
            })
            .map(|(i, _)| i)
            .collect();
        let saved = outcome.acked.clone();
        let mut failed = false;
        for i in writes {
            outcome.acked = saved.clone();
            outcome.acked.remove(i);
            if !check(&outcome).passed {
                failed = true;
                break;
            }
        }
        assert!(
            failed,
            "no dropped increment was noticed ({before} paths checked)"
        );
        outcome.acked.clear();
        assert_eq!(check(&outcome).checked, 0);
    }
}
