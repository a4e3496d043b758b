//! `geostate bench`: our write and read paths against the raw client on the same servers.
//!
//! For each store (Redis, PostgreSQL) and each case, the same measurement runs twice in the
//! same process, one after the other: once through a [`Region`] over our backend ("ours"), once
//! as the simplest raw command that stores or fetches the same bytes with the same client
//! library ("raw"): a redis-rs multiplexed `ConnectionManager` (what `RedisBackend` uses) for
//! `SET` / `GET` / a pipeline of `SET`s, an sqlx pool for a single-statement upsert / `SELECT`
//! / one multi-row upsert. The ratio ours/raw is reported, and the targets are checked.
//!
//! Isolation: Redis keys live under a key prefix unique to the run (our namespace is purged
//! and the raw keys deleted afterwards, nothing else is touched); PostgreSQL tables live in a
//! schema unique to the run, dropped afterwards.
//!
//! Every measurement is bounded by time (`--duration`) and by an operation count, and the
//! whole measurement is abandoned if it has not finished [`GRACE`] after its deadline.

use std::collections::BTreeMap;
use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use geostate::backends::postgres::{redact_url, PostgresBackend, PostgresConfig};
use geostate::backends::redis::{RedisBackend, RedisConfig};
use geostate::{
    envelope, ActorId, CounterOp, Crdt, Hlc, Layout, MemoryBackend, Op, PnCounter, Region,
    RegionConfig, RegionId, StateBackend, TypeTag,
};
use hdrhistogram::Histogram;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::{json, Value};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, Row};
use tokio::task::JoinSet;

/// Counter keys the single-key cases spread over (so hot-key contention does not dominate).
const KEYS: usize = 1_000;
/// Keys of one batch.
const BATCH_KEYS: usize = 1_000;
/// Concurrent tasks of the concurrent Redis cases.
const REDIS_TASKS: usize = 50;
/// Concurrent tasks (clients) of the concurrent PostgreSQL cases.
const POSTGRES_TASKS: usize = 8;
/// Most operations one measurement of single operations makes.
const OPS_MAX: u64 = 2_000_000;
/// Most batches one batch measurement makes.
const BATCHES_MAX: u64 = 10_000;
/// Longest warm-up of a measurement (each task also stops after [`WARMUP_OPS_MAX`]).
const WARMUP_MAX: Duration = Duration::from_millis(200);
/// Most warm-up operations per task.
const WARMUP_OPS_MAX: u64 = 50;
/// How long after its deadline a measurement may take to finish before it is abandoned.
const GRACE: Duration = Duration::from_secs(30);
/// Connections of the raw PostgreSQL pool (as many as our backend's default pool).
const RAW_POOL_MAX: u32 = 16;
/// Exit status after Ctrl-C (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;
/// Assumed clock-tick rate of `/proc/self/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: u64 = 100;

/// Which stores to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum StoreChoice {
    /// Redis only.
    Redis,
    /// PostgreSQL only.
    Postgres,
    /// Both.
    All,
}

/// `geostate bench` arguments.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Which store(s) to measure.
    #[arg(long, value_enum, default_value_t = StoreChoice::All)]
    store: StoreChoice,
    /// The Redis server (standalone).
    #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// The PostgreSQL database (a schema unique to the run is created in it and dropped).
    #[arg(
        long,
        value_name = "URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// Length of each measurement, in seconds (there are about a dozen per store).
    #[arg(long, value_name = "SECS", default_value_t = 3.0, value_parser = parse_secs)]
    duration: f64,
    /// Print a JSON document instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_secs(text: &str) -> Result<f64, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if secs.is_finite() && secs > 0.0 && secs <= 600.0 {
        Ok(secs)
    } else {
        Err(format!("{text} must be above 0 and at most 600"))
    }
}

