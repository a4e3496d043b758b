//! Region write-path throughput on the embedded memory store.
//!
//! Prints ops/s (median of 5 rounds after a warm-up) for `merge_crdt` counter increments on one
//! task and on two, OR-set adds, and a 1,000-key batch; each beside a baseline measured in the
//! same run — the same number of increments on a raw `Mutex<HashMap<String, i64>>` — and the
//! ratio ours/raw, so a noisy machine still gives a comparable figure. Nothing is asserted.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use geostate_crdt::{CounterOp, SetOp};
use geostate_regions::{Region, RegionConfig};

const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `round` (which performs `ops` operations) ROUNDS times after a warm-up; median ops/s.
fn measure(ops: usize, mut round: impl FnMut(usize)) -> f64 {
    round(0);
    let mut rates = Vec::new();
    for r in 1..=ROUNDS {
        let start = Instant::now();
        round(r);
        rates.push(ops as f64 / start.elapsed().as_secs_f64());
    }
    median(rates)
}

fn raw_increments(ops: usize, keys: usize) -> f64 {
    let map: Mutex<HashMap<String, i64>> = Mutex::new(HashMap::new());
    let names: Vec<String> = (0..keys).map(|i| format!("visits:{i}")).collect();
    measure(ops, |_| {
        for i in 0..ops {
            let mut m = map.lock().unwrap();
            *m.entry(names[i % keys].clone()).or_insert(0) += 1;
        }
    })
}

fn report(name: &str, ours: f64, raw: f64) {
    println!(
        "{name:<34} {:>12.0} ops/s   raw {:>12.0} ops/s   ratio {:.3}",
        ours,
        raw,
        ours / raw
    );
}

fn main() {
    let config = RegionConfig::new("us-east".parse().unwrap());
    let single = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let region = single.block_on(Region::connect(config.clone())).unwrap();
    let names: Vec<String> = (0..1000).map(|i| format!("visits:{i}")).collect();

    const OPS: usize = 200_000;
    let raw = raw_increments(OPS, 1);
    let ours = measure(OPS, |_| {
        single.block_on(async {
            for _ in 0..OPS {
                black_box(
                    region
                        .merge_crdt("visits", CounterOp::inc(1))
                        .await
                        .unwrap(),
                );
            }
        })
    });
    report("merge_crdt counter, 1 task, 1 key", ours, raw);

    let raw = raw_increments(OPS, 1000);
    let ours = measure(OPS, |_| {
        single.block_on(async {
            for i in 0..OPS {
                black_box(
                    region
                        .merge_crdt(&names[i % 1000], CounterOp::inc(1))
                        .await
                        .unwrap(),
                );
            }
        })
    });
    report("merge_crdt counter, 1 task, 1k keys", ours, raw);

    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let shared = multi.block_on(Region::connect(config.clone())).unwrap();
    let names = Arc::new(names);
    let ours = measure(OPS, |_| {
        multi.block_on(async {
            let tasks: Vec<_> = (0..2)
                .map(|t| {
                    let region = shared.clone();
                    let names = Arc::clone(&names);
                    tokio::spawn(async move {
                        for i in 0..OPS / 2 {
                            let key = &names[(i * 2 + t) % 1000];
                            black_box(region.merge_crdt(key, CounterOp::inc(1)).await.unwrap());
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        })
    });
    report("merge_crdt counter, 2 tasks, 1k keys", ours, raw);

    const ADDS: usize = 100_000;
    let sets = single.block_on(Region::connect(config.clone())).unwrap();
    let raw_set: Mutex<HashMap<String, std::collections::BTreeSet<String>>> =
        Mutex::new(HashMap::new());
    let raw = measure(ADDS, |r| {
        for i in 0..ADDS {
            let mut m = raw_set.lock().unwrap();
            m.entry("cart".to_string())
                .or_default()
                .insert(format!("sku-{r}-{i}"));
        }
    });
    let ours = measure(ADDS, |r| {
        single.block_on(async {
            for i in 0..ADDS {
                let op = SetOp::add(format!("sku-{r}-{i}"));
                black_box(sets.merge_crdt(&format!("cart:{r}"), op).await.unwrap());
            }
        })
    });
    report("merge_crdt OR-set add, 1 task", ours, raw);

    const BATCH: usize = 1000;
    let batches = single.block_on(Region::connect(config)).unwrap();
    let raw = raw_increments(BATCH * 50, 1000);
    let mut batch_ms = Vec::new();
    let ours = measure(BATCH * 50, |_| {
        single.block_on(async {
            for _ in 0..50 {
                let start = Instant::now();
                let items = names.iter().map(|k| (k.as_str(), CounterOp::inc(1)));
                let results = batches.merge_batch(items).await.unwrap();
                batch_ms.push(start.elapsed().as_secs_f64() * 1e3);
                assert!(results.iter().all(Result::is_ok));
            }
        })
    });
    report("merge_batch of 1,000 counter keys", ours, raw);
    println!(
        "{:<34} {:>12.3} ms per 1,000-key batch (median)",
        "merge_batch latency",
        median(batch_ms)
    );
}
