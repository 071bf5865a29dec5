//! `meterflow`: one binary, one subcommand per job (SPEC §10).

mod config;
mod import;
mod invoice_run;
mod kafka;
mod loadgen;
mod pipeline;
mod retention;
mod source_check;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{Config, LogFormat};

/// mimalloc instead of glibc's malloc: the API and the pipeline make many small, short-lived allocations
/// per event (an HTTP request, a decoded event, its strings), and malloc and free were 16 % of the API's
/// CPU per `POST /api/v1/events` (perf/results/api-profile.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Usage metering and billing: Kafka → timely/differential → Postgres → HTTP.
///
/// Configuration: defaults < TOML file (--config) < MF_* environment < flags; `meterflow config
/// --print-defaults` lists and documents every key.
#[derive(Debug, Parser)]
#[command(name = "meterflow", version, about)]
struct Cli {
    /// TOML configuration file; unknown keys are refused [env: MF_CONFIG].
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Postgres connection string (database.url) [env: MF_DATABASE_URL]. A password only through
    /// the environment.
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
    /// Kafka bootstrap servers (kafka.brokers) [env: MF_KAFKA_BROKERS].
    #[arg(long, global = true)]
    brokers: Option<String>,
    /// The events topic, created with 8 partitions if missing (kafka.events_topic) [env:
    /// MF_EVENTS_TOPIC].
    #[arg(long, global = true)]
    topic: Option<String>,
    /// Log filter, e.g. `info` or `warn,meterflow_api=debug` (log.level) [env: MF_LOG].
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log lines as text or JSON objects (log.format) [env: MF_LOG_FORMAT].
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update the database schema (idempotent).
    Migrate,
    /// Run the streaming pipeline: read events from Kafka, aggregate, commit to Postgres exactly once.
    Pipeline(pipeline::PipelineArgs),
    /// Serve the HTTP API (until SIGTERM or Ctrl-C: then finish what is in flight and exit 0).
    Api(ApiArgs),
    /// Produce a realistic mix of usage events to Kafka.
    Loadgen(loadgen::LoadgenArgs),
    /// Import a file of events (JSON Lines or CSV): with --csv, aggregated by the engine alone into a CSV (no
    /// Kafka, no Postgres); without, produced to the events topic for the pipeline to store (--wait).
    Import(import::ImportArgs),
    /// Issue every registered customer's invoice for a billing period (resumable; progress on stderr,
    /// summary on stdout).
    InvoiceRun(invoice_run::InvoiceRunArgs),
    /// Drop (optionally archive first) raw-event month partitions wholly behind the retention
    /// horizon (committed watermark − 35 days); `--dry-run` only lists them.
    Retention(retention::RetentionArgs),
    /// Show the configuration: every key documented with its default, or the effective values.
    Config(ConfigArgs),
    /// Create, list or revoke API keys (`create` prints the new key alone on stdout's last line).
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
}

