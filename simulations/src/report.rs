//! Reports of a simulation run: a readable text summary, a JSON document and an SVG plot of
//! replication lag and divergence over time.
//!
//! A [`Report`] reads an [`Outcome`], the [`Scenario`] it ran (for the fault schedule) and the
//! results of the invariant checks, taken as [`CheckSummary`] values so that the report does
//! not depend on how the checks are computed. Every figure is a pure function of its inputs:
//! the same seed gives the same report, byte for byte.
//!
//! ```
//! use geostate_sim::report::{Replay, Report};
//! use geostate_sim::{checks, run, RunOptions, Scenario};
//!
//! let mut scenario = Scenario::default_scenario();
//! scenario.keys = 50;
//! scenario.duration_s = 2.0;
//! scenario.faults.clear();
//! let outcome = run(&scenario, &RunOptions::new(3)).unwrap();
//! let results = checks::run_all(&outcome);
//! let report = Report::new(&scenario, &outcome, &results).with_replay(Replay::default());
//! assert!(report.passed());
//! assert!(report.text().contains("PASS  counters"));
//! assert!(report.svg().starts_with("<svg"));
//! let json: serde_json::Value = serde_json::from_str(&report.json_string()).unwrap();
//! assert_eq!(json["seed"], 3);
//! ```

mod svg;

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::checks::CheckResult;
use crate::engine::{region_name, Outcome};
use crate::scenario::{Fault, Scenario};
use crate::stores::{StoreChoice, StoreKind};

/// The checks that verify the effects of acknowledged writes: while they all pass, no
/// acknowledged write was lost.
pub const WRITE_CHECKS: [&str; 5] = ["counters", "sets", "lww", "opaque", "maps"];

/// One invariant check's result as the report shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckSummary {
    /// The check's name.
    pub name: String,
    /// Whether it held.
    pub passed: bool,
    /// What was wrong, one problem per line (empty, or a short note, when it held).
    pub details: String,
    /// How many items the check examined, when it says.
    pub checked: Option<usize>,
    /// How many problems it found (may exceed the detail lines shown).
    pub problems: usize,
    /// Whether the check verifies the effects of acknowledged writes (see [`WRITE_CHECKS`]).
    pub about_writes: bool,
}

impl CheckSummary {
    /// A summary from a name, a verdict and detail lines; a failed check's problems are its
    /// detail lines (a last line `... and N more` counts N more).
    pub fn new(name: impl Into<String>, passed: bool, details: impl Into<String>) -> Self {
        let name = name.into();
        let details = details.into();
        let problems = if passed {
            0
        } else {
            count_problems(details.lines()).max(1)
        };
        Self {
            about_writes: WRITE_CHECKS.contains(&name.as_str()),
            name,
            passed,
            details,
            checked: None,
            problems,
        }
    }
}

/// Problems listed by detail lines: one per line, a final `... and N more` adding N.
fn count_problems<'l>(lines: impl Iterator<Item = &'l str>) -> usize {
    let mut count = 0;
    for line in lines {
        let more = line
            .strip_prefix("... and ")
            .and_then(|rest| rest.strip_suffix(" more"))
            .and_then(|n| n.parse::<usize>().ok());
        count += more.unwrap_or(1);
    }
    count
}

impl From<&CheckResult> for CheckSummary {
    fn from(result: &CheckResult) -> Self {
        Self {
            name: result.name.to_string(),
            passed: result.passed,
            details: result.details.join("\n"),
            checked: Some(result.checked),
            problems: if result.passed {
                0
            } else {
                count_problems(result.details.iter().map(String::as_str)).max(1)
            },
            about_writes: WRITE_CHECKS.contains(&result.name),
        }
    }
}

impl From<CheckResult> for CheckSummary {
    fn from(result: CheckResult) -> Self {
        Self::from(&result)
    }
}

/// How the run was invoked, so that a failure can print the exact command replaying it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Replay {
    /// The scenario file (`None`: the built-in default).
    pub scenario_path: Option<String>,
    /// `--regions` override.
    pub regions: Option<usize>,
    /// `--keys` override.
    pub keys: Option<usize>,
    /// `--duration` override, seconds.
    pub duration_s: Option<f64>,
    /// `--store` override.
    pub store: Option<StoreChoice>,
}

