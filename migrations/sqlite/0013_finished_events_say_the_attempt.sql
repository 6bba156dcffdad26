-- Kept in step with migrations/postgres/0013 (job-finished NOTIFYs say the attempt); SQLite's
-- events are sent in-process, and its watch on other processes' cancels reads the attempt from
-- the row: nothing to change.
SELECT 1;
