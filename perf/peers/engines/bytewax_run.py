#!/usr/bin/env python3
"""Bytewax (Python operators on a Rust/timely runtime): engines/bytewax_run.py IN.jsonl OUT.csv [WORKERS]

FileSource(batch_size=10000) -> map (json.loads, datetime.fromisoformat, value split into integer
thousandths; emits (customer|type, (ts, milli)) directly) -> windowing.fold_window with
EventClock(wait_for_system_duration=15 min, to_system_utc=None) and
TumblingWindower(1h, align_to=2024-01-01T00:00Z), ordered=False -> format -> FileSink.
The late stream is counted and printed on stderr at exit ("late_events=N").
WORKERS (default 1) = workers in this one process.

to_system_utc=None: with the default (identity) the runtime maps each window's close time
(January 2024) to a system time in the past and wakes every key with an open window on every
activation; this is the documented setting for replaying historical data.
"""

import json
import sys
from pathlib import Path
from datetime import datetime, timedelta, timezone

import bytewax.operators as op
import bytewax.operators.windowing as win
from bytewax.connectors.files import FileSink, FileSource
from bytewax.dataflow import Dataflow
from bytewax.operators.windowing import EventClock, TumblingWindower
from bytewax.run import cli_main

ALIGN = datetime(2024, 1, 1, tzinfo=timezone.utc)
LENGTH = timedelta(hours=1)
LATE = [0]


def parse(line):
    d = json.loads(line)
    ts = datetime.fromisoformat(d["event_time"])
    v = d["value"]
    whole, _, frac = v.partition(".")
    milli = int(whole) * 1000 + int((frac + "000")[:3])
    return (d["customer_id"] + "|" + d["event_type"], (ts, milli))


def fmt(item):
    key, (window_id, (total, count)) = item
    cust, etype = key.split("|", 1)
    start = (ALIGN + LENGTH * window_id).strftime("%Y-%m-%dT%H:00:00Z")
    return (key, f"{cust},{etype},{start},{total // 1000}.{total % 1000:03d},{count}")


def count_late(_step, _item):
    LATE[0] += 1


def build(inp, out):
    flow = Dataflow("peers")
    lines = op.input("in", flow, FileSource(inp, batch_size=10000))
    keyed = op.map("parse", lines, parse)
    clock = EventClock(
        lambda x: x[0], wait_for_system_duration=timedelta(minutes=15), to_system_utc=lambda _: None
    )
    windower = TumblingWindower(length=LENGTH, align_to=ALIGN)
    wo = win.fold_window(
        "sum",
        keyed,
        clock,
        windower,
        builder=lambda: (0, 0),
        folder=lambda acc, x: (acc[0] + x[1], acc[1] + 1),
        merger=lambda a, b: (a[0] + b[0], a[1] + b[1]),
        ordered=False,
    )
    op.inspect("late", wo.late, count_late)
    op.output("out", op.map("fmt", wo.down, fmt), FileSink(Path(out)))
    return flow


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    inp, out = sys.argv[1], sys.argv[2]
    workers = int(sys.argv[3]) if len(sys.argv) == 4 else 1
    # FileSink truncates the file when it opens it, so the output has no header row: its columns
    # are customer_id,event_type,window_start,value_sum,event_count (verify.py detects that).
    cli_main(build(inp, out), workers_per_process=workers)
    print(f"late_events={LATE[0]}", file=sys.stderr)


if __name__ == "__main__":
    main()