impl Replay {
    /// The command that replays the run with `seed`.
    ///
    /// ```
    /// use geostate_sim::report::Replay;
    /// let replay = Replay { scenario_path: Some("my scenarios/a.toml".into()), ..Replay::default() };
    /// assert_eq!(replay.command(7), "geostate simulate --scenario 'my scenarios/a.toml' --seed 7");
    /// assert_eq!(Replay::default().command(1), "geostate simulate --seed 1");
    /// let mixed = Replay { store: Some(geostate_sim::StoreChoice::Mixed), ..Replay::default() };
    /// assert_eq!(mixed.command(2), "geostate simulate --seed 2 --store mixed");
    /// ```
    pub fn command(&self, seed: u64) -> String {
        let mut cmd = String::from("geostate simulate");
        if let Some(path) = &self.scenario_path {
            let _ = write!(cmd, " --scenario {}", shell_quote(path));
        }
        let _ = write!(cmd, " --seed {seed}");
        if let Some(n) = self.regions {
            let _ = write!(cmd, " --regions {n}");
        }
        if let Some(n) = self.keys {
            let _ = write!(cmd, " --keys {n}");
        }
        if let Some(d) = self.duration_s {
            let _ = write!(cmd, " --duration {d}");
        }
        if let Some(store) = self.store {
            let _ = write!(cmd, " --store {store}");
        }
        cmd
    }
}

/// Quotes `word` for a POSIX shell when it holds anything but plain path characters.
fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./,:=+@%".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A fault on the schedule as plotted: an interval, or an instant (`until_ms` is `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultSpan {
    /// What happens, with region names.
    pub label: String,
    /// Start, simulated ms.
    pub from_ms: u64,
    /// End, simulated ms; `None` for an instantaneous change (a clock skew or jump).
    pub until_ms: Option<u64>,
}

fn ms(seconds: f64) -> u64 {
    (seconds * 1000.0) as u64
}

/// The scenario's faults as they take effect: intervals clipped to the heal (faults starting
/// after it never happen), clock skews and jumps as instants.
pub fn fault_spans(scenario: &Scenario, heal_ms: u64) -> Vec<FaultSpan> {
    let names = |groups: &[Vec<usize>]| {
        groups
            .iter()
            .map(|g| {
                let members: Vec<String> = g.iter().map(|&r| region_name(r)).collect();
                format!("{{{}}}", members.join(","))
            })
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let mut spans = Vec::new();
    let mut interval = |label: String, from_s: f64, until_s: f64| {
        let from_ms = ms(from_s);
        let until_ms = ms(until_s).min(heal_ms);
        if from_ms < until_ms {
            spans.push(FaultSpan {
                label,
                from_ms,
                until_ms: Some(until_ms),
            });
        }
    };
    let mut instants = Vec::new();
    for fault in &scenario.faults {
        match fault {
            Fault::Isolate {
                region,
                from_s,
                until_s,
            } => interval(
                format!("isolate {}", region_name(*region)),
                *from_s,
                *until_s,
            ),
            Fault::Split {
                groups,
                from_s,
                until_s,
            } => interval(format!("split {}", names(groups)), *from_s, *until_s),
            Fault::Ring { from_s, until_s } => interval("ring".into(), *from_s, *until_s),
            Fault::OneWay {
                from,
                to,
                from_s,
                until_s,
            } => interval(
                format!(
                    "one-way {} -> {} lost",
                    region_name(*from),
                    region_name(*to)
                ),
                *from_s,
                *until_s,
            ),
            Fault::Flap {
                a,
                b,
                period_ms,
                from_s,
                until_s,
            } => interval(
                format!(
                    "flap {} <-> {} every {period_ms} ms",
                    region_name(*a),
                    region_name(*b)
                ),
                *from_s,
                *until_s,
            ),
            Fault::Degrade {
                link,
                from_s,
                until_s,
            } => interval(
                format!(
                    "degrade: loss {:.0}%, dup {:.0}%, reorder {} ms, latency {}+{} ms",
                    link.loss * 100.0,
                    link.duplicate * 100.0,
                    link.reorder_ms,
                    link.latency_ms,
                    link.jitter_ms
                ),
                *from_s,
                *until_s,
            ),
            Fault::Crash {
                region,
                at_s,
                down_s,
            } => interval(
                format!("crash {}", region_name(*region)),
                *at_s,
                at_s + down_s,
            ),
            Fault::Skew {
                region,
                offset_ms,
                from_s,
            } => instants.push(FaultSpan {
                label: format!("skew {} {offset_ms:+} ms", region_name(*region)),
                from_ms: ms(*from_s),
                until_ms: None,
            }),
            Fault::Jump {
                region,
                by_ms,
                at_s,
            } => instants.push(FaultSpan {
                label: format!("jump {} {by_ms:+} ms", region_name(*region)),
                from_ms: ms(*at_s),
                until_ms: None,
            }),
        }
    }
    spans.extend(instants);
    spans
}

/// Lag of one (origin, receiver) pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LagRow {
    /// Region the entries were written in.
    pub origin: String,
    /// Region that applied them.
    pub receiver: String,
    /// Entries applied.
    pub count: u64,
    /// Median lag, ms.
    pub p50_ms: u64,
    /// 99th percentile, ms.
    pub p99_ms: u64,
    /// Largest, ms.
    pub max_ms: u64,
}

