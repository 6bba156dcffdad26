-- Every status change of a job (claim, heartbeat, outcome) is a non-HOT update: it adds an entry
-- to each of the table's indexes. Two of them earned little for that price.
--
-- Idempotency keys are optional: index only the jobs that have one. The UNIQUE constraint gave
-- every job an entry (NULLs included) at its insert and at each update.
ALTER TABLE jobs DROP CONSTRAINT jobs_idempotency_key_key;
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- A process's running jobs (its heartbeat) are few: jobs_running_lease, which holds every
-- running job, finds them as well.
DROP INDEX jobs_running_owner;
