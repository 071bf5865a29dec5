#!/usr/bin/env python3
"""Pathway (incremental dataflow, static mode): engines/pathway_run.py IN.jsonl OUT.csv

pw.io.jsonlines.read(mode="static") -> windowby(ts, tumbling(1h, origin=2024-01-01),
instance=customer_id+"|"+event_type).reduce(sum, count) -> pw.io.csv.write.

Exactness: Pathway has no decimal type, so `value` becomes a scaled integer of thousandths
computed with Pathway's own string expressions (pad to 3 decimals, drop the dot, parse_int):
no float, no Python UDF.  The output has value_sum_milli (integer thousandths) and the CSV
writer's time,diff columns.  PATHWAY_THREADS defaults to 2 here (Pathway's own default is 1).
"""

import datetime
import os
import sys

os.environ.setdefault("PATHWAY_THREADS", "2")

import pathway as pw  # noqa: E402


class Event(pw.Schema):
    event_id: str
    customer_id: str
    event_type: str
    event_time: str
    value: str
    properties: pw.Json


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    inp, out = sys.argv[1], sys.argv[2]
    ev = pw.io.jsonlines.read(inp, schema=Event, mode="static")
    # "42" -> "42." ; then pad the fraction to 3 places, drop the dot, parse as int
    dotted = pw.if_else(ev.value.str.find(".") < 0, ev.value + ".", ev.value)
    ev = ev.select(
        customer_id=ev.customer_id,
        event_type=ev.event_type,
        instance=ev.customer_id + "|" + ev.event_type,
        ts=ev.event_time.dt.strptime("%Y-%m-%dT%H:%M:%SZ"),
        dotted=dotted,
    )
    frac = ev.dotted.str.len() - ev.dotted.str.find(".") - 1
    padded = pw.if_else(
        frac == 0,
        ev.dotted + "000",
        pw.if_else(frac == 1, ev.dotted + "00", pw.if_else(frac == 2, ev.dotted + "0", ev.dotted)),
    )
    ev = ev.select(
        pw.this.instance,
        pw.this.ts,
        milli=padded.str.replace(".", "").str.parse_int(),
    )
    agg = ev.windowby(
        ev.ts,
        window=pw.temporal.tumbling(
            duration=datetime.timedelta(hours=1), origin=datetime.datetime(2024, 1, 1)
        ),
        instance=ev.instance,
    ).reduce(
        instance=pw.this._pw_instance,
        window_start=pw.this._pw_window_start,
        value_sum_milli=pw.reducers.sum(pw.this.milli),
        event_count=pw.reducers.count(),
    )
    pw.io.csv.write(agg, out)
    pw.run(monitoring_level=pw.MonitoringLevel.NONE)


if __name__ == "__main__":
    main()
