#!/usr/bin/env python3
"""DuckDB (batch SQL): engines/duckdb_run.py IN.jsonl OUT.csv

read_ndjson with explicit columns (event_time as TIMESTAMP, value as VARCHAR, properties as a
STRUCT), GROUP BY customer_id, event_type, time_bucket(1 hour), exact
sum(CAST(value AS DECIMAL(18,3))) (-> DECIMAL(38,3)) and count(*), COPY ... TO csv.
Threads: DuckDB's default (= cores; 2 on the benchmark machine).
"""

import sys

import duckdb


def q(s):
    return "'" + s.replace("'", "''") + "'"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    inp, out = sys.argv[1], sys.argv[2]
    con = duckdb.connect()
    con.execute(
        f"""
        COPY (
          SELECT customer_id,
                 event_type,
                 strftime(time_bucket(INTERVAL 1 HOUR, event_time), '%Y-%m-%dT%H:00:00Z') AS window_start,
                 sum(CAST(value AS DECIMAL(18,3))) AS value_sum,
                 count(*) AS event_count
          FROM read_ndjson({q(inp)},
                 columns = {{event_id: 'VARCHAR', customer_id: 'VARCHAR', event_type: 'VARCHAR',
                            event_time: 'TIMESTAMP', value: 'VARCHAR',
                            properties: 'STRUCT(region VARCHAR)'}},
                 timestampformat = '%Y-%m-%dT%H:%M:%SZ')
          GROUP BY customer_id, event_type, time_bucket(INTERVAL 1 HOUR, event_time)
        ) TO {q(out)} (FORMAT csv, HEADER true)
        """
    )


if __name__ == "__main__":
    main()
