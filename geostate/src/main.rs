//! The `geostate` command line.
//!
//! `geostate simulate` runs a deterministic multi-region simulation (the built-in
//! partition-heal scenario, or a scenario file), checks every invariant and prints a report.
//! With `--store redis|postgres|mixed` every region runs on a real store of its own instead of
//! the embedded one (see `geostate_sim::stores`). Exit status: 0 when every invariant held, 1
//! when one failed (the output names the seed and the command replaying it) or a real store
//! could not be started, reached or removed, 2 for a usage error, an unreadable or invalid
//! scenario, or a plot that cannot be written, 130 after Ctrl-C (a real-store run removes its
//! servers and schemas first).
//!
//! `geostate bench` measures our Redis and PostgreSQL region stores beside the raw client on
//! the same servers and checks the performance targets (see `bench.rs`). Exit status: 0 when
//! every measurement ran, 1 when a store could not be reached or an operation failed, 2 for a
//! usage error, 130 after Ctrl-C (the run's data is removed first).

mod bench;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use geostate_sim::report::{Replay, Report};
use geostate_sim::stores::POSTGRES_URL_DEFAULT;
use geostate_sim::{checks, run, RunOptions, Scenario, SimError, StoreChoice, StoreOptions};
use serde_json::{json, Value};

/// Active-active, multi-region state: tools.
#[derive(Debug, Parser)]
#[command(name = "geostate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a deterministic multi-region simulation (partitions, loss, clock skew, crashes),
    /// check that every region converged with no acknowledged write lost, and report.
    ///
    /// With no flags it runs the built-in scenario: three regions, one isolated for ten
    /// seconds of the twenty-second fault phase, then healed. The same seed always gives the
    /// same report.
    ///
    /// With --store redis, postgres or mixed, each region runs on a real store of its own (a
    /// redis-server started per region on a free loopback port, a PostgreSQL schema per
    /// region), removed after the run; faults stay in the simulated network.
    Simulate(SimulateArgs),
    /// Measure merge_crdt, get and 1,000-key batches through a region over Redis and
    /// PostgreSQL beside raw SET / GET / upsert with the same client, and check the targets.
    ///
    /// Uses a key prefix (Redis) and a schema (PostgreSQL) unique to the run and removes them
    /// afterwards; nothing else on the servers is touched.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Args)]
struct SimulateArgs {
    /// Scenario file (TOML; see simulations/scenarios/). Default: the built-in partition-heal.
    #[arg(long, value_name = "PATH")]
    scenario: Option<PathBuf>,
    /// Seed (default: the scenario's `seed`).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Sweep N seeds starting at --seed (or the scenario's seed): one line per seed, then a
    /// summary.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000))]
    seeds: Option<u64>,
    /// Override the number of regions.
    #[arg(long, value_name = "N")]
    regions: Option<usize>,
    /// Override the number of keys written.
    #[arg(long, value_name = "N")]
    keys: Option<usize>,
    /// Override the length of the fault phase, in seconds of simulated time.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// The store every region runs on (default: the scenario's `store`, else memory). Real
    /// stores are much slower than the embedded one: the built-in scenario takes tens of
    /// seconds on them rather than under one.
    #[arg(long, value_enum, value_name = "STORE")]
    store: Option<StoreArg>,
    /// The PostgreSQL database in which PostgreSQL regions get their schemas (created for the
    /// run and dropped after it).
    #[arg(long, value_name = "URL", default_value = POSTGRES_URL_DEFAULT)]
    postgres_url: String,
    /// Print the JSON report instead of the text one.
    #[arg(long)]
    json: bool,
    /// Write an SVG plot of lag and divergence over time (in a sweep: of the first failing
    /// seed, or of the first seed when all pass).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

/// `--store`: which store the regions run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StoreArg {
    /// The embedded in-memory store (no servers; the default).
    Memory,
    /// A redis-server of its own per region (started on a free loopback port, then stopped).
    Redis,
    /// A PostgreSQL schema of its own per region (created, then dropped).
    Postgres,
    /// Even regions on Redis, odd regions on PostgreSQL.
    Mixed,
}

impl From<StoreArg> for StoreChoice {
    fn from(arg: StoreArg) -> Self {
        match arg {
            StoreArg::Memory => StoreChoice::Memory,
            StoreArg::Redis => StoreChoice::Redis,
            StoreArg::Postgres => StoreChoice::Postgres,
            StoreArg::Mixed => StoreChoice::Mixed,
        }
    }
}

/// Exit status for a failed invariant.
const EXIT_FAILED: u8 = 1;
/// Exit status for a usage or input error.
const EXIT_USAGE: u8 = 2;
/// Exit status after Ctrl-C (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;
/// What a run stopped by Ctrl-C prints.
const INTERRUPTED: &str = "interrupted (Ctrl-C); the run's servers and schemas were removed";

