-- A partial index for SQLite's watch on other processes' cancels (src/store/sqlite.rs,
-- watch_other_processes): the jobs cancelled since a time, read each second another process
-- commits, without visiting every job ever cancelled.
CREATE INDEX jobs_cancelled_at ON jobs (finished_at) WHERE status = 'cancelled';
