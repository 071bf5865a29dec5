-- The live draft of every customer's invoice per period (SPEC §6), maintained by the pipeline in the
-- same epoch transaction as the charges it sums, and re-rating jobs (SPEC §7).

-- Σ of the window charges per (customer, period, meter, price book): the upcoming invoice's usage lines.
CREATE TABLE upcoming_lines (
    customer_id   text        NOT NULL,
    period_start  timestamptz NOT NULL,
    meter         text        NOT NULL,
    price_book_id text        NOT NULL,
    currency      text        NOT NULL,
    quantity      numeric     NOT NULL,
    -- Unrounded: rounding happens once, on issued invoice lines.
    amount        numeric     NOT NULL,
    windows       bigint      NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT upcoming_lines_pkey PRIMARY KEY (customer_id, period_start, meter, price_book_id),
    CONSTRAINT upcoming_lines_amount_finite CHECK (amount <> 'NaN'::numeric AND quantity <> 'NaN'::numeric),
    CONSTRAINT upcoming_lines_windows_counted CHECK (windows >= 0)
);

-- Re-rating jobs: at most one pending or running job per overlapping scope (checked under a table lock
-- by the API, since a GiST exclusion over text[] overlap needs an extension we do not want).
CREATE TABLE rerating_jobs (
    job_id           text        NOT NULL,
    -- Empty: every customer.
    customer_ids     text[]      NOT NULL,
    scope            tstzrange   NOT NULL,
    reason           text        NOT NULL,
    status           text        NOT NULL DEFAULT 'pending',
    windows_checked  bigint      NOT NULL DEFAULT 0,
    windows_changed  bigint      NOT NULL DEFAULT 0,
    amount_before    numeric,
    amount_after     numeric,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    CONSTRAINT rerating_jobs_pkey PRIMARY KEY (job_id),
    CONSTRAINT rerating_jobs_status_known CHECK (status IN ('pending', 'running', 'succeeded', 'failed')),
    CONSTRAINT rerating_jobs_scope_bounded CHECK (NOT isempty(scope) AND NOT lower_inf(scope) AND NOT upper_inf(scope))
);
CREATE INDEX rerating_jobs_active_idx ON rerating_jobs (created_at) WHERE status IN ('pending', 'running');

-- A re-rating job that corrected stored rows asks the pipeline to reload its rating state from them
-- (so it never later overwrites a corrected row with a stale value): it bumps `resync_requested`; the
-- pipeline sets `resync_done` to the requests its loaded state includes, and the job waits for that.
ALTER TABLE pipeline_leases ADD COLUMN resync_requested bigint NOT NULL DEFAULT 0;
ALTER TABLE pipeline_leases ADD COLUMN resync_done bigint NOT NULL DEFAULT 0;