/// An error that stops the command before or outside the simulation itself.
struct UsageError(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Simulate(args) => simulate(&args),
        Command::Bench(args) => return bench::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(UsageError(message)) => {
            eprintln!("geostate simulate: {message}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// The scenario to run, with the command line's overrides applied and checked.
fn load_scenario(args: &SimulateArgs) -> Result<Scenario, UsageError> {
    let mut scenario = match &args.scenario {
        Some(path) => Scenario::from_file(path).map_err(|e| match e {
            SimError::Scenario(m) if m.starts_with("reading ") => UsageError(format!(
                "cannot read scenario file {}",
                m.trim_start_matches("reading ")
            )),
            SimError::Scenario(m) => {
                UsageError(format!("invalid scenario {}: {m}", path.display()))
            }
            e => UsageError(format!("invalid scenario {}: {e}", path.display())),
        })?,
        None => Scenario::default_scenario(),
    };
    if let Some(n) = args.regions {
        scenario.regions = n;
    }
    if let Some(n) = args.keys {
        scenario.keys = n;
    }
    if let Some(d) = args.duration {
        scenario.duration_s = d;
    }
    if let Some(store) = args.store {
        scenario.store = store.into();
    }
    scenario.validate().map_err(|e| {
        let message = match e {
            SimError::Scenario(m) => m,
            e => e.to_string(),
        };
        UsageError(format!(
            "invalid scenario (after command-line overrides): {message}"
        ))
    })?;
    Ok(scenario)
}

fn simulate(args: &SimulateArgs) -> Result<ExitCode, UsageError> {
    let scenario = load_scenario(args)?;
    let replay = Replay {
        scenario_path: args.scenario.as_ref().map(|p| p.display().to_string()),
        regions: args.regions,
        keys: args.keys,
        duration_s: args.duration,
        store: args.store.map(StoreChoice::from),
    };
    let seed = args.seed.unwrap_or(scenario.seed);
    if let Some(path) = &args.plot {
        // Find out now, not after the run, that the plot cannot be written.
        std::fs::File::create(path)
            .map_err(|e| UsageError(format!("cannot write the plot to {}: {e}", path.display())))?;
    }
    if scenario.store.is_real() {
        stop_on_ctrl_c();
    }
    match args.seeds {
        None => single(args, &scenario, &replay, seed),
        Some(n) => sweep(args, &scenario, &replay, seed, n),
    }
}

/// Handles Ctrl-C (SIGINT) from now on: rather than dying at once and leaving its servers and
/// schemas behind, a real-store run stops at its next event and removes them. Best effort: if
/// the handler cannot be installed, Ctrl-C keeps its default effect.
fn stop_on_ctrl_c() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        if runtime.block_on(tokio::signal::ctrl_c()).is_ok() {
            geostate_sim::stores::request_stop();
        }
    });
}

/// The run options for `seed`: real stores come from the command line's settings.
fn run_options(args: &SimulateArgs, seed: u64) -> RunOptions {
    RunOptions {
        stores: StoreOptions {
            postgres_url: args.postgres_url.clone(),
            ..StoreOptions::default()
        },
        ..RunOptions::new(seed)
    }
}

fn write_plot(path: &PathBuf, svg: &str) -> Result<(), UsageError> {
    std::fs::write(path, svg)
        .map_err(|e| UsageError(format!("cannot write the plot to {}: {e}", path.display())))
}

fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    // A closed pipe (`geostate simulate | head`) is not an error worth a panic.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn single(
    args: &SimulateArgs,
    scenario: &Scenario,
    replay: &Replay,
    seed: u64,
) -> Result<ExitCode, UsageError> {
    let outcome = match run(scenario, &run_options(args, seed)) {
        Ok(outcome) => outcome,
        Err(SimError::Scenario(m)) => return Err(UsageError(format!("invalid scenario: {m}"))),
        Err(e @ SimError::Store(_)) => {
            eprintln!("geostate simulate: seed {seed}: {e}");
            return Ok(ExitCode::from(EXIT_FAILED));
        }
        Err(SimError::Interrupted) => {
            eprintln!("geostate simulate: {INTERRUPTED}");
            return Ok(ExitCode::from(EXIT_INTERRUPTED));
        }
        Err(e) => {
            eprintln!("geostate simulate: FAIL: seed {seed}: {e}");
            eprintln!("replay: {}", replay.command(seed));
            return Ok(ExitCode::from(EXIT_FAILED));
        }
    };
    let results = checks::run_all(&outcome);
    let report = Report::new(scenario, &outcome, &results).with_replay(replay.clone());
    if args.json {
        print(&report.json_string());
        print("\n");
    } else {
        print(&report.text());
    }
    if let Some(path) = &args.plot {
        write_plot(path, &report.svg())?;
        let note = format!("plot        {}\n", path.display());
        if args.json {
            eprint!("{note}");
        } else {
            print(&note);
        }
    }
    if report.passed() {
        Ok(ExitCode::SUCCESS)
    } else {
        if args.json {
            eprintln!(
                "geostate simulate: FAIL: seed {seed}; replay: {}",
                report.replay_command()
            );
        }
        Ok(ExitCode::from(EXIT_FAILED))
    }
}

