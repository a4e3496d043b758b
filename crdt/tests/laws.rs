//! Property tests of every CRDT type of `geostate-crdt`: lattice laws, delta/state equivalence,
//! delivery-order convergence down to canonical bytes, and value semantics against a reference
//! model of causal histories.
//!
//! # How a case is built
//!
//! A case is a random multi-replica history: 3 or 4 replicas, replica `i` writing as actor
//! `i + 1`, each with its own local state. A step is one of
//!
//! - a local operation at replica `i`: the mutator's delta is merged by replica `i` and recorded;
//! - a full-state sync: replica `i` merges replica `j`'s whole state;
//! - a delta sync: replica `i` merges one recorded delta (any one, so out of causal order too).
//!
//! In half the cases every replica starts from a common state whose context holds more than
//! 1024 dots (a non-replica actor's writes, all removed again, so nothing is visible): then every
//! full-state merge takes `Causal::merge`'s direct full-scan path, while deltas take the
//! key-hint fast path. Otherwise all states are small and even full states go through the fast
//! path and its fallback.
//!
//! # The reference model
//!
//! [`Model`] knows nothing of dots, stores or joins. It keeps, per replica, the set of write
//! events it has *seen* and the set it has seen *overwritten*: a write is visible at a replica
//! iff it is seen there and not overwritten. A local operation overwrites visible writes
//! according to the type's rule (a counter update: its actor's own entries at that location; an
//! add: earlier adds of that element; a remove: the adds of that element; an LWW write: lower
//! ranked writes; an MV write or a clear: every write there; a map remove: every write under the
//! key, at any depth). A delta carries its new writes and what it overwrote; a full state carries
//! everything its replica saw. Observable values (counter sums, set elements, LWW winner, MV
//! siblings, map keys at every depth) are derived from the visible writes and compared with the
//! implementation after every step, at every replica, and for the join of all replicas.
//!
//! On top of the model, the textbook statements are checked directly on the final join:
//! counter = sum of increments minus decrements; an OR-set element is present iff one of its adds
//! is covered by no later add, remove or clear of it; the LWW value of a history without clears
//! is its greatest `(HLC, actor, counter)` write; an MV register without clears holds exactly the
//! writes no other write has seen, and they are pairwise concurrent.
//!
//! # Deltas versus states
//!
//! A raw delta is not a normalized state: a remove delta names the key it touches with an empty
//! entry (the key hint used by `Causal::merge`'s fast path), and joining *into* a raw delta may
//! keep or drop such empty entries depending on the join's path. So laws on deltas compare the
//! deltas as lattice elements: `norm(x) = ⊥ ⊔ x`, which drops empty entries and is the identity
//! on states. Laws on replica states compare structurally, and convergence compares canonical
//! envelope bytes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use geostate_crdt::envelope::{self, Limits, Options};
use geostate_crdt::map::MapStore;
use geostate_crdt::orset::OrSetStore;
use geostate_crdt::{
    ActorId, Causal, CausalContext, CounterOp, Crdt, Dot, DotMap, DotSet, DotStore, FieldOp,
    GCounter, Hlc, LwwRegister, MapFields, MapOp, MvRegister, Op, OrMap, OrSet, PnCounter,
    RegisterOp, SetOp, TypeTag,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;

/// Cases per property (at least 256).
const CASES: u32 = 512;
/// Longest history.
const MAX_STEPS: usize = 36;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        // `tests/` has no lib.rs for proptest's default (source-parallel) persistence to find;
        // cargo runs integration tests from the package root, so this is crdt/proptest-regressions.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/laws.txt",
        ))),
        ..ProptestConfig::default()
    }
}

fn actor(replica: usize) -> ActorId {
    ActorId::new(replica as u64 + 1)
}

// ---------------------------------------------------------------------------------------------
// Observable values
// ---------------------------------------------------------------------------------------------

/// What a reader can observe of a value: one node per map key, the root for a plain type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Node {
    counter: i128,
    set: BTreeSet<Vec<u8>>,
    lww: Option<Vec<u8>>,
    /// MV siblings, sorted (equal values written concurrently appear once each).
    mv: Vec<Vec<u8>>,
    children: BTreeMap<String, Node>,
}

fn observe_fields(fields: &MapFields) -> Node {
    let mut mv: Vec<Vec<u8>> = fields.mv().map(<[u8]>::to_vec).collect();
    mv.sort();
    Node {
        counter: fields.counter(),
        set: fields.set().map(<[u8]>::to_vec).collect(),
        lww: fields.lww().map(<[u8]>::to_vec),
        mv,
        children: observe_map_store(fields.map()),
    }
}

