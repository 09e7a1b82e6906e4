//! The `--svg` plot, written by hand (no plotting crate): the delivery latency by percentile
//! (HdrHistogram's usual log "1/(1-percentile)" axis), and latency and delivered/s per second
//! of the run.

use std::fmt::Write as _;

use crate::hist::Hist;
use crate::report::SeriesPoint;

const W: f64 = 960.0;
const H: f64 = 760.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 80.0;
const PLOT_W: f64 = W - LEFT - RIGHT;

/// The smallest 1, 2 or 5 times a power of ten that is at least `v` (and positive).
pub fn nice_ceiling(v: f64) -> f64 {
    if v.is_nan() || v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= v * (1.0 - 1e-9) {
            return m * p;
        }
    }
    10.0 * p
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn polyline(out: &mut String, pts: &[(f64, f64)], color: &str, dash: &str) {
    if pts.is_empty() {
        return;
    }
    let mut d = String::new();
    for (x, y) in pts {
        let _ = write!(d, "{x:.1},{y:.1} ");
    }
    let _ = writeln!(
        out,
        r#"<polyline fill="none" stroke="{color}" stroke-width="2" {dash} points="{}"/>"#,
        d.trim_end()
    );
}

fn text(out: &mut String, x: f64, y: f64, anchor: &str, size: u32, s: &str) {
    let _ = writeln!(
        out,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" font-size="{size}">{}</text>"#,
        esc(s)
    );
}

fn frame(out: &mut String, top: f64, height: f64) {
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{top}" width="{PLOT_W}" height="{height}" fill="none" stroke="#444"/>"##
    );
}

fn hline(out: &mut String, y: f64) {
    let _ = writeln!(
        out,
        r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
        LEFT + PLOT_W
    );
}

fn vline(out: &mut String, x: f64, top: f64, height: f64) {
    let _ = writeln!(
        out,
        r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/>"##,
        top + height
    );
}

/// The whole SVG document.
pub fn render(title: &str, latency: &Hist, series: &[SeriesPoint]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif">"#
    );
    let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    text(&mut out, W / 2.0, 28.0, "middle", 16, title);
    percentile_panel(&mut out, latency, 60.0, 270.0);
    time_panel(&mut out, series, 420.0, 270.0);
    out.push_str("</svg>\n");
    out
}

fn percentile_panel(out: &mut String, h: &Hist, top: f64, height: f64) {
    text(
        out,
        LEFT,
        top - 10.0,
        "start",
        13,
        "Delivery latency by percentile (ms, from intended send time)",
    );
    frame(out, top, height);
    let curve: Vec<(f64, f64)> = h
        .curve()
        .into_iter()
        .filter(|(q, _)| *q < 1.0)
        .map(|(q, v)| ((1.0 / (1.0 - q)).log10(), v as f64 / 1000.0))
        .collect();
    // x: 0 (0%) to 2..6 nines, as far as the data goes.
    let x_max = curve
        .iter()
        .map(|(x, _)| x.ceil())
        .fold(2.0f64, f64::max)
        .min(6.0);
    let y_max = nice_ceiling(h.max() as f64 / 1000.0);
    let sx = |x: f64| LEFT + PLOT_W * (x / x_max);
    let sy = |y: f64| top + height - height * (y / y_max).min(1.0);
    for i in 0..=x_max as u32 {
        let x = sx(f64::from(i));
        vline(out, x, top, height);
        let label = match i {
            0 => "0%".to_owned(),
            n => format!("{}%", 100.0 - 100.0 / 10f64.powi(n as i32)),
        };
        text(out, x, top + height + 16.0, "middle", 11, &label);
    }
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let y = sy(v);
        hline(out, y);
        text(out, LEFT - 6.0, y + 4.0, "end", 11, &format!("{v:.3}"));
    }
    let pts: Vec<(f64, f64)> = curve.iter().map(|&(x, y)| (sx(x), sy(y))).collect();
    polyline(out, &pts, "#1f77b4", "");
    if h.is_empty() {
        text(
            out,
            LEFT + PLOT_W / 2.0,
            top + height / 2.0,
            "middle",
            13,
            "no deliveries",
        );
    } else {
        let p = h.percentiles();
        text(
            out,
            LEFT + PLOT_W - 8.0,
            top + 18.0,
            "end",
            11,
            &format!(
                "p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms  ({} samples)",
                p.p50 as f64 / 1000.0,
                p.p99 as f64 / 1000.0,
                p.p999 as f64 / 1000.0,
                p.max as f64 / 1000.0,
                p.count
            ),
        );
    }
}

