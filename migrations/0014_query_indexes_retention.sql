-- The seed's database scenario (issue 14; perf/src/bin/db_scenario.rs EXPLAINs every query it times)
-- and its "archive old data" (`meterflow retention`, src/retention.rs).

-- Month-wide questions over the aggregates ("every customer's usage per meter this month", the seed's
-- aggregation query over 1M aggregates): with no index on window_start alone (0002 dropped the btree)
-- Postgres read the whole table and kept 8% of it. A BRIN index fits this table: the pipeline writes
-- windows in about time order, so block ranges follow window_start; it is tens of kB for 1M rows, costs
-- next to nothing per insert, and since window_start never changes on an update, the in-place (HOT)
-- updates of 0002 stay HOT.
CREATE INDEX aggregations_window_brin ON aggregations USING brin (window_start);

-- A billing period's invoices without a customer (period reports like the scenario's join of invoices,
-- their lines and customers): the only index led with customer_id. With the scenario's five months a
-- period is a fifth of the table and Postgres rightly reads it all; with a year or more of history a
-- period is a small share and this index serves it. Invoices are written once (10k a month), so it
-- costs little.
CREATE INDEX invoices_period_idx ON invoices (billing_period_start);

-- Where raw events end: `meterflow retention` drops (optionally archiving) the month partitions of
-- telemetry_events that lie wholly behind the retention horizon, and records here the instant before
-- which raw events are gone. Dedup is not affected: its truth is event_ids, which the command keeps
-- unless asked (--prune-event-ids).
CREATE TABLE telemetry_retention (
    singleton       boolean     NOT NULL DEFAULT true,
    archived_before timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT telemetry_retention_pkey PRIMARY KEY (singleton),
    CONSTRAINT telemetry_retention_one_row CHECK (singleton)
);

-- A re-rating job recomputes its scope from the raw events (SPEC §7): over an archived month it would
-- find none and "correct" that month's aggregates, charges and upcoming lines to nothing. Such a job
-- is refused when it is created (SQLSTATE 22M02, a data exception: the API answers 422).
CREATE FUNCTION meterflow_rerating_scope_retained() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    gone timestamptz;
BEGIN
    SELECT archived_before INTO gone FROM telemetry_retention;
    IF gone IS NOT NULL AND lower(NEW.scope) < gone THEN
        RAISE EXCEPTION 're-rating needs the raw events, and those before % were archived (meterflow retention); start the scope at or after it',
            gone
            USING ERRCODE = '22M02';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER rerating_jobs_scope_retained BEFORE INSERT ON rerating_jobs
    FOR EACH ROW EXECUTE FUNCTION meterflow_rerating_scope_retained();
