-- meterflow_note_event_types reads customer_event_types only through its primary key.
--
-- Its `NOT EXISTS` pre-check and its count per customer were planned by the planner, and a plan
-- made while the table was empty (a freshly vacuumed database) is a sequential scan that plpgsql
-- caches for the session: as the table grew, every ingest statement scanned it whole (the
-- performance gate: the API's insert at 2.2 ms a call instead of 0.25 ms, p99 0.8-1.3 s). Now the
-- insert's `ON CONFLICT` finds existing pairs through the key, as it always does, and the function
-- plans each statement for the table as it is (`plan_cache_mode = force_custom_plan`), so the count
-- per customer takes the key's prefix once the table has rows.
CREATE OR REPLACE FUNCTION meterflow_note_event_types(customer_ids text[], event_types text[]) RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    customers text[];
    types     text[];
    over      record;
BEGIN
    -- Sorted, so that concurrent writers take the key locks in one order.
    WITH added AS (
        INSERT INTO customer_event_types (customer_id, event_type)
        SELECT DISTINCT s.customer_id, s.event_type
        FROM unnest(customer_ids, event_types) AS s(customer_id, event_type)
        ORDER BY 1, 2
        ON CONFLICT ON CONSTRAINT customer_event_types_pkey DO NOTHING
        RETURNING customer_id, event_type
    )
    SELECT array_agg(customer_id), array_agg(event_type) INTO customers, types FROM added;
    IF customers IS NULL THEN
        RETURN;
    END IF;
    -- Two sessions adding a customer's types at once may each see the other's not yet: the bound is
    -- approximate by the number of concurrent writers, which is small.
    SELECT g.customer_id, min(g.event_type) AS event_type INTO over
    FROM unnest(customers, types) AS g(customer_id, event_type)
    WHERE (SELECT count(*) FROM customer_event_types c WHERE c.customer_id = g.customer_id) > 1000
    GROUP BY g.customer_id
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'customer % already has 1000 distinct event types; event_type % is refused (define meters over fewer types)',
            over.customer_id, over.event_type
            USING ERRCODE = '22M01';
    END IF;
END
$$;
