//! `documents`: rendering one invoice document (SPEC §6, `GET /api/v1/invoices/{id}/document`) on one
//! core, HTML and PDF, against a baseline measured in the same runs on the same invoice:
//! `serde_json::to_string` of it (what `GET /api/v1/invoices/{id}` spends on the same data).
//!
//! The invoice is `meterflow_documents::sample::invoice`: by default a typical one, 10 lines (one a
//! minimum top-up) and 2 adjustments. Each run renders it `--iterations` times per side, the sides
//! taking turns; the figure is µs per document, median over `--runs`, with every run and the bytes of
//! one document. Targets (issue 5): seed < 100 ms each; goals < 2 ms (HTML) and < 20 ms (PDF).
//! Prints one JSON line per run and a summary.
//!
//!     cargo build --release -p meterflow-perf --bin documents && target/release/documents --runs 5

use std::hint::black_box;
use std::time::Instant;

use clap::Parser;
use meterflow_documents::{render_html, render_pdf, sample};
use meterflow_perf::median;

#[derive(Debug, Parser)]
#[command(
    about = "Invoice HTML and PDF rendering on one core, against serde_json of the same invoice"
)]
struct Args {
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Documents rendered per side and run.
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Lines of the invoice.
    #[arg(long, default_value_t = 10)]
    lines: usize,
    /// Adjustments of the invoice.
    #[arg(long, default_value_t = 2)]
    adjustments: usize,
}

/// One side: renders a document and returns its size in bytes.
struct Side<'a> {
    name: &'static str,
    render: Box<dyn FnMut() -> usize + 'a>,
    bytes: usize,
    us: Vec<f64>,
}

impl<'a> Side<'a> {
    fn new(name: &'static str, mut render: impl FnMut() -> usize + 'a) -> Self {
        let bytes = render();
        Side {
            name,
            render: Box::new(render),
            bytes,
            us: Vec::new(),
        }
    }

    /// Renders `iterations` documents; records and prints µs per document.
    fn run(&mut self, run: usize, iterations: usize) {
        let started = Instant::now();
        let mut total = 0usize;
        for _ in 0..iterations {
            total += black_box((self.render)());
        }
        let us = started.elapsed().as_secs_f64() * 1e6 / iterations as f64;
        assert_eq!(
            total,
            self.bytes * iterations,
            "{}: every document is the same",
            self.name
        );
        println!(
            "{}",
            serde_json::json!({"bench": "documents", "side": self.name, "run": run,
                "us_per_document": (us * 10.0).round() / 10.0})
        );
        self.us.push(us);
    }
}

fn main() {
    let args = Args::parse();
    let customer = sample::customer();
    let invoice = sample::invoice(args.lines, args.adjustments, "USD");

    // The sides take turns within each run, so that a busy moment of a shared machine falls on
    // all of them rather than on one.
    let mut sides = [
        Side::new("html", || {
            render_html(black_box(&invoice), black_box(&customer)).len()
        }),
        Side::new("pdf", || {
            render_pdf(black_box(&invoice), black_box(&customer)).len()
        }),
        Side::new("serde_json", || {
            serde_json::to_string(black_box(&invoice)).unwrap().len()
        }),
    ];
    for run in 0..args.runs {
        for side in &mut sides {
            side.run(run, args.iterations);
        }
    }
    let [html, pdf, json] = sides.map(|s| (median(s.us.clone()), s.us, s.bytes));

    let round = |x: f64| (x * 10.0).round() / 10.0;
    let side = |(median, all, bytes): &(f64, Vec<f64>, usize), goal_ms: Option<f64>| {
        let mut v = serde_json::json!({"us_per_document_median": round(*median),
            "runs": all.iter().map(|x| round(*x)).collect::<Vec<_>>(), "bytes": bytes,
            "ratio_to_serde_json": round(median / json.0)});
        if let Some(goal) = goal_ms {
            v["seed_target_100_ms_met"] = (*median < 100_000.0).into();
            v[format!("goal_{goal}_ms_met")] = (*median < goal * 1000.0).into();
        }
        v
    };
    println!(
        "{}",
        serde_json::json!({"bench": "documents", "summary": true, "runs": args.runs,
            "iterations": args.iterations, "lines": args.lines, "adjustments": args.adjustments,
            "html": side(&html, Some(2.0)), "pdf": side(&pdf, Some(20.0)),
            "baseline_serde_json": side(&json, None)})
    );
}
