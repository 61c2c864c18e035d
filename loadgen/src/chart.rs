//! SVG charts, written by hand: line charts and scatter plots with axes,
//! ticks and a legend, and nothing to install (no fonts, no native libs).

use std::fmt::Write as _;

use crate::report::Report;

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// One named series of points.
pub struct Series {
    /// Legend label.
    pub name: String,
    /// (x, y) points, in x order for lines.
    pub points: Vec<(f64, f64)>,
}

/// A chart panel.
pub struct Panel {
    /// Title above the plot.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Data.
    pub series: Vec<Series>,
    /// Draw points only (a scatter) instead of lines with points.
    pub scatter: bool,
    /// Place x on a log2 scale (partition counts 1, 2, 4, ...).
    pub x_log2: bool,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn label(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() < 0.01 {
        format!("{v:.4}")
    } else {
        format!("{v:.2}")
    }
}

impl Panel {
    /// Renders the panel at (`x0`, `y0`) with the given size, as SVG elements.
    pub fn render(&self, x0: f64, y0: f64, w: f64, h: f64) -> String {
        let (ml, mr, mt, mb) = (70.0, 160.0, 30.0, 45.0);
        let (pw, ph) = (w - ml - mr, h - mt - mb);
        let tx = |x: f64| if self.x_log2 { x.max(1e-9).log2() } else { x };
        let all: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .collect();
        let (mut xmin, mut xmax) = all
            .iter()
            .map(|p| tx(p.0))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
                (a.min(x), b.max(x))
            });
        if !xmin.is_finite() {
            (xmin, xmax) = (0.0, 1.0);
        }
        if xmax <= xmin {
            xmax = xmin + 1.0;
        }
        let ymax = nice_max(all.iter().map(|p| p.1).fold(0.0, f64::max));
        let px = |x: f64| x0 + ml + (tx(x) - xmin) / (xmax - xmin) * pw;
        let py = |y: f64| y0 + mt + ph - (y / ymax) * ph;
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="15" font-weight="bold">{}</text>"#,
            x0 + ml,
            y0 + 18.0,
            esc(&self.title)
        );
        let _ = write!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#999"/>"##,
            x0 + ml,
            y0 + mt
        );
        for i in 0..=5 {
            let v = ymax * i as f64 / 5.0;
            let y = py(v);
            let _ = write!(
                s,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
                x0 + ml,
                x0 + ml + pw,
                x0 + ml - 6.0,
                y + 4.0,
                label(v)
            );
        }
        let mut xticks: Vec<f64> = if self.x_log2 {
            let mut t: Vec<f64> = all.iter().map(|p| p.0).collect();
            t.sort_by(f64::total_cmp);
            t.dedup();
            t
        } else {
            let step = nice_max((xmax - xmin) / 5.0);
            let first = (xmin / step).ceil() * step;
            (0..=10)
                .map(|i| first + step * i as f64)
                .filter(|v| *v <= xmax + step * 1e-9)
                .collect()
        };
        xticks.truncate(20);
        for v in xticks {
            let x = px(v);
            let _ = write!(
                s,
                r#"<text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
                y0 + mt + ph + 16.0,
                label(v)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
            x0 + ml + pw / 2.0,
            y0 + h - 8.0,
            esc(&self.x_label)
        );
        let _ = write!(
            s,
            r#"<text transform="translate({:.1},{:.1}) rotate(-90)" font-size="12" text-anchor="middle">{}</text>"#,
            x0 + 16.0,
            y0 + mt + ph / 2.0,
            esc(&self.y_label)
        );
        for (i, series) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            if !self.scatter && series.points.len() > 1 {
                let pts: Vec<String> = series
                    .points
                    .iter()
                    .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                    .collect();
                let _ = write!(
                    s,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                    pts.join(" ")
                );
            }
            let r = if self.scatter {
                1.2
            } else if series.points.len() > 60 {
                0.0
            } else {
                3.0
            };
            for (x, y) in series.points.iter().filter(|_| r > 0.0) {
                let _ = write!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="{r}" fill="{color}"/>"#,
                    px(*x),
                    py(*y)
                );
            }
            let ly = y0 + mt + 14.0 + 18.0 * i as f64;
            let lx = x0 + ml + pw + 12.0;
            let _ = write!(
                s,
                r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
                ly - 10.0,
                lx + 16.0,
                ly,
                esc(&series.name)
            );
        }
        s
    }
}

/// Stacks panels vertically into one SVG document.
pub fn document(panels: &[Panel], width: f64, panel_height: f64) -> String {
    let height = panel_height * panels.len() as f64;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"#
    );
    for (i, p) in panels.iter().enumerate() {
        s.push_str(&p.render(0.0, panel_height * i as f64, width, panel_height));
    }
    s.push_str("</svg>\n");
    s
}

