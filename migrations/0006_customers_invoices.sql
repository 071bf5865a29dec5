-- Customers, invoices and invoice runs (SPEC §6).
--
-- An issued invoice never changes: its lines and adjustments are written once, in the transaction that
-- issues it, and a void only flips its status (nothing is ever deleted: a trigger refuses it). Later
-- changes to its period reach the customer's next invoice as adjustments, which reference the original
-- invoice and the (meter, price book) line they correct.

CREATE TABLE customers (
    customer_id text        NOT NULL,
    name        text        NOT NULL,
    email       text,
    address     text,
    currency    text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT customers_pkey PRIMARY KEY (customer_id),
    -- The alphabet of an event's customer_id (SPEC §2), so a customer matches its usage.
    CONSTRAINT customers_id_valid CHECK (customer_id ~ '^[A-Za-z0-9._:-]{1,128}$'),
    CONSTRAINT customers_currency_iso CHECK (currency ~ '^[A-Z]{3}$'),
    CONSTRAINT customers_name_present CHECK (length(name) BETWEEN 1 AND 200)
);

-- The gapless invoice number: one row, incremented in the transaction that issues, so a number is used
-- exactly when that transaction commits (a rolled-back issue gives its number back). Issuers serialize on
-- this row only for the last moments of their transaction (they take it after every read).
CREATE TABLE invoice_numbers (
    singleton   boolean NOT NULL DEFAULT true,
    last_number bigint  NOT NULL,
    CONSTRAINT invoice_numbers_pkey PRIMARY KEY (singleton),
    CONSTRAINT invoice_numbers_one_row CHECK (singleton),
    CONSTRAINT invoice_numbers_not_negative CHECK (last_number >= 0)
);
INSERT INTO invoice_numbers (singleton, last_number) VALUES (true, 0);

CREATE TABLE invoices (
    invoice_id           text        NOT NULL,
    number               bigint      NOT NULL,
    customer_id          text        NOT NULL,
    -- Half-open [start, end): a calendar month, UTC.
    billing_period_start timestamptz NOT NULL,
    billing_period_end   timestamptz NOT NULL,
    status               text        NOT NULL DEFAULT 'issued',
    currency             text        NOT NULL,
    -- The lines, written once: per (meter, price book) a usage line and, below the book's minimum, a
    -- top-up line — [{meter, kind: usage|minimum, description, quantity, unit_price_summary, amount
    -- (rounded once), price_book_id}], decimals as strings with their exact digits. Kept in the row (not a
    -- child table) so an invoice is one row and one index entry per index: issuing 10,000 at once does not
    -- pay a foreign-key probe per line.
    line_items           jsonb       NOT NULL,
    -- Σ rounded line amounts; total = subtotal + Σ adjustments (may be negative: a credit).
    subtotal             numeric     NOT NULL,
    total                numeric     NOT NULL,
    issued_at            timestamptz NOT NULL,
    voided_at            timestamptz,
    void_reason          text,
    CONSTRAINT invoices_pkey PRIMARY KEY (invoice_id),
    CONSTRAINT invoices_number_key UNIQUE (number),
    CONSTRAINT invoices_customer_fkey FOREIGN KEY (customer_id) REFERENCES customers (customer_id),
    CONSTRAINT invoices_number_positive CHECK (number > 0),
    CONSTRAINT invoices_status_known CHECK (status IN ('issued', 'void')),
    CONSTRAINT invoices_voided_when_void CHECK ((status = 'void') = (voided_at IS NOT NULL)),
    CONSTRAINT invoices_period_ordered CHECK (billing_period_end > billing_period_start),
    CONSTRAINT invoices_currency_iso CHECK (currency ~ '^[A-Z]{3}$'),
    CONSTRAINT invoices_amounts_finite CHECK (subtotal <> 'NaN'::numeric AND total <> 'NaN'::numeric),
    CONSTRAINT invoices_lines_array CHECK (jsonb_typeof(line_items) = 'array')
);
-- SPEC §6: one issued invoice per customer and period, whoever issues it and however concurrently. A
-- second issue fails with unique_violation (23505) on this index, answered 409 INVOICE_ALREADY_EXISTS; a
-- voided invoice no longer counts, so voiding frees the period.
CREATE UNIQUE INDEX invoices_one_issued_per_period
    ON invoices (customer_id, billing_period_start) WHERE status = 'issued';