impl LagRow {
    fn from_histogram(origin: String, receiver: String, h: Option<&Histogram<u64>>) -> Self {
        let (count, p50_ms, p99_ms, max_ms) = match h {
            Some(h) if !h.is_empty() => (
                h.len(),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.max(),
            ),
            _ => (0, 0, 0, 0),
        };
        Self {
            origin,
            receiver,
            count,
            p50_ms,
            p99_ms,
            max_ms,
        }
    }
}

/// A report on one run.
#[derive(Debug)]
pub struct Report<'a> {
    scenario: &'a Scenario,
    outcome: &'a Outcome,
    checks: Vec<CheckSummary>,
    replay: Replay,
}

impl<'a> Report<'a> {
    /// A report on `outcome`, a run of `scenario`, with the checks' results.
    pub fn new<C: Into<CheckSummary>>(
        scenario: &'a Scenario,
        outcome: &'a Outcome,
        checks: impl IntoIterator<Item = C>,
    ) -> Self {
        Self {
            scenario,
            outcome,
            checks: checks.into_iter().map(Into::into).collect(),
            replay: Replay::default(),
        }
    }

    /// Sets how the run was invoked (for the replay command).
    #[must_use]
    pub fn with_replay(mut self, replay: Replay) -> Self {
        self.replay = replay;
        self
    }

    /// The checks' results.
    pub fn checks(&self) -> &[CheckSummary] {
        &self.checks
    }