/// The chart of one drop: rates over time, and decision rank against
/// arrival rank (a diagonal is perfect first-come order).
pub fn drop_chart(report: &Report) -> String {
    let rates = Panel {
        title: format!("Drop {}: rates over time", report.event_id),
        x_label: "seconds since start".into(),
        y_label: "per second".into(),
        series: match &report.raw {
            Some(raw) => fine_rates(raw, report.started_at),
            None => {
                let series = &report.throughput.series;
                let line = |name: &str, f: fn(&crate::report::Second) -> u64| Series {
                    name: name.into(),
                    points: series.iter().map(|s| (s.t as f64, f(s) as f64)).collect(),
                };
                vec![
                    line("accepted", |s| s.accepted),
                    line("decided", |s| s.decided),
                    line("issued", |s| s.issued),
                ]
            }
        },
        scatter: false,
        x_log2: false,
    };
    let mut panels = vec![rates];
    if let Some(raw) = &report.raw {
        panels.push(order_panel(raw, report.stock));
    }
    document(&panels, 900.0, 380.0)
}

/// Rates per second computed over 100 ms buckets, from raw data.
fn fine_rates(raw: &crate::report::Raw, start: u64) -> Vec<Series> {
    use std::collections::{BTreeMap, HashSet};
    const BUCKET_US: u64 = 100_000;
    let bucket = |t: u64| t.saturating_sub(start) / BUCKET_US;
    let mut counts: [BTreeMap<u64, u64>; 3] = Default::default();
    for a in &raw.accepted {
        *counts[0]
            .entry(bucket(a.acceptance.accepted_at))
            .or_default() += 1;
    }
    let mut seen = HashSet::new();
    for o in &raw.outcomes {
        if seen.insert(o.outcome.request_id) {
            *counts[1].entry(bucket(o.observed_at)).or_default() += 1;
            if o.outcome.result == couponrush_core::DecisionResult::Issued {
                *counts[2].entry(bucket(o.observed_at)).or_default() += 1;
            }
        }
    }
    let last = counts
        .iter()
        .filter_map(|c| c.keys().last())
        .max()
        .copied()
        .unwrap_or(0);
    ["accepted", "decided", "issued"]
        .iter()
        .zip(&counts)
        .map(|(name, c)| Series {
            name: name.to_string(),
            points: (0..=last + 1)
                .map(|b| (b as f64 / 10.0, *c.get(&b).unwrap_or(&0) as f64 * 10.0))
                .collect(),
        })
        .collect()
}

fn order_panel(raw: &crate::report::Raw, stock: u32) -> Panel {
    use std::collections::HashMap;
    let arrival: HashMap<uuid::Uuid, u64> = raw
        .accepted
        .iter()
        .map(|a| (a.request_id, a.acceptance.accepted_at))
        .collect();
    let mut first: HashMap<uuid::Uuid, (u64, u64, bool)> = HashMap::new();
    for o in &raw.outcomes {
        if let Some(at) = arrival.get(&o.outcome.request_id) {
            if o.outcome.decision_seq > 0 {
                first.entry(o.outcome.request_id).or_insert((
                    *at,
                    o.outcome.decision_seq,
                    o.outcome.result == couponrush_core::DecisionResult::Issued,
                ));
            }
        }
    }
    let mut by_arrival: Vec<(u64, u64, bool)> = first.into_values().collect();
    by_arrival.sort_unstable();
    let mut seqs: Vec<u64> = by_arrival.iter().map(|x| x.1).collect();
    seqs.sort_unstable();
    let step = (by_arrival.len() / 4000).max(1);
    let (mut won, mut lost) = (Vec::new(), Vec::new());
    for (i, (_, seq, issued)) in by_arrival.iter().enumerate().step_by(step) {
        let rank = seqs.partition_point(|s| s < seq) as f64;
        if *issued {
            won.push((i as f64, rank));
        } else {
            lost.push((i as f64, rank));
        }
    }
    Panel {
        title: format!(
            "Arrival rank vs decision rank (diagonal = strict first-come; stock {stock})"
        ),
        x_label: "arrival rank (accept order)".into(),
        y_label: "decision rank".into(),
        series: vec![
            Series {
                name: "issued".into(),
                points: won,
            },
            Series {
                name: "not issued".into(),
                points: lost,
            },
        ],
        scatter: true,
        x_log2: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_well_formed_document() {
        let panel = Panel {
            title: "t <&>".into(),
            x_label: "partitions".into(),
            y_label: "issued/s".into(),
            series: vec![Series {
                name: "spread".into(),
                points: vec![(1.0, 10.0), (2.0, 20.0), (4.0, 35.0)],
            }],
            scatter: false,
            x_log2: true,
        };
        let svg = document(&[panel], 800.0, 300.0);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("polyline"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        assert_eq!(svg.matches("<circle").count(), 3);
    }

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.3), 10.0);
        assert_eq!(nice_max(1234.0), 2000.0);
        assert_eq!(nice_max(0.042), 0.05);
    }
}
