// Express app sharing sessions with tower-pg-session through connect-pg-simple's
// table. Integration tests run it next to a Rust app; see README.md in this
// folder for the env vars, the routes and the SQL connect-pg-simple runs.
//
// stdout carries exactly ONE line: {"port":N}. Everything else goes to stderr.
'use strict';

const fs = require('node:fs');
const express = require('express');
const session = require('express-session');
const { Pool } = require('pg');
const PgStore = require('connect-pg-simple')(session);

console.log = console.info = console.error; // keep stdout for the port line
const log = (...a) => console.error('[express]', ...a);

// ---------------------------------------------------------------- config
const fail = (msg) => { log(msg); process.exit(2); };
const env = process.env;

const DATABASE_URL = env.DATABASE_URL;
if (!DATABASE_URL) fail('DATABASE_URL is required (e.g. postgres://postgres@127.0.0.1:5432/test)');
const PG_SCHEMA = env.PG_SCHEMA || 'public';
const PG_TABLE = env.PG_TABLE || 'session';
const SECRETS = (env.SESSION_SECRET || '').split(',').filter((s) => s.length > 0);
if (SECRETS.length === 0) fail('SESSION_SECRET is required (comma-separated; the first signs, all verify)');
const COOKIE_NAME = env.SESSION_COOKIE_NAME || 'connect.sid';
const TTL_SECS = Number(env.SESSION_TTL_SECS || 86400);
if (!(Number.isInteger(TTL_SECS) && TTL_SECS > 0)) fail('SESSION_TTL_SECS must be a positive integer (seconds)');
const PORT = Number(env.PORT || 0);
if (!(Number.isInteger(PORT) && PORT >= 0 && PORT < 65536)) fail('PORT must be an integer 0..65535');
const LOG_SQL = env.LOG_SQL === '1' || env.LOG_SQL === 'true';

// ---------------------------------------------------------------- lifecycle
let pool;
const exit = (why, code = 0) => {
  log(`exiting: ${why}`);
  // Don't wait for the pool: in-flight queries must not keep us alive.
  if (pool) pool.end().catch(() => {});
  process.exit(code);
};
process.on('SIGTERM', () => exit('SIGTERM'));
process.on('SIGINT', () => exit('SIGINT'));
// Exit when the parent goes away: only when stdin is a pipe/socket (what a
// test harness gives us). A TTY or /dev/null stdin (`node app.js &` in a
// non-interactive shell) must not make us exit at once.
try {
  const st = fs.fstatSync(0);
  if (st.isFIFO() || st.isSocket()) {
    process.stdin.on('end', () => exit('stdin closed'));
    process.stdin.on('error', () => exit('stdin error'));
    process.stdin.resume(); // drain and ignore whatever the parent writes
  }
} catch { /* no fd 0 */ }
if (Number(env.MAX_SECONDS) > 0) {
  setTimeout(() => exit('MAX_SECONDS reached'), Number(env.MAX_SECONDS) * 1000).unref();
}

// ---------------------------------------------------------------- store
pool = new Pool({ connectionString: DATABASE_URL });
pool.on('error', (err) => log('pg pool error:', err.message));
if (LOG_SQL) {
  // Log every statement connect-pg-simple sends (it only uses pool.query).
  const query = pool.query.bind(pool);
  pool.query = (text, params, ...rest) => {
    log('SQL', JSON.stringify(typeof text === 'string' ? text : text.text), JSON.stringify(params));
    return query(text, params, ...rest);
  };
}
const store = new PgStore({
  pool,
  schemaName: PG_SCHEMA,
  tableName: PG_TABLE,
  createTableIfMissing: false,
  pruneSessionInterval: false, // the Rust side prunes
  errorLog: (...a) => log('connect-pg-simple:', ...a),
});

// ---------------------------------------------------------------- app
const app = express();
app.disable('x-powered-by');
app.set('etag', false); // no 304s: tests compare bodies
app.use(session({
  store,
  name: COOKIE_NAME,
  secret: SECRETS,
  resave: false,
  saveUninitialized: false,
  rolling: false,
  cookie: {
    maxAge: TTL_SECS * 1000,
    secure: false,
    httpOnly: true,
    sameSite: 'lax',
    path: '/',
  },
}));

// Keys a route may not set: the Cookie object and Session's own members
// (id, req, save, regenerate, ...), and prototype tricks.
const settableKey = (sess, key) => key !== 'cookie' && !(key in Object.getPrototypeOf(sess)) &&
  !['id', 'req', '__proto__', 'constructor', 'prototype'].includes(key);

