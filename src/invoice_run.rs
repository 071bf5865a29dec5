//! `meterflow invoice-run --period 2024-01`: every registered customer's invoice for a period, through
//! the same `store::invoice_runs` code as `POST /api/v1/invoice-runs`, with a progress bar on stderr
//! and a summary on stdout. An unfinished run of the period (this command or the API was killed) is
//! resumed rather than started again.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use meterflow_store::invoice_runs::{self as runs, RunError, RunOptions, RunStatus};
use meterflow_store::invoices::{self, Period};
use sqlx::{Connection, PgConnection};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Customers whose invoice for the period is already issued are skipped; customers with usage in the \
period that are not registered are reported, not invoiced. Killed at any moment, the command can \
simply be run again: it resumes the unfinished run, with no duplicate invoice and no gap in the \
numbers. Exit status: 0 when every customer was invoiced or skipped, 2 when some failed (the summary \
says why), 1 on any other error.")]
pub struct InvoiceRunArgs {
    /// The billing period, a calendar month (UTC): YYYY-MM. It must have ended by the clock or the
    /// pipeline's committed watermark.
    #[arg(long)]
    period: String,
    /// Customers invoiced per transaction.
    #[arg(long, default_value_t = 250)]
    batch_size: usize,
}

pub fn run(args: &InvoiceRunArgs, database_url: &str, topic: &str) -> Result<()> {
    let period =
        Period::parse_month(&args.period).with_context(|| format!("--period {}", args.period))?;
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let failed = runtime.block_on(async {
        let mut conn = PgConnection::connect(database_url).await.with_context(|| {
            format!("cannot connect to Postgres at {database_url}; is it running? (deploy/local/up starts it)")
        })?;
        let run_id = match runs::unfinished_run(&mut conn, period).await? {
            Some(run_id) => {
                eprintln!("invoice-run: resuming unfinished run {run_id} for {}", period.month());
                run_id
            }
            None => {
                let ended_by = invoices::ended_by(&mut conn, topic, chrono::Utc::now()).await?;
                match runs::create_run(&mut conn, period, ended_by).await {
                    Ok(run_id) => run_id,
                    Err(RunError::InProgress(run_id)) => run_id,
                    Err(e) => return Err(e).context("starting the invoice run"),
                }
            }
        };
        let started = Instant::now();
        let mut bar = ProgressBar::new();
        let mut first: Option<RunStatus> = None;
        let options = RunOptions {
            batch_size: args.batch_size,
        };
        let status = match runs::execute(&mut conn, &run_id, &options, |s| {
            let first = first.get_or_insert_with(|| s.clone());
            bar.show(s, first.done(), started.elapsed());
        })
        .await
        {
            Ok(status) => status,
            Err(RunError::Busy(_)) => bail!(
                "invoice run {run_id} for {} is being executed by another process (an API?); \
                 follow it at GET /api/v1/invoice-runs/{run_id}",
                period.month()
            ),
            Err(e) => return Err(e).with_context(|| format!("invoice run {run_id}")),
        };
        bar.finish();
        let issued_before = first.as_ref().map_or(status.issued, |f| f.issued);
        summary(&status, status.issued - issued_before, started.elapsed());
        Ok::<_, anyhow::Error>(status.failed)
    })?;
    if failed > 0 {
        std::process::exit(2);
    }
    Ok(())
}

/// `\r`-redrawn on a terminal; otherwise a line at most every five seconds.
struct ProgressBar {
    tty: bool,
    last: Option<Instant>,
    drawn: bool,
}

impl ProgressBar {
    fn new() -> Self {
        ProgressBar {
            tty: std::io::stderr().is_terminal(),
            last: None,
            drawn: false,
        }
    }

    fn show(&mut self, s: &RunStatus, done_at_start: i64, elapsed: Duration) {
        let every = if self.tty {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(5)
        };
        let finished = s.pending == 0;
        if !finished && self.last.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        let done = s.done();
        let rate = (done - done_at_start) as f64 / elapsed.as_secs_f64().max(1e-3);
        let eta = if rate > 0.0 {
            format!("{:.0} s", s.pending as f64 / rate)
        } else {
            "?".to_owned()
        };
        let width = 30usize;
        let filled = if s.total > 0 {
            (done as usize * width) / s.total as usize
        } else {
            width
        };
        let line = format!(
            "invoice-run {} [{}{}] {done}/{} ({:.0}%) · {rate:.0} invoices/s · ETA {eta}",
            s.period.month(),
            "#".repeat(filled),
            "-".repeat(width - filled),
            s.total,
            if s.total > 0 {
                done as f64 * 100.0 / s.total as f64
            } else {
                100.0
            },
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{line}\x1b[K");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
        self.drawn = true;
    }

    fn finish(&self) {
        if self.tty && self.drawn {
            eprintln!();
        }
    }
}

fn summary(s: &RunStatus, issued_now: i64, took: Duration) {
    let secs = took.as_secs_f64();
    println!(
        "invoice run {} for {}: {} in {secs:.2} s",
        s.run_id,
        s.period.month(),
        s.status
    );
    println!("  registered customers      {}", s.total);
    println!(
        "  issued                    {} ({issued_now} by this command, {:.0} invoices/s)",
        s.issued,
        issued_now as f64 / secs.max(1e-3)
    );
    println!("  skipped (already issued)  {}", s.skipped_existing);
    println!("  failed                    {}", s.failed);
    for (customer, why) in &s.failures {
        println!("    {customer}: {why}");
    }
    let listed = s.unregistered_sample.join(", ");
    let more = if s.unregistered > s.unregistered_sample.len() as i64 {
        ", …"
    } else {
        ""
    };
    println!(
        "  unregistered with usage   {}{}",
        s.unregistered,
        if s.unregistered > 0 {
            format!(" (not invoiced: {listed}{more})")
        } else {
            String::new()
        }
    );
}
