-- Kept in step with migrations/postgres/0006 (a function that pins the claim's plan); on SQLite
-- the claim statement pins it itself (`INDEXED BY jobs_claimable`): nothing to change here.
SELECT 1;
