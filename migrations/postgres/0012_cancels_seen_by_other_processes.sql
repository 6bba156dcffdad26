-- Kept in step with migrations/sqlite/0012 (an index for SQLite's watch on other processes'
-- cancels); Postgres hears of them through NOTIFY: nothing to change.
SELECT 1;
