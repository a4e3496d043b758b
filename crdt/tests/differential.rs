//! Differential tests against the `crdts` crate 7.3.2 (the Rust port of riak_dt's CRDTs).
//!
//! Random operation sequences over three actors with random sync schedules run on both sides
//! and the observable values are compared after every step and after a final full sync. Theirs
//! sync by full-state merge (`CvRDT::merge`): their operations are op-based (`CmRDT`) and need
//! causal delivery. Ours sync by full state or by shipping deltas newest-first (out of causal
//! order), which must give the same values.
//!
//! | ours | theirs | compared |
//! | --- | --- | --- |
//! | `GCounter` | `GCounter` | value |
//! | `PnCounter` | `PNCounter` | value |
//! | `OrSet<u8>` | `Orswot<u8, _>` | elements, with adds, removes and clears |
//! | `LwwRegister` | `LWWReg` | value; their marker is our order `(HLC, actor, counter)` |
//! | `MvRegister` | `MVReg` | values as a multiset |
//! | `OrMap` (set fields) | `Map<String, Orswot<u8, _>, _>` | non-empty sets per key |
//!
//! # Semantic differences (intended on our side)
//!
//! 1. **Map key removal: theirs resurrects removed elements.** Their `Map` implements
//!    reset-remove with per-actor version clocks: when actor X's add was seen by a key removal
//!    and X then writes under that key again concurrently with the removal, X's clock entry at
//!    the key moves past the removal's clock, the removal's information about X is dropped on
//!    merge, and the element the remover saw comes back (in every merge order: theirs still
//!    converge, to the wrong value). Ours removes by dots, so exactly the writes the remover saw
//!    are gone and exactly the concurrent writes survive. See
//!    `crdts_map_resurrects_removed_element_ours_does_not` (the minimal case, found by
//!    shrinking), `crdts_map_remove_scenario_of_the_brief`, and the property
//!    `map_with_key_removal_differs_only_by_resurrection`: with key removals, at every step
//!    and every replica, every element ours shows is shown by theirs (theirs only ever has
//!    extra elements). Without key removal the two maps agree.
//! 2. **Map entries emptied by an update:** theirs keep a key whose set an update emptied (the
//!    entry clock is not empty); ours drop a key once no field holds a live dot. Only non-empty
//!    sets are compared.
//! 3. **Registers have no clear on their side**, and their `LWWReg` keeps a single value: a
//!    write outranked by the current marker is discarded. Ours keeps an outranked concurrent
//!    write, so that an observed-remove clear of the winner exposes it; without clears the
//!    values agree, so only write-only histories are compared. `MVReg` likewise has no clear.
//! 4. **Delivery:** their operations must be applied in causal order (an `Orswot` add whose
//!    dot is ahead of the replica's clock is applied, and the skipped earlier add is then
//!    ignored as already seen; `validate_op` reports the gap). Our deltas may be applied in any
//!    order, any number of times. See `crdts_orswot_ops_need_causal_delivery_our_deltas_do_not`.
//! 5. Counters: theirs are unbounded (`BigUint`/`BigInt`), ours fail with
//!    `Error::CounterOverflow` past `u64::MAX` per actor and direction; small values agree.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use crdts::{CmRDT, CvRDT};
use geostate_crdt::{
    ActorId, FieldOp, GCounter, Hlc, LwwRegister, MapOp, MvRegister, OrMap, OrSet, PnCounter, SetOp,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

const CASES: u32 = 512;
const REPLICAS: usize = 3;
const MAX_STEPS: usize = 30;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        // `tests/` has no lib.rs for proptest's default (source-parallel) persistence to find;
        // cargo runs integration tests from the package root, so this is crdt/proptest-regressions.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/differential.txt",
        ))),
        ..ProptestConfig::default()
    }
}

/// One step of a differential history over three replicas (replica `i` is actor `i + 1`).
#[derive(Clone, Debug)]
enum Step<O> {
    Local {
        replica: usize,
        op: O,
    },
    /// `to` merges `from`. Theirs merge full states; ours merge either the full state or every
    /// delta `from` includes, newest first (out of causal order).
    Sync {
        from: usize,
        to: usize,
        via_deltas: bool,
    },
}

