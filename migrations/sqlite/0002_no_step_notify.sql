-- Kept in step with migrations/postgres/0002 (which drops a Postgres-only trigger); nothing to
-- change on SQLite.
SELECT 1;
