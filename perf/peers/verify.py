#!/usr/bin/env python3
"""Check one engine's output exactly against the generator's totals (and a reference output).

    verify.py --output P --expected E [--reference R] [--json OUT.json]

P is a CSV file (with or without a header row) or a directory of CSV part files (PyFlink; hidden
files and files starting with "_" or "." are ignored).  Recognised columns:
  customer_id, event_type | instance ("customer|type", Pathway), window_start (any format that
  starts YYYY-MM-DD[T ]HH), value_sum (decimal) | value_sum_milli (integer thousandths),
  event_count, and optionally diff (Pathway's weight; 1 when absent).
A file without a header row is read as customer_id,event_type,window_start,value_sum,event_count.

All checks are exact: values are read as text and parsed by DuckDB as DECIMAL(38,3), then compared
as integers of thousandths.
  1. count_ok:    sum of event_count == total_count
  2. sum_ok:      sum of value_sum   == total_sum (the generator's, exact)
  3. groups_ok:   number of distinct groups == expected_groups
  4. no_dup_ok:   no group appears twice (Pathway rows weighted by diff: net weight 1 per group)
  5. rows_equal:  every group's count and sum equal the reference's (full outer join,
                  mismatched_groups == 0); skipped (null) without --reference
ok = all of them true.  Exit status 0 when ok, 1 otherwise.
"""

import argparse
import glob
import json
import os
import sys

import duckdb

DEFAULT_COLS = ["customer_id", "event_type", "window_start", "value_sum", "event_count"]


def q(s):
    return "'" + s.replace("'", "''") + "'"


def files_of(path):
    if os.path.isdir(path):
        out = []
        for f in sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)):
            base = os.path.basename(f)
            if os.path.isfile(f) and not base.startswith((".", "_")) and os.path.getsize(f) > 0:
                out.append(f)
        return out
    if os.path.isfile(path):
        return [path]
    return []


def first_line(path):
    with open(path, "r", errors="replace") as f:
        return f.readline()


def load(con, name, path):
    """Create view `name`(cust, etype, w, milli, cnt, diff) from an output; return its row count."""
    files = files_of(path)
    if not files:
        raise RuntimeError(f"no output at {path}")
    header_line = first_line(files[0]).strip().replace('"', "")
    header = (
        header_line.split(",") if ("event_count" in header_line and "window_start" in header_line) else None
    )
    flist = "[" + ",".join(q(f) for f in files) + "]"
    if header:
        cols = header
        src = f"read_csv({flist}, header = true, all_varchar = true, quote = '\"')"
    else:
        cols = DEFAULT_COLS
        spec = ", ".join(f"{q(c)}: 'VARCHAR'" for c in cols)
        src = f"read_csv({flist}, header = false, all_varchar = true, columns = {{{spec}}}, quote = '\"')"
    if "customer_id" in cols and "event_type" in cols:
        cust, etype = "customer_id", "event_type"
    elif "instance" in cols:
        cust, etype = "split_part(instance, '|', 1)", "split_part(instance, '|', 2)"
    else:
        raise RuntimeError(f"{path}: no customer_id/event_type or instance column in {cols}")
    if "value_sum_milli" in cols:
        milli = "CAST(value_sum_milli AS HUGEINT)"
    elif "value_sum" in cols:
        milli = "CAST(CAST(value_sum AS DECIMAL(38,3)) * 1000 AS HUGEINT)"
    else:
        raise RuntimeError(f"{path}: no value_sum or value_sum_milli column in {cols}")
    diff = "CAST(diff AS BIGINT)" if "diff" in cols else "1"
    con.execute(
        f"""
        CREATE TABLE {name} AS
        SELECT {cust} AS cust, {etype} AS etype,
               substr(replace(trim(window_start), ' ', 'T'), 1, 13) AS w,
               {milli} AS milli, CAST(event_count AS BIGINT) AS cnt, {diff} AS diff
        FROM {src}
        """
    )
    return con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]


def verify(output, expected, reference=None):
    with open(expected) as f:
        exp = json.load(f)
    con = duckdb.connect()
    res = {"output": output, "ok": False}
    try:
        res["rows"] = load(con, "o", output)
    except Exception as e:  # noqa: BLE001 - any failure to read is a failed verification
        res["error"] = f"{type(e).__name__}: {e}"
        for k in ("count_ok", "sum_ok", "groups_ok", "no_dup_ok", "rows_equal"):
            res[k] = False
        return res
    con.execute(
        """
        CREATE TABLE g AS
        SELECT cust, etype, w, sum(cnt * diff) AS cnt, sum(milli * diff) AS milli,
               sum(diff) AS weight, count(*) AS nrows
        FROM o GROUP BY cust, etype, w
        """
    )
    total_cnt, total_milli = con.execute("SELECT sum(cnt * diff), sum(milli * diff) FROM o").fetchone()
    groups = con.execute("SELECT count(*) FROM g WHERE weight <> 0").fetchone()[0]
    dups = con.execute("SELECT count(*) FROM g WHERE weight > 1 OR weight < 0").fetchone()[0]
    res.update(
        {
            "total_count": int(total_cnt or 0),
            "total_sum_milli": int(total_milli or 0),
            "groups": int(groups),
            "duplicate_groups": int(dups),
            "count_ok": int(total_cnt or 0) == exp["total_count"],
            "sum_ok": int(total_milli or 0) == exp["total_sum_milli"],
            "groups_ok": int(groups) == exp["expected_groups"],
            "no_dup_ok": int(dups) == 0,
            "rows_equal": None,
        }
    )
    if reference:
        try:
            load(con, "r", reference)
            con.execute(
                "CREATE TABLE rg AS SELECT cust, etype, w, sum(cnt * diff) AS cnt, sum(milli * diff) AS milli "
                "FROM r GROUP BY cust, etype, w HAVING sum(diff) <> 0"
            )
            mism = con.execute(
                """
                SELECT count(*) FROM (SELECT * FROM g WHERE weight <> 0) a
                FULL OUTER JOIN rg b ON a.cust = b.cust AND a.etype = b.etype AND a.w = b.w
                WHERE a.cust IS NULL OR b.cust IS NULL OR a.cnt <> b.cnt OR a.milli <> b.milli
                """
            ).fetchone()[0]
            res["mismatched_groups"] = int(mism)
            res["rows_equal"] = int(mism) == 0
        except Exception as e:  # noqa: BLE001
            res["error"] = f"reference: {type(e).__name__}: {e}"
            res["rows_equal"] = False
    checks = [res["count_ok"], res["sum_ok"], res["groups_ok"], res["no_dup_ok"]]
    if reference:
        checks.append(res["rows_equal"])
    res["ok"] = all(checks)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True)
    ap.add_argument("--expected", required=True)
    ap.add_argument("--reference")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args()
    res = verify(a.output, a.expected, a.reference)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    sys.exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