/// What a sweep keeps of one seed's run.
struct SeedResult {
    seed: u64,
    passed: bool,
    /// Stopped by Ctrl-C.
    interrupted: bool,
    line: String,
    json: Value,
    svg: Option<String>,
}

fn run_seed(
    args: &SimulateArgs,
    scenario: &Scenario,
    replay: &Replay,
    seed: u64,
    keep_svg: bool,
) -> SeedResult {
    match run(scenario, &run_options(args, seed)) {
        Ok(outcome) => {
            let results = checks::run_all(&outcome);
            let report = Report::new(scenario, &outcome, &results).with_replay(replay.clone());
            let passed = report.passed();
            let failed: Vec<&str> = report.failed_checks().map(|c| c.name.as_str()).collect();
            SeedResult {
                seed,
                passed,
                interrupted: false,
                line: report.summary_line(),
                json: json!({
                    "seed": seed,
                    "passed": passed,
                    "failed_checks": failed,
                    "acknowledged": outcome.acked.len(),
                    "convergence_ms": report.convergence_ms(),
                    "trace_hash": format!("{:016x}", outcome.trace_hash),
                    "replay": report.replay_command(),
                }),
                svg: (keep_svg || !passed).then(|| report.svg()),
            }
        }
        Err(e) => SeedResult {
            seed,
            passed: false,
            interrupted: e == SimError::Interrupted,
            line: format!("seed {seed:<6} FAIL  {e}  replay: {}", replay.command(seed)),
            json: json!({
                "seed": seed,
                "passed": false,
                "error": e.to_string(),
                "replay": replay.command(seed),
            }),
            svg: None,
        },
    }
}

fn sweep(
    args: &SimulateArgs,
    scenario: &Scenario,
    replay: &Replay,
    first: u64,
    count: u64,
) -> Result<ExitCode, UsageError> {
    let end = first.checked_add(count).ok_or_else(|| {
        UsageError(format!(
            "--seed {first} with --seeds {count} runs past the largest seed"
        ))
    })?;
    let workers = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(usize::try_from(count).unwrap_or(usize::MAX))
        .max(1);
    let next = AtomicU64::new(first);
    let want_svg = args.plot.is_some();
    let (tx, rx) = mpsc::channel::<SeedResult>();
    let mut results: Vec<SeedResult> = Vec::new();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let tx = tx.clone();
            let next = &next;
            scope.spawn(move || loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end || geostate_sim::stores::stop_requested() {
                    break;
                }
                let result = run_seed(args, scenario, replay, seed, want_svg && seed == first);
                if tx.send(result).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        // Print in seed order as results arrive.
        let mut pending: BTreeMap<u64, SeedResult> = BTreeMap::new();
        let mut expected = first;
        for result in rx {
            pending.insert(result.seed, result);
            while let Some(result) = pending.remove(&expected) {
                if !args.json {
                    print(&format!("{}\n", result.line));
                }
                results.push(result);
                expected += 1;
            }
        }
        results.extend(pending.into_values());
    });
    if results.iter().any(|r| r.interrupted) {
        eprintln!("geostate simulate: {INTERRUPTED}");
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    }
    let failed: Vec<&SeedResult> = results.iter().filter(|r| !r.passed).collect();
    let passed = results.len() - failed.len();
    if args.json {
        let doc = json!({
            "scenario": scenario.name,
            "first_seed": first,
            "seeds": count,
            "passed": passed,
            "failed": failed.len(),
            "failed_seeds": failed.iter().map(|r| r.seed).collect::<Vec<_>>(),
            "results": results.iter().map(|r| r.json.clone()).collect::<Vec<_>>(),
        });
        print(&serde_json::to_string_pretty(&doc).unwrap_or_default());
        print("\n");
    } else {
        print(&format!(
            "\nsweep       {}: {count} seeds from {first}: {passed} passed, {} failed\n",
            scenario.name,
            failed.len()
        ));
        for r in &failed {
            print(&format!("replay      {}\n", replay.command(r.seed)));
        }
    }
    if let Some(path) = &args.plot {
        let chosen = failed
            .iter()
            .copied()
            .find(|r| r.svg.is_some())
            .or_else(|| results.iter().find(|r| r.seed == first));
        match chosen.and_then(|r| r.svg.as_deref().map(|svg| (r.seed, svg))) {
            Some((seed, svg)) => {
                write_plot(path, svg)?;
                let note = format!("plot        {} (seed {seed})\n", path.display());
                if args.json {
                    eprint!("{note}");
                } else {
                    print(&note);
                }
            }
            None => eprintln!("geostate simulate: no run produced a plot"),
        }
    }
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        if args.json {
            for r in &failed {
                eprintln!(
                    "geostate simulate: FAIL: seed {}; replay: {}",
                    r.seed,
                    replay.command(r.seed)
                );
            }
        }
        Ok(ExitCode::from(EXIT_FAILED))
    }
}
