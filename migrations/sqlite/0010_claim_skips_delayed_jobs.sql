-- Kept in step with migrations/postgres/0010 (a claim visits one priority at a time). On SQLite
-- the claim statement is in the code (`CLAIM_SQL`, src/store/sqlite.rs): nothing to change here.
SELECT 1;