#[derive(Debug, Subcommand)]
enum ApiKeyCommand {
    /// Create a key; it is shown once (only its hash is stored) on stdout's last line.
    Create {
        /// ingest: send and void events; read: also every GET; admin: everything.
        #[arg(long, value_parser = ["admin", "read", "ingest"])]
        role: String,
        /// Bind the key to this customer: it sees nothing else (anything else answers 404).
        #[arg(long, value_name = "ID")]
        customer: Option<String>,
        /// A name to recognise the key by in `api-key list`.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List every key (never the keys themselves: they are not stored).
    List,
    /// Revoke a key by its id (the part after `mf_`); the API refuses it within seconds.
    Revoke {
        #[arg(value_name = "KEY_ID")]
        key_id: String,
    },
}

#[derive(Debug, clap::Args)]
struct ApiArgs {
    /// Address to listen on (api.addr) [env: MF_API_ADDR; default 127.0.0.1:3000].
    #[arg(long)]
    addr: Option<String>,
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct ConfigArgs {
    /// Print every key with its default, environment variable, flag and meaning, as TOML (this is
    /// deploy/meterflow.example.toml).
    #[arg(long)]
    print_defaults: bool,
    /// Print the effective configuration (file, environment and flags applied), the password masked.
    #[arg(long)]
    print: bool,
}

/// Transparent huge pages off for this process (its threads and children too): mimalloc asks for
/// them, and on a VM each fault of a 2 MiB page zeroes all of it, again after every purge. With them,
/// half of a 1M-event import was the kernel zeroing pages (2.4 s of system time, perf:
/// `clear_page_erms`; without, 0.2 s), and a restart at 1M live windows spent 14 % of its samples
/// there (perf/RESULTS.md, "recovery").
fn no_transparent_huge_pages() {
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::debug!(error = %e, "could not turn transparent huge pages off");
    }
}

/// How long mimalloc keeps memory freed before it gives it back to the system, unless
/// `MIMALLOC_PURGE_DELAY` says otherwise: 10 s instead of its default 1 s. Each epoch of the dataflow
/// frees its buffers and hash tables and the next one allocates them again; memory given back in
/// between is faulted in and zeroed again page by page (on a VM, by the host as well). With it kept,
/// the dataflow alone ran 3–4 % faster and a 1M backfill 7 % (16 % and more while page faults were
/// dear on the machine; perf/RESULTS.md, "ninth sitting"), for ~5 % more peak memory. What is freed
/// and not reused still goes back after 10 s.
const PURGE_DELAY_MS: std::ffi::c_long = 10_000;

/// mimalloc's `mi_option_purge_delay` (the 16th of `mi_option_t` in its `mimalloc.h`, v2 and v3).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

extern "C" {
    /// mimalloc's `mi_option_set` (the global allocator's C library, linked through `mimalloc`).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Sets [`PURGE_DELAY_MS`] (mimalloc reads its environment once, as the process loads, so a
/// `MIMALLOC_PURGE_DELAY` given there is kept).
#[allow(unsafe_code)] // the workspace denies unsafe code; this is its one use
fn keep_freed_memory_a_while() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: `mi_option_set` stores a number in mimalloc's option table; it may be called at any
        // time, from any thread, and the option is one mimalloc defines.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

fn main() -> Result<()> {
    keep_freed_memory_a_while();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Command::Config(ConfigArgs {
        print_defaults: true,
        ..
    }) = &cli.command
    {
        print!("{}", config::render_defaults());
        return Ok(());
    }
    let env = |name: &str| std::env::var(name).ok();
    let file = cli.config.clone().or_else(|| {
        env("MF_CONFIG")
            .filter(|f| !f.is_empty())
            .map(PathBuf::from)
    });
    let loaded = config::load(file.as_deref(), &env, &flags_given(&matches))?;
    let cfg = &loaded.config;
    if let Command::Config(_) = &cli.command {
        print!("{}", config::render_effective(&loaded));
        return Ok(());
    }
    init_logging(&cfg.log)?;
    no_transparent_huge_pages();
    let (url, brokers, topic) = (
        cfg.database.url.expose(),
        cfg.kafka.brokers.as_str(),
        cfg.kafka.events_topic.as_str(),
    );
    match &cli.command {
        Command::Migrate => migrate(cfg),
        Command::Pipeline(args) => pipeline::run(args, cfg),
        Command::Api(_) => api(cfg),
        Command::Loadgen(args) => loadgen::run(args, brokers, topic),
        Command::Import(args) => import::run(args, cfg),
        Command::InvoiceRun(args) => invoice_run::run(args, url, topic),
        Command::Retention(args) => retention::run(args, url),
        Command::Config(_) => Ok(()),
        Command::ApiKey(command) => api_key(cfg, command),
    }
}

/// The configuration keys set by the flags given, as `(key, value)`: each key's flag
/// (`config::KEYS`) is looked up among the arguments of `meterflow` (the global ones) and of the
/// subcommand, by its long name, so no key is spelled here again.
fn flags_given(matches: &ArgMatches) -> Vec<(&'static str, String)> {
    let command = Cli::command();
    let sub = matches
        .subcommand()
        .and_then(|(name, sub_matches)| Some((command.find_subcommand(name)?, sub_matches)));
    let levels: Vec<(&clap::Command, &ArgMatches)> =
        std::iter::once((&command, matches)).chain(sub).collect();
    let given = |long: &str| {
        levels.iter().find_map(|(command, matches)| {
            let arg = command
                .get_arguments()
                .find(|a| a.get_long() == Some(long))?;
            let value = matches.get_raw(arg.get_id().as_str())?.next()?;
            Some(value.to_string_lossy().into_owned())
        })
    };
    config::KEYS
        .iter()
        .filter_map(|key| {
            let long = key.flag?.strip_prefix("--")?;
            Some((key.path, given(long)?))
        })
        .collect()
}

/// Structured logs on stderr: text, or one JSON object per line carrying its spans' fields (so every
/// line of an HTTP request carries the request's `request_id`).
fn init_logging(log: &config::LogConfig) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.level)
        .with_context(|| format!("log.level {:?}", log.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    Ok(())
}

fn migrate(cfg: &Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let pool = connect(cfg, 1, Duration::ZERO).await?;
        meterflow_sinks::MIGRATOR
            .run(&pool)
            .await
            .context("applying migrations")?;
        eprintln!(
            "migrate: schema is up to date ({} migrations)",
            meterflow_sinks::MIGRATOR.iter().count()
        );
        Ok(())
    })
}

