// Local OpenID provider for tower-pg-session's integration tests and demo.
// Built on panva's oidc-provider; see README.md in this folder for env vars,
// helper endpoints and the scripted-login request sequence.
//
// stdout carries exactly ONE line: {"issuer":...,"port":...,"flavor":...}.
// Everything else goes to stderr.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import { CompactSign, importJWK } from 'jose';
import Provider from 'oidc-provider';

// oidc-provider prints its NOTICEs with console.info (= stdout); keep stdout
// reserved for the single JSON line the test harness reads.
console.log = console.info = console.error;
const log = (...a) => console.error('[idp]', ...a);

const FLAVOR = process.env.IDP_FLAVOR || 'keycloak';
if (!['keycloak', 'cognito'].includes(FLAVOR)) {
  log(`unknown IDP_FLAVOR=${FLAVOR} (use keycloak or cognito)`);
  process.exit(2);
}
const KEYCLOAK = FLAVOR === 'keycloak';
const COGNITO = !KEYCLOAK;
const PREFIX = KEYCLOAK ? '/realms/test' : '/us-east-1_TestPool';
const ACCESS_TOKEN_TTL = Number(process.env.ACCESS_TOKEN_TTL || 3600);
// IDP_CLAIMS_PARAMETER=0: no `claims` request parameter, as many providers.
const CLAIMS_PARAMETER = process.env.IDP_CLAIMS_PARAMETER !== '0';
// IDP_DPOP=required: every client's tokens must be DPoP-bound, and every
// token request must carry the provider's nonce (use_dpop_nonce first).
const DPOP_REQUIRED = process.env.IDP_DPOP === 'required';
// Pushed authorization requests (RFC 9126): off (not advertised), on
// (advertised, optional) or required (require_pushed_authorization_requests).
const PAR = process.env.IDP_PAR || 'off';
// IDP_USERINFO_SIGNED_ALG=RS256|ES256: clients whose metadata names none get
// signed (application/jwt) userinfo answers.
const USERINFO_SIGNED_ALG = process.env.IDP_USERINFO_SIGNED_ALG;
if (!['off', 'on', 'required'].includes(PAR)) {
  log(`unknown IDP_PAR=${PAR} (use off, on or required)`);
  process.exit(2);
}
const COGNITO_GROUPS = JSON.parse(process.env.IDP_COGNITO_GROUPS || '["admins","users"]');
if (!(Number.isInteger(ACCESS_TOKEN_TTL) && ACCESS_TOKEN_TTL > 0)) {
  log('ACCESS_TOKEN_TTL must be a positive integer (seconds)');
  process.exit(2);
}

// ---------------------------------------------------------------- lifecycle
const exit = (why) => { log(`exiting: ${why}`); process.exit(0); };
process.on('SIGTERM', () => exit('SIGTERM'));
process.on('SIGINT', () => exit('SIGINT'));
// Exit when the parent goes away: only when stdin is a pipe/socket (what a
// test harness gives us). A TTY or /dev/null stdin (`node server.js &` in a
// non-interactive shell) must not make us exit at once.
try {
  const st = fs.fstatSync(0);
  if (st.isFIFO() || st.isSocket()) {
    process.stdin.on('end', () => exit('stdin closed'));
    process.stdin.on('error', () => exit('stdin error'));
    process.stdin.resume(); // drain and ignore whatever the parent writes
  }
} catch { /* no fd 0 */ }
if (Number(process.env.IDP_MAX_SECONDS) > 0) {
  setTimeout(() => exit('IDP_MAX_SECONDS reached'), Number(process.env.IDP_MAX_SECONDS) * 1000).unref();
}

// ---------------------------------------------------------------- clients
const DEFAULT_CLIENTS = [{
  client_id: 'demo',
  client_secret: 'demo-secret',
  redirect_uris: ['http://127.0.0.1:3000/auth/callback'],
  post_logout_redirect_uris: ['http://127.0.0.1:3000/'],
  backchannel_logout_uri: 'http://127.0.0.1:3000/auth/backchannel-logout',
  backchannel_logout_session_required: true,
}];
const clients = (process.env.IDP_CLIENTS ? JSON.parse(process.env.IDP_CLIENTS) : DEFAULT_CLIENTS)
  .map((c) => {
    const client = {
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      ...(DPOP_REQUIRED ? { dpop_bound_access_tokens: true } : {}),
      token_endpoint_auth_method: process.env.IDP_CLIENT_AUTH || 'client_secret_basic',
      // The public keys of private_key_jwt clients, inline.
      ...(process.env.IDP_CLIENT_JWKS ? { jwks: JSON.parse(process.env.IDP_CLIENT_JWKS) } : {}),
      // How ID tokens are signed for the clients: RS256 (default), ES256,
      // or HS256 with the client secret.
      ...(process.env.IDP_ID_TOKEN_ALG ? { id_token_signed_response_alg: process.env.IDP_ID_TOKEN_ALG } : {}),
      ...(USERINFO_SIGNED_ALG ? { userinfo_signed_response_alg: USERINFO_SIGNED_ALG } : {}),
      ...c,
    };
    if (COGNITO) { // Cognito has no back-channel logout; the metadata would be rejected
      delete client.backchannel_logout_uri;
      delete client.backchannel_logout_session_required;
    }
    return client;
  });

