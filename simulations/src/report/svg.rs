//! The SVG plot of a run: replication lag p99 and divergence over simulated time, with the
//! fault intervals shaded, instantaneous faults (clock skews and jumps) marked, and markers at
//! the heal and at convergence. Hand-written SVG 1.1: no dependency, and the output is plain
//! text that any browser or `rsvg-convert` renders.

use std::fmt::Write as _;

use super::FaultSpan;
use crate::engine::Sample;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 600.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
/// Top and bottom of the lag panel and of the divergence panel.
const LAG_PANEL: (f64, f64) = (130.0, 310.0);
const DIV_PANEL: (f64, f64) = (372.0, 552.0);
/// Rows of fault labels above the lag panel.
const LABEL_ROWS: usize = 3;

const LAG_COLOUR: &str = "#1f5fbf";
const DIV_COLOUR: &str = "#d9631e";
const FAULT_FILL: &str = "#e8474c";
const INSTANT_COLOUR: &str = "#8a3fb5";
const HEAL_COLOUR: &str = "#222222";
const CONVERGED_COLOUR: &str = "#1f8a3a";

/// What the plot shows.
pub(crate) struct PlotInput<'a> {
    pub title: &'a str,
    pub subtitle: &'a str,
    pub samples: &'a [Sample],
    pub faults: &'a [FaultSpan],
    pub heal_ms: u64,
    pub converged_ms: Option<u64>,
}

/// Escapes text for SVG character data and attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A step of 1, 2 or 5 times a power of ten giving about `target` intervals up to `max`.
fn nice_step(max: f64, target: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let raw = max / target;
    let power = 10f64.powf(raw.log10().floor());
    let fraction = raw / power;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    (nice * power).max(f64::MIN_POSITIVE)
}

/// The axis top (a multiple of the step at or above `max`) and the step.
fn axis(max: f64, target: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let step = nice_step(max, target);
    ((max / step).ceil() * step, step)
}

/// A tick label: integers without decimals, otherwise up to two.
fn tick_label(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else if (v * 10.0 - (v * 10.0).round()).abs() < 1e-9 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

struct Frame {
    t_max_ms: f64,
}

impl Frame {
    fn x(&self, ms: f64) -> f64 {
        LEFT + (ms / self.t_max_ms).clamp(0.0, 1.0) * (WIDTH - LEFT - RIGHT)
    }
}

/// One panel: frame, grid, ticks, y label and the series as a polyline.
#[allow(clippy::too_many_arguments)]
fn panel(
    out: &mut String,
    frame: &Frame,
    (top, bottom): (f64, f64),
    id: &str,
    label: &str,
    colour: &str,
    samples: &[Sample],
    value: impl Fn(&Sample) -> u64,
    t_step_s: f64,
) {
    let max = samples.iter().map(&value).max().unwrap_or(0) as f64;
    let (y_max, y_step) = axis(max, 4.0);
    let y = |v: f64| bottom - (v / y_max).clamp(0.0, 1.0) * (bottom - top);
    let right = WIDTH - RIGHT;
    // Horizontal grid and y ticks.
    let mut v = 0.0;
    while v <= y_max + y_step * 1e-6 {
        let yy = y(v);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT:.1}" y1="{yy:.1}" x2="{right:.1}" y2="{yy:.1}" stroke="#dddddd" stroke-width="1"/>"##
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            yy + 4.0,
            tick_label(v)
        );
        v += y_step;
    }
    // Vertical x ticks.
    let t_max_s = frame.t_max_ms / 1000.0;
    let mut t = 0.0;
    while t <= t_max_s + t_step_s * 1e-6 {
        let xx = frame.x(t * 1000.0);
        let _ = writeln!(
            out,
            r##"<line x1="{xx:.1}" y1="{bottom:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#444444" stroke-width="1"/>"##,
            bottom + 5.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{xx:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
            bottom + 18.0,
            tick_label(t)
        );
        t += t_step_s;
    }
    // Frame.
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#444444" stroke-width="1"/>"##,
        right - LEFT,
        bottom - top
    );
    // Y label, rotated.
    let mid = (top + bottom) / 2.0;
    let _ = writeln!(
        out,
        r#"<text x="22" y="{mid:.1}" font-size="12" text-anchor="middle" transform="rotate(-90 22 {mid:.1})">{}</text>"#,
        escape(label)
    );
    // The series.
    let mut points = String::new();
    for s in samples {
        let _ = write!(
            points,
            "{:.1},{:.1} ",
            frame.x(s.at_ms as f64),
            y(value(s) as f64)
        );
    }
    let _ = writeln!(
        out,
        r#"<polyline id="{id}" class="series" fill="none" stroke="{colour}" stroke-width="1.6" stroke-linejoin="round" points="{}"/>"#,
        points.trim_end()
    );
}

/// A label above the lag panel pointing down at `x`.
struct Label {
    text: String,
    colour: &'static str,
    x: f64,
    /// Whether the text ends at `x` (else it starts there).
    end_anchor: bool,
}

