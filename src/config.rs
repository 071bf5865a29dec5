//! The `meterflow` configuration: one typed tree for every subcommand (SPEC §10).
//!
//! ```text
//!  Config::default()  ─►  TOML file              ─►  MF_* environment      ─►  flags (highest)
//!  Serialized::defaults   Toml::file_exact           Given: one variable       Given: one flag
//!                         (--config | MF_CONFIG):    per key, its text         per key, no
//!                         unknown keys refused,      typed by the field        password
//!                         no password
//!      each layer is extracted alone first, so its errors name the file, the variable, the flag
//!                                         │ merged in this order
//!                                         ▼
//!          Figment ──extract_lossy──► Config ──validate──► Loaded { config, sources }
//!             └───────────── find_metadata: where each value came from ─────────┘
//! ```
//! [`load`] builds it; [`Config::validate`] checks the merged tree and names the key and how to set
//! it, and [`Source`] says which layer, variable or flag set a value (`meterflow config --print`).
//!
//! A key's documentation is its field's doc comment, and a section's is the doc comment of its field
//! in [`Config`] (`documented` reads them); a key's default is its field's `#[default]`
//! (`smart-default`). [`KEYS`] joins them with the key's variable and flag; it renders `meterflow
//! config --print-defaults` (committed as `deploy/meterflow.example.toml`), and the tests below keep
//! it, the structs and the committed file in step.
//!
//! Secrets — the password in `database.url` — come from the environment only: a password in the file
//! or on the command line (visible in `ps`) is refused. [`DatabaseUrl`] holds the URL as a `secrecy`
//! secret and masks it in `Debug` and when serialized, so `meterflow config --print` shows `****`.
//!
//! Still written by hand, and why:
//! - which variable and flag set a key, where it is not `MF_{SECTION}_{KEY}` and no flag (one table
//!   in `keys.rs`): several keys have shorter variables that the README documents and deployments
//!   set (`MF_EVENTS_TOPIC`, `MF_AUTH`, `MF_LOG` …), and which keys have a flag is a choice, not a
//!   rule; the flags given are found through it (src/main.rs);
//! - the environment and flag layers (`load.rs`): figment's `Env` reads only the process
//!   environment, maps a name to a key by a prefix-and-split rule those names do not follow, and
//!   types each value by its look (a topic named `2024` becomes a number that a `String` field
//!   refuses). Ours reads through a lookup function (the tests pass one) and keeps the text as
//!   given; the field's type decides on extraction;
//! - the password policy, the checks across keys (`validate.rs`), and the printer (`render.rs`):
//!   figment reads configuration but does not write it.

mod keys;
mod load;
mod render;
mod secret;
mod validate;

use std::path::PathBuf;

use documented::DocumentedFields;
use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

pub use keys::{KEYS, SECTIONS};
pub use load::{load, Loaded, Source};
pub use render::{render_defaults, render_effective};
pub use secret::DatabaseUrl;

