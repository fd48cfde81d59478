#!/usr/bin/env bash
# The benchmark: tower-pg-session against tower-sessions + tower-sessions-sqlx-store
# (default and always-save), express-session + connect-pg-simple, an axum app
# without sessions (the HTTP ceiling), and pgbench (the database's limit); and
# tower-pg-session through PgBouncer in transaction mode (pg-session-pgbouncer);
# tower-sessions also with its pool's connection ping off (tower-sessions-noping);
# and the demo (examples/demo.rs, built in release) beside the minimal server;
# and pg-session-b, the minimal server built from another tree (BENCH_SERVER_B),
# to compare two builds of the crate cell by cell.
# Each HTTP cell runs at every concurrency of CONCURRENCY (wrk connections);
# pgbench runs at the same client counts, at most POOL (the servers' pools), in the
# same rotation as the HTTP contenders;
# with pg-session-pgbouncer, its READ and WRITE statements also run through
# PgBouncer (the pooler's own cost, beside the crate's).
#
#   bash bench/run.sh              # 10 s x 3 per cell, median (about 1.5 hours)
#   QUICK=1 bash bench/run.sh      # 3 s x 1 at concurrency 1 and 32: a smoke test
#   SCALE=1 bash bench/run.sh      # adds the table-size and prune-under-load runs
#   MEMORY=1 bash bench/run.sh     # adds the server's memory over 10k then 1M sessions
#
# Writes bench/results/$REPORT.md (printed too), $REPORT.tsv (raw) and $REPORT.svg
# (req/s and p99 against concurrency), REPORT=latest.
# Settings (env): DURATION, REPS, CONCURRENCY ("1 4 32 128"), CONNECTIONS (32: warm-up,
# scale and memory runs), THREADS (2, at most the connections), POOL (10),
# SESSIONS (pre-created cookies, 10000), CONTENDERS, WORKLOADS (empty: none), PGBENCH (1),
# SCALE (0), SCALE_ROWS (1000000, 90 % expired; several: one scale run each), SCALE_CONTENDERS,
# MEMORY (0), MEMORY_SESSIONS ("10000 1000000"),
# PGHOST/PGPORT/PGUSER (127.0.0.1/5432/postgres), BENCH_DB (tower_pg_session_bench),
# PGBOUNCER_PORT (16432; PgBouncer gets POOL server connections, as many as the others' pools),
# BENCH_SERVER (a bench-server built earlier; default: this tree's), BENCH_SERVER_B (pg-session-b's).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
BENCH=$PWD
if [[ ${QUICK:-0} == 1 ]]; then
  : "${DURATION:=3}" "${REPS:=1}" "${SESSIONS:=1000}" "${WARMUP:=1}" "${SCALE_ROWS:=100000}" "${CONCURRENCY:=1 32}"
fi
DURATION=${DURATION:-10} REPS=${REPS:-3} WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-32} THREADS=${THREADS:-2} POOL=${POOL:-10} SESSIONS=${SESSIONS:-10000}
CONCURRENCY=${CONCURRENCY:-1 4 32 128}
CONTENDERS=${CONTENDERS-ceiling pg-session demo pg-session-pgbouncer tower-sessions tower-sessions-noping tower-sessions-always-save express}
WORKLOADS=${WORKLOADS-read write new mixed}
PGBENCH=${PGBENCH:-1} SCALE=${SCALE:-0} SCALE_ROWS=${SCALE_ROWS:-1000000}
SCALE_CONTENDERS=${SCALE_CONTENDERS:-pg-session tower-sessions express}
MEMORY=${MEMORY:-0} MEMORY_SESSIONS=${MEMORY_SESSIONS:-10000 1000000}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
BENCH_DB=${BENCH_DB:-tower_pg_session_bench}
PGBOUNCER_PORT=${PGBOUNCER_PORT:-16432}
# Every contender, pgbench included, talks to the loopback server in the
# clear: the crate's TLS backend would otherwise upgrade its connections
# (sslmode=prefer) while Node's pg stays in the clear.
export PGSSLMODE=disable
export BENCH_DATABASE_URL="postgres://$PGUSER@$PGHOST:$PGPORT/$BENCH_DB?sslmode=disable" BENCH_POOL=$POOL
[[ $PGHOST == 127.0.0.1 || $PGHOST == localhost ]] || { echo "PGHOST must be local" >&2; exit 2; }

