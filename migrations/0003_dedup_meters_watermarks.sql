-- Metering semantics (SPEC §2–§4): durable dedup, raw events partitioned by month, meters, multiset
-- state for max / unique_count / latest, late events, conflicting duplicates, watermarks.

-- The truth for uniqueness (SPEC §3): one row per event_id, ever. The API inserts a row (counted_* NULL)
-- before it answers 201; the pipeline claims it when it reads the record (counted_* = the record's
-- position), or inserts a claimed row for events that came straight through Kafka. A claim keyed by the
-- position is idempotent, so a replay after a crash recognises its own claim.
CREATE TABLE event_ids (
    event_id          text        NOT NULL,
    event_time        timestamptz NOT NULL,
    -- Event::fingerprint(): copies with another fingerprint are conflicting duplicates.
    fingerprint       bigint      NOT NULL,
    source            text        NOT NULL,
    counted_partition integer,
    counted_offset    bigint,
    voided_partition  integer,
    voided_offset     bigint,
    void_requested_at timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT event_ids_pkey PRIMARY KEY (event_id),
    CONSTRAINT event_ids_source_known CHECK (source IN ('api', 'kafka', 'migrated'))
);

-- Raw events, partitioned by month of event time. Uniqueness of event_id is event_ids' job (a
-- partitioned table can only enforce keys that include the partition key).
ALTER TABLE event_outbox DROP CONSTRAINT event_outbox_event_fkey;
ALTER TABLE telemetry_events RENAME TO telemetry_events_v1;
ALTER TABLE telemetry_events_v1 RENAME CONSTRAINT telemetry_events_pkey TO telemetry_events_v1_pkey;
ALTER INDEX telemetry_events_customer_time_idx RENAME TO telemetry_events_v1_customer_time_idx;

CREATE TABLE telemetry_events (
    event_id     text        NOT NULL,
    customer_id  text        NOT NULL,
    event_type   text        NOT NULL,
    event_time   timestamptz NOT NULL,
    value        numeric     NOT NULL,
    properties   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    received_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT telemetry_events_pkey PRIMARY KEY (event_id, event_time),
    CONSTRAINT telemetry_events_value_finite CHECK (value <> 'NaN'::numeric AND value >= 0)
) PARTITION BY RANGE (event_time);
CREATE INDEX telemetry_events_customer_type_time_idx ON telemetry_events (customer_id, event_type, event_time);
CREATE TABLE telemetry_events_default PARTITION OF telemetry_events DEFAULT;
DO $$
DECLARE
    month date := date '2020-01-01';
BEGIN
    WHILE month < date '2031-01-01' LOOP
        EXECUTE format(
            'CREATE TABLE telemetry_events_%s PARTITION OF telemetry_events FOR VALUES FROM (%L) TO (%L)',
            to_char(month, 'YYYY_MM'), month || ' 00:00:00+00', (month + interval '1 month')::date || ' 00:00:00+00');
        month := month + interval '1 month';
    END LOOP;
END
$$;

INSERT INTO event_ids (event_id, event_time, fingerprint, source, counted_partition, counted_offset)
SELECT event_id, event_time, 0, 'migrated', -1, -1 FROM telemetry_events_v1;
INSERT INTO telemetry_events SELECT * FROM telemetry_events_v1;
DROP TABLE telemetry_events_v1;
ALTER TABLE event_outbox ADD CONSTRAINT event_outbox_event_fkey
    FOREIGN KEY (event_id) REFERENCES event_ids (event_id) ON DELETE CASCADE;
-- The outbox carries Kafka headers for records that are not plain events (voids).
ALTER TABLE event_outbox ADD COLUMN kind text NOT NULL DEFAULT 'event';
ALTER TABLE event_outbox DROP CONSTRAINT event_outbox_pkey;
ALTER TABLE event_outbox ADD CONSTRAINT event_outbox_pkey PRIMARY KEY (event_id, kind);

-- Meter definitions (SPEC §4). Immutable once used: archive and create another.
CREATE TABLE meters (
    meter          text        NOT NULL,
    event_type     text        NOT NULL,
    aggregation    text        NOT NULL,
    value_property text,
    "window"       text        NOT NULL DEFAULT 'hour',
    created_at     timestamptz NOT NULL DEFAULT now(),
    archived_at    timestamptz,
    CONSTRAINT meters_pkey PRIMARY KEY (meter),
    CONSTRAINT meters_aggregation_known CHECK (aggregation IN ('count', 'sum', 'max', 'unique_count', 'latest')),
    CONSTRAINT meters_window_known CHECK ("window" IN ('minute', 'hour', 'day'))
);

-- The multiset behind each max / unique_count / latest row: item → how many counted events hold it.
CREATE TABLE meter_values (
    customer_id  text        NOT NULL,
    meter        text        NOT NULL,
    window_start timestamptz NOT NULL,
    -- max: 0, the value as text, the value; unique_count: 0, the JSON text, NULL;
    -- latest: the event time (µs), the event_id, the value.
    sort_time    bigint      NOT NULL,
    item         text        NOT NULL,
    num          numeric,
    kind         text        NOT NULL,
    count        bigint      NOT NULL,
    CONSTRAINT meter_values_pkey PRIMARY KEY (customer_id, meter, window_start, sort_time, item),
    CONSTRAINT meter_values_count_nonnegative CHECK (count >= 0),
    CONSTRAINT meter_values_num_finite CHECK (num IS NULL OR num <> 'NaN'::numeric)
);

-- Events applied to windows that were already finalized (SPEC §4).
CREATE TABLE late_events (
    event_id     text        NOT NULL,
    meter        text        NOT NULL,
    customer_id  text        NOT NULL,
    window_start timestamptz NOT NULL,
    event_time   timestamptz NOT NULL,
    watermark    timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT late_events_pkey PRIMARY KEY (event_id, meter)
);

-- Conflicting duplicates (same event_id, another payload), kept for inspection (SPEC §3).
CREATE TABLE duplicate_events (
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    event_id    text        NOT NULL,
    kind        text        NOT NULL,
    payload     bytea       NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT duplicate_events_pkey PRIMARY KEY (topic, partition, "offset")
);
CREATE INDEX duplicate_events_event_idx ON duplicate_events (event_id);

-- Event-time progress: per partition the greatest event time read; per topic the committed watermark
-- and the floor an admin set with POST /api/v1/watermark.
ALTER TABLE source_offsets ADD COLUMN max_event_time timestamptz;
ALTER TABLE pipeline_leases ADD COLUMN committed_watermark timestamptz;
ALTER TABLE pipeline_leases ADD COLUMN allowed_lateness interval NOT NULL DEFAULT interval '1 hour';
CREATE TABLE watermark_floors (
    topic      text        NOT NULL,
    advance_to timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT watermark_floors_pkey PRIMARY KEY (topic)
);

-- Finalization looks for open windows that the watermark has passed.
CREATE INDEX aggregations_open_windows_idx ON aggregations (window_end) WHERE NOT finalized;
