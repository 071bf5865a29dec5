//! [`Config::validate`]: what the types cannot check, within a key and across keys.

use anyhow::{bail, Result};

use super::keys::key;
use super::Config;

impl Config {
    /// Checks what the types cannot; every problem names its key and how to set it.
    pub fn validate(&self) -> Result<()> {
        let mut problems: Vec<String> = Vec::new();
        let mut check = |ok: bool, path: &str, what: String| {
            if !ok {
                let key = key(path).expect("validate names only listed keys");
                problems.push(format!("{}: {what}", key.describe()));
            }
        };
        let url = self.database.url.expose();
        check(
            url.starts_with("postgres://") || url.starts_with("postgresql://"),
            "database.url",
            format!(
                "must be a postgres:// URL, not {:?}",
                self.database.url.masked()
            ),
        );
        check(
            !self.kafka.brokers.trim().is_empty(),
            "kafka.brokers",
            "must name at least one host:port".into(),
        );
        let topic = &self.kafka.events_topic;
        check(
            !topic.is_empty()
                && topic.len() <= 249
                && topic
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "kafka.events_topic",
            format!("must be 1 to 249 of [a-zA-Z0-9._-], not {topic:?}"),
        );
        check(
            is_host_port(&self.api.addr),
            "api.addr",
            format!("must be host:port, not {:?}", self.api.addr),
        );
        check(
            self.api.max_connections >= 1,
            "api.max_connections",
            "must be at least 1".into(),
        );
        check(
            self.api.request_timeout_secs >= 1,
            "api.request_timeout_secs",
            "must be at least 1".into(),
        );
        check(
            self.api.max_event_bytes >= 1024,
            "api.max_event_bytes",
            "must be at least 1024".into(),
        );
        check(
            self.api.max_batch_bytes >= self.api.max_event_bytes,
            "api.max_batch_bytes",
            "must be at least api.max_event_bytes".into(),
        );
        check(
            self.api.rate_limit_per_sec >= 1 && self.api.rate_limit_burst >= 1,
            "api.rate_limit_per_sec",
            "the rate and api.rate_limit_burst must be at least 1".into(),
        );
        check(
            self.api.ingest_rate_limit_per_sec >= 1 && self.api.ingest_rate_limit_burst >= 1,
            "api.ingest_rate_limit_per_sec",
            "the rate and api.ingest_rate_limit_burst must be at least 1".into(),
        );
        check(
            self.api.queue_timeout_ms >= 1
                && self.api.pool_acquire_timeout_ms >= 1
                && self.api.ingest_queue >= 1,
            "api.queue_timeout_ms",
            "it, api.pool_acquire_timeout_ms and api.ingest_queue must be at least 1".into(),
        );
        check(
            self.api.shutdown_timeout_secs >= 1,
            "api.shutdown_timeout_secs",
            "must be at least 1".into(),
        );
        check(
            self.pipeline.workers >= 1,
            "pipeline.workers",
            "must be at least 1".into(),
        );
        check(
            self.pipeline.epoch_ms >= 1,
            "pipeline.epoch_ms",
            "must be at least 1".into(),
        );
        check(
            self.pipeline.metrics_addr.is_empty() || is_host_port(&self.pipeline.metrics_addr),
            "pipeline.metrics_addr",
            format!(
                "must be host:port or empty, not {:?}",
                self.pipeline.metrics_addr
            ),
        );
        check(
            tracing_subscriber::EnvFilter::try_new(&self.log.level).is_ok(),
            "log.level",
            format!("is not a tracing filter: {:?}", self.log.level),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("invalid configuration:\n  {}", problems.join("\n  "))
        }
    }
}

fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}
