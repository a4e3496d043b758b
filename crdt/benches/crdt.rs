//! CRDT core benchmarks. They print figures; nothing here asserts a timing.
//!
//! - `delta_size`: one add into a 10,000-member OR-set, delta envelope bytes as a fraction of
//!   the full-state envelope (printed before the timed groups);
//! - `orset_merge`: full-state merge of two 3-actor OR-sets of 10,000 members;
//! - `orset_delta_apply`: one add delta applied to a 10,000-member OR-set;
//! - `counter_delta_apply`: counter deltas applied in sequence (ops/s);
//! - `envelope`: encode and decode of a 10,000-member OR-set, raw and zstd (MB/s), beside a
//!   plain `bincode` encode of the same value as the baseline measured in the same run.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use geostate_crdt::envelope::{self, Limits, Options};
use geostate_crdt::{ActorId, Crdt, OrSet, PnCounter};

const MEMBERS: usize = 10_000;

fn element(i: usize) -> Vec<u8> {
    format!("member-{i:06}").into_bytes()
}

/// A 10,000-member set whose adds are spread over three actors.
fn three_actor_set(members: usize, offset: usize) -> OrSet<Vec<u8>> {
    let mut set = OrSet::new();
    for i in 0..members {
        let actor = ActorId::new((i % 3) as u64 + 1);
        let delta = set.add(actor, element(i + offset));
        set.merge(&delta);
    }
    set
}

fn raw_options() -> Options {
    Options {
        compress_threshold_bytes: usize::MAX,
        ..Options::default()
    }
}

fn print_delta_size() {
    let set = three_actor_set(MEMBERS, 0);
    let delta = set.add(ActorId::new(4), element(MEMBERS + 1));
    for (name, options) in [("raw", raw_options()), ("zstd", Options::default())] {
        let full = envelope::encode(&Crdt::OrSet(set.clone()), &options).unwrap();
        let small = envelope::encode(&Crdt::OrSet(delta.clone()), &options).unwrap();
        println!(
            "delta_size/{name}: one add into a {MEMBERS}-member OR-set: delta {} B, full state {} B, ratio {:.4}%",
            small.len(),
            full.len(),
            100.0 * small.len() as f64 / full.len() as f64
        );
    }
}

fn orset_merge(c: &mut Criterion) {
    // Two replicas that each saw two thirds of the members: every merge does real work.
    let left = three_actor_set(MEMBERS, 0);
    let mut right = three_actor_set(MEMBERS / 2, 0);
    let extra = three_actor_set(MEMBERS / 2, MEMBERS);
    right.merge(&extra);
    let mut group = c.benchmark_group("orset_merge");
    group.throughput(Throughput::Elements(MEMBERS as u64));
    group.bench_function("full_state_10k_3_actors", |b| {
        b.iter_batched(
            || left.clone(),
            |mut l| {
                l.merge(black_box(&right));
                l
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();

    let mut group = c.benchmark_group("orset_delta_apply");
    let delta = left.add(ActorId::new(9), element(MEMBERS + 7));
    let remove = left.remove(&element(17));
    group.throughput(Throughput::Elements(1));
    group.bench_function("add_into_10k", |b| {
        b.iter_batched(
            || left.clone(),
            |mut l| {
                l.merge(black_box(&delta));
                l
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("remove_from_10k", |b| {
        b.iter_batched(
            || left.clone(),
            |mut l| {
                l.merge(black_box(&remove));
                l
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn counter_delta_apply(c: &mut Criterion) {
    const DELTAS: usize = 10_000;
    // Deltas as a remote region would ship them: three actors taking turns.
    let mut origin = PnCounter::new();
    let mut deltas = Vec::with_capacity(DELTAS);
    for i in 0..DELTAS {
        let actor = ActorId::new((i % 3) as u64 + 1);
        let d = if i % 4 == 0 {
            origin.dec(actor, 1).unwrap()
        } else {
            origin.inc(actor, 2).unwrap()
        };
        origin.merge(&d);
        deltas.push(d);
    }
    let mut group = c.benchmark_group("counter_delta_apply");
    group.throughput(Throughput::Elements(DELTAS as u64));
    group.bench_function("10k_deltas_3_actors", |b| {
        b.iter(|| {
            let mut replica = PnCounter::new();
            for d in &deltas {
                replica.merge(d);
            }
            black_box(replica.value())
        })
    });
    group.finish();
}

fn envelope_codec(c: &mut Criterion) {
    let value = Crdt::OrSet(three_actor_set(MEMBERS, 0));
    let limits = Limits::default();
    let mut group = c.benchmark_group("envelope");
    for (name, options) in [("raw", raw_options()), ("zstd", Options::default())] {
        let bytes = envelope::encode(&value, &options).unwrap();
        let payload =
            bincode::serde::encode_to_vec(value_inner(&value), bincode::config::standard())
                .unwrap();
        group.throughput(Throughput::Bytes(payload.len() as u64));
        group.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| envelope::encode(black_box(&value), &options).unwrap())
        });
        group.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| envelope::decode(black_box(&bytes), &limits).unwrap())
        });
        println!(
            "envelope/{name}: payload {} B, envelope {} B",
            payload.len(),
            bytes.len()
        );
    }
    // Baseline in the same run: the bare serializer with no checksum, validation or framing.
    let inner = value_inner(&value);
    group.bench_function("baseline_bincode_encode", |b| {
        b.iter(|| {
            bincode::serde::encode_to_vec(black_box(&inner), bincode::config::standard()).unwrap()
        })
    });
    group.finish();
}

fn value_inner(value: &Crdt) -> OrSet<Vec<u8>> {
    match value {
        Crdt::OrSet(s) => s.clone(),
        _ => OrSet::new(),
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(3));
    targets = orset_merge, counter_delta_apply, envelope_codec
}

fn main() {
    print_delta_size();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