BIN=${BENCH_SERVER:-$BENCH/target/release/bench-server}
BIN_B=${BENCH_SERVER_B:-}
if [[ " $CONTENDERS " == *" pg-session-b "* && ! -x $BIN_B ]]; then
  echo "pg-session-b needs BENCH_SERVER_B, a bench-server built from the other tree" >&2
  exit 2
fi
RESULTS=$BENCH/results REPORT=${REPORT:-latest}
# The servers and PgBouncer run for the whole run, and stop by themselves after
# at most this long: every cell's runs (the contenders and pgbench's two, one
# workload more as a margin) at 20 s over DURATION each, plus an hour for
# seeding, the scale and memory runs.
set -f
words() { echo $#; }
LIFETIME=$(($(words $CONCURRENCY) * ($(words $WORKLOADS) + 1) * ($(words $CONTENDERS) + 2) * REPS * (DURATION + 20) + 3600))
set +f
RAW=$RESULTS/$REPORT.tsv
WORK=$(mktemp -d)
SERVER_PID=
mkdir -p "$RESULTS"
log() { printf '[bench %(%T)T] %s\n' -1 "$*" >&2; }

stop_server() {
  if [[ -n $SERVER_PID ]]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
}
cleanup() {
  stop_server
  declare -F stop_servers >/dev/null && stop_servers
  [[ -n ${LIVE_PID:-} ]] && kill -TERM "$LIVE_PID" 2>/dev/null
  [[ -n ${PRUNE_PID:-} ]] && kill -TERM "$PRUNE_PID" 2>/dev/null
  [[ -n ${PGBOUNCER_PID:-} ]] && kill -TERM "$PGBOUNCER_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

sql() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -At -v ON_ERROR_STOP=1 -d "$BENCH_DB" "$@"; }

# --------------------------------------------------------------- preparation
if ! command -v wrk >/dev/null; then
  log "installing wrk"
  apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
log "building bench-server (release)"
cargo build --release --quiet --manifest-path "$BENCH/Cargo.toml"
if [[ " $CONTENDERS " == *" demo "* ]]; then
  log "building the demo (release)"
  cargo build --release --quiet --manifest-path "$BENCH/../Cargo.toml" --example demo --features axum,oidc
fi
DEMO_BIN=$(cargo metadata --format-version 1 --no-deps --manifest-path "$BENCH/../Cargo.toml" |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/examples/demo
if [[ " $CONTENDERS " == *" express "* ||
      ($SCALE == 1 && " $SCALE_CONTENDERS " == *" express "*) ]]; then
  log "npm ci (bench/express)"
  (cd "$BENCH/express" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

psql -X -q -d postgres -At -c "SELECT 1 FROM pg_database WHERE datname = '$BENCH_DB'" | grep -q 1 ||
  psql -X -q -d postgres -c "CREATE DATABASE $BENCH_DB"
sql -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" \
  -c "DROP SCHEMA IF EXISTS bench_pg, bench_pg_b, bench_pgb, bench_ts, bench_ts_noping, bench_ts_always, bench_express, bench_pgbench CASCADE" \
  -c "DROP SCHEMA IF EXISTS bench_demo CASCADE" -c "CREATE SCHEMA bench_demo" \
  -c "DROP SCHEMA IF EXISTS bench_pg_live, bench_ts_live, bench_ts_always_live, bench_express_live CASCADE"

# PgBouncer in transaction mode in front of the benchmark database, for
# pg-session-pgbouncer: as many server connections as the others' pools.
if [[ " $CONTENDERS " == *" pg-session-pgbouncer "* ]]; then
  if ! command -v pgbouncer >/dev/null && [[ ! -x /usr/sbin/pgbouncer ]]; then
    log "installing pgbouncer"
    apt-get update -qq && apt-get install -y -qq pgbouncer >/dev/null
  fi
  chmod 755 "$WORK"
  printf '%s\n' "[databases]" "$BENCH_DB = host=$PGHOST port=$PGPORT dbname=$BENCH_DB user=$PGUSER" \
    "[pgbouncer]" "listen_addr = 127.0.0.1" "listen_port = $PGBOUNCER_PORT" "unix_socket_dir =" \
    "auth_type = any" "pool_mode = transaction" "default_pool_size = $POOL" "max_client_conn = 1000" \
    "ignore_startup_parameters = extra_float_digits" "server_reset_query =" >"$WORK/pgbouncer.ini"
  # PgBouncer refuses to run as root: it switches to postgres itself.
  timeout "$LIFETIME" "$(command -v pgbouncer || echo /usr/sbin/pgbouncer)" $([[ $(id -u) == 0 ]] && echo -u postgres) \
    "$WORK/pgbouncer.ini" >"$WORK/pgbouncer.log" 2>&1 &
  PGBOUNCER_PID=$!
  for _ in $(seq 50); do
    psql -X -q -At -h 127.0.0.1 -p "$PGBOUNCER_PORT" -d "$BENCH_DB" -c 'SELECT 1' >/dev/null 2>&1 && break
    sleep 0.1
  done
  psql -X -q -At -h 127.0.0.1 -p "$PGBOUNCER_PORT" -d "$BENCH_DB" -c 'SELECT 1' >/dev/null ||
    { cat "$WORK/pgbouncer.log" >&2; log "pgbouncer did not start"; exit 1; }
  export BENCH_PGBOUNCER_URL="postgres://$PGUSER@127.0.0.1:$PGBOUNCER_PORT/$BENCH_DB?sslmode=disable"
fi

{
  printf 'meta\tdate\t%s\n' "$(date -u '+%F %T UTC')"
  printf 'meta\tsettings\twrk %s s x %s (median; contenders, pgbench among them, interleaved, their order rotated every repetition) at %s connections, %s threads; pool %s; %s sessions\n' \
    "$DURATION" "$REPS" "${CONCURRENCY// /, }" "$THREADS" "$POOL" "$SESSIONS"
  printf 'meta\tmachine\t%s cores, %s; %s; node %s\n' "$(nproc)" "$(uname -sr)" \
    "$(psql -X -At -d "$BENCH_DB" -c 'SHOW server_version' | cut -d' ' -f1 | sed 's/^/PostgreSQL /')" "$(node --version)"
  printf 'meta\tload average at start\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
  printf 'meta\tcommit\t%s%s\n' "$(git -C "$BENCH" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$(git -C "$BENCH/.." diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ', with uncommitted changes to the crate')"
} >"$RAW"

# Statements of this database only: other databases on the server are left alone.
stats_reset() { sql -c "SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database WHERE datname = current_database()), 0)" >/dev/null; }
OURS="dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND query NOT LIKE '%pg_stat_statements%' AND query NOT LIKE '%pg_stat_activity%'"

# The bench-server that runs contender $1, the contender it runs as, and the
# schema suffix of its tables ($2): pg-session-b is pg-session run from
# BENCH_SERVER_B, on tables of its own. Sets AS_BIN, AS_CONTENDER, AS_SUFFIX.
bench_server_of() { # contender [schema suffix]
  AS_BIN=$BIN AS_CONTENDER=$1 AS_SUFFIX=${2:-}
  if [[ $1 == pg-session-b ]]; then
    AS_BIN=$BIN_B AS_CONTENDER=pg-session AS_SUFFIX=_b${2:-}
  fi
}

start_server() { # contender port [schema suffix]
  local c=$1 port=$2
  export BENCH_SCHEMA_SUFFIX=${3:-}
  if [[ $c == express ]]; then
    timeout "$LIFETIME" node "$BENCH/express/server.js" serve "$port" >"$WORK/$c${3:-}.log" 2>&1 &
  elif [[ $c == demo ]]; then
    # Not through a function: $! must be timeout's own process, whose
    # child is the server (CPU from /proc, TERM passed on).
    env "${DEMO_ENV[@]}" BIND_ADDR="127.0.0.1:$port" timeout "$LIFETIME" "$DEMO_BIN" >"$WORK/$c.log" 2>&1 &
  else
    bench_server_of "$c" "${3:-}"
    BENCH_SCHEMA_SUFFIX=$AS_SUFFIX timeout "$LIFETIME" "$AS_BIN" serve --contender "$AS_CONTENDER" --port "$port" \
      --pool "$POOL" >"$WORK/$c${3:-}.log" 2>&1 &
  fi
  unset BENCH_SCHEMA_SUFFIX
  SERVER_PID=$!
  for _ in $(seq 100); do
    curl -fs -o /dev/null "http://127.0.0.1:$port$(route read)" && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  cat "$WORK/$c${3:-}.log" >&2
  log "$c did not start"
  exit 1
}

# The demo as deployed, without a provider (login is not measured): its table
# in a schema of its own, its signing key fixed, no background prune.
DEMO_ENV=(DB_POOL_SIZE="$POOL" RUST_LOG=off COOKIE_SECURE=0 PRUNE_INTERVAL_SECS=0
  DATABASE_URL="$BENCH_DATABASE_URL&options=-c%20search_path%3Dbench_demo" OIDC_ISSUER=http://127.0.0.1:9
  SESSION_SECRET=tower-pg-session-bench-signing-key-0123456789)
# A workload's path: the demo's READ is /peek, its WRITE and NEW are /counter.
route() { # workload
  [[ ${CUR:-} == demo ]] || { echo "/$1"; return; }
  case $1 in read) echo /peek ;; *) echo /counter ;; esac
}
export_routes() { export ROUTE_READ=$(route read) ROUTE_WRITE=$(route write) ROUTE_NEW=$(route new); }

# READ for WARMUP seconds, unmeasured: pools filled, statements prepared.
warm() { # port cookie file
  COOKIES="$2" timeout 60 wrk -t"$THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" \
    -s "$BENCH/wrk/read.lua" "http://127.0.0.1:$1" >/dev/null
}

seed() { # contender count [schema suffix] > cookie file
  if [[ $1 == express ]]; then
    BENCH_SCHEMA_SUFFIX=${3:-} timeout 600 node "$BENCH/express/server.js" seed "$2"
  elif [[ $1 == demo ]]; then
    # Over HTTP, from the running demo: one new session per request.
    seq "$2" | xargs -P "$POOL" -n 1 sh -c \
      'curl -fs -o /dev/null -D - "$0" | sed -n "s/^[Ss]et-[Cc]ookie: \([^;]*\);.*/\1/p"' \
      "http://127.0.0.1:$port/counter"
  else
    bench_server_of "$1" "${3:-}"
    BENCH_SCHEMA_SUFFIX=$AS_SUFFIX timeout 600 "$AS_BIN" seed "$2" --contender "$AS_CONTENDER" --pool "$POOL"
  fi
}

# CPU time (clock ticks) of processes, for CPU per request: the server's process
# and the Postgres backends of this database.
TICK_US=$((1000000 / $(getconf CLK_TCK)))
ticks() { local p; for p; do awk '{ print $1, $14 + $15 }' "/proc/$p/stat" 2>/dev/null || true; done; }
backends() { sql -c "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"; }
# Ticks spent between two `ticks` listings (a process that started meanwhile counts from 0).
ticks_spent() {
  printf '%s\n' "$1" | awk -v after="$2" 'NF { t0[$1] = $2 }
    END { n = split(after, a, "\n"); for (i = 1; i <= n; i++) { split(a[i], f, " "); if (f[1] != "") s += f[2] - t0[f[1]] }; print s + 0 }'
}
server_ticks() { ticks "$(pgrep -P "$SERVER_PID" | head -n1)" | awk '{ print $2 }'; }
# PgBouncer's own (a child of its `timeout`): 0 without it.
pooler_ticks() {
  local p=
  [[ -n ${PGBOUNCER_PID:-} ]] && p=$(pgrep -P "$PGBOUNCER_PID" | head -n1)
  [[ -n $p ]] && ticks "$p" | awk '{ print $2 }' || echo 0
}

# One wrk run; appends `wrk contender label rep rps p50 p99 max requests errors
# stmts/req pg_exec_us/req server_cpu_us/req pg_cpu_us/req connections pgbouncer_cpu_us/req`.
run_wrk() { # contender workload label rep port duration [cookie file [connections]]
  local c=$1 w=$2 label=$3 rep=$4 port=$5 d=$6 cookies=${7:-$WORK/$1.cookies} conns=${8:-$CONNECTIONS}
  local out stats srv0 srv1 pg0 pg1 pg pb0 pb1
  stats_reset
  srv0=$(server_ticks) pg0=$(ticks $(backends)) pb0=$(pooler_ticks)
  out=$(COOKIES="$cookies" timeout $((d + 30)) wrk -t"$((conns < THREADS ? conns : THREADS))" -c"$conns" -d"${d}s" \
    --timeout 5s -s "$BENCH/wrk/$w.lua" "http://127.0.0.1:$port" | grep '^RESULT') ||
    { log "wrk failed: $c $w$(kill -0 "$SERVER_PID" 2>/dev/null || echo ": its server has exited")"; return 1; }
  srv1=$(server_ticks) pg1=$(ticks $(backends)) pb1=$(pooler_ticks)
  pg=$(ticks_spent "$pg0" "$pg1")
  stats=$(sql -F ' ' -c "SELECT coalesce(sum(calls), 0), coalesce(sum(total_exec_time), 0) FROM pg_stat_statements WHERE $OURS")
  echo "$out $stats $((srv1 - srv0)) $pg $((pb1 - pb0))" | awk -v c="$c" -v l="$label" -v r="$rep" -v tick="$TICK_US" -v n_conns="$conns" '{
    for (i = 2; i <= 9; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    n = v["requests"]; if (n == 0) n = 1
    printf "wrk\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%.3f\t%.1f\t%.1f\t%.1f\t%d\t%.1f\n", c, l, r, v["rps"], v["p50_us"],
      v["p99_us"], v["max_us"], v["requests"], v["socket_errors"] + v["non2xx"], $10 / n, $11 * 1000 / n,
      $12 * tick / n, $13 * tick / n, n_conns, $14 * tick / n
  }' | tee -a "$RAW" | cut -f2- | tr '\t' ' ' >&2
}

# The statements behind a cell (from its last repetition), for the details section.
statement_details() { # contender workload connections
  local requests
  requests=$(tail -n1 "$RAW" | cut -f9)
  sql -c "SELECT format('| %s | %s | %s | %s | %s | \`%s\` |', '$1', '$2', '$3', round(calls::numeric / greatest($requests, 1), 3),
            round((mean_exec_time * 1000)::numeric), replace(left(regexp_replace(query, '\s+', ' ', 'g'), 160), '|', '\|'))
          FROM pg_stat_statements WHERE $OURS ORDER BY calls DESC LIMIT 6" >>"$WORK/details.md"
}

