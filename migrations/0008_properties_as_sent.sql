-- Properties are stored as the canonical text the decoder produced (type json keeps the text as it is),
-- no longer as jsonb, which re-spells it: jsonb adds spaces, reorders keys and rewrites numbers (1e2 as
-- 100, 1e29 as 30 digits). A void and a re-rating job rebuild an event from this column, so they must
-- read back exactly the bytes the dataflow metered (issue 13, "one canonical event"; review findings 2
-- and 14). Rows stored before keep jsonb's spelling.
ALTER TABLE telemetry_events
    ALTER COLUMN properties DROP DEFAULT,
    ALTER COLUMN properties TYPE json USING properties::json,
    ALTER COLUMN properties SET DEFAULT '{}'::json;
