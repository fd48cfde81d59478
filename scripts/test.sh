#!/usr/bin/env bash
# The whole test suite, from a fresh machine: starts PostgreSQL (with
# pg_stat_statements, through which the tests count statements), installs
# PgBouncer and the npm test peers, then runs every test and doctest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg.sh
ensure_postgres
ensure_build_deps
ensure_pgbouncer
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

# Schemas left by interrupted runs.
pg_psql -d test -c "do \$\$ declare s text; begin
  for s in select nspname from pg_namespace where nspname ~ '^t_[a-z]{10}$' loop
    execute format('drop schema %I cascade', s); end loop; end \$\$;" >/dev/null

for dir in tests/idp tests/express; do
  if [ -f "$dir/package-lock.json" ]; then
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  fi
done

# The demo's own binary is driven by tests/demo.rs.
cargo build --all-features --example demo

if cargo nextest --version >/dev/null 2>&1; then
  runner=(cargo nextest run)
else
  runner=(cargo test)
fi
"${runner[@]}" --all-features --no-fail-fast "$@"
# With every feature on, sqlx speaks TLS through native-tls; the default
# backend, rustls, gets the TLS test here (default features and the CLI).
if [ $# -eq 0 ]; then
  "${runner[@]}" --features cli --test deploy tls_verify_full
fi
cargo test --all-features --doc "$@"
