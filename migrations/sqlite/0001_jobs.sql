-- Jobs and their step checkpoints. Times are unix milliseconds; JSON is stored as TEXT.
CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    status           TEXT NOT NULL,
    spec             TEXT NOT NULL,
    metadata         TEXT NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    run_at           INTEGER NOT NULL,
    deadline_at      INTEGER,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    idempotency_key  TEXT UNIQUE,
    request_hash     TEXT,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    failure_reason   TEXT,
    error            TEXT,
    result           TEXT
);

-- The claim query walks this partial index in order.
CREATE INDEX jobs_claimable ON jobs (priority DESC, run_at, id) WHERE status = 'queued';
-- Heartbeats and the rescuer look up running jobs by owner and by lease expiry.
CREATE INDEX jobs_running_owner ON jobs (lease_owner) WHERE status = 'running';
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_status_id ON jobs (status, id);

CREATE TABLE steps (
    job_id            TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step              TEXT NOT NULL,
    model             TEXT NOT NULL,
    ok                INTEGER NOT NULL,
    content           TEXT,
    data              TEXT,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost              REAL NOT NULL,
    latency_ms        INTEGER NOT NULL,
    error_code        TEXT,
    error             TEXT,
    status_code       INTEGER,
    attempt           INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    PRIMARY KEY (job_id, step)
);
