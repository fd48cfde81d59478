#!/usr/bin/env bash
# Where READ's CPU goes: samples the whole machine (perf, cpu-clock) while wrk
# runs READ against each contender, then prints CPU per request by process
# (server, Postgres, wrk) and the hottest functions of the server and of
# Postgres. Run bench/run.sh once first (it builds the servers and the
# benchmark database).
#
#   bash bench/profile.sh                      # pg-session and tower-sessions
#   bash bench/profile.sh pg-session           # one contender
#
# Writes bench/results/profile.md (printed too). Settings (env): DURATION (10),
# CONNECTIONS (32), THREADS (2), POOL (10), SESSIONS (10000), FREQ (999 Hz).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
BENCH=$PWD
DURATION=${DURATION:-10} CONNECTIONS=${CONNECTIONS:-32} THREADS=${THREADS:-2}
POOL=${POOL:-10} SESSIONS=${SESSIONS:-10000} FREQ=${FREQ:-999}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
BENCH_DB=${BENCH_DB:-tower_pg_session_bench}
export BENCH_DATABASE_URL="postgres://$PGUSER@$PGHOST:$PGPORT/$BENCH_DB" BENCH_POOL=$POOL
BIN=$BENCH/target/release/bench-server
OUT=$BENCH/results/profile.md
WORK=$(mktemp -d)
SERVER_PID=
cleanup() {
  [[ -n $SERVER_PID ]] && kill -TERM "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  [[ -n ${KEEP:-} ]] || rm -rf "$WORK"
}
trap cleanup EXIT

[[ -x $BIN ]] || { echo "run bash bench/run.sh first (it builds $BIN)" >&2; exit 2; }
if ! command -v perf >/dev/null; then
  apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null
fi
sql() { psql -X -q -At -v ON_ERROR_STOP=1 -d "$BENCH_DB" "$@"; }

{
  printf '# Where READ spends its CPU\n\n'
  printf -- '- date: %s; commit %s\n' "$(date -u '+%F %T UTC')" "$(git -C "$BENCH" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  printf -- '- wrk READ %s s, %s connections; pool %s; %s sessions; perf cpu-clock at %s Hz on every CPU\n\n' \
    "$DURATION" "$CONNECTIONS" "$POOL" "$SESSIONS" "$FREQ"
  printf 'CPU per request is sampled CPU time ÷ requests served in the same window, so the\n'
  printf 'columns add up to the whole machine'"'"'s work per request.\n\n'
  printf '| contender | req/s | server µs | Postgres µs | wrk µs | other µs |\n|---|---:|---:|---:|---:|---:|\n'
} >"$WORK/head.md"
: >"$WORK/body.md"

port=18500
CONTENDERS=${*:-pg-session tower-sessions}
for c in $CONTENDERS; do
  {
    port=$((port + 1))
    case $c in
      pg-session) table=bench_pg.session ;;
      tower-sessions) table=bench_ts.session ;;
      tower-sessions-noping) table=bench_ts_noping.session ;;
      tower-sessions-always-save) table=bench_ts_always.session ;;
      *) echo "unknown contender $c" >&2; exit 2 ;;
    esac
    sql -c "TRUNCATE $table" 2>/dev/null || true
    timeout 600 "$BIN" seed "$SESSIONS" --contender "$c" --pool "$POOL" >"$WORK/cookies"
    sql -c "VACUUM ANALYZE $table"
    timeout 600 "$BIN" serve --contender "$c" --port "$port" --pool "$POOL" >"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$port/read" && break; sleep 0.1; done
    COOKIES="$WORK/cookies" wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s "$BENCH/wrk/read.lua" \
      "http://127.0.0.1:$port" >/dev/null
    perf record -q -a -F "$FREQ" -o "$WORK/perf.data" -- \
      env COOKIES="$WORK/cookies" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" \
      -s "$BENCH/wrk/read.lua" "http://127.0.0.1:$port" >"$WORK/wrk.out" 2>/dev/null
    kill -TERM "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=
    requests=$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' "$WORK/wrk.out")
    rps=$(sed -n 's/.* rps=\([0-9.]*\).*/\1/p' "$WORK/wrk.out")
    # Samples by thread name: tokio's workers and the main thread are the server.
    perf report -i "$WORK/perf.data" --stdio --no-children --sort comm -F overhead,sample,comm 2>/dev/null |
      awk -v n="$requests" -v f="$FREQ" -v c="$c" -v rps="$rps" '
        $1 ~ /%$/ { s = $2; name = $3
          if (name ~ /^(tokio-|bench-server)/) srv += s
          else if (name == "postgres") pg += s
          else if (name == "wrk") w += s
          else o += s }
        END { us = 1e6 / f / n
          printf "| %s | %.0f | %.1f | %.1f | %.1f | %.1f |\n", c, rps, srv * us, pg * us, w * us, o * us }' \
      >>"$WORK/head.md"
    for who in server postgres; do
      if [[ $who == server ]]; then comms=$(perf report -i "$WORK/perf.data" --stdio --sort comm 2>/dev/null |
        awk '$NF ~ /^(tokio-|bench-server)/ { print $NF }' | sort -u | paste -sd, - || true)
      else comms=postgres; fi
      {
        printf '\n### %s: hottest functions of the %s (share of its own samples)\n\n```\n' "$c" "$who"
        perf report -i "$WORK/perf.data" --stdio --no-children --comms "$comms" --sort symbol \
          --percentage relative 2>/dev/null | grep -E '^ +[0-9.]+%' | sed -E 's/ +- +- *$//' | head -n 25 || true
        printf '```\n'
      } >>"$WORK/body.md"
    done
  }
done
cat "$WORK/head.md" "$WORK/body.md" >"$OUT"
cat "$OUT"