/// A pool of `max` connections; `statement_timeout` (zero: none) applies to every statement on them.
async fn connect(cfg: &Config, max: u32, statement_timeout: Duration) -> Result<sqlx::PgPool> {
    let masked = cfg.database.url.masked();
    let options = meterflow_api::connect_options(cfg.database.url.expose(), statement_timeout)
        .with_context(|| format!("database.url {masked} is not a valid Postgres URL"))?;
    meterflow_api::pool_options(max)
        .acquire_timeout(Duration::from_millis(cfg.api.pool_acquire_timeout_ms))
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to Postgres at {masked}; is it running? (deploy/local/up starts it)"))
}

/// Refuses a database this binary's migrations have not all been applied to, saying to run
/// `meterflow migrate` (else the first query would fail on a missing relation).
async fn require_migrated(conn: &mut sqlx::PgConnection, cfg: &Config) -> Result<()> {
    let masked = cfg.database.url.masked();
    let schema = meterflow_sinks::schema::schema(conn)
        .await
        .with_context(|| format!("reading the schema version of {masked}"))?;
    match schema {
        meterflow_sinks::schema::Schema::Current => Ok(()),
        behind => anyhow::bail!("the database {masked} {behind}"),
    }
}

/// `meterflow api-key …`: audited as actor `cli`.
fn api_key(cfg: &Config, command: &ApiKeyCommand) -> Result<()> {
    use meterflow_api::auth;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let pool = connect(cfg, 1, Duration::ZERO).await?;
        let hint = "reading or writing api_keys; has `meterflow migrate` run?";
        match command {
            ApiKeyCommand::Create {
                role,
                customer,
                name,
            } => {
                let role = auth::Role::parse(role).context("role")?;
                if let Some(c) = customer {
                    let ok = (1..=128).contains(&c.len())
                        && c.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
                    anyhow::ensure!(
                        ok,
                        "--customer {c:?}: a customer id is 1 to 128 of A-Z a-z 0-9 . _ : -"
                    );
                }
                let (info, key) = auth::create_key(&pool, role, customer.as_deref(), name, "cli")
                    .await
                    .context(hint)?;
                eprintln!(
                    "api-key: created {} (role {}{}); shown once, store it now:",
                    info.key_id,
                    info.role,
                    info.customer_id
                        .as_deref()
                        .map(|c| format!(", bound to customer {c}"))
                        .unwrap_or_default()
                );
                println!("{key}");
            }
            ApiKeyCommand::List => {
                let keys = auth::list_keys(&pool).await.context(hint)?;
                println!("KEY_ID        ROLE    CUSTOMER  CREATED_AT            REVOKED_AT            NAME");
                for k in &keys {
                    let at = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
                    println!(
                        "{:<13} {:<7} {:<9} {:<21} {:<21} {}",
                        k.key_id,
                        k.role,
                        k.customer_id.as_deref().unwrap_or("-"),
                        at(k.created_at),
                        k.revoked_at.map_or("-".into(), at),
                        k.name
                    );
                }
                eprintln!("api-key: {} keys", keys.len());
            }
            ApiKeyCommand::Revoke { key_id } => {
                let key_id = key_id.strip_prefix("mf_").unwrap_or(key_id);
                let key_id = key_id.split('_').next().unwrap_or(key_id);
                anyhow::ensure!(
                    auth::revoke_key(&pool, key_id, "cli").await.context(hint)?,
                    "no active key {key_id} (see `meterflow api-key list`)"
                );
                eprintln!("api-key: revoked {key_id}; the API refuses it within a few seconds");
            }
        }
        Ok(())
    })
}

fn api(cfg: &Config) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(serve_api(cfg));
    // Whatever is still running (a readiness probe's metadata call) is abandoned after a moment.
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

