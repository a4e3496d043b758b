//! The rateless IBLT on its own: encode, subtract, peel; symbol counts against the paper's;
//! corrupt and hostile symbols.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use geostate_replication::iblt::{
    check_hash, encode, DecodeError, Decoder, Indices, Symbol, SYMBOL_WIRE_BYTES,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence, RngSeed};

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
/// A deterministic stream of ids.
struct Ids(u64);
impl Ids {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }
    fn take(&mut self, n: usize) -> Vec<u64> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// Decodes `remote` against `local` asking `step` symbols at a time; returns the decoder
/// and the symbols it took.
fn reconcile(remote: &[u64], local: &[u64], step: usize, max: usize) -> (Decoder, usize) {
    let mut decoder = Decoder::new();
    while !decoder.is_decoded() && decoder.len() < max {
        let from = decoder.len() as u64;
        let theirs = encode(remote.iter().copied(), from, step);
        let ours = encode(local.iter().copied(), from, step);
        decoder.add(&theirs, &ours).unwrap();
    }
    let len = decoder.len();
    (decoder, len)
}

fn sorted(ids: &[u64]) -> Vec<u64> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids
}

#[test]
fn an_id_lands_on_index_i_with_probability_about_one_over_one_plus_half_i() {
    let ids = Ids(7).take(200_000);
    let mut hits = [0u32; 64];
    for &id in &ids {
        for i in Indices::new(id).take_while(|&i| i < 64) {
            hits[i as usize] += 1;
        }
    }
    for (i, &h) in hits.iter().enumerate() {
        let expected = 1.0 / (1.0 + i as f64 / 2.0);
        let seen = f64::from(h) / ids.len() as f64;
        assert!(
            (seen - expected).abs() < 0.02 + expected * 0.05,
            "index {i}: {seen} vs {expected}"
        );
    }
}

#[test]
fn indices_strictly_increase_and_end_at_the_top() {
    for id in Ids(3).take(1_000) {
        let indices: Vec<u64> = Indices::new(id).take(200).collect();
        assert!(indices.windows(2).all(|w| w[0] < w[1]));
        assert!(Indices::maps(id, indices[5]));
        assert!(!Indices::maps(id, indices[5] + 1) || indices[6] == indices[5] + 1);
    }
}

#[test]
fn symbols_travel_as_thirteen_fixed_bytes() {
    let symbol = Symbol {
        count: 3,
        sum: 0x0102_0304_0506_0708,
        check: 0x0a0b_0c0d,
    };
    let bytes = geostate_crdt::record::encode(&symbol).unwrap();
    assert_eq!(bytes.len(), 1 + SYMBOL_WIRE_BYTES);
    assert_eq!(
        &bytes[1..],
        &[3, 8, 7, 6, 5, 4, 3, 2, 1, 0x0d, 0x0c, 0x0b, 0x0a]
    );
    let back: Symbol = geostate_crdt::record::decode(&bytes).unwrap();
    assert_eq!(back, symbol);
    let many = vec![symbol; 300];
    let bytes = geostate_crdt::record::encode(&many).unwrap();
    assert_eq!(bytes.len(), 1 + 3 + 300 * SYMBOL_WIRE_BYTES);
}

#[test]
fn equal_sets_decode_from_symbol_zero_alone() {
    let set = Ids(1).take(500);
    let (decoder, len) = reconcile(&set, &set, 1, 100);
    assert_eq!(len, 1);
    assert!(decoder.remote_only().is_empty() && decoder.local_only().is_empty());
    // Empty sets too.
    let (decoder, len) = reconcile(&[], &[], 1, 100);
    assert_eq!(len, 1);
    assert!(decoder.is_decoded());
}

#[test]
fn one_difference_decodes_from_symbol_zero_alone() {
    let set = Ids(1).take(500);
    let (decoder, len) = reconcile(&set, &set[1..], 1, 100);
    assert_eq!(len, 1);
    assert_eq!(decoder.remote_only(), &[set[0]]);
    let (decoder, len) = reconcile(&set[1..], &set, 1, 100);
    assert_eq!(len, 1);
    assert_eq!(decoder.local_only(), &[set[0]]);
}

#[test]
fn batches_of_any_size_decode_the_same_difference() {
    let mut ids = Ids(11);
    let common = ids.take(1_000);
    let a_only = ids.take(30);
    let b_only = ids.take(20);
    let a: Vec<u64> = common.iter().chain(&a_only).copied().collect();
    let b: Vec<u64> = b_only.iter().chain(&common).copied().collect();
    let (_, needed) = reconcile(&a, &b, 1, 10_000);
    for step in [1, 2, 7, 64, 1_000] {
        let (decoder, len) = reconcile(&a, &b, step, 10_000);
        assert!(decoder.is_decoded());
        assert_eq!(sorted(decoder.remote_only()), sorted(&a_only));
        assert_eq!(sorted(decoder.local_only()), sorted(&b_only));
        // Decoding is the same whatever the batches: done at the same symbol.
        assert_eq!(
            len.div_ceil(step) * step,
            needed.div_ceil(step) * step,
            "{step}"
        );
    }
}

