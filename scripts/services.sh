#!/usr/bin/env bash
# services.sh start|stop|env|status — a throwaway PostgreSQL and Redis on loopback for the
# scale-out tests and benchmarks. Installs nothing (scripts/setup.sh test installs the
# Debian packages postgresql and redis-server).
#
#   eval "$(bash scripts/services.sh start)"   # starts both (or reuses them), prints the env
#   bash scripts/services.sh env               # prints the env again
#   bash scripts/services.sh stop              # stops both by PID and deletes the state dir
#
# State lives in $KVMWEB_SERVICES_DIR (default var/services): the PostgreSQL cluster
# (initdb'd with trust auth, listening only on 127.0.0.1 and a private socket dir), the
# Redis pid/log, the chosen ports and the env file. Both servers trade durability for
# speed (fsync off, no Redis persistence): never point anything you care about at them.
# `start` is idempotent (a running pair is reused); `stop` leaves nothing running and
# nothing on disk. Run as root, PostgreSQL runs as the `postgres` user (it refuses root).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${KVMWEB_SERVICES_DIR:-var/services}
if [ "${1:-}" = start ]; then
  mkdir -p "$DIR"
  touch "$DIR/.kvmweb-services" # marks the dir as ours: `stop` deletes only such a dir
fi
[ -d "$DIR" ] && DIR=$(cd "$DIR" && pwd)
PGDATA="$DIR/pg"
PGSOCK="$DIR/pgrun" # sockets and the server log, writable by postgres
PGLOG="$PGSOCK/pg.log"
ENVFILE="$DIR/env"
DB_ROLE=kvmweb
DB_NAME=kvmweb

pgbin() {
  # Debian keeps the server binaries out of PATH (pg_ctlcluster wraps them); pick the
  # newest installed major version.
  local bin
  for bin in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$bin/pg_ctl" ] && { echo "$bin"; return; }
  done
  command -v pg_ctl >/dev/null && { dirname "$(command -v pg_ctl)"; return; }
  echo "services: PostgreSQL server binaries not found (apt-get install postgresql)" >&2
  exit 1
}

as_pg() {
  # PostgreSQL refuses to run as root; as root run its tools as the postgres user.
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pg_running() {
  [ -f "$PGDATA/postmaster.pid" ] && kill -0 "$(head -1 "$PGDATA/postmaster.pid")" 2>/dev/null
}

redis_running() {
  [ -f "$DIR/redis.pid" ] && kill -0 "$(cat "$DIR/redis.pid")" 2>/dev/null
}

start_pg() {
  local bin port
  bin=$(pgbin)
  if pg_running; then return; fi
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    rm -rf "$PGDATA" "$PGSOCK"
    mkdir -p "$PGDATA" "$PGSOCK"
    [ "$(id -u)" = 0 ] && chown postgres: "$PGDATA" "$PGSOCK" && chmod 755 "$DIR"
    chmod 700 "$PGDATA"
    as_pg "$bin/initdb" -D "$PGDATA" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 \
      >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; exit 1; }
    free_port >"$DIR/pg.port"
  fi
  port=$(cat "$DIR/pg.port")
  # fsync/full_page_writes off: throwaway data, test speed matters more than durability.
  as_pg "$bin/pg_ctl" -D "$PGDATA" -l "$PGLOG" -w -t 60 start -o \
    "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$PGSOCK \
     -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    >/dev/null || { tail -20 "$PGLOG" >&2; exit 1; }
  # The app's role: not a superuser (like production), CREATEDB so pytest-django can
  # create and drop its test database.
  as_pg "$bin/psql" -h "$PGSOCK" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt >/dev/null <<SQL
SELECT 'CREATE ROLE $DB_ROLE LOGIN CREATEDB'
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$DB_ROLE') \gexec
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_ROLE'
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$DB_NAME') \gexec
SQL
}

start_redis() {
  local port
  if redis_running; then return; fi
  [ -f "$DIR/redis.port" ] || free_port >"$DIR/redis.port"
  port=$(cat "$DIR/redis.port")
  # No persistence (no RDB snapshots, no AOF); loopback only.
  redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --daemonize yes --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log" --dir "$DIR" \
    --databases 16 >/dev/null
  for _ in $(seq 100); do
    redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG && return
    sleep 0.1
  done
  echo "services: redis-server did not answer on 127.0.0.1:$port" >&2
  tail -20 "$DIR/redis.log" >&2
  exit 1
}

write_env() {
  {
    echo "DATABASE_URL=postgres://$DB_ROLE@127.0.0.1:$(cat "$DIR/pg.port")/$DB_NAME"
    echo "REDIS_URL=redis://127.0.0.1:$(cat "$DIR/redis.port")/0"
  } >"$ENVFILE"
}

print_env() {
  if [ ! -f "$ENVFILE" ] || ! pg_running || ! redis_running; then
    echo "services: not running (bash scripts/services.sh start)" >&2
    exit 1
  fi
  sed 's/^/export /' "$ENVFILE"
}

stop_pid() {
  # stop_pid PID NAME: TERM, wait up to 15 s, then KILL. Only the PID we recorded.
  local pid=$1 name=$2
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "services: $name ($pid) ignored TERM; killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
}

stop_all() {
  if pg_running; then
    as_pg "$(pgbin)/pg_ctl" -D "$PGDATA" -m fast -w -t 30 stop >/dev/null 2>&1 ||
      stop_pid "$(head -1 "$PGDATA/postmaster.pid")" postgres
  fi
  if redis_running; then stop_pid "$(cat "$DIR/redis.pid")" redis-server; fi
  if [ -f "$DIR/.kvmweb-services" ]; then rm -rf "$DIR"; fi
}

case "${1:-}" in
  start)
    command -v redis-server >/dev/null || {
      echo "services: redis-server not found (apt-get install redis-server)" >&2
      exit 1
    }
    start_pg
    start_redis
    write_env
    print_env
    ;;
  env) print_env ;;
  stop) stop_all ;;
  status)
    pg_running && echo "postgresql: running (port $(cat "$DIR/pg.port"))" || echo "postgresql: stopped"
    redis_running && echo "redis: running (port $(cat "$DIR/redis.port"))" || echo "redis: stopped"
    ;;
  *)
    echo "usage: $0 start|stop|env|status" >&2
    exit 2
    ;;
esac
