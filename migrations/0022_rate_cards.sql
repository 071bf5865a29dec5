-- Rate cards (issue 17, docs/dimensions.md): one price book listing several {dimensions, model} entries,
-- so a 20-model price list is one book. Each entry behaves as a book of its own for matching and
-- specificity; all share the book's id, scope, currency, range and minimum.
--
-- The overlap rule is per (meter, scope, selector), and a card holds several selectors, which one
-- exclusion constraint on price_books cannot see. The constraint moves to price_book_selectors: one row
-- per selector a book holds (a plain book's `dimensions`, or each entry's), kept by a trigger on
-- price_books, so every writer (the API, a configuration file, an operator's psql) is held to it. An
-- entry of a card and a plain book with the same selector cannot overlap either.
--
--   price_books ──AFTER INSERT/UPDATE (trigger)──► price_book_selectors
--                                                    EXCLUDE (meter =, scope =, selector =, effective &&)
--                                                    (23P01 price_books_no_overlap ─► 409 PRICE_BOOK_OVERLAP)

-- A card's entries: [{"dimensions": {...}, "model": {...}}, ...]; NULL for a plain book. A card's own
-- `dimensions` is {} and its `model` is its first entry's (meterflow_model::PriceBook::entries).
ALTER TABLE price_books
    ADD COLUMN entries jsonb,
    ADD CONSTRAINT price_books_entries_listed
        CHECK (entries IS NULL OR (jsonb_typeof(entries) = 'array' AND jsonb_array_length(entries) > 0)),
    ADD CONSTRAINT price_books_card_has_no_selector CHECK (entries IS NULL OR dimensions = '{}');

ALTER TABLE price_books DROP CONSTRAINT price_books_no_overlap;

CREATE TABLE price_book_selectors (
    price_book_id text      NOT NULL REFERENCES price_books ON DELETE CASCADE,
    meter         text      NOT NULL,
    scope         text      NOT NULL,
    -- The selector's canonical jsonb text (keys sorted, one spelling).
    selector      text      NOT NULL,
    effective     tstzrange NOT NULL,
    CONSTRAINT price_book_selectors_pkey PRIMARY KEY (price_book_id, selector),
    -- SPEC §5 and issue 17: two books (or entries) for one meter, customer scope and selector never
    -- overlap in time. Same name as before, so the API's check of SQLSTATE 23P01 stays as it was.
    CONSTRAINT price_books_no_overlap
        EXCLUDE USING gist (meter WITH =, scope WITH =, selector WITH =, effective WITH &&)
);

INSERT INTO price_book_selectors (price_book_id, meter, scope, selector, effective)
SELECT price_book_id, meter, scope, dimensions::text, effective FROM price_books;

-- Rewrites a book's selectors from its row. They are inserted in selector order, so two transactions
-- writing cards with shared selectors wait for each other in one order and cannot deadlock. Two
-- entries of one card with one selector break the primary key (23505).
CREATE FUNCTION price_book_selectors_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        DELETE FROM price_book_selectors WHERE price_book_id = OLD.price_book_id;
    END IF;
    INSERT INTO price_book_selectors (price_book_id, meter, scope, selector, effective)
    SELECT NEW.price_book_id, NEW.meter, NEW.scope, s.selector, NEW.effective
    FROM (
        SELECT (e -> 'dimensions')::text AS selector FROM jsonb_array_elements(NEW.entries) AS e
        UNION ALL
        SELECT NEW.dimensions::text WHERE NEW.entries IS NULL
    ) AS s
    ORDER BY s.selector;
    RETURN NULL;
END
$$;

CREATE TRIGGER price_book_selectors_sync
    AFTER INSERT OR UPDATE OF price_book_id, meter, customer_id, effective, dimensions, entries
    ON price_books
    FOR EACH ROW EXECUTE FUNCTION price_book_selectors_sync();
