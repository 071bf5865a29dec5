-- Price books and rating (SPEC §5): books with non-overlapping effective ranges per meter and customer
-- scope, an append-only audit of every change, and the window charges the pipeline commits with the
-- aggregates in the same epoch transaction.

-- A trusted extension: the database owner may create it (no superuser needed).
CREATE EXTENSION IF NOT EXISTS btree_gist;

CREATE TABLE price_books (
    price_book_id      text        NOT NULL,
    meter              text        NOT NULL,
    -- NULL: the default book for every customer without one of their own.
    customer_id        text,
    -- The overlap scope: '' for the default books (NULL is one scope, and = never matches NULL).
    scope              text        GENERATED ALWAYS AS (coalesce(customer_id, '')) STORED,
    currency           text        NOT NULL,
    -- Half-open [from, to); an open end is infinity.
    effective          tstzrange   NOT NULL,
    -- meterflow_model::PriceModel as JSON (decimals as strings).
    model              jsonb       NOT NULL,
    minimum_per_period numeric,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT price_books_pkey PRIMARY KEY (price_book_id),
    CONSTRAINT price_books_currency_iso CHECK (currency ~ '^[A-Z]{3}$'),
    CONSTRAINT price_books_customer_named CHECK (customer_id IS NULL OR customer_id <> ''),
    CONSTRAINT price_books_effective_half_open
        CHECK (NOT isempty(effective) AND lower_inc(effective) AND NOT upper_inc(effective)
               AND NOT lower_inf(effective)),
    CONSTRAINT price_books_model_typed CHECK (model ? 'type'),
    CONSTRAINT price_books_minimum_valid
        CHECK (minimum_per_period IS NULL OR (minimum_per_period <> 'NaN'::numeric AND minimum_per_period >= 0)),
    -- SPEC §5: two books for the same meter and customer scope never overlap in time. The loser of a
    -- concurrent creation gets exclusion_violation (23P01), which the API answers 409 PRICE_BOOK_OVERLAP.
    CONSTRAINT price_books_no_overlap EXCLUDE USING gist (meter WITH =, scope WITH =, effective WITH &&)
);

-- Every change to a price book, never updated or deleted.
CREATE TABLE price_book_audit (
    id            bigint      GENERATED ALWAYS AS IDENTITY,
    price_book_id text        NOT NULL,
    action        text        NOT NULL,
    before        jsonb,
    after         jsonb       NOT NULL,
    actor         text        NOT NULL DEFAULT 'api',
    at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT price_book_audit_pkey PRIMARY KEY (id),
    CONSTRAINT price_book_audit_action_known CHECK (action IN ('create', 'update'))
);

CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER price_book_audit_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON price_book_audit
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

-- Window charges (SPEC §5), unrounded. `quantity` is what the window added to the period-to-date
-- quantity; a period's amounts add up to the tiered price of its quantity.
CREATE TABLE charges (
    customer_id   text        NOT NULL,
    meter         text        NOT NULL,
    window_start  timestamptz NOT NULL,
    window_end    timestamptz NOT NULL,
    quantity      numeric     NOT NULL,
    amount        numeric     NOT NULL,
    currency      text        NOT NULL,
    price_book_id text        NOT NULL,
    revision      integer     NOT NULL DEFAULT 1,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT charges_pkey PRIMARY KEY (customer_id, meter, window_start),
    CONSTRAINT charges_quantity_finite CHECK (quantity <> 'NaN'::numeric),
    CONSTRAINT charges_amount_finite CHECK (amount <> 'NaN'::numeric),
    CONSTRAINT charges_window_ordered CHECK (window_end > window_start)
) WITH (fillfactor = 70);
-- Room on each page (fillfactor) lets a re-rated charge be a HOT update: no index changes.
CREATE INDEX charges_meter_window_idx ON charges (meter, window_start);
CREATE INDEX charges_window_idx ON charges (window_start);