    /// Whether every check passed (and at least one ran).
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.passed)
    }

    /// The checks that failed.
    pub fn failed_checks(&self) -> impl Iterator<Item = &CheckSummary> {
        self.checks.iter().filter(|c| !c.passed)
    }

    /// The command replaying this run.
    pub fn replay_command(&self) -> String {
        self.replay.command(self.outcome.seed)
    }

    /// Acknowledged writes whose effect is missing: `Some(0)` while every check of write
    /// effects ([`WRITE_CHECKS`]) passed; `None` when one failed (then
    /// [`Report::write_problems`] counts what they found).
    pub fn lost_writes(&self) -> Option<u64> {
        let write_checks: Vec<&CheckSummary> =
            self.checks.iter().filter(|c| c.about_writes).collect();
        if !write_checks.is_empty() && write_checks.iter().all(|c| c.passed) {
            Some(0)
        } else {
            None
        }
    }

    /// Problems found by the failed checks of write effects (keys or key-region pairs whose
    /// acknowledged effects are missing or wrong).
    pub fn write_problems(&self) -> u64 {
        self.checks
            .iter()
            .filter(|c| c.about_writes && !c.passed)
            .map(|c| c.problems as u64)
            .sum()
    }

    /// Time from the heal to convergence, ms.
    pub fn convergence_ms(&self) -> Option<u64> {
        self.outcome
            .converged_ms
            .map(|c| c.saturating_sub(self.outcome.heal_ms))
    }

    /// Lag per ordered region pair, every pair listed (count 0 when nothing was applied).
    pub fn lag_rows(&self) -> Vec<LagRow> {
        let o = self.outcome;
        let n = o.regions.len();
        let mut rows = Vec::with_capacity(n * n.saturating_sub(1));
        for a in 0..n {
            for b in 0..n {
                if a != b {
                    rows.push(LagRow::from_histogram(
                        o.regions[a].clone(),
                        o.regions[b].clone(),
                        o.lag.get(&(a, b)),
                    ));
                }
            }
        }
        rows
    }

    /// Lag over all pairs together.
    pub fn lag_all(&self) -> LagRow {
        let mut all: Option<Histogram<u64>> = None;
        for h in self.outcome.lag.values() {
            match &mut all {
                None => all = Some(h.clone()),
                // Histograms of one run share their bounds, so adding cannot fail; if it did,
                // the pair would only be left out of the aggregate.
                Some(total) => {
                    let _ = total.add(h);
                }
            }
        }
        LagRow::from_histogram("all".into(), "all".into(), all.as_ref())
    }

    /// The fault schedule as it took effect.
    pub fn fault_spans(&self) -> Vec<FaultSpan> {
        fault_spans(self.scenario, self.outcome.heal_ms)
    }

    fn totals(&self) -> Totals {
        let o = self.outcome;
        let mut t = Totals::default();
        for s in &o.stats {
            t.feed_bytes += s.feed_bytes;
            t.ae_bytes += s.ae_bytes;
            t.ae_rounds += s.ae_rounds;
            t.ae_keys += s.ae_keys;
            t.gaps += s.gaps;
            t.requests += s.requests;
            t.failures += s.failures;
            t.applied += s.entries_applied;
            t.purged += s.tombstones_purged;
        }
        t.conflicts = o.conflicts.iter().sum();
        t.tombstones = o.tombstones.iter().sum();
        t
    }

    /// The stores the regions ran on, for the text report.
    fn stores_line(&self) -> String {
        let o = self.outcome;
        let kinds: Vec<Option<StoreKind>> = (0..o.regions.len())
            .map(|i| o.stores.get(i).map(|s| s.kind))
            .collect();
        if kinds.iter().all(|k| *k == Some(StoreKind::Memory)) {
            return "memory (embedded, in-process)".into();
        }
        let parts: Vec<String> = o
            .regions
            .iter()
            .zip(&kinds)
            .map(|(r, k)| format!("{r} {}", k.map_or("unknown", StoreKind::name)))
            .collect();
        format!(
            "{} (each region on its own, removed after the run)",
            parts.join(", ")
        )
    }

    fn per_region(&self, values: &[u64]) -> String {
        let parts: Vec<String> = self
            .outcome
            .regions
            .iter()
            .zip(values)
            .map(|(r, v)| format!("{r} {}", thousands(*v)))
            .collect();
        parts.join(", ")
    }

    /// One line for a sweep: seed, verdict, convergence, writes, trace hash (and on failure the
    /// failed checks and the replay command).
    pub fn summary_line(&self) -> String {
        let o = self.outcome;
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        let convergence = match self.convergence_ms() {
            Some(c) => format!("converged {} after heal", seconds(c)),
            None => format!("NOT converged within {}", seconds(o.converge_timeout_ms)),
        };
        let mut line = format!(
            "seed {:<6} {verdict}  {convergence}  {} writes acked  trace {:016x}",
            o.seed,
            thousands(o.acked.len() as u64),
            o.trace_hash
        );
        if !self.passed() {
            let failed: Vec<&str> = self.failed_checks().map(|c| c.name.as_str()).collect();
            let failed = if failed.is_empty() {
                "no checks ran".to_string()
            } else {
                failed.join(", ")
            };
            let _ = write!(
                line,
                "  failed: {failed}  replay: {}",
                self.replay_command()
            );
        }
        line
    }

    /// The readable report.
    pub fn text(&self) -> String {
        let o = self.outcome;
        let s = self.scenario;
        let t = self.totals();
        let mut out = String::new();
        let _ = writeln!(out, "geostate simulate: {}", o.scenario);
        if !s.description.is_empty() {
            for line in wrap(&s.description, 92) {
                let _ = writeln!(out, "  {line}");
            }
        }
        let _ = writeln!(out);
        let field = |out: &mut String, name: &str, value: String| {
            let _ = writeln!(out, "{name:<12}{value}");
        };
        field(&mut out, "seed", o.seed.to_string());
        field(
            &mut out,
            "regions",
            format!("{} ({})", o.regions.len(), o.regions.join(", ")),
        );
        field(&mut out, "stores", self.stores_line());
        field(
            &mut out,
            "workload",
            format!(
                "{} keys, {} writes/s for {} (fault phase), then heal",
                thousands(s.keys as u64),
                s.workload.writes_per_s,
                seconds(o.heal_ms)
            ),
        );
        let spans = self.fault_spans();
        if spans.is_empty() {
            field(&mut out, "faults", "none".into());
        } else {
            for (i, span) in spans.iter().enumerate() {
                let when = match span.until_ms {
                    Some(u) => format!("{:.1}-{:.1} s", secs_f(span.from_ms), secs_f(u)),
                    None => format!("at {:.1} s", secs_f(span.from_ms)),
                };
                field(
                    &mut out,
                    if i == 0 { "faults" } else { "" },
                    format!("{when:<13} {}", span.label),
                );
            }
        }
        let _ = writeln!(out);
        let lost = match self.lost_writes() {
            Some(n) => format!("{} lost", thousands(n)),
            None if self.checks.iter().any(|c| c.about_writes) => {
                let failed: Vec<&str> = self
                    .failed_checks()
                    .filter(|c| c.about_writes)
                    .map(|c| c.name.as_str())
                    .collect();
                format!(
                    "NOT all kept: effects missing or wrong in {} places ({})",
                    thousands(self.write_problems()),
                    failed.join(", ")
                )
            }
            None => "lost unknown (no write checks ran)".into(),
        };
        field(
            &mut out,
            "writes",
            format!(
                "{} acknowledged, {lost}, {} failed",
                thousands(o.acked.len() as u64),
                thousands(o.failed_writes)
            ),
        );
        let convergence = match self.convergence_ms() {
            Some(c) => format!(
                "{} after heal (heal at {}, converged at {})",
                seconds(c),
                seconds(o.heal_ms),
                seconds(o.heal_ms + c)
            ),
            None => format!(
                "NOT converged within {} after heal (heal at {})",
                seconds(o.converge_timeout_ms),
                seconds(o.heal_ms)
            ),
        };
        field(&mut out, "convergence", convergence);
        field(
            &mut out,
            "bytes",
            format!(
                "feed {}, anti-entropy {} ({} rounds, {} key states exchanged, {} feed gaps)",
                bytes(t.feed_bytes),
                bytes(t.ae_bytes),
                thousands(t.ae_rounds),
                thousands(t.ae_keys),
                thousands(t.gaps)
            ),
        );
        field(
            &mut out,
            "replicators",
            format!(
                "{} requests ({} failed or timed out), {} feed entries applied",
                thousands(t.requests),
                thousands(t.failures),
                thousands(t.applied)
            ),
        );
        field(
            &mut out,
            "conflicts",
            format!(
                "{} opaque-value conflicts recorded ({})",
                thousands(t.conflicts),
                self.per_region(&o.conflicts)
            ),
        );
        field(
            &mut out,
            "tombstones",
            format!(
                "{} still held ({}); {} purged once every region had applied them",
                thousands(t.tombstones),
                self.per_region(&o.tombstones),
                thousands(t.purged)
            ),
        );
        field(
            &mut out,
            "network",
            format!(
                "{} messages dropped, {} duplicated",
                thousands(o.messages_dropped),
                thousands(o.messages_duplicated)
            ),
        );
        field(
            &mut out,
            "clocks",
            format!(
                "{} remote timestamps refused as too far ahead",
                thousands(o.clock_refusals)
            ),
        );
        field(
            &mut out,
            "trace",
            format!("{:016x} ({} events)", o.trace_hash, thousands(o.events)),
        );

        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "lag (ms)    {:<26} {:>9} {:>8} {:>8} {:>8}",
            "origin -> receiver", "entries", "p50", "p99", "max"
        );
        let mut rows = self.lag_rows();
        rows.push(self.lag_all());
        for row in rows {
            let pair = if row.origin == "all" {
                "all pairs".to_string()
            } else {
                format!("{} -> {}", row.origin, row.receiver)
            };
            if row.count == 0 {
                let _ = writeln!(
                    out,
                    "            {pair:<26} {:>9} {:>8} {:>8} {:>8}",
                    0, "-", "-", "-"
                );
            } else {
                let _ = writeln!(
                    out,
                    "            {pair:<26} {:>9} {:>8} {:>8} {:>8}",
                    thousands(row.count),
                    row.p50_ms,
                    row.p99_ms,
                    row.max_ms
                );
            }
        }

        let _ = writeln!(out);
        let _ = writeln!(out, "checks");
        if self.checks.is_empty() {
            let _ = writeln!(out, "  (no checks ran)");
        }
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for check in &self.checks {
            let verdict = if check.passed { "PASS" } else { "FAIL" };
            let mut lines = check.details.lines();
            let first = match (lines.next(), check.checked) {
                (Some(line), _) => line.to_string(),
                (None, Some(n)) => format!("{} checked", thousands(n as u64)),
                (None, None) => String::new(),
            };
            let _ = writeln!(out, "  {verdict}  {:<width$}  {first}", check.name);
            for line in lines {
                let _ = writeln!(out, "        {:<width$}  {line}", "");
            }
        }
        let _ = writeln!(out);
        let failed = self.failed_checks().count();
        if self.passed() {
            let _ = writeln!(
                out,
                "result      PASS: all {} checks hold (seed {})",
                self.checks.len(),
                o.seed
            );
        } else {
            let _ = writeln!(
                out,
                "result      FAIL: {failed} of {} checks failed (seed {})",
                self.checks.len(),
                o.seed
            );
            let _ = writeln!(out, "replay      {}", self.replay_command());
        }
        out
    }

    /// The JSON report as a value.
    pub fn json(&self) -> Value {
        let o = self.outcome;
        let s = self.scenario;
        let t = self.totals();
        let lag_row = |r: &LagRow| {
            json!({
                "origin": r.origin,
                "receiver": r.receiver,
                "count": r.count,
                "p50_ms": r.p50_ms,
                "p99_ms": r.p99_ms,
                "max_ms": r.max_ms,
            })
        };
        let per_region: Vec<Value> = o
            .regions
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let st = o.stats.get(i).cloned().unwrap_or_default();
                json!({
                    "region": name,
                    "store": o.stores.get(i).map(|s| s.kind.name()),
                    "feed_bytes": st.feed_bytes,
                    "anti_entropy_bytes": st.ae_bytes,
                    "anti_entropy_rounds": st.ae_rounds,
                    "anti_entropy_keys": st.ae_keys,
                    "feed_gaps": st.gaps,
                    "requests": st.requests,
                    "request_failures": st.failures,
                    "entries_applied": st.entries_applied,
                    "conflicts": o.conflicts.get(i).copied().unwrap_or(0),
                    "tombstones": o.tombstones.get(i).copied().unwrap_or(0),
                    "tombstones_purged": st.tombstones_purged,
                })
            })
            .collect();
        let stores: Vec<Value> = o
            .regions
            .iter()
            .zip(&o.stores)
            .map(
                |(name, s)| json!({"region": name, "store": s.kind.name(), "location": s.location}),
            )
            .collect();
        let faults: Vec<Value> = self
            .fault_spans()
            .iter()
            .map(|f| json!({"label": f.label, "from_ms": f.from_ms, "until_ms": f.until_ms}))
            .collect();
        let checks: Vec<Value> = self
            .checks
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "passed": c.passed,
                    "details": c.details,
                    "checked": c.checked,
                    "problems": c.problems,
                })
            })
            .collect();
        let samples: Vec<Value> = o
            .samples
            .iter()
            .map(|x| {
                json!({
                    "at_ms": x.at_ms,
                    "divergence": x.divergence,
                    "lag_p99_ms": x.lag_p99_ms,
                    "applied": x.applied,
                })
            })
            .collect();
        json!({
            "scenario": {
                "name": o.scenario,
                "description": s.description,
                "path": self.replay.scenario_path,
                "regions": s.regions,
                "keys": s.keys,
                "duration_s": s.duration_s,
                "writes_per_s": s.workload.writes_per_s,
                "store": s.store.name(),
            },
            "seed": o.seed,
            "passed": self.passed(),
            "regions": o.regions,
            "stores": stores,
            "writes": {
                "acknowledged": o.acked.len(),
                "lost": self.lost_writes(),
                "write_check_problems": self.write_problems(),
                "failed": o.failed_writes,
            },
            "heal_ms": o.heal_ms,
            "converged_ms": o.converged_ms,
            "convergence_ms": self.convergence_ms(),
            "converge_timeout_ms": o.converge_timeout_ms,
            "lag": self.lag_rows().iter().map(lag_row).collect::<Vec<_>>(),
            "lag_all": lag_row(&self.lag_all()),
            "bytes": {
                "feed": t.feed_bytes,
                "anti_entropy": t.ae_bytes,
            },
            "anti_entropy": {
                "rounds": t.ae_rounds,
                "keys": t.ae_keys,
                "feed_gaps": t.gaps,
            },
            "per_region": per_region,
            "conflicts": t.conflicts,
            "tombstones": t.tombstones,
            "tombstones_purged": t.purged,
            "messages": {
                "dropped": o.messages_dropped,
                "duplicated": o.messages_duplicated,
            },
            "clock_refusals": o.clock_refusals,
            "trace_hash": format!("{:016x}", o.trace_hash),
            "events": o.events,
            "faults": faults,
            "checks": checks,
            "replay": self.replay_command(),
            "samples": samples,
        })
    }

    /// The JSON report, pretty-printed.
    pub fn json_string(&self) -> String {
        // Serializing a `Value` cannot fail (its map keys are strings).
        serde_json::to_string_pretty(&self.json()).unwrap_or_default()
    }

    /// The SVG plot of lag p99 and divergence over time.
    pub fn svg(&self) -> String {
        let o = self.outcome;
        let title = format!("geostate simulate: {} (seed {})", o.scenario, o.seed);
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        let convergence = match self.convergence_ms() {
            Some(c) => format!("converged {} after heal", seconds(c)),
            None => "did not converge".into(),
        };
        let subtitle = format!(
            "{} regions ({}) · {} writes acknowledged · {convergence} · {verdict}",
            o.regions.len(),
            o.regions.join(", "),
            thousands(o.acked.len() as u64)
        );
        let faults = self.fault_spans();
        svg::render(&svg::PlotInput {
            title: &title,
            subtitle: &subtitle,
            samples: &o.samples,
            faults: &faults,
            heal_ms: o.heal_ms,
            converged_ms: o.converged_ms,
        })
    }
}

