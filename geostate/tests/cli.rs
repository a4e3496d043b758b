//! The `geostate` binary, run as a user runs it: `geostate simulate` with its flags, exit codes
//! and outputs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn geostate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_geostate"))
}

/// The repository's scenario directory.
fn scenarios() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../simulations/scenarios")
}

/// A scratch path unique to this test process.
fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("geostate-cli-{}-{name}", std::process::id()))
}

fn run(args: &[&str]) -> Output {
    geostate()
        .args(args)
        .output()
        .expect("the geostate binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const SMALL: [&str; 5] = ["simulate", "--duration", "2", "--keys", "50"];

#[test]
fn default_scenario_passes_from_any_directory() {
    // The built-in scenario needs no file: run it from a directory with none.
    let out = geostate()
        .args(SMALL)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(text.contains("partition-heal"), "{text}");
    assert!(text.contains("convergence "), "{text}");
    assert!(text.contains("after heal"), "{text}");
    assert!(text.contains("0 lost"), "{text}");
    assert!(text.contains("PASS  counters"), "{text}");
    assert!(text.contains("result      PASS"), "{text}");
    // Same seed, same report.
    let again = run(&SMALL);
    assert_eq!(stdout(&again), text);
}

#[test]
fn scenario_file_and_seed() {
    let path = scenarios().join("partition-heal.toml");
    let path = path.to_str().unwrap();
    let mut args = SMALL.to_vec();
    args.extend(["--scenario", path, "--seed", "9"]);
    let out = run(&args);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("geostate simulate: partition-heal\n"),
        "{text}"
    );
    assert!(text.contains("seed        9\n"), "{text}");
}

#[test]
fn json_report_parses() {
    let mut args = SMALL.to_vec();
    args.extend(["--json", "--seed", "4"]);
    let out = run(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(v["seed"], 4);
    assert_eq!(v["passed"], true);
    assert_eq!(v["writes"]["lost"], 0);
    assert!(v["writes"]["acknowledged"].as_u64().unwrap() > 0);
    assert!(v["convergence_ms"].is_u64());
    assert!(v["bytes"]["feed"].as_u64().unwrap() > 0);
    assert_eq!(v["lag"].as_array().unwrap().len(), 6);
    assert_eq!(v["checks"].as_array().unwrap().len(), 7);
    assert_eq!(
        v["replay"],
        "geostate simulate --seed 4 --keys 50 --duration 2"
    );
}

#[test]
fn plot_writes_an_svg() {
    let path = scratch("plot.svg");
    // Long enough for the built-in isolation (from 5 s) to start before the heal.
    let out = run(&[
        "simulate",
        "--duration",
        "6",
        "--keys",
        "50",
        "--plot",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let svg = std::fs::read_to_string(&path).expect("the plot was written");
    let _ = std::fs::remove_file(&path);
    assert!(svg.starts_with("<svg"), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("id=\"lag-p99\"") && svg.contains("id=\"divergence\""));
    assert!(svg.contains("isolate us-east"));
    assert!(svg.contains("id=\"heal\"") && svg.contains("id=\"converged\""));
    assert!(stdout(&out).contains("plot        "));
}

#[test]
fn sweep_prints_one_line_per_seed() {
    let mut args = SMALL.to_vec();
    args.extend(["--seeds", "3", "--seed", "5"]);
    let out = run(&args);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("seed ")).collect();
    assert_eq!(lines.len(), 3, "{text}");
    for (line, seed) in lines.iter().zip(5..) {
        assert!(line.starts_with(&format!("seed {seed} ")), "{line}");
        assert!(line.contains("PASS"), "{line}");
    }
    assert!(
        text.contains("3 seeds from 5: 3 passed, 0 failed"),
        "{text}"
    );
    let mut args = SMALL.to_vec();
    args.extend(["--seeds", "2", "--json"]);
    let out = run(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(v["passed"], 2);
    assert_eq!(v["failed"], 0);
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    assert_eq!(v["results"][1]["seed"], 2);
}

#[test]
fn bad_input_exits_2_with_a_message() {
    let out = run(&["simulate", "--scenario", "/definitely/not/here.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("cannot read scenario file /definitely/not/here.toml"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let path = scratch("invalid.toml");
    std::fs::write(
        &path,
        "name = \"x\"\nregions = 3\nkeys = 10\nduration_s = 1.0\nbogus = 1\n",
    )
    .unwrap();
    let out = run(&["simulate", "--scenario", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown field `bogus`"),
        "{}",
        stderr(&out)
    );

    let out = run(&["simulate", "--regions", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("regions must be 2..=64"),
        "{}",
        stderr(&out)
    );

    let out = run(&["simulate", "--seeds", "0"]);
    assert_eq!(out.status.code(), Some(2));

    let out = run(&["simulate", "--plot", "/definitely/not/here/plot.svg"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot write the plot"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty(), "fails before running");
}

#[test]
fn a_failed_invariant_exits_1_with_seed_and_replay() {
    // No time at all to converge after the heal: the convergence check fails.
    let path = scratch("no-time.toml");
    std::fs::write(
        &path,
        // 500 ms links: writes made just before the heal cannot have arrived by the first
        // convergence check 100 ms after it, whatever the protocol.
        "name = \"no-time\"\nregions = 3\nkeys = 50\nduration_s = 2.0\nconverge_timeout_s = 0.001\n[network]\nlatency_ms = 500\n",
    )
    .unwrap();
    let path_str = path.to_str().unwrap();
    let out = run(&["simulate", "--scenario", path_str, "--seed", "3"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}\n{}", stderr(&out));
    assert!(text.contains("FAIL  convergence"), "{text}");
    assert!(text.contains("(seed 3)"), "{text}");
    assert!(
        text.contains(&format!(
            "replay      geostate simulate --scenario {path_str} --seed 3"
        )),
        "{text}"
    );
    let out = run(&["simulate", "--scenario", path_str, "--seeds", "2"]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("2 seeds from 1: 0 passed, 2 failed"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn every_scenario_file_is_valid_and_described() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(scenarios()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let scenario = geostate_sim::Scenario::from_file(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                !scenario.description.is_empty(),
                "{} has no description",
                path.display()
            );
            names.push(path.file_stem().unwrap().to_string_lossy().into_owned());
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "clock-skew",
            "flapping-lossy",
            "majority-split",
            "one-way",
            "partition-heal",
            "replicator-crashes",
            "ring-5",
            "trimmed-feed",
        ]
    );
}

#[test]
fn every_scenario_file_passes_at_full_size() {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(scenarios())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        let out = run(&["simulate", "--scenario", path.to_str().unwrap()]);
        let text = stdout(&out);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}:\n{text}\n{}",
            path.display(),
            stderr(&out)
        );
        assert!(text.contains("0 lost"), "{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Real stores: each region on its own redis-server or PostgreSQL schema. Needs redis-server and
// PostgreSQL at GEOSTATE_PG_URL (default postgres://postgres@127.0.0.1:5432/test), made sure of
// by scripts/ensure-redis and scripts/ensure-postgres, which these tests run first. Never
// skips: without a server the test fails and says why.

const PG_DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn pg_url() -> String {
    std::env::var("GEOSTATE_PG_URL").unwrap_or_else(|_| PG_DEFAULT_URL.into())
}

/// Runs `scripts/ensure-redis` and `scripts/ensure-postgres`; fails with their message.
fn ensure_servers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for script in ["ensure-redis", "ensure-postgres"] {
        let path = root.join("scripts").join(script);
        let out = Command::new(&path)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
        assert!(
            out.status.success(),
            "{} failed, so there is no server to simulate on:\n{}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn store_flag_runs_regions_on_real_stores() {
    ensure_servers();
    let url = pg_url();
    let mut args = SMALL.to_vec();
    args.extend(["--store", "mixed", "--postgres-url", &url, "--seed", "6"]);
    let out = run(&args);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("stores      us-east redis, eu-west postgres, ap-south redis"),
        "{text}"
    );
    assert!(text.contains("0 lost"), "{text}");
    assert!(text.contains("result      PASS"), "{text}");

    let mut args = SMALL.to_vec();
    args.extend(["--store", "redis", "--json", "--seed", "6"]);
    let out = run(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(v["passed"], true);
    assert_eq!(v["scenario"]["store"], "redis");
    let stores = v["stores"].as_array().unwrap();
    assert_eq!(stores.len(), 3);
    for s in stores {
        assert_eq!(s["store"], "redis", "{s}");
        assert!(
            s["location"]
                .as_str()
                .unwrap()
                .starts_with("redis-server 127.0.0.1:"),
            "{s}"
        );
    }
    assert_eq!(
        v["replay"],
        "geostate simulate --seed 6 --keys 50 --duration 2 --store redis"
    );
    // The same run as on the embedded store, event for event.
    let mut args = SMALL.to_vec();
    args.extend(["--json", "--seed", "6"]);
    let memory: serde_json::Value = serde_json::from_slice(&run(&args).stdout).unwrap();
    assert_eq!(memory["stores"][0]["store"], "memory");
    assert_eq!(v["trace_hash"], memory["trace_hash"]);
}

#[test]
fn store_errors_exit_with_a_message() {
    let out = run(&["simulate", "--store", "mysql"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid value 'mysql'"),
        "{}",
        stderr(&out)
    );

    let path = scratch("bad-store.toml");
    std::fs::write(
        &path,
        "name = \"x\"\nregions = 3\nkeys = 10\nduration_s = 1.0\nstore = \"mysql\"\n",
    )
    .unwrap();
    let out = run(&["simulate", "--scenario", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown variant `mysql`"),
        "{}",
        stderr(&out)
    );

    // Nothing answers on port 1: the run cannot start, says why, and exits 1.
    let mut args = SMALL.to_vec();
    args.extend([
        "--store",
        "postgres",
        "--postgres-url",
        "postgres://postgres@127.0.0.1:1/test",
    ]);
    let out = run(&args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot connect to PostgreSQL at"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty());
}

/// Runs one statement with `psql`; its unaligned output.
fn psql(sql: &str) -> String {
    let out = Command::new("psql")
        .arg(pg_url())
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
        .output()
        .unwrap_or_else(|e| panic!("cannot run psql ({e}); run scripts/ensure-postgres"));
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Processes whose working directory is one of `pid`'s Redis region directories.
fn redis_servers_of(pid: u32) -> Vec<String> {
    let dir = format!("geostate-sim-{pid}_");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path().join("cwd")).ok())
        .map(|cwd| cwd.display().to_string())
        .filter(|cwd| cwd.contains(&dir))
        .collect()
}

#[test]
fn ctrl_c_stops_a_real_store_run_and_removes_its_stores() {
    ensure_servers();
    let url = pg_url();
    // The full built-in scenario: long enough to be interrupted.
    let child = geostate()
        .args(["simulate", "--store", "mixed", "--postgres-url", &url])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let schemas = format!("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'gs_sim_{pid}_%'");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while psql(&schemas) == "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "the run created no schema within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let killed = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}\n{}", stdout(&out));
    assert!(err.contains("interrupted (Ctrl-C)"), "{err}");
    assert_eq!(psql(&schemas), "0", "schemas left behind");
    assert_eq!(redis_servers_of(pid), Vec::<String>::new());
    let dirs: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("geostate-sim-{pid}_")))
        .collect();
    assert!(dirs.is_empty(), "{dirs:?}");
}