/// Symbols needed for `d` differences, averaged over `trials` pairs of sets.
fn mean_symbols(d: usize, trials: u64) -> f64 {
    let mut total = 0;
    for trial in 0..trials {
        let mut ids = Ids(trial * 7919 + d as u64);
        let common = ids.take(200);
        let diff = ids.take(d);
        let (a_only, b_only) = diff.split_at(d / 2);
        let a: Vec<u64> = common.iter().chain(a_only).copied().collect();
        let b: Vec<u64> = common.iter().chain(b_only).copied().collect();
        let (decoder, len) = reconcile(&a, &b, 1, 100 * d + 100);
        assert!(decoder.is_decoded(), "d {d}, trial {trial}");
        assert_eq!(sorted(decoder.remote_only()), sorted(a_only));
        assert_eq!(sorted(decoder.local_only()), sorted(b_only));
        total += len;
    }
    total as f64 / trials as f64
}

#[test]
fn differences_up_to_two_thousand_decode_with_the_expected_symbol_counts() {
    // The paper's overhead (symbols per difference) falls from about 2 for a handful of
    // differences towards 1.35; the bounds leave room for this implementation's hashes.
    for (d, trials, max_ratio) in [
        (2, 200, 3.5),
        (5, 200, 2.6),
        (10, 100, 2.2),
        (50, 40, 1.8),
        (200, 10, 1.6),
        (2_000, 3, 1.45),
    ] {
        let mean = mean_symbols(d, trials);
        let ratio = mean / d as f64;
        println!("d {d}: {mean:.1} symbols, {ratio:.2} per difference");
        assert!(
            ratio <= max_ratio,
            "d {d}: {ratio:.2} symbols per difference"
        );
        assert!(ratio >= 1.0, "d {d}: {ratio:.2} symbols per difference");
    }
}

#[test]
fn every_difference_from_zero_to_two_thousand_decodes() {
    let mut ids = Ids(99);
    let common = ids.take(300);
    let extra = ids.take(2_000);
    for d in (0..=60).chain((100..=2_000).step_by(100)) {
        let (a_only, b_only) = extra[..d].split_at(d / 3);
        let a: Vec<u64> = common.iter().chain(a_only).copied().collect();
        let b: Vec<u64> = b_only.iter().chain(&common).copied().collect();
        let step = (d / 4).max(1);
        let (decoder, len) = reconcile(&a, &b, step, 4 * d + 64);
        assert!(decoder.is_decoded(), "d {d}");
        assert!(len <= 3 * d + step + 2, "d {d}: {len} symbols");
        assert_eq!(sorted(decoder.remote_only()), sorted(a_only), "d {d}");
        assert_eq!(sorted(decoder.local_only()), sorted(b_only), "d {d}");
    }
}

#[test]
fn too_few_symbols_do_not_decode_and_report_nothing_wrong() {
    let mut ids = Ids(5);
    let a = ids.take(100);
    let b = ids.take(100);
    let mut decoder = Decoder::new();
    decoder
        .add(
            &encode(a.iter().copied(), 0, 20),
            &encode(b.iter().copied(), 0, 20),
        )
        .unwrap();
    assert!(!decoder.is_decoded());
    assert!(decoder.remote_only().len() + decoder.local_only().len() <= 20);
}

#[test]
fn mismatched_batches_are_an_error() {
    let mut decoder = Decoder::new();
    assert_eq!(
        decoder.add(&[Symbol::default(); 2], &[Symbol::default()]),
        Err(DecodeError::Lengths {
            remote: 2,
            local: 1
        })
    );
}

/// Runs a decoder over `symbols` (as remote, against an empty local set) in batches of
/// `step`; must terminate without panicking.
fn decode_garbage(symbols: &[Symbol], step: usize) -> Result<Decoder, DecodeError> {
    let mut decoder = Decoder::new();
    for batch in symbols.chunks(step.max(1)) {
        decoder.add(batch, &vec![Symbol::default(); batch.len()])?;
        let peeled = decoder.remote_only().len() + decoder.local_only().len();
        assert!(peeled <= decoder.len());
    }
    Ok(decoder)
}