/// The whole configuration: one section per field, each field's doc comment documenting its section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, DocumentedFields)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Postgres, used by every subcommand but loadgen.
    pub database: DatabaseConfig,
    /// The Kafka broker and the events topic.
    pub kafka: KafkaConfig,
    /// `meterflow api`: the HTTP server, its Postgres pool and its limits.
    pub api: ApiConfig,
    /// `meterflow pipeline`: the dataflow, its epochs and watermarks, its metrics endpoint.
    /// Per-process settings stay flags: --processes, --process, --hostfile, --until-caught-up.
    pub pipeline: PipelineConfig,
    /// Logs, written to stderr.
    pub log: LogConfig,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, DocumentedFields)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Postgres connection string. A password is a secret: give it only in MF_DATABASE_URL (a
    /// password in this file or in --database-url is refused); it never prints.
    pub url: DatabaseUrl,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, DocumentedFields, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[default = "127.0.0.1:9092"]
    pub brokers: String,
    /// The events topic; created with 8 partitions if missing.
    #[default = "meterflow.events"]
    pub events_topic: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, DocumentedFields, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address (host:port) the HTTP API listens on.
    #[default = "127.0.0.1:3000"]
    pub addr: String,
    /// Size of the API's Postgres pool. A request waits at most api.pool_acquire_timeout_ms for a
    /// connection, then is answered 503 with Retry-After. The group commit of ingested events keeps
    /// 4 connections of its own besides.
    #[default(32)]
    pub max_connections: u32,
    /// A request not answered within this many seconds (body read included) is answered 503
    /// (problem+json, code TIMEOUT, Retry-After). An event whose request timed out may still have
    /// been accepted: a retry then answers 409 DUPLICATE_EVENT.
    #[default(30)]
    pub request_timeout_secs: u64,
    /// Postgres statement_timeout of the API's connections, in milliseconds (0: none); a statement
    /// cancelled by it is answered 503. Re-rating jobs run without it.
    #[default(15_000)]
    pub statement_timeout_ms: u64,
    /// Largest body of POST /api/v1/events; larger is answered 413.
    #[default(64 * 1024)]
    pub max_event_bytes: usize,
    /// Largest body of POST /api/v1/events/batch; larger is answered 413.
    #[default(1024 * 1024)]
    pub max_batch_bytes: usize,
    /// On SIGTERM or Ctrl-C the API stops accepting connections, finishes the requests in flight
    /// and stores and forwards every event it accepted, then exits 0; if that takes longer than
    /// this many seconds it exits 1 instead.
    #[default(30)]
    pub shutdown_timeout_secs: u64,
    /// "on": every /api/v1 route needs Authorization: Bearer <key> (meterflow api-key create);
    /// /healthz, /readyz, /metrics and /api/v1/openapi.json never do. "off": no keys and no rate
    /// limits, for local runs and the seed's scripts only; the API warns loudly at start.
    #[default(AuthMode::On)]
    pub auth: AuthMode,
    /// Requests per second each API key may make to the routes other than ingest (a token bucket);
    /// beyond it: 429 RATE_LIMITED with Retry-After.
    #[default(50)]
    pub rate_limit_per_sec: u32,
    /// Size of that bucket: requests a key may make at once after a pause.
    #[default(100)]
    pub rate_limit_burst: u32,
    /// Events per second each API key may send to POST /events, /events/batch and
    /// /events/{id}/void (a batch of n events counts n; it may overdraw the bucket, and the key then
    /// waits until it refilled).
    #[default(1000)]
    pub ingest_rate_limit_per_sec: u32,
    /// Size of the ingest bucket.
    #[default(2000)]
    pub ingest_rate_limit_burst: u32,
    /// Admission control: requests served at once (health, readiness and metrics apart); as many
    /// more may wait for a slot, any further one is answered 503 OVERLOADED with Retry-After at
    /// once. 0: 4 per pool connection (api.max_connections). Refusals are counted in
    /// api_refused_total{reason}.
    #[default(0)]
    pub max_in_flight: usize,
    /// Longest a request waits for a slot before its handler starts, in milliseconds; then it is
    /// answered 503 OVERLOADED with Retry-After rather than served late.
    #[default(100)]
    pub queue_timeout_ms: u64,
    /// Events queued for the group commit; when it is full, a new event is answered 503 OVERLOADED
    /// with Retry-After at once (nothing stored).
    #[default(16_384)]
    pub ingest_queue: usize,
    /// Longest wait for a Postgres connection from the pool, in milliseconds (also for the first
    /// connection at start); an API request that waited this long is answered 503 with Retry-After
    /// (counted as api_refused_total{reason="db_pool"}).
    #[default(500)]
    pub pool_acquire_timeout_ms: u64,
}

/// Whether the API asks for keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every `/api/v1` route needs `Authorization: Bearer <key>` (`meterflow api-key create`).
    #[default]
    On,
    /// No keys, no rate limits: local runs and the seed's scripts only (warned loudly at start).
    Off,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, DocumentedFields, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Timely worker threads in this process.
    #[default(1)]
    pub workers: usize,
    /// How often an epoch closes, i.e. how often results are committed, in milliseconds.
    #[default(250)]
    pub epoch_ms: u64,
    /// While the pipeline is behind the topic's end (a backfill, a restart, a burst), every epoch but
    /// the first lasts at least this long, in milliseconds: fewer, larger commits, each window revised
    /// fewer times. While no window can close before it ends (the watermark is held below the next
    /// window's close), it lasts up to four fifths of the idle timeout. Readers then hand over up to
    /// 16,384 records at a time. 0: never, and batches of at most 4,096 records, so that epochs as
    /// short as `epoch_ms` commit as often as it says.
    #[default(2_000)]
    pub catch_up_epoch_ms: u64,
    /// Allowed out-of-orderness: a partition's watermark trails its greatest event time by this many
    /// milliseconds.
    #[default(5_000)]
    pub out_of_orderness_ms: u64,
    /// Allowed lateness: a window is finalized once the watermark passes its end plus this many
    /// seconds.
    #[default(3_600)]
    pub allowed_lateness_secs: u64,
    /// A partition with no records for this many seconds stops holding the watermark back.
    #[default(10)]
    pub idle_timeout_secs: u64,
    /// A JSON file of meter definitions (an array of {"meter", "event_type", "aggregation",
    /// "value_property", "window"}); each is created at start-up unless it exists. Empty: none.
    /// More can be added with POST /api/v1/meters while running.
    #[default = ""]
    pub meters_file: String,
    /// Where the pipeline serves Prometheus metrics at /metrics (host:port); empty: nowhere.
    #[default = "127.0.0.1:9464"]
    pub metrics_addr: String,
}

