#!/usr/bin/env bash
# End-to-end check of the local IdP with nothing but curl (+ node for JSON):
#   bash tests/idp/smoke.sh [keycloak|cognito]   (default: both)
# Starts server.js on an ephemeral port, performs discovery, a PKCE login,
# the code exchange, refreshes, logout (and back-channel logout for keycloak),
# and the /__test helpers. Bounded: every curl has a timeout, the IdP and the
# back-channel listener are killed on exit and have a hard lifetime.
set -euo pipefail
cd "$(dirname "$0")"
[ -d node_modules ] || npm ci --no-audit --no-fund >&2

WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

PASS=0 FAIL=0
ok() { echo "ok   - $*"; PASS=$((PASS + 1)); }
bad() { echo "FAIL - $*"; FAIL=$((FAIL + 1)); }
not_running() { ! kill -0 "$1" 2>/dev/null; }
contains() { [[ "$1" == *"$2"* ]]; }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
C() { curl -sS --max-time 10 "$@"; }
# jget FILE EXPR  -> evaluates EXPR with `j` bound to the parsed JSON file
jget() { node -e 'const j=JSON.parse(require("fs").readFileSync(process.argv[1],"utf8")); const v=eval(process.argv[2]); console.log(typeof v==="object"?JSON.stringify(v):v)' "$1" "$2"; }
# jwtp JWT -> payload JSON;  jwth JWT -> header JSON
jwtp() { node -e 'console.log(Buffer.from(process.argv[1].split(".")[1],"base64url").toString())' "$1"; }
jwth() { node -e 'console.log(Buffer.from(process.argv[1].split(".")[0],"base64url").toString())' "$1"; }
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
location() { grep -i '^location:' "$1" | tail -1 | sed 's/^[Ll]ocation: *//' | tr -d '\r'; }
status() { head -1 "$1" | awk '{print $2}'; }
qparam() { node -e 'console.log(new URL(process.argv[1]).searchParams.get(process.argv[2]) ?? "")' "$1" "$2"; }
# jwsverify JWKS_URI JWT -> verifies the signature against the served JWKS (jose's
# createRemoteJWKSet + jwtVerify, also checks exp/nbf if present); prints
# {"header":…,"payload":…} and exits 0, or prints the error and exits 1.
jwsverify() { node --input-type=module -e '
  import { createRemoteJWKSet, jwtVerify } from "jose";
  try {
    const { protectedHeader, payload } = await jwtVerify(process.argv[2], createRemoteJWKSet(new URL(process.argv[1])),
      { algorithms: ["RS256", "ES256"], typ: undefined });
    console.log(JSON.stringify({ header: protectedHeader, payload }));
  } catch (e) { console.log(`verify failed: ${e.code || ""} ${e.message}`); process.exit(1); }' "$1" "$2"; }

# Tiny back-channel logout receiver: records each POST body, answers 200.
# (python3 -m http.server would answer POST with 501.)
start_bc_listener() {
  rm -f "$WORK/bc.port"
  node -e '
    const http = require("http"), fs = require("fs");
    const s = http.createServer((req, res) => { let b = ""; req.on("data", (d) => b += d);
      req.on("end", () => { fs.appendFileSync(process.argv[1], req.method + " " + req.url + " " + b + "\n"); res.end(); }); });
    s.listen(0, "127.0.0.1", () => console.log(s.address().port));
    setTimeout(() => process.exit(0), 120000);' "$WORK/bc.log" > "$WORK/bc.port" &
  PIDS+=($!)
  for _ in $(seq 50); do [ -s "$WORK/bc.port" ] && break; sleep 0.1; done
  BCPORT=$(cat "$WORK/bc.port")
}

run_flavor() {
  local FLAVOR=$1 BCPORT RP="http://127.0.0.1:3999"
  local REDIR="$RP/auth/callback" JAR="$WORK/jar.$1"
  echo "# flavor $FLAVOR"
  start_bc_listener   # sets BCPORT (not in $(...): PIDS must be updated in this shell)
  local CLIENTS
  CLIENTS=$(cat <<EOF
[{"client_id":"rp","client_secret":"rp-secret","redirect_uris":["$RP/auth/callback"],
  "post_logout_redirect_uris":["$RP/"],
  "backchannel_logout_uri":"http://127.0.0.1:$BCPORT/auth/backchannel-logout",
  "backchannel_logout_session_required":true},
 {"client_id":"rp-post","client_secret":"rp-post-secret","token_endpoint_auth_method":"client_secret_post",
  "redirect_uris":["$RP/auth/callback"],"post_logout_redirect_uris":["$RP/"],
  "backchannel_logout_uri":"http://127.0.0.1:$BCPORT/rp-post/backchannel-logout"}]
EOF
)
  # stdin from a FIFO that we hold open: closing it must stop the IdP.
  mkfifo "$WORK/stdin.$FLAVOR"
  IDP_FLAVOR=$FLAVOR IDP_CLIENTS=$CLIENTS ACCESS_TOKEN_TTL=120 IDP_MAX_SECONDS=120 \
    node server.js < "$WORK/stdin.$FLAVOR" > "$WORK/idp.out" 2> "$WORK/idp.$FLAVOR.err" &
  local IDP_PID=$!; PIDS+=($IDP_PID)
  exec 9> "$WORK/stdin.$FLAVOR"   # open the write end (unblocks node's open)
  for _ in $(seq 100); do [ -s "$WORK/idp.out" ] && break; sleep 0.1; done
  local ISS PORT BASE
  ISS=$(jget "$WORK/idp.out" j.issuer); PORT=$(jget "$WORK/idp.out" j.port); BASE="http://127.0.0.1:$PORT"
  check "one JSON line on stdout ($(cat "$WORK/idp.out"))" [ "$(wc -l < "$WORK/idp.out")" = 1 ]

  # sso_login CLIENT SCOPE AUTHARGS -> token response JSON on stdout (needs an IdP session in $JAR)
  sso_login() {
    local v c cb
    v=$(openssl rand -hex 32); c=$(printf %s "$v" | openssl dgst -sha256 -binary | b64url)
    C -c "$JAR" -b "$JAR" -D "$WORK/hs" -o /dev/null -G "$AUTH" -d "client_id=$1" -d response_type=code \
      --data-urlencode "redirect_uri=$REDIR" --data-urlencode "scope=$2" -d state=s2 -d nonce=n2 \
      --data-urlencode "code_challenge=$c" -d code_challenge_method=S256
    cb=$(location "$WORK/hs")
    [ "${cb%%\?*}" = "$REDIR" ] || { echo "sso_login: expected redirect to $REDIR, got $cb" >&2; echo '{}'; return; }
    LAST_CODE=$(qparam "$cb" code); LAST_VERIFIER=$v
    # shellcheck disable=SC2086
    C $3 "$TOKEN" -d grant_type=authorization_code --data-urlencode "code=$LAST_CODE" \
      --data-urlencode "redirect_uri=$REDIR" --data-urlencode "code_verifier=$v"
  }

  # 1. discovery
  C "$ISS/.well-known/openid-configuration" > "$WORK/disc.json"
  local AUTH TOKEN JWKS ENDS REVOKE USERINFO
  AUTH=$(jget "$WORK/disc.json" j.authorization_endpoint); TOKEN=$(jget "$WORK/disc.json" j.token_endpoint)
  JWKS=$(jget "$WORK/disc.json" j.jwks_uri); ENDS=$(jget "$WORK/disc.json" 'j.end_session_endpoint ?? ""')
  REVOKE=$(jget "$WORK/disc.json" j.revocation_endpoint); USERINFO=$(jget "$WORK/disc.json" j.userinfo_endpoint)
  check "discovery issuer matches" [ "$(jget "$WORK/disc.json" j.issuer)" = "$ISS" ]
  check "discovery advertises RFC 9207 iss" [ "$(jget "$WORK/disc.json" j.authorization_response_iss_parameter_supported)" = true ]
  if [ "$FLAVOR" = keycloak ]; then
    check "keycloak: end_session_endpoint present" [ -n "$ENDS" ]
    check "keycloak: backchannel_logout_supported" [ "$(jget "$WORK/disc.json" j.backchannel_logout_supported)" = true ]
  else
    check "cognito: no end_session_endpoint" [ -z "$ENDS" ]
  fi

  # 2. login: authorization request (PKCE S256 + state + nonce)
  local VERIFIER CHALLENGE STATE NONCE
  VERIFIER=$(openssl rand -hex 32); CHALLENGE=$(printf %s "$VERIFIER" | openssl dgst -sha256 -binary | b64url)
  STATE=$(openssl rand -hex 8); NONCE=$(openssl rand -hex 8)
  C -c "$JAR" -b "$JAR" -D "$WORK/h1" -o /dev/null -G "$AUTH" \
    --data-urlencode client_id=rp --data-urlencode response_type=code \
    --data-urlencode "redirect_uri=$REDIR" --data-urlencode "scope=openid profile email" \
    --data-urlencode "state=$STATE" --data-urlencode "nonce=$NONCE" \
    --data-urlencode "code_challenge=$CHALLENGE" --data-urlencode code_challenge_method=S256
  local INTER; INTER=$(location "$WORK/h1")
  check "authorize -> 303 to interaction ($INTER)" [ "$(status "$WORK/h1")" = 303 ]
  case $INTER in /*) INTER="$BASE$INTER";; esac
  C -c "$JAR" -b "$JAR" -o "$WORK/login.html" "$INTER"
  check "login page has login+password fields" grep -q "name=\"password\"" "$WORK/login.html"
  C -c "$JAR" -b "$JAR" -D "$WORK/h2" -o /dev/null -X POST "$INTER" \
    --data-urlencode prompt=login --data-urlencode login=alice --data-urlencode password=whatever
  local RESUME; RESUME=$(location "$WORK/h2"); case $RESUME in /*) RESUME="$BASE$RESUME";; esac
  check "login POST -> 303 to resume ($RESUME)" [ "$(status "$WORK/h2")" = 303 ]
  C -c "$JAR" -b "$JAR" -D "$WORK/h3" -o /dev/null "$RESUME"
  local CB; CB=$(location "$WORK/h3")
  check "resume -> 303 to redirect_uri ($CB)" [ "${CB%%\?*}" = "$REDIR" ]
  local CODE; CODE=$(qparam "$CB" code)
  check "callback carries state" [ "$(qparam "$CB" state)" = "$STATE" ]
  check "callback carries iss" [ "$(qparam "$CB" iss)" = "$ISS" ]

  # 3. code exchange (client_secret_basic)
  C -u rp:rp-secret -o "$WORK/tok1.json" "$TOKEN" -d grant_type=authorization_code \
    --data-urlencode "code=$CODE" --data-urlencode "redirect_uri=$REDIR" --data-urlencode "code_verifier=$VERIFIER"
  local AT RT IDT
  AT=$(jget "$WORK/tok1.json" j.access_token); RT=$(jget "$WORK/tok1.json" 'j.refresh_token ?? ""'); IDT=$(jget "$WORK/tok1.json" j.id_token)
  check "code exchange gives access, refresh and id token" [ -n "$AT" ] && [ -n "$RT" ] && [ -n "$IDT" ]
  check "expires_in follows ACCESS_TOKEN_TTL=120" [ "$(jget "$WORK/tok1.json" j.expires_in)" = 120 ]
  jwtp "$IDT" > "$WORK/idt.json"; echo "  id_token header $(jwth "$IDT")"; echo "  id_token claims $(cat "$WORK/idt.json")"
  check "id_token nonce/sub/email" [ "$(jget "$WORK/idt.json" '[j.nonce,j.sub,j.email].join()')" = "$NONCE,alice,alice@example.test" ]
  if [ "$FLAVOR" = keycloak ]; then
    check "keycloak: id_token has sid" [ -n "$(jget "$WORK/idt.json" 'j.sid ?? ""')" ]
  else
    check "cognito: id_token cognito:groups + token_use" [ "$(jget "$WORK/idt.json" '[j["cognito:groups"],j.token_use].join("|")')" = "admins,users|id" ]
  fi
  check "userinfo with access token" [ "$(C -H "Authorization: Bearer $AT" "$USERINFO" | node -pe 'JSON.parse(require("fs").readFileSync(0)).preferred_username')" = alice ]

  # 4. refresh
  C -u rp:rp-secret -o "$WORK/tok2.json" "$TOKEN" -d grant_type=refresh_token --data-urlencode "refresh_token=$RT"
  local RT2; RT2=$(jget "$WORK/tok2.json" 'j.refresh_token ?? ""')
  check "refresh gives new access token" [ -n "$(jget "$WORK/tok2.json" 'j.access_token ?? ""')" ]
  if [ "$FLAVOR" = keycloak ]; then
    check "keycloak: refresh rotated" [ -n "$RT2" ] && [ "$RT2" != "$RT" ]
    C -u rp:rp-secret -o "$WORK/tok3.json" "$TOKEN" -d grant_type=refresh_token --data-urlencode "refresh_token=$RT2"
    check "keycloak: rotated token works" [ -n "$(jget "$WORK/tok3.json" 'j.refresh_token ?? ""')" ]
    RT=$(jget "$WORK/tok3.json" j.refresh_token)
    check "keycloak: old refresh token rejected" [ "$(C -u rp:rp-secret "$TOKEN" -d grant_type=refresh_token --data-urlencode "refresh_token=$RT2" | node -pe 'JSON.parse(require("fs").readFileSync(0)).error')" = invalid_grant ]
    check "keycloak: reuse detection revoked the whole grant" [ "$(C -u rp:rp-secret "$TOKEN" -d grant_type=refresh_token --data-urlencode "refresh_token=$RT" | node -pe 'JSON.parse(require("fs").readFileSync(0)).error')" = invalid_grant ]
  else
    check "cognito: refresh response has no refresh_token" [ -z "$RT2" ]
    C -u rp:rp-secret -o "$WORK/tok3.json" "$TOKEN" -d grant_type=refresh_token --data-urlencode "refresh_token=$RT"
    check "cognito: same refresh token works again" [ -n "$(jget "$WORK/tok3.json" 'j.access_token ?? ""')" ]
    check "cognito: refreshed id_token keeps token_use" [ "$(jwtp "$(jget "$WORK/tok3.json" j.id_token)" | node -pe 'JSON.parse(require("fs").readFileSync(0)).token_use')" = id ]
  fi

  # 5. helpers: stats and key rotation
  C "$BASE/__test/stats" > "$WORK/stats.json"; echo "  stats $(cat "$WORK/stats.json")"
  if [ "$FLAVOR" = keycloak ]; then
    check "stats counts (2 of the 4 refreshes failed)" [ "$(jget "$WORK/stats.json" '[j.authorization_code,j.refresh_token,j.failed.refresh_token].join()')" = "1,4,2" ]
  else
    check "stats counts" [ "$(jget "$WORK/stats.json" '[j.authorization_code,j.refresh_token].join()')" = "1,2" ]
  fi
  local OLDKID NEWKID
  OLDKID=$(jwth "$IDT" | node -pe 'JSON.parse(require("fs").readFileSync(0)).kid')
  C -X POST "$BASE/__test/rotate-keys" > "$WORK/rotate.json"
  NEWKID=$(jget "$WORK/rotate.json" j.kid)
  C "$JWKS" > "$WORK/jwks.json"
  check "rotate-keys: JWKS has old ($OLDKID) and new ($NEWKID) kid" [ "$(jget "$WORK/jwks.json" "[j.keys.some(k=>k.kid==='$OLDKID'), j.keys.some(k=>k.kid==='$NEWKID')].join()")" = "true,true" ]

  # 5b. /__test/sign: tokens signed with the provider's current key, verified against the served JWKS
  local NOW SJWT; NOW=$(date +%s)
  C -X POST -H 'content-type: application/json' -o "$WORK/sign1.json" "$BASE/__test/sign" \
    -d "{\"claims\":{\"iss\":\"$ISS\",\"aud\":\"wrong-audience\",\"sub\":\"alice\",\"iat\":$NOW,\"exp\":$((NOW + 60))}}"
  SJWT=$(jget "$WORK/sign1.json" 'j.jwt ?? ""')
  if jwsverify "$JWKS" "$SJWT" > "$WORK/sv1.json"; then
    echo "  signed $(cat "$WORK/sv1.json")"
    check "sign: RS256 JWT verifies against JWKS, current kid $NEWKID, typ JWT, claims as given" \
      [ "$(jget "$WORK/sv1.json" '[j.header.alg,j.header.kid,j.header.typ,j.payload.aud,j.payload.sub,Object.keys(j.payload).length].join()')" = "RS256,$NEWKID,JWT,wrong-audience,alice,5" ]
  else bad "sign: RS256 JWT verifies against JWKS ($(cat "$WORK/sv1.json"))"; fi
  local NEWES; NEWES=$(jget "$WORK/rotate.json" j.kids.ES256)
  C -X POST -H 'content-type: application/json' -o "$WORK/sign2.json" "$BASE/__test/sign" \
    -d "{\"alg\":\"ES256\",\"header\":{\"typ\":\"logout+jwt\"},\"claims\":{\"iss\":\"$ISS\",\"aud\":\"rp\",\"iat\":$NOW,\"jti\":\"j1\",\"sid\":\"s\",\"nonce\":\"forbidden\"}}"
  if jwsverify "$JWKS" "$(jget "$WORK/sign2.json" 'j.jwt ?? ""')" > "$WORK/sv2.json"; then
    check "sign: ES256 + header override verifies (kid $NEWES, typ logout+jwt, nonce kept)" \
      [ "$(jget "$WORK/sv2.json" '[j.header.alg,j.header.kid,j.header.typ,j.payload.nonce].join()')" = "ES256,$NEWES,logout+jwt,forbidden" ]
  else bad "sign: ES256 JWT verifies against JWKS ($(cat "$WORK/sv2.json"))"; fi
  C -X POST -H 'content-type: application/json' -o "$WORK/sign3.json" "$BASE/__test/sign" -d '{"claims":{"sub":"x"},"header":{"kid":"no-such-kid"}}'
  check "sign: header kid override is used (no JWKS match -> verify fails)" \
    eval '[ "$(jwth "$(jget "$WORK/sign3.json" j.jwt)" | node -pe "JSON.parse(require(\"fs\").readFileSync(0)).kid")" = no-such-kid ] && ! jwsverify "$JWKS" "$(jget "$WORK/sign3.json" j.jwt)" >/dev/null'
  check "sign: tampered payload fails verification" eval '! jwsverify "$JWKS" "${SJWT%%.*}.$(printf %s "{\"sub\":\"mallory\"}" | b64url).${SJWT##*.}" >/dev/null'
  C -X POST -H 'content-type: application/json' -o "$WORK/sign4.json" -w '%{http_code}' "$BASE/__test/sign" -d '{"claims":{},"alg":"HS256"}' > "$WORK/sign4.code"
  check "sign: bad alg -> 400 JSON error ($(cat "$WORK/sign4.json"))" [ "$(cat "$WORK/sign4.code") $(jget "$WORK/sign4.json" j.error)" = "400 invalid_request" ]
  check "sign: claims not an object -> 400" [ "$(C -X POST -o /dev/null -w '%{http_code}' "$BASE/__test/sign" -d '{"claims":"x"}')" = 400 ]
  check "sign: body not JSON -> 400" [ "$(C -X POST -o /dev/null -w '%{http_code}' "$BASE/__test/sign" -d 'not json')" = 400 ]

  # 6. second login in the same browser (SSO: no login form) -> signed with the new kid
  sso_login rp "openid offline_access" "-u rp:rp-secret" > "$WORK/tok4.json"
  IDT=$(jget "$WORK/tok4.json" j.id_token); RT=$(jget "$WORK/tok4.json" 'j.refresh_token ?? ""')
  check "new id_token signed with new kid" [ "$(jwth "$IDT" | node -pe 'JSON.parse(require("fs").readFileSync(0)).kid')" = "$NEWKID" ]
  check "session survived key rotation (SSO code exchange ok)" [ -n "$RT" ]
  check "code replay rejected" [ "$(C -u rp:rp-secret -o /dev/null -w '%{http_code}' "$TOKEN" -d grant_type=authorization_code --data-urlencode "code=$LAST_CODE" --data-urlencode "redirect_uri=$REDIR" --data-urlencode "code_verifier=$LAST_VERIFIER")" = 400 ]
  check "code replay revoked that grant's refresh token" [ "$(C -u rp:rp-secret "$TOKEN" -d grant_type=refresh_token --data-urlencode "refresh_token=$RT" | node -pe 'JSON.parse(require("fs").readFileSync(0)).error')" = invalid_grant ]
  # 6b. a second client using client_secret_post, then back to rp for the logout tests
  sso_login rp-post "openid email" "-d client_id=rp-post -d client_secret=rp-post-secret" > "$WORK/tok5.json"
  check "client_secret_post client: code exchange ok" [ -n "$(jget "$WORK/tok5.json" 'j.id_token ?? ""')" ]
  RT=$(jget "$WORK/tok5.json" 'j.refresh_token ?? ""')
  check "revocation endpoint: 200" [ "$(C -o /dev/null -w '%{http_code}' "$REVOKE" -d client_id=rp-post -d client_secret=rp-post-secret --data-urlencode "token=$RT" -d token_type_hint=refresh_token)" = 200 ]
  check "revoked refresh token rejected" [ "$(C "$TOKEN" -d client_id=rp-post -d client_secret=rp-post-secret -d grant_type=refresh_token --data-urlencode "refresh_token=$RT" | node -pe 'JSON.parse(require("fs").readFileSync(0)).error')" = invalid_grant ]
  sso_login rp "openid" "-u rp:rp-secret" > "$WORK/tok4.json"
  IDT=$(jget "$WORK/tok4.json" j.id_token); RT=$(jget "$WORK/tok4.json" 'j.refresh_token ?? ""')
  check "refresh token issued without offline_access" [ -n "$RT" ]

  # 7. logout
  if [ "$FLAVOR" = keycloak ]; then
    C -c "$JAR" -b "$JAR" -o "$WORK/logout.html" -G "$ENDS" --data-urlencode "id_token_hint=$IDT" \
      --data-urlencode "post_logout_redirect_uri=$RP/" -d state=bye
    local XSRF CONFIRM
    XSRF=$(sed -n 's/.*name="xsrf" value="\([^"]*\)".*/\1/p' "$WORK/logout.html")
    CONFIRM=$(sed -n 's/.*action="\([^"]*\)".*/\1/p' "$WORK/logout.html")
    check "end_session page has xsrf form (action $CONFIRM)" [ -n "$XSRF" ]
    C -c "$JAR" -b "$JAR" -D "$WORK/h5" -o /dev/null -X POST "$CONFIRM" -d "xsrf=$XSRF" -d logout=yes
    check "confirm -> 303 to post_logout_redirect_uri with state ($(location "$WORK/h5"))" [ "$(location "$WORK/h5")" = "$RP/?state=bye" ]
    sleep 0.3
    check "back-channel logout_token delivered to rp" grep -q '^POST /auth/backchannel-logout logout_token=' "$WORK/bc.log"
    check "back-channel logout_token delivered to rp-post too (logout=yes: every client of the session)" grep -q '^POST /rp-post/backchannel-logout logout_token=' "$WORK/bc.log"
    local LT; LT=$(sed -n 's|^POST /auth/backchannel-logout logout_token=\([^ ]*\).*|\1|p' "$WORK/bc.log" | tail -1)
    echo "  logout_token claims $(jwtp "$LT")"
    check "logout_token verifies against JWKS" eval 'jwsverify "$JWKS" "$LT" >/dev/null'
    check "logout_token sid == id_token sid" [ "$(jwtp "$LT" | node -pe 'JSON.parse(require("fs").readFileSync(0)).sid')" = "$(jwtp "$IDT" | node -pe 'JSON.parse(require("fs").readFileSync(0)).sid')" ]
  else
    check "cognito /logout rejects unregistered logout_uri" [ "$(C -o /dev/null -w '%{http_code}' -G "$BASE/logout" -d client_id=rp --data-urlencode 'logout_uri=http://evil.test/')" = 400 ]
    C -c "$JAR" -b "$JAR" -D "$WORK/h5" -o /dev/null -G "$BASE/logout" -d client_id=rp --data-urlencode "logout_uri=$RP/"
    check "cognito /logout -> 302 to logout_uri" [ "$(status "$WORK/h5") $(location "$WORK/h5")" = "302 $RP/" ]
  fi
  check "refresh token dead after logout" [ "$(C -u rp:rp-secret "$TOKEN" -d grant_type=refresh_token --data-urlencode "refresh_token=$RT" | node -pe 'JSON.parse(require("fs").readFileSync(0)).error')" = invalid_grant ]
  C -c "$JAR" -b "$JAR" -D "$WORK/h6" -o /dev/null -G "$AUTH" -d client_id=rp -d response_type=code \
    --data-urlencode "redirect_uri=$REDIR" -d scope=openid -d code_challenge="$CHALLENGE" -d code_challenge_method=S256
  check "after logout: authorize asks for login again" contains "$(location "$WORK/h6")" /interaction/
  C -D "$WORK/h7" -o /dev/null -G "$AUTH" -d client_id=rp -d response_type=code --data-urlencode "redirect_uri=$REDIR" -d scope=openid
  check "PKCE required (no code_challenge -> error=invalid_request)" [ "$(qparam "$(location "$WORK/h7")" error)" = invalid_request ]

  # 8. closing stdin stops the IdP
  exec 9>&-
  for _ in $(seq 50); do kill -0 "$IDP_PID" 2>/dev/null || break; sleep 0.1; done
  check "IdP exits when stdin closes" not_running "$IDP_PID"
  if [ "$FAIL" -gt 0 ]; then echo "--- idp stderr"; cat "$WORK/idp.$FLAVOR.err"; fi
}

for f in "${@:-keycloak cognito}"; do for g in $f; do run_flavor "$g"; done; done
echo "$PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
