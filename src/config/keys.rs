//! Every configuration key, once: where it lives in the file, its environment variable and flag, and
//! what it means. The table renders the documented defaults file and the help, and `load` reads the
//! environment and flags through it.

/// One configuration key: where it lives, how to set it, what it means.
pub struct Key {
    /// `section.key`, as in the file.
    pub path: &'static str,
    /// The environment variable that sets it.
    pub env: &'static str,
    /// The flag that sets it, if any (flags of `meterflow` or of the subcommand that uses the key).
    pub flag: Option<&'static str>,
    pub doc: &'static str,
}

impl Key {
    pub(super) fn section(&self) -> &'static str {
        self.path.split_once('.').map_or(self.path, |(s, _)| s)
    }

    pub(super) fn name(&self) -> &'static str {
        self.path.split_once('.').map_or(self.path, |(_, k)| k)
    }

    /// How to set this key, for error messages: `pipeline.workers (MF_PIPELINE_WORKERS, --workers)`.
    pub(super) fn describe(&self) -> String {
        match self.flag {
            Some(flag) => format!("{} ({}, {flag})", self.path, self.env),
            None => format!("{} ({})", self.path, self.env),
        }
    }
}

/// The sections, in file order, with what they configure.
pub const SECTIONS: &[(&str, &str)] = &[
    ("database", "Postgres, used by every subcommand but loadgen."),
    ("kafka", "The Kafka broker and the events topic."),
    (
        "api",
        "`meterflow api`: the HTTP server, its Postgres pool and its limits.",
    ),
    (
        "pipeline",
        "`meterflow pipeline`: the dataflow, its epochs and watermarks, its metrics endpoint. Per-process \
         settings stay flags: --processes, --process, --hostfile, --until-caught-up.",
    ),
    ("log", "Logs, written to stderr."),
];