-- A customer's invoices, voided ones included (listing, the seed's lookup by customer and period).
CREATE INDEX invoices_customer_period_idx ON invoices (customer_id, billing_period_start);

CREATE FUNCTION refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are never deleted (void an invoice instead)', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER invoices_never_deleted BEFORE DELETE OR TRUNCATE ON invoices
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_delete();

-- Corrections of earlier invoices' lines carried by a later invoice (SPEC §6):
-- round(current amount of the line incl. top-up) − (amount issued + adjustments issued before).
CREATE TABLE invoice_adjustments (
    -- The invoice that carries the adjustment.
    invoice_id          text        NOT NULL,
    position            smallint    NOT NULL,
    -- The invoice whose line it corrects, and that line: (period, meter, price book).
    original_invoice_id text        NOT NULL,
    period_start        timestamptz NOT NULL,
    meter               text        NOT NULL,
    price_book_id       text        NOT NULL,
    amount              numeric     NOT NULL,
    reason              text        NOT NULL,
    CONSTRAINT invoice_adjustments_pkey PRIMARY KEY (invoice_id, position),
    CONSTRAINT invoice_adjustments_invoice_fkey FOREIGN KEY (invoice_id) REFERENCES invoices (invoice_id),
    CONSTRAINT invoice_adjustments_original_fkey
        FOREIGN KEY (original_invoice_id) REFERENCES invoices (invoice_id),
    CONSTRAINT invoice_adjustments_amount_finite CHECK (amount <> 'NaN'::numeric),
    CONSTRAINT invoice_adjustments_not_zero CHECK (amount <> 0)
);
CREATE INDEX invoice_adjustments_original_idx
    ON invoice_adjustments (original_invoice_id, meter, price_book_id);
CREATE TRIGGER invoice_adjustments_never_deleted BEFORE DELETE OR TRUNCATE ON invoice_adjustments
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_delete();

-- Invoice runs: every registered customer's invoice for a period, resumable. The customers are
-- snapshotted as items when the run is created; an item turns issued/skipped/failed in the same
-- transaction as the invoice it issues, so a run killed at any moment resumes with no duplicate and no gap.
CREATE TABLE invoice_runs (
    run_id       text        NOT NULL,
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL,
    status       text        NOT NULL DEFAULT 'pending',
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    CONSTRAINT invoice_runs_pkey PRIMARY KEY (run_id),
    CONSTRAINT invoice_runs_status_known CHECK (status IN ('pending', 'running', 'succeeded', 'failed')),
    CONSTRAINT invoice_runs_period_ordered CHECK (period_end > period_start)
);
-- At most one unfinished run per period: a second start gets 409 INVOICE_RUN_IN_PROGRESS (or resumes it,
-- from the CLI).
CREATE UNIQUE INDEX invoice_runs_one_active_per_period
    ON invoice_runs (period_start) WHERE status IN ('pending', 'running');

CREATE TABLE invoice_run_items (
    run_id      text NOT NULL,
    customer_id text NOT NULL,
    -- pending → issued | skipped (already issued) | failed; unregistered: usage without a customer.
    status      text NOT NULL DEFAULT 'pending',
    -- The invoice issued, or the one that was already there.
    invoice_id  text,
    error       text,
    CONSTRAINT invoice_run_items_pkey PRIMARY KEY (run_id, customer_id),
    CONSTRAINT invoice_run_items_run_fkey FOREIGN KEY (run_id) REFERENCES invoice_runs (run_id),
    CONSTRAINT invoice_run_items_status_known
        CHECK (status IN ('pending', 'issued', 'skipped', 'failed', 'unregistered')),
    CONSTRAINT invoice_run_items_issued_has_invoice CHECK (status <> 'issued' OR invoice_id IS NOT NULL)
);
CREATE INDEX invoice_run_items_pending_idx ON invoice_run_items (run_id, customer_id) WHERE status = 'pending';
