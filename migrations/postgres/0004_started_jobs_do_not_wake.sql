-- A job submitted to a process with a free worker slot is inserted already running, and that
-- process runs it (src/worker: `Slot`): only inserted rows that are queued wake workers.
CREATE OR REPLACE FUNCTION fusion_notify_inserted() RETURNS trigger AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted WHERE status = 'queued') THEN
        PERFORM pg_notify('fusion_jobs', '');
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