impl PipelineConfig {
    /// The meters file, if one is configured.
    pub fn meters_file(&self) -> Option<PathBuf> {
        (!self.meters_file.is_empty()).then(|| PathBuf::from(&self.meters_file))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, DocumentedFields, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: a level (error, warn, info, debug, trace), optionally per target
    /// (info,meterflow_api=debug).
    #[default = "info,sqlx=warn,librdkafka=warn,rdkafka::client=off"]
    pub level: String,
    /// text, or json: one JSON object per line carrying the fields of its spans (every line of an
    /// HTTP request carries its request_id).
    #[default(LogFormat::Text)]
    pub format: LogFormat,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the fields of the enclosing spans (the request id).
    Json,
}

#[cfg(test)]
mod tests {
    use super::secret::mask_password;
    use super::*;
    use toml::Table;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("meterflow-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn every_key_of_the_tree_is_documented_once_and_nothing_else_is() {
        let defaults = Table::try_from(Config::default()).unwrap();
        let mut leaves: Vec<String> = defaults
            .iter()
            .flat_map(|(section, t)| {
                t.as_table()
                    .unwrap()
                    .keys()
                    .map(move |k| format!("{section}.{k}"))
            })
            .collect();
        let mut documented: Vec<String> = KEYS.iter().map(|k| k.path.to_owned()).collect();
        leaves.sort();
        documented.sort();
        assert_eq!(documented, leaves);
        let mut envs: Vec<&str> = KEYS.iter().map(|k| k.env).collect();
        envs.sort();
        envs.dedup();
        assert_eq!(envs.len(), KEYS.len(), "one environment variable per key");
        for key in KEYS.iter() {
            assert!(
                SECTIONS.iter().any(|(s, _)| *s == key.section()),
                "{} is in a listed section",
                key.path
            );
            assert!(key.env.starts_with("MF_"), "{}", key.env);
        }
    }

