//! The replication figures, printed (nothing here asserts a timing):
//!
//! 1. wall-clock time to simulate 5 regions x 10,000 keys x 60 s of simulated time;
//! 2. replication lag p50/p99 with 50 ms links, no loss;
//! 3. anti-entropy bytes to repair 1% divergence of 100,000 keys, as a multiple of the
//!    differing keys' state bytes (two stores, feeds out of the picture);
//! 4. bytes shipped per write with 3, 5, 9 and 16 regions (16 must converge).
//!
//! Run: `cargo bench -p geostate-sim --bench figures`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use geostate_backends::{Expect, Key, Layout, LocalWrite, MemoryBackend, StateBackend};
use geostate_crdt::{envelope, ActorId, Hlc, Op, SetOp};
use geostate_replication::core::{Command, CoreConfig, Event, ReplicatorCore};
use geostate_replication::serve::{execute, ServeLimits, Server};
use geostate_sim::{run, RunOptions, Scenario};
use hdrhistogram::Histogram;

fn ready<F: Future>(f: F) -> F::Output {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("memory store operations complete at once"),
    }
}

fn quiet_scenario(regions: usize, keys: usize, duration_s: f64, writes_per_s: f64) -> Scenario {
    let mut s = Scenario::default_scenario();
    s.name = format!("{regions} regions, {keys} keys");
    s.regions = regions;
    s.keys = keys;
    s.duration_s = duration_s;
    s.faults.clear();
    s.workload.writes_per_s = writes_per_s;
    s.network.latency_ms = 50;
    s.network.jitter_ms = 0;
    // Production-like anti-entropy pace: the feed carries the writes.
    s.replication.anti_entropy_interval_ms = 30_000;
    s
}

fn figure_wall_time() {
    let scenario = quiet_scenario(5, 10_000, 60.0, 1_000.0);
    let start = Instant::now();
    let outcome = run(&scenario, &RunOptions::new(1)).unwrap();
    let wall = start.elapsed();
    let identical = outcome.payloads.windows(2).all(|w| w[0] == w[1]);
    println!(
        "1. simulate 5 regions x 10,000 keys x 60 s ({} writes, {} events): {:.2} s wall; converged {:?} ms after heal; identical {identical}",
        outcome.acked.len(),
        outcome.events,
        wall.as_secs_f64(),
        outcome.converged_ms.map(|c| c - outcome.heal_ms),
    );
    let mut all = Histogram::<u64>::new(3).unwrap();
    for h in outcome.lag.values() {
        all.add(h).unwrap();
    }
    println!(
        "2. lag with 50 ms links, no loss, 5 regions: p50 {} ms, p99 {} ms, max {} ms",
        all.value_at_quantile(0.5),
        all.value_at_quantile(0.99),
        all.max()
    );
}

