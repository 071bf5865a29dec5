-- Meter dimensions (issue 17, docs/dimensions.md): a meter may group its windows by up to three event
-- properties, and every row keyed by a window carries the window's dimension values.
--
-- `dimensions` is the values as a JSON object, `{"model": "large", "region": null}`; a meter without
-- `group_by` has `{}`, which every existing row gets. It is the last column of each key, so the scans by
-- (customer, meter, window range) the API and rating do stay range scans.

ALTER TABLE meters
    ADD COLUMN group_by text[] NOT NULL DEFAULT '{}',
    ADD COLUMN max_dimension_values integer,
    ADD CONSTRAINT meters_group_by_bounded CHECK (cardinality(group_by) <= 3),
    ADD CONSTRAINT meters_max_dimension_values_range
        CHECK (max_dimension_values IS NULL OR max_dimension_values BETWEEN 1 AND 100000);

ALTER TABLE aggregations ADD COLUMN dimensions jsonb NOT NULL DEFAULT '{}';
ALTER TABLE aggregations DROP CONSTRAINT aggregations_pkey,
    ADD CONSTRAINT aggregations_pkey PRIMARY KEY (customer_id, meter, window_start, dimensions);

ALTER TABLE meter_values ADD COLUMN dimensions jsonb NOT NULL DEFAULT '{}';
ALTER TABLE meter_values DROP CONSTRAINT meter_values_pkey,
    ADD CONSTRAINT meter_values_pkey PRIMARY KEY (customer_id, meter, window_start, dimensions, sort_time, item);

ALTER TABLE charges ADD COLUMN dimensions jsonb NOT NULL DEFAULT '{}';
ALTER TABLE charges DROP CONSTRAINT charges_pkey,
    ADD CONSTRAINT charges_pkey PRIMARY KEY (customer_id, meter, window_start, dimensions);

ALTER TABLE upcoming_lines ADD COLUMN dimensions jsonb NOT NULL DEFAULT '{}';
ALTER TABLE upcoming_lines DROP CONSTRAINT upcoming_lines_pkey,
    ADD CONSTRAINT upcoming_lines_pkey PRIMARY KEY (customer_id, period_start, meter, price_book_id, dimensions);

ALTER TABLE rating_quarantine ADD COLUMN dimensions jsonb NOT NULL DEFAULT '{}';
ALTER TABLE rating_quarantine DROP CONSTRAINT rating_quarantine_pkey,
    ADD CONSTRAINT rating_quarantine_pkey PRIMARY KEY (customer_id, meter, period_start, dimensions);

-- The values each (meter, key) has admitted, first come: the bound of `max_dimension_values` is decided
-- in the dataflow (its Admit operator), which this table restores at a start. Values are never
-- un-admitted, so a replay decides as the first run did. `value` NULL is the value `null` (a missing
-- property), which takes a slot like any other.
CREATE TABLE dimension_values (
    meter       text        NOT NULL,
    key         text        NOT NULL,
    value       text,
    admitted_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX dimension_values_key ON dimension_values (meter, key, value) NULLS NOT DISTINCT;
