//! Garbage collection in the pure core: a tombstone is purged only once every peer holds the
//! identical tombstone and every region has pulled every feed past the head its owner
//! reported; any missing or contrary answer keeps it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use geostate_replication::core::{
    Command, CommandId, CoreConfig, Event, LocalOp, LocalResult, ReplicatorCore,
};
use geostate_replication::wire::{Request, Response};

/// One partition, a round every 100 ms, heads polls that never come back on their own.
fn config() -> CoreConfig {
    CoreConfig {
        partitions: 1,
        pull_wait_ms: 60_000,
        anti_entropy_interval_ms: 4_000_000_000,
        request_timeout_ms: 1_000,
        gc_interval_ms: 100,
        gc_keys_per_round_max: 8,
        ..CoreConfig::default()
    }
}

const TOMBSTONE_HASH: u64 = 0xAA;

/// A core named "a-self" with peers "peer-0" and "peer-1", started with our cursors on their
/// feeds at `cursors`; returns it and the time.
fn started(cursors: [u64; 2]) -> (ReplicatorCore, u64) {
    let peers = vec!["peer-0".to_string(), "peer-1".to_string()];
    let mut core = ReplicatorCore::new(config(), "a-self", &peers);
    let out = core.handle(0, Event::Start);
    let Command::Local { id, .. } = out[0] else {
        panic!("{out:?}")
    };
    core.handle(
        0,
        Event::Local {
            id,
            result: Ok(LocalResult::Cursors(vec![
                vec![cursors[0]],
                vec![cursors[1]],
            ])),
        },
    );
    (core, 0)
}

/// Ticks until the core lists tombstones; answers with one tombstone `("k", version 3)` and
/// our feed head `own_head`; returns the stability probes sent, by peer.
fn list(
    core: &mut ReplicatorCore,
    now: &mut u64,
    own_head: u64,
) -> Vec<(CommandId, usize, Request)> {
    for _ in 0..50 {
        *now += 10;
        for command in core.handle(*now, Event::Tick) {
            if let Command::Local {
                id,
                op: LocalOp::Tombstones { partition: 0, .. },
            } = command
            {
                let out = core.handle(
                    *now,
                    Event::Local {
                        id,
                        result: Ok(LocalResult::Tombstones {
                            items: vec![("k".into(), 3, TOMBSTONE_HASH)],
                            next: None,
                            head: own_head,
                        }),
                    },
                );
                return out
                    .into_iter()
                    .filter_map(|c| match c {
                        Command::Send {
                            id,
                            peer,
                            request: request @ Request::Stability { .. },
                        } => Some((id, peer, request)),
                        _ => None,
                    })
                    .collect();
            }
        }
    }
    panic!("no garbage-collection round started");
}

/// Answers the probes; returns whether the core purged "k" locally (and told both peers).
fn answer(
    core: &mut ReplicatorCore,
    now: u64,
    probes: Vec<(CommandId, usize, Request)>,
    answers: [Response; 2],
) -> bool {
    let mut answers = answers.map(Some);
    let mut out = Vec::new();
    for (id, peer, _) in probes {
        let response = answers[peer].take().unwrap();
        out.extend(core.handle(
            now,
            Event::Remote {
                id,
                result: Ok(response),
            },
        ));
    }
    let local = out.iter().any(|c| {
        matches!(c, Command::Local { op: LocalOp::Purge { keys }, .. } if keys == &[("k".to_string(), 3)])
    });
    let remote = out
        .iter()
        .filter(|c| matches!(c, Command::Send { request: Request::Purge { keys }, .. } if keys == &[("k".to_string(), TOMBSTONE_HASH)]))
        .count();
    assert!(remote == 0 || (local && remote == 2), "{out:?}");
    local
}

fn stability(hash: Option<u64>, head: u64, cursors: [u64; 2]) -> Response {
    Response::Stability {
        hashes: vec![hash],
        head,
        cursors: cursors.to_vec(),
    }
}

/// peer-0 reported head 5 and peer-1 head 7; we stand at 5 and 7 on their feeds, our head is
/// 10. peer-0's cursors are on (self, peer-1), peer-1's on (self, peer-0).
fn stable_answers() -> [Response; 2] {
    [
        stability(Some(TOMBSTONE_HASH), 5, [10, 7]),
        stability(Some(TOMBSTONE_HASH), 7, [10, 5]),
    ]
}

#[test]
fn probes_ask_every_peer_for_every_other_regions_cursor() {
    let (mut core, mut now) = started([5, 7]);
    let probes = list(&mut core, &mut now, 10);
    assert_eq!(probes.len(), 2);
    for (_, peer, request) in &probes {
        let Request::Stability {
            partition,
            keys,
            origins,
        } = request
        else {
            unreachable!()
        };
        assert_eq!(*partition, 0);
        assert_eq!(keys, &["k".to_string()]);
        let other = format!("peer-{}", 1 - peer);
        assert_eq!(origins, &["a-self".to_string(), other]);
    }
}

#[test]
fn a_stable_tombstone_is_purged_here_and_everywhere() {
    let (mut core, mut now) = started([5, 7]);
    let probes = list(&mut core, &mut now, 10);
    assert!(answer(&mut core, now, probes, stable_answers()));
}

#[test]
fn a_peer_with_another_state_keeps_the_tombstone() {
    for hash in [None, Some(TOMBSTONE_HASH + 1)] {
        let (mut core, mut now) = started([5, 7]);
        let probes = list(&mut core, &mut now, 10);
        let [a, _] = stable_answers();
        assert!(!answer(
            &mut core,
            now,
            probes,
            [a, stability(hash, 7, [10, 5])]
        ));
    }
}

