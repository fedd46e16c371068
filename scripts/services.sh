#!/usr/bin/env bash
# Start the local services the test suite talks to (Postgres, Redis) when they are not running.
# The S3 server (SeaweedFS) is started by the tests themselves, on free ports.
set -euo pipefail

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if ! pg_up; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if ! redis_up; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log --maxmemory-policy noeviction || true
fi
for _ in $(seq 1 30); do
  if pg_up && redis_up; then break; fi
  sleep 1
done
pg_up || { echo "PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }
redis_up || { echo "Redis is not reachable on 127.0.0.1:6379" >&2; exit 1; }
# Celery on Redis must never have its queues evicted.
redis-cli -h 127.0.0.1 -p 6379 config set maxmemory-policy noeviction >/dev/null
echo "services: PostgreSQL and Redis are up"