#[test]
fn corrupted_symbols_never_panic_never_loop_and_never_pass_silently() {
    let mut ids = Ids(17);
    let a = ids.take(300);
    let b: Vec<u64> = a[40..].iter().copied().chain(ids.take(40)).collect();
    let mut detected = 0;
    for trial in 0..200u64 {
        let mut theirs = encode(a.iter().copied(), 0, 400);
        let ours = encode(b.iter().copied(), 0, 400);
        let mut noise = Ids(trial);
        let at = (noise.next() % 400) as usize;
        match trial % 4 {
            0 => theirs[at].count = theirs[at].count.wrapping_add(1),
            1 => theirs[at].sum ^= 1 << (noise.next() % 64),
            2 => theirs[at].check ^= 1 << (noise.next() % 32),
            _ => {
                theirs[at] = Symbol {
                    count: 1,
                    sum: noise.next(),
                    check: 0,
                };
                theirs[at].check = check_hash(theirs[at].sum);
            }
        }
        let mut decoder = Decoder::new();
        match decoder.add(&theirs, &ours) {
            Err(_) => detected += 1,
            Ok(()) if !decoder.is_decoded() => detected += 1,
            Ok(()) => {
                // Decoded: only if the corruption is invisible in the difference (a
                // symbol past every difference, say, made pure by its own id).
                let peeled = decoder.remote_only().len() + decoder.local_only().len();
                assert!(peeled <= 400);
            }
        }
    }
    assert!(detected >= 150, "{detected} of 200 corruptions noticed");
}

#[test]
fn a_sketch_of_a_set_that_changed_between_batches_is_caught() {
    let mut ids = Ids(23);
    let a = ids.take(500);
    let b: Vec<u64> = a[10..].to_vec();
    let a_later: Vec<u64> = a.iter().copied().chain(ids.take(30)).collect();
    let mut decoder = Decoder::new();
    decoder
        .add(
            &encode(a.iter().copied(), 0, 8),
            &encode(b.iter().copied(), 0, 8),
        )
        .unwrap();
    let outcome = decoder.add(
        &encode(a_later.iter().copied(), 8, 200),
        &encode(b.iter().copied(), 8, 200),
    );
    assert!(outcome.is_err() || !decoder.is_decoded());
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        rng_seed: RngSeed::Fixed(0x6962_6c74),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/iblt.txt",
        ))),
        ..ProptestConfig::default()
    })]

    /// Whatever the sets and the batches, a decoded sketch names exactly the difference.
    #[test]
    fn decoding_finds_exactly_the_difference(
        common in proptest::collection::btree_set(any::<u64>(), 0..300),
        a_only in proptest::collection::btree_set(any::<u64>(), 0..60),
        b_only in proptest::collection::btree_set(any::<u64>(), 0..60),
        step in 1usize..50,
    ) {
        let a_only: BTreeSet<u64> = a_only.difference(&common).copied().collect();
        let b_only: BTreeSet<u64> = b_only
            .difference(&common)
            .filter(|id| !a_only.contains(id))
            .copied()
            .collect();
        let a: Vec<u64> = common.iter().chain(&a_only).copied().collect();
        let b: Vec<u64> = common.iter().chain(&b_only).copied().collect();
        let d = a_only.len() + b_only.len();
        let (decoder, _) = reconcile(&a, &b, step, 10 * d + 200);
        prop_assert!(decoder.is_decoded());
        prop_assert_eq!(sorted(decoder.remote_only()), a_only.into_iter().collect::<Vec<_>>());
        prop_assert_eq!(sorted(decoder.local_only()), b_only.into_iter().collect::<Vec<_>>());
    }

    /// Arbitrary symbols never panic, and peel at most one id per symbol.
    #[test]
    fn arbitrary_symbols_terminate(
        raw in proptest::collection::vec((any::<u8>(), any::<u64>(), any::<bool>()), 0..300),
        step in 1usize..64,
    ) {
        let symbols: Vec<Symbol> = raw
            .into_iter()
            .map(|(count, sum, pure)| Symbol {
                count: if pure { 1 } else { count },
                sum,
                check: if pure { check_hash(sum) } else { (sum >> 7) as u32 },
            })
            .collect();
        let _ = decode_garbage(&symbols, step);
    }

    /// Sketches of real sets with every symbol made to look pure: still no panic.
    #[test]
    fn forged_pure_symbols_terminate(
        ids in proptest::collection::vec(any::<u64>(), 1..100),
        len in 1usize..200,
    ) {
        let symbols: Vec<Symbol> = (0..len)
            .map(|i| {
                let id = ids[i % ids.len()];
                Symbol { count: if i % 2 == 0 { 1 } else { 255 }, sum: id, check: check_hash(id) }
            })
            .collect();
        let _ = decode_garbage(&symbols, len);
        let _ = decode_garbage(&symbols, 1);
    }
}
