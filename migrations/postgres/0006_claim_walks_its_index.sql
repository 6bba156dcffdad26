-- The next `wanted` runnable queued jobs, in claim order, locked for this transaction (jobs
-- another claim holds are skipped). The claim statement takes its ids from here.
--
-- Why a function: its SET clause holds `enable_sort = off` while its query is planned, which
-- leaves the planner one sensible plan, an ordered walk of jobs_claimable that stops after
-- `wanted` rows. Planned with its limit known and no statistics on `jobs` (a new table, or one
-- that has changed since autovacuum's last ANALYZE: a batch queued in the last minute), the
-- inline query guessed a handful of queued jobs and chose to read every one of them and sort
-- them, so a claim cost as much as the backlog (with 10,000 queued, ~7 ms instead of under 1 ms).
-- Only the plan cache's switch to a generic plan, after a few executions on a connection, hid
-- it. enable_sort = off does not forbid a sort; it makes one the last resort.
CREATE FUNCTION fusion_claimable(wanted bigint, due_by bigint) RETURNS SETOF uuid
LANGUAGE sql VOLATILE
SET enable_sort = off
AS $$
    SELECT id FROM jobs
    WHERE status = 'queued' AND run_at <= due_by
    ORDER BY priority DESC, run_at, id
    LIMIT wanted
    FOR UPDATE SKIP LOCKED
$$;