    #[test]
    fn the_committed_example_is_the_printed_defaults_and_parses_to_them() {
        let committed = include_str!("../deploy/meterflow.example.toml");
        assert_eq!(
            committed,
            render_defaults(),
            "regenerate it: meterflow config --print-defaults > deploy/meterflow.example.toml"
        );
        assert_eq!(
            toml::from_str::<Config>(committed).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn the_spec_environment_names_keep_working() {
        let env = |name: &str| match name {
            "MF_DATABASE_URL" => Some("postgres://u@db:5432/x".to_owned()),
            "MF_KAFKA_BROKERS" => Some("k:9092".to_owned()),
            "MF_EVENTS_TOPIC" => Some("t.events".to_owned()),
            "MF_API_ADDR" => Some("0.0.0.0:8080".to_owned()),
            _ => None,
        };
        let c = load(None, &env, &[]).unwrap().config;
        assert_eq!(c.database.url.expose(), "postgres://u@db:5432/x");
        assert_eq!(c.kafka.brokers, "k:9092");
        assert_eq!(c.kafka.events_topic, "t.events");
        assert_eq!(c.api.addr, "0.0.0.0:8080");
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file_which_beats_the_defaults() {
        let file = temp_file(
            "precedence",
            "[pipeline]\nworkers = 2\nepoch_ms = 100\nidle_timeout_secs = 7\n",
        );
        let env = |name: &str| match name {
            "MF_PIPELINE_WORKERS" => Some("3".to_owned()),
            "MF_PIPELINE_EPOCH_MS" => Some("50".to_owned()),
            _ => None,
        };
        let loaded = load(Some(&file), &env, &[("pipeline.workers", "4".into())]).unwrap();
        let p = &loaded.config.pipeline;
        assert_eq!(
            (
                p.workers,
                p.epoch_ms,
                p.idle_timeout_secs,
                p.allowed_lateness_secs
            ),
            (4, 50, 7, 3600)
        );
        assert_eq!(
            loaded.sources["pipeline.workers"],
            Source::Flag("--workers")
        );
        assert_eq!(
            loaded.sources["pipeline.epoch_ms"],
            Source::Env("MF_PIPELINE_EPOCH_MS")
        );
        assert_eq!(
            loaded.sources["pipeline.idle_timeout_secs"],
            Source::File(file.clone())
        );
        assert_eq!(
            loaded.sources["pipeline.allowed_lateness_secs"],
            Source::Default
        );
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn an_unknown_key_in_the_file_is_refused_with_its_name_and_the_file() {
        let file = temp_file(
            "unknown",
            "[api]\naddr = \"127.0.0.1:1\"\nrequest_timeout = 5\n",
        );
        let error = load(Some(&file), &no_env, &[]).unwrap_err().to_string();
        assert!(error.contains("request_timeout"), "{error}");
        assert!(error.contains(&file.display().to_string()), "{error}");
        let section = temp_file("section", "[apii]\naddr = \"127.0.0.1:1\"\n");
        let error = load(Some(&section), &no_env, &[]).unwrap_err().to_string();
        assert!(error.contains("apii"), "{error}");
        std::fs::remove_file(file).unwrap();
        std::fs::remove_file(section).unwrap();
    }

    #[test]
    fn a_bad_value_names_its_variable_or_key() {
        let env = |name: &str| (name == "MF_PIPELINE_WORKERS").then(|| "many".to_owned());
        let error = load(None, &env, &[]).unwrap_err().to_string();
        assert!(error.contains("MF_PIPELINE_WORKERS"), "{error}");
        let env = |name: &str| (name == "MF_LOG_FORMAT").then(|| "xml".to_owned());
        let error = load(None, &env, &[]).unwrap_err().to_string();
        assert!(
            error.contains("MF_LOG_FORMAT") && error.contains("json"),
            "{error}"
        );
        let env = |name: &str| (name == "MF_PIPELINE_WORKERS").then(|| "0".to_owned());
        let error = load(None, &env, &[]).unwrap_err().to_string();
        assert!(error.contains("pipeline.workers"), "{error}");
        let error = load(None, &no_env, &[("api.addr", "nowhere".into())])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("api.addr") && error.contains("--addr"),
            "{error}"
        );
    }

    #[test]
    fn a_password_comes_from_the_environment_only_and_never_prints() {
        let file = temp_file(
            "secret",
            "[database]\nurl = \"postgres://u:hunter2@db/x\"\n",
        );
        let error = load(Some(&file), &no_env, &[]).unwrap_err().to_string();
        assert!(
            error.contains("MF_DATABASE_URL") && !error.contains("hunter2"),
            "{error}"
        );
        let error = load(
            None,
            &no_env,
            &[("database.url", "postgres://u:hunter2@db/x".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(!error.contains("hunter2"), "{error}");
        std::fs::remove_file(file).unwrap();

        let env = |name: &str| {
            (name == "MF_DATABASE_URL")
                .then(|| "postgres://u:hunter2@db/x?sslmode=require&password=hunter2".to_owned())
        };
        let loaded = load(None, &env, &[]).unwrap();
        assert!(loaded.config.database.url.expose().contains("hunter2"));
        let printed = render_effective(&loaded);
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("postgres://u:****@db/x?sslmode=require&password=****"));
        assert!(printed.contains("set by environment MF_DATABASE_URL"));
        assert!(!format!("{:?}", loaded.config).contains("hunter2"));
        assert_eq!(
            mask_password("postgres://meterflow@127.0.0.1:5432/meterflow"),
            "postgres://meterflow@127.0.0.1:5432/meterflow"
        );
    }

    #[test]
    fn the_printed_effective_configuration_parses_back() {
        let env = |name: &str| (name == "MF_API_REQUEST_TIMEOUT_SECS").then(|| "9".to_owned());
        let loaded = load(None, &env, &[]).unwrap();
        let back: Config = toml::from_str(&render_effective(&loaded)).unwrap();
        assert_eq!(back, loaded.config);
    }
}
