//! Resolving a key: siblings in, the value reads show and a conflict record out.

use geostate_crdt::MvRegister;

use crate::{ConflictRecord, Resolution, ResolverRegistry, Sibling};

/// What reads of a key show after resolution.
///
/// ```
/// use geostate_conflict::ResolvedValue;
/// let shown = ResolvedValue::Siblings(vec![b"a".to_vec(), b"b".to_vec()]);
/// assert_ne!(shown, ResolvedValue::Absent);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResolvedValue {
    /// No live write: the key is unset (or cleared).
    Absent,
    /// One value: the only write, or the resolver's choice among concurrent ones.
    One(Vec<u8>),
    /// Every concurrent write's value, in sibling (dot) order, for the application to resolve.
    Siblings(Vec<Vec<u8>>),
}

/// The result of [`resolve`]: what reads show and, when there was a conflict, its record.
///
/// ```
/// use geostate_conflict::{resolve, ActorId, Hlc, MvRegister, ResolvedValue, ResolverRegistry};
/// let mut register = MvRegister::new();
/// register.merge(&register.write(ActorId::new(1), Hlc::new(1, 0), b"only".to_vec()));
/// let resolved = resolve(&ResolverRegistry::new(), "k", &register);
/// assert_eq!(resolved.value, ResolvedValue::One(b"only".to_vec()));
/// assert!(resolved.record.is_none()); // one write: no conflict
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Resolved {
    /// What reads show.
    pub value: ResolvedValue,
    /// The conflict, if two or more writes were concurrent; append it to the conflict feed.
    pub record: Option<ConflictRecord>,
}

/// Resolves the multi-value register `register` stored at `key` with the resolver that
/// `registry` chooses for `key`.
///
/// No sibling gives [`ResolvedValue::Absent`] and one sibling its value, both without a
/// record; two or more siblings are a conflict: the resolver decides and a [`ConflictRecord`]
/// describes it. Deterministic: equal registers give equal results, in every region.
///
/// ```
/// use std::sync::Arc;
/// use geostate_conflict::{resolve, ActorId, Hlc, KeepSiblings, MvRegister, ResolvedValue,
///     ResolverRegistry};
///
/// let base = MvRegister::new();
/// let mut register = base.write(ActorId::new(1), Hlc::new(10, 0), b"left".to_vec());
/// register.merge(&base.write(ActorId::new(2), Hlc::new(20, 0), b"right".to_vec()));
///
/// let mut registry = ResolverRegistry::new();
/// registry.register("doc:", Arc::new(KeepSiblings))?;
///
/// let lww = resolve(&registry, "profile:7", &register);
/// assert_eq!(lww.value, ResolvedValue::One(b"right".to_vec()));
/// let kept = resolve(&registry, "doc:7", &register);
/// assert_eq!(kept.value, ResolvedValue::Siblings(vec![b"left".to_vec(), b"right".to_vec()]));
/// assert!(lww.record.is_some() && kept.record.is_some());
/// # Ok::<(), geostate_conflict::Error>(())
/// ```
pub fn resolve(registry: &ResolverRegistry, key: &str, register: &MvRegister<Vec<u8>>) -> Resolved {
    resolve_siblings(registry, key, register.siblings().map(Sibling::from))
}

