// The express-session + connect-pg-simple contender of bench/run.sh.
//
//   node server.js serve [PORT]   serves GET /read, /write, /new on 127.0.0.1:PORT (default 8080)
//   node server.js seed N         creates N sessions through /new, prints their cookies one a line
//   node server.js prune [DELAY]  after DELAY ms, deletes expired rows as connect-pg-simple's pruner does, prints the times
//
// Database: BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/tower_pg_session_bench),
// table bench_express<BENCH_SCHEMA_SUFFIX>.session, pool of BENCH_POOL (default 10) connections.
'use strict';

const express = require('express');
const session = require('express-session');
const { Pool } = require('pg');
const PgStore = require('connect-pg-simple')(session);

const url = process.env.BENCH_DATABASE_URL || 'postgres://postgres@127.0.0.1:5432/tower_pg_session_bench';
const poolSize = Number(process.env.BENCH_POOL || 10);
const schema = `bench_express${process.env.BENCH_SCHEMA_SUFFIX || ''}`;
const pool = new Pool({ connectionString: url, max: poolSize });
const store = new PgStore({
  pool,
  schemaName: schema,
  tableName: 'session',
  createTableIfMissing: true,
  pruneSessionInterval: false, // pruned explicitly by `prune`
});

const app = express();
app.disable('x-powered-by');
app.disable('etag');
app.use(session({
  store,
  secret: 'tower-pg-session-bench-signing-key-0123456789',
  resave: false,
  saveUninitialized: false,
  cookie: { secure: false, httpOnly: true, sameSite: 'lax', maxAge: 24 * 3600 * 1000 },
}));
app.get('/read', (req, res) => res.json({ count: req.session.count || 0 }));
app.get('/write', (req, res) => {
  req.session.count = (req.session.count || 0) + 1;
  res.json({ count: req.session.count });
});
app.get('/new', (req, res) => {
  req.session.count = 0;
  res.json({ count: 0 });
});

function listen(port) {
  return new Promise((resolve, reject) => {
    const server = app.listen(port, '127.0.0.1', () => resolve(server));
    server.on('error', reject);
  });
}

async function seed(n) {
  const server = await listen(0);
  const base = `http://127.0.0.1:${server.address().port}/new`;
  const cookies = [];
  let next = 0;
  const worker = async () => {
    while (next < n) {
      next += 1;
      const res = await fetch(base);
      const cookie = res.headers.get('set-cookie');
      if (!res.ok || !cookie) throw new Error(`seed: ${res.status} without a cookie`);
      cookies.push(cookie.split(';')[0]);
      await res.arrayBuffer();
    }
  };
  await Promise.all(Array.from({ length: poolSize }, worker));
  process.stdout.write(cookies.join('\n') + '\n');
  server.close();
}

async function main() {
  await pool.query(`CREATE SCHEMA IF NOT EXISTS ${schema}`);
  const [mode, arg] = process.argv.slice(2);
  if (mode === 'serve') {
    const server = await listen(Number(arg || 8080));
    console.error(`express: serving on 127.0.0.1:${server.address().port}`);
    const stop = () => { server.close(); pool.end().catch(() => {}); process.exit(0); };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
    return;
  }
  if (mode === 'seed') {
    await new Promise((resolve, reject) => store.get('warm-up', (e) => (e ? reject(e) : resolve()))); // creates the table
    await seed(Number(arg));
  } else if (mode === 'prune') {
    await new Promise((resolve) => setTimeout(resolve, Number(arg || 0)));
    const start = Date.now();
    const started = process.hrtime.bigint();
    await new Promise((resolve, reject) => store.pruneSessions((e) => (e ? reject(e) : resolve())));
    const ms = Math.round(Number(process.hrtime.bigint() - started) / 1e6);
    console.log(`prune_ms=${ms} start_ms=${start} end_ms=${Date.now()} result="one DELETE"`);
  } else {
    throw new Error('usage: node server.js serve [PORT] | seed N | prune');
  }
  await pool.end();
}

main().catch((e) => { console.error(`express: ${e.stack || e}`); process.exit(1); });