# --------------------------------------------------------------- pgbench
# pgbench runs in the HTTP cells' rotation, as one more contender: for each
# workload the script of the same statements (pgbench_of), and with
# pg-session-pgbouncer the same through PgBouncer, so that its ratios too
# compare runs minutes apart at most.
# pgbench_cell SCRIPT CONNECTIONS REP LABEL ARGS...: one run, one raw line.
pgbench_cell() {
  local script=$1 n=$2 rep=$3 label=$4
  # As many clients as HTTP connections, at most as many as the servers' pools hold.
  local clients=$((n < POOL ? n : POOL))
  shift 4
  # Postgres CPU: the backends' ticks between 1 s after the start and 1 s before the end.
  timeout $((DURATION + 60)) pgbench -n "$@" -c "$clients" -j "$((clients < THREADS ? clients : THREADS))" -T "$DURATION" \
    -D rows="$SESSIONS" -f "$BENCH/pgbench/$script.sql" "$BENCH_DB" >"$WORK/pgbench.out" 2>&1 &
  sleep 1
  local t0 pg0 t1 pg1 out tps lat cpu
  t0=$(date +%s%N) pg0=$(ticks $(backends))
  sleep $((DURATION > 2 ? DURATION - 2 : 0))
  t1=$(date +%s%N) pg1=$(ticks $(backends))
  wait $! || { cat "$WORK/pgbench.out" >&2; exit 1; }
  out=$(<"$WORK/pgbench.out")
  tps=$(sed -n 's/^tps = \([0-9.]*\) (without.*/\1/p' <<<"$out")
  lat=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' <<<"$out")
  cpu=$(awk -v t="$(ticks_spent "$pg0" "$pg1")" -v us="$TICK_US" -v tps="$tps" -v s="$(((t1 - t0) / 1000000))" \
    'BEGIN { if (s > 0 && tps > 0) printf "%.1f", t * us / (tps * s / 1000) }')
  printf 'pgbench\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$rep" "$tps" "$lat" "$cpu" "$n" | tee -a "$RAW" | cut -f2- | tr '\t' ' ' >&2
}

