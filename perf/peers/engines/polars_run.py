#!/usr/bin/env python3
"""Polars (batch DataFrame, streaming engine): engines/polars_run.py IN.jsonl OUT.csv

scan_ndjson with a full schema, str.to_datetime, cast(pl.Decimal(18,3)),
group_by(customer_id, event_type, event_time.dt.truncate("1h")), sum / len,
sink_csv(engine="streaming").  Thread pool: POLARS_MAX_THREADS (default here 2).
"""

import os
import sys

os.environ.setdefault("POLARS_MAX_THREADS", "2")

import polars as pl  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    inp, out = sys.argv[1], sys.argv[2]
    schema = {
        "event_id": pl.String,
        "customer_id": pl.String,
        "event_type": pl.String,
        "event_time": pl.String,
        "value": pl.String,
        "properties": pl.Struct({"region": pl.String}),
    }
    (
        pl.scan_ndjson(inp, schema=schema)
        .with_columns(
            pl.col("event_time").str.to_datetime("%Y-%m-%dT%H:%M:%SZ", time_unit="us"),
            pl.col("value").cast(pl.Decimal(18, 3)),
        )
        .group_by("customer_id", "event_type", pl.col("event_time").dt.truncate("1h").alias("window_start"))
        .agg(pl.col("value").sum().alias("value_sum"), pl.len().alias("event_count"))
        .with_columns(pl.col("window_start").dt.strftime("%Y-%m-%dT%H:00:00Z"))
        .sink_csv(out, engine="streaming")
    )


if __name__ == "__main__":
    main()
