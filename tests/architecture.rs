//! The house's arrows (`ARCHITECTURE.md` of the design notes; README "Layout"), checked over
//! `cargo metadata` so they cannot drift back.
//!
//! ```text
//!   src/ ──► api ──► store ──► model ◄── dataflow
//!             │        ▲         ▲
//!             └──► documents     └── sinks ──► store (reads meters and price books)
//! ```
//! An arrow is a normal or build dependency, followed transitively; dev-dependencies (tests) are not
//! arrows. An arrow that must never exist fails the test, unless it is in [`NOT_YET_REMOVED`] with the
//! reason it still exists; an entry there that no longer holds fails too, so that list only shrinks.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// (from, to, why): `from` must never reach `to`, directly or through another crate of ours.
const FORBIDDEN: &[(&str, &str, &str)] = &[
    (
        "model",
        "*",
        "the domain knows no engine, no database, no HTTP",
    ),
    ("api", "dataflow", "the thin API never compiles timely"),
    (
        "api",
        "sinks",
        "the API does not write the pipeline's tables",
    ),
    (
        "dataflow",
        "sinks",
        "the engine and its sink meet only through model types and channels",
    ),
    ("dataflow", "store", "the engine reads no API tables"),
    (
        "sinks",
        "dataflow",
        "the engine and its sink meet only through model types and channels",
    ),
    ("store", "dataflow", "the API's tables know no engine"),
    (
        "store",
        "sinks",
        "the API's tables know nothing of the pipeline's",
    ),
    ("store", "api", "storage does not know HTTP"),
    (
        "documents",
        "*",
        "rendering an invoice needs the model only",
    ),
];

/// Forbidden arrows that still exist, each with why; remove the entry with the arrow.
const NOT_YET_REMOVED: &[(&str, &str, &str)] = &[];

/// The crate every other may use, and `perf`, which no crate may use.
const MODEL: &str = "model";
const PERF: &str = "perf";

/// Our crates (`meterflow-x` → `x`, the binary crate `meterflow` → `src`) and their direct arrows.
fn arrows() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let short = |name: &str| match name {
        "meterflow" => "src".to_owned(),
        n => n.trim_start_matches("meterflow-").to_owned(),
    };
    let mut graph = BTreeMap::new();
    for package in meta["packages"].as_array().expect("packages") {
        let name = package["name"].as_str().expect("a name");
        let ours: BTreeSet<String> = package["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .filter(|d| d["kind"].as_str() != Some("dev"))
            .filter_map(|d| d["name"].as_str())
            .filter(|d| d.starts_with("meterflow"))
            .map(short)
            .collect();
        graph.insert(short(name), ours);
    }
    graph
}

/// Every crate `from` reaches, directly or not.
fn reach(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<&str> = vec![from];
    while let Some(c) = todo.pop() {
        for next in graph.get(c).into_iter().flatten() {
            if seen.insert(next.clone()) {
                todo.push(next);
            }
        }
    }
    seen
}

