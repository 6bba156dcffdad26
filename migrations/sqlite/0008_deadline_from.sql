-- Kept in step with migrations/postgres/0008: when the job's current deadline window began
-- (NULL: at its creation; else its last manual retry), so that every retry gives the job its
-- whole deadline again, not the span from its creation to the deadline the last retry set.
ALTER TABLE jobs ADD COLUMN deadline_from INTEGER;
