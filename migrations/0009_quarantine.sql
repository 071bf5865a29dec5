-- Overflow is data, not a crash (issue 13): a window whose usage left the 96-bit decimal range, and a
-- billing period whose rating overflowed, are quarantined: visible here, counted by the pipeline's
-- quarantined_windows / quarantined_periods gauges, alerted on (deploy/prometheus/alerts.yml).

-- A quarantined row's value is frozen at its last value in range (it is not the window's usage);
-- event_count keeps counting. It stays quarantined until an operator corrects the usage.
ALTER TABLE aggregations ADD COLUMN quarantined boolean NOT NULL DEFAULT false;
CREATE INDEX aggregations_quarantined_idx ON aggregations (customer_id, meter, window_start)
    WHERE quarantined;

-- A billing period rated only up to from_window: that window and the later ones of the period have no
-- charge. The pipeline writes it in the same commit as the charges, and removes it when the period
-- rates again.
CREATE TABLE rating_quarantine (
    customer_id  text        NOT NULL,
    meter        text        NOT NULL,
    period_start timestamptz NOT NULL,
    from_window  timestamptz NOT NULL,
    reason       text        NOT NULL,
    since        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT rating_quarantine_pkey PRIMARY KEY (customer_id, meter, period_start),
    CONSTRAINT rating_quarantine_reason_known CHECK (reason IN ('usage_overflow', 'rating_overflow'))
);
