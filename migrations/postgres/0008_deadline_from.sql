-- When the job's current deadline window began: NULL for its creation, else its last manual
-- retry, which gives the job its whole deadline again counted from then. Without it a retry
-- measured the window from `created_at` to a deadline an earlier retry had already moved, and
-- each retry after the first gave the job a longer deadline than it asked for. (A job retried
-- twice or more before this migration keeps the longer deadline it got.) Nullable with no
-- default: adding it rewrites nothing.
ALTER TABLE jobs ADD COLUMN deadline_from BIGINT;