// ---------------------------------------------------------------- signing keys
let keySeq = 0;
// Node 20 can deadlock when a key straight from generateKeyPairSync is
// exported as a JWK: a garbage collection during the export may destroy the
// generation job, which takes the lock the export holds. The key therefore
// leaves the job as PEM and is re-read into a key object of its own.
const generateJwk = (type, options) => crypto
  .createPrivateKey(crypto.generateKeyPairSync(type, {
    ...options,
    publicKeyEncoding: { type: 'spki', format: 'pem' },
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
  }).privateKey)
  .export({ format: 'jwk' });
function newKeys() {
  keySeq += 1;
  const tag = `${keySeq}-${crypto.randomBytes(4).toString('hex')}`;
  const rsa = generateJwk('rsa', { modulusLength: 2048 });
  const ec = generateJwk('ec', { namedCurve: 'P-256' });
  return [
    { ...rsa, kid: `rs256-${tag}`, alg: 'RS256', use: 'sig' },
    { ...ec, kid: `es256-${tag}`, alg: 'ES256', use: 'sig' },
  ];
}
// Newest keys first: oidc-provider signs with the first key matching the alg,
// and publishes all of them at jwks_uri.
let signingKeys = newKeys();

// ---------------------------------------------------------------- storage
// A plain Map adapter instead of the bundled memory adapter: that one is an
// LRU capped at 1000 entries, and ours must also survive re-creating the
// Provider on key rotation (storage lives at module level here).
const store = new Map(); // "Model:id" -> { payload, exp (ms) }
const grants = new Map(); // grantId -> Set of "Model:id"
const uids = new Map(); // session uid -> session id
const live = (k) => {
  const e = store.get(k);
  if (e && e.exp && e.exp <= Date.now()) { store.delete(k); return undefined; }
  return e?.payload;
};
setInterval(() => { for (const k of store.keys()) live(k); }, 60_000).unref();
class MapAdapter {
  constructor(model) { this.model = model; }
  key(id) { return `${this.model}:${id}`; }
  async upsert(id, payload, expiresIn) {
    store.set(this.key(id), { payload, exp: expiresIn ? Date.now() + expiresIn * 1000 : 0 });
    if (this.model === 'Session') uids.set(payload.uid, id);
    if (payload.grantId) {
      if (!grants.has(payload.grantId)) grants.set(payload.grantId, new Set());
      grants.get(payload.grantId).add(this.key(id));
    }
  }
  async find(id) { return live(this.key(id)); }
  async findByUid(uid) { return uids.has(uid) ? this.find(uids.get(uid)) : undefined; }
  async findByUserCode() { return undefined; }
  async consume(id) { const p = live(this.key(id)); if (p) p.consumed = Math.floor(Date.now() / 1000); }
  async destroy(id) {
    const p = live(this.key(id));
    if (p?.uid && uids.get(p.uid) === id) uids.delete(p.uid);
    store.delete(this.key(id));
  }
  async revokeByGrantId(grantId) {
    for (const k of grants.get(grantId) || []) store.delete(k);
    grants.delete(grantId);
  }
}

// ---------------------------------------------------------------- stats
const stats = { authorization_code: 0, refresh_token: 0, jwks: 0, userinfo: 0 };
const failed = { authorization_code: 0, refresh_token: 0, userinfo: 0 };
// Accounts the provider names differently from now on: tokens issued for
// their existing grants (refreshes) carry the new subject.
const renamed = new Map();
// Revocation requests, oldest first: how the client authenticated, and
// whether the provider accepted it (GET /__test/revocations).
const revocations = [];
const resetStats = () => {
  for (const o of [stats, failed]) for (const k of Object.keys(o)) o[k] = 0;
  tokenFault = null; misbehave = null; revocations.length = 0;
};

// How a request to the token or revocation endpoint authenticated the
// client, as sent: the method its credentials match, and an assertion's
// alg and kid.
function clientAuthOf(ctx) {
  const params = ctx.oidc.params || {};
  const assertion = params.client_assertion;
  let header = {};
  if (assertion) try { header = unb64json(assertion.split('.')[0]); } catch { /* malformed */ }
  const basic = /^basic /i.test(ctx.get('authorization') || '');
  let method = 'none';
  if (basic) method = 'client_secret_basic';
  else if (params.client_secret) method = 'client_secret_post';
  else if (assertion) method = /^HS/.test(header.alg || '') ? 'client_secret_jwt' : 'private_key_jwt';
  return { method, alg: header.alg, kid: header.kid };
}

