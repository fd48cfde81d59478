-- The database's limit for READ: the same primary-key select of a live row.
-- Run by bench/run.sh: pgbench -n -M prepared -c POOL -D rows=N -f select.sql
\set n random(1, :rows)
SELECT sess::text, expire FROM bench_pgbench.session WHERE sid = md5(:n::text) AND expire > now();