#[derive(Default)]
struct Totals {
    feed_bytes: u64,
    ae_bytes: u64,
    ae_rounds: u64,
    ae_keys: u64,
    gaps: u64,
    requests: u64,
    failures: u64,
    applied: u64,
    conflicts: u64,
    tombstones: u64,
    purged: u64,
}

fn secs_f(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// `1234` ms as `1.23 s`.
fn seconds(ms: u64) -> String {
    format!("{:.2} s", secs_f(ms))
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A byte count, readable.
fn bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let f = n as f64;
    if f >= KIB * KIB {
        format!("{:.2} MiB", f / (KIB * KIB))
    } else if f >= KIB {
        format!("{:.1} KiB", f / KIB)
    } else {
        format!("{n} B")
    }
}

/// Greedy word wrap.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::{run, RunOptions};

    fn small() -> Scenario {
        let mut s = Scenario::default_scenario();
        s.keys = 60;
        s.duration_s = 3.0;
        s.workload.writes_per_s = 200.0;
        s.faults = vec![
            Fault::Isolate {
                region: 0,
                from_s: 0.5,
                until_s: 2.0,
            },
            Fault::Jump {
                region: 1,
                by_ms: -500,
                at_s: 1.0,
            },
            Fault::Crash {
                region: 2,
                at_s: 2.5,
                down_s: 10.0,
            },
        ];
        s
    }

    fn checks(pass: bool) -> Vec<CheckSummary> {
        vec![
            CheckSummary::new("identical", true, "3 regions byte-identical"),
            CheckSummary::new(
                "counters",
                pass,
                if pass {
                    ""
                } else {
                    "c:7 in us-east: 12, expected 15\nc:9 in eu-west: 3, expected 4\n... and 3 more"
                },
            ),
        ]
    }

    #[test]
    fn text_has_the_key_figures() {
        let s = small();
        let o = run(&s, &RunOptions::new(11)).unwrap();
        let r = Report::new(&s, &o, checks(true));
        let text = r.text();
        assert!(r.passed());
        assert!(text.contains("seed        11"), "{text}");
        assert!(text.contains("us-east, eu-west, ap-south"));
        assert!(
            text.contains("stores      memory (embedded, in-process)\n"),
            "{text}"
        );
        assert!(text.contains(&format!(
            "{} acknowledged, 0 lost",
            thousands(o.acked.len() as u64)
        )));
        assert!(text.contains("after heal"));
        assert!(text.contains("us-east -> eu-west"));
        assert!(text.contains("all pairs"));
        assert!(text.contains("feed "));
        assert!(text.contains("anti-entropy "));
        assert!(text.contains("opaque-value conflicts"));
        assert!(text.contains("tombstones"));
        assert!(text.contains("messages dropped"));
        assert!(text.contains("remote timestamps refused"));
        assert!(text.contains(&format!("{:016x}", o.trace_hash)));
        assert!(text.contains("isolate us-east"));
        assert!(text.contains("jump eu-west -500 ms"));
        assert!(
            text.contains("2.5-3.0 s"),
            "crash clipped to the heal: {text}"
        );
        assert!(text.contains("PASS  identical"));
        assert!(text.contains("result      PASS"));
        assert!(!text.contains("replay"));
        // Same seed, same report.
        let again = run(&s, &RunOptions::new(11)).unwrap();
        assert_eq!(Report::new(&s, &again, checks(true)).text(), text);
    }

    #[test]
    fn failure_prints_seed_details_and_replay() {
        let s = small();
        let o = run(&s, &RunOptions::new(5)).unwrap();
        let replay = Replay {
            scenario_path: Some("simulations/scenarios/x.toml".into()),
            keys: Some(60),
            ..Replay::default()
        };
        let r = Report::new(&s, &o, checks(false)).with_replay(replay);
        assert!(!r.passed());
        assert_eq!(r.lost_writes(), None);
        assert_eq!(r.write_problems(), 5);
        let text = r.text();
        assert!(text.contains("FAIL  counters"));
        assert!(
            text.contains("c:9 in eu-west"),
            "continuation lines kept: {text}"
        );
        assert!(
            text.contains("NOT all kept: effects missing or wrong in 5 places (counters)"),
            "{text}"
        );
        assert!(text.contains("FAIL: 1 of 2 checks failed (seed 5)"));
        assert!(text.contains(
            "replay      geostate simulate --scenario simulations/scenarios/x.toml --seed 5 --keys 60"
        ));
        let line = r.summary_line();
        assert!(line.starts_with("seed 5"));
        assert!(line.contains("FAIL") && line.contains("failed: counters"));
        assert!(line.contains("--seed 5"));
        // A failure outside the write checks loses no write.
        let mut other = checks(true);
        other[0] = CheckSummary::new("identical", false, "key c:1: differs");
        let other = Report::new(&s, &o, other);
        assert!(!other.passed());
        assert_eq!(other.lost_writes(), Some(0));
        assert_eq!(other.checks()[0].problems, 1);
        // No checks is not a pass.
        assert!(!Report::new(&s, &o, Vec::<CheckSummary>::new()).passed());
    }

    #[test]
    fn json_has_the_fields() {
        let s = small();
        let o = run(&s, &RunOptions::new(2)).unwrap();
        let r = Report::new(&s, &o, checks(true));
        let v: Value = serde_json::from_str(&r.json_string()).unwrap();
        assert_eq!(v["seed"], 2);
        assert_eq!(v["passed"], true);
        assert_eq!(v["scenario"]["name"], o.scenario.as_str());
        assert_eq!(v["regions"].as_array().unwrap().len(), 3);
        assert_eq!(v["scenario"]["store"], "memory");
        assert_eq!(v["stores"].as_array().unwrap().len(), 3);
        assert_eq!(v["stores"][1]["region"], "eu-west");
        assert_eq!(v["stores"][1]["store"], "memory");
        assert_eq!(v["stores"][1]["location"], "in-process");
        assert_eq!(v["per_region"][2]["store"], "memory");
        assert_eq!(v["writes"]["acknowledged"], o.acked.len() as u64);
        assert_eq!(v["writes"]["lost"], 0);
        assert_eq!(v["heal_ms"], o.heal_ms);
        assert_eq!(v["convergence_ms"].as_u64(), r.convergence_ms());
        assert_eq!(v["lag"].as_array().unwrap().len(), 6);
        assert!(v["lag"][0]["p99_ms"].is_u64());
        assert!(v["lag_all"]["max_ms"].is_u64());
        let feed: u64 = o.stats.iter().map(|x| x.feed_bytes).sum();
        assert_eq!(v["bytes"]["feed"], feed);
        assert!(v["bytes"]["anti_entropy"].is_u64());
        assert_eq!(v["conflicts"], o.conflicts.iter().sum::<u64>());
        assert!(v["tombstones"].is_u64());
        assert_eq!(v["messages"]["dropped"], o.messages_dropped);
        assert!(v["messages"]["duplicated"].is_u64());
        assert!(v["clock_refusals"].is_u64());
        assert_eq!(v["trace_hash"], format!("{:016x}", o.trace_hash));
        assert_eq!(v["checks"].as_array().unwrap().len(), 2);
        assert_eq!(v["checks"][1]["name"], "counters");
        assert_eq!(v["faults"].as_array().unwrap().len(), 3);
        assert_eq!(v["samples"].as_array().unwrap().len(), o.samples.len());
        assert_eq!(v["replay"], "geostate simulate --seed 2");
    }

    /// Checks that the SVG is well formed: every tag closes, in order, and attributes are
    /// quoted; returns the element names seen.
    fn well_formed(svg: &str) -> Vec<String> {
        let mut stack: Vec<String> = Vec::new();
        let mut seen = Vec::new();
        let mut rest = svg;
        while let Some(open) = rest.find('<') {
            let text = &rest[..open];
            assert!(!text.contains('>'), "stray '>' in text: {text}");
            assert!(
                !text.contains('&') || text.split('&').skip(1).all(|t| t.contains(';')),
                "unescaped '&' in {text}"
            );
            let close = rest[open..].find('>').expect("unclosed tag") + open;
            let tag = &rest[open + 1..close];
            assert!(!tag.contains('<'), "'<' inside a tag: {tag}");
            assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes: {tag}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name), "mismatched </{name}>");
            } else {
                let name = tag
                    .trim_end_matches('/')
                    .split_whitespace()
                    .next()
                    .expect("empty tag")
                    .to_string();
                seen.push(name.clone());
                if !tag.ends_with('/') {
                    stack.push(name);
                }
            }
            rest = &rest[close + 1..];
        }
        assert!(rest.trim().is_empty(), "text after the root: {rest}");
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        seen
    }

    #[test]
    fn svg_is_well_formed_and_holds_the_series() {
        let s = small();
        let o = run(&s, &RunOptions::new(4)).unwrap();
        let r = Report::new(&s, &o, checks(true));
        let svg = r.svg();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        let elements = well_formed(&svg);
        assert_eq!(elements[0], "svg");
        assert_eq!(elements.iter().filter(|e| *e == "svg").count(), 1);
        assert!(elements.iter().any(|e| e == "polyline"));
        for id in ["id=\"lag-p99\"", "id=\"divergence\"", "id=\"heal\""] {
            assert!(svg.contains(id), "missing {id}");
        }
        // One point per sample in each series.
        for id in ["lag-p99", "divergence"] {
            let start = svg.find(&format!("id=\"{id}\"")).unwrap();
            let points = &svg[start..];
            let points = &points[points.find("points=\"").unwrap() + 8..];
            let points = &points[..points.find('"').unwrap()];
            assert_eq!(points.split_whitespace().count(), o.samples.len());
            for point in points.split_whitespace() {
                let (x, y) = point.split_once(',').unwrap();
                assert!(x.parse::<f64>().unwrap().is_finite());
                assert!(y.parse::<f64>().unwrap().is_finite());
            }
        }
        // Fault intervals shaded in both panels, the jump marked, labels present.
        assert_eq!(svg.matches("class=\"fault\"").count(), 4);
        assert_eq!(svg.matches("class=\"instant\"").count(), 2);
        assert!(svg.contains("isolate us-east"));
        assert!(svg.contains("lag p99 (ms)") && svg.contains("simulated time (s)"));
        if o.converged_ms.is_some() {
            assert!(svg.contains("id=\"converged\""));
        }
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn helpers() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(bytes(12), "12 B");
        assert_eq!(bytes(2048), "2.0 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.00 MiB");
        assert_eq!(seconds(1234), "1.23 s");
        assert_eq!(shell_quote("a/b-c.toml"), "a/b-c.toml");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(wrap("a bb ccc dddd", 6), vec!["a bb", "ccc", "dddd"]);
    }

    #[test]
    fn spans_clip_to_the_heal() {
        let mut s = small();
        s.faults.push(Fault::Ring {
            from_s: 5.0,
            until_s: 9.0,
        });
        let spans = fault_spans(&s, 3_000);
        assert_eq!(
            spans.len(),
            3,
            "the ring after the heal never happens: {spans:?}"
        );
        assert_eq!(spans[1].until_ms, Some(3_000));
        assert_eq!(spans[2].until_ms, None);
    }
}
