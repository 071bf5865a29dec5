-- A price book may name dimension values (issue 17, docs/dimensions.md): it prices only the windows
-- whose values match its selector, and of the books in force for a window the most specific wins. Two
-- books of one meter and customer scope may now overlap in time when their selectors differ, so the
-- overlap constraint is per (meter, scope, selector). The selector is compared as its jsonb text,
-- which is canonical (keys sorted, one spelling), through a generated column btree_gist can index.
ALTER TABLE price_books
    ADD COLUMN dimensions jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN selector text GENERATED ALWAYS AS (dimensions::text) STORED,
    ADD CONSTRAINT price_books_dimensions_object CHECK (jsonb_typeof(dimensions) = 'object');
ALTER TABLE price_books
    DROP CONSTRAINT price_books_no_overlap,
    ADD CONSTRAINT price_books_no_overlap
        EXCLUDE USING gist (meter WITH =, scope WITH =, selector WITH =, effective WITH &&);

-- Invoice lines are per (meter, dimension values, book): an adjustment names the line it corrects,
-- so it names the values too (`{}` for every adjustment before, whose lines had none).
ALTER TABLE invoice_adjustments ADD COLUMN dimensions jsonb NOT NULL DEFAULT '{}';
