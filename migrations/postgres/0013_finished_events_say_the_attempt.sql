-- A job-finished NOTIFY now says which attempt finished: `done ID STATUS ATTEMPT`. A cancel heard
-- late, after the cancelled job was retried and claimed again (a LISTEN connection that lagged),
-- used to stop the retried attempt too, which then sat until its lease ran out. A process still
-- on an older version cannot read the new payload and lets it pass: it stops a job cancelled
-- elsewhere at its next heartbeat (a third of a lease), and its waiters see the end at their
-- one-second re-read. (From this version on, a payload not understood makes every lease and
-- waiter re-check at once.)
-- Replacing the function takes no lock on `jobs`.
CREATE OR REPLACE FUNCTION fusion_notify_finished() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('fusion_events',
                      'done ' || NEW.id::text || ' ' || NEW.status || ' ' || NEW.attempt::text);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