/// Serves the API until SIGTERM or Ctrl-C, then shuts down gracefully: stop accepting connections,
/// finish the requests in flight, store and forward every event already accepted, flush Kafka.
async fn serve_api(cfg: &Config) -> Result<()> {
    let (brokers, topic, addr) = (&cfg.kafka.brokers, &cfg.kafka.events_topic, &cfg.api.addr);
    kafka::ensure_topic(brokers, topic, kafka::DEFAULT_PARTITIONS).await?;
    let statement_timeout = Duration::from_millis(cfg.api.statement_timeout_ms);
    let pool = connect(cfg, cfg.api.max_connections, statement_timeout).await?;
    require_migrated(&mut *pool.acquire().await?, cfg).await?;
    let producer: rdkafka::producer::FutureProducer = kafka::producer_config(brokers)
        .create()
        .context("creating the Kafka producer")?;
    let settings = meterflow_api::Settings {
        request_timeout: Duration::from_secs(cfg.api.request_timeout_secs),
        max_event_bytes: cfg.api.max_event_bytes,
        max_batch_bytes: cfg.api.max_batch_bytes,
        auth: cfg.api.auth == config::AuthMode::On,
        ingest_rate: meterflow_api::auth::Rate {
            per_sec: f64::from(cfg.api.ingest_rate_limit_per_sec),
            burst: f64::from(cfg.api.ingest_rate_limit_burst),
        },
        rate: meterflow_api::auth::Rate {
            per_sec: f64::from(cfg.api.rate_limit_per_sec),
            burst: f64::from(cfg.api.rate_limit_burst),
        },
        // 0: 4 slots per pool connection (admission.rs says why).
        max_in_flight: match cfg.api.max_in_flight {
            0 => (cfg.api.max_connections as usize).saturating_mul(4),
            n => n,
        },
        queue_timeout: Duration::from_millis(cfg.api.queue_timeout_ms),
        ingest_queue: cfg.api.ingest_queue,
        ..meterflow_api::Settings::default()
    };
    if !settings.auth {
        tracing::warn!(
            "AUTH IS OFF (api.auth = \"off\" / MF_AUTH=off): every request to /api/v1 is an admin with no \
             key and no rate limit. Never run like this where anyone else can reach the API."
        );
        // A banner for people reading a terminal; JSON logs stay one object per line.
        if cfg.log.format == config::LogFormat::Text {
            eprintln!("WARNING: meterflow api: AUTH IS OFF (MF_AUTH=off): anyone who can reach {addr} is an admin");
        }
    }
    let state =
        meterflow_api::AppState::with_settings(pool, producer.clone(), topic.clone(), settings);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, %topic, "api listening");

    let grace = Duration::from_secs(cfg.api.shutdown_timeout_secs);
    // The process's one cancellation token is the state's: a signal cancels it, the server stops
    // taking connections, and the background tasks (outbox relay, watermark, invoice-run sweeper) end.
    tokio::spawn({
        let state = state.clone();
        async move {
            shutdown_signal().await;
            tracing::info!(
                "stopping: no new connections; finishing the requests in flight and the accepted events"
            );
            state.stop();
        }
    });
    let signal = state.stopping();
    let stopped = async {
        meterflow_api::serve(listener, state.clone(), signal).await?;
        state.drain().await;
        anyhow::Ok(())
    };
    let overdue = async {
        state.stopping().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        stopped = stopped => stopped?,
        () = overdue => {
            tracing::error!(seconds = grace.as_secs(), "requests still in flight after api.shutdown_timeout_secs; exiting");
            anyhow::bail!("shutdown took longer than api.shutdown_timeout_secs ({} s)", grace.as_secs());
        }
    }
    let producer_flushed =
        tokio::task::spawn_blocking(move || rdkafka::producer::Producer::flush(&producer, grace))
            .await;
    if !matches!(producer_flushed, Ok(Ok(()))) {
        tracing::warn!(
            "the Kafka producer did not flush; the outbox relay will resend what it held"
        );
    }
    tracing::info!("api stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM: the one shutdown path of the API and the pipeline.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} },
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    fn longs(command: &clap::Command, out: &mut Vec<String>) {
        out.extend(
            command
                .get_arguments()
                .filter_map(|a| a.get_long().map(|l| format!("--{l}"))),
        );
        for sub in command.get_subcommands() {
            longs(sub, out);
        }
    }

    #[test]
    fn the_flags_given_set_their_keys_wherever_they_stand() {
        let given = |args: &[&str]| {
            let matches = super::Cli::command().try_get_matches_from(args).unwrap();
            super::flags_given(&matches)
        };
        let set = |pairs: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
            pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
        };
        assert_eq!(
            given(&[
                "meterflow",
                "--topic",
                "t",
                "pipeline",
                "-w",
                "3",
                "--meters",
                "m.json"
            ]),
            set(&[
                ("kafka.events_topic", "t"),
                ("pipeline.workers", "3"),
                ("pipeline.meters_file", "m.json")
            ])
        );
        assert_eq!(
            given(&["meterflow", "api", "--addr", "h:1", "--log-format", "json"]),
            set(&[("api.addr", "h:1"), ("log.format", "json")])
        );
        assert_eq!(given(&["meterflow", "migrate"]), set(&[]));
    }

    #[test]
    fn every_flag_the_configuration_documents_exists() {
        super::Cli::command().debug_assert();
        let mut flags = Vec::new();
        longs(&super::Cli::command(), &mut flags);
        for key in crate::config::KEYS.iter() {
            if let Some(flag) = key.flag {
                assert!(flags.iter().any(|f| f == flag), "{flag} ({})", key.path);
            }
        }
    }
}
