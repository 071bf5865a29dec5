#!/usr/bin/env python3
"""Make the markdown table from a peers run.

    summarize.py runs.jsonl versions.json [--out table.md]

One row per engine, in the order the engines first appear in runs.jsonl: median / min / max wall
seconds over its runs, events/s = N / median wall, peak RSS (GNU time -v, and the sampled process
tree; both the largest over the runs), output groups, verified (yes = every run exited 0 and passed
every check of verify.py).  Skipped engines are listed under the table with the reason.
"""

import argparse
import json
import statistics
import sys

LABELS = {
    "duckdb": ("DuckDB (batch SQL, 2 threads)", "duckdb"),
    "polars": ("Polars (batch, streaming engine, 2 threads)", "polars"),
    "pathway": ("Pathway (static jsonlines, windowby, 2 threads)", "pathway"),
    "pathway1": ("Pathway (static jsonlines, windowby, 1 thread)", "pathway"),
    "bytewax": ("Bytewax (1 worker, EventClock)", "bytewax"),
    "flink": ("PyFlink SQL (streaming, parallelism 2)", "apache-flink"),
    "flink_batch": ("PyFlink SQL (batch, parallelism 2)", "apache-flink"),
    "meterflow": ("meterflow import --csv (whole process)", "meterflow"),
    "meterflow_dataflow": ("meterflow import --csv --engine dataflow (whole process)", "meterflow"),
    "meterflow_store": ("meterflow import --wait, stored by the running pipeline (RSS: the import alone)", "meterflow"),
}


def fmt_int(x):
    return f"{x:,.0f}"


def summarize(runs, versions):
    engines, by = [], {}
    skipped = {}
    n = None
    for r in runs:
        e = r["engine"]
        if r.get("skipped"):
            skipped[e] = r.get("reason", "")
            continue
        if e not in by:
            engines.append(e)
            by[e] = []
        by[e].append(r)
        n = r.get("n", n)
    pkgs = versions.get("packages", {})
    lines = []
    title = f"## N = {n:,} events" if n else "## peers"
    lines.append(title)
    lines.append("")
    if versions.get("cpu"):
        lines.append(
            f"Machine: {versions.get('nproc')} cores, {versions.get('cpu')}, {versions.get('mem_total')}; "
            f"Python {versions.get('python')}; run started {versions.get('date_utc')}."
        )
        lines.append("")
    if versions.get("file"):
        f = versions["file"]
        lines.append(
            f"Input `{f.get('name')}` ({f.get('bytes', 0):,} bytes, md5 `{f.get('md5')}`), "
            f"{f.get('expected_groups', 0):,} groups, exact total {f.get('total_sum')}."
        )
        lines.append("")
    lines.append(
        "| engine | version | runs | median wall s | min | max | events/s (N/median) "
        "| peak RSS MB (time -v) | peak RSS MB (process tree, sampled) | output groups | verified |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for e in engines:
        rs = by[e]
        walls = [r["wall_s"] for r in rs]
        med = statistics.median(walls)
        label, pkg = LABELS.get(e, (e, e))
        ver = pkgs.get(pkg, "?")
        rss_tv = max((r.get("time_v", {}).get("max_rss_kb") or 0) for r in rs) / 1024
        rss_tree = max((r.get("tree_peak_rss_kb") or 0) for r in rs) / 1024
        groups = sorted({(r.get("verify") or {}).get("groups") for r in rs}, key=lambda g: (g is None, g))
        ok = all(r.get("exit_code") == 0 and (r.get("verify") or {}).get("ok") for r in rs)
        unchecked = [r for r in rs if (r.get("verify") or {}).get("not_checked")]
        bad = [
            f"round {r.get('round')}: "
            + (
                "timeout"
                if r.get("timed_out")
                else f"exit {r.get('exit_code')}"
                if r.get("exit_code")
                else "checks failed"
            )
            for r in rs
            if not (r.get("exit_code") == 0 and (r.get("verify") or {}).get("ok"))
        ]
        eps = fmt_int(n / med) if n and med > 0 else "-"
        if ok:
            verified = "yes"
        elif unchecked and all(r.get("exit_code") == 0 for r in rs):
            verified = "not checked (no MF_STORE_EXPORT)"
        else:
            verified = "NO (" + "; ".join(bad) + ")"
        group_text = " / ".join("-" if g is None else str(g) for g in groups)
        lines.append(
            f"| {label} | {ver} | {len(rs)} | {med:.2f} | {min(walls):.2f} | {max(walls):.2f} | {eps} "
            f"| {fmt_int(rss_tv)} | {fmt_int(rss_tree)} | {group_text} | {verified} |"
        )
    lines.append("")
    for e, why in skipped.items():
        lines.append(f"- **{e}** skipped: {why}")
    if skipped:
        lines.append("")
    lines.append("Load average before each run (1/5/15 min), in run order:")
    lines.append("")
    for r in runs:
        if not r.get("skipped"):
            la = " ".join(r.get("loadavg_before", "").split()[:3])
            lines.append(f"- round {r.get('round')} {r['engine']}: {la} (wall {r['wall_s']:.2f} s)")
    lines.append("")
    lines.append(
        "Whole processes, start-up included; rounds alternate the engines. RSS columns are the largest over "
        "the runs; the tree figure is sampled every 100 ms (time -v sees only PyFlink's Python client)."
    )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs")
    ap.add_argument("versions")
    ap.add_argument("--out")
    a = ap.parse_args()
    with open(a.runs) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    try:
        with open(a.versions) as f:
            versions = json.load(f)
    except OSError:
        versions = {}
    text = summarize(runs, versions)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
