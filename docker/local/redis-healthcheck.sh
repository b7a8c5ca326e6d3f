#!/bin/sh
# The local compose file's health check (docker-compose.cpu.yml); see postgres-healthcheck.sh for why a script.
exec redis-cli -h 127.0.0.1 -p "${REDIS_PORT:-6379}" ping