/// Every key, in file order. A test checks this table against the structs above.
pub const KEYS: &[Key] = &[
    Key {
        path: "database.url",
        env: "MF_DATABASE_URL",
        flag: Some("--database-url"),
        doc: "Postgres connection string. A password is a secret: give it only in MF_DATABASE_URL (a \
              password in this file or in --database-url is refused); it never prints.",
    },
    Key {
        path: "kafka.brokers",
        env: "MF_KAFKA_BROKERS",
        flag: Some("--brokers"),
        doc: "Kafka bootstrap servers, comma-separated host:port.",
    },
    Key {
        path: "kafka.events_topic",
        env: "MF_EVENTS_TOPIC",
        flag: Some("--topic"),
        doc: "The events topic; created with 8 partitions if missing.",
    },
    Key {
        path: "api.addr",
        env: "MF_API_ADDR",
        flag: Some("--addr"),
        doc: "Address (host:port) the HTTP API listens on.",
    },
    Key {
        path: "api.max_connections",
        env: "MF_API_MAX_CONNECTIONS",
        flag: None,
        doc: "Size of the API's Postgres pool. A request waits at most api.pool_acquire_timeout_ms for \
              a connection, then is answered 503 with Retry-After. The group commit of ingested events \
              keeps 4 connections of its own besides.",
    },
    Key {
        path: "api.request_timeout_secs",
        env: "MF_API_REQUEST_TIMEOUT_SECS",
        flag: None,
        doc: "A request not answered within this many seconds (body read included) is answered 503 \
              (problem+json, code TIMEOUT, Retry-After). An event whose request timed out may still have \
              been accepted: a retry then answers 409 DUPLICATE_EVENT.",
    },
    Key {
        path: "api.statement_timeout_ms",
        env: "MF_API_STATEMENT_TIMEOUT_MS",
        flag: None,
        doc: "Postgres statement_timeout of the API's connections, in milliseconds (0: none); a \
              statement cancelled by it is answered 503. Re-rating jobs run without it.",
    },
    Key {
        path: "api.max_event_bytes",
        env: "MF_API_MAX_EVENT_BYTES",
        flag: None,
        doc: "Largest body of POST /api/v1/events; larger is answered 413.",
    },
    Key {
        path: "api.max_batch_bytes",
        env: "MF_API_MAX_BATCH_BYTES",
        flag: None,
        doc: "Largest body of POST /api/v1/events/batch; larger is answered 413.",
    },
    Key {
        path: "api.shutdown_timeout_secs",
        env: "MF_API_SHUTDOWN_TIMEOUT_SECS",
        flag: None,
        doc: "On SIGTERM or Ctrl-C the API stops accepting connections, finishes the requests in flight \
              and stores and forwards every event it accepted, then exits 0; if that takes longer than \
              this many seconds it exits 1 instead.",
    },
    Key {
        path: "api.auth",
        env: "MF_AUTH",
        flag: None,
        doc: "\"on\": every /api/v1 route needs Authorization: Bearer <key> (meterflow api-key create); \
              /healthz, /readyz, /metrics and /api/v1/openapi.json never do. \"off\": no keys and no rate \
              limits, for local runs and the seed's scripts only; the API warns loudly at start.",
    },
    Key {
        path: "api.rate_limit_per_sec",
        env: "MF_API_RATE_LIMIT_PER_SEC",
        flag: None,
        doc: "Requests per second each API key may make to the routes other than ingest (a token \
              bucket); beyond it: 429 RATE_LIMITED with Retry-After.",
    },
    Key {
        path: "api.rate_limit_burst",
        env: "MF_API_RATE_LIMIT_BURST",
        flag: None,
        doc: "Size of that bucket: requests a key may make at once after a pause.",
    },
    Key {
        path: "api.ingest_rate_limit_per_sec",
        env: "MF_API_INGEST_RATE_LIMIT_PER_SEC",
        flag: None,
        doc: "Events per second each API key may send to POST /events, /events/batch and \
              /events/{id}/void (a batch of n events counts n; it may overdraw the bucket, and the key \
              then waits until it refilled).",
    },
    Key {
        path: "api.ingest_rate_limit_burst",
        env: "MF_API_INGEST_RATE_LIMIT_BURST",
        flag: None,
        doc: "Size of the ingest bucket.",
    },
    Key {
        path: "api.max_in_flight",
        env: "MF_API_MAX_IN_FLIGHT",
        flag: None,
        doc: "Admission control: requests served at once (health, readiness and metrics apart); as many \
              more may wait for a slot, any further one is answered 503 OVERLOADED with Retry-After at \
              once. 0: 4 per pool connection (api.max_connections). Refusals are counted in \
              api_refused_total{reason}.",
    },
    Key {
        path: "api.queue_timeout_ms",
        env: "MF_API_QUEUE_TIMEOUT_MS",
        flag: None,
        doc: "Longest a request waits for a slot before its handler starts, in milliseconds; then it is \
              answered 503 OVERLOADED with Retry-After rather than served late.",
    },
    Key {
        path: "api.ingest_queue",
        env: "MF_API_INGEST_QUEUE",
        flag: None,
        doc: "Events queued for the group commit; when it is full, a new event is answered 503 \
              OVERLOADED with Retry-After at once (nothing stored).",
    },
    Key {
        path: "api.pool_acquire_timeout_ms",
        env: "MF_API_POOL_ACQUIRE_TIMEOUT_MS",
        flag: None,
        doc: "Longest wait for a Postgres connection from the pool, in milliseconds (also for the first \
              connection at start); an API request that waited this long is answered 503 with \
              Retry-After (counted as api_refused_total{reason=\"db_pool\"}).",
    },
    Key {
        path: "pipeline.workers",
        env: "MF_PIPELINE_WORKERS",
        flag: Some("--workers"),
        doc: "Timely worker threads in this process.",
    },
    Key {
        path: "pipeline.epoch_ms",
        env: "MF_PIPELINE_EPOCH_MS",
        flag: Some("--epoch-ms"),
        doc: "How often an epoch closes, i.e. how often results are committed, in milliseconds.",
    },
    Key {
        path: "pipeline.catch_up_epoch_ms",
        env: "MF_PIPELINE_CATCH_UP_EPOCH_MS",
        flag: Some("--catch-up-epoch-ms"),
        doc: "While the pipeline is behind the topic's end (a backfill, a restart, a burst), an epoch \
              lasts at least this long, in milliseconds: fewer, larger commits, each window revised fewer \
              times. 0: never.",
    },
    Key {
        path: "pipeline.out_of_orderness_ms",
        env: "MF_OUT_OF_ORDERNESS_MS",
        flag: Some("--out-of-orderness-ms"),
        doc: "Allowed out-of-orderness: a partition's watermark trails its greatest event time by this \
              many milliseconds.",
    },
    Key {
        path: "pipeline.allowed_lateness_secs",
        env: "MF_ALLOWED_LATENESS_SECS",
        flag: Some("--allowed-lateness-secs"),
        doc: "Allowed lateness: a window is finalized once the watermark passes its end plus this many \
              seconds.",
    },
    Key {
        path: "pipeline.idle_timeout_secs",
        env: "MF_IDLE_TIMEOUT_SECS",
        flag: Some("--idle-timeout-secs"),
        doc: "A partition with no records for this many seconds stops holding the watermark back.",
    },
    Key {
        path: "pipeline.meters_file",
        env: "MF_METERS_FILE",
        flag: Some("--meters"),
        doc: "A JSON file of meter definitions (an array of {\"meter\", \"event_type\", \"aggregation\", \
              \"value_property\", \"window\"}); each is created at start-up unless it exists. Empty: none. \
              More can be added with POST /api/v1/meters while running.",
    },
    Key {
        path: "pipeline.metrics_addr",
        env: "MF_PIPELINE_METRICS_ADDR",
        flag: Some("--metrics-addr"),
        doc: "Where the pipeline serves Prometheus metrics at /metrics (host:port); empty: nowhere.",
    },
    Key {
        path: "log.level",
        env: "MF_LOG",
        flag: Some("--log-level"),
        doc: "A tracing filter: a level (error, warn, info, debug, trace), optionally per target \
              (info,meterflow_api=debug).",
    },
    Key {
        path: "log.format",
        env: "MF_LOG_FORMAT",
        flag: Some("--log-format"),
        doc: "text, or json: one JSON object per line carrying the fields of its spans (every line of an \
              HTTP request carries its request_id).",
    },
];