// ---------------------------------------------------------------- provider
const cookieKeys = [crypto.randomBytes(32).toString('base64url')];
const ROUTES = KEYCLOAK
  ? { // Keycloak's paths under /realms/<realm>
    authorization: '/protocol/openid-connect/auth',
    token: '/protocol/openid-connect/token',
    userinfo: '/protocol/openid-connect/userinfo',
    jwks: '/protocol/openid-connect/certs',
    end_session: '/protocol/openid-connect/logout',
    revocation: '/protocol/openid-connect/revoke',
    introspection: '/protocol/openid-connect/token/introspect',
  }
  : { // Cognito's hosted-UI paths (there on the domain root; here under the pool path)
    authorization: '/oauth2/authorize',
    token: '/oauth2/token',
    userinfo: '/oauth2/userInfo',
    jwks: '/.well-known/jwks.json',
    revocation: '/oauth2/revoke',
    introspection: '/oauth2/introspect',
  };

function makeProvider(issuer) {
  const provider = new Provider(issuer, {
    adapter: MapAdapter,
    clients,
    cookies: { keys: cookieKeys },
    jwks: { keys: signingKeys },
    routes: ROUTES,
    scopes: ['openid', 'offline_access', 'profile', 'email'],
    claims: {
      openid: ['sub', ...(COGNITO ? ['cognito:username', 'cognito:groups', 'token_use'] : [])],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username'],
      sid: null, auth_time: null, acr: null, iss: null,
    },
    // Put profile/email claims into the ID token too (like Keycloak and
    // Cognito), not only into userinfo.
    conformIdTokenClaims: false,
    // HS256 (keyed with the client secret) only for clients registered so.
    enabledJWA: { idTokenSigningAlgValues: ['HS256', 'RS256', 'PS256', 'ES256'] },
    async findAccount(ctx, id) {
      const sub = renamed.get(id) || id;
      return {
        accountId: sub,
        async claims(use) {
          return {
            sub,
            email: `${sub}@example.test`,
            email_verified: true,
            name: sub.charAt(0).toUpperCase() + sub.slice(1),
            preferred_username: sub,
            ...(COGNITO ? {
              'cognito:username': sub,
              'cognito:groups': COGNITO_GROUPS,
              ...(use === 'id_token' ? { token_use: 'id' } : {}),
            } : {}),
          };
        },
      };
    },
    // No consent screen: grant whatever OIDC scopes/claims are requested.
    async loadExistingGrant(ctx) {
      const { client, session, provider: p } = ctx.oidc;
      const grantId = ctx.oidc.result?.consent?.grantId || session.grantIdFor(client.clientId);
      let grant = grantId ? await p.Grant.find(grantId) : undefined;
      if (grant && grant.accountId !== session.accountId) grant = undefined;
      grant ||= new p.Grant({ accountId: session.accountId, clientId: client.clientId });
      const scopes = [...ctx.oidc.requestParamOIDCScopes].join(' ');
      if (scopes) grant.addOIDCScope(scopes);
      const claims = [...ctx.oidc.requestParamClaims];
      if (claims.length) grant.addOIDCClaims(claims);
      await grant.save();
      return grant;
    },
    // Refresh tokens for every code grant of a client allowed to refresh,
    // with or without offline_access (both Keycloak and Cognito do that).
    // Without offline_access the refresh token dies with the IdP session.
    issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
    rotateRefreshToken: KEYCLOAK,
    pkce: { required: () => true }, // only S256 is supported by oidc-provider 9
    interactions: { url: (ctx, interaction) => `${PREFIX}/interaction/${interaction.uid}` },
    ttl: {
      AccessToken: ACCESS_TOKEN_TTL,
      IdToken: 3600,
      AuthorizationCode: 60,
      RefreshToken: 14 * 24 * 3600,
      Interaction: 3600,
      Session: 14 * 24 * 3600,
      Grant: 14 * 24 * 3600,
    },
    // Authentication levels as Keycloak names them: "1" a password, "2" a
    // second factor. The login form's `acr` field says which one happened.
    acrValues: ['1', '2'],
    features: {
      // The `claims` request parameter: an essential `acr` that the session
      // lacks makes the provider ask for a new login (step-up).
      claimsParameter: { enabled: CLAIMS_PARAMETER },
      // DPoP is accepted always; IDP_DPOP=required demands it with nonces.
      dPoP: {
        enabled: true,
        ...(DPOP_REQUIRED ? { nonceSecret: crypto.randomBytes(32), requireNonce: () => true } : {}),
      },
      // Our own login page (see `interaction` below) instead of devInteractions,
      // whose pages pull a web font from the internet.
      devInteractions: { enabled: false },
      backchannelLogout: { enabled: KEYCLOAK },
      rpInitiatedLogout: {
        enabled: KEYCLOAK,
        // Like Keycloak: with an id_token_hint the browser is signed out
        // without a question (the page auto-submits); without one it asks.
        // Either way it is a form POST to <end_session>/confirm with xsrf and
        // logout=yes (logout=yes ends the whole IdP session, not only this RP's).
        async logoutSource(ctx, form) {
          const auto = ctx.oidc.params.id_token_hint
            ? '<script>document.getElementById("op.logoutForm").requestSubmit(document.getElementById("yes"))</script>' : '';
          ctx.body = page('Sign out', `<p>Sign out of the test IdP?</p>${form}
<button id="yes" type="submit" form="op.logoutForm" name="logout" value="yes">Yes, sign me out</button>${auto}`);
        },
        async postLogoutSuccessSource(ctx) {
          ctx.body = page('Signed out', '<p>You are signed out of the test IdP.</p>');
        },
      },
      pushedAuthorizationRequests: {
        enabled: PAR !== 'off',
        requirePushedAuthorizationRequests: PAR === 'required',
      },
      revocation: { enabled: true },
      introspection: { enabled: true },
      userinfo: { enabled: true },
      // Signed userinfo for clients registered with userinfo_signed_response_alg.
      jwtUserinfo: { enabled: true },
    },
    // oidc-provider passes an undici dispatcher that kills connections to
    // special-use addresses (loopback included) as SSRF protection; drop it
    // so back-channel logout POSTs can reach RPs on 127.0.0.1.
    fetch: (url, options) => { const { dispatcher, ...rest } = options; return fetch(url, rest); },
    // Keep error pages terse and JSON-ish for tests.
    async renderError(ctx, out) {
      ctx.type = 'json';
      ctx.body = out;
    },
  });

  if (KEYCLOAK) {
    // Keycloak always puts `sid` into ID tokens; oidc-provider only does when
    // the client registered backchannel_logout_session_required.
    provider.Client.prototype.includeSid = () => true;
  }

  // Count key-set fetches and token-endpoint requests per grant type, and
  // (Cognito) strip the
  // refresh_token from refresh responses: Cognito never returns one there.
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.oidc?.route === 'jwks') stats.jwks += 1;
    if (ctx.oidc?.route === 'revocation') {
      revocations.push({
        ...clientAuthOf(ctx),
        registered: ctx.oidc.client?.clientAuthMethod,
        status: ctx.status,
        token_type_hint: ctx.oidc.params?.token_type_hint,
      });
    }
    if (ctx.oidc?.route === 'userinfo') {
      // With IDP_DPOP=required, a DPoP-bound token is refused here unless
      // a proof of its key (with the nonce) comes along.
      stats.userinfo += 1;
      if (ctx.status !== 200) failed.userinfo += 1;
      return;
    }
    if (ctx.oidc?.route !== 'token') return;
    const gt = ctx.oidc.params?.grant_type || 'unknown';
    stats[gt] = (stats[gt] || 0) + 1;
    if (ctx.status !== 200) failed[gt] = (failed[gt] || 0) + 1;
    if (COGNITO && gt === 'refresh_token' && ctx.status === 200 && ctx.body) delete ctx.body.refresh_token;
  });

  provider.on('server_error', (ctx, err) => log('server_error', err));
  provider.on('backchannel.success', (ctx, client, accountId, sid) => log(`backchannel logout delivered to ${client.clientId} (sub=${accountId} sid=${sid})`));
  provider.on('backchannel.error', (ctx, err, client) => log(`backchannel logout to ${client.clientId} failed: ${err.message}`));
  provider.on('grant.error', (ctx, err) => log(`token error: ${err.error} ${err.error_description || ''}`));
  provider.on('authorization.error', (ctx, err) => log(`authorization error: ${err.error} ${err.error_description || ''}`));
  return provider;
}

