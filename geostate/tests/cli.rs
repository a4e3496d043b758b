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