/// Resolves siblings given in any order, with duplicates: the same as [`resolve`] for a
/// register holding exactly these siblings.
///
/// The siblings are sorted (see [`Sibling`]) and exact duplicates dropped before anything else
/// happens, so the result does not depend on the order or repetition of the input.
///
/// ```
/// use geostate_conflict::{resolve_siblings, ActorId, Dot, Hlc, ResolvedValue,
///     ResolverRegistry, Sibling};
/// let a = Sibling::new(Dot::new(ActorId::new(1), 1), Hlc::new(5, 0), b"a");
/// let b = Sibling::new(Dot::new(ActorId::new(2), 1), Hlc::new(5, 0), b"b");
/// let registry = ResolverRegistry::new();
/// let one_way = resolve_siblings(&registry, "k", [a, b]);
/// let other_way = resolve_siblings(&registry, "k", [b, a, b]);
/// assert_eq!(one_way, other_way);
/// assert_eq!(one_way.value, ResolvedValue::One(b"b".to_vec())); // HLC tie: greater actor
/// ```
pub fn resolve_siblings<'a>(
    registry: &ResolverRegistry,
    key: &str,
    siblings: impl IntoIterator<Item = Sibling<'a>>,
) -> Resolved {
    let mut siblings: Vec<Sibling<'a>> = siblings.into_iter().collect();
    siblings.sort_unstable();
    siblings.dedup();
    match siblings.as_slice() {
        [] => Resolved {
            value: ResolvedValue::Absent,
            record: None,
        },
        [only] => Resolved {
            value: ResolvedValue::One(only.value.to_vec()),
            record: None,
        },
        _ => {
            let resolver = registry.resolver_for(key);
            let resolution = resolver.resolve(key, &siblings);
            let record = ConflictRecord::new(key, &siblings, resolver.name(), &resolution);
            let value = match resolution {
                Resolution::Chosen(value) => ResolvedValue::One(value),
                Resolution::KeepSiblings => {
                    ResolvedValue::Siblings(siblings.iter().map(|s| s.value.to_vec()).collect())
                }
            };
            Resolved {
                value,
                record: Some(record),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        value_digest, ActorId, Dot, FnResolver, Hlc, KeepSiblings, RecordedResolution,
        SiblingRecord,
    };

    #[test]
    fn empty_register_is_absent_without_record() {
        let resolved = resolve(&ResolverRegistry::new(), "k", &MvRegister::new());
        assert_eq!(resolved.value, ResolvedValue::Absent);
        assert_eq!(resolved.record, None);
    }

    #[test]
    fn cleared_register_is_absent() {
        let mut r = MvRegister::new();
        r.merge(&r.write(ActorId::new(1), Hlc::new(1, 0), b"x".to_vec()));
        r.merge(&r.clear());
        let resolved = resolve(&ResolverRegistry::new(), "k", &r);
        assert_eq!(resolved.value, ResolvedValue::Absent);
    }

    #[test]
    fn a_write_that_saw_the_siblings_ends_the_conflict() {
        let base = MvRegister::new();
        let mut r = base.write(ActorId::new(1), Hlc::new(1, 0), b"a".to_vec());
        r.merge(&base.write(ActorId::new(2), Hlc::new(2, 0), b"b".to_vec()));
        assert!(resolve(&ResolverRegistry::new(), "k", &r).record.is_some());
        r.merge(&r.write(ActorId::new(1), Hlc::new(3, 0), b"ab".to_vec()));
        let resolved = resolve(&ResolverRegistry::new(), "k", &r);
        assert_eq!(resolved.value, ResolvedValue::One(b"ab".to_vec()));
        assert_eq!(resolved.record, None);
    }

    #[test]
    fn keep_siblings_shows_all_in_dot_order() {
        let registry = ResolverRegistry::with_default(Arc::new(KeepSiblings));
        let a = Sibling::new(Dot::new(ActorId::new(2), 1), Hlc::new(1, 0), b"second");
        let b = Sibling::new(Dot::new(ActorId::new(1), 3), Hlc::new(9, 0), b"first");
        let resolved = resolve_siblings(&registry, "k", [a, b]);
        assert_eq!(
            resolved.value,
            ResolvedValue::Siblings(vec![b"first".to_vec(), b"second".to_vec()])
        );
        let record = resolved.record.unwrap();
        assert_eq!(record.resolver, "keep-siblings");
        assert_eq!(record.resolution, RecordedResolution::KeepSiblings);
        assert_eq!(
            record.siblings,
            [SiblingRecord::from(b), SiblingRecord::from(a)]
        );
    }

    #[test]
    fn a_merged_value_is_recorded_by_digest() {
        let mut registry = ResolverRegistry::new();
        let concat = FnResolver::new("concat", |_: &str, s: &[Sibling<'_>]| {
            s.iter().flat_map(|s| s.value.iter().copied()).collect()
        });
        registry.register("c:", Arc::new(concat)).unwrap();
        let a = Sibling::new(Dot::new(ActorId::new(1), 1), Hlc::new(1, 0), b"x");
        let b = Sibling::new(Dot::new(ActorId::new(2), 1), Hlc::new(1, 0), b"y");
        let resolved = resolve_siblings(&registry, "c:1", [b, a]);
        assert_eq!(resolved.value, ResolvedValue::One(b"xy".to_vec()));
        let record = resolved.record.unwrap();
        assert_eq!(record.key, "c:1");
        assert_eq!(record.resolver, "concat");
        assert_eq!(
            record.resolution,
            RecordedResolution::Chosen {
                value_len: 2,
                value_digest: value_digest(b"xy")
            }
        );
    }

    #[test]
    fn identical_concurrent_values_are_still_a_conflict() {
        // Two regions writing the same bytes concurrently are two writes: recorded, and
        // kept-siblings readers see both.
        let registry = ResolverRegistry::with_default(Arc::new(KeepSiblings));
        let a = Sibling::new(Dot::new(ActorId::new(1), 1), Hlc::new(1, 0), b"same");
        let b = Sibling::new(Dot::new(ActorId::new(2), 1), Hlc::new(2, 0), b"same");
        let resolved = resolve_siblings(&registry, "k", [a, b]);
        assert_eq!(
            resolved.value,
            ResolvedValue::Siblings(vec![b"same".to_vec(), b"same".to_vec()])
        );
        assert_eq!(resolved.record.unwrap().siblings.len(), 2);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod prop_tests {
    use std::ops::Range;
    use std::sync::{Arc, Mutex};

    use geostate_crdt::LwwRegister;
    use proptest::prelude::*;

    use super::*;
    use crate::{ActorId, Dot, FnResolver, Hlc, KeepSiblings, LwwResolver, SiblingRecord};

    type Owned = (Dot, Hlc, Vec<u8>);

    /// One call of a custom resolver: the key and the siblings it saw.
    type Call = (String, Vec<Owned>);

    fn view(owned: &[Owned]) -> Vec<Sibling<'_>> {
        owned
            .iter()
            .map(|(d, h, v)| Sibling::new(*d, *h, v))
            .collect()
    }

    /// Siblings with distinct dots, sorted; small domains so that HLC, actor and counter ties
    /// all happen.
    fn sorted_siblings(count: Range<usize>) -> impl Strategy<Value = Vec<Owned>> {
        prop::collection::btree_map(
            (0u64..4, 1u64..4),
            ((0u64..3, 0u32..2), prop::collection::vec(0u8..3, 0..3)),
            count,
        )
        .prop_map(|m| {
            m.into_iter()
                .map(|((a, c), ((p, l), v))| (Dot::new(ActorId::new(a), c), Hlc::new(p, l), v))
                .collect()
        })
    }

    /// Sorted siblings and the same siblings shuffled, some of them repeated.
    fn sorted_and_scrambled(
        count: Range<usize>,
    ) -> impl Strategy<Value = (Vec<Owned>, Vec<Owned>)> {
        sorted_siblings(count).prop_flat_map(|sorted| {
            let n = sorted.len();
            (Just(sorted.clone()), Just(sorted).prop_shuffle(), 0..=n).prop_map(
                |(sorted, mut scrambled, repeats)| {
                    let extra: Vec<Owned> = scrambled.iter().take(repeats).cloned().collect();
                    scrambled.extend(extra);
                    (sorted, scrambled)
                },
            )
        })
    }

    type Write = (ActorId, Hlc, Vec<u8>);

    /// Concurrent writes (each from the empty register, one per actor) and a delivery
    /// schedule: every write at least once, shuffled, each delivered twice.
    fn writes_and_schedule() -> impl Strategy<Value = (Vec<Write>, Vec<usize>)> {
        prop::collection::btree_map(
            0u64..6,
            ((0u64..3, 0u32..2), prop::collection::vec(0u8..3, 0..3)),
            0..6,
        )
        .prop_flat_map(|m| {
            let writes: Vec<Write> = m
                .into_iter()
                .map(|(a, ((p, l), v))| (ActorId::new(a), Hlc::new(p, l), v))
                .collect();
            let n = writes.len();
            let schedule: Vec<usize> = (0..n).chain(0..n).collect();
            (Just(writes), Just(schedule).prop_shuffle())
        })
    }

    /// One registry per built-in resolver, plus an order-sensitive custom function (it would
    /// expose any unsorted call).
    fn registries() -> Vec<ResolverRegistry> {
        let concat = FnResolver::new("concat", |_: &str, s: &[Sibling<'_>]| {
            s.iter()
                .flat_map(|s| s.value.iter().copied().chain([0xff]))
                .collect()
        });
        vec![
            ResolverRegistry::new(),
            ResolverRegistry::with_default(Arc::new(KeepSiblings)),
            ResolverRegistry::with_default(Arc::new(concat)),
        ]
    }

    proptest! {
        #[test]
        fn resolution_is_independent_of_sibling_order(
            (sorted, scrambled) in sorted_and_scrambled(0..7),
        ) {
            for registry in registries() {
                let expected = resolve_siblings(&registry, "k", view(&sorted));
                let got = resolve_siblings(&registry, "k", view(&scrambled));
                prop_assert_eq!(got, expected);
            }
        }

        #[test]
        fn lww_picks_the_greatest_hlc_actor_counter(
            (sorted, scrambled) in sorted_and_scrambled(2..7),
        ) {
            // Dots are distinct, so the rank has a single maximum.
            let best = sorted
                .iter()
                .max_by_key(|(dot, hlc, _)| (*hlc, dot.actor, dot.counter))
                .unwrap();
            let resolved = resolve_siblings(&ResolverRegistry::new(), "k", view(&scrambled));
            prop_assert_eq!(resolved.value, ResolvedValue::One(best.2.clone()));
            let winner = LwwResolver::winner(&view(&scrambled)).map(|s| s.dot);
            prop_assert_eq!(winner, Some(best.0));
        }

        #[test]
        fn lww_agrees_with_the_lww_register((writes, schedule) in writes_and_schedule()) {
            let (mv_base, lww_base) = (MvRegister::new(), LwwRegister::new());
            let mut mv = MvRegister::new();
            let mut lww = LwwRegister::new();
            for &i in &schedule {
                let (actor, hlc, value) = &writes[i];
                mv.merge(&mv_base.write(*actor, *hlc, value.clone()));
                lww.merge(&lww_base.write(*actor, *hlc, value.clone()));
            }
            let expected = match lww.value() {
                None => ResolvedValue::Absent,
                Some(v) => ResolvedValue::One(v.clone()),
            };
            prop_assert_eq!(resolve(&ResolverRegistry::new(), "k", &mv).value, expected);
        }

        #[test]
        fn record_iff_two_or_more_siblings((sorted, scrambled) in sorted_and_scrambled(0..7)) {
            for registry in registries() {
                let resolved = resolve_siblings(&registry, "key:1", view(&scrambled));
                prop_assert_eq!(resolved.record.is_some(), sorted.len() >= 2);
                prop_assert_eq!(resolved.value == ResolvedValue::Absent, sorted.is_empty());
                if let Some(record) = resolved.record {
                    let expected: Vec<SiblingRecord> =
                        view(&sorted).into_iter().map(SiblingRecord::from).collect();
                    prop_assert_eq!(record.siblings, expected);
                    prop_assert_eq!(record.key, "key:1");
                    prop_assert_eq!(record.resolver.as_str(), registry.default_resolver().name());
                }
            }
        }

        #[test]
        fn custom_resolver_is_called_with_sorted_siblings(
            (sorted, scrambled) in sorted_and_scrambled(0..7),
        ) {
            let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
            let log = Arc::clone(&calls);
            let spy = FnResolver::new("spy", move |key: &str, s: &[Sibling<'_>]| {
                let seen = s.iter().map(|s| (s.dot, s.hlc, s.value.to_vec())).collect();
                log.lock().unwrap().push((key.to_owned(), seen));
                Vec::new()
            });
            let mut registry = ResolverRegistry::new();
            registry.register("spy:", Arc::new(spy)).unwrap();
            resolve_siblings(&registry, "spy:k", view(&scrambled));
            let calls = calls.lock().unwrap();
            if sorted.len() >= 2 {
                prop_assert_eq!(calls.as_slice(), &[("spy:k".to_owned(), sorted)][..]);
            } else {
                prop_assert!(calls.is_empty());
            }
        }

        #[test]
        fn registry_picks_the_longest_matching_prefix(
            prefixes in prop::collection::btree_set("[ab]{1,3}", 0..6),
            key in "[ab]{0,4}",
        ) {
            let mut registry = ResolverRegistry::new();
            for p in &prefixes {
                let name = format!("for-{p}");
                let r = FnResolver::new(name, |_: &str, _: &[Sibling<'_>]| Vec::new());
                registry.register(p.as_str(), Arc::new(r)).unwrap();
            }
            let expected = prefixes
                .iter()
                .filter(|p| key.starts_with(p.as_str()))
                .max_by_key(|p| p.len())
                .map_or_else(|| "lww".to_owned(), |p| format!("for-{p}"));
            prop_assert_eq!(registry.resolver_for(&key).name(), expected.as_str());
        }

        #[test]
        fn equal_registers_resolve_equally_whatever_the_delivery_order(
            (writes, schedule) in writes_and_schedule(),
        ) {
            let base = MvRegister::new();
            let deltas: Vec<_> = writes
                .iter()
                .map(|(actor, hlc, value)| base.write(*actor, *hlc, value.clone()))
                .collect();
            let mut in_order = MvRegister::new();
            for d in &deltas {
                in_order.merge(d);
            }
            let mut scheduled = MvRegister::new();
            for &i in &schedule {
                scheduled.merge(&deltas[i]);
            }
            prop_assert_eq!(&in_order, &scheduled);
            for registry in registries() {
                prop_assert_eq!(
                    resolve(&registry, "k", &in_order),
                    resolve(&registry, "k", &scheduled)
                );
            }
        }
    }
}
