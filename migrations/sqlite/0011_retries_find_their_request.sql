-- Kept in step with migrations/postgres/0011: an OpenAI SDK's automatic retry of a chat
-- completion finds the job the first call made by the request's hash.
CREATE INDEX jobs_request_hash ON jobs (request_hash, created_at) WHERE request_hash IS NOT NULL;
