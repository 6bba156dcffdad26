-- Jobs and their step checkpoints. Times are unix milliseconds (the workers' clock, as on SQLite).
CREATE TABLE jobs (
    id               UUID PRIMARY KEY,
    status           TEXT NOT NULL,
    spec             JSONB NOT NULL,
    metadata         JSONB NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    run_at           BIGINT NOT NULL,
    deadline_at      BIGINT,
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    idempotency_key  TEXT UNIQUE,
    request_hash     TEXT,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    failure_reason   TEXT,
    error            TEXT,
    result           JSONB
);

CREATE INDEX jobs_claimable ON jobs (priority DESC, run_at, id) WHERE status = 'queued';
CREATE INDEX jobs_running_owner ON jobs (lease_owner) WHERE status = 'running';
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_status_id ON jobs (status, id);

CREATE TABLE steps (
    job_id            UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step              TEXT NOT NULL,
    model             TEXT NOT NULL,
    ok                BOOLEAN NOT NULL,
    content           TEXT,
    data              JSONB,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost              DOUBLE PRECISION NOT NULL,
    latency_ms        BIGINT NOT NULL,
    error_code        TEXT,
    error             TEXT,
    status_code       INTEGER,
    attempt           INTEGER NOT NULL,
    created_at        BIGINT NOT NULL,
    PRIMARY KEY (job_id, step)
);

-- Wake workers in every process: any insert, and any job that becomes queued again.
CREATE FUNCTION fusion_notify_queued() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('fusion_jobs', '');
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_notify_insert AFTER INSERT ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION fusion_notify_queued();
CREATE TRIGGER jobs_notify_requeue AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.status = 'queued' AND OLD.status <> 'queued')
    EXECUTE FUNCTION fusion_notify_queued();

-- Tell every process at once when a step is written or a job finishes: a cancelled job's worker
-- stops calling upstream now, and waiters and streams wake without polling.
CREATE FUNCTION fusion_notify_step() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('fusion_events', 'step ' || NEW.job_id::text || ' ' || NEW.step);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER steps_notify AFTER INSERT ON steps
    FOR EACH ROW EXECUTE FUNCTION fusion_notify_step();

CREATE FUNCTION fusion_notify_finished() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('fusion_events', 'done ' || NEW.id::text || ' ' || NEW.status);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_notify_finished AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.status IN ('succeeded', 'failed', 'cancelled')
                       AND OLD.status NOT IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION fusion_notify_finished();
