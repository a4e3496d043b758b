//! The dot oracle: which writes must be live at the end, from the acknowledged deltas alone.
//!
//! Every write creates fresh dots, each held by the store of exactly the delta that created
//! it; a delta's causal context holds the dots it created plus the dots it overwrote or
//! removed. So, with no merge code at all:
//!
//! > a dot is **live** iff some acknowledged delta's store holds it, and no acknowledged
//! > delta's context covers it without holding it in its store.
//!
//! After full convergence every region's state must hold exactly the live dots (with the
//! payload the creating delta gave them). This is exact on the embedded store, where every
//! write is either acknowledged or failed; a store with indeterminate writes would need their
//! deltas too.

use std::collections::{BTreeMap, BTreeSet};

use geostate_crdt::{CausalContext, Crdt, Dot, DotStore, Stamped};

use crate::AckedWrite;

/// What a dot carries in the store of the delta that created it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Payload {
    /// An OR-set element.
    Element(Vec<u8>),
    /// A register write (last-writer-wins or multi-value) with its stamp.
    Write(Stamped<Vec<u8>>),
    /// A dot of another type (counters, maps): only its liveness is tracked.
    Other,
}

/// The oracle of one key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyOracle {
    /// Every dot an acknowledged delta created, with its payload and the index (in
    /// `Outcome::acked`) of that write.
    pub created: BTreeMap<Dot, (Payload, usize)>,
    /// Created dots some acknowledged delta covered without holding: causally removed.
    pub removed: BTreeSet<Dot>,
    /// Problems with the deltas themselves (a dot created twice with different payloads, a
    /// delta of the wrong type).
    pub anomalies: Vec<String>,
}

impl KeyOracle {
    /// Whether `dot` must be live.
    pub fn is_live(&self, dot: Dot) -> bool {
        self.created.contains_key(&dot) && !self.removed.contains(&dot)
    }

    /// The live dots with their payloads, in dot order.
    pub fn live(&self) -> impl Iterator<Item = (Dot, &Payload)> + '_ {
        self.created
            .iter()
            .filter(|(d, _)| !self.removed.contains(d))
            .map(|(d, (p, _))| (*d, p))
    }
}

/// The dots a value's store holds, with their payloads.
pub fn store_dots(value: &Crdt) -> Vec<(Dot, Payload)> {
    let mut out = Vec::new();
    match value {
        Crdt::OrSet(s) => {
            for (element, dots) in s.entries() {
                for d in dots.iter() {
                    out.push((d, Payload::Element(element.clone())));
                }
            }
        }
        Crdt::LwwRegister(r) => {
            for (d, e) in r.as_causal().store().iter() {
                out.push((d, Payload::Write(e.clone())));
            }
        }
        Crdt::MvRegister(r) => {
            for (d, e) in r.siblings() {
                out.push((d, Payload::Write(e.clone())));
            }
        }
        Crdt::PnCounter(c) => c
            .as_causal()
            .store()
            .for_each_dot(&mut |d| out.push((d, Payload::Other))),
        Crdt::GCounter(c) => c
            .as_causal()
            .store()
            .for_each_dot(&mut |d| out.push((d, Payload::Other))),
        Crdt::Map(m) => m
            .as_causal()
            .store()
            .for_each_dot(&mut |d| out.push((d, Payload::Other))),
        _ => {}
    }
    out
}

/// Dots of `ctx` that are also keys of `among`, enumerating whichever side is smaller.
fn covered<'a, V>(ctx: &'a CausalContext, among: &'a BTreeMap<Dot, V>) -> Vec<Dot> {
    if ctx.dot_count() <= among.len() as u64 {
        ctx.dots().filter(|d| among.contains_key(d)).collect()
    } else {
        among.keys().copied().filter(|d| ctx.contains(*d)).collect()
    }
}

/// The oracle of every key written, from `acked` only.
pub fn build(acked: &[AckedWrite]) -> BTreeMap<String, KeyOracle> {
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, w) in acked.iter().enumerate() {
        by_key.entry(w.key.as_str()).or_default().push(i);
    }
    let mut out = BTreeMap::new();
    for (key, writes) in by_key {
        let mut oracle = KeyOracle::default();
        let mut held: Vec<BTreeSet<Dot>> = Vec::with_capacity(writes.len());
        for &i in &writes {
            let dots = store_dots(&acked[i].delta);
            let mut mine = BTreeSet::new();
            for (d, payload) in dots {
                mine.insert(d);
                match oracle.created.get(&d) {
                    Some((p, first)) if *p != payload => oracle.anomalies.push(format!(
                        "dot {d} created by acked write #{first} and again, differently, by #{i}"
                    )),
                    Some(_) => {}
                    None => {
                        oracle.created.insert(d, (payload, i));
                    }
                }
            }
            held.push(mine);
        }
        for (&i, mine) in writes.iter().zip(&held) {
            for d in covered(acked[i].delta.context(), &oracle.created) {
                if !mine.contains(&d) {
                    oracle.removed.insert(d);
                }
            }
        }
        out.insert(key.to_string(), oracle);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use geostate_crdt::{Op, SetOp};

    use super::*;
    use crate::checks::testkit::Builder;

    #[test]
    fn an_add_is_live_until_a_remove_that_saw_it() {
        let mut b = Builder::new(2);
        b.write(0, "s:1", Op::Set(SetOp::add("x")), 10);
        b.sync();
        // Concurrently: region 0 removes x (seen), region 1 adds x again (new dot).
        b.write(0, "s:1", Op::Set(SetOp::remove("x")), 20);
        b.write(1, "s:1", Op::Set(SetOp::add("x")), 21);
        let oracle = build(&b.acked);
        let key = &oracle["s:1"];
        assert_eq!(key.created.len(), 2);
        assert_eq!(key.removed.len(), 1);
        let live: Vec<_> = key.live().collect();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].0.actor, Builder::actor(1));
        assert!(key.anomalies.is_empty());
    }

    #[test]
    fn a_re_add_overwrites_the_older_dot() {
        let mut b = Builder::new(1);
        b.write(0, "s:1", Op::Set(SetOp::add("x")), 10);
        b.write(0, "s:1", Op::Set(SetOp::add("x")), 11);
        let key = &build(&b.acked)["s:1"];
        assert_eq!(key.created.len(), 2);
        assert_eq!(key.live().count(), 1);
    }

    #[test]
    fn a_dot_created_twice_differently_is_an_anomaly() {
        let mut b = Builder::new(1);
        b.write(0, "s:1", Op::Set(SetOp::add("x")), 10);
        let mut forged = b.acked[0].clone();
        forged.delta = Builder::new(1).write(0, "s:1", Op::Set(SetOp::add("y")), 10);
        b.acked.push(forged);
        assert_eq!(build(&b.acked)["s:1"].anomalies.len(), 1);
    }
}
