#!/usr/bin/env python3
"""Deterministic JSONL usage-event generator for the peers benchmark.

    gen_events.py N [--seed S] [--out-dir D]

Writes D/events_N.jsonl and D/events_N.expected.json (D defaults to
$TMPDIR/peers-data, or /tmp/peers-data).  The workload is the one defined in
shared/peers/WORKLOAD.md:

* 10,000 customers cust_00000..cust_09999, uniform;
* 5 event types: api_call 40 %, storage_gb_hour 25 %, llm_tokens 15 %, seat 12 %,
  compute_second 8 %;
* event_time: 48 h from 2024-01-15T00:00:00Z, second resolution.  Event i sits at
  floor(i * 48h / N) plus a uniform integer jitter in [-60, 60] s; 2 % of events are a
  further 0..599 s late.  Times are clamped at the start (never before 2024-01-15T00:00:00Z).
  Largest disorder: 60 + 60 + 599 = 719 s < 12 minutes;
* value: a decimal string in [0, 100] with 0..3 decimal places, uniform over the number of
  places, then uniform over the values with that many places ("42", "42.5", "42.57", "42.571");
* properties: {"region": "eu"|"us"|"apac"}.

Draw order (numpy Generator, default_rng(seed)): customers, types, jitter, late mask, late
amount, decimal places, value, region; each one vectorised draw of N.  The same N and seed give
a byte-identical file.  It is NOT byte-identical to the file behind shared/peers/RESULTS.md
(md5 ccb1461e... for 1M): that generator's exact draw order is not published.

The expected totals are computed here from the drawn integers (values as integer thousandths),
independently of any engine: total_count, total_sum (exact, 3 places), total_sum_milli and
expected_groups (distinct customer x event_type x hour).
"""

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SEED = 20240115
GENERATOR_VERSION = 1  # bump when the bytes for a given N and seed change
N_CUSTOMERS = 10_000
TYPES = ["api_call", "storage_gb_hour", "llm_tokens", "seat", "compute_second"]
WEIGHTS = [0.40, 0.25, 0.15, 0.12, 0.08]
REGIONS = ["eu", "us", "apac"]
SPAN_S = 48 * 3600
START_EPOCH = 1705276800  # 2024-01-15T00:00:00Z
CHUNK = 131_072  # rows per formatted block (~21 MB: under glibc's 32 MB mmap-threshold cap)
THREADS = 2  # the benchmark machine has 2 cores
WINDOW = 4


