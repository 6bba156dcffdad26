-- Step events no longer go through NOTIFY: a pg_notify per checkpoint cost Postgres more CPU
-- than the checkpoint itself. The process that writes a step publishes it in-process; other
-- processes see progress through their one-second fallback re-read. Job-finished NOTIFYs stay
-- (cancels and waiters in other processes need them at once).
DROP TRIGGER steps_notify ON steps;
DROP FUNCTION fusion_notify_step();
