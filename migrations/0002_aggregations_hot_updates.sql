-- Aggregate rows are updated in place many times (every epoch that touches them). Leave room on each
-- page so those updates can be HOT (no index maintenance), and drop the index on window_start alone:
-- queries by time go through the primary key or (meter, window_start).
ALTER TABLE aggregations SET (fillfactor = 70);
DROP INDEX aggregations_window_idx;