/// Rough width of a character of the 10 px label font.
const LABEL_CHAR_WIDTH: f64 = 6.2;
/// Vertical distance between label rows.
const LABEL_STEP: f64 = 12.0;

impl Label {
    fn new(text: &str, colour: &'static str, x: f64, end_anchor: bool) -> Self {
        let width = Self::width_of(text);
        // A label that would run off the right edge ends at its line instead.
        let end_anchor = end_anchor || x + width > WIDTH - 4.0;
        Self {
            text: text.to_string(),
            colour,
            x,
            end_anchor,
        }
    }

    fn width_of(text: &str) -> f64 {
        text.chars().count() as f64 * LABEL_CHAR_WIDTH + 4.0
    }

    /// Left and right edges.
    fn span(&self) -> (f64, f64) {
        let w = Self::width_of(&self.text);
        if self.end_anchor {
            (self.x - w, self.x)
        } else {
            (self.x, self.x + w)
        }
    }
}

/// A row for each label, left to right, so that labels in one row do not overlap (when more
/// labels crowd one place than there are rows, the row free soonest is shared).
fn place(labels: &[Label]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.sort_by(|&a, &b| labels[a].span().0.total_cmp(&labels[b].span().0));
    let mut row_end = [f64::NEG_INFINITY; LABEL_ROWS];
    let mut rows = vec![0; labels.len()];
    for i in order {
        let (left, right) = labels[i].span();
        let row = (0..LABEL_ROWS)
            .find(|&r| row_end[r] + 4.0 <= left)
            .unwrap_or_else(|| {
                (0..LABEL_ROWS)
                    .min_by(|&a, &b| row_end[a].total_cmp(&row_end[b]))
                    .unwrap_or(0)
            });
        row_end[row] = right;
        rows[i] = row;
    }
    rows
}

