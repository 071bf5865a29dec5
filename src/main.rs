//! `meterflow`: one binary, one subcommand per job (SPEC §10).

mod kafka;
mod loadgen;
mod pipeline;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// Usage metering and billing: Kafka → timely/differential → Postgres → HTTP.
#[derive(Debug, Parser)]
#[command(name = "meterflow", version, about)]
struct Cli {
    /// Postgres connection string.
    #[arg(
        long,
        env = "MF_DATABASE_URL",
        default_value = "postgres://meterflow@127.0.0.1:5432/meterflow",
        global = true
    )]
    database_url: String,
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "MF_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    brokers: String,
    /// The events topic (created with 8 partitions if missing).
    #[arg(
        long,
        env = "MF_EVENTS_TOPIC",
        default_value = "meterflow.events",
        global = true
    )]
    topic: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update the database schema (idempotent).
    Migrate,
    /// Run the streaming pipeline: read events from Kafka, aggregate, commit to Postgres exactly once.
    Pipeline(pipeline::PipelineArgs),
    /// Serve the HTTP API.
    Api {
        /// Address to listen on.
        #[arg(long, env = "MF_API_ADDR", default_value = "127.0.0.1:3000")]
        addr: String,
    },
    /// Produce a realistic mix of usage events to Kafka.
    Loadgen(loadgen::LoadgenArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MF_LOG")
                .unwrap_or_else(|_| "info,sqlx=warn,librdkafka=warn,rdkafka::client=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match &cli.command {
        Command::Migrate => migrate(&cli.database_url),
        Command::Pipeline(args) => pipeline::run(args, &cli.database_url, &cli.brokers, &cli.topic),
        Command::Api { addr } => api(&cli, addr),
        Command::Loadgen(args) => loadgen::run(args, &cli.brokers, &cli.topic),
    }
}

fn migrate(database_url: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let pool = connect(database_url, 1).await?;
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

async fn connect(database_url: &str, max: u32) -> Result<sqlx::PgPool> {
    meterflow_api::pool_options(max)
        .connect(database_url)
        .await
        .with_context(|| format!("cannot connect to Postgres at {database_url}; is it running? (deploy/local/up starts it)"))
}

fn api(cli: &Cli, addr: &str) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        kafka::ensure_topic(&cli.brokers, &cli.topic, kafka::DEFAULT_PARTITIONS).await?;
        let pool = connect(&cli.database_url, 32).await?;
        let producer = kafka::producer_config(&cli.brokers)
            .create()
            .context("creating the Kafka producer")?;
        let state = meterflow_api::AppState::new(pool, producer, cli.topic.clone());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(%addr, topic = %cli.topic, "api listening");
        meterflow_api::serve(listener, state, shutdown_signal()).await?;
        tracing::info!("api stopped");
        Ok(())
    })
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
