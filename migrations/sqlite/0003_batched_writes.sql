-- Kept in step with migrations/postgres/0003 (which changes a Postgres-only trigger); nothing to
-- change on SQLite.
SELECT 1;