# The pgbench script beside workload $1 (none for mixed).
pgbench_of() {
  case $1 in read) echo select ;; write) echo select_upsert ;; new) echo upsert ;; esac
}
# The cell's contenders: the HTTP ones, then pgbench's runs of its script.
cell_order() { # workload
  CELL=("${ORDER[@]}")
  local s
  s=$(pgbench_of "$1")
  [[ $PGBENCH == 1 && -n $s ]] || return 0
  CELL+=("pgbench:$s")
  # The pooler's own cost: the same statements through PgBouncer, unnamed
  # (its transaction mode keeps no prepared statement), as the crate's are.
  [[ -z ${PGBOUNCER_PID:-} || $s == upsert ]] || CELL+=("pgbench:$s@pgbouncer")
}
run_cell() { # contender workload rep connections
  local c=$1 w=$2 rep=$3 n=$4 s
  if [[ $c == pgbench:* ]]; then
    s=${c#pgbench:}
    case $s in
      *@pgbouncer) pgbench_cell "${s%@pgbouncer}" "$n" "$rep" "$s" -M extended -h 127.0.0.1 -p "$PGBOUNCER_PORT" ;;
      *) pgbench_cell "$s" "$n" "$rep" "$s" -M prepared ;;
    esac
    return
  fi
  CUR=$c SERVER_PID=${PID_OF[$c]}
  export_routes
  run_wrk "$c" "$w" "$w" "$rep" "${PORT_OF[$c]}" "$DURATION" "$WORK/$c.cookies" "$n"
  # Right after its last repetition: the next run resets the statistics.
  [[ $c == ceiling || $rep != "$REPS" ]] || statement_details "$c" "$w" "$n"
}
if [[ $PGBENCH == 1 ]]; then
  log "pgbench: $SESSIONS rows"
  sql -v rows="$SESSIONS" -f "$BENCH/pgbench/setup.sql" >/dev/null