/// Runs the benchmark and prints its report. Exit status 0 when every measurement ran
/// (whether or not the targets are met), 1 when a store could not be set up or an operation
/// failed, 130 after Ctrl-C (the run's keys and schema are removed first).
pub(crate) fn run(args: &BenchArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("geostate bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let duration = Duration::from_secs_f64(args.duration);
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    let mut interrupted = false;
    runtime.block_on(async {
        if matches!(args.store, StoreChoice::Redis | StoreChoice::All) {
            match bench_redis(&args.redis_url, duration).await {
                Ok(report) => reports.push(report),
                Err(e) => {
                    interrupted = e.starts_with(INTERRUPTED);
                    failures.push(format!("redis: {e}"));
                }
            }
        }
        if !interrupted && matches!(args.store, StoreChoice::Postgres | StoreChoice::All) {
            match bench_postgres(&args.postgres_url, duration).await {
                Ok(report) => reports.push(report),
                Err(e) => {
                    interrupted = e.starts_with(INTERRUPTED);
                    failures.push(format!("postgres: {e}"));
                }
            }
        }
    });
    for report in &reports {
        failures.extend(report.failures.iter().cloned());
    }
    if args.json {
        let doc = json!({
            "duration_s": args.duration,
            "keys": KEYS,
            "batch_keys": BATCH_KEYS,
            "stores": reports.iter().map(StoreReport::json).collect::<Vec<_>>(),
            "targets": reports
                .iter()
                .flat_map(|r| r.targets.iter().map(Target::json))
                .collect::<Vec<_>>(),
            "failures": failures,
        });
        crate::print(&serde_json::to_string_pretty(&doc).unwrap_or_default());
        crate::print("\n");
    } else {
        crate::print(&text(args.duration, &reports));
    }
    for failure in &failures {
        eprintln!("geostate bench: {failure}");
    }
    if interrupted {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring

/// How one measurement runs.
#[derive(Clone)]
struct Spec {
    tasks: usize,
    duration: Duration,
    ops_max: u64,
    warmup: bool,
    /// A Redis connection through which the server's CPU time and commands are read right
    /// before and right after the measured phase (after the warm-up).
    probe: Option<ConnectionManager>,
}

impl Spec {
    fn ops(tasks: usize, duration: Duration) -> Self {
        Self {
            tasks,
            duration,
            ops_max: OPS_MAX,
            warmup: true,
            probe: None,
        }
    }

    fn batches(duration: Duration) -> Self {
        Self {
            tasks: 1,
            duration,
            ops_max: BATCHES_MAX,
            warmup: false,
            probe: None,
        }
    }

    /// This spec, reading the Redis server's counters around the measured phase.
    fn probed(mut self, conn: &ConnectionManager) -> Self {
        self.probe = Some(conn.clone());
        self
    }
}

/// What one measurement saw.
#[derive(Debug)]
struct Measured {
    tasks: usize,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    /// Latencies of the successful operations, in nanoseconds.
    hist: Histogram<u64>,
    /// CPU time of this process (user + system) during the measurement.
    client_cpu: Option<Duration>,
    /// CPU time of the server during the measurement (Redis: `INFO cpu`).
    server_cpu: Option<Duration>,
    /// Commands the server ran during the measurement, with their calls and microseconds
    /// (Redis: `INFO commandstats`, which also counts the commands scripts call), most
    /// time first.
    server_commands: Vec<(String, u64, u64)>,
}

impl Measured {
    fn ops_per_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        }
    }

    fn quantile_us(&self, q: f64) -> f64 {
        if self.hist.is_empty() {
            return 0.0;
        }
        self.hist.value_at_quantile(q) as f64 / 1_000.0
    }

    fn p50_us(&self) -> f64 {
        self.quantile_us(0.50)
    }

    fn p99_us(&self) -> f64 {
        self.quantile_us(0.99)
    }

    fn per_op_us(&self, cpu: Option<Duration>) -> Option<f64> {
        let attempts = self.ops + self.errors;
        cpu.filter(|_| attempts > 0)
            .map(|cpu| cpu.as_secs_f64() * 1e6 / attempts as f64)
    }

    /// The server's commands per operation: (name, calls, microseconds), most time first.
    fn commands_per_op(&self) -> Option<Vec<(String, f64, f64)>> {
        let attempts = (self.ops + self.errors) as f64;
        if self.server_commands.is_empty() || attempts == 0.0 {
            return None;
        }
        Some(
            self.server_commands
                .iter()
                .map(|(name, calls, usec)| {
                    (
                        name.clone(),
                        *calls as f64 / attempts,
                        *usec as f64 / attempts,
                    )
                })
                .collect(),
        )
    }

    fn json(&self, op: &str) -> Value {
        json!({
            "op": op,
            "tasks": self.tasks,
            "ops": self.ops,
            "errors": self.errors,
            "first_error": self.first_error,
            "elapsed_s": round(self.elapsed.as_secs_f64(), 4),
            "ops_per_s": round(self.ops_per_s(), 1),
            "p50_us": round(self.p50_us(), 1),
            "p99_us": round(self.p99_us(), 1),
            "max_us": round(self.hist.max() as f64 / 1_000.0, 1),
            "client_cpu_us_per_op": self.per_op_us(self.client_cpu).map(|v| round(v, 1)),
            "server_cpu_us_per_op": self.per_op_us(self.server_cpu).map(|v| round(v, 1)),
            "server_commands_per_op": self.commands_per_op().map(|commands| {
                commands
                    .into_iter()
                    .map(|(name, calls, us)| {
                        json!({ "command": name, "calls": round(calls, 2), "us": round(us, 2) })
                    })
                    .collect::<Vec<_>>()
            }),
        })
    }
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

fn histogram() -> Result<Histogram<u64>, String> {
    // 1 ns to 1 hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| format!("cannot make a histogram: {e}"))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// CPU time (user + system) this process has used, from `/proc/self/stat` (Linux only).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1_000 / USER_HZ))
}

/// The key index that task `task` of `tasks` uses for its `i`-th operation: each task starts
/// at its own offset and walks the keys in order, so tasks rarely meet on a key.
fn key_index(task: usize, tasks: usize, i: u64) -> usize {
    let start = task * (KEYS / tasks.max(1)).max(1);
    (start + (i % KEYS as u64) as usize) % KEYS
}

/// Runs `op` from `spec.tasks` tasks until the duration has passed or `spec.ops_max`
/// operations were started, after a short warm-up (not recorded). `op` gets the index of the
/// key to use. Failed operations are counted (and the first error kept), not timed.
async fn measure<F, Fut>(spec: Spec, op: F) -> Result<Measured, String>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let op = Arc::new(op);
    let tasks = spec.tasks.max(1);
    if spec.warmup {
        let warmup = (spec.duration / 10).min(WARMUP_MAX);
        let until = Instant::now() + warmup;
        let mut set = JoinSet::new();
        for task in 0..tasks {
            let op = Arc::clone(&op);
            set.spawn(async move {
                let mut i = 0;
                while i < WARMUP_OPS_MAX && (i == 0 || Instant::now() < until) {
                    op(key_index(task, tasks, i)).await?;
                    i += 1;
                }
                Ok::<(), String>(())
            });
        }
        join_all(set, until + GRACE)
            .await?
            .into_iter()
            .collect::<Result<Vec<()>, String>>()
            .map_err(|e| format!("warm-up failed: {e}"))?;
    }
    let server_before = match &spec.probe {
        Some(conn) => Some(ServerSnapshot::take(conn).await),
        None => None,
    };
    let ops_max = spec.ops_max;
    let started = Arc::new(AtomicU64::new(0));
    let cpu_before = process_cpu();
    let start = Instant::now();
    let deadline = start + spec.duration;
    let mut set = JoinSet::new();
    for task in 0..tasks {
        let op = Arc::clone(&op);
        let started = Arc::clone(&started);
        let mut hist = histogram()?;
        set.spawn(async move {
            let mut errors = 0u64;
            let mut first_error = None;
            let mut i = 0u64;
            while Instant::now() < deadline && started.fetch_add(1, Ordering::Relaxed) < ops_max {
                let t0 = Instant::now();
                match op(key_index(task, tasks, i)).await {
                    Ok(()) => hist.saturating_record(nanos(t0.elapsed())),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
                i += 1;
            }
            (hist, errors, first_error, Instant::now())
        });
    }
    let results = join_all(set, deadline + GRACE).await?;
    let cpu_after = process_cpu();
    let server_after = match &spec.probe {
        Some(conn) => Some(ServerSnapshot::take(conn).await),
        None => None,
    };
    let mut total = histogram()?;
    let mut errors = 0;
    let mut first_error = None;
    let mut end = start;
    for (hist, task_errors, task_error, task_end) in results {
        total
            .add(&hist)
            .map_err(|e| format!("cannot merge histograms: {e}"))?;
        errors += task_errors;
        if first_error.is_none() {
            first_error = task_error;
        }
        end = end.max(task_end);
    }
    let mut measured = Measured {
        tasks,
        ops: total.len(),
        errors,
        first_error,
        elapsed: end - start,
        hist: total,
        client_cpu: cpu_before
            .zip(cpu_after)
            .map(|(before, after)| after.saturating_sub(before)),
        server_cpu: None,
        server_commands: Vec::new(),
    };
    if let (Some(before), Some(after)) = (server_before, server_after) {
        after.since(&before, &mut measured);
    }
    Ok(measured)
}

/// Waits for every task of `set`, at most until `limit` (then aborts them).
async fn join_all<T: 'static>(mut set: JoinSet<T>, limit: Instant) -> Result<Vec<T>, String> {
    let mut out = Vec::with_capacity(set.len());
    let collect = async {
        while let Some(joined) = set.join_next().await {
            out.push(joined.map_err(|e| format!("a measuring task failed: {e}"))?);
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout_at(limit.into(), collect).await {
        Ok(result) => result.map(|()| out),
        Err(_) => {
            set.abort_all();
            Err(format!(
                "a measurement did not finish within {} s of its deadline; abandoned",
                GRACE.as_secs()
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reports

/// What a case's operations are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    /// Single operations.
    Op,
    /// Batches of [`BATCH_KEYS`] keys.
    Batch,
}

/// One case: ours beside raw.
#[derive(Debug)]
struct Case {
    name: &'static str,
    unit: Unit,
    ours_op: String,
    ours: Measured,
    raw_op: String,
    raw: Measured,
}

impl Case {
    fn throughput_ratio(&self) -> f64 {
        ratio(self.ours.ops_per_s(), self.raw.ops_per_s())
    }

    fn p50_ratio(&self) -> f64 {
        ratio(self.ours.p50_us(), self.raw.p50_us())
    }

    fn p99_ratio(&self) -> f64 {
        ratio(self.ours.p99_us(), self.raw.p99_us())
    }

    fn json(&self) -> Value {
        json!({
            "case": self.name,
            "tasks": self.ours.tasks,
            "unit": match self.unit {
                Unit::Op => "op".to_string(),
                Unit::Batch => format!("batch of {BATCH_KEYS} keys"),
            },
            "ours": self.ours.json(&self.ours_op),
            "raw": self.raw.json(&self.raw_op),
            "ratio": {
                "ops_per_s": round(self.throughput_ratio(), 3),
                "p50": round(self.p50_ratio(), 3),
                "p99": round(self.p99_ratio(), 3),
            },
        })
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// Which way a target bounds its figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bound {
    AtLeast,
    AtMost,
    Below,
}

/// One of the targets, checked.
#[derive(Debug)]
struct Target {
    store: &'static str,
    what: String,
    measured: f64,
    bound: Bound,
    limit: f64,
    unit: &'static str,
}

impl Target {
    fn met(&self) -> bool {
        match self.bound {
            Bound::AtLeast => self.measured >= self.limit,
            Bound::AtMost => self.measured <= self.limit,
            Bound::Below => self.measured < self.limit,
        }
    }

    fn rule(&self) -> String {
        let op = match self.bound {
            Bound::AtLeast => ">=",
            Bound::AtMost => "<=",
            Bound::Below => "<",
        };
        format!("{op} {}{}", self.limit, self.unit)
    }

    fn json(&self) -> Value {
        json!({
            "store": self.store,
            "target": self.what,
            "rule": self.rule(),
            "measured": round(self.measured, 3),
            "unit": self.unit.trim(),
            "met": self.met(),
        })
    }
}

/// Everything measured on one store.
#[derive(Debug)]
struct StoreReport {
    store: &'static str,
    url: String,
    /// Where this run's data lives, for the text report.
    namespace: String,
    /// The same, for the JSON document (`key_prefix`, `raw_key_prefix` or `schema`).
    namespace_json: Value,
    cases: Vec<Case>,
    /// Extra measurements that explain the figures.
    diagnostics: Vec<(String, String, Measured)>,
    /// Lines of "where the time goes".
    notes: Vec<String>,
    /// Counters of the backend over the run.
    counters: Value,
    targets: Vec<Target>,
    failures: Vec<String>,
}

impl StoreReport {
    fn case(&self, name: &str, tasks: usize) -> Option<&Case> {
        self.cases
            .iter()
            .find(|c| c.name == name && c.ours.tasks == tasks)
    }

    fn json(&self) -> Value {
        json!({
            "store": self.store,
            "url": self.url,
            "namespace": self.namespace_json,
            "cases": self.cases.iter().map(Case::json).collect::<Vec<_>>(),
            "diagnostics": self
                .diagnostics
                .iter()
                .map(|(name, op, m)| {
                    let mut v = m.json(op);
                    if let Some(obj) = v.as_object_mut() {
                        obj.insert("name".into(), json!(name));
                    }
                    v
                })
                .collect::<Vec<_>>(),
            "where_the_time_goes": self.notes,
            "counters": self.counters,
        })
    }

    /// Records a failure for every side of a measurement that had failed operations.
    fn check_errors(&mut self) {
        let mut failures = Vec::new();
        for case in &self.cases {
            for (side, m) in [("ours", &case.ours), ("raw", &case.raw)] {
                if m.errors > 0 {
                    failures.push(format!(
                        "{} {} x{} ({side}): {} of {} operations failed; first: {}",
                        self.store,
                        case.name,
                        m.tasks,
                        m.errors,
                        m.errors + m.ops,
                        m.first_error.as_deref().unwrap_or("?")
                    ));
                }
            }
        }
        for (name, _, m) in &self.diagnostics {
            if m.errors > 0 {
                failures.push(format!(
                    "{} {name}: {} operations failed; first: {}",
                    self.store,
                    m.errors,
                    m.first_error.as_deref().unwrap_or("?")
                ));
            }
        }
        self.failures.extend(failures);
    }
}

fn us(value: f64) -> String {
    if value >= 1_000_000.0 {
        format!("{:.2}s", value / 1e6)
    } else if value >= 1_000.0 {
        format!("{:.2}ms", value / 1e3)
    } else {
        format!("{value:.0}µs")
    }
}

fn per_second(value: f64) -> String {
    let whole = value.round() as u64;
    if value < 100.0 {
        return format!("{value:.1}");
    }
    let digits = whole.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn times(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.2}x")
    } else {
        "-".to_string()
    }
}

fn text(duration_s: f64, reports: &[StoreReport]) -> String {
    let mut out = format!(
        "geostate bench: {duration_s} s per measurement; single-key cases spread over {KEYS} \
         counter keys; batches of {BATCH_KEYS} keys\n"
    );
    for r in reports {
        out.push_str(&format!("\n{}  {}  ({})\n", r.store, r.url, r.namespace));
        out.push_str(&format!(
            "  {:<11} {:>5}  {:>10} {:>8} {:>8}  {:<26} {:>10} {:>8} {:>8}  {:>7} {:>7} {:>7}\n",
            "case",
            "tasks",
            "ours /s",
            "p50",
            "p99",
            "raw",
            "raw /s",
            "p50",
            "p99",
            "/s",
            "p50",
            "p99"
        ));
        out.push_str(&format!(
            "  {:<11} {:>5}  {:>10} {:>8} {:>8}  {:<26} {:>10} {:>8} {:>8}  {:>23}\n",
            "", "", "", "", "", "", "", "", "", "ratio ours/raw"
        ));
        for c in &r.cases {
            let name = match c.unit {
                Unit::Op => c.name.to_string(),
                Unit::Batch => format!("{}*", c.name),
            };
            out.push_str(&format!(
                "  {:<11} {:>5}  {:>10} {:>8} {:>8}  {:<26} {:>10} {:>8} {:>8}  {:>7} {:>7} {:>7}\n",
                name,
                c.ours.tasks,
                per_second(c.ours.ops_per_s()),
                us(c.ours.p50_us()),
                us(c.ours.p99_us()),
                c.raw_op,
                per_second(c.raw.ops_per_s()),
                us(c.raw.p50_us()),
                us(c.raw.p99_us()),
                times(c.throughput_ratio()),
                times(c.p50_ratio()),
                times(c.p99_ratio()),
            ));
        }
        if r.cases.iter().any(|c| c.unit == Unit::Batch) {
            out.push_str(&format!(
                "  * per batch of {BATCH_KEYS} keys: /s is batches per second, p50/p99 per batch\n"
            ));
        }
        if !r.diagnostics.is_empty() {
            out.push_str("  diagnostics:\n");
            let width = r
                .diagnostics
                .iter()
                .map(|(name, _, _)| name.chars().count())
                .max()
                .unwrap_or(0);
            for (name, _, m) in &r.diagnostics {
                out.push_str(&format!(
                    "    {name:<width$}  x{:<3} {:>10}/s  p50 {:>8}  p99 {:>8}\n",
                    m.tasks,
                    per_second(m.ops_per_s()),
                    us(m.p50_us()),
                    us(m.p99_us())
                ));
            }
        }
        if !r.notes.is_empty() {
            out.push_str("  where the time goes:\n");
            for note in &r.notes {
                out.push_str(&format!("    {note}\n"));
            }
        }
    }
    let targets: Vec<&Target> = reports.iter().flat_map(|r| &r.targets).collect();
    if !targets.is_empty() {
        out.push_str("\ntargets\n");
        for t in targets {
            out.push_str(&format!(
                "  {:<4}  {:<8} {:<58} {:>9}  (target {})\n",
                if t.met() { "MET" } else { "MISS" },
                t.store,
                t.what,
                format!("{:.2}{}", t.measured, t.unit),
                t.rule()
            ));
        }
    }
    out
}

fn progress(store: &str, case: &str, side: &str, m: &Measured) {
    eprintln!(
        "bench: {store:<8} {case:<26} x{:<3} {side:<4} {:>10}/s  p50 {:>8}  p99 {:>8}{}",
        m.tasks,
        per_second(m.ops_per_s()),
        us(m.p50_us()),
        us(m.p99_us()),
        if m.errors > 0 {
            format!("  ({} errors)", m.errors)
        } else {
            String::new()
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Shared setup

/// The error of a run stopped by Ctrl-C (after which the run's data is still removed).
const INTERRUPTED: &str = "interrupted (Ctrl-C)";

/// `work`, or [`INTERRUPTED`] as soon as the process gets Ctrl-C (SIGINT): `work` is then
/// dropped, which aborts its measuring tasks, and the caller cleans up.
async fn interruptible<T>(work: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => Err(INTERRUPTED.to_string()),
    }
}

/// A name fragment unique to this run.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}_{:x}", std::process::id(), nanos % (1 << 40))
}

/// The bytes a raw write stores: the envelope of a counter incremented once, so raw values are
/// as large as ours.
fn counter_envelope() -> Result<Vec<u8>, String> {
    let empty = Crdt::empty(TypeTag::PnCounter);
    let delta = empty
        .apply(
            ActorId::new(1),
            Hlc::new(1_700_000_000_000, 0),
            &Op::from(CounterOp::inc(1)),
        )
        .map_err(|e| e.to_string())?;
    let mut value = empty;
    value.merge(&delta).map_err(|e| e.to_string())?;
    envelope::encode(&value, &envelope::Options::default()).map_err(|e| e.to_string())
}

fn region_over<B: StateBackend>(backend: Arc<B>) -> Result<Region<B>, String> {
    let id = RegionId::new("bench").map_err(|e| e.to_string())?;
    Region::builder(RegionConfig::new(id), backend)
        .build()
        .map_err(|e| e.to_string())
}

fn counter_keys() -> Arc<Vec<String>> {
    Arc::new((0..KEYS).map(|i| format!("bench:counter:{i}")).collect())
}

/// Our three operations through a region over any store.
async fn ours_merge<B: StateBackend>(
    region: &Region<B>,
    keys: &Arc<Vec<String>>,
    spec: Spec,
) -> Result<Measured, String> {
    let (region, keys) = (region.clone(), Arc::clone(keys));
    measure(spec, move |k| {
        let (region, keys) = (region.clone(), Arc::clone(&keys));
        async move {
            region
                .merge_crdt(&keys[k], CounterOp::inc(1))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await
}

async fn ours_get<B: StateBackend>(
    region: &Region<B>,
    keys: &Arc<Vec<String>>,
    spec: Spec,
) -> Result<Measured, String> {
    let (region, keys) = (region.clone(), Arc::clone(keys));
    measure(spec, move |k| {
        let (region, keys) = (region.clone(), Arc::clone(&keys));
        async move {
            region
                .read::<PnCounter>(&keys[k])
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await
}

async fn ours_batch<B: StateBackend>(
    region: &Region<B>,
    keys: &Arc<Vec<String>>,
    spec: Spec,
) -> Result<Measured, String> {
    let (region, keys) = (region.clone(), Arc::clone(keys));
    measure(spec, move |_| {
        let (region, keys) = (region.clone(), Arc::clone(&keys));
        async move {
            let outcomes = region
                .merge_batch(
                    keys.iter()
                        .take(BATCH_KEYS)
                        .map(|k| (k.as_str(), CounterOp::inc(1))),
                )
                .await
                .map_err(|e| e.to_string())?;
            match outcomes.into_iter().find_map(Result::err) {
                Some(e) => Err(format!("a batch item failed: {e}")),
                None => Ok(()),
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Redis

struct RedisSetup {
    backend: Arc<RedisBackend>,
    region: Region<RedisBackend>,
    raw: ConnectionManager,
    keys: Arc<Vec<String>>,
    raw_keys: Arc<Vec<String>>,
    value: Arc<Vec<u8>>,
}

async fn bench_redis(url: &str, duration: Duration) -> Result<StoreReport, String> {
    let id = run_id();
    let prefix = format!("gsbench:{id}:");
    let raw_prefix = format!("gsbench-raw:{id}:");
    let config = RedisConfig::standalone(url).with_key_prefix(&prefix);
    let response_timeout = config.response_timeout;
    let connect_timeout = config.connect_timeout;
    let client = redis::Client::open(url).map_err(|e| format!("invalid Redis URL: {e}"))?;
    let raw = ConnectionManager::new_with_config(
        client,
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout)),
    )
    .await
    .map_err(|e| format!("cannot connect to {}: {e}", redact_url(url)))?;
    let value = Arc::new(counter_envelope()?);
    // From here on the namespace exists (the store records its layout on connect).
    let backend = Arc::new(
        RedisBackend::connect(config)
            .await
            .map_err(|e| format!("cannot open our Redis store: {e}"))?,
    );
    let raw_keys: Arc<Vec<String>> =
        Arc::new((0..KEYS).map(|i| format!("{raw_prefix}k{i}")).collect());
    let result = match region_over(Arc::clone(&backend)) {
        Ok(region) => {
            let setup = RedisSetup {
                region,
                backend: Arc::clone(&backend),
                raw: raw.clone(),
                keys: counter_keys(),
                raw_keys: Arc::clone(&raw_keys),
                value,
            };
            interruptible(redis_cases(&setup, duration)).await
        }
        Err(e) => Err(e),
    };
    // Clean up whatever happened: our namespace, then exactly the raw keys this run wrote.
    let mut cleanup = Vec::new();
    if let Err(e) = backend.purge_namespace().await {
        cleanup.push(format!("redis: purging our namespace {prefix}: {e}"));
    }
    let mut raw = raw;
    for chunk in raw_keys.chunks(500) {
        let deleted = redis::cmd("DEL")
            .arg(chunk)
            .query_async::<u64>(&mut raw)
            .await;
        if let Err(e) = deleted {
            cleanup.push(format!("redis: deleting the raw keys {raw_prefix}*: {e}"));
            break;
        }
    }
    let mut report = match result {
        Ok(report) => report,
        Err(e) if cleanup.is_empty() => return Err(e),
        Err(e) => return Err(format!("{e}; and cleaning up: {}", cleanup.join("; "))),
    };
    report.url = redact_url(url);
    report.namespace = format!(
        "our key prefix {prefix}, raw keys {raw_prefix}k0..k{}; removed afterwards",
        KEYS - 1
    );
    report.namespace_json = json!({ "key_prefix": prefix, "raw_key_prefix": raw_prefix });
    report.failures.extend(cleanup);
    Ok(report)
}

/// CPU seconds the Redis server has used (`used_cpu_sys + used_cpu_user`).
async fn redis_cpu(conn: &ConnectionManager) -> Option<Duration> {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(&mut conn.clone())
        .await
        .ok()?;
    let mut total = 0.0;
    for line in info.lines() {
        if let Some(v) = line
            .strip_prefix("used_cpu_sys:")
            .or_else(|| line.strip_prefix("used_cpu_user:"))
        {
            total += v.trim().parse::<f64>().ok()?;
        }
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Calls and microseconds per command the Redis server has run (`INFO commandstats`).
async fn redis_commands(conn: &ConnectionManager) -> BTreeMap<String, (u64, u64)> {
    let info: String = match redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn.clone())
        .await
    {
        Ok(info) => info,
        Err(_) => return BTreeMap::new(),
    };
    let mut out = BTreeMap::new();
    for line in info.lines() {
        let Some((name, fields)) = line
            .strip_prefix("cmdstat_")
            .and_then(|rest| rest.split_once(':'))
        else {
            continue;
        };
        let field = |wanted: &str| {
            fields
                .split(',')
                .find_map(|f| f.strip_prefix(wanted)?.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
        };
        if let (Some(calls), Some(usec)) = (field("calls"), field("usec")) {
            out.insert(name.to_string(), (calls, usec));
        }
    }
    out
}

/// The Redis server's CPU time and command counters at one moment.
struct ServerSnapshot {
    cpu: Option<Duration>,
    commands: BTreeMap<String, (u64, u64)>,
}

impl ServerSnapshot {
    async fn take(conn: &ConnectionManager) -> Self {
        Self {
            commands: redis_commands(conn).await,
            cpu: redis_cpu(conn).await,
        }
    }

    /// Records in `m` what the server did between `before` and this snapshot.
    fn since(self, before: &ServerSnapshot, m: &mut Measured) {
        m.server_cpu = before.cpu.zip(self.cpu).map(|(b, a)| a.saturating_sub(b));
        let mut commands: Vec<(String, u64, u64)> = self
            .commands
            .into_iter()
            // The INFO calls that frame the measurement are not part of it.
            .filter(|(name, _)| name != "info")
            .map(|(name, (calls, usec))| {
                let (calls0, usec0) = before.commands.get(&name).copied().unwrap_or((0, 0));
                (
                    name,
                    calls.saturating_sub(calls0),
                    usec.saturating_sub(usec0),
                )
            })
            .filter(|(_, calls, _)| *calls > 0)
            .collect();
        commands.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        m.server_commands = commands;
    }
}

/// The server's time per operation: scripts (`EVALSHA`/`EVAL`, inner commands included) and
/// the commands that take most of it.
fn commands_note(m: &Measured, top: usize) -> Option<String> {
    let commands = m.commands_per_op()?;
    let is_script = |name: &str| matches!(name, "evalsha" | "eval" | "evalsha_ro" | "eval_ro");
    let scripts: Vec<&(String, f64, f64)> =
        commands.iter().filter(|(n, _, _)| is_script(n)).collect();
    let others: Vec<&(String, f64, f64)> =
        commands.iter().filter(|(n, _, _)| !is_script(n)).collect();
    let listed = |items: &[&(String, f64, f64)]| {
        items
            .iter()
            .take(top)
            .map(|(name, calls, us)| format!("{name} {calls:.1}x {us:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let inner: f64 = others.iter().map(|(_, _, us)| us).sum();
    if scripts.is_empty() {
        return Some(format!("{} (total {inner:.1} µs)", listed(&others)));
    }
    let script_us: f64 = scripts.iter().map(|(_, _, us)| us).sum();
    let script_calls: f64 = scripts.iter().map(|(_, calls, _)| calls).sum();
    Some(format!(
        "scripts {script_calls:.1}x {script_us:.1} µs, of which the commands they call \
         {inner:.1} µs ({}) and Lua/script overhead {:.1} µs",
        listed(&others),
        (script_us - inner).max(0.0)
    ))
}

async fn raw_set(s: &RedisSetup, spec: Spec) -> Result<Measured, String> {
    let (conn, keys, value) = (s.raw.clone(), Arc::clone(&s.raw_keys), Arc::clone(&s.value));
    measure(spec, move |k| {
        let (mut conn, keys, value) = (conn.clone(), Arc::clone(&keys), Arc::clone(&value));
        async move {
            redis::cmd("SET")
                .arg(&keys[k])
                .arg(value.as_slice())
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await
}

async fn raw_get(s: &RedisSetup, spec: Spec) -> Result<Measured, String> {
    let (conn, keys) = (s.raw.clone(), Arc::clone(&s.raw_keys));
    measure(spec, move |k| {
        let (mut conn, keys) = (conn.clone(), Arc::clone(&keys));
        async move {
            redis::cmd("GET")
                .arg(&keys[k])
                .query_async::<Option<Vec<u8>>>(&mut conn)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await
}

async fn raw_pipelined_set(s: &RedisSetup, spec: Spec) -> Result<Measured, String> {
    let (conn, keys, value) = (s.raw.clone(), Arc::clone(&s.raw_keys), Arc::clone(&s.value));
    measure(spec, move |_| {
        let (mut conn, keys, value) = (conn.clone(), Arc::clone(&keys), Arc::clone(&value));
        async move {
            let mut pipe = redis::pipe();
            for key in keys.iter().take(BATCH_KEYS) {
                pipe.cmd("SET").arg(key).arg(value.as_slice()).ignore();
            }
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await
}

async fn redis_cases(s: &RedisSetup, duration: Duration) -> Result<StoreReport, String> {
    const STORE: &str = "redis";
    let mut cases = Vec::new();
    let report = |case: &str, side: &str, m: &Measured| progress(STORE, case, side, m);
    let stats_before = s.backend.stats();
    let mut races_at_n = 0;

    for tasks in [1, REDIS_TASKS] {
        let spec = Spec::ops(tasks, duration);
        let races = s.backend.stats().races;
        let ours = ours_merge(&s.region, &s.keys, spec.clone().probed(&s.raw)).await?;
        if tasks == REDIS_TASKS {
            races_at_n = s.backend.stats().races - races;
        }
        report("merge_crdt", "ours", &ours);
        let raw = raw_set(s, spec.clone().probed(&s.raw)).await?;
        report("merge_crdt", "raw", &raw);
        cases.push(Case {
            name: "merge_crdt",
            unit: Unit::Op,
            ours_op: "Region::merge_crdt(counter +1)".into(),
            ours,
            raw_op: "SET".into(),
            raw,
        });
    }
    // The batch also makes sure every key exists (ours and raw) before the reads.
    let ours = ours_batch(&s.region, &s.keys, Spec::batches(duration).probed(&s.raw)).await?;
    report("batch", "ours", &ours);
    let raw = raw_pipelined_set(s, Spec::batches(duration).probed(&s.raw)).await?;
    report("batch", "raw", &raw);
    cases.push(Case {
        name: "batch",
        unit: Unit::Batch,
        ours_op: format!("Region::merge_batch({BATCH_KEYS} counters +1)"),
        ours,
        raw_op: format!("pipeline of {BATCH_KEYS} SET"),
        raw,
    });
    for tasks in [1, REDIS_TASKS] {
        let spec = Spec::ops(tasks, duration);
        let ours = ours_get(&s.region, &s.keys, spec.clone().probed(&s.raw)).await?;
        report("get", "ours", &ours);
        let raw = raw_get(s, spec.clone().probed(&s.raw)).await?;
        report("get", "raw", &raw);
        cases.push(Case {
            name: "get",
            unit: Unit::Op,
            ours_op: "Region::read::<PnCounter>".into(),
            ours,
            raw_op: "GET".into(),
            raw,
        });
    }

    // What a merge costs without any I/O: the same call on the in-process memory store.
    let memory = Arc::new(MemoryBackend::new(Layout::default()));
    let memory_region = region_over(memory)?;
    let in_process = ours_merge(
        &memory_region,
        &s.keys,
        Spec::ops(1, duration.min(Duration::from_secs(1))),
    )
    .await?;
    report("merge_crdt, memory store", "ours", &in_process);

    let stats_after = s.backend.stats();
    let mut r = StoreReport {
        store: STORE,
        url: String::new(),
        namespace: String::new(),
        namespace_json: Value::Null,
        cases,
        diagnostics: vec![(
            "merge_crdt on the in-process memory store (no I/O)".into(),
            "Region<MemoryBackend>::merge_crdt(counter +1)".into(),
            in_process,
        )],
        notes: Vec::new(),
        counters: json!({
            "commits": stats_after.commits - stats_before.commits,
            "commits_without_a_read": stats_after.cached_commits - stats_before.cached_commits,
            "lost_races": stats_after.races - stats_before.races,
            "lost_races_during_merge_crdt_x50": races_at_n,
            "gave_up": stats_after.gave_up - stats_before.gave_up,
            "transport_retries": stats_after.transport_retries - stats_before.transport_retries,
        }),
        targets: Vec::new(),
        failures: Vec::new(),
    };
    r.check_errors();
    redis_notes(&mut r, races_at_n);
    Ok(r)
}

fn cpu_note(c: &Case) -> Option<String> {
    let ours_client = c.ours.per_op_us(c.ours.client_cpu)?;
    let ours_server = c.ours.per_op_us(c.ours.server_cpu)?;
    let raw_client = c.raw.per_op_us(c.raw.client_cpu)?;
    let raw_server = c.raw.per_op_us(c.raw.server_cpu)?;
    Some(format!(
        "CPU per {} x{}: ours {ours_client:.0} µs client + {ours_server:.0} µs redis-server; \
         {} {raw_client:.0} µs client + {raw_server:.0} µs redis-server",
        c.name, c.ours.tasks, c.raw_op
    ))
}

fn redis_notes(r: &mut StoreReport, races_at_n: u64) {
    let mut notes = Vec::new();
    let in_process = r.diagnostics.first().map(|(_, _, m)| m.p50_us());
    if let (Some(merge), Some(get)) = (r.case("merge_crdt", 1), r.case("get", 1)) {
        let read = get.ours.p50_us();
        let total = merge.ours.p50_us();
        notes.push(format!(
            "merge_crdt x1 p50 {}: a key this process wrote before is in the write cache, so the \
             merge is one write script round trip plus client work; a first write also reads \
             (~ our get x1 p50 {}); raw SET p50 {} (one round trip); in-process cost of a merge \
             (memory store) p50 {}",
            us(total),
            us(read),
            us(merge.raw.p50_us()),
            in_process.map_or_else(|| "?".into(), us),
        ));
    }
    for name in ["merge_crdt", "get"] {
        if let Some(note) = r.case(name, REDIS_TASKS).and_then(cpu_note) {
            notes.push(note);
        }
    }
    if let (Some(merge), Some(get)) = (
        r.case("merge_crdt", REDIS_TASKS),
        r.case("get", REDIS_TASKS),
    ) {
        if let (Some(merge_server), Some(read_server), Some(set_server)) = (
            merge.ours.per_op_us(merge.ours.server_cpu),
            get.ours.per_op_us(get.ours.server_cpu),
            merge.raw.per_op_us(merge.raw.server_cpu),
        ) {
            notes.push(format!(
                "redis-server CPU per merge_crdt {merge_server:.0} µs (a write script; a read \
                 script costs {read_server:.0} µs, as in get) vs {set_server:.1} µs per SET: one \
                 server thread caps merges at ~{}/s and SETs at ~{}/s",
                per_second(1e6 / merge_server.max(0.01)),
                per_second(1e6 / set_server.max(0.01)),
            ));
        }
    }
    if let Some(batch) = r.case("batch", 1) {
        if let (Some(ours), Some(raw)) = (
            batch.ours.per_op_us(batch.ours.client_cpu),
            batch.raw.per_op_us(batch.raw.client_cpu),
        ) {
            let server = |m: &Measured| m.per_op_us(m.server_cpu).map_or_else(|| "?".into(), us);
            notes.push(format!(
                "CPU per batch: ours {} client + {} redis-server; raw {} client + {} \
                 redis-server",
                us(ours),
                server(&batch.ours),
                us(raw),
                server(&batch.raw)
            ));
        }
    }
    for (name, tasks) in [("merge_crdt", REDIS_TASKS), ("batch", 1)] {
        let Some(c) = r.case(name, tasks) else {
            continue;
        };
        if let (Some(ours), Some(raw)) = (commands_note(&c.ours, 8), commands_note(&c.raw, 3)) {
            notes.push(format!(
                "redis-server command time (µs) per {name} x{tasks}, scripts' inner commands \
                 included: ours {ours}; raw {raw}"
            ));
        }
    }
    notes.push(format!(
        "lost optimistic races during merge_crdt x{REDIS_TASKS}: {races_at_n} (each costs \
         another read and commit)"
    ));
    notes.push(
        "client and redis-server share this machine's cores; server CPU is from INFO cpu and \
         includes any other client's load"
            .into(),
    );
    r.notes = notes;
    if let Some(c) = r.case("merge_crdt", REDIS_TASKS) {
        r.targets.push(Target {
            store: "redis",
            what: format!("merge_crdt x{REDIS_TASKS}: ops/s ours/raw SET"),
            measured: c.throughput_ratio(),
            bound: Bound::AtLeast,
            limit: 0.5,
            unit: "x",
        });
    }
    if let Some(c) = r.case("merge_crdt", 1) {
        r.targets.push(Target {
            store: "redis",
            what: "merge_crdt x1: p50 ours/raw SET".into(),
            measured: c.p50_ratio(),
            bound: Bound::AtMost,
            limit: 2.0,
            unit: "x",
        });
    }
    if let Some((p50_ratio, p50_ms)) = r
        .case("batch", 1)
        .map(|c| (c.p50_ratio(), c.ours.p50_us() / 1_000.0))
    {
        r.targets.push(Target {
            store: "redis",
            what: format!("batch of {BATCH_KEYS}: p50 ours/raw pipelined SET"),
            measured: p50_ratio,
            bound: Bound::AtMost,
            limit: 3.0,
            unit: "x",
        });
        r.targets.push(Target {
            store: "redis",
            what: format!("batch of {BATCH_KEYS}: p50 per batch"),
            measured: p50_ms,
            bound: Bound::Below,
            limit: 10.0,
            unit: " ms",
        });
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

struct PostgresSetup {
    region: Region<PostgresBackend>,
    backend: Arc<PostgresBackend>,
    pool: PgPool,
    keys: Arc<Vec<String>>,
    raw_keys: Arc<Vec<String>>,
    raw_values: Arc<Vec<Vec<u8>>>,
    value: Arc<Vec<u8>>,
    upsert: Arc<str>,
    select: Arc<str>,
    select_for_update: Arc<str>,
    multi_upsert: Arc<str>,
}

fn sql(
    text: &Arc<str>,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(AssertSqlSafe(Arc::clone(text)))
}

async fn bench_postgres(url: &str, duration: Duration) -> Result<StoreReport, String> {
    let schema = format!("gs_bench_{}", run_id());
    let shown = redact_url(url);
    // The raw pool: like our backend's (no ping before each use, same size).
    let pool = PgPoolOptions::new()
        .max_connections(RAW_POOL_MAX)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .connect(url)
        .await
        .map_err(|e| format!("cannot connect to {shown}: {e}"))?;
    let result = interruptible(postgres_run(url, &schema, pool.clone(), duration)).await;
    // Close the raw pool (our store's pool went with `postgres_run`), so that no connection of
    // this run holds a lock, then drop exactly the schema this run created, whatever happened.
    let _ = tokio::time::timeout(Duration::from_secs(10), pool.close()).await;
    let dropped = drop_schema(url, &schema)
        .await
        .map_err(|e| format!("postgres: dropping schema {schema}: {e}"));
    let mut report = match (result, dropped) {
        (Ok(report), Ok(())) => report,
        (Ok(mut report), Err(e)) => {
            report.failures.push(e);
            report
        }
        (Err(e), Ok(())) => return Err(e),
        (Err(e), Err(cleanup)) => return Err(format!("{e}; and cleaning up: {cleanup}")),
    };
    report.url = shown;
    report.namespace = format!("schema {schema} with raw table bench_raw; dropped afterwards");
    report.namespace_json = json!({ "schema": schema });
    Ok(report)
}

/// Drops `schema` over a connection of its own, waiting at most 15 s for locks.
async fn drop_schema(url: &str, schema: &str) -> Result<(), String> {
    let mut conn = PgConnection::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    sqlx::query("SET lock_timeout = '15s'")
        .execute(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let statement: Arc<str> = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE").into();
    sql(&statement)
        .execute(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    conn.close().await.map_err(|e| e.to_string())
}

async fn postgres_run(
    url: &str,
    schema: &str,
    pool: PgPool,
    duration: Duration,
) -> Result<StoreReport, String> {
    let mut config = PostgresConfig::new(url);
    config.schema = schema.to_string();
    config.application_name = "geostate-bench".into();
    let backend = Arc::new(
        PostgresBackend::connect(config)
            .await
            .map_err(|e| format!("cannot open our PostgreSQL store: {e}"))?,
    );
    let create: Arc<str> = format!(
        "CREATE TABLE \"{schema}\".bench_raw (k text COLLATE \"C\" PRIMARY KEY, v bytea NOT NULL)"
    )
    .into();
    sql(&create)
        .execute(&pool)
        .await
        .map_err(|e| format!("creating the raw table: {e}"))?;
    let table = format!("\"{schema}\".bench_raw");
    let value = counter_envelope()?;
    let raw_keys: Vec<String> = (0..KEYS).map(|i| format!("raw:{i}")).collect();
    let setup = PostgresSetup {
        region: region_over(Arc::clone(&backend))?,
        backend,
        pool,
        keys: counter_keys(),
        raw_values: Arc::new(vec![value.clone(); BATCH_KEYS.min(KEYS)]),
        raw_keys: Arc::new(raw_keys),
        value: Arc::new(value),
        upsert: format!(
            "INSERT INTO {table} (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
        )
        .into(),
        select: format!("SELECT v FROM {table} WHERE k = $1").into(),
        select_for_update: format!("SELECT v FROM {table} WHERE k = $1 FOR UPDATE").into(),
        multi_upsert: format!(
            "INSERT INTO {table} (k, v) SELECT * FROM UNNEST($1::text[], $2::bytea[]) \
             ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
        )
        .into(),
    };
    postgres_cases(&setup, duration).await
}

async fn raw_upsert(s: &PostgresSetup, spec: Spec) -> Result<Measured, String> {
    let (pool, keys, value, stmt) = (
        s.pool.clone(),
        Arc::clone(&s.raw_keys),
        Arc::clone(&s.value),
        Arc::clone(&s.upsert),
    );
    measure(spec, move |k| {
        let (pool, keys, value, stmt) = (
            pool.clone(),
            Arc::clone(&keys),
            Arc::clone(&value),
            Arc::clone(&stmt),
        );
        async move {
            sql(&stmt)
                .bind(keys[k].clone())
                .bind(value.as_slice().to_vec())
                .execute(&pool)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await
}

/// The shape of our locking write transaction (the fallback after lost optimistic races) with
/// none of our work: BEGIN; lock the row; upsert; COMMIT.
async fn raw_transaction(s: &PostgresSetup, spec: Spec) -> Result<Measured, String> {
    let (pool, keys, value, lock, upsert) = (
        s.pool.clone(),
        Arc::clone(&s.raw_keys),
        Arc::clone(&s.value),
        Arc::clone(&s.select_for_update),
        Arc::clone(&s.upsert),
    );
    measure(spec, move |k| {
        let (pool, keys, value, lock, upsert) = (
            pool.clone(),
            Arc::clone(&keys),
            Arc::clone(&value),
            Arc::clone(&lock),
            Arc::clone(&upsert),
        );
        async move {
            let fail = |e: sqlx::Error| e.to_string();
            let mut tx = pool.begin().await.map_err(fail)?;
            sql(&lock)
                .bind(keys[k].clone())
                .fetch_optional(&mut *tx)
                .await
                .map_err(fail)?;
            sql(&upsert)
                .bind(keys[k].clone())
                .bind(value.as_slice().to_vec())
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
            tx.commit().await.map_err(fail)
        }
    })
    .await
}

async fn raw_select(s: &PostgresSetup, spec: Spec) -> Result<Measured, String> {
    let (pool, keys, stmt) = (
        s.pool.clone(),
        Arc::clone(&s.raw_keys),
        Arc::clone(&s.select),
    );
    measure(spec, move |k| {
        let (pool, keys, stmt) = (pool.clone(), Arc::clone(&keys), Arc::clone(&stmt));
        async move {
            let row = sql(&stmt)
                .bind(keys[k].clone())
                .fetch_optional(&pool)
                .await
                .map_err(|e| e.to_string())?;
            match row {
                Some(row) => row
                    .try_get::<Vec<u8>, _>(0)
                    .map(drop)
                    .map_err(|e| e.to_string()),
                None => Ok(()),
            }
        }
    })
    .await
}

async fn raw_multi_upsert(s: &PostgresSetup, duration: Duration) -> Result<Measured, String> {
    let (pool, keys, values, stmt) = (
        s.pool.clone(),
        Arc::clone(&s.raw_keys),
        Arc::clone(&s.raw_values),
        Arc::clone(&s.multi_upsert),
    );
    measure(Spec::batches(duration), move |_| {
        let (pool, keys, values, stmt) = (
            pool.clone(),
            Arc::clone(&keys),
            Arc::clone(&values),
            Arc::clone(&stmt),
        );
        async move {
            let batch_keys: Vec<String> = keys.iter().take(BATCH_KEYS).cloned().collect();
            let batch_values: Vec<Vec<u8>> = values.iter().take(BATCH_KEYS).cloned().collect();
            sql(&stmt)
                .bind(batch_keys)
                .bind(batch_values)
                .execute(&pool)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await
}

async fn postgres_cases(s: &PostgresSetup, duration: Duration) -> Result<StoreReport, String> {
    const STORE: &str = "postgres";
    let report = |case: &str, side: &str, m: &Measured| progress(STORE, case, side, m);
    let stats_before = s.backend.stats();
    let mut cases = Vec::new();
    let mut diagnostics = Vec::new();
    for tasks in [1, POSTGRES_TASKS] {
        let spec = Spec::ops(tasks, duration);
        let ours = ours_merge(&s.region, &s.keys, spec.clone()).await?;
        report("merge_crdt", "ours", &ours);
        let raw = raw_upsert(s, spec.clone()).await?;
        report("merge_crdt", "raw", &raw);
        let shaped = raw_transaction(s, spec).await?;
        report("txn shaped like our fallback", "raw", &shaped);
        diagnostics.push((
            "raw txn shaped like our locking fallback: BEGIN; SELECT FOR UPDATE; upsert; COMMIT"
                .to_string(),
            "BEGIN; SELECT v .. FOR UPDATE; INSERT .. ON CONFLICT; COMMIT".to_string(),
            shaped,
        ));
        cases.push(Case {
            name: "merge_crdt",
            unit: Unit::Op,
            ours_op: "Region::merge_crdt(counter +1)".into(),
            ours,
            raw_op: "upsert (ON CONFLICT)".into(),
            raw,
        });
    }
    // The batch also makes sure every key exists (ours and raw) before the reads.
    let ours = ours_batch(&s.region, &s.keys, Spec::batches(duration)).await?;
    report("batch", "ours", &ours);
    let raw = raw_multi_upsert(s, duration).await?;
    report("batch", "raw", &raw);
    cases.push(Case {
        name: "batch",
        unit: Unit::Batch,
        ours_op: format!("Region::merge_batch({BATCH_KEYS} counters +1)"),
        ours,
        raw_op: format!("one {BATCH_KEYS}-row upsert"),
        raw,
    });
    for tasks in [1, POSTGRES_TASKS] {
        let spec = Spec::ops(tasks, duration);
        let ours = ours_get(&s.region, &s.keys, spec.clone()).await?;
        report("get", "ours", &ours);
        let raw = raw_select(s, spec).await?;
        report("get", "raw", &raw);
        cases.push(Case {
            name: "get",
            unit: Unit::Op,
            ours_op: "Region::read::<PnCounter>".into(),
            ours,
            raw_op: "SELECT v WHERE k = $1".into(),
            raw,
        });
    }
    let stats_after = s.backend.stats();
    let mut r = StoreReport {
        store: STORE,
        url: String::new(),
        namespace: String::new(),
        namespace_json: Value::Null,
        cases,
        diagnostics,
        notes: Vec::new(),
        counters: json!({
            "commits": stats_after.commits - stats_before.commits,
            "optimistic_commits": stats_after.optimistic_commits - stats_before.optimistic_commits,
            "locking_commits": stats_after.locking_commits - stats_before.locking_commits,
            "races": stats_after.races - stats_before.races,
            "write_cache_hits": stats_after.write_cache.hits - stats_before.write_cache.hits,
            "write_cache_misses": stats_after.write_cache.misses - stats_before.write_cache.misses,
            "conflict_retries": stats_after.conflict_retries - stats_before.conflict_retries,
            "connection_retries": stats_after.connection_retries - stats_before.connection_retries,
        }),
        targets: Vec::new(),
        failures: Vec::new(),
    };
    r.check_errors();
    postgres_notes(
        &mut r,
        stats_after.conflict_retries - stats_before.conflict_retries,
        stats_after.races - stats_before.races,
        (
            stats_after.write_cache.hits - stats_before.write_cache.hits,
            stats_after.write_cache.misses - stats_before.write_cache.misses,
        ),
    );
    Ok(r)
}

fn postgres_notes(r: &mut StoreReport, retries: u64, races: u64, (hits, misses): (u64, u64)) {
    let mut notes = Vec::new();
    for (i, tasks) in [1, POSTGRES_TASKS].into_iter().enumerate() {
        let (Some(c), Some((_, _, shaped))) = (r.case("merge_crdt", tasks), r.diagnostics.get(i))
        else {
            continue;
        };
        notes.push(format!(
            "merge_crdt x{tasks}: ours {}/s p50 {}; raw upsert (1 statement, autocommit) {}/s \
             p50 {}; raw transaction of our locking fallback's shape (4 round trips) {}/s p50 {}",
            per_second(c.ours.ops_per_s()),
            us(c.ours.p50_us()),
            per_second(c.raw.ops_per_s()),
            us(c.raw.p50_us()),
            per_second(shaped.ops_per_s()),
            us(shaped.p50_us()),
        ));
        if let (Some(ours), Some(raw)) = (
            c.ours.per_op_us(c.ours.client_cpu),
            c.raw.per_op_us(c.raw.client_cpu),
        ) {
            notes.push(format!(
                "client CPU per merge_crdt x{tasks}: ours {ours:.0} µs, raw upsert {raw:.0} µs"
            ));
        }
    }
    notes.push(format!(
        "ours: one conditional statement per write when its key is in the write cache \
         ({hits} hits, {misses} misses); {races} lost optimistic races; {retries} retries after \
         serialization failures or lost key-creation races"
    ));
    notes.push(
        "every commit waits for its WAL flush (synchronous_commit on, the default, for ours \
         and raw alike); batch: ours writes the cached keys of each wave in one statement (after \
         one read of the keys not cached; others one by one), raw one statement for all"
            .into(),
    );
    r.notes = notes;
    if let Some(c) = r.case("merge_crdt", POSTGRES_TASKS) {
        r.targets.push(Target {
            store: "postgres",
            what: format!("merge_crdt x{POSTGRES_TASKS}: ops/s ours/raw upsert"),
            measured: c.throughput_ratio(),
            bound: Bound::AtLeast,
            limit: 0.5,
            unit: "x",
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_spread_over_tasks() {
        assert_eq!(key_index(0, 1, 0), 0);
        assert_eq!(key_index(0, 1, 1_001), 1);
        assert_eq!(key_index(3, 50, 0), 60);
        assert_eq!(key_index(49, 50, 25), 1_005 % KEYS);
        assert!((0..50).all(|t| (0..5_000).all(|i| key_index(t, 50, i) < KEYS)));
    }

    #[test]
    fn durations_are_checked() {
        assert_eq!(parse_secs("0.3"), Ok(0.3));
        assert!(parse_secs("0").is_err());
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("nan").is_err());
        assert!(parse_secs("601").is_err());
    }

    #[test]
    fn numbers_print_readably() {
        assert_eq!(per_second(1_234_567.4), "1,234,567");
        assert_eq!(per_second(999.0), "999");
        assert_eq!(per_second(12.34), "12.3");
        assert_eq!(us(48.2), "48µs");
        assert_eq!(us(4_100.0), "4.10ms");
        assert_eq!(us(2_500_000.0), "2.50s");
        assert_eq!(times(0.5), "0.50x");
        assert_eq!(times(f64::NAN), "-");
    }

    #[test]
    fn targets_compare_the_right_way() {
        let t = |bound, measured| Target {
            store: "redis",
            what: String::new(),
            measured,
            bound,
            limit: 2.0,
            unit: "x",
        };
        assert!(t(Bound::AtLeast, 2.0).met());
        assert!(!t(Bound::AtLeast, 1.9).met());
        assert!(t(Bound::AtMost, 2.0).met());
        assert!(!t(Bound::Below, 2.0).met());
        assert!(!t(Bound::AtLeast, f64::NAN).met());
    }

    #[test]
    fn raw_values_are_counter_envelopes() {
        let bytes = counter_envelope().unwrap();
        let value = envelope::decode(&bytes, &envelope::Limits::default()).unwrap();
        assert_eq!(value.type_tag(), TypeTag::PnCounter);
    }

    #[tokio::test]
    async fn measurements_are_bounded_by_count_and_time() {
        let spec = Spec {
            tasks: 4,
            duration: Duration::from_secs(5),
            ops_max: 100,
            warmup: true,
            probe: None,
        };
        let m = measure(spec, |_| async { Ok(()) }).await.unwrap();
        assert_eq!(m.ops, 100);
        assert!(m.elapsed < Duration::from_secs(5));
        let spec = Spec {
            tasks: 2,
            duration: Duration::from_millis(50),
            ops_max: u64::MAX,
            warmup: false,
            probe: None,
        };
        let m = measure(spec.clone(), |_| async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(())
        })
        .await
        .unwrap();
        assert!(m.ops > 0 && m.elapsed < Duration::from_secs(2));
        assert!(m.p50_us() >= 1_000.0);
        let failing = measure(spec, |_| async { Err("boom".to_string()) })
            .await
            .unwrap();
        assert_eq!(failing.ops, 0);
        assert!(failing.errors > 0);
        assert_eq!(failing.first_error.as_deref(), Some("boom"));
    }
}