/// The forbidden arrows that exist: (from, to, why).
fn violations(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<(String, String, String)> {
    let mut found = BTreeSet::new();
    for (from, to, why) in FORBIDDEN {
        for reached in reach(graph, from) {
            let to_model_is_fine = *to == "*" && reached == MODEL && *from != MODEL;
            if (*to == "*" || reached == *to) && !to_model_is_fine {
                found.insert((from.to_string(), reached, why.to_string()));
            }
        }
    }
    for (crate_, deps) in graph {
        if deps.contains(PERF) {
            found.insert((
                crate_.clone(),
                PERF.to_owned(),
                "benchmarks are never a dependency".to_owned(),
            ));
        }
    }
    found
}

#[test]
fn no_forbidden_arrow_exists() {
    let graph = arrows();
    for expected in [
        "model",
        "dataflow",
        "sinks",
        "store",
        "api",
        "documents",
        "src",
        "perf",
    ] {
        assert!(
            graph.contains_key(expected),
            "crate {expected} is missing: {graph:?}"
        );
    }
    let known: BTreeSet<(&str, &str)> = NOT_YET_REMOVED.iter().map(|(f, t, _)| (*f, *t)).collect();
    let found = violations(&graph);
    let new: Vec<String> = found
        .iter()
        .filter(|(f, t, _)| !known.contains(&(f.as_str(), t.as_str())))
        .map(|(f, t, why)| format!("{f} → {t}: {why}"))
        .collect();
    assert!(
        new.is_empty(),
        "forbidden arrows (ARCHITECTURE.md):\n{}",
        new.join("\n")
    );
    for (from, to, why) in NOT_YET_REMOVED {
        assert!(
            found.iter().any(|(f, t, _)| f == from && t == to),
            "{from} → {to} is gone: remove it from NOT_YET_REMOVED ({why})"
        );
    }
}

#[test]
fn the_check_sees_an_arrow_through_another_crate() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("api", vec!["store"]),
        ("store", vec!["model", "dataflow"]),
        ("dataflow", vec!["model"]),
        ("model", vec![]),
    ]
    .into_iter()
    .map(|(c, d)| (c.to_owned(), d.into_iter().map(str::to_owned).collect()))
    .collect();
    let found: BTreeSet<(String, String)> = violations(&graph)
        .into_iter()
        .map(|(f, t, _)| (f, t))
        .collect();
    assert!(found.contains(&("api".to_owned(), "dataflow".to_owned())));
    assert!(found.contains(&("store".to_owned(), "dataflow".to_owned())));
    assert!(!found.iter().any(|(f, _)| f == "model"));
}

/// The tables a crate's code writes: `INSERT INTO t`, `UPDATE t`, `DELETE FROM t`, `COPY t` in its
/// `src/` (comments left out). Statements whose table is spelled through `format!` are not seen.
fn tables_written(dir: &std::path::Path, into: &mut BTreeSet<String>) {
    let mut files = Vec::new();
    sources(dir, &mut files);
    for (_, text) in &files {
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for verb in ["INSERT INTO ", "UPDATE ", "DELETE FROM ", "COPY "] {
                for (at, _) in line.match_indices(verb) {
                    let rest = &line[at + verb.len()..];
                    let table: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !table.is_empty() {
                        into.insert(table);
                    }
                }
            }
        }
    }
}

#[test]
fn every_table_has_one_writer_crate() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let crates = ["model", "dataflow", "sinks", "store", "api", "documents"];
    let mut writers: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for name in crates.iter().copied().chain(["src"]) {
        let dir = if name == "src" {
            root.join("src")
        } else {
            root.join(name).join("src")
        };
        let mut tables = BTreeSet::new();
        tables_written(&dir, &mut tables);
        for t in tables {
            writers.entry(t).or_default().push(name);
        }
    }
    assert!(
        writers.contains_key("aggregations") && writers.contains_key("event_ids"),
        "{writers:?}"
    );
    let shared: Vec<String> = writers
        .iter()
        .filter(|(_, w)| w.len() > 1)
        .map(|(t, w)| format!("{t}: written by {}", w.join(", ")))
        .collect();
    assert!(
        shared.is_empty(),
        "tables with more than one writer crate:\n{}",
        shared.join("\n")
    );
}

/// Every `.rs` file under `dir`, with its text.
fn sources(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, String)>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((
                path.clone(),
                std::fs::read_to_string(&path).unwrap_or_default(),
            ));
        }
    }
}

#[test]
fn the_api_holds_no_sql() {
    let mut files = Vec::new();
    sources(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("api/src"),
        &mut files,
    );
    assert!(!files.is_empty());
    let with_sql: Vec<String> = files
        .iter()
        .filter(|(_, text)| text.contains("sqlx::query") || text.contains("try_get("))
        .map(|(path, _)| path.display().to_string())
        .collect();
    assert!(
        with_sql.is_empty(),
        "the API's statements belong in store/ (README \"Layout\"): {with_sql:?}"
    );
}
