-- meterflow's foundation schema: raw events, the API's outbox, aggregates, dead letters and the
-- pipeline's progress (source offsets + writer lease). Every constraint is named: the code maps
-- violations to domain errors by these names.

-- Raw events accepted through the API (SPEC §3): exactly one row per event_id.
CREATE TABLE telemetry_events (
    event_id     text        NOT NULL,
    customer_id  text        NOT NULL,
    event_type   text        NOT NULL,
    event_time   timestamptz NOT NULL,
    value        numeric     NOT NULL,
    properties   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    received_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT telemetry_events_pkey PRIMARY KEY (event_id),
    CONSTRAINT telemetry_events_value_finite CHECK (value <> 'NaN'::numeric AND value >= 0)
);
CREATE INDEX telemetry_events_customer_time_idx ON telemetry_events (customer_id, event_time);

-- Events stored by the API but not yet acknowledged by Kafka. A relay republishes rows left behind by a
-- crash between the INSERT and the broker's acknowledgement, so an accepted event always reaches the
-- pipeline.
CREATE TABLE event_outbox (
    event_id    text        NOT NULL,
    payload     bytea       NOT NULL,
    customer_id text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT event_outbox_pkey PRIMARY KEY (event_id),
    CONSTRAINT event_outbox_event_fkey FOREIGN KEY (event_id) REFERENCES telemetry_events (event_id) ON DELETE CASCADE
);

-- One current row per (customer, meter, window) (SPEC §4).
CREATE TABLE aggregations (
    customer_id  text        NOT NULL,
    meter        text        NOT NULL,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    value        numeric     NOT NULL,
    event_count  bigint      NOT NULL,
    finalized    boolean     NOT NULL DEFAULT false,
    revision     integer     NOT NULL DEFAULT 1,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT aggregations_pkey PRIMARY KEY (customer_id, meter, window_start),
    CONSTRAINT aggregations_value_finite CHECK (value <> 'NaN'::numeric),
    CONSTRAINT aggregations_window_ordered CHECK (window_end > window_start)
);
CREATE INDEX aggregations_meter_window_idx ON aggregations (meter, window_start);
CREATE INDEX aggregations_window_idx ON aggregations (window_start);

-- Kafka records that are not valid events, with the reason (SPEC §2).
CREATE TABLE dead_letters (
    id          bigint      GENERATED ALWAYS AS IDENTITY,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    payload     bytea       NOT NULL,
    reason      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dead_letters_pkey PRIMARY KEY (id),
    CONSTRAINT dead_letters_source_key UNIQUE (topic, partition, "offset")
);

-- The next offset to read per partition, committed in the same transaction as the results.
CREATE TABLE source_offsets (
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT source_offsets_pkey PRIMARY KEY (topic, partition),
    CONSTRAINT source_offsets_nonnegative CHECK (next_offset >= 0)
);

-- The writer lease: a pipeline bumps `generation` when it starts; commits compare it under a row lock,
-- so a stale instance can never commit (SPEC §9).
CREATE TABLE pipeline_leases (
    topic           text        NOT NULL,
    generation      bigint      NOT NULL,
    committed_epoch bigint      NOT NULL,
    acquired_at     timestamptz NOT NULL DEFAULT now(),
    committed_at    timestamptz,
    CONSTRAINT pipeline_leases_pkey PRIMARY KEY (topic)
);
