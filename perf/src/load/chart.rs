//! A self-contained HTML page of line charts (inline SVG, no scripts, nothing fetched): latency
//! percentiles and throughput over time, and what each component used. Small enough to hand-write:
//! a plotting crate would bring a font stack for four polylines.

use std::fmt::Write;

/// One line of a chart.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// One chart: a title, a y-axis label and its lines; `log` draws the y-axis on a log scale.
pub struct Chart<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    pub log: bool,
    pub series: Vec<Series<'a>>,
}

const W: f64 = 960.0;
const H: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 34.0;

impl Chart<'_> {
    fn svg(&self) -> String {
        let points = self.series.iter().flat_map(|s| s.points.iter());
        let x_max = points.clone().map(|p| p.0).fold(1.0, f64::max);
        let y_max = points.clone().map(|p| p.1).fold(0.0, f64::max);
        let y_min_log = 0.1_f64;
        let y_top = if self.log {
            10f64.powf(y_max.max(y_min_log * 10.0).log10().ceil())
        } else {
            nice(y_max)
        };
        let sx = |x: f64| LEFT + x / x_max * (W - LEFT - RIGHT);
        let sy = |y: f64| {
            let f = if self.log {
                (y.max(y_min_log) / y_min_log).log10() / (y_top / y_min_log).log10()
            } else {
                y / y_top.max(1e-9)
            };
            H - BOTTOM - f.clamp(0.0, 1.0) * (H - TOP - BOTTOM)
        };
        let mut svg = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">
<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{}</text>
<text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">{}</text>
"#,
            esc(self.title),
            H / 2.0,
            H / 2.0,
            esc(self.y_label)
        );
        let ticks: Vec<f64> = if self.log {
            let decades = (y_top / y_min_log).log10().round() as i32;
            (0..=decades).map(|d| y_min_log * 10f64.powi(d)).collect()
        } else {
            (0..=4).map(|i| y_top * f64::from(i) / 4.0).collect()
        };
        for t in ticks {
            let y = sy(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - RIGHT,
                LEFT - 4.0,
                y + 4.0,
                label(t)
            );
        }
        for i in 0..=6 {
            let x = x_max * f64::from(i) / 6.0;
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0} s</text>"#,
                sx(x),
                H - BOTTOM + 16.0,
                x
            );
        }
        for (i, s) in self.series.iter().enumerate() {
            let path: Vec<String> = s
                .points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                .collect();
            let ly = TOP + 14.0 * i as f64 + 6.0;
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{}"/>
<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
                path.join(" "),
                W - RIGHT + 10.0,
                W - RIGHT + 28.0,
                W - RIGHT + 32.0,
                ly + 4.0,
                esc(s.name),
                c = s.color
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// A round upper bound for a linear axis.
fn nice(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= max)
        .unwrap_or(10.0 * magnitude)
}

fn label(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 1.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The page: a heading, a verdict table and the charts.
pub fn page(title: &str, facts: &[(String, String)], charts: &[Chart<'_>]) -> String {
    let mut html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font-family:sans-serif;margin:24px}}td{{padding:2px 12px 2px 0}}\
         .fail{{color:#b00;font-weight:bold}}.pass{{color:#070;font-weight:bold}}</style></head><body>\
         <h1>{t}</h1><table>",
        t = esc(title)
    );
    for (k, v) in facts {
        let class = match v.as_str() {
            v if v.starts_with("FAIL") => " class=\"fail\"",
            v if v.starts_with("pass") => " class=\"pass\"",
            _ => "",
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td{class}>{}</td></tr>",
            esc(k),
            esc(v)
        );
    }
    html.push_str("</table>\n");
    for c in charts {
        html.push_str(&c.svg());
    }
    html.push_str("</body></html>\n");
    html
}
