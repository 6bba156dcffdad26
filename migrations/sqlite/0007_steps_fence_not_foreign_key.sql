-- Kept in step with migrations/postgres/0007 (which drops the steps' foreign key, costly there
-- on every checkpoint). SQLite checks the key with one primary-key lookup of its job, as cheap
-- as the fence's, and dropping it would mean rebuilding the table: nothing to change here.
SELECT 1;
