-- Issue 14, the seed's database scenario measured at 10M events (perf/src/bin/db_scenario.rs,
-- perf/results/db-explain-*.txt).

-- "Pre-computed where possible": the pipeline already keeps each customer's period-to-date usage of
-- priced meters in upcoming_lines (maintained in the epoch transaction). A month's usage over all
-- customers reads those rows (1/12 of the table a year in) instead of the month's hourly aggregates
-- (85k rows, sorted to disk); the invoice run's search for unregistered customers' usage in a period
-- (sinks/src/invoice_runs.rs) reads the same. period_start never changes on the pipeline's updates.
CREATE INDEX upcoming_lines_period_idx ON upcoming_lines (period_start);

-- JIT compilation: Postgres compiles any plan estimated above jit_above_cost, and a period report
-- over 10k invoices spent 100 ms of its 172 ms compiling (the estimate of jsonb_array_elements' rows is
-- a fixed 100 per invoice). meterflow runs short queries and bounded reports, where compiling never
-- pays back: JIT is off for this database (new sessions). Skipped, with a notice, where the migrating
-- role does not own the database.
DO $$
BEGIN
    IF pg_has_role(current_user, (SELECT datdba FROM pg_database WHERE datname = current_database()), 'USAGE') THEN
        EXECUTE format('ALTER DATABASE %I SET jit = off', current_database());
    ELSE
        RAISE NOTICE 'not the owner of database %: leaving jit as configured', current_database();
    END IF;
END
$$;
