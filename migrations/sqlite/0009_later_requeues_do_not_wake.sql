-- Kept in step with migrations/postgres/0009 (a requeue to run later wakes no worker). Nothing to
-- change on SQLite: its wake-ups are in-process, and `retry_later` never woke a worker.
SELECT 1;
