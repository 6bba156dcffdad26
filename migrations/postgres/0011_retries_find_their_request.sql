-- An OpenAI SDK retries a call whose answer it gave up waiting for (its timeout, a proxy's idle
-- cut) with the same body and no idempotency key: the retry finds the job the first call made
-- by the request's hash, recorded for every chat completion, instead of starting another.
-- Partial: jobs submitted through /v1/jobs without a key have no hash and no entry. Built
-- under the migration's lock on `jobs` (writes wait while it scans the table once).
CREATE INDEX jobs_request_hash ON jobs (request_hash, created_at) WHERE request_hash IS NOT NULL;
