//! A small SVG line chart for `cairn route eval`'s quality-against-budget curves: no
//! plotting crate for one figure kind, and SVG opens in any browser.

use std::fmt::Write;

pub struct Series {
    pub name: String,
    /// (x, y) points, drawn in order; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Log-scaled x axis (budgets span decades).
    pub log_x: bool,
    pub series: Vec<Series>,
}

const W: f64 = 640.0;
const H: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 6] = ["#1b6ca8", "#d1495b", "#2e8b57", "#8e6c8a", "#edae49", "#555555"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Round numbers for axis ticks between `lo` and `hi`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= 6.0).unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + 1e-9 * step {
        out.push(t);
        t += step;
    }
    out
}

fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 || v.abs() < 0.01 {
        format!("{v:.3e}").replace("e0", "")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

impl Chart {
    pub fn to_svg(&self) -> String {
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.log_x || *x > 0.0))
            .collect();
        let fx = |x: f64| if self.log_x { x.log10() } else { x };
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in &pts {
            x0 = x0.min(fx(x));
            x1 = x1.max(fx(x));
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if pts.is_empty() {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 - x0 < 1e-12 {
            x1 = x0 + 1.0;
        }
        let pad = ((y1 - y0) * 0.08).max(1e-3);
        (y0, y1) = (y0 - pad, y1 + pad);
        let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        let sx = |x: f64| LEFT + (fx(x) - x0) / (x1 - x0) * pw;
        let sy = |y: f64| TOP + (y1 - y) / (y1 - y0) * ph;
        let mut o = String::new();
        let _ = writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            o,
            r#"<text x="{}" y="22" font-size="14" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            esc(&self.title)
        );
        let _ = writeln!(o, r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##);
        // x ticks: decades (and 2, 5 between) on a log axis, round steps otherwise.
        let xt: Vec<f64> = if self.log_x {
            let (a, b) = (x0.floor() as i32, x1.ceil() as i32);
            (a..=b)
                .flat_map(|d| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(d)))
                .filter(|v| (x0 - 1e-9..=x1 + 1e-9).contains(&v.log10()))
                .collect()
        } else {
            ticks(x0, x1)
        };
        for x in xt {
            let px = sx(x);
            let _ = writeln!(o, r##"<line x1="{px:.1}" y1="{}" x2="{px:.1}" y2="{}" stroke="#ddd"/>"##, TOP, TOP + ph);
            let _ =
                writeln!(o, r#"<text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"#, TOP + ph + 16.0, label(x));
        }
        for y in ticks(y0, y1) {
            let py = sy(y);
            let _ = writeln!(o, r##"<line x1="{LEFT}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#ddd"/>"##, LEFT + pw);
            let _ =
                writeln!(o, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, LEFT - 6.0, py + 4.0, label(y));
        }
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            H - 12.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            o,
            r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            esc(&self.y_label)
        );
        for (k, s) in self.series.iter().enumerate() {
            let c = COLOURS[k % COLOURS.len()];
            let path: Vec<String> = s
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.log_x || *x > 0.0))
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let _ = writeln!(o, r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#, path.join(" "));
            for p in &path {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(o, r#"<circle cx="{x}" cy="{y}" r="3" fill="{c}"/>"#);
            }
            let ly = TOP + 14.0 + 18.0 * k as f64;
            let lx = LEFT + pw + 12.0;
            let _ = writeln!(
                o,
                r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="2"/>"#,
                lx + 20.0
            );
            let _ = writeln!(o, r#"<text x="{}" y="{}">{}</text>"#, lx + 26.0, ly + 4.0, esc(&s.name));
        }
        o.push_str("</svg>\n");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_holds_every_series_and_point() {
        let c = Chart {
            title: "bits per byte <vs> budget".into(),
            x_label: "latency budget (s)".into(),
            y_label: "bits/byte".into(),
            log_x: true,
            series: vec![
                Series { name: "MoE²".into(), points: vec![(0.1, 1.2), (1.0, 1.0), (10.0, 0.9)] },
                Series { name: "single".into(), points: vec![(0.1, 1.3), (1.0, f64::NAN), (10.0, 1.0)] },
            ],
        };
        let svg = c.to_svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 5, "the NaN point is skipped");
        assert!(svg.contains("&lt;vs&gt;") && svg.contains("MoE²"));
        let t = ticks(0.0, 1.0);
        assert_eq!(t.len(), 6, "{t:?}");
        assert!(t[0] == 0.0 && (t[5] - 1.0).abs() < 1e-9 && (t[1] - 0.2).abs() < 1e-9, "{t:?}");
    }
}