fn time_panel(out: &mut String, series: &[SeriesPoint], top: f64, height: f64) {
    text(
        out,
        LEFT,
        top - 10.0,
        "start",
        13,
        "Per second: latency p50 / p99 / max (ms, left) and delivered/s (bars, right)",
    );
    frame(out, top, height);
    let n = series.len().max(1) as f64;
    let lat_max = nice_ceiling(
        series
            .iter()
            .map(|p| p.max_us as f64 / 1000.0)
            .fold(0.0, f64::max),
    );
    let rate_max = nice_ceiling(
        series
            .iter()
            .map(|p| p.delivered as f64)
            .fold(0.0, f64::max),
    );
    let slot = PLOT_W / n;
    let sx = |i: usize| LEFT + slot * (i as f64 + 0.5);
    let sy = |v: f64, max: f64| top + height - height * (v / max).min(1.0);
    for i in 0..=4 {
        let f = f64::from(i) / 4.0;
        let y = top + height - height * f;
        hline(out, y);
        text(
            out,
            LEFT - 6.0,
            y + 4.0,
            "end",
            11,
            &format!("{:.3}", lat_max * f),
        );
        text(
            out,
            LEFT + PLOT_W + 6.0,
            y + 4.0,
            "start",
            11,
            &format!("{:.0}", rate_max * f),
        );
    }
    for (i, p) in series.iter().enumerate() {
        let y = sy(p.delivered as f64, rate_max);
        let color = if p.grace { "#f2d4b8" } else { "#cfe3cf" };
        let _ = writeln!(
            out,
            r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{color}"/>"#,
            LEFT + slot * i as f64 + slot * 0.1,
            slot * 0.8,
            top + height - y
        );
    }
    let step = (series.len() / 12).max(1);
    for (i, p) in series.iter().enumerate().step_by(step) {
        text(
            out,
            sx(i),
            top + height + 16.0,
            "middle",
            11,
            &format!("{}s", p.t),
        );
    }
    for (pick, color, dash) in [
        (0usize, "#2ca02c", ""),
        (1, "#d62728", ""),
        (2, "#7f7f7f", r#"stroke-dasharray="4 3""#),
    ] {
        let pts: Vec<(f64, f64)> = series
            .iter()
            .enumerate()
            .filter(|(_, p)| p.delivered > 0)
            .map(|(i, p)| {
                let v = match pick {
                    0 => p.p50_us,
                    1 => p.p99_us,
                    _ => p.max_us,
                };
                (sx(i), sy(v as f64 / 1000.0, lat_max))
            })
            .collect();
        polyline(out, &pts, color, dash);
    }
    let ly = top + height + 40.0;
    for (i, (label, color)) in [
        ("p50", "#2ca02c"),
        ("p99", "#d62728"),
        ("max", "#7f7f7f"),
        ("delivered/s", "#cfe3cf"),
        ("grace period", "#f2d4b8"),
    ]
    .iter()
    .enumerate()
    {
        let x = LEFT + 130.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{x:.1}" y="{:.1}" width="14" height="10" fill="{color}"/>"#,
            ly - 9.0
        );
        text(out, x + 20.0, ly, "start", 11, label);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.2), 2.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(5.0), 5.0);
        assert_eq!(nice_ceiling(4300.0), 5000.0);
        assert!((nice_ceiling(0.013) - 0.02).abs() < 1e-12);
    }

    #[test]
    fn renders_a_well_formed_document() {
        let mut h = Hist::new();
        for v in 100..5000 {
            h.record(v);
        }
        let series: Vec<SeriesPoint> = (0..5)
            .map(|t| SeriesPoint {
                t,
                grace: t == 4,
                delivered: 1000,
                p50_us: 200,
                p99_us: 900,
                max_us: 4000,
                ..SeriesPoint::default()
            })
            .collect();
        let svg = render("chat <test> & more", &h, &series);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("chat &lt;test&gt; &amp; more"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert!(svg.contains("99.9%"));
        // Every element opened is closed (the elements used are all self-closing but svg
        // and text).
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        let empty = render("empty", &Hist::new(), &[]);
        assert!(empty.contains("no deliveries"));
    }
}