def keep_freed_memory():
    """Let glibc reuse freed blocks instead of returning them to the kernel: every fresh block
    would otherwise be page-faulted and zeroed again, which costs more than the formatting on a
    small VM.  Best effort: a no-op where glibc's mallopt is not available."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: blocks up to 32 MB from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap
    except (OSError, AttributeError):
        pass


def default_out_dir():
    return os.path.join(os.environ.get("TMPDIR", "/tmp"), "peers-data")


def draw(n, seed):
    rng = np.random.default_rng(seed=seed)
    cust = rng.integers(0, N_CUSTOMERS, n)
    etype = rng.choice(len(TYPES), n, p=WEIGHTS)
    jitter = rng.integers(-60, 61, n)
    late_mask = rng.random(n) < 0.02
    late = rng.integers(0, 600, n)
    places = rng.integers(0, 4, n)
    # uniform over the values with `places` decimals in [0, 100]: k / 10**places, k in [0, 100*10**places]
    k = rng.integers(0, 100 * 10**places + 1)
    region = rng.integers(0, len(REGIONS), n)
    i = np.arange(n, dtype=np.int64)
    secs = (i * SPAN_S) // n + jitter + np.where(late_mask, late, 0)
    secs = np.maximum(secs, 0)
    milli = k * 10 ** (3 - places)
    return cust, etype, secs, places, k, milli, region


def _table(strings):
    """A fixed-width (NUL-padded) bytes array of the given ASCII strings."""
    width = max(len(s) for s in strings)
    return np.array([s.encode("ascii") for s in strings], dtype=f"S{width}")


def _value_strings():
    """The decimal string of k / 10**p with exactly p places, for p in 0..3, k in 0..100*10**p."""
    out = []
    for p in range(4):
        scale = 10**p
        for k in range(100 * scale + 1):
            out.append(str(k) if p == 0 else f"{k // scale}.{k % scale:0{p}d}")
    return out


VALUE_OFFSET = [0, 101, 101 + 1001, 101 + 1001 + 10001]


def write_jsonl(path, cust, etype, secs, places, k, region):
    """Vectorised: every line is laid out as NUL-padded fixed-width fields in a (rows, width) byte
    matrix filled from lookup tables, then the NULs are dropped."""
    n = len(cust)
    ct = _table(
        [
            f'","customer_id":"cust_{c:05d}","event_type":"{t}","event_time":"'
            for c in range(N_CUSTOMERS)
            for t in TYPES
        ]
    )
    tt = _table(
        [
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(START_EPOCH + s))
            for s in range(int(secs.max()) + 1)
        ]
    )
    vr = _table(
        [f'","value":"{v}","properties":{{"region":"{r}"}}}}\n' for v in _value_strings() for r in REGIONS]
    )
    digits = _table([f"{d:03d}" for d in range(1000)])
    rec_t = np.dtype(
        [
            ("head", "S17"),
            ("id_hi", "S3"),
            ("id_mid", "S3"),
            ("id_lo", "S3"),
            ("ct", ct.dtype),
            ("time", tt.dtype),
            ("vr", vr.dtype),
        ]
    )
    offs = np.array(VALUE_OFFSET, dtype=np.int64)
    local = threading.local()

    def chunk(lo):
        """Format rows lo..lo+CHUNK into bytes (numpy releases the GIL in all of this)."""
        hi = min(n, lo + CHUNK)
        m = hi - lo
        if not hasattr(local, "rec"):
            # one record buffer per thread, reused: fresh allocations of this size cost more in
            # page faults than the formatting itself on a small VM
            local.rec = np.zeros(min(n, CHUNK), dtype=rec_t)
            local.rec["head"] = b'{"event_id":"evt_'
            local.mask = np.empty(local.rec.nbytes, dtype=bool)
        r = local.rec[:m]
        ids = np.arange(lo + 1, hi + 1, dtype=np.int64)
        np.take(digits, ids // 1_000_000, out=r["id_hi"], mode="clip")
        np.take(digits, (ids // 1000) % 1000, out=r["id_mid"], mode="clip")
        np.take(digits, ids % 1000, out=r["id_lo"], mode="clip")
        np.take(ct, cust[lo:hi] * len(TYPES) + etype[lo:hi], out=r["ct"], mode="clip")
        np.take(tt, secs[lo:hi], out=r["time"], mode="clip")
        np.take(vr, (offs[places[lo:hi]] + k[lo:hi]) * len(REGIONS) + region[lo:hi], out=r["vr"], mode="clip")
        flat = local.rec.view(np.uint8)[: m * rec_t.itemsize]
        mask = local.mask[: flat.size]
        np.not_equal(flat, 0, out=mask)
        return flat[mask]  # boolean indexing: no index array (np.compress would make one)

    md5 = hashlib.md5()
    tmp = path + ".part"
    starts = list(range(0, n, CHUNK))
    # two formatting threads, results written in order; at most WINDOW chunks in flight
    with open(tmp, "wb") as f, ThreadPoolExecutor(max_workers=THREADS) as pool:
        pending = deque()
        for lo in starts:
            pending.append(pool.submit(chunk, lo))
            if len(pending) >= WINDOW:
                view = memoryview(pending.popleft().result())
                md5.update(view)
                f.write(view)
        while pending:
            view = memoryview(pending.popleft().result())
            md5.update(view)
            f.write(view)
    os.replace(tmp, path)
    return md5.hexdigest()


def expected(n, cust, etype, secs, milli):
    total_milli = int(milli.sum(dtype=np.int64))
    hour = secs // 3600
    key = (cust.astype(np.int64) * len(TYPES) + etype) * (int(hour.max()) + 1) + hour
    seen = np.zeros(int(key.max()) + 1, dtype=bool)  # at most 10,000 x 5 x 50 hours
    seen[key] = True
    groups = int(np.count_nonzero(seen))
    sign = "-" if total_milli < 0 else ""
    a = abs(total_milli)
    return {
        "total_count": n,
        "total_sum": f"{sign}{a // 1000}.{a % 1000:03d}",
        "total_sum_milli": total_milli,
        "expected_groups": groups,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int, help="number of events")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--out-dir", default=default_out_dir())
    a = ap.parse_args(argv)
    if a.n <= 0:
        ap.error("N must be > 0")
    os.makedirs(a.out_dir, exist_ok=True)
    suffix = "" if a.seed == SEED else f"_seed{a.seed}"
    path = os.path.join(a.out_dir, f"events_{a.n}{suffix}.jsonl")
    exp_path = os.path.join(a.out_dir, f"events_{a.n}{suffix}.expected.json")
    keep_freed_memory()
    t0 = time.perf_counter()
    cust, etype, secs, places, k, milli, region = draw(a.n, a.seed)
    exp = expected(a.n, cust, etype, secs, milli)
    t1 = time.perf_counter()
    md5 = write_jsonl(path, cust, etype, secs, places, k, region)
    t2 = time.perf_counter()
    exp.update(
        {
            "generator_version": GENERATOR_VERSION,
            "seed": a.seed,
            "md5": md5,
            "bytes": os.path.getsize(path),
            "file": os.path.basename(path),
        }
    )
    with open(exp_path, "w") as f:
        json.dump(exp, f, indent=2)
        f.write("\n")
    print(
        f"wrote {path} ({exp['bytes']:,} bytes, md5 {md5}) and {os.path.basename(exp_path)}: "
        f"total_sum {exp['total_sum']}, {exp['expected_groups']:,} groups; "
        f"draw {t1 - t0:.1f} s, write {t2 - t1:.1f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
