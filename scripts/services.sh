#!/usr/bin/env bash
# Make sure PostgreSQL, Redis and RabbitMQ answer on localhost; start (or install) them if not.
# Also installs Debian's chromium if missing (tests/test_report.py renders the report in it).
# The tests create their own database / vhost and clean up; nothing here is destructive.
set -euo pipefail

need_apt=()
command -v pg_ctlcluster >/dev/null || need_apt+=(postgresql)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v rabbitmq-server >/dev/null || need_apt+=(rabbitmq-server)
command -v chromium >/dev/null || need_apt+=(chromium)  # the report test renders in it
if ((${#need_apt[@]})); then
  echo "installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # name port seconds
  for _ in $(seq 1 "$3"); do port_open "$2" && return 0; sleep 1; done
  echo "$1 did not open port $2" >&2; return 1
}

if ! port_open 5432; then
  version=$(ls /etc/postgresql | sort -V | tail -1)
  conf=/etc/postgresql/$version/main/pg_hba.conf
  if ! grep -q "ipbatch-trust" "$conf"; then  # trust on localhost, as on the CI machines
    sed -i '1i host all all 127.0.0.1/32 trust # ipbatch-trust' "$conf"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
fi
port_open 6379 || redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
port_open 5672 || rabbitmq-server -detached
wait_port PostgreSQL 5432 30
wait_port Redis 6379 15
wait_port RabbitMQ 5672 60
echo "services: PostgreSQL, Redis and RabbitMQ are up"
