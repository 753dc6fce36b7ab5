#!/usr/bin/env bash
# Make sure RabbitMQ (127.0.0.1:5672) and PostgreSQL (127.0.0.1:5432) are up.
# Order of attempts for each: already running -> start the installed server ->
# docker compose (when a Docker engine answers) -> install Debian packages
# (as root) -> print exactly what to do and fail.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # name port seconds
  for _ in $(seq 1 "$3"); do port_open "$2" && return 0; sleep 1; done
  echo "ensure-services: $1 did not come up on port $2 within $3s" >&2
  return 1
}

docker_ok() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

start_postgres() {
  if command -v pg_ctlcluster >/dev/null && ls /etc/postgresql/*/main >/dev/null 2>&1; then
    version=$(ls /etc/postgresql | sort -V | tail -1)
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  elif docker_ok; then
    docker compose -f "$here/docker-compose.yml" up -d postgres
  elif command -v apt-get >/dev/null && as_root true; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    version=$(ls /etc/postgresql | sort -V | tail -1)
    hba=/etc/postgresql/$version/main/pg_hba.conf
    # Local development only: trust connections from this machine, as the defaults expect.
    grep -q "modelyard" "$hba" || as_root sed -i "1i host all all 127.0.0.1/32 trust # modelyard dev" "$hba"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  else
    cat >&2 <<'MSG'
ensure-services: PostgreSQL is not running on 127.0.0.1:5432 and cannot be started from here.
  Debian/Ubuntu:  sudo apt-get install postgresql && sudo pg_ctlcluster <version> main start
  Docker:         docker compose -f deploy/docker-compose.yml up -d postgres
  Elsewhere:      set MODELYARD_DATABASE_URL to a server you can reach.
MSG
    return 1
  fi
  wait_port PostgreSQL 5432 60
}

start_rabbitmq() {
  if command -v rabbitmq-server >/dev/null; then
    as_root rabbitmq-server -detached || true
  elif docker_ok; then
    docker compose -f "$here/docker-compose.yml" up -d rabbitmq
  elif command -v apt-get >/dev/null && as_root true; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
    as_root rabbitmq-server -detached || true
  else
    cat >&2 <<'MSG'
ensure-services: RabbitMQ is not running on 127.0.0.1:5672 and cannot be started from here.
  Debian/Ubuntu:  sudo apt-get install rabbitmq-server && sudo rabbitmq-server -detached
  Docker:         docker compose -f deploy/docker-compose.yml up -d rabbitmq
  Elsewhere:      set MODELYARD_BROKER_URL to a broker you can reach.
MSG
    return 1
  fi
  wait_port RabbitMQ 5672 90
  # The port opens before the broker accepts work; wait for the app itself.
  if command -v rabbitmq-diagnostics >/dev/null; then
    for _ in $(seq 1 60); do as_root rabbitmq-diagnostics -q check_running >/dev/null 2>&1 && break; sleep 1; done
  fi
}

port_open 5432 || { echo "ensure-services: starting PostgreSQL" >&2; start_postgres; }
port_open 5672 || { echo "ensure-services: starting RabbitMQ" >&2; start_rabbitmq; }
echo "ensure-services: RabbitMQ and PostgreSQL are up" >&2
