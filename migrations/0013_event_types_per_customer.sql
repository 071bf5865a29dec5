-- A bound on what one customer's events can make the pipeline keep (review finding 21): every event type
-- no meter reads becomes a default meter named after it, with rows, rating state and charges per
-- window, so a key that varies `event_type` could grow the state without end. At most 1000 distinct
-- event types per customer are accepted; an event with a 1001st is refused, over HTTP (422) and from
-- Kafka (a dead letter), by the same check, in the same statement that stores the event.
CREATE TABLE customer_event_types (
    customer_id text        NOT NULL,
    event_type  text        NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT customer_event_types_pkey PRIMARY KEY (customer_id, event_type)
);
INSERT INTO customer_event_types (customer_id, event_type)
SELECT DISTINCT customer_id, event_type FROM telemetry_events;

CREATE FUNCTION meterflow_event_type_seen() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    known integer;
BEGIN
    IF EXISTS (SELECT 1 FROM customer_event_types
               WHERE customer_id = NEW.customer_id AND event_type = NEW.event_type) THEN
        RETURN NEW;
    END IF;
    -- Two sessions adding a customer's types at once may each see the other's not yet: the bound is
    -- approximate by the number of concurrent writers, which is small.
    SELECT count(*) INTO known FROM customer_event_types WHERE customer_id = NEW.customer_id;
    IF known >= 1000 THEN
        RAISE EXCEPTION 'customer % already has 1000 distinct event types; event_type % is refused (define meters over fewer types)',
            NEW.customer_id, NEW.event_type
            USING ERRCODE = '22M01';
    END IF;
    INSERT INTO customer_event_types (customer_id, event_type) VALUES (NEW.customer_id, NEW.event_type)
    ON CONFLICT ON CONSTRAINT customer_event_types_pkey DO NOTHING;
    RETURN NEW;
END
$$;

CREATE TRIGGER telemetry_events_event_type_seen BEFORE INSERT ON telemetry_events
    FOR EACH ROW EXECUTE FUNCTION meterflow_event_type_seen();
