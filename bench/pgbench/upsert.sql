-- The database's limit for NEW: one upsert of a fresh random id (an insert).
INSERT INTO bench_pgbench.session (sid, sess, expire)
  VALUES (md5(random()::text), '{"count":0}', now() + interval '1 day')
  ON CONFLICT (sid) DO UPDATE SET sess = excluded.sess, expire = excluded.expire;