// ---------------------------------------------------------------- http
let provider;
let callback;
const json = (res, status, body, headers = {}) => {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store', ...headers });
  res.end(JSON.stringify(body));
};
const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const page = (title, body) => `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${esc(title)}</title></head>
<body style="font-family:sans-serif;max-width:22em;margin:3em auto"><h1>${esc(title)}</h1>${body}</body></html>`;
const readBody = (req) => new Promise((resolve, reject) => {
  let body = '';
  req.setEncoding('utf8');
  req.on('data', (d) => { body += d; if (body.length > 65536) { reject(new Error('body too large')); req.destroy(); } });
  req.on('end', () => resolve(body));
  req.on('error', reject);
});

// Login "UI" at <issuer>/interaction/<uid>:
//   GET  -> HTML form; POST (form fields: login, password[, prompt=login][, acr=1|2]) ->
//   303 back to the authorization endpoint's resume URL.
// Any non-empty login is accepted as the sub, the password is ignored.
// A consent prompt (only if loadExistingGrant did not cover everything) is
// granted at once without showing anything.
async function interaction(req, res, uid, abort) {
  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (err) { // no/expired _interaction cookie
    return json(res, 400, { error: 'invalid_request', error_description: err.error_description || err.message });
  }
  if (details.uid !== uid) return json(res, 400, { error: 'invalid_request', error_description: 'interaction uid mismatch' });
  const { prompt, params, session } = details;
  if (abort) {
    return provider.interactionFinished(req, res, { error: 'access_denied', error_description: 'End-User aborted interaction' }, { mergeWithLastSubmission: false });
  }
  if (prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const d = prompt.details;
    if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
    if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
    for (const [ind, sc] of Object.entries(d.missingResourceScopes || {})) grant.addResourceScope(ind, sc.join(' '));
    return provider.interactionFinished(req, res, { consent: { grantId: await grant.save() } }, { mergeWithLastSubmission: true });
  }
  let error = '';
  if (req.method === 'POST') {
    const form = new URLSearchParams(await readBody(req));
    const login = form.get('login')?.trim();
    const acr = form.get('acr') || undefined;
    if (login) {
      log(`login as ${login} for client ${params.client_id}${acr ? ` at acr ${acr}` : ''}`);
      return provider.interactionFinished(req, res, { login: { accountId: login, acr } }, { mergeWithLastSubmission: false });
    }
    error = '<p style="color:#b00">login must not be empty</p>';
  }
  res.writeHead(error ? 400 : 200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(page('Sign-in', `${error}<p>Test IdP (${FLAVOR}) for <b>${esc(params.client_id)}</b>: any login works.</p>
<form method="post" action="${PREFIX}/interaction/${esc(uid)}" autocomplete="off">
<input type="hidden" name="prompt" value="login">
<p><input required name="login" placeholder="login" value="${esc(params.login_hint)}" autofocus></p>
<p><input required type="password" name="password" placeholder="password (ignored)"></p>
<p><button type="submit">Sign in</button> <a href="${PREFIX}/interaction/${esc(uid)}/abort">Cancel</a></p>
</form>`));
}

// Cognito's GET /logout?client_id=…&logout_uri=… : ends the IdP session and
// redirects to logout_uri, which must be one of the client's
// post_logout_redirect_uris.
async function cognitoLogout(req, res, url) {
  const clientId = url.searchParams.get('client_id');
  const logoutUri = url.searchParams.get('logout_uri');
  // With rpInitiatedLogout disabled oidc-provider drops post_logout_redirect_uris
  // from the client model, so check against our own copy of the metadata.
  const client = clients.find((c) => c.client_id === clientId);
  if (!client) return json(res, 400, { error: 'invalid_request', error_description: 'unknown client_id' });
  if (!logoutUri || !(client.post_logout_redirect_uris || []).includes(logoutUri)) {
    return json(res, 400, { error: 'invalid_request', error_description: 'logout_uri not registered for this client' });
  }
  const ctx = provider.createContext(req, res); // provider cookies (signed with its keys)
  const session = await provider.Session.get(ctx);
  if (session.accountId) {
    // Like RP-initiated logout: revoke the grants (so refresh tokens issued in
    // this session stop working), then drop the session.
    for (const { grantId } of Object.values(session.authorizations || {})) {
      if (!grantId) continue;
      await Promise.all([provider.AccessToken, provider.RefreshToken, provider.AuthorizationCode]
        .map((m) => m.revokeByGrantId(grantId)));
      await provider.Grant.adapter.destroy(grantId);
    }
    log(`cognito /logout: session of ${session.accountId} ended`);
  }
  if (!session.new) await session.destroy();
  ctx.cookies.set(provider.cookieName('session'), null);
  res.writeHead(302, { location: logoutUri, 'cache-control': 'no-store' });
  res.end();
}

// POST /__test/sign {"claims":{...}, "header":{...}?, "alg":"RS256"|"ES256"?}
//   -> 200 {"jwt":"<compact JWS>"}, signed with the provider's current key of
//   that alg (the one it signs ID tokens with; its public half is in the JWKS).
// The payload is exactly `claims` (no iat/exp/iss added). Protected header:
// {alg, kid: <current kid>, typ: "JWT", ...header}; a header field set to null
// is left out (e.g. {"kid":null} for a token without kid). alg comes from
// body.alg, else header.alg, else RS256; if both are given they must agree.
// Anything invalid -> 400 {"error":"invalid_request","error_description":...}.
const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
async function testSign(req, res) {
  const bad = (d) => json(res, 400, { error: 'invalid_request', error_description: d });
  let body;
  try {
    body = JSON.parse(await readBody(req));
  } catch (err) {
    return bad(`body must be a JSON object: ${err.message}`);
  }
  if (!isObject(body)) return bad('body must be a JSON object');
  const unknown = Object.keys(body).filter((k) => !['claims', 'header', 'alg'].includes(k));
  if (unknown.length) return bad(`unknown field(s): ${unknown.join(', ')}`);
  const { claims, header = {} } = body;
  if (!isObject(claims)) return bad('"claims" must be a JSON object');
  if (!isObject(header)) return bad('"header" must be a JSON object');
  const alg = body.alg ?? header.alg ?? 'RS256';
  if (!['RS256', 'ES256'].includes(alg)) return bad('"alg" must be "RS256" or "ES256"');
  if (header.alg != null && header.alg !== alg) return bad(`header.alg ${JSON.stringify(header.alg)} does not match alg ${alg}`);
  if (header.alg === null) return bad('header.alg must not be null');
  const jwk = signingKeys.find((k) => k.alg === alg); // newest first = the one oidc-provider signs with
  const protectedHeader = { alg, kid: jwk.kid, typ: 'JWT', ...header };
  for (const [k, v] of Object.entries(protectedHeader)) if (v === null) delete protectedHeader[k];
  let jwt;
  try {
    jwt = await new CompactSign(new TextEncoder().encode(JSON.stringify(claims)))
      .setProtectedHeader(protectedHeader)
      .sign(await importJWK(jwk, alg));
  } catch (err) { // e.g. an unsupported "crit" or "b64" in header
    return bad(`cannot sign: ${err.message}`);
  }
  return json(res, 200, { jwt });
}

// POST /__test/delay {"ms": N, "read_first": bool}: every later request
// other than /__test/* is handled N ms late (a slow provider); with
// read_first a form body is read before the wait, so the request is carried
// out even when its client has gone. 0 turns it off.
let delayMs = 0;
let readFirst = false;
// POST /__test/token-fault {"mode", "count"?, "size"?}: the next `count`
// (default 1) token-endpoint requests get, instead of the provider's answer:
//   "unavailable" -> 503 with an HTML body (a provider that is down),
//   "malformed"   -> 200 with a body that is not JSON,
//   "oversized"   -> 200 with a well-formed response whose access_token is
//                    `size` bytes long,
//   "slow"        -> the provider's own answer, `size` milliseconds late.
// Each is counted in stats.faults; the request never reaches the provider.
const TOKEN_FAULTS = ['unavailable', 'malformed', 'oversized', 'slow'];
let tokenFault = null;
async function injectTokenFault(req, res) {
  await readBody(req).catch(() => '');
  tokenFault.count -= 1;
  stats.faults = (stats.faults || 0) + 1;
  const { mode, size } = tokenFault;
  if (mode === 'unavailable') {
    res.writeHead(503, { 'content-type': 'text/html' });
    return res.end('<html><body>upstream unavailable</body></html>');
  }
  if (mode === 'malformed') {
    res.writeHead(200, { 'content-type': 'application/json' });
    return res.end('{"access_token": "abc", "token_type": "Bearer", ');
  }
  return json(res, 200, { access_token: 'a'.repeat(size), token_type: 'Bearer', expires_in: 3600 });
}

// POST /__test/misbehave {"mode", "count"?}: the next `count` (default 1)
// successful token responses are altered the way a faulty or hostile
// provider would alter them; the rest of the provider is unchanged. The
// request itself is carried out by the provider as usual. Modes:
//   ID token claims: "invalid-iss", "missing-sub", "invalid-aud",
//     "missing-aud", "missing-iat", "nonce-invalid" (re-signed with the
//     provider's own key, so only the named claim is wrong);
//   ID token signature: "kid-absent" (re-signed without kid), "invalid-sig"
//     (one signature byte changed), "sig-none" (alg "none", no signature);
//   ID token without the profile and email claims: "no-profile-claims";
//   token response: "no-expires-in", "token-type-case" ("bEaReR");
//   userinfo (the next `count` userinfo answers, not token responses):
//     "userinfo-invalid-sub" (another `sub`); of a signed answer,
//     "userinfo-invalid-sig", "userinfo-invalid-iss", "userinfo-invalid-aud",
//     "userinfo-sig-none" (as the ID token modes of the same name), and
//     "userinfo-jwe" (an encrypted-looking five-part answer instead);
//   discovery (the next `count` discovery documents): "discovery-issuer-mismatch"
//     (an `issuer` other than the one it is served under);
//   keys: "rotate-before-signing" (the keys rotate as the token request
//     arrives, so its ID token is signed with a key not yet published when
//     the request was sent).
const USERINFO_MISBEHAVIOURS = ['userinfo-invalid-sub', 'userinfo-invalid-sig', 'userinfo-invalid-iss',
  'userinfo-invalid-aud', 'userinfo-sig-none', 'userinfo-jwe'];
const MISBEHAVIOURS = ['invalid-iss', 'missing-sub', 'invalid-aud', 'missing-aud', 'missing-iat',
  'nonce-invalid', 'kid-absent', 'invalid-sig', 'sig-none', 'no-profile-claims', 'no-expires-in',
  'token-type-case', 'discovery-issuer-mismatch', 'rotate-before-signing', ...USERINFO_MISBEHAVIOURS];
const DISCOVERY_MISBEHAVIOURS = ['discovery-issuer-mismatch'];
let misbehave = null;
const b64json = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
const unb64json = (s) => JSON.parse(Buffer.from(s, 'base64url').toString());
async function alterIdToken(jwt, mode) {
  const [h, p, sig] = jwt.split('.');
  const header = unb64json(h);
  const claims = unb64json(p);
  if (mode === 'invalid-sig') {
    const bytes = Buffer.from(sig, 'base64url');
    bytes[10] ^= 0x01;
    return `${h}.${p}.${bytes.toString('base64url')}`;
  }
  if (mode === 'sig-none') return `${b64json({ alg: 'none', typ: 'JWT' })}.${p}.`;
  if (mode === 'invalid-iss') claims.iss = 'https://attacker.invalid/';
  if (mode === 'missing-sub') delete claims.sub;
  if (mode === 'invalid-aud') claims.aud = 'some-other-client';
  if (mode === 'missing-aud') delete claims.aud;
  if (mode === 'missing-iat') delete claims.iat;
  if (mode === 'nonce-invalid') claims.nonce = 'not-the-nonce-sent';
  if (mode === 'no-profile-claims') for (const c of ['name', 'preferred_username', 'email', 'email_verified']) delete claims[c];
  const jwk = signingKeys.find((k) => k.kid === header.kid);
  if (mode === 'kid-absent') delete header.kid;
  return new CompactSign(new TextEncoder().encode(JSON.stringify(claims)))
    .setProtectedHeader(header)
    .sign(await importJWK(jwk, header.alg));
}
function spendMisbehaviour() {
  misbehave.count -= 1;
  stats.misbehaved = (stats.misbehaved || 0) + 1;
  return misbehave.mode;
}
// A signed userinfo answer, altered as the ID token modes alter ID tokens.
async function misbehaveJwt(res, jwt) {
  const mode = spendMisbehaviour();
  const altered = mode === 'userinfo-jwe'
    ? `${b64json({ alg: 'RSA-OAEP', enc: 'A128GCM' })}.${'a'.repeat(43)}.${'b'.repeat(16)}.${'c'.repeat(22)}.${'d'.repeat(22)}`
    : await alterIdToken(jwt, mode.replace(/^userinfo-/, ''));
  log(`userinfo answer altered: ${mode}`);
  res.writeHead(200, { 'content-type': 'application/jwt; charset=utf-8', 'cache-control': 'no-store' });
  return res.end(altered);
}
async function misbehaveResponse(req, res) {
  // Let the provider answer the request itself, then alter its answer.
  const body = await readBody(req);
  if (misbehave.mode === 'rotate-before-signing') rotateKeys();
  const headers = { 'x-test-passthrough': '1' };
  for (const h of ['content-type', 'authorization', 'dpop']) if (req.headers[h]) headers[h] = req.headers[h];
  const r = await fetch(`http://127.0.0.1:${server.address().port}${req.url}`, { method: req.method, headers, body: req.method === 'GET' ? undefined : body });
  if (/application\/jwt/.test(r.headers.get('content-type') || '')) return misbehaveJwt(res, await r.text());
  const out = await r.json();
  if (r.status !== 200) {
    const kept = ['dpop-nonce', 'www-authenticate'].filter((h) => r.headers.has(h));
    return json(res, r.status, out, Object.fromEntries(kept.map((h) => [h, r.headers.get(h)])));
  }
  const mode = spendMisbehaviour();
  if (mode === 'userinfo-invalid-sub') out.sub = `${out.sub}-someone-else`;
  else if (mode === 'discovery-issuer-mismatch') out.issuer = `${out.issuer}-other`;
  else if (mode === 'rotate-before-signing') { /* the keys changed before the request ran */ }
  else if (mode === 'no-expires-in') delete out.expires_in;
  else if (mode === 'token-type-case') out.token_type = 'bEaReR';
  else if (out.id_token) out.id_token = await alterIdToken(out.id_token, mode);
  log(`token response altered: ${mode}`);
  return json(res, 200, out);
}

// Re-creates the Provider with [new keys, ...old keys]; state lives in the
// module-level store and the cookie keys are reused, so sessions, codes and
// tokens survive. Returns the new keys.
function rotateKeys() {
  const fresh = newKeys();
  signingKeys = [...fresh, ...signingKeys];
  provider = makeProvider(provider.issuer);
  callback = provider.callback();
  log(`rotated keys, now signing with ${fresh.map((k) => k.kid).join(', ')}`);
  return fresh;
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  const p = url.pathname;
  if (p === '/__test/delay' && req.method === 'POST') {
    const body = JSON.parse(await readBody(req));
    delayMs = Number(body.ms) || 0;
    readFirst = body.read_first === true;
    return json(res, 200, { ms: delayMs });
  }
  if (delayMs > 0 && !p.startsWith('/__test/')) {
    // With read_first, a form is read in full before the wait, so the
    // provider acts on it even if the client has gone by the answer.
    const form = readFirst && req.method === 'POST' && /urlencoded/.test(req.headers['content-type'] || '');
    if (form) req.body = Object.fromEntries(new URLSearchParams(await readBody(req)));
    await new Promise((r) => setTimeout(r, delayMs));
  }
  if (misbehave?.count > 0 && !req.headers['x-test-passthrough']) {
    const userinfo = USERINFO_MISBEHAVIOURS.includes(misbehave.mode);
    const discovery = DISCOVERY_MISBEHAVIOURS.includes(misbehave.mode);
    if (userinfo && p === `${PREFIX}${ROUTES.userinfo}`) return misbehaveResponse(req, res);
    if (discovery && p === `${PREFIX}/.well-known/openid-configuration`) return misbehaveResponse(req, res);
    const token = !userinfo && !discovery && p === `${PREFIX}${ROUTES.token}`;
    if (token && req.method === 'POST') return misbehaveResponse(req, res);
  }
  if (p === `${PREFIX}${ROUTES.token}` && req.method === 'POST' && tokenFault?.count > 0) {
    if (tokenFault.mode !== 'slow') return injectTokenFault(req, res);
    tokenFault.count -= 1;
    stats.faults = (stats.faults || 0) + 1;
    await new Promise((r) => { setTimeout(r, tokenFault.size); });
  }
  const m = p.startsWith(PREFIX) && /^\/interaction\/([\w-]+)(\/abort)?$/.exec(p.slice(PREFIX.length));
  if (m && (req.method === 'GET' || (req.method === 'POST' && !m[2]))) return interaction(req, res, m[1], !!m[2]);
  if (p === PREFIX || p.startsWith(`${PREFIX}/`)) {
    // Mount under the issuer path. oidc-provider derives its mount path from
    // req.originalUrl minus req.url, so keep both consistent.
    req.originalUrl = req.url;
    const rest = req.url.slice(PREFIX.length);
    req.url = rest.startsWith('/') ? rest : `/${rest}`;
    return callback(req, res);
  }
  if (p === '/__test/token-fault' && req.method === 'POST') {
    const { mode, count = 1, size = 0 } = JSON.parse(await readBody(req));
    if (!TOKEN_FAULTS.includes(mode)) return json(res, 400, { error: 'invalid_request', error_description: `mode must be one of ${TOKEN_FAULTS.join(', ')}` });
    tokenFault = { mode, count, size };
    return json(res, 200, tokenFault);
  }
  if (p === '/__test/misbehave' && req.method === 'POST') {
    const { mode, count = 1 } = JSON.parse(await readBody(req));
    if (!MISBEHAVIOURS.includes(mode)) return json(res, 400, { error: 'invalid_request', error_description: `mode must be one of ${MISBEHAVIOURS.join(', ')}` });
    misbehave = { mode, count };
    return json(res, 200, misbehave);
  }
  if (p === '/__test/stats' && req.method === 'GET') return json(res, 200, { ...stats, failed });
  if (p === '/__test/stats/reset' && req.method === 'POST') { resetStats(); return json(res, 200, stats); }
  if (p === '/__test/revocations' && req.method === 'GET') return json(res, 200, revocations);
  if (p === '/__test/rotate-keys' && req.method === 'POST') {
    const fresh = rotateKeys();
    return json(res, 200, {
      kid: fresh[0].kid,
      kids: Object.fromEntries(fresh.map((k) => [k.alg, k.kid])),
      jwks_keys: signingKeys.length,
    });
  }
  if (p === '/__test/rename-account' && req.method === 'POST') {
    const { account, sub } = JSON.parse(await readBody(req));
    renamed.set(account, sub);
    return json(res, 200, { account, sub });
  }
  if (p === '/__test/sign' && req.method === 'POST') return testSign(req, res);
  if (p === '/logout' && COGNITO && req.method === 'GET') return cognitoLogout(req, res, url);
  return json(res, 404, { error: 'not_found', path: p });
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    log('handler error', err);
    if (!res.headersSent) json(res, 500, { error: 'server_error' });
    else res.end();
  });
});
server.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}${PREFIX}`;
  provider = makeProvider(issuer);
  callback = provider.callback();
  log(`${FLAVOR} provider listening, issuer ${issuer}, clients: ${clients.map((c) => c.client_id).join(', ')}`);
  process.stdout.write(`${JSON.stringify({ issuer, port, flavor: FLAVOR })}\n`);
});
server.on('error', (err) => { log('listen error', err.message); process.exit(1); });
