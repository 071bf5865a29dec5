-- The pipeline LISTENs on `meterflow_config` and reloads what changed (src/pipeline/pollers.rs), so a
-- meter or a price book written by anyone (the API, the configuration file, an operator's psql)
-- reaches the workers at once, not at the next poll. The payload is the table's name.
CREATE FUNCTION meterflow_notify_config() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('meterflow_config', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE TRIGGER meters_notify_config
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON meters
    FOR EACH STATEMENT EXECUTE FUNCTION meterflow_notify_config();

CREATE TRIGGER price_books_notify_config
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON price_books
    FOR EACH STATEMENT EXECUTE FUNCTION meterflow_notify_config();
