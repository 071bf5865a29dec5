//! [`load`]: the layers stacked with figment, and where each effective value came from.
//!
//! Each layer is a figment of its own, extracted alone before it is merged: an unknown key or a
//! value of the wrong type is then reported with the file, variable or flag that holds it (in the
//! merged tree a section carries the tag of the last layer that touched it), and a bad variable is
//! refused even when a flag overrides it. The environment and the flags are [`Given`] providers;
//! their metadata names tell the two apart.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::keys::{key, Key, KEYS};
use super::secret::has_password;
use super::Config;

/// The figment metadata names of the environment's layer and the flags' layer.
const ENVIRONMENT: &str = "the environment";
const COMMAND_LINE: &str = "the command line";

/// Where a key's effective value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(&'static str),
    Flag(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::Env(var) => write!(f, "environment {var}"),
            Source::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// The effective configuration and where each value came from.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub sources: BTreeMap<&'static str, Source>,
}

/// Builds the configuration: defaults, then `file`, then the environment (`env` looks a variable up),
/// then `flags` (`(key path, value)` of the flags given). Then validates it.
pub fn load(
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &[(&'static str, String)],
) -> Result<Loaded> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = file {
        figment = figment.merge(file_layer(path)?);
    }
    let figment = figment
        .merge(Given::environment(env).checked()?)
        .merge(Given::flags(flags)?.checked()?);
    let config: Config = figment.extract_lossy()?;
    config.validate()?;
    let sources = KEYS.iter().map(|k| (k.path, source(&figment, k))).collect();
    Ok(Loaded { config, sources })
}

/// The file alone: every key known and typed as in the schema, and no password.
fn file_layer(path: &Path) -> Result<Figment> {
    let file = path.display();
    let layer = Figment::from(Toml::file_exact(path));
    layer.extract::<Config>().map_err(|e| {
        worded(e, |key| match key {
            "" => format!("configuration file {file}"),
            key => format!("configuration file {file}, key {key}"),
        })
    })?;
    let url: Option<String> = layer.extract_inner("database.url").ok();
    if url.is_some_and(|u| has_password(&u)) {
        bail!(
            "configuration file {file}: database.url holds a password; secrets come from the \
             environment only: set MF_DATABASE_URL instead"
        );
    }
    Ok(layer)
}

/// Each of figment's errors on a line of its own, `{who}: {what}`, where `who(key path)` names the
/// file, variable or flag (the path is empty for an error of the whole layer, such as its syntax).
fn worded(error: figment::Error, who: impl Fn(&str) -> String) -> anyhow::Error {
    let lines: Vec<String> = error
        .into_iter()
        .map(|e| format!("{}: {}", who(&e.path.join(".")), e.kind))
        .collect();
    anyhow!(lines.join("\n"))
}

/// Where figment's metadata says the effective value of `key` came from.
fn source(figment: &Figment, key: &'static Key) -> Source {
    match figment.find_metadata(key.path) {
        Some(Metadata {
            source: Some(figment::Source::File(path)),
            ..
        }) => Source::File(path.clone()),
        Some(metadata) => given_by(&metadata.name, key),
        None => Source::Default,
    }
}

/// Which variable or flag set `key` in the [`Given`] layer named `layer`.
fn given_by(layer: &str, key: &'static Key) -> Source {
    match layer {
        ENVIRONMENT => Source::Env(key.env),
        COMMAND_LINE => Source::Flag(flag(key)),
        _ => Source::Default,
    }
}

/// The flag of `key` (named by its path if it has none).
fn flag(key: &'static Key) -> &'static str {
    key.flag.unwrap_or(key.path)
}

/// Keys given as text, by environment variables or by flags. The text is kept as given, and the
/// field's type decides on (lossy) extraction: `"3"` is a number for `pipeline.workers` and a topic
/// name for `kafka.events_topic`.
struct Given {
    layer: &'static str,
    values: Vec<(&'static Key, String)>,
}

impl Given {
    /// The variable of each key that `env` finds.
    fn environment(env: &dyn Fn(&str) -> Option<String>) -> Given {
        let values = KEYS.iter().filter_map(|k| Some((k, env(k.env)?)));
        Given {
            layer: ENVIRONMENT,
            values: values.collect(),
        }
    }

    /// The flags given, as `(key path, value)`; a password on the command line is refused.
    fn flags(flags: &[(&'static str, String)]) -> Result<Given> {
        let mut values = Vec::new();
        for (path, raw) in flags {
            let key = key(path).with_context(|| format!("no configuration key {path}"))?;
            if key.path == "database.url" && has_password(raw) {
                bail!(
                    "{} holds a password, which the command line shows to everyone (ps); secrets \
                     come from the environment only: set MF_DATABASE_URL instead",
                    flag(key)
                );
            }
            values.push((key, raw.clone()));
        }
        Ok(Given {
            layer: COMMAND_LINE,
            values,
        })
    }

    /// The layer alone, extracted: a value the key's type refuses names its variable or flag.
    fn checked(self) -> Result<Figment> {
        let layer = self.layer;
        let figment = Figment::from(self);
        figment.extract_lossy::<Config>().map_err(|e| {
            worded(e, |path| match key(path) {
                Some(key) => format!("{} (sets {path})", given_by(layer, key)),
                None => layer.to_owned(),
            })
        })?;
        Ok(figment)
    }
}

impl Provider for Given {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.layer)
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        let mut tree = Dict::new();
        for (key, raw) in &self.values {
            let section = tree
                .entry(key.section().to_owned())
                .or_insert_with(|| Dict::new().into());
            if let Value::Dict(_, section) = section {
                section.insert(key.name().to_owned(), raw.clone().into());
            }
        }
        Ok(Profile::Default.collect(tree))
    }
}
