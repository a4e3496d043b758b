//! `geostate bench` against the machine's own servers: Redis on 127.0.0.1:6379 and
//! PostgreSQL at `GEOSTATE_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`), made
//! sure of by `scripts/ensure-redis` and `scripts/ensure-postgres`. Never skips: without a
//! server the test fails and says why.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const PG_DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

/// Runs one of the `scripts/ensure-*` scripts; fails the test with its message if it fails.
fn ensure(script: &str) {
    let path = repo_root().join("scripts").join(script);
    let out = Command::new(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{} failed, so there is no server to benchmark against:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ops_per_s(side: &Value) -> f64 {
    side["ops_per_s"].as_f64().unwrap_or(0.0)
}

#[test]
fn bench_measures_every_case_against_the_raw_client_and_cleans_up() {
    ensure("ensure-redis");
    ensure("ensure-postgres");
    let pg_url = std::env::var("GEOSTATE_PG_URL").unwrap_or_else(|_| PG_DEFAULT_URL.into());
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_geostate"))
        .args([
            "bench",
            "--duration",
            "0.3",
            "--json",
            "--postgres-url",
            &pg_url,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("the geostate binary runs");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(took < Duration::from_secs(60), "the bench took {took:?}");
    let doc: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}\n{stderr}"));
    assert_eq!(doc["keys"], 1000, "{doc:#}");
    assert_eq!(doc["batch_keys"], 1000, "{doc:#}");
    assert_eq!(doc["failures"].as_array().map(Vec::len), Some(0), "{doc:#}");

    let stores = doc["stores"].as_array().expect("stores");
    let names: Vec<&str> = stores.iter().filter_map(|s| s["store"].as_str()).collect();
    assert_eq!(names, ["redis", "postgres"], "{doc:#}");
    for (store, concurrent) in [("redis", 50), ("postgres", 8)] {
        let report = stores.iter().find(|s| s["store"] == store).unwrap();
        let cases = report["cases"].as_array().expect("cases");
        let mut seen = Vec::new();
        for case in cases {
            let name = case["case"].as_str().unwrap();
            let tasks = case["tasks"].as_u64().unwrap();
            seen.push(format!("{name} x{tasks}"));
            for side in ["ours", "raw"] {
                let m = &case[side];
                assert!(
                    ops_per_s(m) > 0.0,
                    "{store} {name} x{tasks} {side}: no throughput: {m:#}"
                );
                assert_eq!(m["errors"], 0, "{store} {name} x{tasks} {side}: {m:#}");
                let (p50, p99) = (m["p50_us"].as_f64().unwrap(), m["p99_us"].as_f64().unwrap());
                assert!(0.0 < p50 && p50 <= p99, "{store} {name} {side}: {m:#}");
            }
            let ratio = case["ratio"]["ops_per_s"].as_f64().unwrap();
            let expected = ops_per_s(&case["ours"]) / ops_per_s(&case["raw"]);
            assert!(
                (ratio - expected).abs() <= 0.01 * expected + 0.001,
                "{case:#}"
            );
        }
        seen.sort();
        let mut wanted = vec![
            "batch x1".to_string(),
            "get x1".to_string(),
            format!("get x{concurrent}"),
            "merge_crdt x1".to_string(),
            format!("merge_crdt x{concurrent}"),
        ];
        wanted.sort();
        assert_eq!(seen, wanted, "{store}");
    }

    // Every target is reported, met or not.
    let targets = doc["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 5, "{doc:#}");
    assert!(targets.iter().all(|t| t["met"].is_boolean()), "{doc:#}");

    // Nothing of the run is left on the servers.
    let redis = stores.iter().find(|s| s["store"] == "redis").unwrap();
    for field in ["key_prefix", "raw_key_prefix"] {
        let prefix = redis["namespace"][field].as_str().expect("a key prefix");
        let left = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", "6379", "--scan", "--pattern"])
            .arg(format!("*{prefix}*"))
            .output()
            .expect("redis-cli runs");
        assert!(left.status.success());
        assert_eq!(String::from_utf8_lossy(&left.stdout).trim(), "", "{prefix}");
    }
    let pg = stores.iter().find(|s| s["store"] == "postgres").unwrap();
    let schema = pg["namespace"]["schema"].as_str().expect("a schema");
    let left = Command::new("psql")
        .args(["-X", "-At", "-d", &pg_url, "-c"])
        .arg(format!(
            "SELECT count(*) FROM pg_namespace WHERE nspname = '{schema}'"
        ))
        .stdin(Stdio::null())
        .output()
        .expect("psql runs");
    assert!(
        left.status.success(),
        "{}",
        String::from_utf8_lossy(&left.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&left.stdout).trim(),
        "0",
        "{schema}"
    );
}
