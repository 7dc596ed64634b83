-- Find the customers merged into one, so the relay can route a person's events to journeys that
-- began before the merge.
-- NOTE: built without CONCURRENTLY, since each migration runs in a transaction; on a large
-- customers table, writes to it wait while the index is built.
CREATE INDEX customers_merged_into_idx ON customers (merged_into) WHERE merged_into IS NOT NULL;