fi

# --------------------------------------------------------------- HTTP contenders
# Every contender's server runs from the start, each on its own port, and their
# cells interleave: each repetition of a cell runs every contender once, in an
# order rotated from one to the next. The machine's drift over a long run then
# falls on all of them alike, not on whichever ran last, and the ratios compare
# runs minutes apart at most. One server is under load at a time; the others idle.
declare -A PID_OF PORT_OF
stop_servers() {
  local c
  for c in "${!PID_OF[@]}"; do SERVER_PID=${PID_OF[$c]} && stop_server; done
  PID_OF=()
}
port=18080
for c in $CONTENDERS; do
  port=$((port + 1)) CUR=$c
  export_routes
  if [[ $c == demo ]]; then
    start_server "$c" "$port"
    log "$c: seeding $SESSIONS sessions"
    # Over HTTP a request may fail on a busy machine: those missing are asked again.
    : >"$WORK/$c.cookies"
    for _ in 1 2 3 4 5; do
      have=$(wc -l <"$WORK/$c.cookies")
      ((have < SESSIONS)) || break
      seed "$c" $((SESSIONS - have)) >>"$WORK/$c.cookies" || true
    done
  else
    log "$c: seeding $SESSIONS sessions"
    seed "$c" "$SESSIONS" >"$WORK/$c.cookies"
    start_server "$c" "$port"
  fi
  PID_OF[$c]=$SERVER_PID PORT_OF[$c]=$port
  SERVER_PID=
  [[ $(wc -l <"$WORK/$c.cookies") -eq $SESSIONS ]] || { log "$c: seeding failed"; exit 1; }
  log "$c: warm-up"
  warm "$port" "$WORK/$c.cookies"
