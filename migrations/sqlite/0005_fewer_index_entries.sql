-- A process's running jobs (its heartbeat) are few: jobs_running_lease, which holds every
-- running job, finds them as well, and claims and outcomes no longer update a second index of
-- running jobs.
DROP INDEX jobs_running_owner;