fn steps<O: Debug + Clone>(op: BoxedStrategy<O>) -> impl Strategy<Value = Vec<Step<O>>> {
    let step = prop_oneof![
        3 => (0..REPLICAS, op).prop_map(|(replica, op)| Step::Local { replica, op }),
        2 => (0..REPLICAS, 0..REPLICAS, any::<bool>())
            .prop_map(|(from, to, via_deltas)| Step::Sync { from, to, via_deltas }),
    ];
    vec(step, 1..=MAX_STEPS)
}

/// A pair of implementations of one CRDT and the observable value they must agree on.
trait Pair {
    type Op: Clone + Debug;
    type Ours: Clone + Debug + Default;
    type Theirs: Clone + Debug + Default;
    type Obs: PartialEq + Debug;
    /// Applies `op` at `actor` to theirs in place; returns our delta (not yet merged).
    fn local(ours: &Self::Ours, theirs: &mut Self::Theirs, actor: u64, op: &Self::Op)
        -> Self::Ours;
    fn merge_ours(into: &mut Self::Ours, other: &Self::Ours);
    fn merge_theirs(into: &mut Self::Theirs, other: &Self::Theirs);
    fn ours(x: &Self::Ours) -> Self::Obs;
    fn theirs(x: &Self::Theirs) -> Self::Obs;
}