done
read -ra ORDER <<<"$CONTENDERS"
turn=0
for n in $CONCURRENCY; do
  for w in $WORKLOADS; do
    for rep in $(seq "$REPS"); do
      cell_order "$w"
      for i in "${!CELL[@]}"; do
        run_cell "${CELL[$(((i + turn) % ${#CELL[@]}))]}" "$w" "$rep" "$n"
      done
      turn=$((turn + 1))
    done
  done
done
SERVER_PID=
stop_servers
CUR= && export_routes

# --------------------------------------------------------------- scale
# READ on a table holding only the live sessions, then with SCALE_ROWS more rows
# (90 % expired), then while those expired rows are pruned: wrk runs in 1 s
# slices, and those that overlap the prune are reported.
fill_expired() { # contender from to: adds rows from+1..to
  # Expired rows end in the order they were written, 10 µs apart, as
  # sessions do: a prune walks them by expiry.
  local expire="CASE WHEN i % 10 = 0 THEN now() + interval '1 day'
    ELSE now() - interval '1 day' + i * interval '10 microseconds' END"
  local rows="generate_series($(($2 + 1)), $3) i"
  case $1 in
    pg-session) sql -c "INSERT INTO bench_pg.session (sid, sess, expire)
        SELECT 'fill' || md5(i::text), '{\"count\":0}', $expire FROM $rows" ;;
    express) sql -c "INSERT INTO bench_express.session (sid, sess, expire)
        SELECT 'fill' || md5(i::text), '{\"count\":0}', $expire FROM $rows" ;;
    tower-sessions*) sql -c "INSERT INTO $(table_of "$1") (id, data, expiry_date)
        SELECT 'fill' || md5(i::text), '\\x80'::bytea, $expire FROM $rows" ;;
  esac
  # Measure the table's size, not the aftermath of writing it: the fill's
  # WAL would otherwise be checkpointed during the READ runs that follow.
  sql -c "VACUUM ANALYZE $(table_of "$1")" -c "CHECKPOINT"
}
table_of() { # contender [schema suffix]
  case $1 in
    pg-session) echo "bench_pg${2:-}.session" ;;
    express) echo "bench_express${2:-}.session" ;;
    tower-sessions) echo "bench_ts${2:-}.session" ;;
    tower-sessions-always-save) echo "bench_ts_always${2:-}.session" ;;
    tower-sessions-noping) echo "bench_ts_noping${2:-}.session" ;;
  esac
}

