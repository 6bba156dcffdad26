-- A job requeued to run later (a retryable failure's backoff, 30 s or more by default) no longer
-- wakes every worker of every process as it is requeued: each of them claimed at once and found
-- nothing due, one claim per process per requeue, all through an upstream outage that requeues
-- jobs by the hundred. Such a job is claimed by the workers' poll once it is due (`--poll-ms`,
-- 1 s by default), as SQLite's workers always found it. A requeue to run now (the rescuer's, a
-- release at shutdown, a manual retry) still wakes them: "now" by the database's clock, with
-- 5 s to spare for a worker's clock that runs ahead of it.
-- CREATE OR REPLACE (Postgres 14 and later) locks `jobs` in SHARE ROW EXCLUSIVE mode, which
-- blocks writes but not reads for the moment it takes; DROP and CREATE would lock out reads too.
CREATE OR REPLACE TRIGGER jobs_notify_requeue AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.status = 'queued' AND OLD.status <> 'queued'
                       AND NEW.run_at <= (extract(epoch FROM statement_timestamp()) * 1000)::bigint
                                         + 5000)
    EXECUTE FUNCTION fusion_notify_queued();
