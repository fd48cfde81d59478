# Sourced by the test and demo scripts: makes sure a local PostgreSQL answers on
# 127.0.0.1:5432 with pg_stat_statements loaded (the tests count statements
# through it). Installs and starts the Debian package when needed.

pg_cluster_version() { ls /etc/postgresql 2>/dev/null | sort -V | tail -n1; }

pg_psql() { psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -qAtX "$@"; }

ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "installing PostgreSQL from Debian's packages" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-contrib >/dev/null
  fi
  local v; v=$(pg_cluster_version)
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "starting PostgreSQL $v" >&2
    pg_ctlcluster --skip-systemctl-redirect "$v" main start
  fi
  for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
  if ! pg_psql -d postgres -c 'select 1' >/dev/null 2>&1; then
    # Debian's default is peer auth for the socket and md5 for TCP: allow the
    # local test user over loopback only.
    local hba; hba=$(su postgres -c "psql -qAtX -c 'show hba_file'")
    sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$v" main reload
  fi
  if ! pg_psql -d postgres -c 'show shared_preload_libraries' | grep -q pg_stat_statements; then
    echo "enabling pg_stat_statements (restarts PostgreSQL)" >&2
    local cur; cur=$(pg_psql -d postgres -c 'show shared_preload_libraries')
    pg_psql -d postgres -c "alter system set shared_preload_libraries = '${cur:+$cur,}pg_stat_statements'"
    pg_ctlcluster --skip-systemctl-redirect "$v" main restart
    for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
  fi
  pg_psql -d postgres -c "select 1 from pg_database where datname = 'test'" | grep -q 1 \
    || pg_psql -d postgres -c 'create database test'
  pg_psql -d test -c 'create extension if not exists pg_stat_statements'
}

# PgBouncer, which the tests start themselves in transaction mode on free ports.
ensure_pgbouncer() {
  if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    echo "installing PgBouncer from Debian's packages" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
  fi
}

# The native-tls feature (built by --all-features) links OpenSSL; the TLS
# tests make their certificates with the openssl command.
ensure_build_deps() {
  if ! pkg-config --exists openssl 2>/dev/null || ! command -v openssl >/dev/null 2>&1; then
    echo "installing OpenSSL headers and pkg-config from Debian's packages" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev pkg-config openssl >/dev/null
  fi
}
