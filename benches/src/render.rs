//! Rendering a [`Report`]: the table for people and one SVG chart per workload.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::report::{
    CaseResult, Figure, Outcome, Report, Role, SideResult, Summary, WorkloadResult,
};

/// A value of `figure` for people: `12.3 ms`, `1.23 s`, `345 MiB/s`.
pub fn fmt_value(figure: Figure, v: f64) -> String {
    match figure {
        Figure::Throughput => {
            let mib = v / (1024.0 * 1024.0);
            if mib >= 100.0 {
                format!("{mib:.0} MiB/s")
            } else {
                format!("{mib:.1} MiB/s")
            }
        }
        _ => {
            if v >= 1.0 {
                format!("{v:.2} s")
            } else if v >= 0.01 {
                format!("{:.1} ms", v * 1e3)
            } else {
                format!("{:.2} ms", v * 1e3)
            }
        }
    }
}

fn fmt_ratio(s: &SideResult, reference: Option<&str>) -> String {
    if Some(s.id.as_str()) == reference {
        return "(ref)".into();
    }
    match s.ratio {
        Some(r) => format!("{r:.2}×"),
        None => "-".into(),
    }
}

fn role_mark(r: Role) -> &'static str {
    match r {
        Role::Subject => "*",
        Role::Baseline => " ",
        Role::Reference => "~",
    }
}

/// The text table of a whole report.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let env = &report.environment;
    let _ = writeln!(
        out,
        "nixmux bench {} — {} CPUs, load {:.2} → {:.2}, {}{}; {}",
        report.nixmux_version,
        env.cpus,
        env.load_before[0],
        env.load_after[0],
        if env.targets.embedded {
            format!("{} local rig builders", env.targets.builders.len())
        } else {
            format!("builders {}", env.targets.builders.join(", "))
        },
        match report.settings.wan {
            Some(w) => format!(
                ", WAN {} ms RTT / {}",
                w.rtt_ms,
                w.mbit.map_or("unlimited".into(), |m| format!("{m} Mbit/s"))
            ),
            None => String::new(),
        },
        [
            env.nix_version.as_deref().unwrap_or("no nix"),
            env.openssh_version.as_deref().unwrap_or("no ssh"),
        ]
        .join(", ")
    );
    let _ = writeln!(
        out,
        "ratio: how many times nixmux (the (ref) row) is faster than that row, median vs median; * nixmux, ~ yardstick"
    );
    for w in &report.workloads {
        out.push('\n');
        out.push_str(&workload_table(w));
    }
    let _ = writeln!(out, "\ntotal {:.0} s", report.duration_s);
    out
}