#[test]
fn a_peer_behind_on_any_feed_keeps_the_tombstone() {
    // Behind on our feed, then behind on the other peer's.
    for cursors in [[9, 5], [10, 4]] {
        let (mut core, mut now) = started([5, 7]);
        let probes = list(&mut core, &mut now, 10);
        let [a, _] = stable_answers();
        let b = stability(Some(TOMBSTONE_HASH), 7, cursors);
        assert!(!answer(&mut core, now, probes, [a, b]), "{cursors:?}");
    }
}

#[test]
fn being_behind_ourselves_keeps_the_tombstone() {
    // We have applied peer-1's feed only through 6; it reported head 7.
    let (mut core, mut now) = started([5, 6]);
    let probes = list(&mut core, &mut now, 10);
    assert!(!answer(&mut core, now, probes, stable_answers()));
}

#[test]
fn a_probe_that_fails_drops_the_round_and_a_later_round_purges() {
    let (mut core, mut now) = started([5, 7]);
    let probes = list(&mut core, &mut now, 10);
    let (id, _, _) = probes[0];
    core.handle(
        now,
        Event::Remote {
            id,
            result: Err("connection reset".into()),
        },
    );
    // The other answer alone decides nothing.
    let (id, _, _) = probes[1];
    let [_, b] = stable_answers();
    let out = core.handle(now, Event::Remote { id, result: Ok(b) });
    assert!(!out.iter().any(|c| matches!(
        c,
        Command::Local {
            op: LocalOp::Purge { .. },
            ..
        }
    )));
    // After the failed peer's backoff, a new round purges.
    now += 10_000;
    let probes = list(&mut core, &mut now, 10);
    assert!(answer(&mut core, now, probes, stable_answers()));
    assert_eq!(core.stats().tombstones_pending, 1);
}

#[test]
fn a_disabled_collector_never_lists() {
    let peers = vec!["peer-0".to_string()];
    let mut core = ReplicatorCore::new(
        CoreConfig {
            gc_interval_ms: 0,
            ..config()
        },
        "a-self",
        &peers,
    );
    let out = core.handle(0, Event::Start);
    let Command::Local { id, .. } = out[0] else {
        panic!()
    };
    core.handle(
        0,
        Event::Local {
            id,
            result: Ok(LocalResult::Cursors(vec![vec![0]])),
        },
    );
    for t in 1..100 {
        let out = core.handle(t * 100, Event::Tick);
        assert!(!out.iter().any(|c| matches!(
            c,
            Command::Local {
                op: LocalOp::Tombstones { .. },
                ..
            }
        )));
    }
}

#[test]
fn a_partition_with_more_tombstones_than_a_round_is_listed_page_by_page() {
    let (mut core, mut now) = started([5, 7]);
    let mut afters = Vec::new();
    for page in 0..3 {
        let mut listed = false;
        // Unanswered polls and probes back the peers off (up to 5 s): wait that out.
        for _ in 0..2_000 {
            now += 10;
            for command in core.handle(now, Event::Tick) {
                if let Command::Local {
                    id,
                    op: LocalOp::Tombstones { after, .. },
                } = command
                {
                    afters.push(after);
                    // Pages of one tombstone each: "t0", then "t1", then "t2" and the end.
                    let next = (page < 2).then(|| format!("t{page}"));
                    core.handle(
                        now,
                        Event::Local {
                            id,
                            result: Ok(LocalResult::Tombstones {
                                items: vec![(format!("t{page}"), 1, 1)],
                                next,
                                head: 0,
                            }),
                        },
                    );
                    listed = true;
                }
            }
            if listed {
                break;
            }
        }
        assert!(listed);
        // Let the probes of this round fail quietly: answer nothing, let them time out.
        now += 5_000;
        core.handle(now, Event::Tick);
    }
    assert_eq!(
        afters,
        vec![None, Some("t0".to_string()), Some("t1".to_string())]
    );
}

#[test]
fn each_partition_is_collected_by_one_region() {
    let peers = vec!["a".to_string(), "c".to_string()];
    let mut core = ReplicatorCore::new(
        CoreConfig {
            partitions: 6,
            ..config()
        },
        "b",
        &peers,
    );
    let out = core.handle(0, Event::Start);
    let Command::Local { id, .. } = out[0] else {
        panic!()
    };
    core.handle(
        0,
        Event::Local {
            id,
            result: Ok(LocalResult::Cursors(vec![vec![0; 6], vec![0; 6]])),
        },
    );
    let mut listed = Vec::new();
    for t in 1..=200 {
        for command in core.handle(t * 10, Event::Tick) {
            if let Command::Local {
                id,
                op: LocalOp::Tombstones { partition, .. },
            } = command
            {
                listed.push(partition);
                core.handle(
                    t * 10,
                    Event::Local {
                        id,
                        result: Ok(LocalResult::Tombstones {
                            items: Vec::new(),
                            next: None,
                            head: 0,
                        }),
                    },
                );
            }
        }
    }
    // "b" ranks second of a, b, c: partitions 1 and 4, in turn.
    assert!(listed.len() >= 4, "{listed:?}");
    assert!(listed.iter().all(|p| *p == 1 || *p == 4), "{listed:?}");
    assert!(listed.contains(&1) && listed.contains(&4));
}