fn observe_map_store(store: &MapStore) -> BTreeMap<String, Node> {
    store
        .iter()
        .map(|(key, fields)| (key.clone(), observe_fields(fields)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The types under test, behind one interface
// ---------------------------------------------------------------------------------------------

/// One CRDT type as the harness drives it: every type takes [`Op`]s (typed sets take
/// single-byte elements).
trait Subject: Clone + Debug + PartialEq {
    /// The empty value of the same type.
    fn fresh(&self) -> Self;
    /// The delta of `op` at `actor`.
    fn delta(&self, actor: ActorId, hlc: Hlc, op: &Op) -> Self;
    /// Joins `other` into `self`.
    fn join(&mut self, other: &Self);
    /// As a stored value (for canonical bytes).
    fn to_crdt(&self) -> Crdt;
    /// What a reader sees.
    fn observe(&self) -> Node;
}

impl Subject for GCounter {
    fn fresh(&self) -> Self {
        GCounter::new()
    }
    fn delta(&self, actor: ActorId, _hlc: Hlc, op: &Op) -> Self {
        match op {
            Op::GCounterInc(n) => self.inc(actor, *n).unwrap(),
            other => panic!("not a g-counter op: {other:?}"),
        }
    }
    fn join(&mut self, other: &Self) {
        self.merge(other);
    }
    fn to_crdt(&self) -> Crdt {
        Crdt::from(self.clone())
    }
    fn observe(&self) -> Node {
        Node {
            counter: i128::try_from(self.value()).unwrap(),
            ..Node::default()
        }
    }
}

impl Subject for PnCounter {
    fn fresh(&self) -> Self {
        PnCounter::new()
    }
    fn delta(&self, actor: ActorId, _hlc: Hlc, op: &Op) -> Self {
        match op {
            Op::Counter(CounterOp::Inc(n)) => self.inc(actor, *n).unwrap(),
            Op::Counter(CounterOp::Dec(n)) => self.dec(actor, *n).unwrap(),
            other => panic!("not a pn-counter op: {other:?}"),
        }
    }
    fn join(&mut self, other: &Self) {
        self.merge(other);
    }
    fn to_crdt(&self) -> Crdt {
        Crdt::from(self.clone())
    }
    fn observe(&self) -> Node {
        Node {
            counter: self.value(),
            ..Node::default()
        }
    }
}

/// The typed set holds `u8`; the harness's elements are one-byte strings.
fn byte(element: &[u8]) -> u8 {
    assert_eq!(element.len(), 1, "typed-set elements are single bytes");
    element[0]
}

impl Subject for OrSet<u8> {
    fn fresh(&self) -> Self {
        OrSet::new()
    }
    fn delta(&self, actor: ActorId, _hlc: Hlc, op: &Op) -> Self {
        match op {
            Op::Set(SetOp::Add(elements)) => self.add_all(actor, elements.iter().map(|e| byte(e))),
            Op::Set(SetOp::Remove(elements)) => {
                let elements: Vec<u8> = elements.iter().map(|e| byte(e)).collect();
                self.remove_all(elements.iter())
            }
            Op::Set(SetOp::Clear) => self.clear(),
            other => panic!("not a set op: {other:?}"),
        }
    }
    fn join(&mut self, other: &Self) {
        self.merge(other);
    }
    fn to_crdt(&self) -> Crdt {
        let bytes = self
            .try_map(|e| Ok::<_, std::convert::Infallible>(vec![*e]))
            .unwrap();
        Crdt::from(bytes)
    }
    fn observe(&self) -> Node {
        Node {
            set: self.iter().map(|e| vec![*e]).collect(),
            ..Node::default()
        }
    }
}

impl Subject for LwwRegister<Vec<u8>> {
    fn fresh(&self) -> Self {
        LwwRegister::new()
    }
    fn delta(&self, actor: ActorId, hlc: Hlc, op: &Op) -> Self {
        match op {
            Op::Lww(RegisterOp::Write(v)) => self.write(actor, hlc, v.clone()),
            Op::Lww(RegisterOp::Clear) => self.clear(),
            other => panic!("not an lww op: {other:?}"),
        }
    }
    fn join(&mut self, other: &Self) {
        self.merge(other);
    }
    fn to_crdt(&self) -> Crdt {
        Crdt::from(self.clone())
    }
    fn observe(&self) -> Node {
        Node {
            lww: self.value().cloned(),
            ..Node::default()
        }
    }
}

impl Subject for MvRegister<Vec<u8>> {
    fn fresh(&self) -> Self {
        MvRegister::new()
    }
    fn delta(&self, actor: ActorId, hlc: Hlc, op: &Op) -> Self {
        match op {
            Op::Mv(RegisterOp::Write(v)) => self.write(actor, hlc, v.clone()),
            Op::Mv(RegisterOp::Clear) => self.clear(),
            other => panic!("not an mv op: {other:?}"),
        }
    }
    fn join(&mut self, other: &Self) {
        self.merge(other);
    }
    fn to_crdt(&self) -> Crdt {
        Crdt::from(self.clone())
    }
    fn observe(&self) -> Node {
        let mut mv: Vec<Vec<u8>> = self.values().cloned().collect();
        mv.sort();
        Node {
            mv,
            ..Node::default()
        }
    }
}

impl Subject for OrMap {
    fn fresh(&self) -> Self {
        OrMap::new()
    }
    fn delta(&self, actor: ActorId, hlc: Hlc, op: &Op) -> Self {
        match op {
            Op::Map(m) => self.apply(actor, hlc, m).unwrap(),
            other => panic!("not a map op: {other:?}"),
        }
    }
    fn join(&mut self, other: &Self) {
        self.merge(other);
    }
    fn to_crdt(&self) -> Crdt {
        Crdt::from(self.clone())
    }
    fn observe(&self) -> Node {
        Node {
            children: observe_map_store(self.as_causal().store()),
            ..Node::default()
        }
    }
}

/// The dynamic enum, driven through `Crdt::apply` / `Crdt::merge`. The typed set inside holds
/// byte strings.
impl Subject for Crdt {
    fn fresh(&self) -> Self {
        Crdt::empty(self.type_tag())
    }
    fn delta(&self, actor: ActorId, hlc: Hlc, op: &Op) -> Self {
        self.apply(actor, hlc, op).unwrap()
    }
    fn join(&mut self, other: &Self) {
        self.merge(other).unwrap();
    }
    fn to_crdt(&self) -> Crdt {
        self.clone()
    }
    fn observe(&self) -> Node {
        match self {
            Crdt::GCounter(v) => v.observe(),
            Crdt::PnCounter(v) => v.observe(),
            Crdt::OrSet(v) => Node {
                set: v.iter().cloned().collect(),
                ..Node::default()
            },
            Crdt::LwwRegister(v) => v.observe(),
            Crdt::MvRegister(v) => v.observe(),
            Crdt::Map(v) => v.observe(),
            other => panic!("unknown variant {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

/// A write event: `(actor, n)` is the actor's `n`-th write (the order LWW ties break on).
type Eid = (u64, u64);

#[derive(Clone, Debug)]
enum Payload {
    /// A counter entry: the actor's running totals.
    Counter {
        inc: u64,
        dec: u64,
    },
    /// One add of a set element.
    Set(Vec<u8>),
    Lww {
        hlc: Hlc,
        value: Vec<u8>,
    },
    /// An MV write (timestamps play no part in MV semantics).
    Mv(Vec<u8>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Counter,
    Set,
    Lww,
    Mv,
}

impl Payload {
    fn field(&self) -> Field {
        match self {
            Payload::Counter { .. } => Field::Counter,
            Payload::Set(_) => Field::Set,
            Payload::Lww { .. } => Field::Lww,
            Payload::Mv(_) => Field::Mv,
        }
    }
}

#[derive(Clone, Debug)]
struct Event {
    /// Map keys from the root; empty for a plain type.
    path: Vec<String>,
    payload: Payload,
    /// Everything its replica had seen when it was made (its causal past).
    past: BTreeSet<Eid>,
}

/// What a replica (or a delta) knows: writes seen, and writes seen overwritten.
#[derive(Clone, Debug, Default)]
struct View {
    seen: BTreeSet<Eid>,
    overwritten: BTreeSet<Eid>,
}

impl View {
    fn absorb(&mut self, other: &View) {
        self.seen.extend(other.seen.iter().copied());
        self.overwritten.extend(other.overwritten.iter().copied());
    }

    fn visible(&self) -> impl Iterator<Item = Eid> + '_ {
        self.seen.difference(&self.overwritten).copied()
    }
}

/// A type's operation, lowered to a location and an action.
#[derive(Clone, Debug)]
enum Action {
    Counter { inc: u64, dec: u64 },
    SetAdd(Vec<Vec<u8>>),
    SetRemove(Vec<Vec<u8>>),
    SetClear,
    LwwWrite(Vec<u8>),
    LwwClear,
    MvWrite(Vec<u8>),
    MvClear,
    MapRemove(String),
    MapClear,
}

fn lower(op: &Op) -> (Vec<String>, Action) {
    match op {
        Op::GCounterInc(n) => (vec![], Action::Counter { inc: *n, dec: 0 }),
        Op::Counter(c) => (vec![], lower_counter(c)),
        Op::Set(s) => (vec![], lower_set(s)),
        Op::Lww(r) => (vec![], lower_lww(r)),
        Op::Mv(r) => (vec![], lower_mv(r)),
        Op::Map(m) => lower_map(m, vec![]),
        other => panic!("unknown op {other:?}"),
    }
}

fn lower_counter(op: &CounterOp) -> Action {
    match op {
        CounterOp::Inc(n) => Action::Counter { inc: *n, dec: 0 },
        CounterOp::Dec(n) => Action::Counter { inc: 0, dec: *n },
        other => panic!("unknown op {other:?}"),
    }
}

fn lower_set(op: &SetOp) -> Action {
    match op {
        SetOp::Add(e) => Action::SetAdd(e.clone()),
        SetOp::Remove(e) => Action::SetRemove(e.clone()),
        SetOp::Clear => Action::SetClear,
        other => panic!("unknown op {other:?}"),
    }
}

fn lower_lww(op: &RegisterOp) -> Action {
    match op {
        RegisterOp::Write(v) => Action::LwwWrite(v.clone()),
        RegisterOp::Clear => Action::LwwClear,
        other => panic!("unknown op {other:?}"),
    }
}

fn lower_mv(op: &RegisterOp) -> Action {
    match op {
        RegisterOp::Write(v) => Action::MvWrite(v.clone()),
        RegisterOp::Clear => Action::MvClear,
        other => panic!("unknown op {other:?}"),
    }
}

fn lower_map(op: &MapOp, mut path: Vec<String>) -> (Vec<String>, Action) {
    match op {
        MapOp::Update { key, op } => {
            path.push(key.clone());
            match op {
                FieldOp::Counter(c) => (path, lower_counter(c)),
                FieldOp::Set(s) => (path, lower_set(s)),
                FieldOp::Lww(r) => (path, lower_lww(r)),
                FieldOp::Mv(r) => (path, lower_mv(r)),
                FieldOp::Map(m) => lower_map(m, path),
                other => panic!("unknown op {other:?}"),
            }
        }
        MapOp::Remove(key) => (path, Action::MapRemove(key.clone())),
        MapOp::Clear => (path, Action::MapClear),
        other => panic!("unknown op {other:?}"),
    }
}

/// A remove-like operation, kept for the textbook OR-set statement.
#[derive(Clone, Debug)]
struct Removal {
    /// The element it removes; `None` for a clear.
    element: Option<Vec<u8>>,
    past: BTreeSet<Eid>,
}

#[derive(Clone, Debug, Default)]
struct Model {
    events: BTreeMap<Eid, Event>,
    views: Vec<View>,
    writes_made: Vec<u64>,
    /// Per recorded delta: the writes it made (seen) and those it overwrote (seen, overwritten).
    effects: Vec<View>,
    removals: Vec<Removal>,
    inc_total: i128,
    dec_total: i128,
}

/// The LWW order: timestamp, then actor, then the actor's write counter.
type Rank = (Hlc, u64, u64);

fn lww_rank(id: Eid, hlc: Hlc) -> Rank {
    (hlc, id.0, id.1)
}

impl Model {
    fn new(replicas: usize) -> Self {
        Self {
            views: vec![View::default(); replicas],
            writes_made: vec![0; replicas],
            ..Self::default()
        }
    }

    /// Visible writes at `replica` at exactly `path` in `field`.
    fn visible_at(&self, replica: usize, path: &[String], field: Field) -> Vec<Eid> {
        self.views[replica]
            .visible()
            .filter(|id| {
                let e = &self.events[id];
                e.path == path && e.payload.field() == field
            })
            .collect()
    }

    /// Runs `op` at `replica` and records its effect as the next delta's.
    fn local(&mut self, replica: usize, hlc: Hlc, op: &Op) {
        let (path, action) = lower(op);
        let actor = replica as u64 + 1;
        let past = self.views[replica].seen.clone();
        let mut overwritten: BTreeSet<Eid> = BTreeSet::new();
        let mut made: Vec<(Eid, Payload)> = Vec::new();
        let mut next = self.writes_made[replica];
        let mut new_id = || {
            next += 1;
            (actor, next)
        };
        match action {
            Action::Counter { inc, dec } => {
                let mut total = (inc, dec);
                for id in self.visible_at(replica, &path, Field::Counter) {
                    if id.0 != actor {
                        continue;
                    }
                    if let Payload::Counter { inc, dec } = self.events[&id].payload {
                        total = (total.0 + inc, total.1 + dec);
                    }
                    overwritten.insert(id);
                }
                self.inc_total += i128::from(inc);
                self.dec_total += i128::from(dec);
                made.push((
                    new_id(),
                    Payload::Counter {
                        inc: total.0,
                        dec: total.1,
                    },
                ));
            }
            Action::SetAdd(elements) => {
                let mut done: BTreeSet<Vec<u8>> = BTreeSet::new();
                for element in elements {
                    if !done.insert(element.clone()) {
                        continue;
                    }
                    for id in self.visible_at(replica, &path, Field::Set) {
                        if matches!(&self.events[&id].payload, Payload::Set(e) if *e == element) {
                            overwritten.insert(id);
                        }
                    }
                    made.push((new_id(), Payload::Set(element)));
                }
            }
            Action::SetRemove(elements) => {
                for element in elements {
                    for id in self.visible_at(replica, &path, Field::Set) {
                        if matches!(&self.events[&id].payload, Payload::Set(e) if *e == element) {
                            overwritten.insert(id);
                        }
                    }
                    self.removals.push(Removal {
                        element: Some(element),
                        past: past.clone(),
                    });
                }
            }
            Action::SetClear => {
                overwritten.extend(self.visible_at(replica, &path, Field::Set));
                self.removals.push(Removal {
                    element: None,
                    past: past.clone(),
                });
            }
            Action::LwwWrite(value) => {
                // A write outranks everything it has seen: its timestamp is raised past theirs
                // when the writer's clock lags, and it overwrites all of them.
                let id = new_id();
                let mut hlc = hlc;
                let seen = self.visible_at(replica, &path, Field::Lww);
                for other in &seen {
                    if let Payload::Lww { hlc: theirs, .. } = self.events[other].payload {
                        if theirs >= hlc {
                            hlc = theirs.successor();
                        }
                    }
                }
                overwritten.extend(seen);
                made.push((id, Payload::Lww { hlc, value }));
            }
            Action::LwwClear => overwritten.extend(self.visible_at(replica, &path, Field::Lww)),
            Action::MvWrite(value) => {
                overwritten.extend(self.visible_at(replica, &path, Field::Mv));
                made.push((new_id(), Payload::Mv(value)));
            }
            Action::MvClear => overwritten.extend(self.visible_at(replica, &path, Field::Mv)),
            Action::MapRemove(key) => {
                let mut prefix = path.clone();
                prefix.push(key);
                for id in self.views[replica].visible() {
                    if self.events[&id].path.starts_with(&prefix) {
                        overwritten.insert(id);
                    }
                }
            }
            Action::MapClear => {
                for id in self.views[replica].visible() {
                    let p = &self.events[&id].path;
                    if p.len() > path.len() && p.starts_with(&path) {
                        overwritten.insert(id);
                    }
                }
            }
        }
        let mut effect = View {
            seen: overwritten.clone(),
            overwritten,
        };
        for (id, payload) in made {
            self.writes_made[replica] = id.1;
            effect.seen.insert(id);
            self.events.insert(
                id,
                Event {
                    path: path.clone(),
                    payload,
                    past: past.clone(),
                },
            );
        }
        self.views[replica].absorb(&effect);
        self.effects.push(effect);
    }

    fn merge_state(&mut self, from: usize, to: usize) {
        let from = self.views[from].clone();
        self.views[to].absorb(&from);
    }

    fn merge_delta(&mut self, delta: usize, to: usize) {
        let effect = self.effects[delta].clone();
        self.views[to].absorb(&effect);
    }

    /// Everything every replica knows.
    fn union(&self) -> View {
        let mut all = View::default();
        for v in &self.views {
            all.absorb(v);
        }
        all
    }

    /// The observable value of `view`.
    fn expected(&self, view: &View) -> Node {
        let mut root = Node::default();
        let mut lww: BTreeMap<Vec<String>, (Rank, Vec<u8>)> = BTreeMap::new();
        for id in view.visible() {
            let event = &self.events[&id];
            let mut node = &mut root;
            for key in &event.path {
                node = node.children.entry(key.clone()).or_default();
            }
            match &event.payload {
                Payload::Counter { inc, dec } => {
                    node.counter += i128::from(*inc) - i128::from(*dec)
                }
                Payload::Set(e) => {
                    node.set.insert(e.clone());
                }
                Payload::Mv(value) => node.mv.push(value.clone()),
                Payload::Lww { hlc, value } => {
                    let rank = lww_rank(id, *hlc);
                    let slot = lww
                        .entry(event.path.clone())
                        .or_insert_with(|| (rank, value.clone()));
                    if rank > slot.0 {
                        *slot = (rank, value.clone());
                    }
                }
            }
        }
        for (path, (_, value)) in lww {
            let mut node = &mut root;
            for key in &path {
                node = node.children.entry(key.clone()).or_default();
            }
            node.lww = Some(value);
        }
        sort_mv(&mut root);
        root
    }
}

fn sort_mv(node: &mut Node) {
    node.mv.sort();
    for child in node.children.values_mut() {
        sort_mv(child);
    }
}

// ---------------------------------------------------------------------------------------------
// Histories
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Step {
    /// A local operation at a replica (index taken modulo the replica count).
    Local { replica: usize, hlc: Hlc, op: Op },
    /// `to` merges `from`'s full state.
    State { from: usize, to: usize },
    /// `to` merges one recorded delta.
    Delta { to: usize, which: Index },
}

#[derive(Clone, Debug)]
struct History {
    replicas: usize,
    /// Whether every replica starts from the [`preload`]ed common state (context above the
    /// fast path's bound), instead of the empty one.
    preload: bool,
    steps: Vec<Step>,
}

/// A writer that is not one of the replicas.
const GHOST: u64 = 9;
/// More events than `Causal::merge` counts one by one (1024), so a merge of a full state that
/// includes them visits every key directly.
const GHOST_EVENTS: usize = 1030;

/// A common starting state that shows nothing (observably empty) but whose context holds more
/// than 1024 dots: the ghost writes and then removes what it wrote (counters write zeros).
fn preload<S: Subject>(empty: &S) -> S {
    let ghost = ActorId::new(GHOST);
    let (write, undo) = match empty.to_crdt().type_tag() {
        TypeTag::GCounter => (Op::GCounterInc(0), None),
        TypeTag::PnCounter => (Op::Counter(CounterOp::Inc(0)), None),
        TypeTag::OrSet => (
            Op::Set(SetOp::Add(vec![vec![200]])),
            Some(Op::Set(SetOp::Remove(vec![vec![200]]))),
        ),
        TypeTag::LwwRegister => (
            Op::Lww(RegisterOp::write("ghost")),
            Some(Op::Lww(RegisterOp::Clear)),
        ),
        TypeTag::MvRegister => (
            Op::Mv(RegisterOp::write("ghost")),
            Some(Op::Mv(RegisterOp::Clear)),
        ),
        TypeTag::Map => (
            Op::Map(MapOp::update("ghost", FieldOp::Set(SetOp::add("g")))),
            Some(Op::Map(MapOp::remove("ghost"))),
        ),
        other => panic!("unknown type {other}"),
    };
    let mut x = empty.fresh();
    for _ in 0..GHOST_EVENTS {
        let d = x.delta(ghost, Hlc::ZERO, &write);
        x.join(&d);
    }
    if let Some(undo) = undo {
        let d = x.delta(ghost, Hlc::ZERO, &undo);
        x.join(&d);
    }
    assert_eq!(x.observe(), Node::default());
    assert!(x.to_crdt().context().dot_count() > 1024);
    x
}

/// A run of a history: the implementation's states and deltas next to the model's.
struct Run<S> {
    replicas: Vec<S>,
    deltas: Vec<S>,
    /// Per replica: the recorded deltas its state includes (directly or through a state merge).
    includes: Vec<BTreeSet<usize>>,
    model: Model,
}

impl<S: Subject> Run<S> {
    fn join_all(&self) -> S {
        let mut all = self.replicas[0].fresh();
        for r in &self.replicas {
            all.join(r);
        }
        all
    }
}

/// Runs `history` from `empty`, checking every replica touched against the model after each
/// step.
fn run<S: Subject>(empty: &S, history: &History) -> Result<Run<S>, TestCaseError> {
    let n = history.replicas;
    let mut run = Run {
        replicas: vec![empty.fresh(); n],
        deltas: Vec::new(),
        includes: vec![BTreeSet::new(); n],
        model: Model::new(n),
    };
    if history.preload {
        // The common state is recorded as delta 0, included everywhere, invisible to the model.
        let base = preload(empty);
        run.replicas = vec![base.clone(); n];
        run.includes = vec![BTreeSet::from([0]); n];
        run.deltas.push(base);
        run.model.effects.push(View::default());
    }
    for (i, step) in history.steps.iter().enumerate() {
        let touched = match step {
            Step::Local { replica, hlc, op } => {
                let r = replica % n;
                let delta = run.replicas[r].delta(actor(r), *hlc, op);
                run.replicas[r].join(&delta);
                run.includes[r].insert(run.deltas.len());
                run.deltas.push(delta);
                run.model.local(r, *hlc, op);
                r
            }
            Step::State { from, to } => {
                let (from, to) = (from % n, to % n);
                let state = run.replicas[from].clone();
                run.replicas[to].join(&state);
                let inc = run.includes[from].clone();
                run.includes[to].extend(inc);
                run.model.merge_state(from, to);
                to
            }
            Step::Delta { to, which } => {
                let to = to % n;
                if run.deltas.is_empty() {
                    continue;
                }
                let d = which.index(run.deltas.len());
                let delta = run.deltas[d].clone();
                run.replicas[to].join(&delta);
                run.includes[to].insert(d);
                run.model.merge_delta(d, to);
                to
            }
        };
        prop_assert_eq!(
            run.replicas[touched].observe(),
            run.model.expected(&run.model.views[touched]),
            "replica {} after step {} ({:?})",
            touched,
            i,
            step
        );
    }
    let all = run.join_all();
    prop_assert_eq!(all.observe(), run.model.expected(&run.model.union()));
    Ok(run)
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn hlc() -> impl Strategy<Value = Hlc> {
    // A tiny range, so equal timestamps (ties broken by actor, then counter) are common.
    (0u64..4, 0u32..2).prop_map(|(p, l)| Hlc::new(p, l))
}

fn element() -> impl Strategy<Value = Vec<u8>> {
    (0u8..4).prop_map(|b| vec![b])
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec![b"p".to_vec(), b"q".to_vec(), b"r".to_vec()])
}

fn counter_op() -> impl Strategy<Value = CounterOp> {
    prop_oneof![
        3 => (0u64..6).prop_map(CounterOp::Inc),
        2 => (0u64..6).prop_map(CounterOp::Dec),
    ]
}

fn set_op() -> impl Strategy<Value = SetOp> {
    prop_oneof![
        4 => vec(element(), 1..=2).prop_map(SetOp::Add),
        3 => vec(element(), 1..=2).prop_map(SetOp::Remove),
        1 => Just(SetOp::Clear),
    ]
}

fn register_op(clear_weight: u32) -> BoxedStrategy<RegisterOp> {
    if clear_weight == 0 {
        value().prop_map(RegisterOp::Write).boxed()
    } else {
        prop_oneof![
            4 => value().prop_map(RegisterOp::Write),
            clear_weight => Just(RegisterOp::Clear),
        ]
        .boxed()
    }
}

fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from)
}

/// A map operation; `depth` nested maps at most below this one.
fn map_op(depth: u32) -> BoxedStrategy<MapOp> {
    let leaf = prop_oneof![
        counter_op().prop_map(FieldOp::Counter),
        set_op().prop_map(FieldOp::Set),
        register_op(1).prop_map(FieldOp::Lww),
        register_op(1).prop_map(FieldOp::Mv),
    ];
    let field = if depth == 0 {
        leaf.boxed()
    } else {
        prop_oneof![
            3 => leaf,
            2 => map_op(depth - 1).prop_map(|m| FieldOp::Map(Box::new(m))),
        ]
        .boxed()
    };
    prop_oneof![
        6 => (key(), field).prop_map(|(key, op)| MapOp::Update { key, op }),
        2 => key().prop_map(MapOp::Remove),
        1 => Just(MapOp::Clear),
    ]
    .boxed()
}

fn gcounter_op() -> BoxedStrategy<Op> {
    (0u64..6).prop_map(Op::GCounterInc).boxed()
}
fn pncounter_op() -> BoxedStrategy<Op> {
    counter_op().prop_map(Op::Counter).boxed()
}
fn orset_op() -> BoxedStrategy<Op> {
    set_op().prop_map(Op::Set).boxed()
}
fn lww_op(clear_weight: u32) -> BoxedStrategy<Op> {
    register_op(clear_weight).prop_map(Op::Lww).boxed()
}
fn mv_op(clear_weight: u32) -> BoxedStrategy<Op> {
    register_op(clear_weight).prop_map(Op::Mv).boxed()
}
fn ormap_op() -> BoxedStrategy<Op> {
    map_op(2).prop_map(Op::Map).boxed()
}

fn step(op: BoxedStrategy<Op>) -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (0usize..4, hlc(), op).prop_map(|(replica, hlc, op)| Step::Local { replica, hlc, op }),
        2 => (0usize..4, 0usize..4).prop_map(|(from, to)| Step::State { from, to }),
        3 => (0usize..4, any::<Index>()).prop_map(|(to, which)| Step::Delta { to, which }),
    ]
}

fn history(op: BoxedStrategy<Op>) -> impl Strategy<Value = History> {
    (3usize..=4, any::<bool>(), vec(step(op), 1..=MAX_STEPS)).prop_map(
        |(replicas, preload, steps)| History {
            replicas,
            preload,
            steps,
        },
    )
}

/// A history of any type, for the dynamic enum.
fn any_history() -> impl Strategy<Value = (TypeTag, History)> {
    prop_oneof![
        history(gcounter_op()).prop_map(|h| (TypeTag::GCounter, h)),
        history(pncounter_op()).prop_map(|h| (TypeTag::PnCounter, h)),
        history(orset_op()).prop_map(|h| (TypeTag::OrSet, h)),
        history(lww_op(1)).prop_map(|h| (TypeTag::LwwRegister, h)),
        history(mv_op(1)).prop_map(|h| (TypeTag::MvRegister, h)),
        history(ormap_op()).prop_map(|h| (TypeTag::Map, h)),
    ]
}

/// A proptest-chosen delivery order: a permutation plus a few duplicated deliveries.
#[derive(Clone, Debug)]
struct Delivery {
    keys: Vec<u32>,
    dups: Vec<(Index, Index)>,
}

fn delivery() -> impl Strategy<Value = Delivery> {
    (
        vec(any::<u32>(), MAX_STEPS),
        vec((any::<Index>(), any::<Index>()), 0..4),
    )
        .prop_map(|(keys, dups)| Delivery { keys, dups })
}

impl Delivery {
    /// An order over `n` deltas: every index at least once.
    fn order(&self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (self.keys[i % self.keys.len()], i));
        if n > 0 {
            for (what, at) in &self.dups {
                let pos = at.index(order.len() + 1);
                order.insert(pos, what.index(n));
            }
        }
        order
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

fn joined<S: Subject>(a: &S, b: &S) -> S {
    let mut x = a.clone();
    x.join(b);
    x
}

/// `⊥ ⊔ x`: a delta as a lattice element (drops the empty key-hint entries of raw deltas).
fn norm<S: Subject>(x: &S) -> S {
    joined(&x.fresh(), x)
}

fn bytes<S: Subject>(x: &S) -> Vec<u8> {
    envelope::encode(&x.to_crdt(), &Options::default()).unwrap()
}

/// Commutativity, associativity and idempotence of the join on `states`, compared with `eq`.
fn lattice_laws<S: Subject>(states: &[S], normalize: bool) -> Result<(), TestCaseError> {
    let n = |x: S| if normalize { norm(&x) } else { x };
    for (i, a) in states.iter().enumerate() {
        prop_assert_eq!(n(joined(a, a)), n(a.clone()), "idempotent: {}", i);
        for (j, b) in states.iter().enumerate() {
            let ab = joined(a, b);
            prop_assert_eq!(n(ab.clone()), n(joined(b, a)), "commutative: {} {}", i, j);
            prop_assert_eq!(n(joined(&ab, b)), n(ab.clone()), "absorbs b: {} {}", i, j);
            prop_assert_eq!(n(joined(&ab, a)), n(ab.clone()), "absorbs a: {} {}", i, j);
        }
    }
    for a in states {
        for b in states {
            for c in states {
                prop_assert_eq!(
                    n(joined(&joined(a, b), c)),
                    n(joined(a, &joined(b, c))),
                    "associative"
                );
            }
        }
    }
    Ok(())
}

/// At most `k` deltas, spread over the history (associativity is cubic).
fn sample<S: Clone>(xs: &[S], k: usize) -> Vec<S> {
    if xs.len() <= k {
        return xs.to_vec();
    }
    (0..k).map(|i| xs[i * xs.len() / k].clone()).collect()
}

/// Every law of the brief for one run.
fn check_all<S: Subject>(
    empty: &S,
    history: &History,
    delivery: &Delivery,
) -> Result<Run<S>, TestCaseError> {
    let run = run(empty, history)?;
    let all = run.join_all();

    // Lattice laws on the replica states (plus their join), structurally.
    let mut states = run.replicas.clone();
    states.push(all.clone());
    lattice_laws(&states, false)?;
    // ... and on the recorded deltas, as lattice elements.
    lattice_laws(&sample(&run.deltas, 6), true)?;
    for d in &run.deltas {
        prop_assert_eq!(norm(&joined(d, d)), norm(d));
    }

    // Delta application equals full-state merge: all deltas, in creation order and in a
    // proptest-chosen order with duplicates, rebuild the join of all replicas.
    let canonical = bytes(&all);
    let decoded = envelope::decode(&canonical, &Limits::default()).unwrap();
    prop_assert_eq!(&decoded, &all.to_crdt());
    let orders = [
        (0..run.deltas.len()).collect::<Vec<_>>(),
        (0..run.deltas.len()).rev().collect(),
        delivery.order(run.deltas.len()),
    ];
    for order in &orders {
        let mut x = all.fresh();
        for &d in order {
            x.join(&run.deltas[d]);
        }
        prop_assert_eq!(&x, &all, "order {:?}", order);
        prop_assert_eq!(bytes(&x), canonical.clone(), "bytes, order {:?}", order);
    }

    // Merging the deltas replica i includes equals merging replica i's state, into every
    // replica and into the empty state.
    let mut targets = run.replicas.clone();
    targets.push(all.fresh());
    for (i, source) in run.replicas.iter().enumerate() {
        let shuffled = delivery.order(run.deltas.len());
        for (j, target) in targets.iter().enumerate() {
            let by_state = joined(target, source);
            let mut by_deltas = target.clone();
            for d in &run.includes[i] {
                by_deltas.join(&run.deltas[*d]);
            }
            prop_assert_eq!(&by_deltas, &by_state, "deltas of {} into {}", i, j);
            let mut by_shuffled = target.clone();
            for d in shuffled.iter().filter(|d| run.includes[i].contains(d)) {
                by_shuffled.join(&run.deltas[*d]);
            }
            prop_assert_eq!(
                &by_shuffled,
                &by_state,
                "shuffled deltas of {} into {}",
                i,
                j
            );
        }
    }
    Ok(run)
}

/// Delta groups: merging deltas one by one equals merging them pre-joined into groups (a
/// group loses the key hints of its removes, which forces `Causal::merge`'s full-scan
/// fallback), and equals merging each delta stripped of its hints.
fn check_groups<S: Subject>(
    empty: &S,
    history: &History,
    delivery: &Delivery,
    cuts: &[bool],
) -> Result<(), TestCaseError> {
    let run = run(empty, history)?;
    let order = delivery.order(run.deltas.len());
    let mut groups: Vec<S> = Vec::new();
    let mut current = empty.fresh();
    for (k, &d) in order.iter().enumerate() {
        current.join(&run.deltas[d]);
        if cuts[k % cuts.len()] || k + 1 == order.len() {
            groups.push(std::mem::replace(&mut current, empty.fresh()));
        }
    }
    let mut bases = run.replicas.clone();
    bases.push(empty.fresh());
    for (b, base) in bases.iter().enumerate() {
        let mut one_by_one = base.clone();
        let mut hintless = base.clone();
        for &d in &order {
            one_by_one.join(&run.deltas[d]);
            hintless.join(&norm(&run.deltas[d]));
        }
        let mut grouped = base.clone();
        for g in &groups {
            grouped.join(g);
        }
        prop_assert_eq!(&grouped, &one_by_one, "groups into base {}", b);
        prop_assert_eq!(&hintless, &one_by_one, "hint-less deltas into base {}", b);
        let mut reversed = base.clone();
        for g in groups.iter().rev() {
            reversed.join(g);
        }
        prop_assert_eq!(&reversed, &one_by_one, "groups reversed into base {}", b);
    }
    Ok(())
}

fn has_clear(history: &History) -> bool {
    history.steps.iter().any(|s| {
        matches!(
            s,
            Step::Local {
                op: Op::Lww(RegisterOp::Clear) | Op::Mv(RegisterOp::Clear),
                ..
            }
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn gcounter_laws(h in history(gcounter_op()), d in delivery()) {
        let run = check_all(&GCounter::new(), &h, &d)?;
        let all = run.join_all();
        prop_assert_eq!(i128::try_from(all.value()).unwrap(), run.model.inc_total);
    }

    #[test]
    fn pncounter_laws(h in history(pncounter_op()), d in delivery()) {
        let run = check_all(&PnCounter::new(), &h, &d)?;
        let all = run.join_all();
        prop_assert_eq!(all.value(), run.model.inc_total - run.model.dec_total);
    }

    #[test]
    fn orset_laws(h in history(orset_op()), d in delivery()) {
        let run = check_all(&OrSet::<u8>::new(), &h, &d)?;
        let all = run.join_all();
        let model = &run.model;
        // Present iff some add of it is covered by no later add, remove or clear of it.
        let mut expected: BTreeSet<Vec<u8>> = BTreeSet::new();
        let mut added: BTreeSet<Vec<u8>> = BTreeSet::new();
        for (id, event) in &model.events {
            let Payload::Set(e) = &event.payload else { continue };
            added.insert(e.clone());
            let by_add = model.events.values().any(|later| {
                matches!(&later.payload, Payload::Set(x) if x == e) && later.past.contains(id)
            });
            let by_remove = model.removals.iter().any(|r| {
                r.element.as_ref().is_none_or(|x| x == e) && r.past.contains(id)
            });
            if !by_add && !by_remove {
                expected.insert(e.clone());
            }
        }
        let present: BTreeSet<Vec<u8>> = all.iter().map(|e| vec![*e]).collect();
        prop_assert_eq!(&present, &expected);
        // An element never added never appears.
        prop_assert!(present.is_subset(&added));
    }

    #[test]
    fn lww_register_laws(h in history(lww_op(1)), d in delivery()) {
        let run = check_all(&LwwRegister::<Vec<u8>>::new(), &h, &d)?;
        if !has_clear(&h) {
            // Without clears, the value is the write with the greatest (HLC, actor, counter).
            let greatest = run.model.events.iter().filter_map(|(id, e)| match &e.payload {
                Payload::Lww { hlc, value } => Some((lww_rank(*id, *hlc), value.clone())),
                _ => None,
            }).max().map(|(_, v)| v);
            prop_assert_eq!(run.join_all().value().cloned(), greatest);
        }
    }

    #[test]
    fn lww_register_without_clears(h in history(lww_op(0)), d in delivery()) {
        let run = check_all(&LwwRegister::<Vec<u8>>::new(), &h, &d)?;
        let all = run.join_all();
        let greatest = run.model.events.iter().filter_map(|(id, e)| match &e.payload {
            Payload::Lww { hlc, value } => Some((lww_rank(*id, *hlc), value.clone())),
            _ => None,
        }).max();
        let winner = all.winner().map(|(dot, e)| (lww_rank((dot.actor.get(), dot.counter), e.hlc), e.value.clone()));
        prop_assert_eq!(winner, greatest);
    }

    #[test]
    fn mv_register_laws(h in history(mv_op(1)), d in delivery()) {
        let run = check_all(&MvRegister::<Vec<u8>>::new(), &h, &d)?;
        let all = run.join_all();
        let model = &run.model;
        let live: Vec<(Dot, Vec<u8>)> = all.siblings().map(|(dot, e)| (dot, e.value.clone())).collect();
        // Siblings are pairwise concurrent.
        for (a, _) in &live {
            for (b, _) in &live {
                let (a, b) = ((a.actor.get(), a.counter), (b.actor.get(), b.counter));
                prop_assert!(!model.events[&a].past.contains(&b), "{:?} saw {:?}", a, b);
            }
        }
        if !has_clear(&h) {
            // Without clears: exactly the writes no other write has seen (the maximal ones).
            let maximal: BTreeSet<Eid> = model.events.keys().copied().filter(|id| {
                !model.events.values().any(|e| e.past.contains(id))
            }).collect();
            let live: BTreeSet<Eid> = live.iter().map(|(d, _)| (d.actor.get(), d.counter)).collect();
            prop_assert_eq!(live, maximal);
        }
    }

    #[test]
    fn ormap_laws(h in history(ormap_op()), d in delivery()) {
        check_all(&OrMap::new(), &h, &d)?;
    }

    #[test]
    fn crdt_enum_laws((tag, h) in any_history(), d in delivery()) {
        let run = check_all(&Crdt::empty(tag), &h, &d)?;
        let all = run.join_all();
        prop_assert_eq!(all.type_tag(), tag);
        // Values of different types never merge, and a failed merge changes nothing.
        for other in TypeTag::ALL.into_iter().filter(|t| *t != tag) {
            let mut x = all.clone();
            prop_assert!(x.merge(&Crdt::empty(other)).is_err());
            prop_assert_eq!(&x, &all);
        }
    }

    #[test]
    fn orset_delta_groups(h in history(orset_op()), d in delivery(), cuts in vec(any::<bool>(), 1..8)) {
        check_groups(&OrSet::<u8>::new(), &h, &d, &cuts)?;
    }

    #[test]
    fn ormap_delta_groups(h in history(ormap_op()), d in delivery(), cuts in vec(any::<bool>(), 1..8)) {
        check_groups(&OrMap::new(), &h, &d, &cuts)?;
    }

    #[test]
    fn crdt_enum_delta_groups((tag, h) in any_history(), d in delivery(), cuts in vec(any::<bool>(), 1..8)) {
        check_groups(&Crdt::empty(tag), &h, &d, &cuts)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Named regression tests: map removal
// ---------------------------------------------------------------------------------------------

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for pos in 0..=p.len() {
            let mut q = p.clone();
            q.insert(pos, n - 1);
            out.push(q);
        }
    }
    out
}

fn apply_map(m: &OrMap, a: ActorId, op: MapOp) -> OrMap {
    m.apply(a, Hlc::new(1, 0), &op).unwrap()
}

fn set_add(key: &str, element: &str) -> MapOp {
    MapOp::update(key, FieldOp::Set(SetOp::add(element)))
}

fn nested(key: &str, inner: MapOp) -> MapOp {
    MapOp::update(key, FieldOp::Map(Box::new(inner)))
}

/// The scenario of the brief: actors A and B write under `k`, everybody syncs; A removes `k`
/// while C concurrently writes under `k`. `writes` makes A's, B's and C's initial writes,
/// `concurrent` C's write concurrent with the remove. Returns every final state, over every
/// permutation of the deltas and of the replica states (all must agree), and the deltas.
fn remove_scenario(writes: [MapOp; 3], concurrent: MapOp, remove: MapOp) -> Vec<OrMap> {
    let (a, b, c) = (ActorId::new(1), ActorId::new(2), ActorId::new(3));
    let mut ra = OrMap::new();
    let mut rb = OrMap::new();
    let mut rc = OrMap::new();
    let [wa, wb, wc] = writes;
    let da = apply_map(&ra, a, wa);
    ra.merge(&da);
    let db = apply_map(&rb, b, wb);
    rb.merge(&db);
    let dc = apply_map(&rc, c, wc);
    rc.merge(&dc);
    // Everybody syncs (full states).
    for r in [&mut ra, &mut rb, &mut rc] {
        r.merge(&da);
        r.merge(&db);
        r.merge(&dc);
    }
    let base = ra.clone();
    assert_eq!(rb, base);
    assert_eq!(rc, base);
    // A removes; C writes concurrently; B does nothing more.
    let d_rm = apply_map(&ra, a, remove);
    ra.merge(&d_rm);
    let d_conc = apply_map(&rc, c, concurrent);
    rc.merge(&d_conc);

    let mut finals = Vec::new();
    // All permutations of every delta, into the empty map and into each replica.
    let deltas = [da, db, dc, d_rm, d_conc];
    for start in [
        OrMap::new(),
        base.clone(),
        ra.clone(),
        rb.clone(),
        rc.clone(),
    ] {
        for p in permutations(deltas.len()) {
            let mut x = start.clone();
            for i in p {
                x.merge(&deltas[i]);
            }
            finals.push(x);
        }
    }
    // The three deltas of the concurrent phase (remove, concurrent write, and A's original
    // write re-delivered late) in every order onto the synced base.
    for p in permutations(3) {
        let phase = [&deltas[3], &deltas[4], &deltas[0]];
        let mut x = base.clone();
        for i in p {
            x.merge(phase[i]);
        }
        finals.push(x);
    }
    // All permutations of the three replica states, folded from each.
    let states = [ra, rb, rc];
    for p in permutations(3) {
        let mut x = OrMap::new();
        for &i in &p {
            x.merge(&states[i]);
        }
        finals.push(x.clone());
        let mut y = states[p[0]].clone();
        y.merge(&states[p[1]]);
        y.merge(&states[p[2]]);
        finals.push(y);
    }
    // States mixed with deltas: each replica's state plus the other replicas' deltas.
    for (i, s) in states.iter().enumerate() {
        for p in permutations(deltas.len()) {
            let mut x = s.clone();
            for d in p {
                x.merge(&deltas[d]);
            }
            for (j, t) in states.iter().enumerate() {
                if j != i {
                    x.merge(t);
                }
            }
            finals.push(x);
        }
    }
    let first = bytes(&finals[0]);
    for (i, f) in finals.iter().enumerate() {
        assert_eq!(f, &finals[0], "final {i} differs");
        assert_eq!(bytes(f), first, "final {i} bytes differ");
    }
    finals
}

#[test]
fn regression_map_remove_keeps_only_the_concurrent_set_add() {
    let finals = remove_scenario(
        [
            set_add("k", "a1"),
            set_add("k", "b1"),
            set_add("other", "c0"),
        ],
        set_add("k", "c1"),
        MapOp::remove("k"),
    );
    let k = finals[0].get("k").expect("C's concurrent add keeps k");
    let elements: Vec<&[u8]> = k.set().collect();
    assert_eq!(
        elements,
        vec![b"c1".as_slice()],
        "the elements A saw are gone"
    );
    assert!(finals[0].get("other").unwrap().set_contains(b"c0"));
}

#[test]
fn regression_map_clear_keeps_only_the_concurrent_set_add() {
    let finals = remove_scenario(
        [
            set_add("k", "a1"),
            set_add("k", "b1"),
            set_add("other", "c0"),
        ],
        set_add("k", "c1"),
        MapOp::Clear,
    );
    let k = finals[0].get("k").expect("C's concurrent add keeps k");
    assert_eq!(k.set().collect::<Vec<_>>(), vec![b"c1".as_slice()]);
    assert!(finals[0].get("other").is_none(), "the clear saw `other`");
}

#[test]
fn regression_map_remove_of_nested_map_keeps_only_the_concurrent_add() {
    let finals = remove_scenario(
        [
            nested("k", set_add("n", "a1")),
            nested("k", nested("deep", set_add("m", "b1"))),
            nested("k", set_add("n", "c0")),
        ],
        nested("k", set_add("n", "c1")),
        MapOp::remove("k"),
    );
    let k = finals[0].get("k").expect("C's concurrent add keeps k");
    assert_eq!(k.map().len(), 1, "only the nested key C wrote survives");
    let n = k.map().get("n").unwrap();
    assert_eq!(n.set().collect::<Vec<_>>(), vec![b"c1".as_slice()]);
    assert_eq!(n.counter(), 0);
}

#[test]
fn regression_nested_map_remove_inside_a_key() {
    // The remove is itself nested: A removes k/n.
    let finals = remove_scenario(
        [
            nested("k", set_add("n", "a1")),
            nested("k", set_add("n", "b1")),
            nested("k", set_add("keep", "c0")),
        ],
        nested("k", set_add("n", "c1")),
        nested("k", MapOp::remove("n")),
    );
    let k = finals[0].get("k").unwrap();
    assert_eq!(
        k.map().get("n").unwrap().set().collect::<Vec<_>>(),
        vec![b"c1".as_slice()]
    );
    assert!(k.map().get("keep").unwrap().set_contains(b"c0"));
}

/// Counters under map removal follow the rule of `crdt/src/counter.rs`: removal is
/// observed-remove *per actor* (an actor's contribution goes when the remover has seen that
/// actor's latest dot), and an update concurrent with the removal keeps its actor's whole
/// running total, including the part the remover had seen. Here A (+5), B (+3) and C (+4) count
/// under `k`, all sync, A removes `k` and C concurrently adds 2: the result is C's running total
/// 4 + 2 = 6, not 2; A's and B's contributions are gone.
#[test]
fn regression_map_remove_counter_keeps_concurrent_actors_running_total() {
    let inc = |n| MapOp::update("k", FieldOp::Counter(CounterOp::inc(n)));
    let finals = remove_scenario([inc(5), inc(3), inc(4)], inc(2), MapOp::remove("k"));
    assert_eq!(finals[0].get("k").unwrap().counter(), 6);
}

/// The same counter rule one map deeper (`k/n`): nothing of A or B survives, C keeps its whole
/// running total.
#[test]
fn regression_map_remove_counter_nested() {
    let inc = |n| nested("k", MapOp::update("n", FieldOp::Counter(CounterOp::inc(n))));
    let finals = remove_scenario([inc(5), inc(3), inc(4)], inc(2), MapOp::remove("k"));
    let k = finals[0].get("k").unwrap();
    assert_eq!(k.map().get("n").unwrap().counter(), 6);
}

// ---------------------------------------------------------------------------------------------
// `Causal::merge` fast path
// ---------------------------------------------------------------------------------------------

/// The dots a delta has seen but does not hold: what it removes.
fn removed_dots<S: DotStore>(delta: &Causal<S>) -> Vec<Dot> {
    let mut live = Vec::new();
    delta.store().for_each_dot(&mut |d| live.push(d));
    let mut out = Vec::new();
    let vv = delta.context().version_vector();
    for (a, n) in vv.iter() {
        for c in 1..=n {
            out.push(Dot::new(a, c));
        }
    }
    out.extend(delta.context().cloud());
    out.retain(|d| !live.contains(d));
    out
}

#[test]
fn set_remove_delta_without_key_hint_still_removes() {
    let (a, b) = (ActorId::new(1), ActorId::new(2));
    let mut s = OrSet::<u8>::new();
    s.merge(&s.add(a, 7));
    // B adds 7 concurrently (not having seen A's add), so 7 holds two live dots.
    s.merge(&OrSet::new().add(b, 7));
    s.merge(&s.add(a, 8));
    let rm = s.remove(&7);
    // The delta holds no live dot (at most an empty key-hint entry, which readers never see).
    assert_eq!(rm.as_causal().store().dot_count(), 0);
    assert!(!rm.contains(&7));
    let dots = removed_dots(rm.as_causal());
    assert_eq!(dots.len(), 2);

    // The same removal without the hint: an empty store under the removed dots' context.
    let hintless =
        Causal::from_parts(OrSetStore::<u8>::new(), CausalContext::from_dots(dots)).unwrap();
    let mut via_hintless = s.as_causal().clone();
    via_hintless.merge(&hintless);
    assert!(via_hintless.store().get(&7).is_none());
    assert!(via_hintless.store().get(&8).is_some());
    let mut via_delta = s.clone();
    via_delta.merge(&rm);
    assert_eq!(&via_hintless, via_delta.as_causal());

    // Hint-less removal that names another key (an add of 9 in the same group): the fast path
    // visits only 9, misses 7, and must fall back.
    let add9 = s.add(a, 9);
    let mut group = Causal::<OrSetStore<u8>>::default();
    group.merge(add9.as_causal());
    group.merge(&hintless);
    assert!(group.store().get(&7).is_none() && group.store().get(&9).is_some());
    let mut via_group = s.as_causal().clone();
    via_group.merge(&group);
    assert!(via_group.store().get(&7).is_none());
    assert!(via_group.store().get(&8).is_some());
    assert!(via_group.store().get(&9).is_some());
}

#[test]
fn map_remove_delta_without_key_hint_still_removes() {
    let (a, b) = (ActorId::new(1), ActorId::new(2));
    let mut m = OrMap::new();
    for (actor, op) in [
        (a, set_add("k", "x")),
        (b, set_add("k", "y")),
        (a, MapOp::update("k", FieldOp::Counter(CounterOp::inc(3)))),
        (b, MapOp::update("k", FieldOp::Lww(RegisterOp::write("v")))),
        (b, nested("k", set_add("n", "z"))),
        (a, set_add("other", "w")),
    ] {
        let d = apply_map(&m, actor, op);
        m.merge(&d);
    }
    for remove in [
        MapOp::remove("k"),
        nested("k", MapOp::remove("n")),
        MapOp::update("k", FieldOp::Set(SetOp::remove("x"))),
        MapOp::Clear,
    ] {
        let rm = apply_map(&m, a, remove.clone());
        let mut expected = m.clone();
        expected.merge(&rm);
        let dots = removed_dots(rm.as_causal());
        assert!(!dots.is_empty(), "{remove:?} removes something");
        let hintless = Causal::from_parts(MapStore::new(), CausalContext::from_dots(dots)).unwrap();
        let mut got = m.as_causal().clone();
        got.merge(&hintless);
        assert_eq!(&got, expected.as_causal(), "{remove:?}");
    }
}

/// A full state's context above the fast path's bound takes the full-scan path directly.
#[test]
fn large_state_merge_removes_what_it_saw() {
    let (a, b) = (ActorId::new(1), ActorId::new(2));
    let mut x = OrSet::<u16>::new();
    x.merge(&x.add(a, 0));
    let mut y = x.clone();
    for e in 1..1200u16 {
        y.merge(&y.add(b, e));
    }
    y.merge(&y.remove(&0));
    assert!(y.as_causal().context().dot_count() > 1024);
    x.merge(&y);
    assert!(!x.contains(&0));
    assert_eq!(x.len(), 1199);
    assert_eq!(x, y);
}

/// A counter update past `u64::MAX` is an error, and the state is left as it was.
#[test]
fn counter_overflow_is_an_error() {
    let a = ActorId::new(1);
    let mut c = PnCounter::new();
    c.merge(&c.inc(a, u64::MAX).unwrap());
    let before = c.clone();
    assert!(c.inc(a, 1).is_err());
    assert_eq!(c, before);
    // Another actor still counts: the value is a sum over actors, in i128.
    c.merge(&c.inc(ActorId::new(2), u64::MAX).unwrap());
    assert_eq!(c.value(), 2 * i128::from(u64::MAX));
    let mut m = OrMap::new();
    let op = |n| MapOp::update("k", FieldOp::Counter(CounterOp::inc(n)));
    m.merge(&m.apply(a, Hlc::ZERO, &op(u64::MAX)).unwrap());
    assert!(m.apply(a, Hlc::ZERO, &op(1)).is_err());
}

/// A `DotSet` built from a context hand-made with `from_parts` must be well formed; a live dot
/// outside its context is refused.
#[test]
fn from_parts_checks_coverage() {
    let d = Dot::new(ActorId::new(1), 1);
    assert!(Causal::from_parts(DotSet::from_dots([d]), CausalContext::new()).is_none());
    let store: DotMap<u8, DotSet> = DotMap::from_entries([(1, DotSet::from_dots([d]))]);
    assert!(Causal::from_parts(store, CausalContext::from_dots([d])).is_some());
}