/// The text table of one workload.
pub fn workload_table(w: &WorkloadResult) -> String {
    let mut out = String::new();
    let figure_name = match w.primary {
        Figure::Wall => "time per sample",
        Figure::PerOp => "time per operation",
        Figure::Throughput => "throughput",
    };
    let _ = writeln!(out, "== {}: {} ({figure_name})", w.name, w.title);
    let header = [
        "side",
        "median",
        "p90",
        "p99",
        "min",
        "max",
        "n",
        "fail",
        "ratio",
        "cpu/sample",
        "peak rss",
    ];
    for case in &w.cases {
        if !case.label.is_empty() {
            let _ = writeln!(out, "-- {}", case.label);
        }
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| (*s).to_owned()).collect()];
        let mut tails = Vec::new();
        for s in &case.sides {
            let id = format!("{}{}", role_mark(s.role), s.id);
            match (&s.outcome, s.figure(w.primary)) {
                (Outcome::Measured, Some(f)) => {
                    let v = |x: f64| fmt_value(w.primary, x);
                    rows.push(vec![
                        id.clone(),
                        v(f.median),
                        v(f.p90),
                        v(f.p99),
                        v(f.min),
                        v(f.max),
                        f.n.to_string(),
                        s.failures.to_string(),
                        fmt_ratio(s, case.reference.as_deref()),
                        s.cpu
                            .map(|c| {
                                format!(
                                    "{:.0}+{:.0} ms",
                                    (c.user_s + c.system_s) * 1e3,
                                    (c.children_user_s + c.children_system_s) * 1e3
                                )
                            })
                            .unwrap_or_else(|| "-".into()),
                        s.peak_rss_bytes
                            .map(|b| format!("{:.0} MiB", b as f64 / 1048576.0))
                            .unwrap_or_else(|| "-".into()),
                    ]);
                }
                (Outcome::Unavailable { reason }, _) => {
                    tails.push(format!("   {id}: unavailable: {reason}"));
                }
                (Outcome::Failed { error }, _) => {
                    tails.push(format!("   {id}: FAILED: {error}"));
                }
                (Outcome::Measured, None) => tails.push(format!("   {id}: no figure")),
            }
            if let (Outcome::Measured, Some(e)) = (&s.outcome, s.details.get("last_error")) {
                tails.push(format!("   {id}: {} failure(s), last: {e}", s.failures));
            }
        }
        if rows.len() == 1 {
            rows.clear();
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        for r in &rows {
            let mut line = String::from("  ");
            for (c, cell) in r.iter().enumerate() {
                let pad = widths[c] - cell.chars().count();
                if c == 0 {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                } else {
                    line.push_str(&" ".repeat(pad + 2));
                    line.push_str(cell);
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
        for t in tails {
            let _ = writeln!(out, "{}", truncate(&t, 400));
        }
        for s in case.sides.iter().filter(|s| s.role == Role::Subject) {
            let d: Vec<String> = s
                .details
                .iter()
                .filter(|(k, _)| k.as_str() != "last_error")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if !d.is_empty() {
                let _ = writeln!(out, "   {}: {}", s.id, truncate(&d.join(" "), 400));
            }
        }
    }
    for g in &w.goals {
        let _ = writeln!(
            out,
            "  goal [{}] {} ({}): {}",
            g.verdict, g.text, g.issue, g.measured
        );
    }
    for n in &w.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n).collect();
        t.push('…');
        t
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

fn color(role: Role, k: usize) -> &'static str {
    match role {
        Role::Subject if k == 0 => "#1f77b4",
        _ => COLORS[k % COLORS.len()],
    }
}

/// One SVG chart for a workload: horizontal bars (median, with a p90 whisker and the min–max
/// range) per side for plain workloads and sweeps of a few cases; a line per side over the
/// swept parameter for sweeps.
pub fn chart(w: &WorkloadResult) -> String {
    let sweep = w.cases.len() > 1 && w.cases.iter().all(|c| c.param.is_some()) && w.name != "query";
    if sweep { line_chart(w) } else { bar_chart(w) }
}

fn bar_chart(w: &WorkloadResult) -> String {
    let rows: Vec<(&CaseResult, &SideResult, Summary)> = w
        .cases
        .iter()
        .flat_map(|c| {
            c.sides
                .iter()
                .filter_map(move |s| s.figure(w.primary).map(|f| (c, s, *f)))
        })
        .collect();
    let width = 900.0;
    let left = 330.0;
    let right = 110.0;
    let bar_h = 18.0;
    let gap = 8.0;
    let top = 60.0;
    let height = top + rows.len() as f64 * (bar_h + gap) + 50.0;
    let max = rows
        .iter()
        .map(|(_, _, f)| f.max.max(f.p90))
        .fold(0.0_f64, f64::max)
        .max(1e-12);
    let x = |v: f64| left + (v / max) * (width - left - right);
    let mut svg = svg_open(width, height, w);
    for (k, (c, s, f)) in rows.iter().enumerate() {
        let y = top + k as f64 * (bar_h + gap);
        let name = if c.label.is_empty() {
            s.id.clone()
        } else {
            format!("{} · {}", c.label, s.id)
        };
        let col = color(s.role, k);
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end" font-size="12">{}</text>"#,
            left - 8.0,
            y + bar_h * 0.75,
            esc(&name)
        );
        let _ = write!(
            svg,
            r#"<rect x="{left}" y="{y}" width="{:.1}" height="{bar_h}" fill="{col}" opacity="0.85"><title>{}</title></rect>"#,
            (x(f.median) - left).max(1.0),
            esc(&s.label)
        );
        // min–max range and p90 tick.
        let ym = y + bar_h / 2.0;
        let _ = write!(
            svg,
            r##"<line x1="{:.1}" y1="{ym}" x2="{:.1}" y2="{ym}" stroke="#333" stroke-width="1"/>"##,
            x(f.min),
            x(f.max)
        );
        let _ = write!(
            svg,
            r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#333" stroke-width="2"/>"##,
            x(f.p90),
            y + 2.0,
            y + bar_h - 2.0
        );
        let label = match s.ratio {
            Some(r) => format!("{} ({r:.2}×)", fmt_value(w.primary, f.median)),
            None => fmt_value(w.primary, f.median),
        };
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" font-size="11">{}</text>"#,
            x(f.max.max(f.p90)) + 6.0,
            y + bar_h * 0.75,
            esc(&label)
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{left}" y="{}" font-size="11" fill="#555">bar: median · whisker: min–max · tick: p90 · (n×): nixmux's advantage</text>"##,
        height - 20.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn line_chart(w: &WorkloadResult) -> String {
    let width = 900.0;
    let height = 460.0;
    let (left, right, top, bottom) = (80.0, 220.0, 60.0, 60.0);
    let xs: Vec<f64> = w.cases.iter().filter_map(|c| c.param).collect();
    let log_x = xs.iter().cloned().fold(0.0_f64, f64::max)
        / xs.iter().cloned().fold(f64::MAX, f64::min).max(1e-9)
        > 8.0;
    let tx = |v: f64| if log_x { v.max(1e-9).log2() } else { v };
    let (x0, x1) = (
        xs.iter().cloned().map(tx).fold(f64::MAX, f64::min),
        xs.iter().cloned().map(tx).fold(f64::MIN, f64::max),
    );
    let mut ids: Vec<(String, Role)> = Vec::new();
    for c in &w.cases {
        for s in &c.sides {
            if !ids.iter().any(|(i, _)| *i == s.id) {
                ids.push((s.id.clone(), s.role));
            }
        }
    }
    let ymax = w
        .cases
        .iter()
        .flat_map(|c| {
            c.sides
                .iter()
                .filter_map(|s| s.figure(w.primary).map(|f| f.median))
        })
        .fold(0.0_f64, f64::max)
        .max(1e-12)
        * 1.1;
    let px = |v: f64| {
        if (x1 - x0).abs() < 1e-12 {
            left + (width - left - right) / 2.0
        } else {
            left + (tx(v) - x0) / (x1 - x0) * (width - left - right)
        }
    };
    let py = |v: f64| top + (1.0 - v / ymax) * (height - top - bottom);
    let mut svg = svg_open(width, height, w);
    // Axes and ticks.
    let _ = write!(
        svg,
        r##"<line x1="{left}" y1="{0}" x2="{1}" y2="{0}" stroke="#333"/><line x1="{left}" y1="{top}" x2="{left}" y2="{0}" stroke="#333"/>"##,
        height - bottom,
        width - right
    );
    for c in &w.cases {
        if let Some(p) = c.param {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle">{}</text>"#,
                px(p),
                height - bottom + 16.0,
                esc(&c.label)
            );
        }
    }
    for k in 0..=4 {
        let v = ymax * f64::from(k) / 4.0;
        let _ = write!(
            svg,
            r##"<text x="{0}" y="{1:.1}" font-size="11" text-anchor="end">{3}</text><line x1="{left}" y1="{1:.1}" x2="{2}" y2="{1:.1}" stroke="#ddd"/>"##,
            left - 6.0,
            py(v),
            width - right,
            esc(&fmt_value(w.primary, v))
        );
    }
    for (k, (id, role)) in ids.iter().enumerate() {
        let col = color(*role, k);
        let pts: Vec<(f64, f64)> = w
            .cases
            .iter()
            .filter_map(|c| {
                let p = c.param?;
                let s = c.side(id)?;
                let f = s.figure(w.primary)?;
                Some((px(p), py(f.median)))
            })
            .collect();
        let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = write!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{col}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for (x, y) in &pts {
            let _ = write!(
                svg,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{col}"/>"#
            );
        }
        let ly = top + 10.0 + k as f64 * 18.0;
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{col}"/><text x="{}" y="{}" font-size="12">{}</text>"#,
            width - right + 12.0,
            ly - 10.0,
            width - right + 30.0,
            ly,
            esc(id)
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{left}" y="{}" font-size="11" fill="#555">median per point{}</text>"##,
        height - 16.0,
        if log_x { "; x axis logarithmic" } else { "" }
    );
    svg.push_str("</svg>\n");
    svg
}

fn svg_open(width: f64, height: f64, w: &WorkloadResult) -> String {
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/><text x="12" y="24" font-size="15" font-weight="bold">{}</text><text x="12" y="42" font-size="12" fill="#555">{}</text>"##,
        esc(&format!("{}: {}", w.name, w.title)),
        esc(match w.primary {
            Figure::Wall => "time per sample (lower is better)",
            Figure::PerOp => "time per operation (lower is better)",
            Figure::Throughput => "throughput (higher is better)",
        })
    )
}

/// Writes one `<workload>.svg` per workload with figures into `dir`; returns the paths.
///
/// # Errors
/// The directory or a file cannot be written.
pub fn write_charts(report: &Report, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for w in &report.workloads {
        if w.cases
            .iter()
            .all(|c| c.sides.iter().all(|s| s.figure(w.primary).is_none()))
        {
            continue;
        }
        let p = dir.join(format!("{}.svg", w.name));
        std::fs::write(&p, chart(w))?;
        out.push(p);
    }
    Ok(out)
}