if [[ $SCALE == 1 ]]; then
  for c in $SCALE_CONTENDERS; do
    big_port=$((port + 1)) live_port=$((port + 2)) port=$((port + 2))
    # Two instances of the contender: one on a table that grows, one on a
    # table of only the live sessions (the baseline). Their READ runs
    # alternate, so the machine's drift falls on both alike.
    log "scale $c: $SESSIONS live sessions in each of two tables"
    for sfx in "" _live; do
      sql -c "TRUNCATE $(table_of "$c" "$sfx")" 2>/dev/null || true
      seed "$c" "$SESSIONS" "$sfx" >"$WORK/$c$sfx.cookies"
      sql -c "VACUUM ANALYZE $(table_of "$c" "$sfx")"
    done
    start_server "$c" "$live_port" _live
    LIVE_PID=$SERVER_PID
    start_server "$c" "$big_port"
    BIG_PID=$SERVER_PID
    filled=0
    for rows in $SCALE_ROWS; do
      log "scale $c: $rows rows added (90 % expired)"
      fill_expired "$c" "$filled" "$rows"
      filled=$rows
      warm "$live_port" "$WORK/${c}_live.cookies"
      warm "$big_port" "$WORK/$c.cookies"
      # Each goes first every other time: what a run leaves behind (warm
      # caches, a pending flush) falls on both alike.
      for rep in $(seq "$REPS"); do
        for which in $( ((rep % 2)) && echo "live big" || echo "big live"); do
          if [[ $which == live ]]; then
            SERVER_PID=$LIVE_PID
            run_wrk "$c" read "read@live:$rows" "$rep" "$live_port" "$DURATION" "$WORK/${c}_live.cookies"
          else
            SERVER_PID=$BIG_PID
            run_wrk "$c" read "read@$rows" "$rep" "$big_port" "$DURATION"
          fi
        done
      done
    done
    kill -TERM "$LIVE_PID" 2>/dev/null || true
    wait "$LIVE_PID" 2>/dev/null || true
    LIVE_PID= SERVER_PID=$BIG_PID port=$big_port
    log "scale $c: prune under READ load"
    stats_reset
    if [[ $c == express ]]; then
      timeout 1200 node "$BENCH/express/server.js" prune 20500 >"$WORK/prune.out" 2>&1 &
    else
      timeout 1200 "$BIN" prune --contender "$c" --pool "$POOL" --delay-ms 20500 >"$WORK/prune.out" 2>&1 &
    fi
    PRUNE_PID=$!
    : >"$WORK/slices"
    slice=0 running=1
    # 1 s wrk slices from before the prune starts until one slice after it ends.
    while ((running)); do
      kill -0 "$PRUNE_PID" 2>/dev/null || running=0
      slice=$((slice + 1)) from=$(date +%s%3N)
      out=$(COOKIES="$WORK/$c.cookies" timeout 60 wrk -t"$THREADS" -c"$CONNECTIONS" -d1s --timeout 5s \
        -s "$BENCH/wrk/read.lua" "http://127.0.0.1:$port" | grep '^RESULT')
      echo "$out from=$from to=$(date +%s%3N)" >>"$WORK/slices"
    done
    wait "$PRUNE_PID" || { cat "$WORK/prune.out" >&2; exit 1; }
    PRUNE_PID=
    read -r prune_ms pstart pend < <(sed -n 's/.*prune_ms=\([0-9]*\) start_ms=\([0-9]*\) end_ms=\([0-9]*\).*/\1 \2 \3/p' "$WORK/prune.out")
    # Slices that overlap the prune are `read@prune`; the others `read@beside-prune`.
    awk -v c="$c" -v s="$pstart" -v e="$pend" '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      label = (v["from"] < e && v["to"] > s) ? "read@prune" : "read@beside-prune"
      printf "wrk\t%s\t%s\t%d\t%s\t%d\t%d\t%d\t%d\t%d\t\t\n", c, label, NR, v["rps"], v["p50_us"],
        v["p99_us"], v["max_us"], v["requests"], v["socket_errors"] + v["non2xx"] }' "$WORK/slices" >>"$RAW"
    longest=$(sql -c "SELECT round(max(max_exec_time)::numeric, 1) FROM pg_stat_statements
                      WHERE $OURS AND query ILIKE '%delete from%'")
    left=$(sql -c "SELECT count(*) FROM $(table_of "$c") WHERE $([[ $c == tower* ]] && echo expiry_date || echo expire) < now()")
    printf 'prune\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$filled" "$prune_ms" "$slice" "${longest:-?}" "$left" |
      tee -a "$RAW" | cut -f2- | tr '\t' ' ' >&2
    stop_server
  done
fi

# --------------------------------------------------------------- memory
# The server's resident memory after READ over the first count of distinct
# sessions, then over each larger count (new sessions added to the cookie
# pool; the run is long enough to read each about once).
if [[ $MEMORY == 1 ]]; then
  c=pg-session port=$((port + 1))
  sql -c "TRUNCATE $(table_of "$c")"
  : >"$WORK/mem.cookies"
  start_server "$c" "$port"
  have=0
  for n in $MEMORY_SESSIONS; do
    log "memory $c: $n sessions"
    seed "$c" $((n - have)) >>"$WORK/mem.cookies"
    have=$n
    sql -c "VACUUM ANALYZE $(table_of "$c")"
    d=$((n / 20000 + DURATION))
    out=$(COOKIES="$WORK/mem.cookies" timeout $((d + 120)) wrk -t"$THREADS" -c"$CONNECTIONS" -d"${d}s" \
      --timeout 5s -s "$BENCH/wrk/read.lua" "http://127.0.0.1:$port" | grep '^RESULT')
    requests=$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<<"$out")
    rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$(pgrep -P "$SERVER_PID" | head -n1)/status")
    printf 'memory\t%s\t%s\t%s\t%s\n' "$c" "$n" "$rss" "$requests" | tee -a "$RAW" | cut -f2- | tr '\t' ' ' >&2
  done
  stop_server
fi

# --------------------------------------------------------------- report
printf 'meta\tload average at end\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RAW"
rm -f "$RESULTS/$REPORT.svg" # written again only if the run has cells to chart
"$BIN" report "$RAW" "$RESULTS/$REPORT.svg" >"$RESULTS/$REPORT.md"
if [[ -s $WORK/details.md ]]; then
  {
    printf '\n## Statements behind each cell (last repetition)\n\n'
    printf '| contender | workload | connections | calls/request | mean µs | statement |\n|---|---|---:|---:|---:|---|\n'
    cat "$WORK/details.md"
  } >>"$RESULTS/$REPORT.md"
fi
cat "$RESULTS/$REPORT.md"