/// Runs `steps` on both sides, comparing the touched replica after every step and every
/// replica after a final full sync.
fn differential<P: Pair>(steps: &[Step<P::Op>]) -> Result<(), TestCaseError> {
    let mut ours: Vec<P::Ours> = vec![P::Ours::default(); REPLICAS];
    let mut theirs: Vec<P::Theirs> = vec![P::Theirs::default(); REPLICAS];
    let mut deltas: Vec<P::Ours> = Vec::new();
    let mut includes: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); REPLICAS];
    for (i, step) in steps.iter().enumerate() {
        let touched = match step {
            Step::Local { replica, op } => {
                let r = *replica;
                let d = P::local(&ours[r], &mut theirs[r], r as u64 + 1, op);
                P::merge_ours(&mut ours[r], &d);
                includes[r].insert(deltas.len());
                deltas.push(d);
                r
            }
            Step::Sync {
                from,
                to,
                via_deltas,
            } => {
                let (from, to) = (*from, *to);
                let t = theirs[from].clone();
                P::merge_theirs(&mut theirs[to], &t);
                if *via_deltas {
                    for d in includes[from].iter().rev() {
                        P::merge_ours(&mut ours[to], &deltas[*d]);
                    }
                } else {
                    let o = ours[from].clone();
                    P::merge_ours(&mut ours[to], &o);
                }
                let inc = includes[from].clone();
                includes[to].extend(inc);
                to
            }
        };
        prop_assert_eq!(
            P::ours(&ours[touched]),
            P::theirs(&theirs[touched]),
            "replica {} after step {} ({:?})",
            touched,
            i,
            step
        );
    }
    for _ in 0..2 {
        for from in 0..REPLICAS {
            for to in 0..REPLICAS {
                let t = theirs[from].clone();
                P::merge_theirs(&mut theirs[to], &t);
                let o = ours[from].clone();
                P::merge_ours(&mut ours[to], &o);
            }
        }
    }
    for r in 0..REPLICAS {
        prop_assert_eq!(
            P::ours(&ours[r]),
            P::theirs(&theirs[r]),
            "replica {} synced",
            r
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum CounterStep {
    Inc(u64),
    Dec(u64),
}

fn gcounter_step() -> BoxedStrategy<CounterStep> {
    (0u64..10).prop_map(CounterStep::Inc).boxed()
}

fn pncounter_step() -> BoxedStrategy<CounterStep> {
    prop_oneof![
        (0u64..10).prop_map(CounterStep::Inc),
        (0u64..10).prop_map(CounterStep::Dec),
    ]
    .boxed()
}

struct GCounterPair;

impl Pair for GCounterPair {
    type Op = CounterStep;
    type Ours = GCounter;
    type Theirs = crdts::GCounter<u64>;
    type Obs = u128;

    fn local(ours: &GCounter, theirs: &mut Self::Theirs, actor: u64, op: &CounterStep) -> GCounter {
        let CounterStep::Inc(n) = op else {
            panic!("g-counters only grow")
        };
        let their_op = theirs.inc_many(actor, *n);
        theirs.apply(their_op);
        ours.inc(ActorId::new(actor), *n).unwrap()
    }
    fn merge_ours(into: &mut GCounter, other: &GCounter) {
        into.merge(other);
    }
    fn merge_theirs(into: &mut Self::Theirs, other: &Self::Theirs) {
        into.merge(other.clone());
    }
    fn ours(x: &GCounter) -> u128 {
        x.value()
    }
    fn theirs(x: &Self::Theirs) -> u128 {
        x.read().to_string().parse().unwrap()
    }
}

struct PnCounterPair;

impl Pair for PnCounterPair {
    type Op = CounterStep;
    type Ours = PnCounter;
    type Theirs = crdts::PNCounter<u64>;
    type Obs = i128;

    fn local(
        ours: &PnCounter,
        theirs: &mut Self::Theirs,
        actor: u64,
        op: &CounterStep,
    ) -> PnCounter {
        let a = ActorId::new(actor);
        match op {
            CounterStep::Inc(n) => {
                let their_op = theirs.inc_many(actor, *n);
                theirs.apply(their_op);
                ours.inc(a, *n).unwrap()
            }
            CounterStep::Dec(n) => {
                let their_op = theirs.dec_many(actor, *n);
                theirs.apply(their_op);
                ours.dec(a, *n).unwrap()
            }
        }
    }
    fn merge_ours(into: &mut PnCounter, other: &PnCounter) {
        into.merge(other);
    }
    fn merge_theirs(into: &mut Self::Theirs, other: &Self::Theirs) {
        into.merge(other.clone());
    }
    fn ours(x: &PnCounter) -> i128 {
        x.value()
    }
    fn theirs(x: &Self::Theirs) -> i128 {
        x.read().to_string().parse().unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// OR-set vs Orswot
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum SetStep {
    Add(Vec<u8>),
    Remove(Vec<u8>),
    Clear,
}

fn set_step() -> BoxedStrategy<SetStep> {
    prop_oneof![
        4 => vec(0u8..4, 1..=2).prop_map(SetStep::Add),
        3 => vec(0u8..4, 1..=2).prop_map(SetStep::Remove),
        1 => Just(SetStep::Clear),
    ]
    .boxed()
}

type TheirSet = crdts::Orswot<u8, u64>;

struct OrSetPair;

impl Pair for OrSetPair {
    type Op = SetStep;
    type Ours = OrSet<u8>;
    type Theirs = TheirSet;
    type Obs = BTreeSet<u8>;

    fn local(ours: &OrSet<u8>, theirs: &mut TheirSet, actor: u64, op: &SetStep) -> OrSet<u8> {
        match op {
            SetStep::Add(es) => {
                let ctx = theirs.read_ctx().derive_add_ctx(actor);
                let their_op = theirs.add_all(es.clone(), ctx);
                theirs.apply(their_op);
                ours.add_all(ActorId::new(actor), es.iter().copied())
            }
            SetStep::Remove(es) => {
                let ctx = theirs.read_ctx().derive_rm_ctx();
                let their_op = theirs.rm_all(es.clone(), ctx);
                theirs.apply(their_op);
                ours.remove_all(es.iter())
            }
            SetStep::Clear => {
                let read = theirs.read();
                let members: Vec<u8> = read.val.iter().copied().collect();
                let their_op = theirs.rm_all(members, read.derive_rm_ctx());
                theirs.apply(their_op);
                ours.clear()
            }
        }
    }
    fn merge_ours(into: &mut OrSet<u8>, other: &OrSet<u8>) {
        into.merge(other);
    }
    fn merge_theirs(into: &mut TheirSet, other: &TheirSet) {
        into.merge(other.clone());
    }
    fn ours(x: &OrSet<u8>) -> BTreeSet<u8> {
        x.iter().copied().collect()
    }
    fn theirs(x: &TheirSet) -> BTreeSet<u8> {
        x.read().val.into_iter().collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Registers
// ---------------------------------------------------------------------------------------------

/// Their LWW marker: our total order `(HLC, actor, the actor's dot counter)`, unique per write.
type Marker = (Hlc, u64, u64);

#[derive(Clone, Debug)]
struct LwwStep {
    hlc: Hlc,
    value: u8,
}

fn lww_step() -> BoxedStrategy<LwwStep> {
    // Few distinct timestamps: ties are broken by actor, then counter, on both sides.
    ((0u64..4, 0u32..2), 0u8..4)
        .prop_map(|((p, l), value)| LwwStep {
            hlc: Hlc::new(p, l),
            value,
        })
        .boxed()
}

struct LwwPair;

impl Pair for LwwPair {
    type Op = LwwStep;
    type Ours = LwwRegister<Vec<u8>>;
    type Theirs = crdts::LWWReg<Option<Vec<u8>>, Marker>;
    type Obs = Option<Vec<u8>>;

    fn local(ours: &Self::Ours, theirs: &mut Self::Theirs, actor: u64, op: &LwwStep) -> Self::Ours {
        let d = ours.write(ActorId::new(actor), op.hlc, vec![op.value]);
        // Our write is stamped past every value it saw (a lagging clock is raised); their marker
        // takes the stamp our write actually carries.
        let (dot, entry) = d.winner().unwrap();
        theirs.update(Some(vec![op.value]), (entry.hlc, actor, dot.counter));
        d
    }
    fn merge_ours(into: &mut Self::Ours, other: &Self::Ours) {
        into.merge(other);
    }
    fn merge_theirs(into: &mut Self::Theirs, other: &Self::Theirs) {
        into.merge(other.clone());
    }
    fn ours(x: &Self::Ours) -> Option<Vec<u8>> {
        x.value().cloned()
    }
    fn theirs(x: &Self::Theirs) -> Option<Vec<u8>> {
        x.val.clone()
    }
}

fn mv_step() -> BoxedStrategy<u8> {
    (0u8..4).boxed()
}

struct MvPair;

impl Pair for MvPair {
    type Op = u8;
    type Ours = MvRegister<Vec<u8>>;
    type Theirs = crdts::MVReg<Vec<u8>, u64>;
    /// Sorted values: a multiset (two concurrent writes of one value are two siblings on both
    /// sides).
    type Obs = Vec<Vec<u8>>;

    fn local(ours: &Self::Ours, theirs: &mut Self::Theirs, actor: u64, op: &u8) -> Self::Ours {
        let ctx = theirs.read_ctx().derive_add_ctx(actor);
        let their_op = theirs.write(vec![*op], ctx);
        theirs.apply(their_op);
        ours.write(ActorId::new(actor), Hlc::ZERO, vec![*op])
    }
    fn merge_ours(into: &mut Self::Ours, other: &Self::Ours) {
        into.merge(other);
    }
    fn merge_theirs(into: &mut Self::Theirs, other: &Self::Theirs) {
        into.merge(other.clone());
    }
    fn ours(x: &Self::Ours) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = x.values().cloned().collect();
        v.sort();
        v
    }
    fn theirs(x: &Self::Theirs) -> Vec<Vec<u8>> {
        let mut v = x.read().val;
        v.sort();
        v
    }
}

// ---------------------------------------------------------------------------------------------
// Map of sets vs Map<String, Orswot>
// ---------------------------------------------------------------------------------------------

type TheirMap = crdts::Map<String, TheirSet, u64>;

#[derive(Clone, Debug)]
enum MapStep {
    Add(String, u8),
    RemoveElement(String, u8),
    RemoveKey(String),
}

/// Applies one step to theirs the way the crate documents it (`examples/reset_remove.rs`):
/// updates under an add context of the whole map, key removal under the entry's clock.
fn their_map_step(theirs: &mut TheirMap, actor: u64, op: &MapStep) {
    let their_op = match op {
        MapStep::Add(k, e) => {
            let ctx = theirs.read_ctx().derive_add_ctx(actor);
            theirs.update(k.clone(), ctx, |s, c| s.add(*e, c))
        }
        MapStep::RemoveElement(k, e) => {
            let ctx = theirs.read_ctx().derive_add_ctx(actor);
            theirs.update(k.clone(), ctx, |s, _| {
                s.rm(*e, s.contains(e).derive_rm_ctx())
            })
        }
        MapStep::RemoveKey(k) => {
            let rm = theirs.get(k).derive_rm_ctx();
            theirs.rm(k.clone(), rm)
        }
    };
    theirs.apply(their_op);
}

fn our_map_op(op: &MapStep) -> MapOp {
    match op {
        MapStep::Add(k, e) => MapOp::update(k.clone(), FieldOp::Set(SetOp::add(vec![*e]))),
        MapStep::RemoveElement(k, e) => {
            MapOp::update(k.clone(), FieldOp::Set(SetOp::remove(vec![*e])))
        }
        MapStep::RemoveKey(k) => MapOp::remove(k.clone()),
    }
}

fn our_map_view(x: &OrMap) -> BTreeMap<String, BTreeSet<u8>> {
    x.keys()
        .map(|k| {
            let f = x.get(k).unwrap();
            (
                k.to_string(),
                f.set().map(|e| e[0]).collect::<BTreeSet<u8>>(),
            )
        })
        .filter(|(_, s)| !s.is_empty())
        .collect()
}

fn their_map_view(x: &TheirMap) -> BTreeMap<String, BTreeSet<u8>> {
    x.iter()
        .map(|ctx| {
            let (k, v) = ctx.val;
            (
                k.clone(),
                v.read().val.into_iter().collect::<BTreeSet<u8>>(),
            )
        })
        // Theirs keeps a key whose set became empty (an update removed its last element): the
        // entry's clock is not empty. Ours drops a key once no field holds a live dot. Compare
        // the non-empty sets only.
        .filter(|(_, s)| !s.is_empty())
        .collect()
}

struct MapPair;

impl Pair for MapPair {
    type Op = MapStep;
    type Ours = OrMap;
    type Theirs = TheirMap;
    type Obs = BTreeMap<String, BTreeSet<u8>>;

    fn local(ours: &OrMap, theirs: &mut TheirMap, actor: u64, op: &MapStep) -> OrMap {
        their_map_step(theirs, actor, op);
        ours.apply(ActorId::new(actor), Hlc::ZERO, &our_map_op(op))
            .unwrap()
    }
    fn merge_ours(into: &mut OrMap, other: &OrMap) {
        into.merge(other);
    }
    fn merge_theirs(into: &mut TheirMap, other: &TheirMap) {
        into.merge(other.clone());
    }
    fn ours(x: &OrMap) -> Self::Obs {
        our_map_view(x)
    }
    fn theirs(x: &TheirMap) -> Self::Obs {
        their_map_view(x)
    }
}

/// Element adds and removes inside map entries, no key removal: there the two maps agree.
fn map_step_without_key_removal() -> BoxedStrategy<MapStep> {
    let key = prop::sample::select(vec!["a".to_string(), "b".to_string()]);
    prop_oneof![
        3 => (key.clone(), 0u8..3).prop_map(|(k, e)| MapStep::Add(k, e)),
        2 => (key, 0u8..3).prop_map(|(k, e)| MapStep::RemoveElement(k, e)),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn gcounter_matches_crdts_gcounter(s in steps(gcounter_step())) {
        differential::<GCounterPair>(&s)?;
    }

    #[test]
    fn pncounter_matches_crdts_pncounter(s in steps(pncounter_step())) {
        differential::<PnCounterPair>(&s)?;
    }

    #[test]
    fn orset_matches_crdts_orswot(s in steps(set_step())) {
        differential::<OrSetPair>(&s)?;
    }

    #[test]
    fn lww_register_matches_crdts_lwwreg_without_clears(s in steps(lww_step())) {
        differential::<LwwPair>(&s)?;
    }

    #[test]
    fn mv_register_matches_crdts_mvreg_without_clears(s in steps(mv_step())) {
        differential::<MvPair>(&s)?;
    }

    #[test]
    fn map_of_sets_matches_crdts_map_without_key_removal(s in steps(map_step_without_key_removal())) {
        differential::<MapPair>(&s)?;
    }
}

/// Any map step, key removal included.
fn map_step() -> BoxedStrategy<MapStep> {
    let key = prop::sample::select(vec!["a".to_string(), "b".to_string()]);
    prop_oneof![
        4 => (key.clone(), 0u8..3).prop_map(|(k, e)| MapStep::Add(k, e)),
        1 => (key.clone(), 0u8..3).prop_map(|(k, e)| MapStep::RemoveElement(k, e)),
        2 => key.prop_map(MapStep::RemoveKey),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(config())]

    /// With key removals the maps disagree, but only in one direction: theirs show every element
    /// ours show, plus resurrected ones (difference 1 of the module docs). Ours are checked
    /// against a reference model in `tests/laws.rs`.
    #[test]
    fn map_with_key_removal_differs_only_by_resurrection(s in steps(map_step())) {
        let mut ours = vec![OrMap::new(); REPLICAS];
        let mut theirs = vec![TheirMap::new(); REPLICAS];
        for step in &s {
            match step {
                Step::Local { replica, op } => {
                    let r = *replica;
                    let d = MapPair::local(&ours[r], &mut theirs[r], r as u64 + 1, op);
                    ours[r].merge(&d);
                }
                Step::Sync { from, to, .. } => {
                    let t = theirs[*from].clone();
                    theirs[*to].merge(t);
                    let o = ours[*from].clone();
                    ours[*to].merge(&o);
                }
            }
            for r in 0..REPLICAS {
                let o = our_map_view(&ours[r]);
                let t = their_map_view(&theirs[r]);
                for (k, set) in &o {
                    prop_assert!(
                        t.get(k).is_some_and(|ts| set.is_subset(ts)),
                        "replica {}: ours {:?}, theirs {:?}", r, o, t
                    );
                }
            }
        }
    }
}

/// One local map step at replica `r` on both sides.
fn both(ours: &mut [OrMap], theirs: &mut [TheirMap], r: usize, op: MapStep) {
    let d = MapPair::local(&ours[r], &mut theirs[r], r as u64 + 1, &op);
    ours[r].merge(&d);
}

fn set_of(elements: &[u8]) -> BTreeSet<u8> {
    elements.iter().copied().collect()
}

/// The minimal case proptest shrank the map comparison to. Replica 1 (actor 1) adds 1 under
/// `b`; replica 3 receives that state; replica 1 adds 0 under `b`; replica 3, having seen only
/// the add of 1, removes `b`. The add of 0 is concurrent with the removal and must survive;
/// the add of 1 was seen by the removal and must not.
#[test]
fn crdts_map_resurrects_removed_element_ours_does_not() {
    let b = || "b".to_string();
    let steps = [
        Step::Local {
            replica: 0,
            op: MapStep::Add(b(), 1),
        },
        Step::Sync {
            from: 0,
            to: 2,
            via_deltas: false,
        },
        Step::Local {
            replica: 0,
            op: MapStep::Add(b(), 0),
        },
        Step::Local {
            replica: 2,
            op: MapStep::RemoveKey(b()),
        },
    ];
    let mut ours = vec![OrMap::new(); REPLICAS];
    let mut theirs = vec![TheirMap::new(); REPLICAS];
    for step in &steps {
        match step {
            Step::Local { replica, op } => {
                let r = *replica;
                let d = MapPair::local(&ours[r], &mut theirs[r], r as u64 + 1, op);
                ours[r].merge(&d);
            }
            Step::Sync { from, to, .. } => {
                let t = theirs[*from].clone();
                theirs[*to].merge(t);
                let o = ours[*from].clone();
                ours[*to].merge(&o);
            }
        }
    }
    // Both merge orders of replicas 1 and 3.
    let (mut o13, mut o31) = (ours[0].clone(), ours[2].clone());
    o13.merge(&ours[2]);
    o31.merge(&ours[0]);
    let (mut t13, mut t31) = (theirs[0].clone(), theirs[2].clone());
    t13.merge(theirs[2].clone());
    t31.merge(theirs[0].clone());

    let expected = BTreeMap::from([(b(), set_of(&[0]))]);
    assert_eq!(our_map_view(&o13), expected);
    assert_eq!(our_map_view(&o31), expected);
    assert_eq!(o13, o31);

    let resurrected = BTreeMap::from([(b(), set_of(&[0, 1]))]);
    assert_eq!(
        their_map_view(&t13),
        resurrected,
        "crdts 7.3.2 brings 1 back"
    );
    assert_eq!(their_map_view(&t31), resurrected, "in both merge orders");
}

/// The removal scenario of `tests/laws.rs`, on both sides: actors A, B and C add elements under
/// `k`, everybody syncs, A removes `k` while C concurrently adds `z`. Theirs get it right when
/// C had added nothing under `k` before; when C had (`c0`), their per-actor clock for C moves
/// past the removal and `c0` comes back. Ours keep exactly `z` either way.
#[test]
fn crdts_map_remove_scenario_of_the_brief() {
    for c_wrote_before in [false, true] {
        let k = || "k".to_string();
        let mut ours = vec![OrMap::new(); REPLICAS];
        let mut theirs = vec![TheirMap::new(); REPLICAS];
        both(&mut ours, &mut theirs, 0, MapStep::Add(k(), 10)); // A adds 10
        both(&mut ours, &mut theirs, 1, MapStep::Add(k(), 20)); // B adds 20
        if c_wrote_before {
            both(&mut ours, &mut theirs, 2, MapStep::Add(k(), 30)); // C adds 30
        }
        // Everybody syncs.
        let (mut o, mut t) = (OrMap::new(), TheirMap::new());
        for r in 0..REPLICAS {
            o.merge(&ours[r]);
            t.merge(theirs[r].clone());
        }
        for r in 0..REPLICAS {
            ours[r] = o.clone();
            theirs[r] = t.clone();
        }
        both(&mut ours, &mut theirs, 0, MapStep::RemoveKey(k())); // A removes k
        both(&mut ours, &mut theirs, 2, MapStep::Add(k(), 99)); // C adds 99 concurrently
        let (mut o, mut t) = (ours[2].clone(), theirs[2].clone());
        o.merge(&ours[0]);
        t.merge(theirs[0].clone());

        assert_eq!(our_map_view(&o), BTreeMap::from([(k(), set_of(&[99]))]));
        let theirs_seen = their_map_view(&t);
        if c_wrote_before {
            assert_eq!(theirs_seen, BTreeMap::from([(k(), set_of(&[30, 99]))]));
        } else {
            assert_eq!(theirs_seen, BTreeMap::from([(k(), set_of(&[99]))]));
        }
    }
}

/// Their op-based set loses an add delivered after a later add of the same actor; our deltas
/// converge in any order.
#[test]
fn crdts_orswot_ops_need_causal_delivery_our_deltas_do_not() {
    let actor = 1u64;
    let mut source = TheirSet::new();
    let op1 = source.add(1, source.read_ctx().derive_add_ctx(actor));
    source.apply(op1.clone());
    let op2 = source.add(2, source.read_ctx().derive_add_ctx(actor));
    source.apply(op2.clone());

    let mut sink = TheirSet::new();
    assert!(sink.validate_op(&op2).is_err(), "the gap is detectable...");
    sink.apply(op2);
    sink.apply(op1);
    assert_eq!(
        sink.read().val.into_iter().collect::<BTreeSet<u8>>(),
        set_of(&[2]),
        "...but applying anyway loses the add of 1"
    );

    let a = ActorId::new(actor);
    let mut ours = OrSet::<u8>::new();
    let d1 = ours.add(a, 1);
    ours.merge(&d1);
    let d2 = ours.add(a, 2);
    ours.merge(&d2);
    let mut our_sink = OrSet::new();
    our_sink.merge(&d2);
    our_sink.merge(&d1);
    assert_eq!(our_sink, ours);
    assert_eq!(
        our_sink.iter().copied().collect::<BTreeSet<u8>>(),
        set_of(&[1, 2])
    );
}