fn figure_anti_entropy() {
    const KEYS: usize = 100_000;
    const DIFFERING: usize = KEYS / 100;
    const PARTITIONS: u16 = 256;
    let layout = Layout::new(PARTITIONS, 64, 1 << 20, 1 << 20).unwrap();
    let a = Arc::new(MemoryBackend::new(layout.clone()));
    let b = Arc::new(MemoryBackend::new(layout));
    let write = |store: &MemoryBackend, key: &str, element: String, actor: u64| {
        ready(store.apply(LocalWrite {
            key: Key::new(key).unwrap(),
            op: Op::Set(SetOp::add(element)),
            actor: ActorId::new(actor),
            hlc: Hlc::new(1, 0),
            expect: Expect::Any,
        }))
        .unwrap()
    };
    // Both stores hold the same 100,000 small sets (three elements each)...
    for i in 0..KEYS {
        let key = format!("k:{i}");
        for e in 0..3 {
            let receipt = write(&a, &key, format!("element-{e}"), 1);
            ready(b.merge(&Key::new(key.as_str()).unwrap(), &receipt.delta)).unwrap();
        }
    }
    // ...then 1% of them get one more element in A only.
    let mut differing_state_bytes = 0usize;
    for i in (0..KEYS).step_by(KEYS / DIFFERING) {
        let key = format!("k:{i}");
        write(&a, &key, "element-new".into(), 1);
        let stored = ready(a.get(&Key::new(key.as_str()).unwrap()))
            .unwrap()
            .unwrap();
        differing_state_bytes += envelope::encode(&stored.value, &envelope::Options::default())
            .unwrap()
            .len();
    }
    // Feeds out of the picture: B's cursors already stand at A's heads.
    for p in 0..PARTITIONS {
        let last = ready(a.read_feed(p, u64::MAX, 1)).unwrap().last_seq;
        ready(b.advance_cursor("a", p, last)).unwrap();
    }
    let config = CoreConfig {
        partitions: PARTITIONS,
        anti_entropy_interval_ms: 256,
        ..CoreConfig::default()
    };
    let mut core = ReplicatorCore::new(config, "b", &["a".to_string()]);
    let peers = vec!["a".to_string()];
    let server = Server::new(Arc::clone(&a), ServeLimits::default(), 1);
    let mut now = 0u64;
    let mut events = vec![Event::Start];
    let mut held = Vec::new();
    let mut rounds = 0;
    while rounds < 1_000_000 {
        rounds += 1;
        let Some(event) = events.pop() else {
            now += 1;
            events.push(Event::Tick);
            // Nothing is written during the repair: a held long poll is answered empty when
            // its wait runs out; here, at the next tick.
            events.append(&mut held);
            let equal =
                (0..PARTITIONS).all(|p| ready(a.digest(p)).unwrap() == ready(b.digest(p)).unwrap());
            if equal && now > 300 {
                break;
            }
            continue;
        };
        for command in core.handle(now, event) {
            match command {
                Command::Local { id, op } => {
                    events.push(Event::Local {
                        id,
                        result: ready(execute(b.as_ref(), &peers, op)),
                    });
                }
                Command::Send { id, request, .. } => {
                    let response = ready(server.serve(&request));
                    let event = Event::Remote {
                        id,
                        result: Ok(response.clone()),
                    };
                    if response.is_empty_poll() {
                        held.push(event);
                    } else {
                        events.push(event);
                    }
                }
                _ => {}
            }
        }
    }
    let stats = core.stats();
    println!(
        "3. anti-entropy repair of {DIFFERING} of {KEYS} keys (1%): {} bytes shipped by anti-entropy ({} rounds), differing keys' states {} bytes: {:.2}x",
        stats.ae_bytes,
        stats.ae_rounds,
        differing_state_bytes,
        stats.ae_bytes as f64 / differing_state_bytes as f64
    );
}

fn figure_bytes_per_write() {
    for regions in [3usize, 5, 9, 16] {
        let scenario = quiet_scenario(regions, 2_000, 10.0, 500.0);
        let start = Instant::now();
        let outcome = run(&scenario, &RunOptions::new(3)).unwrap();
        let feed: u64 = outcome.stats.iter().map(|s| s.feed_bytes).sum();
        let ae: u64 = outcome.stats.iter().map(|s| s.ae_bytes).sum();
        let writes = outcome.acked.len().max(1) as f64;
        println!(
            "4. {regions:>2} regions: {:.0} bytes/write ({:.0} feed + {:.0} anti-entropy), {:.0} per write per peer; converged: {}; {:.2} s wall",
            (feed + ae) as f64 / writes,
            feed as f64 / writes,
            ae as f64 / writes,
            (feed + ae) as f64 / writes / (regions - 1) as f64,
            outcome.converged_ms.is_some() && outcome.payloads.windows(2).all(|w| w[0] == w[1]),
            start.elapsed().as_secs_f64()
        );
    }
}

fn main() {
    figure_wall_time();
    figure_anti_entropy();
    figure_bytes_per_write();
}
