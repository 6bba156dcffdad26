-- Enqueues are written in batches, one multi-row INSERT per batch inside a statement that also
-- writes checkpoints and outcomes (see src/store/pg_writes.rs). A statement-level trigger fires
-- even when the statement inserted no job, so the wake-up NOTIFY now looks at the inserted rows:
-- one NOTIFY per statement that queued anything, none for a batch of checkpoints.
CREATE FUNCTION fusion_notify_inserted() RETURNS trigger AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        PERFORM pg_notify('fusion_jobs', '');
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

DROP TRIGGER jobs_notify_insert ON jobs;
CREATE TRIGGER jobs_notify_insert AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION fusion_notify_inserted();
