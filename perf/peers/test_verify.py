#!/usr/bin/env python3
"""Self-test of the peers harness's own checks (no engine but DuckDB needed; seconds).

    $MF_PEERS_HOME/venv/bin/python perf/peers/test_verify.py

* gen_events.py: the same N and seed give the same bytes; the expected totals equal a recount of
  the written file with json + Decimal (independent of the vectorised code); values and times obey
  the workload (0..3 decimals in [0, 100], disorder < 12 minutes).
* verify.py: a good output passes; altered outputs fail the right checks (one count +1, one sum
  +0.001, two counts swapped +1/-1 so the totals still match, a duplicated row, a truncated file, a
  missing file); headerless, part-file directories and Pathway-style outputs are read.
Prints "N passed, M failed" and exits non-zero on a failure.
"""

import csv
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from decimal import Decimal

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import verify  # noqa: E402

RESULTS = []


def check(name, cond, detail=""):
    RESULTS.append(bool(cond))
    print(f"{'ok  ' if cond else 'FAIL'} {name}{(': ' + detail) if detail and not cond else ''}")


def gen(n, out_dir):
    subprocess.run(
        [sys.executable, os.path.join(HERE, "gen_events.py"), str(n), "--out-dir", out_dir],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    with open(os.path.join(out_dir, f"events_{n}.expected.json")) as f:
        return os.path.join(out_dir, f"events_{n}.jsonl"), json.load(f)


def duckdb_out(inp, out):
    subprocess.run([sys.executable, os.path.join(HERE, "engines", "duckdb_run.py"), inp, out], check=True)


def rewrite(src, dst, fn, header=True):
    with open(src) as f:
        rows = list(csv.reader(f))
    head, body = rows[0], rows[1:]
    body = fn(body)
    with open(dst, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(head)
        w.writerows(body)


def main():
    tmp = tempfile.mkdtemp(prefix="peers-selftest-")
    n = 5000
    inp, exp = gen(n, tmp)
    other = os.path.join(tmp, "again")
    inp2, exp2 = gen(n, other)
    check(
        "generator deterministic (md5)",
        exp["md5"] == exp2["md5"] and open(inp, "rb").read() == open(inp2, "rb").read(),
    )

    total, groups, prev_max, disorder = Decimal(0), set(), None, 0
    places_ok = True
    with open(inp) as f:
        for line in f:
            d = json.loads(line)
            v = d["value"]
            places = len(v.split(".", 1)[1]) if "." in v else 0
            places_ok &= places <= 3 and Decimal(0) <= Decimal(v) <= Decimal(100)
            total += Decimal(v)
            t = datetime.strptime(d["event_time"], "%Y-%m-%dT%H:%M:%SZ")
            groups.add((d["customer_id"], d["event_type"], t.strftime("%Y-%m-%dT%H")))
            ts = t.timestamp()
            if prev_max is not None:
                disorder = max(disorder, prev_max - ts)
            prev_max = ts if prev_max is None else max(prev_max, ts)
    expected_total = exp["total_sum"]
    check("expected total_sum == recount", Decimal(expected_total) == total, f"{expected_total} vs {total}")
    check("expected total_sum_milli == recount", exp["total_sum_milli"] == int(total * 1000))
    check(
        "expected_groups == recount",
        exp["expected_groups"] == len(groups),
        f"{exp['expected_groups']} vs {len(groups)}",
    )
    check("values: 0..3 places in [0, 100]", places_ok)
    check("max disorder < 12 min", disorder < 720, f"{disorder}")

    e = os.path.join(tmp, f"events_{n}.expected.json")
    ref = os.path.join(tmp, "ref.csv")
    duckdb_out(inp, ref)
    r = verify.verify(ref, e, ref)
    check("good output passes", r["ok"], json.dumps(r))

    def run(name, fn, expect_fail, header=True):
        p = os.path.join(tmp, name + ".csv")
        rewrite(ref, p, fn, header)
        r = verify.verify(p, e, ref)
        failed = {
            k for k in ("count_ok", "sum_ok", "groups_ok", "no_dup_ok", "rows_equal") if r.get(k) is False
        }
        check(
            f"{name}: fails {sorted(expect_fail)}",
            (not r["ok"]) and failed == set(expect_fail),
            f"failed {sorted(failed)}",
        )

    def bump_count(b):
        b[0][4] = str(int(b[0][4]) + 1)
        return b

    def bump_sum(b):
        b[1][3] = str(Decimal(b[1][3]) + Decimal("0.001"))
        return b

    def swap(b):
        b[0][4] = str(int(b[0][4]) + 1)
        b[1][4] = str(int(b[1][4]) - 1)
        return b

    run("count+1", bump_count, {"count_ok", "rows_equal"})
    run("sum+0.001", bump_sum, {"sum_ok", "rows_equal"})
    run("swapped counts", swap, {"rows_equal"})
    run("duplicated row", lambda b: b + b[:1], {"count_ok", "sum_ok", "no_dup_ok", "rows_equal"})
    run("dropped row", lambda b: b[1:], {"count_ok", "sum_ok", "groups_ok", "rows_equal"})

    trunc = os.path.join(tmp, "trunc.csv")
    with open(ref, "rb") as f:
        data = f.read()
    with open(trunc, "wb") as f:
        f.write(data[: len(data) // 2])
    r = verify.verify(trunc, e, ref)
    check("truncated file fails", not r["ok"] and not r["count_ok"])
    r = verify.verify(os.path.join(tmp, "missing.csv"), e, ref)
    check("missing file fails", not r["ok"] and "error" in r)

    # headerless (Bytewax) and a directory of part files (PyFlink)
    rewrite(ref, os.path.join(tmp, "nohead.csv"), lambda b: b, header=False)
    check("headerless passes", verify.verify(os.path.join(tmp, "nohead.csv"), e, ref)["ok"])
    parts = os.path.join(tmp, "parts")
    os.makedirs(parts)
    with open(ref) as f:
        rows = list(csv.reader(f))[1:]
    for i in range(2):
        with open(os.path.join(parts, f"part-{i}"), "w", newline="") as f:
            csv.writer(f).writerows(rows[i::2])
    with open(os.path.join(parts, ".part-inprogress"), "w") as f:
        f.write("garbage,line\n")
    check("part-file directory passes", verify.verify(parts, e, ref)["ok"])

    # Pathway: instance, value_sum_milli, time, diff; an update (+1 old, -1 old, +1 new) nets out
    pw = os.path.join(tmp, "pw.csv")
    with open(pw, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(["instance", "window_start", "value_sum_milli", "event_count", "time", "diff"])
        for i, (c, t, ws, s, cnt) in enumerate(rows):
            milli = int(Decimal(s) * 1000)
            start = ws.replace("Z", ".000000000")
            if i == 0:
                w.writerow([f"{c}|{t}", start, milli - 1, int(cnt), 1, 1])
                w.writerow([f"{c}|{t}", start, milli - 1, int(cnt), 2, -1])
            w.writerow([f"{c}|{t}", start, milli, cnt, 2, 1])
    check("pathway-style output with a retraction passes", verify.verify(pw, e, ref)["ok"])

    passed, failed = sum(RESULTS), len(RESULTS) - sum(RESULTS)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
