//! Every configuration key, once: where it lives in the file, its environment variable and flag, and
//! what it means. The names and the documentation come from the structs' fields (`documented`); only
//! the variables that break the `MF_{SECTION}_{KEY}` rule and the flags are listed here, in
//! [`SETTERS`]. The table renders the documented defaults file, names the variable or flag in
//! errors, and the environment and the flags given (src/main.rs) are read through it.

use std::sync::LazyLock;

use documented::DocumentedFields;

use super::{ApiConfig, Config, DatabaseConfig, KafkaConfig, LogConfig, PipelineConfig};

/// One configuration key: where it lives, how to set it, what it means.
#[derive(Debug)]
pub struct Key {
    /// `section.key`, as in the file.
    pub path: &'static str,
    /// The environment variable that sets it.
    pub env: &'static str,
    /// The flag that sets it, if any (flags of `meterflow` or of the subcommand that uses the key).
    pub flag: Option<&'static str>,
    /// The field's doc comment.
    pub doc: &'static str,
}

/// `(key, its variable where not MF_{SECTION}_{KEY}, its flag)`: the keys whose variable breaks the
/// rule (shorter names that the README documents and deployments set) or that a flag sets. A test
/// checks that each row names a key.
#[rustfmt::skip]
const SETTERS: &[(&str, Option<&str>, Option<&str>)] = &[
    ("database.url",                   None,                             Some("--database-url")),
    ("kafka.brokers",                  None,                             Some("--brokers")),
    ("kafka.events_topic",             Some("MF_EVENTS_TOPIC"),          Some("--topic")),
    ("api.addr",                       None,                             Some("--addr")),
    ("api.auth",                       Some("MF_AUTH"),                  None),
    ("pipeline.workers",               None,                             Some("--workers")),
    ("pipeline.epoch_ms",              None,                             Some("--epoch-ms")),
    ("pipeline.catch_up_epoch_ms",     None,                             Some("--catch-up-epoch-ms")),
    ("pipeline.out_of_orderness_ms",   Some("MF_OUT_OF_ORDERNESS_MS"),   Some("--out-of-orderness-ms")),
    ("pipeline.allowed_lateness_secs", Some("MF_ALLOWED_LATENESS_SECS"), Some("--allowed-lateness-secs")),
    ("pipeline.idle_timeout_secs",     Some("MF_IDLE_TIMEOUT_SECS"),     Some("--idle-timeout-secs")),
    ("pipeline.meters_file",           Some("MF_METERS_FILE"),           Some("--meters")),
    ("pipeline.metrics_addr",          None,                             Some("--metrics-addr")),
    ("log.level",                      Some("MF_LOG"),                   Some("--log-level")),
    ("log.format",                     Some("MF_LOG_FORMAT"),            Some("--log-format")),
];

/// The sections, in file order, with what they configure (the doc comments of [`Config`]'s fields).
pub static SECTIONS: LazyLock<Vec<(&'static str, &'static str)>> = LazyLock::new(|| {
    Config::FIELD_NAMES
        .iter()
        .copied()
        .zip(Config::FIELD_DOCS.iter().copied())
        .collect()
});

/// Every key, in file order: each section's fields, in the order of [`Config`]'s.
pub static KEYS: LazyLock<Vec<Key>> = LazyLock::new(|| {
    let sections = [
        fields::<DatabaseConfig>(),
        fields::<KafkaConfig>(),
        fields::<ApiConfig>(),
        fields::<PipelineConfig>(),
        fields::<LogConfig>(),
    ];
    Config::FIELD_NAMES
        .iter()
        .zip(sections)
        .flat_map(|(section, (names, docs))| {
            names
                .iter()
                .zip(docs)
                .map(move |(name, doc)| Key::new(section, name, doc))
        })
        .collect()
});

/// A section's field names and their doc comments.
fn fields<S: DocumentedFields>() -> (&'static [&'static str], &'static [&'static str]) {
    (S::FIELD_NAMES, S::FIELD_DOCS)
}

/// The key at `path` (`section.key`).
pub(super) fn key(path: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.path == path)
}

impl Key {
    fn new(section: &str, name: &str, doc: &'static str) -> Key {
        let path = leak(format!("{section}.{name}"));
        let setters = SETTERS.iter().find(|(p, ..)| *p == path);
        let env = setters
            .and_then(|(_, env, _)| *env)
            .unwrap_or_else(|| leak(format!("MF_{section}_{name}").to_ascii_uppercase()));
        Key {
            path,
            env,
            flag: setters.and_then(|(.., flag)| *flag),
            doc,
        }
    }

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

/// The table's derived strings live as long as the table: built once, in a static.
fn leak(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setter_names_a_key_and_the_rule_names_the_rest() {
        for (path, ..) in SETTERS {
            assert!(key(path).is_some(), "{path} is not a key");
        }
        assert_eq!(
            key("api.max_in_flight").unwrap().env,
            "MF_API_MAX_IN_FLIGHT"
        );
        assert_eq!(key("pipeline.meters_file").unwrap().env, "MF_METERS_FILE");
        assert_eq!(key("pipeline.workers").unwrap().flag, Some("--workers"));
        assert_eq!(key("api.statement_timeout_ms").unwrap().flag, None);
    }
}