/// Renders the plot.
pub(crate) fn render(input: &PlotInput<'_>) -> String {
    let last_sample = input.samples.last().map_or(0, |s| s.at_ms);
    // A little room right of the last sample so the end markers do not sit on the frame.
    let t_end_ms = last_sample
        .max(input.heal_ms)
        .max(input.converged_ms.unwrap_or(0))
        .max(1) as f64;
    let t_max_ms = t_end_ms * 1.015;
    let frame = Frame { t_max_ms };
    let (_, t_step_s) = axis(t_max_ms / 1000.0, 10.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(out, "<title>{}</title>", escape(input.title));
    let _ = writeln!(
        out,
        r##"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="24" font-size="16" font-weight="bold">{}</text>"#,
        escape(input.title)
    );
    let _ = writeln!(
        out,
        r##"<text x="{LEFT}" y="42" font-size="12" fill="#444444">{}</text>"##,
        escape(input.subtitle)
    );
    // Legend.
    let legend_y = 62.0;
    let mut lx = LEFT;
    for (name, colour, dash) in [
        ("fault", FAULT_FILL, None),
        ("clock skew / jump", INSTANT_COLOUR, Some("2,2")),
        ("heal", HEAL_COLOUR, Some("6,3")),
        ("converged", CONVERGED_COLOUR, Some("6,3")),
    ] {
        match dash {
            None => {
                let _ = writeln!(
                    out,
                    r#"<rect x="{lx:.1}" y="{:.1}" width="14" height="10" fill="{colour}" fill-opacity="0.18" stroke="{colour}" stroke-opacity="0.5"/>"#,
                    legend_y - 9.0
                );
            }
            Some(dash) => {
                let _ = writeln!(
                    out,
                    r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{colour}" stroke-width="1.5" stroke-dasharray="{dash}"/>"#,
                    legend_y - 10.0,
                    legend_y + 2.0,
                    x = lx + 7.0
                );
            }
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{legend_y:.1}" font-size="11">{name}</text>"#,
            lx + 20.0
        );
        lx += 30.0 + 6.5 * name.len() as f64;
    }

    // Fault shading and instant markers across both panels; their labels (and the heal and
    // convergence labels) go in rows above the lag panel, placed so they do not overlap.
    let mut labels = Vec::new();
    for fault in input.faults {
        let x0 = frame.x(fault.from_ms as f64);
        match fault.until_ms {
            Some(until) => {
                let x1 = frame.x(until as f64).max(x0 + 1.0);
                for (top, bottom) in [LAG_PANEL, DIV_PANEL] {
                    let _ = writeln!(
                        out,
                        r#"<rect class="fault" x="{x0:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{FAULT_FILL}" fill-opacity="0.12"/>"#,
                        x1 - x0,
                        bottom - top
                    );
                }
                labels.push(Label::new(&fault.label, FAULT_FILL, x0, false));
            }
            None => {
                for (top, bottom) in [LAG_PANEL, DIV_PANEL] {
                    let _ = writeln!(
                        out,
                        r#"<line class="instant" x1="{x0:.1}" y1="{top:.1}" x2="{x0:.1}" y2="{bottom:.1}" stroke="{INSTANT_COLOUR}" stroke-width="1.5" stroke-dasharray="2,2"/>"#
                    );
                }
                labels.push(Label::new(&fault.label, INSTANT_COLOUR, x0, false));
            }
        }
    }

    panel(
        &mut out,
        &frame,
        LAG_PANEL,
        "lag-p99",
        "lag p99 (ms)",
        LAG_COLOUR,
        input.samples,
        |s| s.lag_p99_ms,
        t_step_s,
    );
    panel(
        &mut out,
        &frame,
        DIV_PANEL,
        "divergence",
        "divergence (buckets)",
        DIV_COLOUR,
        input.samples,
        |s| s.divergence,
        t_step_s,
    );
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" font-size="12" fill="{LAG_COLOUR}" font-weight="bold">replication lag p99 per sample interval, all region pairs</text>"##,
        LEFT,
        LAG_PANEL.0 - 48.0
    );
    let _ = writeln!(
        out,
        r#"<text x="{LEFT:.1}" y="{:.1}" font-size="12" fill="{DIV_COLOUR}" font-weight="bold">divergence: digest buckets differing, summed over region pairs</text>"#,
        DIV_PANEL.0 - 10.0
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">simulated time (s)</text>"#,
        (LEFT + WIDTH - RIGHT) / 2.0,
        DIV_PANEL.1 + 38.0
    );

    // Heal and convergence markers over both panels.
    // Heal and convergence markers over both panels; their labels end at their line (the run
    // ends right after convergence).
    let mut marker = |at_ms: u64, colour: &'static str, id: &str, label: String| {
        let x = frame.x(at_ms as f64);
        let _ = writeln!(
            out,
            r#"<line id="{id}" x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{colour}" stroke-width="1.5" stroke-dasharray="6,3"/>"#,
            LAG_PANEL.0, DIV_PANEL.1
        );
        labels.push(Label::new(&label, colour, x, true));
    };
    marker(input.heal_ms, HEAL_COLOUR, "heal", "heal".into());
    if let Some(c) = input.converged_ms {
        let label = format!(
            "converged +{:.2} s",
            c.saturating_sub(input.heal_ms) as f64 / 1000.0
        );
        marker(c, CONVERGED_COLOUR, "converged", label);
    }
    let label_top = LAG_PANEL.0 - 8.0 - LABEL_STEP * (LABEL_ROWS as f64 - 1.0);
    let rows = place(&labels);
    for (label, row) in labels.iter().zip(rows) {
        let y = label_top + LABEL_STEP * row as f64;
        let (text_x, anchor) = if label.end_anchor {
            (label.x - 3.0, "end")
        } else {
            (label.x + 2.0, "start")
        };
        let _ = writeln!(
            out,
            r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{}" stroke-opacity="0.6"/>"#,
            y + 2.0,
            LAG_PANEL.0,
            label.colour,
            x = label.x
        );
        let _ = writeln!(
            out,
            r#"<text class="label" x="{text_x:.1}" y="{y:.1}" font-size="10" text-anchor="{anchor}" fill="{}">{}</text>"#,
            label.colour,
            escape(&label.text)
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        assert_eq!(nice_step(100.0, 4.0), 50.0);
        assert_eq!(nice_step(0.0, 4.0), 1.0);
        assert_eq!(axis(73.0, 4.0), (80.0, 20.0));
        assert_eq!(axis(0.0, 4.0), (1.0, 0.5));
        assert_eq!(tick_label(2.0), "2");
        assert_eq!(tick_label(0.5), "0.5");
    }

    #[test]
    fn labels_do_not_overlap() {
        let labels = vec![
            Label::new("isolate eu-west", FAULT_FILL, 400.0, false),
            Label::new("jump us-east -3000 ms", INSTANT_COLOUR, 350.0, false),
            Label::new("far away", FAULT_FILL, 800.0, false),
            Label::new("heal", HEAL_COLOUR, 900.0, true),
            Label::new("converged +0.30 s", CONVERGED_COLOUR, 905.0, true),
        ];
        let rows = place(&labels);
        for i in 0..labels.len() {
            for j in i + 1..labels.len() {
                if rows[i] == rows[j] {
                    let (a, b) = (labels[i].span(), labels[j].span());
                    assert!(
                        a.1 <= b.0 || b.1 <= a.0,
                        "{i} and {j} overlap in row {}",
                        rows[i]
                    );
                }
            }
        }
        // Near the right edge a label ends at its line.
        assert!(
            Label::new(
                "a long label near the edge",
                FAULT_FILL,
                WIDTH - 20.0,
                false
            )
            .end_anchor
        );
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("a<b>&\"'\u{1}"), "a&lt;b&gt;&amp;&quot;&apos; ");
    }

    #[test]
    fn empty_input_still_renders() {
        let svg = render(&PlotInput {
            title: "t",
            subtitle: "s",
            samples: &[],
            faults: &[],
            heal_ms: 0,
            converged_ms: None,
        });
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(!svg.contains("NaN"));
    }
}
