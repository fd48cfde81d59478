-- The database's limit for WRITE: load a live row, then write it back (two
-- statements, autocommit each, as a session store does).
\set n random(1, :rows)
SELECT sess::text, expire FROM bench_pgbench.session WHERE sid = md5(:n::text) AND expire > now();
INSERT INTO bench_pgbench.session (sid, sess, expire)
  VALUES (md5(:n::text), '{"count":1}', now() + interval '1 day')
  ON CONFLICT (sid) DO UPDATE SET sess = excluded.sess, expire = excluded.expire;
