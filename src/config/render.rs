//! `meterflow config --print-defaults` and `--print`: the configuration as a documented TOML file, from
//! the key table (`keys.rs`), with where each effective value came from.

use std::collections::BTreeMap;

use toml::Table;

use super::{Config, Loaded, Source, KEYS, SECTIONS};

/// `meterflow config --print-defaults`: every key with its default, documented.
pub fn render_defaults() -> String {
    let mut out = String::from(
        "# meterflow configuration: every key with its default, its environment variable and its flag.\n\
         #\n\
         # Use it with `meterflow --config FILE <command>` or MF_CONFIG=FILE. Every key is optional: one left\n\
         # out keeps its default. Precedence: flags > MF_* environment > this file > defaults. Unknown keys\n\
         # are refused, naming the key and the file. The database password is a secret: give it in\n\
         # MF_DATABASE_URL only (a password in this file is refused).\n\
         #\n\
         # This is the output of `meterflow config --print-defaults` (deploy/meterflow.example.toml).\n",
    );
    render_keys(&mut out, &Config::default(), None);
    out
}

/// `meterflow config --print`: the effective configuration, the password masked (as `DatabaseUrl`
/// serializes), each value not a default marked with where it came from.
pub fn render_effective(loaded: &Loaded) -> String {
    let mut out = String::from(
        "# The effective meterflow configuration (defaults < file < MF_* environment < flags); the\n\
         # database password, if any, is masked.\n",
    );
    render_keys(&mut out, &loaded.config, Some(&loaded.sources));
    out
}

fn render_keys(out: &mut String, config: &Config, sources: Option<&BTreeMap<&str, Source>>) {
    let table = Table::try_from(config).expect("the configuration encodes as TOML");
    for (section, doc) in SECTIONS.iter() {
        out.push('\n');
        comment(out, doc);
        out.push_str(&format!("[{section}]\n"));
        for key in KEYS.iter().filter(|k| k.section() == *section) {
            comment(out, key.doc);
            match key.flag {
                Some(flag) => comment(out, &format!("env {}, flag {flag}", key.env)),
                None => comment(out, &format!("env {}", key.env)),
            }
            if let Some(source) = sources.and_then(|s| s.get(key.path)) {
                if *source != Source::Default {
                    comment(out, &format!("set by {source}"));
                }
            }
            let value = &table[key.section()][key.name()];
            let mut line = Table::new();
            line.insert(key.name().to_owned(), value.clone());
            out.push_str(&toml::to_string(&line).expect("a value encodes as TOML"));
        }
    }
}

/// Appends `text` as `# ` comment lines wrapped at 100 columns.
fn comment(out: &mut String, text: &str) {
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() + 1 + word.len() > 100 && line.len() > 1 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}
