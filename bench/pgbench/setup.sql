-- The table the pgbench scripts use: connect-pg-simple's shape (as this
-- crate's), :rows live rows keyed like md5(n). psql -v rows=N -f setup.sql
DROP SCHEMA IF EXISTS bench_pgbench CASCADE;
CREATE SCHEMA bench_pgbench;
CREATE TABLE bench_pgbench.session (
  sid varchar NOT NULL PRIMARY KEY,
  sess json NOT NULL,
  expire timestamp(6) NOT NULL
);
CREATE INDEX "IDX_session_expire" ON bench_pgbench.session (expire);
INSERT INTO bench_pgbench.session
  SELECT md5(i::text), '{"count":0}', now() + interval '1 day' FROM generate_series(1, :rows) i;
VACUUM ANALYZE bench_pgbench.session;