// Any JSON value, whatever the Content-Type says.
const rawBody = express.text({ type: () => true, limit: '1mb' });
const parseJson = (req, res) => {
  try {
    return { value: JSON.parse(typeof req.body === 'string' ? req.body : '') };
  } catch (err) {
    res.status(400).json({ error: `body is not JSON: ${err.message}` });
    return null;
  }
};

const appData = (sess) => {
  const out = {};
  for (const k of Object.keys(sess)) if (k !== 'cookie') out[k] = sess[k];
  return out;
};

// Mutating routes save explicitly before answering: express-session's own
// end-of-request save reports a failure only after the 200 has gone out, so a
// test could not see it. touch() first, as express-session's own save does, so
// the stored cookie.expires is now + maxAge and not the one loaded. (After an
// explicit save of a session that came from the cookie, express-session still
// runs store.touch at the end: one more UPDATE of `expire`, same value.)
const saveThen = (req, next, done) => {
  req.session.touch();
  req.session.save((err) => (err ? next(err) : done()));
};

app.get('/counter', (req, res, next) => {
  req.session.count = (req.session.count || 0) + 1;
  saveThen(req, next, () => res.json({ count: req.session.count }));
});

// Reads without changing the data. NB: express-session still calls
// store.touch (UPDATE expire) at the end when the session came from a cookie.
app.get('/peek', (req, res) => {
  res.json({ count: req.session.count || 0 });
});

app.put('/kv/:key', rawBody, (req, res, next) => {
  const key = req.params.key;
  if (!settableKey(req.session, key)) return res.status(400).json({ error: `key ${key} is reserved` });
  const parsed = parseJson(req, res);
  if (!parsed) return undefined;
  req.session[key] = parsed.value;
  return saveThen(req, next, () => res.status(204).end());
});

app.get('/kv', (req, res) => res.json(appData(req.session)));

// Whole session, cookie included (Cookie#toJSON = what is stored).
app.get('/raw', (req, res) => res.json(req.session));

// The shape Passport uses: new session id, then { passport: { user } }.
app.post('/login/:user', (req, res, next) => {
  req.session.regenerate((err) => {
    if (err) return next(err);
    req.session.passport = { user: req.params.user };
    return saveThen(req, next, () => res.status(204).end());
  });
});

app.get('/whoami', (req, res) => {
  res.json({ user: req.session.passport?.user ?? null });
});

app.post('/logout', (req, res, next) => {
  req.session.destroy((err) => {
    if (err) return next(err);
    res.clearCookie(COOKIE_NAME, { path: '/' });
    return res.status(204).end();
  });
});

// Read (at request start), wait, write back the whole session: two of these
// overlapping on one session lose one of the two keys (last write wins).
app.put('/slow/:key', (req, res, next) => {
  const key = req.params.key;
  if (!settableKey(req.session, key)) return res.status(400).json({ error: `key ${key} is reserved` });
  const ms = Math.min(Math.max(Number(req.query.ms) || 0, 0), 60000);
  return setTimeout(() => {
    req.session[key] = true;
    saveThen(req, next, () => res.status(204).end());
  }, ms);
});

// Data untouched; express-session then calls store.touch (resave:false, the
// session came from the cookie and was not modified): only `expire` moves.
app.get('/touch', (req, res) => {
  res.json({ count: req.session.count || 0 });
});

app.use((req, res) => res.status(404).json({ error: `no route ${req.method} ${req.path}` }));

// eslint-disable-next-line no-unused-vars
app.use((err, req, res, next) => {
  log(`error on ${req.method} ${req.originalUrl}:`, err && err.stack ? err.stack : err);
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const status = Number.isInteger(err.status) && err.status >= 400 && err.status < 600 ? err.status : 500;
  res.status(status).json({ error: String(err && err.message ? err.message : err) });
});

const server = app.listen(PORT, '127.0.0.1', () => {
  const { port } = server.address();
  log(`listening on http://127.0.0.1:${port}, store ${PG_SCHEMA}.${PG_TABLE}, cookie ${COOKIE_NAME}, ttl ${TTL_SECS}s`);
  process.stdout.write(`${JSON.stringify({ port })}\n`);
});
server.on('error', (err) => exit(`listen error: ${err.message}`, 1));
